//! Deliver tasks end to end: ledger → worker pool → webhook receiver, with rejections,
//! outages and `tasks retry`.

use std::sync::Arc;
use std::time::Duration;

use mailpoll::cursor::Source;
use mailpoll::delivery::egress::{EgressGuard, EgressPolicy, GuardedClient};
use mailpoll::delivery::endpoint::{Endpoint, WebhookUrl};
use mailpoll::delivery::signing::message_key;
use mailpoll::directory::MailboxConfig;
use mailpoll::graph::Credentials;
use mailpoll::ledger::{self, DeliveryState, LedgerMessage};
use mailpoll::pipeline::DELIVER;
use mailpoll::pipeline::DeliverTask;
use mailpoll::pipeline::actions;
use mailpoll::pipeline::deliver::DeliverHandler;
use mailpoll::queue::{self, NewTask, RetryPolicy, WorkerId, WorkerPool, WorkerPoolConfig};
use mailpoll::telemetry::metrics::Metrics;
use mailpoll_testkit::directory::StaticDirectory;
use mailpoll_testkit::pg::TestDatabase;
use mailpoll_testkit::wait_until;
use mailpoll_testkit::webhook_receiver::{Hostile, WebhookReceiver, loopback_webhook_client};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

const SECRET: &str = mailpoll_testkit::webhook_receiver::TEST_SIGNING_SECRET;

fn config(uid: Uuid, receiver: &WebhookReceiver, max_attempts: i32) -> MailboxConfig {
    MailboxConfig {
        ledger_id: uid,
        source: Source {
            uid,
            namespace: "support".into(),
            name: "support-inbox".into(),
            mailbox: "support@contoso.com".into(),
            folder: "inbox".into(),
        },
        credentials: Credentials::client_secret("contoso", "mailpoll", "not-used-by-deliveries"),
        webhook: Some(Endpoint {
            timeout: Duration::from_secs(5),
            ..receiver.endpoint(Some(SECRET)).expect("endpoint")
        }),
        include_body: true,
        mark_as_read: false,
        move_to_folder: None,
        max_attempts,
        start: Default::default(),
        filter: None,
        max_concurrent_deliveries: None,
    }
}

fn pool_config(name: &str) -> WorkerPoolConfig {
    WorkerPoolConfig {
        worker_id: WorkerId::named(name),
        concurrency: 8,
        lease: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(2),
        poll_interval: Duration::from_millis(100),
        retry: RetryPolicy {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(100),
        },
        ..WorkerPoolConfig::default()
    }
}

/// Records `n` messages and their deliver tasks, as a poll would.
async fn record(pool: &PgPool, uid: Uuid, n: usize, max_attempts: i32) -> Vec<String> {
    let messages: Vec<LedgerMessage> = (0..n)
        .map(|i| LedgerMessage {
            message_id: format!("AAkALg-{i:05}"),
            subject: Some(format!("Order {i}")),
            from_address: Some("orders@fabrikam.com".into()),
            body: Some(format!("<p>order {i}</p>")),
            body_content_type: Some("html".into()),
            raw: json!({ "id": format!("AAkALg-{i:05}") }),
            ..Default::default()
        })
        .collect();
    let mut tx = pool.begin().await.expect("begin");
    let recorded = ledger::record_page(&mut tx, uid, &messages, &[], DeliveryState::Pending)
        .await
        .expect("record");
    let tasks: Vec<NewTask> = recorded
        .new_ids
        .iter()
        .map(|id| {
            NewTask::new(
                DELIVER,
                serde_json::to_value(DeliverTask {
                    mailbox_uid: uid,
                    message_id: id.clone(),
                    ledger_id: None,
                })
                .expect("payload"),
            )
            .owner(uid)
            .max_attempts(max_attempts)
        })
        .collect();
    queue::enqueue_many_on(&mut tx, &tasks)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    recorded.new_ids
}

async fn ledger_count(pool: &PgPool, uid: Uuid, state: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM messages WHERE mailbox_uid = $1 AND delivery_state = $2",
    )
    .bind(uid)
    .bind(state)
    .fetch_one(pool)
    .await
    .expect("count")
}

fn handler(db: &TestDatabase, directory: &StaticDirectory) -> DeliverHandler<StaticDirectory> {
    handler_with(db, directory, loopback_webhook_client())
}

fn handler_with(
    db: &TestDatabase,
    directory: &StaticDirectory,
    webhook: GuardedClient,
) -> DeliverHandler<StaticDirectory> {
    mailpoll::install_crypto_provider();
    DeliverHandler::new(
        db.pool.clone(),
        Arc::new(directory.clone()),
        webhook,
        Arc::new(Metrics::new()),
    )
}

/// The state, attempts and last error of every deliver task of `uid`.
async fn deliver_tasks(pool: &PgPool, uid: Uuid) -> Vec<(String, i32, Option<String>)> {
    sqlx::query_as(
        "SELECT state, attempts, last_error FROM tasks WHERE kind = 'deliver' AND owner_uid = $1
         ORDER BY id",
    )
    .bind(uid)
    .fetch_all(pool)
    .await
    .expect("deliver tasks")
}

/// Waits until no deliver task of `uid` is pending or running.
async fn settled(pool: &PgPool, uid: Uuid, within: Duration) -> Vec<(String, i32, Option<String>)> {
    wait_until("the deliveries to settle", within, || async {
        let tasks = deliver_tasks(pool, uid).await;
        !tasks.is_empty()
            && tasks
                .iter()
                .all(|(state, _, _)| state == "dead" || state == "succeeded")
    })
    .await;
    deliver_tasks(pool, uid).await
}

#[tokio::test]
async fn every_message_is_delivered_once_through_outages() {
    let db = TestDatabase::create().await.expect("test database");
    let receiver = WebhookReceiver::start(Some(SECRET))
        .await
        .expect("receiver");
    receiver.set_failure_rate(0.2);
    let directory = StaticDirectory::default();
    let uid = Uuid::new_v4();
    directory.insert(config(uid, &receiver, 50));
    let ids = record(&db.pool, uid, 300, 50).await;

    let pools: Vec<_> = (0..2)
        .map(|i| {
            WorkerPool::new(db.pool.clone(), pool_config(&format!("deliver-{i}")))
                .register(DELIVER, handler(&db, &directory))
                .start()
                .expect("pool starts")
        })
        .collect();
    wait_until(
        "every message delivered",
        Duration::from_secs(60),
        || async { ledger_count(&db.pool, uid, "delivered").await == 300 },
    )
    .await;
    for pool in pools {
        pool.shutdown().await;
    }

    let successes = receiver.successes();
    assert_eq!(successes.len(), 300, "one key per message");
    for id in &ids {
        let key = message_key(uid, id);
        assert_eq!(
            successes.get(&key),
            Some(&1),
            "message {id} delivered exactly once"
        );
    }
    assert!(receiver.failed_attempts() > 0, "the outage was exercised");
    assert_eq!(receiver.bad_signatures(), 0);
    let payload = &receiver.payloads()[&message_key(uid, &ids[0])];
    assert_eq!(payload["mailboxPoll"]["name"], "support-inbox");
    assert_eq!(payload["message"]["subject"], "Order 0");
    assert_eq!(payload["message"]["body"]["content"], "<p>order 0</p>");
}

#[tokio::test]
async fn rejected_messages_end_dead_and_tasks_retry_delivers_them_once() {
    let db = TestDatabase::create().await.expect("test database");
    let receiver = WebhookReceiver::start(Some(SECRET))
        .await
        .expect("receiver");
    let directory = StaticDirectory::default();
    let uid = Uuid::new_v4();
    directory.insert(config(uid, &receiver, 3));
    let ids = record(&db.pool, uid, 20, 3).await;
    let refused: Vec<&String> = ids.iter().step_by(5).collect();
    for id in &refused {
        receiver.reject(&message_key(uid, id));
    }

    let pool = WorkerPool::new(db.pool.clone(), pool_config("deliver"))
        .register(DELIVER, handler(&db, &directory))
        .start()
        .expect("pool starts");
    wait_until("deliveries settle", Duration::from_secs(30), || async {
        // The ledger is marked by the handler, the task's state by the pool right after.
        let dead: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tasks WHERE kind = 'deliver' AND state = 'dead'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("dead tasks");
        ledger_count(&db.pool, uid, "delivered").await == 16
            && ledger_count(&db.pool, uid, "failed").await == 4
            && dead == 4
    })
    .await;

    let dead: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, last_error FROM tasks WHERE kind = 'deliver' AND state = 'dead' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .expect("dead tasks");
    assert_eq!(dead.len(), 4, "rejections are permanent: no retries");
    for (_, error) in &dead {
        assert!(
            error.contains("HTTP 400"),
            "the reason names the status: {error}"
        );
        assert!(
            error.contains("message refused by the receiver"),
            "and quotes the body: {error}"
        );
    }
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT delivery_error FROM messages WHERE mailbox_uid = $1 AND delivery_state = 'failed'",
    )
    .bind(uid)
    .fetch_all(&db.pool)
    .await
    .expect("ledger reasons");
    assert!(reasons.iter().all(|r| r.contains("HTTP 400")));

    // The receiver is fixed; a person retries the dead tasks with the CLI.
    receiver.clear_faults();
    for (id, _) in &dead {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailpoll"))
            .args(["tasks", "retry", &id.to_string()])
            .env("DATABASE_URL", &db.url)
            .output()
            .await
            .expect("mailpoll tasks retry");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    wait_until(
        "retried messages delivered",
        Duration::from_secs(30),
        || async { ledger_count(&db.pool, uid, "delivered").await == 20 },
    )
    .await;
    pool.shutdown().await;
    let successes = receiver.successes();
    for id in &ids {
        assert_eq!(
            successes.get(&message_key(uid, id)),
            Some(&1),
            "{id} delivered exactly once"
        );
    }
}

/// A MailboxPoll deleted while messages wait for delivery: their tasks succeed without a POST
/// (there is nothing left to deliver to) and without an error, and the ledger keeps them
/// pending. The receiver is the MailboxPoll's own, which got its earlier message: a POST that
/// was not stopped would reach it.
#[tokio::test]
async fn a_deleted_mailbox_poll_stops_delivery_quietly() {
    let db = TestDatabase::create().await.expect("test database");
    let receiver = WebhookReceiver::start(Some(SECRET))
        .await
        .expect("receiver");
    let directory = StaticDirectory::default();
    let uid = Uuid::new_v4();
    directory.insert(config(uid, &receiver, 3));
    let pool = WorkerPool::new(db.pool.clone(), pool_config("deliver"))
        .register(DELIVER, handler(&db, &directory))
        .start()
        .expect("pool starts");
    let delivered = record(&db.pool, uid, 1, 3).await;
    wait_until(
        "the first message delivered",
        Duration::from_secs(20),
        || async { ledger_count(&db.pool, uid, "delivered").await == 1 },
    )
    .await;
    assert_eq!(
        receiver.successes().get(&message_key(uid, &delivered[0])),
        Some(&1)
    );

    directory.remove(uid);
    // The first message is already in the ledger: only the three others are new.
    let orphaned = record(&db.pool, uid, 4, 3).await;
    assert_eq!(orphaned.len(), 3);
    wait_until(
        "the orphaned tasks finish",
        Duration::from_secs(20),
        || async {
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM tasks WHERE state IN ('pending', 'running')",
            )
            .fetch_one(&db.pool)
            .await
            .expect("count");
            open == 0
        },
    )
    .await;
    pool.shutdown().await;

    let tasks: Vec<(String, String, i32, Option<String>)> = sqlx::query_as(
        "SELECT payload->>'message_id', state, attempts, last_error FROM tasks
          WHERE kind = 'deliver' AND payload->>'message_id' = ANY($1) ORDER BY 1",
    )
    .bind(&orphaned)
    .fetch_all(&db.pool)
    .await
    .expect("tasks");
    let expected: Vec<_> = orphaned
        .iter()
        .map(|id| (id.clone(), "succeeded".to_owned(), 0, None))
        .collect();
    assert_eq!(
        tasks, expected,
        "done at the first attempt, without an error"
    );
    assert_eq!(
        receiver.requests(),
        1,
        "only the message delivered before the deletion"
    );
    assert_eq!(ledger_count(&db.pool, uid, "pending").await, 3);
}

#[tokio::test]
async fn a_delivery_whose_task_dies_by_rescue_is_marked_failed() {
    let db = TestDatabase::create().await.expect("test database");
    let uid = Uuid::new_v4();
    let ids = record(&db.pool, uid, 3, 1).await;
    // A worker claims one task on its only attempt and vanishes: no handler ever finishes it.
    let claimed = queue::claim(
        &db.pool,
        &[DELIVER.to_string()],
        1,
        "vanished-worker",
        Duration::from_millis(1),
    )
    .await
    .expect("claim");
    assert_eq!(claimed.len(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let rescued = queue::rescue(&db.pool, 100, &queue::RetryPolicy::default())
        .await
        .expect("rescue");
    assert_eq!(
        rescued.dead,
        vec![claimed[0].id],
        "its only attempt is used up: {rescued:?}"
    );
    assert_eq!(ledger_count(&db.pool, uid, "pending").await, 3);

    let changed = mailpoll::controller::fail_abandoned_deliveries(&db.pool)
        .await
        .expect("fail abandoned deliveries");
    assert_eq!(changed, 1);
    assert_eq!(ledger_count(&db.pool, uid, "failed").await, 1);
    assert_eq!(ledger_count(&db.pool, uid, "pending").await, 2);
    let (id, error): (String, Option<String>) = sqlx::query_as(
        "SELECT message_id, delivery_error FROM messages
          WHERE mailbox_uid = $1 AND delivery_state = 'failed'",
    )
    .bind(uid)
    .fetch_one(&db.pool)
    .await
    .expect("failed message");
    assert!(ids.contains(&id));
    assert!(error.is_some_and(|e| !e.is_empty()), "the reason is kept");
    // Idempotent: a second pass changes nothing.
    assert_eq!(
        mailpoll::controller::fail_abandoned_deliveries(&db.pool)
            .await
            .expect("again"),
        0
    );
}

/// A message whose after-actions are due but whose mailbox has no actions run (the live run it
/// was deduplicated against finished without seeing it) gets a run from the sweep, once.
#[tokio::test]
async fn stranded_after_actions_get_a_run_once() {
    let db = TestDatabase::create().await.expect("test database");
    let uid = Uuid::new_v4();
    let ids = record(&db.pool, uid, 2, 5).await;
    let mut conn = db.pool.acquire().await.expect("connection");
    ledger::mark_actions_due(&mut conn, uid, &ids[0])
        .await
        .expect("actions due");
    drop(conn);
    let live_actions = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM tasks WHERE kind = 'actions' AND owner_uid = $1 AND state IN ('pending', 'running')",
        )
        .bind(uid)
        .fetch_one(&db.pool)
        .await
        .expect("count")
    };
    assert_eq!(live_actions().await, 0);
    assert_eq!(actions::requeue_stranded(&db.pool).await.expect("sweep"), 1);
    assert_eq!(
        actions::requeue_stranded(&db.pool)
            .await
            .expect("sweep again"),
        0,
        "a live run is not queued twice"
    );
    assert_eq!(live_actions().await, 1);
}

/// A receiver answering 400 with NUL, control characters and invalid UTF-8 fails only its own
/// delivery: the task is dead with a readable error, the ledger keeps a storable reason, and
/// every other delivery goes on.
#[tokio::test]
async fn a_receiver_answering_garbage_fails_only_its_own_delivery() {
    let db = TestDatabase::create().await.expect("test database");
    let receiver = WebhookReceiver::start(Some(SECRET))
        .await
        .expect("receiver");
    let directory = StaticDirectory::default();
    let uid = Uuid::new_v4();
    directory.insert(config(uid, &receiver, 3));
    let ids = record(&db.pool, uid, 12, 3).await;
    receiver.reject_with_garbage(&message_key(uid, &ids[4]));

    let pool = WorkerPool::new(db.pool.clone(), pool_config("garbage"))
        .register(DELIVER, handler(&db, &directory))
        .start()
        .expect("pool starts");
    wait_until("deliveries settle", Duration::from_secs(30), || async {
        let dead: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tasks WHERE kind = 'deliver' AND state = 'dead'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("dead tasks");
        ledger_count(&db.pool, uid, "delivered").await == 11
            && ledger_count(&db.pool, uid, "failed").await == 1
            && dead == 1
    })
    .await;
    pool.shutdown().await;

    let error: String = sqlx::query_scalar(
        "SELECT last_error FROM tasks WHERE kind = 'deliver' AND state = 'dead'",
    )
    .fetch_one(&db.pool)
    .await
    .expect("dead task");
    assert!(error.contains("HTTP 400"), "{error}");
    assert!(error.contains("refused\u{fffd} by\u{fffd} the"), "{error}");
    assert!(
        !error.contains('\u{0}') && !error.contains('\u{1b}'),
        "{error:?}"
    );
    let reason: String = sqlx::query_scalar(
        "SELECT delivery_error FROM messages WHERE mailbox_uid = $1 AND message_id = $2",
    )
    .bind(uid)
    .bind(&ids[4])
    .fetch_one(&db.pool)
    .await
    .expect("ledger reason");
    assert!(reason.contains("HTTP 400"), "{reason}");
    let running: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state IN ('pending', 'running')")
            .fetch_one(&db.pool)
            .await
            .expect("live tasks");
    assert_eq!(running, 0, "nothing is left retrying");
}

/// Parked after-actions are not brought back by the leader's sweep (a dead actions task used
/// to be re-queued every minute, forever).
#[tokio::test]
async fn parked_after_actions_are_left_alone_by_the_sweep() {
    let db = TestDatabase::create().await.expect("test database");
    let uid = Uuid::new_v4();
    let ids = record(&db.pool, uid, 2, 5).await;
    let mut conn = db.pool.acquire().await.expect("connection");
    for id in &ids {
        ledger::mark_actions_due(&mut conn, uid, id)
            .await
            .expect("actions due");
    }
    drop(conn);
    let failing = std::slice::from_ref(&ids[0]);
    for round in 1..=actions::MAX_ACTION_FAILURES {
        let parked = ledger::record_action_failures(
            &db.pool,
            uid,
            failing,
            "boom\0",
            actions::MAX_ACTION_FAILURES,
        )
        .await
        .expect("count a failure");
        assert_eq!(
            parked.len(),
            usize::from(round == actions::MAX_ACTION_FAILURES)
        );
    }
    assert_eq!(
        ledger::actions_due(&db.pool, uid, 10).await.expect("due"),
        vec![ids[1].clone()],
        "the parked message no longer stands first in line"
    );
    ledger::mark_actions_done(&db.pool, uid, &ids[1..])
        .await
        .expect("done");
    assert_eq!(actions::requeue_stranded(&db.pool).await.expect("sweep"), 0);
    let mut conn = db.pool.acquire().await.expect("connection");
    let counts = ledger::counts(&mut conn, uid).await.expect("counts");
    assert_eq!((counts.actions_parked, counts.failed), (1, 1));
    assert_eq!(
        ledger::latest_parked_error(&mut conn, uid)
            .await
            .expect("reason")
            .as_deref(),
        Some("boom\u{fffd}")
    );
    drop(conn);
    assert_eq!(
        ledger::unpark_actions(&db.pool, uid).await.expect("unpark"),
        1
    );
    assert_eq!(actions::requeue_stranded(&db.pool).await.expect("sweep"), 1);
}

/// A destination the egress policy refuses fails each of its deliveries at the first attempt,
/// with the rule in the error and not a byte sent: a refusal is never retried.
#[tokio::test]
async fn a_refused_destination_fails_every_delivery_at_once_without_sending() {
    let db = TestDatabase::create().await.expect("test database");
    let receiver = WebhookReceiver::start(Some(SECRET))
        .await
        .expect("receiver");
    let directory = StaticDirectory::default();
    let uid = Uuid::new_v4();
    let mut refused = config(uid, &receiver, 5);
    if let Some(webhook) = &mut refused.webhook {
        webhook.url = WebhookUrl::parse(&format!("{}?sig=s3cret", receiver.url())).expect("URL");
    }
    directory.insert(refused);
    record(&db.pool, uid, 3, 5).await;
    // The operator's default policy: no loopback.
    let strict = GuardedClient::new(EgressGuard::new(EgressPolicy::default()), "mailpoll-test")
        .expect("webhook client");
    let pool = WorkerPool::new(db.pool.clone(), pool_config("refused"))
        .register(DELIVER, handler_with(&db, &directory, strict))
        .start()
        .expect("pool starts");
    let tasks = settled(&db.pool, uid, Duration::from_secs(30)).await;
    pool.shutdown().await;

    let expected = "webhook address 127.0.0.1 is a loopback address; the operator does not allow \
                    loopback destinations (--webhook-allow-loopback)";
    assert_eq!(
        tasks,
        vec![("dead".to_owned(), 1, Some(expected.to_owned())); 3],
        "dead at the first attempt"
    );
    assert_eq!(ledger_count(&db.pool, uid, "failed").await, 3);
    let reasons: Vec<String> =
        sqlx::query_scalar("SELECT delivery_error FROM messages WHERE mailbox_uid = $1")
            .bind(uid)
            .fetch_all(&db.pool)
            .await
            .expect("ledger reasons");
    assert!(reasons.iter().all(|r| r == expected), "{reasons:?}");
    assert_eq!(receiver.connections(), 0, "nothing reached the receiver");
}

/// Each hostile receiver behaviour, through the worker pool: the delivery ends in a verdict
/// (delivered, failed at once, or failed after its bounded attempts), with an error that
/// names what happened and never the URL's secret.
#[tokio::test]
async fn hostile_receivers_end_each_delivery_in_a_bounded_verdict() {
    let db = TestDatabase::create().await.expect("test database");
    let receiver = WebhookReceiver::start(None).await.expect("receiver");
    let directory = StaticDirectory::default();
    let pool = WorkerPool::new(db.pool.clone(), pool_config("hostile"))
        .register(DELIVER, handler(&db, &directory))
        .start()
        .expect("pool starts");
    let retry = "webhook delivery failed, will retry: ";
    // (behaviour, final task state, failed attempts, last error)
    let cases: Vec<(Hostile, &str, i32, String)> = vec![
        (
            Hostile::Redirect {
                status: 302,
                location: "https://elsewhere.example/in?sig=s3cret".into(),
            },
            "dead",
            1,
            "webhook answered HTTP 302, a redirect to elsewhere.example; redirects are not \
             followed: set the webhook URL to the final address"
                .into(),
        ),
        (
            Hostile::HugeBody {
                status: 413,
                bytes: 50 * 1024 * 1024,
            },
            "dead",
            1,
            format!(
                "webhook rejected the message with HTTP 413: {}…",
                "hostile receiver body "
                    .repeat(10)
                    .chars()
                    .take(200)
                    .collect::<String>()
            ),
        ),
        (
            Hostile::HugeBody {
                status: 200,
                bytes: 50 * 1024 * 1024,
            },
            "succeeded",
            0,
            String::new(),
        ),
        (
            Hostile::TrickleHead {
                every: Duration::from_millis(100),
            },
            "dead",
            3,
            format!("{retry}timed out: operation timed out"),
        ),
        (
            Hostile::ResetMidResponse {
                status: 200,
                after: 10,
            },
            "dead",
            3,
            format!(
                "{retry}request failed: client error (SendRequest): connection error: Connection reset by peer (os error 104)"
            ),
        ),
        (
            Hostile::GarbageStatusLine { status: 400 },
            "dead",
            3,
            format!(
                "{retry}request failed: client error (SendRequest): invalid HTTP status-code parsed"
            ),
        ),
    ];
    for (hostile, state, attempts, error) in cases {
        let uid = Uuid::new_v4();
        let mut hostile_config = config(uid, &receiver, 3);
        if let Some(webhook) = &mut hostile_config.webhook {
            webhook.url =
                WebhookUrl::parse(&format!("{}?sig=s3cret", receiver.url())).expect("URL");
            webhook.timeout = Duration::from_millis(600);
            webhook.signing_secret = None;
        }
        directory.insert(hostile_config);
        receiver.set_hostile(Some(hostile.clone()));
        record(&db.pool, uid, 1, 3).await;
        let tasks = settled(&db.pool, uid, Duration::from_secs(30)).await;
        let expected_error = (!error.is_empty()).then_some(error);
        assert_eq!(
            tasks,
            vec![(state.to_owned(), attempts, expected_error)],
            "{hostile:?}"
        );
        let ledger_state = if state == "succeeded" {
            "delivered"
        } else {
            "failed"
        };
        assert_eq!(
            ledger_count(&db.pool, uid, ledger_state).await,
            1,
            "{hostile:?}"
        );
    }
    pool.shutdown().await;
    assert_eq!(
        receiver.successes().len(),
        0,
        "the regular receiver never answered"
    );
}
