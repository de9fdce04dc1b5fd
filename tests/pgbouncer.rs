//! mailpoll behind a real PgBouncer (the Debian package), as managed Postgres setups put one in
//! front: migrations run by a role that is not a superuser, the task queue (enqueue, claims
//! by several pools, completions, failures, rescue) and a poll with its deliveries, with
//! notifications off, all through the pooler. Skipped with a message when the pgbouncer binary is missing, except in CI
//! (`CI=true`), where that fails.
//!
//! Session pooling works. Transaction pooling with PgBouncer 1.18 (Debian 12's) does not: sqlx
//! names its prepared statements per connection (`sqlx_s_1`, ...), even without a statement
//! cache, and PgBouncer before 1.21 hands them to whichever server is free, where another
//! client's statement of that name already exists. The last test pins that down.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mailpoll::cursor::Source;
use mailpoll::directory::MailboxConfig;
use mailpoll::graph::{Credentials, Governor, GovernorConfig, GraphClient, GraphConfig};
use mailpoll::pipeline::deliver::DeliverHandler;
use mailpoll::pipeline::poll::{PollHandler, PollSettings};
use mailpoll::pipeline::{DELIVER, POLL, PollTask};
use mailpoll::queue::{
    self, ClaimedTask, HandlerError, NewTask, RetryPolicy, TaskContext, TaskState, WorkerId,
    WorkerPool, WorkerPoolConfig, handler_fn,
};
use mailpoll::telemetry::metrics::Metrics;
use mailpoll_testkit::directory::StaticDirectory;
use mailpoll_testkit::graph::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT, EmulatorConfig, GraphEmulator,
};
use mailpoll_testkit::pg::admin_url;
use mailpoll_testkit::pgbouncer::{self, PgBouncer, PoolMode};
use mailpoll_testkit::wait_until;
use mailpoll_testkit::webhook_receiver::{TEST_SIGNING_SECRET, WebhookReceiver};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

/// The pgbouncer binary, or `None` (with a message) when a local run lacks it.
fn pgbouncer_binary() -> Option<std::path::PathBuf> {
    let found = pgbouncer::binary();
    if found.is_none() {
        let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
        assert!(
            !in_ci,
            "pgbouncer is missing in CI: install the Debian package pgbouncer (scripts/test does)"
        );
        eprintln!("SKIPPED: pgbouncer is not installed (apt-get install pgbouncer)");
    }
    found
}

/// A login role without superuser and a database it owns, on the test Postgres directly.
async fn role_and_database(admin: &PgPool) -> (String, String) {
    let suffix = Uuid::new_v4().simple().to_string();
    let (role, database) = (format!("app_{suffix}"), format!("mailpoll_pgb_{suffix}"));
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE \"{role}\" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE"
    )))
    .execute(admin)
    .await
    .expect("create role");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE \"{database}\" OWNER \"{role}\""
    )))
    .execute(admin)
    .await
    .expect("create database");
    (role, database)
}

fn upstream_port(url: &str) -> u16 {
    url.parse::<sqlx::postgres::PgConnectOptions>()
        .expect("DATABASE_URL is a Postgres URL")
        .get_port()
}

fn worker_config(name: &str) -> WorkerPoolConfig {
    WorkerPoolConfig {
        worker_id: WorkerId::named(name),
        concurrency: 4,
        listen: false,
        lease: Duration::from_secs(3),
        heartbeat_interval: Duration::from_secs(1),
        poll_interval: Duration::from_millis(50),
        rescue_interval: Duration::from_millis(200),
        retry: RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(20),
        },
        shutdown_grace: Duration::from_secs(5),
        ..WorkerPoolConfig::default()
    }
}

async fn count(pool: &PgPool, state: TaskState) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state = $1")
        .bind(state.as_str())
        .fetch_one(pool)
        .await
        .expect("count tasks")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_runs_behind_pgbouncer_with_a_role_that_is_not_superuser() {
    let Some(binary) = pgbouncer_binary() else {
        return;
    };
    let admin_url = admin_url().expect("DATABASE_URL");
    let admin = PgPool::connect(&admin_url).await.expect("admin pool");
    let (role, database) = role_and_database(&admin).await;
    let bouncer = PgBouncer::start(
        &binary,
        upstream_port(&admin_url),
        PoolMode::Session,
        &[role.as_str()],
    )
    .expect("start pgbouncer");
    // The process never LISTENs: behind a pooler notifications are not to be relied on.
    mailpoll::db::disable_listening();
    let url = bouncer.url(&role, &database);
    let pool = mailpoll::db::connect(&url, &mailpoll::db::PoolConfig::default())
        .await
        .expect("pool through pgbouncer");
    mailpoll::db::migrate(&pool)
        .await
        .expect("migrations by a role that is not superuser, through pgbouncer");
    let superuser: bool =
        sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&pool)
            .await
            .expect("read the role");
    assert!(!superuser);

    // Two tasks are claimed by a worker that then vanishes: their leases run out and a pool
    // rescues them.
    let lost = queue::enqueue_many(
        &pool,
        &[
            NewTask::new("work", json!({ "n": 1001 })),
            NewTask::new("work", json!({ "n": 1003 })),
        ],
    )
    .await
    .expect("enqueue the tasks of the vanishing worker");
    let vanished = queue::claim(
        &pool,
        &["work".to_owned()],
        2,
        "vanished",
        Duration::from_secs(1),
    )
    .await
    .expect("claim by the vanishing worker");
    assert_eq!(vanished.len(), 2);
    assert!(
        lost.iter()
            .all(|task| vanished.iter().any(|held| held.id == task.id))
    );

    // 200 tasks: every tenth fails for good, the rest succeed.
    let tasks: Vec<NewTask> = (0..200)
        .map(|n| NewTask::new("work", json!({ "n": n })).owner(Uuid::new_v4()))
        .collect();
    queue::enqueue_many(&pool, &tasks).await.expect("enqueue");
    let handled = Arc::new(AtomicUsize::new(0));
    let mut pools = Vec::new();
    for replica in 0..3 {
        let connections = mailpoll::db::connect(
            &url,
            &mailpoll::db::PoolConfig {
                max_connections: 4,
                ..mailpoll::db::PoolConfig::default()
            },
        )
        .await
        .expect("replica pool through pgbouncer");
        let handled = handled.clone();
        pools.push(
            WorkerPool::new(connections, worker_config(&format!("replica-{replica}")))
                .register(
                    "work",
                    handler_fn(move |task: ClaimedTask, _ctx: TaskContext| {
                        let handled = handled.clone();
                        async move {
                            handled.fetch_add(1, Ordering::SeqCst);
                            let n = task.payload["n"].as_i64().unwrap_or(0);
                            if n % 10 == 0 {
                                return Err(HandlerError::Permanent(format!("task {n} refused")));
                            }
                            Ok(())
                        }
                    }),
                )
                .start()
                .expect("start pool"),
        );
    }
    wait_until(
        "every task to end (180 + 2 rescued succeeded, 20 dead)",
        Duration::from_secs(60),
        || async {
            count(&pool, TaskState::Succeeded).await + count(&pool, TaskState::Dead).await == 202
        },
    )
    .await;
    let mut rescued = 0;
    let mut claimed = 0;
    for running in pools {
        let stats = running.stats();
        rescued += stats.rescued;
        claimed += stats.claimed;
        running.shutdown().await;
    }
    assert_eq!(count(&pool, TaskState::Succeeded).await, 182);
    assert_eq!(count(&pool, TaskState::Dead).await, 20);
    assert_eq!(rescued, 2, "the vanished worker's two tasks");
    assert_eq!(claimed, 202);
    assert_eq!(
        handled.load(Ordering::SeqCst),
        202,
        "every task handled once"
    );
    pool.close().await;
    drop(bouncer);
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE \"{database}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE \"{role}\"")))
        .execute(&admin)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poll_and_its_deliveries_run_behind_pgbouncer() {
    let Some(binary) = pgbouncer_binary() else {
        return;
    };
    mailpoll::install_crypto_provider();
    let admin_url = admin_url().expect("DATABASE_URL");
    let admin = PgPool::connect(&admin_url).await.expect("admin pool");
    let (role, database) = role_and_database(&admin).await;
    let bouncer = PgBouncer::start(
        &binary,
        upstream_port(&admin_url),
        PoolMode::Session,
        &[role.as_str()],
    )
    .expect("start pgbouncer");
    mailpoll::db::disable_listening();
    let pool = mailpoll::db::connect(
        &bouncer.url(&role, &database),
        &mailpoll::db::PoolConfig::default(),
    )
    .await
    .expect("pool through pgbouncer");
    mailpoll::db::migrate(&pool).await.expect("migrations");

    const MAILBOX: &str = "orders@contoso.com";
    let emulator = GraphEmulator::start(EmulatorConfig {
        mailboxes: vec![MAILBOX.into()],
        ..EmulatorConfig::default()
    })
    .await
    .expect("Graph emulator");
    emulator
        .add_messages(MAILBOX, "inbox", 30)
        .expect("seed mail");
    let receiver = WebhookReceiver::start(Some(TEST_SIGNING_SECRET))
        .await
        .expect("receiver");
    let uid = Uuid::new_v4();
    let directory = StaticDirectory::default();
    directory.insert(MailboxConfig {
        ledger_id: uid,
        source: Source {
            uid,
            namespace: "sales".into(),
            name: "orders".into(),
            mailbox: MAILBOX.into(),
            folder: "inbox".into(),
        },
        credentials: Credentials::client_secret(
            DEFAULT_TENANT,
            DEFAULT_CLIENT_ID,
            DEFAULT_CLIENT_SECRET,
        ),
        webhook: Some(
            receiver
                .endpoint(Some(TEST_SIGNING_SECRET))
                .expect("endpoint"),
        ),
        include_body: false,
        mark_as_read: false,
        move_to_folder: None,
        max_attempts: 10,
        start: Default::default(),
        filter: None,
        max_concurrent_deliveries: Some(2),
    });
    let directory = Arc::new(directory);
    let base = emulator.base_url();
    let graph = GraphClient::new(
        GraphConfig::with_urls(&base, &base).expect("Graph config"),
        Governor::new(GovernorConfig::default()),
    )
    .expect("Graph client");
    let metrics = Arc::new(Metrics::new());
    let workers = WorkerPool::new(
        pool.clone(),
        WorkerPoolConfig {
            owner_caps: std::collections::HashMap::from([(DELIVER.to_owned(), 8)]),
            ..worker_config("pipeline")
        },
    )
    .register(
        POLL,
        PollHandler {
            pool: pool.clone(),
            directory: directory.clone(),
            graph,
            metrics: metrics.clone(),
            settings: PollSettings {
                page_size: 10,
                ..PollSettings::default()
            },
        },
    )
    .register(
        DELIVER,
        DeliverHandler::new(
            pool.clone(),
            directory,
            mailpoll_testkit::webhook_receiver::loopback_webhook_client(),
            metrics,
        ),
    )
    .start()
    .expect("worker pool");
    let poll = NewTask::of(&PollTask { mailbox_uid: uid }).expect("poll task");
    queue::enqueue(&pool, &poll)
        .await
        .expect("enqueue the poll");
    wait_until(
        "the 30 messages to be delivered through pgbouncer",
        Duration::from_secs(60),
        || async { receiver.successes().len() == 30 },
    )
    .await;
    wait_until("every task to succeed", Duration::from_secs(30), || async {
        count(&pool, TaskState::Succeeded).await == 31
    })
    .await;
    workers.shutdown().await;
    let successes = receiver.successes();
    assert_eq!(successes.len(), 30, "each message delivered");
    assert!(
        successes.values().all(|&n| n == 1),
        "each message delivered once: {successes:?}"
    );
    let capped: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE kind = 'deliver' AND max_running = 2")
            .fetch_one(&pool)
            .await
            .expect("count deliver tasks");
    assert_eq!(capped, 30, "deliveries carry the MailboxPoll's cap");
    pool.close().await;
    drop(bouncer);
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE \"{database}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE \"{role}\"")))
        .execute(&admin)
        .await;
}

#[tokio::test]
async fn transaction_pooling_of_pgbouncer_1_18_breaks_named_prepared_statements() {
    let Some(binary) = pgbouncer_binary() else {
        return;
    };
    let admin_url = admin_url().expect("DATABASE_URL");
    let admin = PgPool::connect(&admin_url).await.expect("admin pool");
    let (role, database) = role_and_database(&admin).await;
    let bouncer = PgBouncer::start(
        &binary,
        upstream_port(&admin_url),
        PoolMode::Transaction,
        &[role.as_str()],
    )
    .expect("start pgbouncer");
    // Even without a statement cache: sqlx still names the statements it prepares.
    let url = format!(
        "{}?statement-cache-capacity=0",
        bouncer.url(&role, &database)
    );
    let mut failures = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..2 {
        let pool = mailpoll::db::connect(
            &url,
            &mailpoll::db::PoolConfig {
                max_connections: 1,
                ..mailpoll::db::PoolConfig::default()
            },
        )
        .await
        .expect("a connection through pgbouncer");
        for n in 0..2_i64 {
            if let Err(error) = sqlx::query_scalar::<_, i64>("SELECT $1::bigint")
                .bind(n)
                .fetch_one(&pool)
                .await
            {
                failures.push(error.to_string());
            }
        }
        // Kept open, so the next client meets its statements on the shared server.
        clients.push(pool);
    }
    for client in clients {
        client.close().await;
    }
    assert!(
        failures
            .iter()
            .any(|error| error.contains("already exists")),
        "a second client's statement meets the first's on the shared server: {failures:?}"
    );
    drop(bouncer);
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE \"{database}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE \"{role}\"")))
        .execute(&admin)
        .await;
}
