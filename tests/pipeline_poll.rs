//! The whole pipeline against the Graph emulator and real Postgres: polls record every
//! message once and deliver it once, through replays, resyncs, crashes and outages; after
//! actions touch exactly the delivered messages.
//!
//! Sizes are small by default; `MAILPOLL_BIG=1` runs the issue's full sizes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use mailpoll::cursor::Source;
use mailpoll::delivery::endpoint::Endpoint;
use mailpoll::delivery::signing::message_key;
use mailpoll::directory::MailboxConfig;
use mailpoll::graph::{
    ClientSecret, Credentials, Governor, GovernorConfig, GraphClient, GraphConfig, Proof, SlotKey,
};
use mailpoll::mailbox_slots::MailboxSlots;
use mailpoll::pipeline::actions::ActionsHandler;
use mailpoll::pipeline::deliver::DeliverHandler;
use mailpoll::pipeline::poll::{PollHandler, PollSettings};
use mailpoll::pipeline::{ACTIONS, DELIVER, POLL, run_lease};
use mailpoll::pipeline::{PollTask, poll_dedupe_key};
use mailpoll::queue::{
    self, NewTask, RetryPolicy, RunningPool, WorkerId, WorkerPool, WorkerPoolConfig,
};
use mailpoll::telemetry::metrics::Metrics;
use mailpoll_testkit::directory::StaticDirectory;
use mailpoll_testkit::graph::{
    BatchFaults, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT, EmulatorConfig, Faults,
    GraphEmulator, NewMessage, TokenEndpointFaults,
};
use mailpoll_testkit::pg::TestDatabase;
use mailpoll_testkit::webhook_receiver::WebhookReceiver;
use mailpoll_testkit::{wait_for, wait_for_ok, wait_until};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const MAILBOX: &str = "orders@contoso.com";
const SECRET: &str = mailpoll_testkit::webhook_receiver::TEST_SIGNING_SECRET;

fn big() -> bool {
    std::env::var("MAILPOLL_BIG").is_ok_and(|v| v == "1")
}

/// What a test worker pool runs and how.
struct Shape {
    page_size: u32,
    /// The pool poll pages are recorded through.
    poll_pool: PgPool,
    /// Whether it delivers and runs after-actions too.
    deliver: bool,
    run_lease: Duration,
    /// Tasks held at once.
    concurrency: usize,
}

impl Shape {
    fn new(page_size: u32, poll_pool: PgPool, deliver: bool, run_lease: Duration) -> Self {
        Self {
            page_size,
            poll_pool,
            deliver,
            run_lease,
            concurrency: 8,
        }
    }
}

struct World {
    db: TestDatabase,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    directory: StaticDirectory,
    uid: Uuid,
}

impl World {
    async fn start(faults: Faults) -> Self {
        mailpoll::install_crypto_provider();
        let db = TestDatabase::create().await.expect("test database");
        let emulator = GraphEmulator::start(EmulatorConfig {
            mailboxes: vec![MAILBOX.into()],
            faults,
            ..EmulatorConfig::default()
        })
        .await
        .expect("Graph emulator");
        let receiver = WebhookReceiver::start(Some(SECRET))
            .await
            .expect("receiver");
        let directory = StaticDirectory::default();
        let uid = Uuid::new_v4();
        let world = Self {
            db,
            emulator,
            receiver,
            directory,
            uid,
        };
        world.directory.insert(world.config(false, None));
        world
    }

    fn config(&self, mark_as_read: bool, move_to_folder: Option<&str>) -> MailboxConfig {
        MailboxConfig {
            ledger_id: self.uid,
            source: Source {
                uid: self.uid,
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
            webhook: Some(Endpoint {
                timeout: Duration::from_secs(5),
                ..self.receiver.endpoint(Some(SECRET)).expect("endpoint")
            }),
            include_body: true,
            mark_as_read,
            move_to_folder: move_to_folder.map(str::to_owned),
            max_attempts: 50,
            start: Default::default(),
            filter: None,
            max_concurrent_deliveries: None,
        }
    }

    /// The default configuration, with or without bodies.
    fn config_with_body(&self, include_body: bool) -> MailboxConfig {
        MailboxConfig {
            include_body,
            ..self.config(false, None)
        }
    }

    fn graph(&self) -> GraphClient {
        self.graph_with(GovernorConfig {
            backoff_base: Duration::from_millis(20),
            backoff_cap: Duration::from_millis(200),
            max_retries: 30,
            ..GovernorConfig::default()
        })
    }

    /// A Graph client of its own (a replica's), holding the mailbox's shared slots in the
    /// test database as the operator's does.
    fn graph_with(&self, governor: GovernorConfig) -> GraphClient {
        let base = self.emulator.base_url();
        let governor = Governor::new(governor);
        governor.share_slots(Arc::new(MailboxSlots::new(self.db.pool.clone())));
        GraphClient::new(
            GraphConfig::with_urls(&base, &base).expect("Graph config"),
            governor,
        )
        .expect("Graph client")
    }

    /// Another MailboxPoll in the same directory, reading `folder` of the world's mailbox.
    fn add_folder_poll(&self, folder: &str) -> Uuid {
        let uid = Uuid::new_v4();
        let mut config = self.config(false, None);
        config.ledger_id = uid;
        config.source.uid = uid;
        config.source.name = folder.into();
        config.source.folder = folder.into();
        self.directory.insert(config);
        uid
    }

    /// A replica that only polls, one task at a time, on a Graph client of its own whose
    /// Retry-Afters are shared with every replica as the operator shares them.
    fn polling_replica(&self, name: &str, page_size: u32, stop: &CancellationToken) -> RunningPool {
        let graph = self.graph();
        let metrics = Arc::new(Metrics::new());
        run_lease::share_retry_afters(&self.db.pool, &graph, &metrics, true, stop.clone());
        let shape = Shape {
            page_size,
            poll_pool: self.db.pool.clone(),
            deliver: false,
            run_lease: Duration::from_secs(10),
            concurrency: 1,
        };
        self.worker_pool_on(name, shape, graph)
    }

    /// Another MailboxPoll in the same directory, reading `mailbox` (added to the emulator).
    fn add_mailbox_poll(&self, mailbox: &str) -> Uuid {
        self.emulator.add_mailbox(mailbox);
        let uid = Uuid::new_v4();
        let mut config = self.config(false, None);
        config.ledger_id = uid;
        config.source.uid = uid;
        config.source.name = mailbox.split('@').next().unwrap_or(mailbox).into();
        config.source.mailbox = mailbox.into();
        self.directory.insert(config);
        uid
    }

    fn workers(&self, name: &str, page_size: u32) -> RunningPool {
        self.workers_polling_on(name, page_size, self.db.pool.clone())
    }

    /// Workers whose poll handler records pages through `poll_pool`.
    fn workers_polling_on(&self, name: &str, page_size: u32, poll_pool: PgPool) -> RunningPool {
        self.worker_pool(name, page_size, poll_pool, true, Duration::from_secs(10))
    }

    /// Workers that only poll: deliver tasks stay pending until a full pool runs.
    fn poll_workers(&self, name: &str, page_size: u32) -> RunningPool {
        self.worker_pool(
            name,
            page_size,
            self.db.pool.clone(),
            false,
            Duration::from_secs(10),
        )
    }

    /// Workers whose poll and actions runs hold the mailbox for `run_lease` at a time.
    fn workers_with(
        &self,
        name: &str,
        page_size: u32,
        poll_pool: PgPool,
        run_lease: Duration,
    ) -> RunningPool {
        self.worker_pool(name, page_size, poll_pool, true, run_lease)
    }

    /// Workers whose Graph client is `graph` (e.g. with another governor).
    fn workers_on_graph(&self, name: &str, page_size: u32, graph: GraphClient) -> RunningPool {
        let shape = Shape::new(
            page_size,
            self.db.pool.clone(),
            true,
            Duration::from_secs(10),
        );
        self.worker_pool_on(name, shape, graph)
    }

    fn worker_pool(
        &self,
        name: &str,
        page_size: u32,
        poll_pool: PgPool,
        deliver: bool,
        run_lease: Duration,
    ) -> RunningPool {
        let shape = Shape::new(page_size, poll_pool, deliver, run_lease);
        self.worker_pool_on(name, shape, self.graph())
    }

    fn worker_pool_on(&self, name: &str, shape: Shape, graph: GraphClient) -> RunningPool {
        let Shape {
            page_size,
            poll_pool,
            deliver,
            run_lease,
            concurrency,
        } = shape;
        let metrics = Arc::new(Metrics::new());
        let directory = Arc::new(self.directory.clone());
        let pool = WorkerPool::new(
            self.db.pool.clone(),
            WorkerPoolConfig {
                worker_id: WorkerId::named(name),
                concurrency,
                // Concurrency 1 is a replica that holds one task: it claims nothing ahead.
                prefetch: if concurrency == 1 { 0 } else { 32 },
                lease: Duration::from_secs(10),
                heartbeat_interval: Duration::from_secs(2),
                poll_interval: Duration::from_millis(100),
                retry: RetryPolicy {
                    base: Duration::from_millis(20),
                    cap: Duration::from_millis(200),
                },
                ..WorkerPoolConfig::default()
            },
        )
        .register(
            POLL,
            PollHandler {
                pool: poll_pool,
                directory: directory.clone(),
                graph: graph.clone(),
                metrics: metrics.clone(),
                settings: PollSettings {
                    page_size,
                    run_lease,
                    ..PollSettings::default()
                },
            },
        );
        if !deliver {
            return pool.start().expect("worker pool");
        }
        pool.register(
            DELIVER,
            DeliverHandler::new(
                self.db.pool.clone(),
                directory.clone(),
                mailpoll_testkit::webhook_receiver::loopback_webhook_client(),
                metrics.clone(),
            ),
        )
        .register(
            ACTIONS,
            ActionsHandler {
                pool: self.db.pool.clone(),
                directory,
                graph,
                metrics,
                run_budget: Duration::from_secs(5),
            },
        )
        .start()
        .expect("worker pool")
    }

    /// Enqueues a poll and waits until it has finished (succeeded or kept dead).
    async fn poll(&self) {
        self.poll_with_attempts(queue::DEFAULT_MAX_ATTEMPTS).await;
    }

    async fn poll_with_attempts(&self, max_attempts: i32) {
        let task = self.enqueue_poll(self.uid, max_attempts).await;
        self.finished(task).await;
    }

    /// Enqueues a poll of the MailboxPoll `uid`; returns the task's id.
    async fn enqueue_poll(&self, uid: Uuid, max_attempts: i32) -> i64 {
        let task = NewTask::new(
            POLL,
            serde_json::to_value(PollTask { mailbox_uid: uid }).expect("payload"),
        )
        .owner(uid)
        .dedupe_key(poll_dedupe_key(uid))
        .max_attempts(max_attempts);
        queue::enqueue(&self.db.pool, &task)
            .await
            .expect("enqueue poll")
            .id
    }

    /// Waits until a worker runs the task.
    async fn running(&self, task: i64) {
        wait_until("the task to run", Duration::from_secs(30), || async {
            sqlx::query_scalar::<_, String>("SELECT state FROM tasks WHERE id = $1")
                .bind(task)
                .fetch_one(&self.db.pool)
                .await
                .is_ok_and(|state| state == "running")
        })
        .await;
    }

    /// Waits until the task has finished (succeeded or kept dead); returns its state and
    /// attempts (failed runs).
    async fn finished(&self, task: i64) -> (String, i32) {
        let state = || async {
            sqlx::query_as::<_, (String, i32)>("SELECT state, attempts FROM tasks WHERE id = $1")
                .bind(task)
                .fetch_one(&self.db.pool)
                .await
                .expect("task")
        };
        wait_until("the task to finish", Duration::from_secs(120), || async {
            let (state, _) = state().await;
            state == "succeeded" || state == "dead"
        })
        .await;
        state().await
    }

    async fn count(&self, sql: &'static str) -> i64 {
        count(&self.db.pool, self.uid, sql).await
    }

    async fn settle(&self, expected: i64) {
        let what = format!("{expected} messages delivered");
        wait_for_ok(what, Duration::from_secs(120), || async {
            let delivered = self
                .count("SELECT count(*) FROM messages WHERE mailbox_uid = $1 AND delivery_state = 'delivered'")
                .await;
            if delivered == expected {
                return Ok(());
            }
            // What is in the way, for the failure message.
            let tasks: Vec<(String, String, i32, Option<String>)> = sqlx::query_as(
                "SELECT kind, state, attempts, last_error FROM tasks ORDER BY id",
            )
            .fetch_all(&self.db.pool)
            .await
            .unwrap_or_default();
            Err(format!("{delivered} delivered; tasks (kind, state, attempts, last error): {tasks:?}"))
        })
        .await;
    }

    /// Waits until no message waits for delivery (whatever was recorded is delivered).
    async fn drain(&self) {
        wait_until("no delivery pending", Duration::from_secs(120), || async {
            self.count(
                "SELECT count(*) FROM tasks WHERE owner_uid = $1 AND state IN ('pending', 'running')",
            )
            .await
                == 0
        })
        .await;
    }

    /// Asserts that the ledger holds exactly `ids`, each delivered once, with one deliver task.
    async fn assert_each_delivered_once(&self, ids: &[String]) {
        let recorded: Vec<String> = sqlx::query_scalar(
            "SELECT message_id FROM messages WHERE mailbox_uid = $1 AND delivery_state <> 'skipped'",
        )
        .bind(self.uid)
        .fetch_all(&self.db.pool)
        .await
        .expect("ledger");
        let recorded: HashSet<String> = recorded.into_iter().collect();
        let expected: HashSet<String> = ids.iter().cloned().collect();
        let missing = expected.difference(&recorded).count();
        assert_eq!(
            missing,
            0,
            "{missing} of {} messages never recorded",
            ids.len()
        );
        assert_eq!(recorded, expected, "the ledger holds exactly the messages");
        let successes = self.receiver.successes();
        for id in ids {
            assert_eq!(
                successes.get(&message_key(self.uid, id)),
                Some(&1),
                "{id} delivered once"
            );
        }
        assert_eq!(successes.len(), ids.len(), "nothing else delivered");
        let tasks = self
            .count("SELECT count(*) FROM tasks WHERE owner_uid = $1 AND kind = 'deliver'")
            .await;
        assert_eq!(tasks, ids.len() as i64, "one deliver task per message");
    }

    async fn resyncs(&self) -> i64 {
        self.count("SELECT resyncs FROM mailbox_cursors WHERE mailbox_uid = $1")
            .await
    }
}

fn immutable_ids(added: Vec<mailpoll_testkit::graph::MessageIds>) -> Vec<String> {
    added.into_iter().map(|m| m.immutable_id).collect()
}

async fn count(pool: &PgPool, uid: Uuid, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(uid)
        .fetch_one(pool)
        .await
        .expect("count")
}

#[tokio::test]
async fn every_message_is_recorded_and_delivered_once_through_replays_and_a_resync() {
    let total: usize = if big() { 10_000 } else { 1_500 };
    let world = World::start(Faults {
        replay_ratio: 0.1,
        ..Faults::default()
    })
    .await;
    world.receiver.set_failure_rate(0.05);
    let mut ids: Vec<String> = world
        .emulator
        .add_messages(MAILBOX, "inbox", total / 2)
        .expect("seed mail")
        .into_iter()
        .map(|m| m.immutable_id)
        .collect();
    let pool = world.workers("poller", 100);

    world.poll().await;
    // Mail keeps arriving while polls run.
    let arrivals = {
        let remaining = total - total / 2;
        let batch = remaining / 10;
        let mut added = Vec::new();
        for round in 0..10 {
            let n = if round == 9 {
                remaining - batch * 9
            } else {
                batch
            };
            added.extend(
                world
                    .emulator
                    .add_messages(MAILBOX, "inbox", n)
                    .expect("more mail"),
            );
            if round == 4 {
                // The delta token is evicted mid-way: the next poll resyncs.
                world
                    .emulator
                    .evict_delta_tokens(MAILBOX)
                    .expect("evict tokens");
            }
            world.poll().await;
        }
        added
    };
    ids.extend(arrivals.into_iter().map(|m| m.immutable_id));
    world.poll().await;
    world.settle(total as i64).await;
    pool.shutdown().await;

    let recorded: Vec<String> =
        sqlx::query_scalar("SELECT message_id FROM messages WHERE mailbox_uid = $1")
            .bind(world.uid)
            .fetch_all(&world.db.pool)
            .await
            .expect("ledger");
    assert_eq!(recorded.len(), total, "each message recorded once");
    let recorded: HashSet<String> = recorded.into_iter().collect();
    let expected: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(
        recorded, expected,
        "the ledger holds exactly the mailbox's messages"
    );

    let successes = world.receiver.successes();
    assert_eq!(successes.len(), total);
    for id in &ids {
        assert_eq!(
            successes.get(&message_key(world.uid, id)),
            Some(&1),
            "{id} delivered once"
        );
    }
    assert!(
        world.receiver.failed_attempts() > 0,
        "failed attempts happened and are counted apart"
    );
    let resyncs: i64 =
        sqlx::query_scalar("SELECT resyncs FROM mailbox_cursors WHERE mailbox_uid = $1")
            .bind(world.uid)
            .fetch_one(&world.db.pool)
            .await
            .expect("cursor");
    assert!(resyncs >= 1, "the eviction forced a resync");
    // Repeats that land on the next page (recorded while the first one is still committing)
    // are left to the first: each message counts as new exactly once.
    let counted_new = world
        .count("SELECT COALESCE(sum(messages_new), 0)::bigint FROM polls WHERE mailbox_uid = $1")
        .await;
    assert_eq!(counted_new, total as i64, "each message counted new once");
    let open = world
        .count("SELECT count(*) FROM tasks WHERE owner_uid = $1 AND state IN ('pending', 'running', 'dead')")
        .await;
    assert_eq!(open, 0, "nothing left pending, running or dead");
}

/// Crashes are injected with triggers: a poll's k-th page transaction fails once (the state
/// is that of a crash right after page k-1 committed), and some deliveries fail after the
/// webhook answered but before the ledger recorded it.
#[tokio::test]
async fn crashes_at_every_page_and_after_webhook_calls_change_nothing_but_repeat_calls() {
    let total: usize = if big() { 2_000 } else { 200 };
    let page_size = 20u32;
    let world = World::start(Faults::default()).await;
    let ids: Vec<String> = world
        .emulator
        .add_messages(MAILBOX, "inbox", total)
        .expect("seed mail")
        .into_iter()
        .map(|m| m.immutable_id)
        .collect();
    let pages = total.div_ceil(page_size as usize);
    sqlx::raw_sql(
        r#"
        -- A planned page k has a sequence crash_page_k; sequences ignore rollbacks, so the
        -- k-th page of a poll crashes exactly once.
        CREATE FUNCTION crash_on_page() RETURNS trigger AS $$
        BEGIN
            IF to_regclass(format('crash_page_%s', NEW.pages)) IS NOT NULL
               AND nextval(format('crash_page_%s', NEW.pages)::regclass) = 1 THEN
                RAISE EXCEPTION 'injected crash before committing page %', NEW.pages;
            END IF;
            RETURN NEW;
        END $$ LANGUAGE plpgsql;
        CREATE TRIGGER crash_on_page BEFORE UPDATE OF pages ON polls
            FOR EACH ROW WHEN (NEW.pages IS DISTINCT FROM OLD.pages) EXECUTE FUNCTION crash_on_page();

        CREATE SEQUENCE delivery_crashes;
        CREATE FUNCTION crash_after_webhook() RETURNS trigger AS $$
        BEGIN
            IF nextval('delivery_crashes') % 5 = 0 THEN
                RAISE EXCEPTION 'injected crash after the webhook answered';
            END IF;
            RETURN NEW;
        END $$ LANGUAGE plpgsql;
        CREATE TRIGGER crash_after_webhook BEFORE UPDATE OF webhook_delivered_at ON messages
            FOR EACH ROW WHEN (OLD.webhook_delivered_at IS NULL AND NEW.webhook_delivered_at IS NOT NULL)
            EXECUTE FUNCTION crash_after_webhook();
        "#,
    )
    .execute(&world.db.pool)
    .await
    .expect("crash triggers");
    let plan: Vec<usize> = (1..=pages).step_by(if big() { 1 } else { 3 }).collect();
    for page in &plan {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE SEQUENCE crash_page_{page}"
        )))
        .execute(&world.db.pool)
        .await
        .expect("crash plan");
    }

    let pool = world.workers("crashy", page_size);
    // Each injected page crash fails the poll; its retry resumes from the last committed page.
    world.poll_with_attempts(100).await;
    world.settle(total as i64).await;
    pool.shutdown().await;

    let recorded = world
        .count("SELECT count(*) FROM messages WHERE mailbox_uid = $1")
        .await;
    assert_eq!(
        recorded, total as i64,
        "the same ledger as a crash-free run"
    );
    let page_crashes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_sequences WHERE sequencename LIKE 'crash_page_%' AND last_value >= 1",
    )
    .fetch_one(&world.db.pool)
    .await
    .expect("page crashes");
    // A resumed poll numbers its pages from 1 again, so not every planned page is reached.
    assert!(
        page_crashes >= 2,
        "page crashes were injected ({page_crashes})"
    );
    let failed_polls = world
        .count("SELECT count(*) FROM polls WHERE mailbox_uid = $1 AND outcome = 'failed'")
        .await;
    assert_eq!(
        failed_polls, page_crashes,
        "each crash failed one poll attempt"
    );
    // The receiver never fails here, so every failed deliver attempt is one whose webhook call
    // succeeded and whose mark was refused by the injected crash (`attempts` counts failed
    // attempts only).
    let delivery_crashes: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(attempts), 0)::bigint FROM tasks WHERE owner_uid = $1 AND kind = 'deliver'",
    )
    .bind(world.uid)
    .fetch_one(&world.db.pool)
    .await
    .expect("failed deliver attempts");
    assert!(delivery_crashes >= 1, "delivery crashes were injected");

    let successes = world.receiver.successes();
    let mut repeats = 0;
    for id in &ids {
        let n = successes
            .get(&message_key(world.uid, id))
            .copied()
            .unwrap_or(0);
        assert!(n >= 1, "{id} was delivered");
        repeats += n - 1;
    }
    assert_eq!(successes.len(), total);
    assert_eq!(
        i64::from(repeats),
        delivery_crashes,
        "the only repeats are webhook calls whose success was not recorded"
    );
}

#[tokio::test]
async fn after_actions_touch_exactly_the_delivered_messages() {
    let world = World::start(Faults::default()).await;
    world.directory.insert(world.config(true, Some("archive")));
    let ids: Vec<String> = world
        .emulator
        .add_messages(MAILBOX, "inbox", 60)
        .expect("seed mail")
        .into_iter()
        .map(|m| m.immutable_id)
        .collect();
    let refused: HashSet<&String> = ids.iter().step_by(6).collect();
    for id in &refused {
        world.receiver.reject(&message_key(world.uid, id));
    }
    let pool = world.workers("actions", 25);
    world.poll().await;
    world.settle((ids.len() - refused.len()) as i64).await;
    pool.shutdown().await;

    let archive = world
        .emulator
        .folder_id(MAILBOX, "archive")
        .expect("archive folder");
    let inbox = world
        .emulator
        .folder_id(MAILBOX, "inbox")
        .expect("inbox folder");
    for id in &ids {
        let message = world
            .emulator
            .message(MAILBOX, id)
            .expect("emulator lookup")
            .unwrap_or_else(|| panic!("{id} still exists"));
        if refused.contains(id) {
            assert_eq!(message["isRead"], false, "{id} was refused: left unread");
            assert_eq!(
                message["parentFolderId"],
                inbox.as_str(),
                "{id} was refused: left in the inbox"
            );
        } else {
            assert_eq!(message["isRead"], true, "{id} delivered: marked read");
            assert_eq!(
                message["parentFolderId"],
                archive.as_str(),
                "{id} delivered: moved to archive"
            );
        }
    }
    let failed = world
        .count("SELECT count(*) FROM messages WHERE mailbox_uid = $1 AND delivery_state = 'failed'")
        .await;
    assert_eq!(failed as usize, refused.len());

    // Without faults a poll makes one Graph request per page.
    let polls: Vec<(i32, i32)> = sqlx::query_as(
        "SELECT pages, graph_requests FROM polls WHERE mailbox_uid = $1 AND outcome = 'succeeded'",
    )
    .bind(world.uid)
    .fetch_all(&world.db.pool)
    .await
    .expect("polls");
    assert!(!polls.is_empty());
    for (pages, requests) in polls {
        assert_eq!(requests, pages, "one Graph request per page");
    }
}

/// Pages in flight take turns on the connections there are: a poll whose pool has a single
/// connection still records every page, in order.
#[tokio::test]
async fn a_poll_completes_on_a_single_connection() {
    let total = 300;
    let page_size = 20u32;
    let world = World::start(Faults::default()).await;
    world
        .emulator
        .add_messages(MAILBOX, "inbox", total)
        .expect("seed mail");
    let narrow = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(60))
        .connect(&world.db.url)
        .await
        .expect("one-connection pool");
    let pool = world.workers_polling_on("narrow", page_size, narrow);
    world.poll().await;
    world.settle(total as i64).await;
    pool.shutdown().await;

    let (polls, pages, seen, new): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), sum(pages)::bigint, sum(messages_seen)::bigint, sum(messages_new)::bigint
         FROM polls WHERE mailbox_uid = $1 AND outcome = 'succeeded'",
    )
    .bind(world.uid)
    .fetch_one(&world.db.pool)
    .await
    .expect("poll results");
    assert_eq!(polls, 1, "one poll, which succeeded at its first attempt");
    assert_eq!(pages, i64::from(total as u32 / page_size));
    assert_eq!((seen, new), (total as i64, total as i64));
    let cursor: (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT delta_link, round_next_link FROM mailbox_cursors WHERE mailbox_uid = $1",
    )
    .bind(world.uid)
    .fetch_one(&world.db.pool)
    .await
    .expect("cursor");
    assert!(
        cursor.0.is_some() && cursor.1.is_none(),
        "the round finished: {cursor:?}"
    );
}

/// A burst larger than Graph's cap on filtered delta rounds, then an evicted delta token: the
/// resync reads the folder as a first poll does (no filter, so no cap), and the ledger absorbs
/// what it had already recorded.
#[tokio::test]
async fn a_resync_after_a_burst_past_the_filtered_delta_cap_loses_nothing() {
    let world = World::start(Faults {
        filtered_delta_cap: 50,
        ..Faults::default()
    })
    .await;
    let mut ids = immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 10)
            .expect("seed mail"),
    );
    let pool = world.workers("burst", 25);
    world.poll().await;
    ids.extend(immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 120)
            .expect("burst"),
    ));
    world
        .emulator
        .evict_delta_tokens(MAILBOX)
        .expect("evict tokens");
    world.poll().await;
    // And once more from the resync's own delta token.
    world.poll().await;
    world.drain().await;
    pool.shutdown().await;
    world.assert_each_delivered_once(&ids).await;
    assert!(world.resyncs().await >= 1, "the eviction forced a resync");
}

/// After a resync, a message moved into the folder with an old receivedDateTime still shows:
/// the resync's delta token carries no received-time filter.
#[tokio::test]
async fn a_message_moved_in_with_an_old_received_time_after_a_resync_is_delivered() {
    let world = World::start(Faults::default()).await;
    let mut ids = immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 10)
            .expect("seed mail"),
    );
    let old = world
        .emulator
        .add_message(
            MAILBOX,
            "archive",
            NewMessage {
                received: chrono::DateTime::from_timestamp(1_600_000_000, 0),
                ..NewMessage::default()
            },
        )
        .expect("old mail")
        .immutable_id;
    let pool = world.workers("old-mail", 25);
    world.poll().await;
    world
        .emulator
        .evict_delta_tokens(MAILBOX)
        .expect("evict tokens");
    ids.extend(immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 3)
            .expect("more mail"),
    ));
    world.poll().await;
    world
        .emulator
        .move_message(MAILBOX, &old, "inbox")
        .expect("move old mail in");
    ids.push(old);
    world.poll().await;
    world.drain().await;
    pool.shutdown().await;
    world.assert_each_delivered_once(&ids).await;
}

/// Messages that leave the folder and come back (immutable ids survive moves): one never
/// recorded (only its removal was seen) is recorded and delivered when it returns; one already
/// recorded, pending or delivered, is not delivered again.
#[tokio::test]
async fn messages_moved_out_and_back_are_recorded_and_delivered_once() {
    let world = World::start(Faults::default()).await;
    let mut ids = immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 5)
            .expect("seed mail"),
    );
    let pollers = world.poll_workers("pollers", 25);
    world.poll().await;

    // Recorded, not yet delivered: out, then back.
    let pending = ids[0].clone();
    world
        .emulator
        .move_message(MAILBOX, &pending, "junkemail")
        .expect("move out");
    world.poll().await;
    world
        .emulator
        .move_message(MAILBOX, &pending, "inbox")
        .expect("move back");
    world.poll().await;

    // Arrives and leaves between two polls: only its removal is seen (a tombstone).
    let ghost = world
        .emulator
        .add_messages(MAILBOX, "inbox", 1)
        .expect("ghost")
        .remove(0)
        .immutable_id;
    world
        .emulator
        .move_message(MAILBOX, &ghost, "junkemail")
        .expect("move ghost out");
    world.poll().await;
    let state: String = sqlx::query_scalar(
        "SELECT delivery_state FROM messages WHERE mailbox_uid = $1 AND message_id = $2",
    )
    .bind(world.uid)
    .bind(&ghost)
    .fetch_one(&world.db.pool)
    .await
    .expect("tombstone");
    assert_eq!(state, "skipped", "only the removal was seen");
    world
        .emulator
        .move_message(MAILBOX, &ghost, "inbox")
        .expect("move ghost back");
    world.poll().await;
    ids.push(ghost.clone());
    pollers.shutdown().await;

    let pool = world.workers("everything", 25);
    world.drain().await;
    // Delivered: out, then back.
    let delivered = ids[1].clone();
    world
        .emulator
        .move_message(MAILBOX, &delivered, "junkemail")
        .expect("move out");
    world.poll().await;
    world
        .emulator
        .move_message(MAILBOX, &delivered, "inbox")
        .expect("move back");
    world.poll().await;
    world.drain().await;
    pool.shutdown().await;

    world.assert_each_delivered_once(&ids).await;
    let removed = world
        .count("SELECT count(*) FROM messages WHERE mailbox_uid = $1 AND removed_at IS NOT NULL")
        .await;
    assert_eq!(
        removed, 0,
        "messages back in the folder are no longer marked removed"
    );
    let ghost_subject: Option<String> = sqlx::query_scalar(
        "SELECT subject FROM messages WHERE mailbox_uid = $1 AND message_id = $2",
    )
    .bind(world.uid)
    .bind(&ghost)
    .fetch_one(&world.db.pool)
    .await
    .expect("revived row");
    assert!(
        ghost_subject.is_some(),
        "the tombstone got the message's content"
    );
    let counted_new = world
        .count("SELECT COALESCE(sum(messages_new), 0)::bigint FROM polls WHERE mailbox_uid = $1")
        .await;
    assert_eq!(
        counted_new,
        ids.len() as i64,
        "each message counted new once"
    );
}

/// `$select` is frozen in a delta token: switching bodies on starts a new round with the new
/// selection, so the messages that follow carry their bodies, and nothing is delivered twice.
#[tokio::test]
async fn switching_bodies_on_rereads_with_bodies_and_delivers_nothing_twice() {
    let world = World::start(Faults::default()).await;
    world.directory.insert(world.config_with_body(false));
    let mut ids = immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 20)
            .expect("seed mail"),
    );
    let pool = world.workers("bodies", 25);
    world.poll().await;
    world.drain().await;
    let bodies = world
        .count("SELECT count(*) FROM messages WHERE mailbox_uid = $1 AND body IS NOT NULL")
        .await;
    assert_eq!(bodies, 0, "bodies are off");

    world.directory.insert(world.config_with_body(true));
    let later = immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 15)
            .expect("more mail"),
    );
    world.poll().await;
    world.poll().await;
    world.drain().await;
    pool.shutdown().await;
    let with_body: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages WHERE mailbox_uid = $1 AND message_id = ANY($2) AND body IS NOT NULL",
    )
    .bind(world.uid)
    .bind(&later)
    .fetch_one(&world.db.pool)
    .await
    .expect("bodies");
    assert_eq!(
        with_body,
        later.len() as i64,
        "new messages carry their bodies"
    );
    ids.extend(later);
    world.assert_each_delivered_once(&ids).await;
    let resynced = world
        .count("SELECT count(*) FROM polls WHERE mailbox_uid = $1 AND resynced")
        .await;
    assert_eq!(resynced, 1, "the changed selection started one resync");
}

async fn parked(world: &World) -> i64 {
    world
        .count("SELECT count(*) FROM messages WHERE mailbox_uid = $1 AND actions_parked_at IS NOT NULL")
        .await
}

/// NUL and other control characters in a subject, a body and a sender's name (also nested in
/// the raw Graph object) are replaced before Postgres sees them: the message is recorded and
/// delivered, and the payload shows the replacement.
#[tokio::test]
async fn control_characters_in_mail_are_recorded_and_delivered_replaced() {
    let world = World::start(Faults::default()).await;
    let weird = world
        .emulator
        .add_message_with_text(MAILBOX, "inbox", "\u{0}\u{1}\u{1b}[31m\u{7f}")
        .expect("weird mail")
        .immutable_id;
    world
        .emulator
        .add_messages(MAILBOX, "inbox", 3)
        .expect("plain mail");
    let pool = world.workers("text", 10);
    world.poll().await;
    world.settle(4).await;
    pool.shutdown().await;

    let replaced = "\u{fffd}\u{fffd}\u{fffd}[31m\u{fffd}";
    let (subject, from_name, body, raw): (String, String, String, serde_json::Value) =
        sqlx::query_as(
            "SELECT subject, from_name, body, raw FROM messages
             WHERE mailbox_uid = $1 AND message_id = $2",
        )
        .bind(world.uid)
        .bind(&weird)
        .fetch_one(&world.db.pool)
        .await
        .expect("recorded");
    assert_eq!(subject, format!("Subject {replaced}"));
    assert_eq!(from_name, format!("Sender {replaced}"));
    assert!(body.contains(&format!("Body {replaced}")), "{body:?}");
    assert_eq!(
        raw["from"]["emailAddress"]["name"],
        format!("Sender {replaced}").as_str()
    );
    let payload = world
        .receiver
        .payloads()
        .remove(&message_key(world.uid, &weird))
        .expect("delivered");
    assert_eq!(
        payload["message"]["subject"],
        format!("Subject {replaced}").as_str()
    );
    assert_eq!(
        payload["message"]["from"]["name"],
        format!("Sender {replaced}").as_str()
    );
}

/// Error texts of the token endpoint and of Graph that carry NUL and control characters
/// become storable poll errors (`polls.error_message`) instead of failing the poll's record.
#[tokio::test]
async fn token_and_graph_errors_with_control_characters_are_storable_poll_errors() {
    let world = World::start(Faults {
        control_chars_in_errors: true,
        ..Faults::default()
    })
    .await;
    world
        .emulator
        .add_messages(MAILBOX, "inbox", 2)
        .expect("mail");
    let mut wrong = world.config(false, None);
    wrong.credentials.proof = Proof::Secret(ClientSecret::new("not-the-secret"));
    world.directory.insert(wrong);
    let pool = world.workers("errors", 10);
    world.poll().await;
    world.directory.insert(world.config(false, None));
    world
        .emulator
        .set_mailbox_state(MAILBOX, mailpoll_testkit::graph::MailboxState::AccessDenied)
        .expect("deny access");
    world.poll().await;
    pool.shutdown().await;

    let polls: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT outcome, error_reason, error_message FROM polls WHERE mailbox_uid = $1 ORDER BY id",
    )
    .bind(world.uid)
    .fetch_all(&world.db.pool)
    .await
    .expect("polls");
    let reasons: Vec<Option<&str>> = polls.iter().map(|p| p.1.as_deref()).collect();
    assert_eq!(
        reasons,
        [Some("AuthenticationFailed"), Some("AccessDenied")],
        "{polls:?}"
    );
    for (outcome, reason, message) in &polls {
        assert_eq!(outcome, "failed");
        let message = message.as_deref().expect("a message");
        assert!(!message.contains('\u{0}') && !message.contains('\u{1b}'));
        // The token endpoint's characters follow its description's first line, which is all
        // that is kept; Graph's end its message.
        if reason.as_deref() == Some("AccessDenied") {
            assert!(message.contains('\u{fffd}'), "{message:?}");
        }
    }
}

/// The mailbox run lease is kept alive while a round runs, however long a page takes: another
/// run cannot take the mailbox mid-round.
#[tokio::test]
async fn a_round_slower_than_the_run_lease_keeps_the_mailbox() {
    let world = World::start(Faults {
        slow_page_ms: 3_000,
        ..Faults::default()
    })
    .await;
    world
        .emulator
        .add_messages(MAILBOX, "inbox", 5)
        .expect("mail");
    let run_lease = Duration::from_millis(900);
    let pool = world.workers_with("slow", 10, world.db.pool.clone(), run_lease);
    let source = world.config(false, None).source;
    let second_run = async {
        let first_term: DateTime<Utc> =
            wait_for("the round to start", Duration::from_secs(30), || async {
                sqlx::query_scalar(
                    "SELECT run_lease_until FROM mailbox_cursors
                      WHERE mailbox_uid = $1 AND run_token IS NOT NULL",
                )
                .bind(world.uid)
                .fetch_optional(&world.db.pool)
                .await
                .expect("cursor")
            })
            .await;
        // Not kept alive, the lease would be free from the end of its first term; a whole
        // term later leaves no doubt, while the round still waits for its page. Postgres'
        // clock decides, as it does for `acquire`.
        wait_until(
            "a lease term past the first one",
            Duration::from_secs(30),
            || async {
                sqlx::query_scalar::<_, bool>("SELECT now() > $1 + $2 * interval '1 second'")
                    .bind(first_term)
                    .bind(run_lease.as_secs_f64())
                    .fetch_one(&world.db.pool)
                    .await
                    .expect("clock")
            },
        )
        .await;
        mailpoll::cursor::acquire(&world.db.pool, &source, run_lease)
            .await
            .expect("acquire")
    };
    let ((), second) = tokio::join!(world.poll(), second_run);
    assert!(
        matches!(second, mailpoll::cursor::Acquired::Busy { .. }),
        "another run took the mailbox mid-round: {second:?}"
    );
    world.settle(5).await;
    pool.shutdown().await;
}

/// A message whose after-action always fails is parked after a few failures with its reason;
/// the other messages' actions go on, and nothing brings the parked one back on its own.
#[tokio::test]
async fn an_after_action_that_always_fails_is_parked_and_the_others_go_on() {
    let world = World::start(Faults::default()).await;
    world.directory.insert(world.config(true, Some("archive")));
    let ids: Vec<String> = world
        .emulator
        .add_messages(MAILBOX, "inbox", 6)
        .expect("mail")
        .into_iter()
        .map(|m| m.immutable_id)
        .collect();
    let stuck = ids[0].clone();
    world
        .emulator
        .update_faults(|faults| faults.refused_action_ids = vec![stuck.clone()]);
    let pool = world.workers("park", 25);
    world.poll().await;
    world.settle(5).await;
    wait_until(
        "the failing message parked",
        Duration::from_secs(60),
        || async { parked(&world).await == 1 },
    )
    .await;
    wait_until("no actions run left", Duration::from_secs(30), || async {
        world
            .count("SELECT count(*) FROM tasks WHERE owner_uid = $1 AND kind = 'actions' AND state IN ('pending', 'running')")
            .await
            == 0
    })
    .await;
    assert_eq!(
        mailpoll::pipeline::actions::requeue_stranded(&world.db.pool)
            .await
            .expect("sweep"),
        0,
        "the sweep leaves parked messages alone"
    );
    pool.shutdown().await;

    let (state, failures, error): (String, i32, String) = sqlx::query_as(
        "SELECT delivery_state, actions_failures, actions_error FROM messages
         WHERE mailbox_uid = $1 AND message_id = $2",
    )
    .bind(world.uid)
    .bind(&stuck)
    .fetch_one(&world.db.pool)
    .await
    .expect("stuck message");
    assert_eq!(state, "failed");
    assert_eq!(failures, mailpoll::pipeline::actions::MAX_ACTION_FAILURES);
    assert!(error.contains("ErrorInvalidRequest"), "{error}");
    let mut conn = world.db.pool.acquire().await.expect("connection");
    let counts = mailpoll::ledger::counts(&mut conn, world.uid)
        .await
        .expect("counts");
    assert_eq!((counts.actions_parked, counts.delivered), (1, 5));
}

/// Graph answers a move to a folder that does not exist with 404 `ErrorItemNotFound`, as it
/// does for a message that is gone. The message is still there, so this is a configuration
/// error: the messages are parked with a clear reason (not counted as moved), and the status
/// reports it.
#[tokio::test]
async fn a_move_to_a_missing_folder_is_a_configuration_error() {
    let world = World::start(Faults::default()).await;
    world
        .directory
        .insert(world.config(false, Some("no-such-folder")));
    let ids: Vec<String> = world
        .emulator
        .add_messages(MAILBOX, "inbox", 3)
        .expect("mail")
        .into_iter()
        .map(|m| m.immutable_id)
        .collect();
    let pool = world.workers("missing", 25);
    world.poll().await;
    wait_until("the messages parked", Duration::from_secs(60), || async {
        parked(&world).await == 3
    })
    .await;
    pool.shutdown().await;

    let errors: Vec<String> = sqlx::query_scalar(
        "SELECT actions_error FROM messages WHERE mailbox_uid = $1 AND actions_parked_at IS NOT NULL",
    )
    .bind(world.uid)
    .fetch_all(&world.db.pool)
    .await
    .expect("errors");
    for error in &errors {
        assert!(error.starts_with("MoveDestinationNotFound"), "{error}");
        assert!(error.contains("no-such-folder"), "{error}");
    }
    let inbox = world.emulator.folder_id(MAILBOX, "inbox").expect("inbox");
    for id in &ids {
        let message = world
            .emulator
            .message(MAILBOX, id)
            .expect("lookup")
            .expect("still there");
        assert_eq!(message["parentFolderId"], inbox.as_str());
    }
    let facts = mailpoll::controller::status::load(&world.db.pool, world.uid, world.uid)
        .await
        .expect("facts");
    let [_, degraded, stalled] = mailpoll::controller::status::desired_conditions(None, &facts);
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "MoveDestinationNotFound")
    );
    assert!(degraded.message.contains("no-such-folder"));
    assert_eq!(
        stalled.status.as_str(),
        "True",
        "a missing folder waits for a person"
    );
}

/// Asserts each of `ids` of the MailboxPoll `uid` was delivered exactly once, with one
/// deliver task each.
async fn assert_delivered_once(world: &World, uid: Uuid, ids: &[String]) {
    let successes = world.receiver.successes();
    for id in ids {
        assert_eq!(
            successes.get(&message_key(uid, id)),
            Some(&1),
            "{id} delivered once"
        );
    }
    let recorded = count(
        &world.db.pool,
        uid,
        "SELECT count(*) FROM messages WHERE mailbox_uid = $1",
    )
    .await;
    assert_eq!(recorded, ids.len() as i64, "the ledger holds the messages");
    let tasks = count(
        &world.db.pool,
        uid,
        "SELECT count(*) FROM tasks WHERE owner_uid = $1 AND kind = 'deliver'",
    )
    .await;
    assert_eq!(tasks, ids.len() as i64, "one deliver task per message");
}

/// `(outcome, error_reason, error_message, pages, messages_new)` of a MailboxPoll's polls.
type PollRow = (String, Option<String>, Option<String>, i32, i32);

async fn poll_rows(world: &World, uid: Uuid) -> Vec<PollRow> {
    sqlx::query_as(
        "SELECT outcome, error_reason, error_message, pages, messages_new
         FROM polls WHERE mailbox_uid = $1 ORDER BY id",
    )
    .bind(uid)
    .fetch_all(&world.db.pool)
    .await
    .expect("polls")
}

/// A page malformed every time it is served: each attempt of the mailbox's poll reads it
/// once (resuming after the page before it) and fails with a transient reason, the task ends
/// dead after its attempts; a second mailbox polled by the same workers is recorded and
/// delivered meanwhile. Once the page is whole again, the next poll records the rest once.
#[tokio::test]
async fn a_page_malformed_every_time_fails_only_its_mailbox_and_is_recorded_once_cured() {
    const OTHER: &str = "billing@contoso.com";
    const ATTEMPTS: i32 = 4;
    let world = World::start(Faults::default()).await;
    let ids = immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 6)
            .expect("mail"),
    );
    // Pages of two: the second page holds the poisoned message.
    world.emulator.poison_message(&ids[2]);
    let other = world.add_mailbox_poll(OTHER);
    let other_ids = immutable_ids(
        world
            .emulator
            .add_messages(OTHER, "inbox", 5)
            .expect("other mail"),
    );
    let pool = world.workers("poison", 2);
    let poisoned = world.enqueue_poll(world.uid, ATTEMPTS).await;
    let healthy = world.enqueue_poll(other, ATTEMPTS).await;
    assert_eq!(
        world.finished(poisoned).await,
        ("dead".to_string(), ATTEMPTS)
    );
    assert_eq!(world.finished(healthy).await, ("succeeded".to_string(), 0));
    world.drain().await;

    let counters = world.emulator.counters();
    // First attempt: page 1 and the broken page 2; each retry resumes at page 2.
    let expected = 2 + (ATTEMPTS as u64 - 1);
    assert_eq!(counters.endpoint(MAILBOX, "delta"), expected);
    assert_eq!(
        counters.requests(MAILBOX),
        expected,
        "nothing but delta pages"
    );
    assert_eq!(
        counters.requests(OTHER),
        3,
        "three pages of the healthy mailbox"
    );
    let rows = poll_rows(&world, world.uid).await;
    assert_eq!(
        rows.len(),
        ATTEMPTS as usize,
        "one failed poll per attempt: {rows:?}"
    );
    for (n, (outcome, reason, message, pages, new)) in rows.iter().enumerate() {
        assert_eq!(outcome, "failed");
        assert_eq!(reason.as_deref(), Some("Transient"));
        let message = message.as_deref().unwrap_or_default();
        assert!(message.contains("malformed Graph response"), "{message}");
        let first = n == 0;
        assert_eq!(
            (*pages, *new),
            if first { (1, 2) } else { (0, 0) },
            "only the first attempt committed a page"
        );
    }
    let last_error: String = sqlx::query_scalar("SELECT last_error FROM tasks WHERE id = $1")
        .bind(poisoned)
        .fetch_one(&world.db.pool)
        .await
        .expect("task");
    assert!(
        last_error.contains("malformed Graph response"),
        "{last_error}"
    );
    assert_delivered_once(&world, world.uid, &ids[..2]).await;
    assert_delivered_once(&world, other, &other_ids).await;
    let other_rows = poll_rows(&world, other).await;
    assert_eq!(other_rows.len(), 1);
    assert_eq!(
        (other_rows[0].0.as_str(), other_rows[0].4),
        ("succeeded", 5)
    );

    // Cured: the next poll reads the two remaining pages and records each message once.
    world
        .emulator
        .update_faults(|faults| faults.poison_ids.clear());
    let cured = world.enqueue_poll(world.uid, ATTEMPTS).await;
    assert_eq!(world.finished(cured).await, ("succeeded".to_string(), 0));
    world.drain().await;
    pool.shutdown().await;
    assert_eq!(world.emulator.counters().requests(MAILBOX), expected + 2);
    assert_delivered_once(&world, world.uid, &ids).await;
    let counted_new = world
        .count("SELECT COALESCE(sum(messages_new), 0)::bigint FROM polls WHERE mailbox_uid = $1")
        .await;
    assert_eq!(counted_new, 6, "each message counted new once");
    assert_eq!(
        world.receiver.successes().len(),
        ids.len() + other_ids.len()
    );
}

/// The token endpoint answering 503 (no Retry-After): a token fetch tries three times, so a
/// poll meeting four failures fails with a transient reason (not AuthenticationFailed); the
/// credentials then wait a second before the next fetch (retries inside it fail from memory,
/// without a request), and the retry after it succeeds. A cached token makes later token
/// failures invisible (no token request at all), and a slow token endpoint only makes the
/// poll slower.
#[tokio::test]
async fn token_endpoint_outages_are_transient_and_a_cached_token_rides_them_out() {
    let world = World::start(Faults::default()).await;
    world.emulator.update_faults(|faults| {
        faults.token_endpoint = TokenEndpointFaults {
            fail_next: 4,
            status: 503,
            retry_after_secs: None,
            ..TokenEndpointFaults::default()
        };
    });
    let mut ids = immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 3)
            .expect("mail"),
    );
    let pool = world.workers("token", 10);
    // Attempts enough to outlast the second the credentials wait at this test's quick retries.
    let task = world.enqueue_poll(world.uid, 100).await;
    let (state, failed_attempts) = world.finished(task).await;
    assert_eq!(state, "succeeded");
    assert!(failed_attempts >= 1, "{failed_attempts}");
    let counters = world.emulator.counters();
    assert_eq!(
        (
            counters.token_requests,
            counters.token_faults,
            counters.tokens_issued
        ),
        (5, 4, 1),
        "three tries per fetch, one fetch per poll attempt"
    );
    assert_eq!(
        counters.requests(MAILBOX),
        1,
        "no Graph request without a token"
    );
    let rows = poll_rows(&world, world.uid).await;
    let (last, failed) = rows.split_last().expect("poll rows");
    assert_eq!(
        failed.len(),
        usize::try_from(failed_attempts).expect("count")
    );
    for row in failed {
        assert_eq!(
            (row.0.as_str(), row.1.as_deref()),
            ("failed", Some("Transient"))
        );
        let message = row.2.as_deref().unwrap_or_default();
        assert!(
            message.contains("token endpoint") && message.contains("503"),
            "{message}"
        );
    }
    assert_eq!((last.0.as_str(), last.4), ("succeeded", 3));

    // The token is cached and valid: an endpoint that fails every time is never asked.
    world.emulator.update_faults(|faults| {
        faults.token_endpoint = TokenEndpointFaults {
            fail_ratio: 1.0,
            status: 503,
            ..TokenEndpointFaults::default()
        };
    });
    ids.extend(immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 2)
            .expect("more mail"),
    ));
    let task = world.enqueue_poll(world.uid, 8).await;
    assert_eq!(world.finished(task).await, ("succeeded".to_string(), 0));
    assert_eq!(
        world.emulator.counters().token_requests,
        5,
        "the cached token served"
    );
    world.drain().await;
    pool.shutdown().await;

    // A new process (no cached token) meets a slow but working token endpoint.
    world.emulator.update_faults(|faults| {
        faults.token_endpoint = TokenEndpointFaults {
            delay_ms: 1_500,
            ..TokenEndpointFaults::default()
        };
    });
    ids.extend(immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 1)
            .expect("late mail"),
    ));
    let pool = world.workers("slow-token", 10);
    let started = std::time::Instant::now();
    let task = world.enqueue_poll(world.uid, 8).await;
    assert_eq!(world.finished(task).await, ("succeeded".to_string(), 0));
    assert!(started.elapsed() >= Duration::from_millis(1_500));
    world.drain().await;
    pool.shutdown().await;
    let counters = world.emulator.counters();
    assert_eq!((counters.token_requests, counters.tokens_issued), (6, 2));
    let outcomes: Vec<String> = poll_rows(&world, world.uid)
        .await
        .into_iter()
        .map(|row| row.0)
        .collect();
    let succeeded = outcomes.iter().filter(|o| *o == "succeeded").count();
    assert_eq!(succeeded, 3, "{outcomes:?}");
    assert_eq!(outcomes.len(), failed.len() + 3, "{outcomes:?}");
    world.assert_each_delivered_once(&ids).await;
}

/// A `$batch` envelope refused whole: a 429 whose Retry-After is longer than the governor
/// waits in process makes the actions run snooze (no attempt counted) and shares the wait on
/// the cursor; no request reaches the mailbox before it runs out. A 503 envelope is sent
/// again after its Retry-After. Every message ends read once, delivered, none parked.
#[tokio::test]
async fn refused_batch_envelopes_delay_after_actions_but_mark_each_message_once() {
    let world = World::start(Faults::default()).await;
    world.directory.insert(world.config(true, None));
    let graph = world.graph_with(GovernorConfig {
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(200),
        max_retries: 30,
        max_wait: Duration::from_millis(500),
        ..GovernorConfig::default()
    });
    let mut ids = immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 3)
            .expect("mail"),
    );
    world.emulator.update_faults(|faults| {
        faults.batch = BatchFaults {
            fail_next: 1,
            status: 429,
            retry_after_secs: 2,
            ..BatchFaults::default()
        };
    });
    // Recorded first, so the three deliveries share the actions run.
    let pollers = world.poll_workers("pollers", 10);
    world.poll().await;
    pollers.shutdown().await;
    let pool = world.workers_on_graph("actions", 10, graph);
    world.settle(3).await;
    let throttled_until: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT throttled_until FROM mailbox_cursors WHERE mailbox_uid = $1")
            .bind(world.uid)
            .fetch_one(&world.db.pool)
            .await
            .expect("cursor");
    assert!(
        throttled_until.is_some(),
        "the Retry-After was shared on the cursor"
    );

    world.emulator.update_faults(|faults| {
        faults.batch = BatchFaults {
            fail_next: 1,
            status: 503,
            retry_after_secs: 1,
            ..BatchFaults::default()
        };
    });
    ids.extend(immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 3)
            .expect("more mail"),
    ));
    world.poll().await;
    world.settle(6).await;
    world.drain().await;
    pool.shutdown().await;

    let counters = world.emulator.counters();
    assert_eq!(counters.batches_refused, 2);
    assert_eq!(
        counters.endpoint(MAILBOX, "patch"),
        ids.len() as u64,
        "each message marked read once"
    );
    let early = counters.early_requests(Duration::from_millis(50));
    assert!(early.is_empty(), "requests inside a Retry-After: {early:?}");
    for id in &ids {
        let message = world
            .emulator
            .message(MAILBOX, id)
            .expect("lookup")
            .expect("still there");
        assert_eq!(message["isRead"], true, "{id} read");
    }
    assert_eq!(parked(&world).await, 0);
    let (runs, attempts, unfinished): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), COALESCE(sum(attempts), 0)::bigint,
                count(*) FILTER (WHERE state <> 'succeeded')
         FROM tasks WHERE owner_uid = $1 AND kind = 'actions'",
    )
    .bind(world.uid)
    .fetch_one(&world.db.pool)
    .await
    .expect("actions tasks");
    assert!(runs >= 1);
    assert_eq!(
        (attempts, unfinished),
        (0, 0),
        "a refused envelope costs no attempt"
    );
    world.assert_each_delivered_once(&ids).await;
}

/// Updated items carrying only what changed (`isRead`, after mailpoll marked its messages
/// read): the next poll records no row, delivers nothing again and leaves stored content
/// alone. A partial item for a message the ledger never saw (a late arrival a user read
/// before mailpoll's next round) is not recorded as a content-less message: it is recorded,
/// whole, when Graph serves it whole (here after a resync), and delivered once.
#[tokio::test]
async fn partial_updates_change_nothing_and_unknown_ones_wait_for_the_whole_message() {
    let world = World::start(Faults {
        partial_updates: true,
        ..Faults::default()
    })
    .await;
    world.directory.insert(world.config(true, None));
    let mut ids = immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 5)
            .expect("mail"),
    );
    let late = world
        .emulator
        .add_late_message(
            MAILBOX,
            "inbox",
            NewMessage {
                subject: Some("Read before it was seen".into()),
                ..NewMessage::default()
            },
        )
        .expect("late mail")
        .immutable_id;
    let pool = world.workers("partial", 25);
    world.poll().await;
    world.settle(5).await;
    world
        .emulator
        .set_read(MAILBOX, &late, true)
        .expect("a user reads it");
    let content = || async {
        sqlx::query_as::<_, (String, Option<String>, Option<String>, Option<String>)>(
            "SELECT message_id, subject, from_address, body FROM messages
             WHERE mailbox_uid = $1 ORDER BY message_id",
        )
        .bind(world.uid)
        .fetch_all(&world.db.pool)
        .await
        .expect("content")
    };
    let before = content().await;
    assert_eq!(before.len(), 5);
    assert!(
        before
            .iter()
            .all(|(_, s, f, b)| s.is_some() && f.is_some() && b.is_some())
    );

    world.poll().await;
    world.drain().await;
    let rows = poll_rows(&world, world.uid).await;
    let seen: i32 = sqlx::query_scalar(
        "SELECT messages_seen FROM polls WHERE mailbox_uid = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(world.uid)
    .fetch_one(&world.db.pool)
    .await
    .expect("poll");
    assert_eq!(
        (rows.len(), rows[1].0.as_str(), rows[1].4, seen),
        (2, "succeeded", 0, 6),
        "six partial items, nothing new: {rows:?}"
    );
    assert_eq!(content().await, before, "stored content untouched");
    assert_eq!(
        world.receiver.successes().len(),
        5,
        "nothing delivered again"
    );

    // A resync serves every message whole: the one never seen is recorded and delivered.
    world
        .emulator
        .evict_delta_tokens(MAILBOX)
        .expect("evict tokens");
    world.poll().await;
    world.settle(6).await;
    world.drain().await;
    // And one more round from the resync's token: partial items again, nothing new.
    world.poll().await;
    world.drain().await;
    pool.shutdown().await;
    let (subject, from): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT subject, from_address FROM messages WHERE mailbox_uid = $1 AND message_id = $2",
    )
    .bind(world.uid)
    .bind(&late)
    .fetch_one(&world.db.pool)
    .await
    .expect("late row");
    assert_eq!(subject.as_deref(), Some("Read before it was seen"));
    assert!(from.is_some());
    ids.push(late);
    world.assert_each_delivered_once(&ids).await;
    let counted_new = world
        .count("SELECT COALESCE(sum(messages_new), 0)::bigint FROM polls WHERE mailbox_uid = $1")
        .await;
    assert_eq!(counted_new, 6, "each message counted new once");
    assert_eq!(
        world.emulator.counters().endpoint(MAILBOX, "patch"),
        6,
        "each message marked read once"
    );
}

/// `$batch` answers in any order: with mark-read and move configured, results are matched
/// by request id. One message whose actions are always refused is the only one parked (after
/// its failures); every other one is read and moved exactly once. mailpoll sends no
/// `dependsOn` (mark-read and move of one message are independent with immutable ids), so
/// no 424 can come back.
#[tokio::test]
async fn shuffled_batch_responses_are_matched_by_id() {
    let world = World::start(Faults {
        batch: BatchFaults {
            shuffle_responses: true,
            ..BatchFaults::default()
        },
        ..Faults::default()
    })
    .await;
    world.directory.insert(world.config(true, Some("archive")));
    let ids = immutable_ids(
        world
            .emulator
            .add_messages(MAILBOX, "inbox", 8)
            .expect("mail"),
    );
    let stuck = ids[3].clone();
    world
        .emulator
        .update_faults(|faults| faults.refused_action_ids = vec![stuck.clone()]);
    let pool = world.workers("shuffled", 25);
    world.poll().await;
    world.settle(7).await;
    wait_until(
        "the refused message parked",
        Duration::from_secs(60),
        || async { parked(&world).await == 1 },
    )
    .await;
    world.drain().await;
    pool.shutdown().await;

    let archive = world
        .emulator
        .folder_id(MAILBOX, "archive")
        .expect("archive");
    let inbox = world.emulator.folder_id(MAILBOX, "inbox").expect("inbox");
    for id in &ids {
        let message = world
            .emulator
            .message(MAILBOX, id)
            .expect("lookup")
            .expect("still there");
        let (read, folder) = if *id == stuck {
            (false, &inbox)
        } else {
            (true, &archive)
        };
        assert_eq!(message["isRead"], read, "{id}");
        assert_eq!(message["parentFolderId"], folder.as_str(), "{id}");
    }
    let stuck_state: (String, i32) = sqlx::query_as(
        "SELECT delivery_state, actions_failures FROM messages
         WHERE mailbox_uid = $1 AND message_id = $2",
    )
    .bind(world.uid)
    .bind(&stuck)
    .fetch_one(&world.db.pool)
    .await
    .expect("stuck");
    let failures = mailpoll::pipeline::actions::MAX_ACTION_FAILURES;
    assert_eq!(stuck_state, ("failed".to_string(), failures));
    let counters = world.emulator.counters();
    let expected = 7 + u64::try_from(failures).expect("failures");
    assert_eq!(counters.endpoint(MAILBOX, "patch"), expected);
    assert_eq!(counters.endpoint(MAILBOX, "move"), expected);
    let statuses = &counters.mailbox(MAILBOX).expect("counters").by_status;
    assert_eq!(statuses.get(&424), None);
    assert_eq!(
        statuses.get(&400).copied(),
        Some(2 * u64::try_from(failures).expect("failures")),
        "only the refused message's requests failed"
    );
    let delivered = world
        .count(
            "SELECT count(*) FROM messages WHERE mailbox_uid = $1 AND delivery_state = 'delivered'",
        )
        .await;
    assert_eq!(delivered, 7);
}

/// Two replicas, each with its own Graph client, poll two folders of one mailbox at the same
/// time while Graph throttles: a Retry-After either one receives holds the other's requests
/// too, also in the middle of its round (Graph counts per mailbox, whoever sends).
#[tokio::test]
async fn a_retry_after_one_replica_receives_pauses_the_other_mid_round() {
    let world = World::start(Faults {
        retry_after_secs: 2,
        slow_page_ms: 30,
        ..Faults::default()
    })
    .await;
    let archive = world.add_folder_poll("archive");
    let per_folder = 120;
    for folder in ["inbox", "archive"] {
        world
            .emulator
            .add_messages(MAILBOX, folder, per_folder)
            .expect("mail");
    }
    let stop = CancellationToken::new();
    let replica_a = world.polling_replica("replica-a", 4, &stop);
    let inbox_poll = world.enqueue_poll(world.uid, 50).await;
    world.running(inbox_poll).await;
    // One task at a time each: replica A is busy with the inbox, so B takes the archive.
    let replica_b = world.polling_replica("replica-b", 4, &stop);
    let archive_poll = world.enqueue_poll(archive, 50).await;
    world.running(archive_poll).await;
    // Throttling starts once both rounds are under way, so neither is snoozed at its start
    // by a Retry-After the other shared.
    world
        .emulator
        .update_faults(|faults| faults.throttle_ratio = 0.08);
    assert_eq!(world.finished(inbox_poll).await.0, "succeeded");
    assert_eq!(world.finished(archive_poll).await.0, "succeeded");
    replica_a.shutdown().await;
    replica_b.shutdown().await;
    stop.cancel();

    let overlapping: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM polls a JOIN polls b
           ON a.mailbox_uid = $1 AND b.mailbox_uid = $2
          AND a.started_at < b.finished_at AND b.started_at < a.finished_at",
    )
    .bind(world.uid)
    .bind(archive)
    .fetch_one(&world.db.pool)
    .await
    .expect("polls");
    assert!(
        overlapping > 0,
        "the two replicas' polls ran at the same time"
    );
    let counters = world.emulator.counters();
    let throttles = counters.throttles.len();
    assert!(
        throttles >= 2,
        "Graph throttled {throttles} times: too few to tell"
    );
    // Requests already on their way when a 429 left could not know of it, nor could those
    // sent before the announcement reached the other replica (milliseconds on loopback).
    let early = counters.early_requests(Duration::from_millis(250));
    assert!(
        early.is_empty(),
        "{} requests inside a Retry-After ({throttles} throttles): {early:?}",
        early.len()
    );
    for uid in [world.uid, archive] {
        let recorded = count(
            &world.db.pool,
            uid,
            "SELECT count(*) FROM messages WHERE mailbox_uid = $1",
        )
        .await;
        assert_eq!(
            recorded, per_folder as i64,
            "every message of {uid} recorded"
        );
    }
}

/// Retention purges the ledger rows of old delivered messages and moves the ledger's horizon;
/// a resync then replays the whole folder (purged messages included) and nothing is delivered
/// again, while new mail still is.
#[tokio::test]
async fn a_resync_after_identity_retention_delivers_nothing_again() {
    let world = World::start(Faults::default()).await;
    let long_ago = Utc::now() - chrono::Duration::days(200);
    let mut old = Vec::new();
    for n in 0..6 {
        let message = NewMessage {
            received: Some(long_ago + chrono::Duration::minutes(n)),
            ..NewMessage::default()
        };
        old.push(
            world
                .emulator
                .add_message(MAILBOX, "inbox", message)
                .expect("old mail")
                .immutable_id,
        );
    }
    let recent = add_recent(&world, 4);
    let pool = world.workers("retention", 3);
    world.poll().await;
    world.drain().await;
    let every: Vec<String> = old.iter().chain(&recent).cloned().collect();
    world.assert_each_delivered_once(&every).await;

    let retention = Duration::from_secs(180 * 24 * 3600);
    // Identity retention counts from recording too: as if the old mail had been polled when
    // it arrived.
    sqlx::query("UPDATE messages SET recorded_at = received_at WHERE mailbox_uid = $1")
        .bind(world.uid)
        .execute(&world.db.pool)
        .await
        .expect("recording times");
    let purge = mailpoll::ledger::purge_identities(&world.db.pool, world.uid, retention, 4)
        .await
        .expect("first batch");
    assert_eq!((purge.deleted, purge.busy), (4, false), "a bounded batch");
    let purge = mailpoll::ledger::purge_identities(&world.db.pool, world.uid, retention, 4)
        .await
        .expect("second batch");
    assert_eq!(purge.deleted, 2, "the rest of the old rows");
    assert_eq!(
        world
            .count("SELECT count(*) FROM messages WHERE mailbox_uid = $1")
            .await,
        4,
        "only recent messages stay in the ledger"
    );

    world
        .emulator
        .evict_delta_tokens(MAILBOX)
        .expect("evict tokens");
    let newer = add_recent(&world, 2);
    world.poll().await;
    world.drain().await;
    assert!(world.resyncs().await >= 1, "the poll re-read the folder");
    pool.shutdown().await;
    let successes = world.receiver.successes();
    for id in old.iter().chain(&recent).chain(&newer) {
        assert_eq!(
            successes.get(&message_key(world.uid, id)),
            Some(&1),
            "{id} delivered exactly once"
        );
    }
    assert_eq!(
        world
            .count("SELECT count(*) FROM tasks WHERE owner_uid = $1 AND kind = 'deliver'")
            .await,
        12,
        "no deliver task for a purged message"
    );
}

/// `count` messages received now, in the world's inbox.
fn add_recent(world: &World, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            let message = NewMessage {
                received: Some(Utc::now()),
                ..NewMessage::default()
            };
            world
                .emulator
                .add_message(MAILBOX, "inbox", message)
                .expect("recent mail")
                .immutable_id
        })
        .collect()
}

/// A message with a 10 MB subject: the poll records it whole and the messages around it go on;
/// its delivery posts it once and takes the receiver's verdict (a receiver that, like most,
/// refuses bodies over 2 MB) at once: one failed attempt, a clear error, nothing retried.
#[tokio::test]
async fn a_ten_megabyte_subject_is_recorded_and_its_delivery_gets_one_verdict() {
    const SUBJECT_BYTES: usize = 10 * 1024 * 1024;
    let world = World::start(Faults::default()).await;
    world.receiver.limit_bodies(Some(2 * 1024 * 1024));
    let huge = world
        .emulator
        .add_message(
            MAILBOX,
            "inbox",
            NewMessage {
                subject: Some("S".repeat(SUBJECT_BYTES)),
                ..NewMessage::default()
            },
        )
        .expect("huge mail")
        .immutable_id;
    world
        .emulator
        .add_messages(MAILBOX, "inbox", 3)
        .expect("plain mail");
    let pool = world.workers("huge", 10);
    world.poll().await;
    world.settle(3).await;
    world.drain().await;
    pool.shutdown().await;

    let (length, state): (i32, String) = sqlx::query_as(
        "SELECT length(subject), delivery_state FROM messages
         WHERE mailbox_uid = $1 AND message_id = $2",
    )
    .bind(world.uid)
    .bind(&huge)
    .fetch_one(&world.db.pool)
    .await
    .expect("recorded");
    assert_eq!(length as usize, SUBJECT_BYTES, "recorded whole");
    assert_eq!(state, "failed");
    let unfinished: Vec<(String, i32, Option<String>)> = sqlx::query_as(
        "SELECT state, attempts, last_error FROM tasks WHERE state <> 'succeeded' ORDER BY id",
    )
    .fetch_all(&world.db.pool)
    .await
    .expect("tasks");
    assert_eq!(
        unfinished,
        vec![(
            "dead".to_owned(),
            1,
            Some("webhook rejected the message with HTTP 413: payload too large".to_owned())
        )]
    );
    assert_eq!(world.receiver.successes().len(), 3);
}

/// Graph allows 4 concurrent requests per application and mailbox, whoever sends them. Two
/// replicas (each a Graph client and governor of its own) work two MailboxPolls of one mailbox
/// (two folders), polls, deliveries and batched mark-reads at once: together they never have
/// more than 4 requests in flight at Graph, and Graph never refuses one for concurrency.
#[tokio::test]
async fn two_replicas_on_two_folders_of_one_mailbox_stay_within_four_concurrent_requests() {
    let world = World::start(Faults {
        slow_page_ms: 20,
        slow_change_ms: 50,
        ..Faults::default()
    })
    .await;
    world.directory.insert(world.config(true, None));
    let archive = Uuid::new_v4();
    let mut archive_config = world.config(true, None);
    archive_config.ledger_id = archive;
    archive_config.source.uid = archive;
    archive_config.source.name = "archive".into();
    archive_config.source.folder = "archive".into();
    world.directory.insert(archive_config);
    let per_folder = 100;
    for folder in ["inbox", "archive"] {
        world
            .emulator
            .add_messages(MAILBOX, folder, per_folder)
            .expect("mail");
    }
    let replica_a = world.workers_on_graph("replica-a", 10, world.graph());
    let replica_b = world.workers_on_graph("replica-b", 10, world.graph());
    let polls = [
        world.enqueue_poll(world.uid, 50).await,
        world.enqueue_poll(archive, 50).await,
    ];
    for poll in polls {
        assert_eq!(world.finished(poll).await.0, "succeeded");
    }
    for uid in [world.uid, archive] {
        let what = format!("{per_folder} messages of {uid} delivered and marked read");
        wait_for_ok(what, Duration::from_secs(120), || async {
            let done = count(
                &world.db.pool,
                uid,
                "SELECT count(*) FROM messages WHERE mailbox_uid = $1 AND delivery_state = 'delivered'",
            )
            .await;
            if done == per_folder as i64 { Ok(()) } else { Err(done) }
        })
        .await;
    }
    replica_a.shutdown().await;
    replica_b.shutdown().await;

    let counters = world.emulator.counters();
    let marked = counters.endpoint(MAILBOX, "patch");
    assert!(
        marked >= 2 * per_folder as u64,
        "{marked} mark-read requests for {} messages",
        2 * per_folder
    );
    let peak = counters.peak_concurrency(MAILBOX);
    assert!(peak <= 4, "{peak} requests in flight at once at Graph");
    assert!(
        counters.throttles.is_empty(),
        "Graph refused requests: {:?}",
        counters.throttles
    );
    let held = MailboxSlots::new(world.db.pool.clone())
        .held(&SlotKey::new(DEFAULT_TENANT, DEFAULT_CLIENT_ID, MAILBOX))
        .await
        .expect("slots");
    assert_eq!(held, 0, "slots still held after every request ended");
}

/// A MailboxPoll's polls do not wait behind its own after-actions: while a backlog of slow
/// mark-reads drains in one actions run, a poll of the same MailboxPoll starts and finishes.
#[tokio::test]
async fn a_poll_does_not_wait_behind_the_same_mailboxs_after_actions() {
    let world = World::start(Faults {
        slow_change_ms: 400,
        ..Faults::default()
    })
    .await;
    world.directory.insert(world.config(true, None));
    // Mark-reads go 10 to a `$batch`, run 4 at a time, 400 ms each: about 3 s for 24, inside
    // the actions run's budget (5 s), so the run is not ended for others' sake meanwhile.
    let total = 24;
    world
        .emulator
        .add_messages(MAILBOX, "inbox", total)
        .expect("mail");
    let pool = world.workers("busy", 100);
    world.poll().await;
    // Once every webhook is in, the running actions run is the last: it ends when no
    // after-action is left.
    let run = wait_for(
        "every webhook delivered and the after-actions under way",
        Duration::from_secs(60),
        || async {
            if world.receiver.successes().len() < total {
                return None;
            }
            let due = world
                .count("SELECT count(*) FROM messages WHERE mailbox_uid = $1 AND delivery_state <> 'delivered'")
                .await;
            if due < 10 {
                panic!("only {due} after-actions left: the mailbox is too quick for this test");
            }
            sqlx::query_as::<_, (i64, Uuid)>(
                "SELECT id, lock_token FROM tasks
                  WHERE owner_uid = $1 AND kind = 'actions' AND state = 'running'",
            )
            .bind(world.uid)
            .fetch_optional(&world.db.pool)
            .await
            .expect("tasks")
        },
    )
    .await;
    world
        .emulator
        .add_messages(MAILBOX, "inbox", 1)
        .expect("mail");
    let poll = world.enqueue_poll(world.uid, 5).await;
    assert_eq!(world.finished(poll).await.0, "succeeded");
    let still_running: Option<(String, Uuid)> =
        sqlx::query_as("SELECT state, lock_token FROM tasks WHERE id = $1")
            .bind(run.0)
            .fetch_optional(&world.db.pool)
            .await
            .expect("task");
    assert_eq!(
        still_running,
        Some(("running".to_owned(), run.1)),
        "the poll finished only after the actions run it found under way had ended"
    );
    world.settle(total as i64 + 1).await;
    pool.shutdown().await;
}

/// A message for the selection tests, received at `received`.
fn mail(world: &World, received: DateTime<Utc>, from: &str, importance: &str) -> String {
    let message = NewMessage {
        received: Some(received),
        from: Some(from.into()),
        importance: Some(importance.into()),
        subject: Some(format!("from {from}")),
        ..NewMessage::default()
    };
    world
        .emulator
        .add_message(MAILBOX, "inbox", message)
        .expect("mail")
        .immutable_id
}

/// The ids of a ledger in one state, with their skip reasons.
async fn in_state(world: &World, uid: Uuid, state: &str) -> Vec<(String, Option<String>)> {
    sqlx::query_as(
        "SELECT message_id, skip_reason FROM messages
         WHERE mailbox_uid = $1 AND delivery_state = $2 ORDER BY message_id",
    )
    .bind(uid)
    .bind(state)
    .fetch_all(&world.db.pool)
    .await
    .expect("ledger rows")
}

/// Asserts each of `ids` is in `inbox`, unread: no after-action touched it.
fn assert_untouched(world: &World, ids: &[String]) {
    let inbox = world.emulator.folder_id(MAILBOX, "inbox").expect("inbox");
    for id in ids {
        let message = world
            .emulator
            .message(MAILBOX, id)
            .expect("emulator lookup")
            .unwrap_or_else(|| panic!("{id} still exists"));
        assert_eq!(message["isRead"], false, "{id}: left unread");
        assert_eq!(
            message["parentFolderId"],
            inbox.as_str(),
            "{id}: left in the inbox"
        );
    }
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// `startFrom` as a time: older mail is recorded as skipped with the reason, never delivered
/// or acted on; an expired delta token replays the whole folder and the skipped mail stays
/// skipped, while mail received since is delivered exactly once.
#[tokio::test]
async fn start_from_a_time_skips_older_mail_for_good_through_a_resync() {
    let world = World::start(Faults::default()).await;
    let start = Utc::now() - chrono::Duration::hours(1);
    let mut config = world.config(true, Some("archive"));
    config.start = mailpoll::selection::start::Start(Some(start));
    world.directory.insert(config);
    let old: Vec<String> = (0..5)
        .map(|i| {
            mail(
                &world,
                start - chrono::Duration::days(i + 1),
                "old@contoso.com",
                "normal",
            )
        })
        .collect();
    let mut new: Vec<String> = (0..4)
        .map(|i| {
            mail(
                &world,
                start + chrono::Duration::seconds(i),
                "new@contoso.com",
                "normal",
            )
        })
        .collect();
    let pool = world.workers("start-time", 3);
    world.poll().await;
    world.settle(4).await;

    world
        .emulator
        .evict_delta_tokens(MAILBOX)
        .expect("evict tokens");
    new.extend((0..3).map(|_| mail(&world, Utc::now(), "later@contoso.com", "normal")));
    world.poll().await;
    world.settle(7).await;
    world.drain().await;
    pool.shutdown().await;

    assert!(world.resyncs().await >= 1, "the eviction forced a resync");
    let reason = format!(
        "received before spec.startFrom ({})",
        start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let skipped = in_state(&world, world.uid, "skipped").await;
    assert_eq!(
        skipped,
        sorted(old.clone())
            .into_iter()
            .map(|id| (id, Some(reason.clone())))
            .collect::<Vec<_>>(),
        "exactly the older mail is skipped, with the reason"
    );
    world
        .assert_each_delivered_once_or_skipped(&new, &old)
        .await;
    assert_untouched(&world, &old);
    let counts = counts(&world).await;
    assert_eq!(
        (counts.delivered, counts.before_start, counts.filtered),
        (7, 5, 0)
    );
}

/// `startFrom: now` is fixed once, in Postgres, the first time it is resolved: resolving it
/// again (another replica, a restart, a later poll) gives the same instant, so a resync after
/// it skips exactly what the first poll skipped.
#[tokio::test]
async fn start_from_now_is_fixed_once_and_a_resync_after_it_resurrects_nothing() {
    let world = World::start(Faults::default()).await;
    let owner = mailpoll::identity::Owner {
        namespace: "sales",
        name: "orders",
        mailbox: MAILBOX,
        folder: "inbox",
    };
    let ledger = mailpoll::identity::resolve(&world.db.pool, &owner, world.uid)
        .await
        .expect("identity");
    let before: Vec<String> = (0..3)
        .map(|i| {
            let received = Utc::now() - chrono::Duration::minutes(i + 1);
            mail(&world, received, "before@contoso.com", "normal")
        })
        .collect();
    let resolve = || async {
        mailpoll::directory::selection::SelectionCache::default()
            .start(&world.db.pool, ledger, Some("now"))
            .await
            .expect("start resolves")
    };
    let start = resolve().await;
    let fixed = start.0.expect("now is an instant");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        resolve().await,
        start,
        "a second resolution keeps the instant"
    );
    let all = mailpoll::directory::selection::SelectionCache::default()
        .start(&world.db.pool, ledger, Some("all"))
        .await
        .expect("all resolves");
    assert_eq!(all.0, None, "all admits everything");

    let mut config = world.config(false, None);
    config.ledger_id = ledger;
    config.start = start;
    world.directory.insert(config);
    let mut after: Vec<String> = (0..2)
        .map(|i| {
            mail(
                &world,
                fixed + chrono::Duration::seconds(i + 1),
                "after@contoso.com",
                "normal",
            )
        })
        .collect();
    let pool = world.workers("start-now", 2);
    world.poll().await;
    wait_for_ok("2 deliveries", Duration::from_secs(60), || async {
        let delivered = world.receiver.successes().len();
        if delivered == 2 {
            Ok(())
        } else {
            Err(format!("{delivered} delivered"))
        }
    })
    .await;

    world
        .emulator
        .evict_delta_tokens(MAILBOX)
        .expect("evict tokens");
    let mut config = world.config(false, None);
    config.ledger_id = ledger;
    config.start = resolve().await;
    world.directory.insert(config);
    after.push(mail(
        &world,
        Utc::now() + chrono::Duration::seconds(5),
        "after@contoso.com",
        "normal",
    ));
    world.poll().await;
    wait_for_ok("3 deliveries", Duration::from_secs(60), || async {
        let delivered = world.receiver.successes().len();
        if delivered == 3 {
            Ok(())
        } else {
            Err(format!("{delivered} delivered"))
        }
    })
    .await;
    world.drain().await;
    pool.shutdown().await;

    assert!(world.resyncs().await >= 1, "the eviction forced a resync");
    let skipped: Vec<String> = in_state(&world, ledger, "skipped")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        skipped,
        sorted(before),
        "the mail from before stays skipped"
    );
    let successes = world.receiver.successes();
    for id in &after {
        assert_eq!(
            successes.get(&message_key(ledger, id)),
            Some(&1),
            "{id} delivered once"
        );
    }
    assert_eq!(successes.len(), 3, "nothing else delivered");
}

/// `spec.filter` decides before delivery: the messages it rejects are recorded as filtered with
/// the reason, counted, never posted and never marked read or moved; the others are delivered
/// and acted on once.
#[tokio::test]
async fn a_filter_decides_before_delivery_and_filtered_mail_gets_no_after_actions() {
    let world = World::start(Faults::default()).await;
    let mut config = world.config(true, Some("archive"));
    config.filter = Some(
        mailpoll::selection::Filter::compile(
            r#"message.from.address.endsWith("@fabrikam.com") && message.importance == "high""#,
        )
        .expect("filter compiles"),
    );
    world.directory.insert(config);
    let now = Utc::now();
    let wanted: Vec<String> = (0..6)
        .map(|_| mail(&world, now, "Billing@Fabrikam.com", "high"))
        .collect();
    let mut unwanted: Vec<String> = (0..5)
        .map(|_| mail(&world, now, "billing@fabrikam.com", "normal"))
        .collect();
    unwanted.extend((0..4).map(|_| mail(&world, now, "someone@contoso.com", "high")));
    let pool = world.workers("filter", 4);
    world.poll().await;
    world.settle(6).await;
    world.drain().await;
    pool.shutdown().await;

    let filtered = in_state(&world, world.uid, "filtered").await;
    assert_eq!(
        filtered,
        sorted(unwanted.clone())
            .into_iter()
            .map(|id| (id, Some("spec.filter did not match".to_owned())))
            .collect::<Vec<_>>()
    );
    world
        .assert_each_delivered_once_or_skipped(&wanted, &unwanted)
        .await;
    assert_untouched(&world, &unwanted);
    let archive = world
        .emulator
        .folder_id(MAILBOX, "archive")
        .expect("archive");
    for id in &wanted {
        let message = world
            .emulator
            .message(MAILBOX, id)
            .expect("emulator lookup")
            .unwrap_or_else(|| panic!("{id} still exists"));
        assert_eq!(message["isRead"], true, "{id}: marked read");
        assert_eq!(message["parentFolderId"], archive.as_str(), "{id}: moved");
    }
    let counts = counts(&world).await;
    assert_eq!(
        (counts.delivered, counts.filtered, counts.before_start),
        (6, 9, 0)
    );
}

async fn counts(world: &World) -> mailpoll::ledger::Counts {
    let mut conn = world.db.pool.acquire().await.expect("connection");
    mailpoll::ledger::counts(&mut conn, world.uid)
        .await
        .expect("counts")
}

impl World {
    /// Asserts that exactly `delivered` were posted, once each, and that `held_back` (skipped
    /// or filtered) got no post.
    async fn assert_each_delivered_once_or_skipped(
        &self,
        delivered: &[String],
        held_back: &[String],
    ) {
        let successes = self.receiver.successes();
        for id in delivered {
            assert_eq!(
                successes.get(&message_key(self.uid, id)),
                Some(&1),
                "{id} delivered once"
            );
        }
        for id in held_back {
            assert_eq!(
                successes.get(&message_key(self.uid, id)),
                None,
                "{id} never posted"
            );
        }
        assert_eq!(successes.len(), delivered.len(), "nothing else delivered");
    }
}

/// A filter on Outlook categories: polls then select `categories` from Graph (only then: a
/// changed `$select` costs a resync), and the filter sees them.
#[tokio::test]
async fn a_filter_on_categories_selects_them_and_decides_by_them() {
    let world = World::start(Faults::default()).await;
    let mut config = world.config(false, None);
    config.filter = Some(
        mailpoll::selection::Filter::compile(r#""Finance" in message.categories"#)
            .expect("filter compiles"),
    );
    world.directory.insert(config);
    let categorized = |categories: &[&str]| NewMessage {
        received: Some(Utc::now()),
        categories: categories.iter().map(|c| (*c).to_owned()).collect(),
        ..NewMessage::default()
    };
    let add = |categories: &[&str]| {
        world
            .emulator
            .add_message(MAILBOX, "inbox", categorized(categories))
            .expect("mail")
            .immutable_id
    };
    let wanted = vec![add(&["Finance"]), add(&["Urgent", "Finance"])];
    let unwanted = vec![add(&[]), add(&["Urgent"])];
    let pool = world.workers("categories", 10);
    world.poll().await;
    world.settle(2).await;
    world.drain().await;
    pool.shutdown().await;
    world
        .assert_each_delivered_once_or_skipped(&wanted, &unwanted)
        .await;
    let filtered: Vec<String> = in_state(&world, world.uid, "filtered")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(filtered, sorted(unwanted));
    let query: String =
        sqlx::query_scalar("SELECT query_fingerprint FROM mailbox_cursors WHERE mailbox_uid = $1")
            .bind(world.uid)
            .fetch_one(&world.db.pool)
            .await
            .expect("cursor");
    assert!(query.contains(",categories"), "{query}");
}
