//! mailpoll behind a real PgBouncer, as managed Postgres setups put one in front: migrations run
//! by a role that is not a superuser (by several replicas at once), the task queue (enqueue,
//! claims by several pools, completions, failures, rescue), a poll with its deliveries, and two
//! whole operator replicas, with notifications off, all through the pooler in transaction mode
//! (what managed setups use), the queue and the poll in session mode too.
//!
//! Transaction pooling needs PgBouncer 1.21 or later with `max_prepared_statements` set: sqlx
//! names its prepared statements per connection (`sqlx_s_1`, ...), even without a statement
//! cache, and earlier PgBouncers hand them to whichever server is free, where another client's
//! statement of that name already exists. scripts/test builds Debian 13's PgBouncer 1.24 for
//! these tests (`MAILPOLL_PGBOUNCER`); Debian 12's 1.18, when installed, pins the failure down.
//! A missing or older PgBouncer skips the tests with a message, except in CI (`CI=true`), where
//! that fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams, PostParams};
use mailpoll::cursor::Source;
use mailpoll::delivery::egress::{EgressGuard, EgressPolicy};
use mailpoll::directory::MailboxConfig;
use mailpoll::graph::{Credentials, Governor, GovernorConfig, GraphClient, GraphConfig};
use mailpoll::mailbox_slots::MailboxSlots;
use mailpoll::operator::{self, KubeSource, OperatorConfig};
use mailpoll::pipeline::deliver::DeliverHandler;
use mailpoll::pipeline::poll::{PollHandler, PollSettings};
use mailpoll::pipeline::{DELIVER, POLL, PollTask};
use mailpoll::queue::{
    self, ClaimedTask, HandlerError, NewTask, RetryPolicy, TaskContext, TaskState, WorkerId,
    WorkerPool, WorkerPoolConfig, handler_fn,
};
use mailpoll::resource::{AfterDelivery, MailboxPoll, POLL_REQUESTED_AT_ANNOTATION};
use mailpoll::telemetry::metrics::Metrics;
use mailpoll_testkit::cluster;
use mailpoll_testkit::directory::StaticDirectory;
use mailpoll_testkit::graph::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT, EmulatorConfig, GraphEmulator,
};
use mailpoll_testkit::kube::KubeEmulator;
use mailpoll_testkit::pg::{admin_url, free_port};
use mailpoll_testkit::pgbouncer::{self, PgBouncer, PoolMode};
use mailpoll_testkit::wait_until;
use mailpoll_testkit::webhook_receiver::{TEST_SIGNING_SECRET, WebhookReceiver};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

/// A PgBouncer that keeps prepared statements apart in transaction pooling (1.21 or later), or
/// `None` (with a message) when a local run lacks one.
fn pgbouncer_binary() -> Option<std::path::PathBuf> {
    let found = pgbouncer::binary().filter(|binary| {
        pgbouncer::version(binary).is_ok_and(|v| v >= pgbouncer::PREPARED_STATEMENTS_SINCE)
    });
    if found.is_none() {
        let in_ci = std::env::var("CI").is_ok_and(|value| value == "true");
        assert!(
            !in_ci,
            "no PgBouncer 1.21 or later in CI: scripts/test builds one and sets MAILPOLL_PGBOUNCER"
        );
        eprintln!(
            "SKIPPED: no PgBouncer 1.21 or later (MAILPOLL_PGBOUNCER, PATH, /usr/sbin/pgbouncer)"
        );
    }
    found
}

/// PgBouncer and a role and database of their own, on the test Postgres; dropped by
/// [`Bounced::finish`].
struct Bounced {
    admin: PgPool,
    bouncer: PgBouncer,
    role: String,
    database: String,
}

impl Bounced {
    async fn start(binary: &std::path::Path, mode: PoolMode) -> Self {
        let admin_url = admin_url().expect("DATABASE_URL");
        let admin = PgPool::connect(&admin_url).await.expect("admin pool");
        let (role, database) = role_and_database(&admin).await;
        let bouncer = PgBouncer::start(binary, upstream_port(&admin_url), mode, &[role.as_str()])
            .expect("start pgbouncer");
        // The process never LISTENs: behind a pooler notifications are not to be relied on.
        mailpoll::db::disable_listening();
        Self {
            admin,
            bouncer,
            role,
            database,
        }
    }

    fn url(&self) -> String {
        self.bouncer.url(&self.role, &self.database)
    }

    async fn pool(&self, max_connections: u32) -> PgPool {
        mailpoll::db::connect(
            &self.url(),
            &mailpoll::db::PoolConfig {
                max_connections,
                ..mailpoll::db::PoolConfig::default()
            },
        )
        .await
        .expect("pool through pgbouncer")
    }

    async fn finish(self) {
        drop(self.bouncer);
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE \"{}\" WITH (FORCE)",
            self.database
        )))
        .execute(&self.admin)
        .await;
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE \"{}\"", self.role)))
            .execute(&self.admin)
            .await;
    }
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
async fn the_queue_runs_behind_pgbouncer_in_transaction_mode() {
    if let Some(binary) = pgbouncer_binary() {
        queue_behind_pgbouncer(&binary, PoolMode::Transaction).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_runs_behind_pgbouncer_in_session_mode() {
    if let Some(binary) = pgbouncer_binary() {
        queue_behind_pgbouncer(&binary, PoolMode::Session).await;
    }
}

/// Migrations by a role that is not superuser, then enqueues, claims by three pools,
/// completions, failures and the rescue of a vanished worker's tasks, all through PgBouncer.
async fn queue_behind_pgbouncer(binary: &std::path::Path, mode: PoolMode) {
    let bounced = Bounced::start(binary, mode).await;
    let pool = bounced.pool(16).await;
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
        let connections = bounced.pool(4).await;
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
    bounced.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poll_and_its_deliveries_run_behind_pgbouncer_in_transaction_mode() {
    if let Some(binary) = pgbouncer_binary() {
        poll_behind_pgbouncer(&binary, PoolMode::Transaction).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poll_and_its_deliveries_run_behind_pgbouncer_in_session_mode() {
    if let Some(binary) = pgbouncer_binary() {
        poll_behind_pgbouncer(&binary, PoolMode::Session).await;
    }
}

/// A poll of 30 messages and their deliveries, each Graph request holding one of the
/// mailbox's shared slots in Postgres, through PgBouncer.
async fn poll_behind_pgbouncer(binary: &std::path::Path, mode: PoolMode) {
    mailpoll::install_crypto_provider();
    let bounced = Bounced::start(binary, mode).await;
    let pool = bounced.pool(16).await;
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
    let governor = Governor::new(GovernorConfig::default());
    governor.share_slots(Arc::new(MailboxSlots::new(pool.clone())));
    let graph = GraphClient::new(
        GraphConfig::with_urls(&base, &base).expect("Graph config"),
        governor,
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
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM mailbox_slots WHERE holder IS NOT NULL")
            .fetch_one(&pool)
            .await
            .expect("count held slots");
    assert_eq!(held, 0, "every shared slot given back");
    pool.close().await;
    bounced.finish().await;
}

/// Debian 12's PgBouncer 1.18 in transaction mode: sqlx's named statements meet on a shared
/// server. README asks for 1.21 or later for this reason.
#[tokio::test]
async fn transaction_pooling_before_pgbouncer_1_21_breaks_named_prepared_statements() {
    let old = pgbouncer::debian_binary().filter(|binary| {
        pgbouncer::version(binary).is_ok_and(|v| v < pgbouncer::PREPARED_STATEMENTS_SINCE)
    });
    let Some(binary) = old else {
        eprintln!("SKIPPED: no PgBouncer older than 1.21 at /usr/sbin/pgbouncer");
        return;
    };
    let bounced = Bounced::start(&binary, PoolMode::Transaction).await;
    // Even without a statement cache: sqlx still names the statements it prepares.
    let url = format!("{}?statement-cache-capacity=0", bounced.url());
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
    bounced.finish().await;
}

/// Advisory locks held in the test's database, by any session (PgBouncer's server connections
/// included).
async fn advisory_locks(bounced: &Bounced) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
          WHERE l.locktype = 'advisory' AND d.datname = $1",
    )
    .bind(&bounced.database)
    .fetch_one(&bounced.admin)
    .await
    .expect("count advisory locks")
}

/// Four replicas start together behind transaction pooling: each migration is applied once,
/// every run ends, and no lock is left on a server connection. sqlx's own migration lock is a
/// session's lock, which transaction pooling strands on a server, as the first part shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_together_migrate_once_through_transaction_pooling() {
    let Some(binary) = pgbouncer_binary() else {
        return;
    };
    let bounced = Bounced::start(&binary, PoolMode::Transaction).await;

    let client = bounced.pool(1).await;
    sqlx::query("SELECT pg_advisory_lock(42)")
        .execute(&client)
        .await
        .expect("a session's lock, through the pooler");
    client.close().await;
    assert_eq!(
        advisory_locks(&bounced).await,
        1,
        "the client has gone, its session's lock stays with PgBouncer's server connection"
    );
    sqlx::query(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
          WHERE l.locktype = 'advisory' AND d.datname = $1",
    )
    .bind(&bounced.database)
    .execute(&bounced.admin)
    .await
    .expect("end the stranded lock's server connection");

    let mut replicas = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let pool = bounced.pool(2).await;
        replicas.spawn(async move {
            let outcome = mailpoll::db::migrate(&pool).await;
            pool.close().await;
            outcome
        });
    }
    let outcomes = tokio::time::timeout(Duration::from_secs(60), replicas.join_all())
        .await
        .expect("every replica's migration run ends within 60 s");
    for outcome in outcomes {
        outcome.expect("a replica's migrations");
    }
    let pool = bounced.pool(1).await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .expect("count applied migrations");
    assert_eq!(applied as usize, mailpoll::db::MIGRATOR.iter().count());
    assert_eq!(advisory_locks(&bounced).await, 0, "no lock left behind");
    pool.close().await;
    bounced.finish().await;
}

/// Two whole operator replicas behind PgBouncer in transaction mode, started together:
/// migrations, leader election with its fenced writes, the reconciler's schedule, polls with
/// shared Graph slots, deliveries, mark-as-read, a forced poll and status. Each message is
/// delivered once and marked read, and the status counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_operator_replicas_run_behind_pgbouncer_in_transaction_mode() {
    let Some(binary) = pgbouncer_binary() else {
        return;
    };
    mailpoll::install_crypto_provider();
    const MAILBOX: &str = "support@contoso.com";
    const SECRET: &str = "graph-credentials";
    let bounced = Bounced::start(&binary, PoolMode::Transaction).await;
    let kube = KubeEmulator::start()
        .await
        .expect("Kubernetes API emulator");
    let client = kube.client().expect("client for the emulator");
    cluster::install_crd(&client).await.expect("CRD installed");
    let namespace = format!("pgb-{}", &Uuid::new_v4().simple().to_string()[..8]);
    cluster::create_namespace(&client, &namespace)
        .await
        .expect("namespace");
    cluster::create_credentials(&client, &namespace, SECRET, cluster::valid_client_secret())
        .await
        .expect("credentials Secret");
    let graph = GraphEmulator::start(EmulatorConfig {
        mailboxes: vec![MAILBOX.into()],
        ..EmulatorConfig::default()
    })
    .await
    .expect("Graph emulator");
    let messages = graph.add_messages(MAILBOX, "inbox", 25).expect("seed mail");
    let receiver = WebhookReceiver::start(None).await.expect("receiver");

    let mut replicas = Vec::new();
    for name in ["replica-a", "replica-b"] {
        let http_port = free_port().expect("free port");
        let mut config = OperatorConfig::new(
            bounced.url(),
            format!("127.0.0.1:{http_port}").parse().expect("address"),
            KubeSource::Config(Box::new(kube.config().expect("emulator config"))),
        );
        config.webhook_egress = EgressGuard::new(EgressPolicy::allowing_loopback());
        config.pool.max_connections = 6;
        config.workers.worker_id = WorkerId::named(name);
        config.workers.listen = false;
        config.workers.poll_interval = Duration::from_millis(200);
        config.workers.concurrency = 4;
        config.workers.shutdown_grace = Duration::from_secs(2);
        config.lease_namespace = namespace.clone();
        config.lease_duration = Duration::from_secs(3);
        config.lease_renew_deadline = Duration::from_secs(2);
        config.lease_retry_period = Duration::from_millis(500);
        config.graph_authority_url = graph.base_url();
        config.graph_url = graph.base_url();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(operator::run(config, async move {
            let _ = stopped.await;
        }));
        replicas.push((stop, task, http_port));
    }
    let http = reqwest::Client::new();
    for (_, _, port) in &replicas {
        let url = format!("http://127.0.0.1:{port}/readyz");
        wait_until("a replica to be ready", Duration::from_secs(60), || async {
            http.get(&url)
                .send()
                .await
                .is_ok_and(|response| response.status().is_success())
        })
        .await;
    }

    let api: Api<MailboxPoll> = Api::namespaced(client.clone(), &namespace);
    let mut poll = cluster::mailbox_poll("support", MAILBOX, "1h", SECRET);
    poll.spec.delivery = Some(
        serde_json::from_value(json!({ "webhook": { "url": receiver.url() } }))
            .expect("delivery spec"),
    );
    poll.spec.after_delivery = Some(AfterDelivery {
        mark_as_read: true,
        move_to_folder: None,
    });
    api.create(&PostParams::default(), &poll)
        .await
        .expect("MailboxPoll created");
    wait_until(
        "25 messages delivered and counted in the status",
        Duration::from_secs(90),
        || async {
            api.get("support")
                .await
                .ok()
                .and_then(|poll| poll.status)
                .is_some_and(|status| status.messages_delivered == Some(25))
        },
    )
    .await;
    // Five more, and a forced poll: the hour's interval would not pick them up.
    let mut messages = messages;
    messages.extend(graph.add_messages(MAILBOX, "inbox", 5).expect("more mail"));
    api.patch(
        "support",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {
            POLL_REQUESTED_AT_ANNOTATION: "2026-12-06T22:00:00Z"
        }}})),
    )
    .await
    .expect("poll requested");
    wait_until(
        "the forced poll's 5 messages delivered and counted",
        Duration::from_secs(90),
        || async {
            api.get("support")
                .await
                .ok()
                .and_then(|poll| poll.status)
                .is_some_and(|status| status.messages_delivered == Some(30))
        },
    )
    .await;
    let successes = receiver.successes();
    assert_eq!(successes.len(), 30, "each message delivered");
    assert!(
        successes.values().all(|&n| n == 1),
        "each message delivered once: {successes:?}"
    );
    for ids in &messages {
        let message = graph
            .message(MAILBOX, &ids.rest_id)
            .expect("emulator")
            .expect("the message is still there");
        assert_eq!(
            message["isRead"],
            json!(true),
            "marked read: {}",
            ids.rest_id
        );
    }
    let status = api
        .get("support")
        .await
        .expect("MailboxPoll")
        .status
        .expect("status");
    assert_eq!(status.messages_failed, Some(0));
    assert_eq!(status.messages_pending, Some(0));
    for (stop, task, _) in replicas {
        drop(stop);
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the replica stops within 30 s")
            .expect("the replica's task")
            .expect("the replica ends without error");
    }
    bounced.finish().await;
}
