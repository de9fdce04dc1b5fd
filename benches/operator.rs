//! Scheduling at scale: many MailboxPolls against the Kubernetes API and Graph emulators, the
//! operator as real processes (one or more replicas sharing one Postgres). Prints the server's
//! settings, the creation phase (creating the MailboxPolls until each has finished its first
//! poll), then, for a window that starts an interval and a half after creation is over, the
//! schedule lag (poll start minus due time), the Kubernetes API writes per poll, each
//! replica's peak RSS over the whole run, CPU per poll (Postgres, the replicas, the emulators
//! with this process), and the delivery latency (recorded to delivered) of mail arriving
//! meanwhile; then how soon a forced poll (`kubectl annotate`) starts.
//!
//! With a noisy neighbour, one more MailboxPoll has a backlog of 100,000 messages and a
//! receiver that takes 10 s per request; the figures above are the other MailboxPolls', and
//! the neighbour's deliveries in flight are sampled.
//!
//! ```text
//! cargo bench --bench operator                          # 200 at 30 s on 3 replicas, 90 s
//! MAILPOLL_BIG=1 cargo bench --bench operator           # 10,000 at 60 s on 3 replicas, 10 min
//! MAILPOLL_BENCH_NOISY=1 cargo bench --bench operator   # either, with the noisy neighbour
//! ```
//!
//! `MAILPOLL_BENCH_MAILBOXPOLLS`, `MAILPOLL_BENCH_REPLICAS`, `MAILPOLL_BENCH_INTERVAL_SECONDS`,
//! `MAILPOLL_BENCH_WINDOW_SECONDS` and `MAILPOLL_WORKER_CONCURRENCY` override the mode's
//! figures; `MAILPOLL_BENCH_REPLICA_LOG` is the replicas' log filter (default `error`). Uses the
//! Postgres of `DATABASE_URL` when set, else starts a private throwaway server. When a
//! MailboxPoll has not finished its first poll in time, it prints what is known of those left.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use mailpoll::resource::{MailboxPoll, POLL_REQUESTED_AT_ANNOTATION};
use mailpoll_testkit::bench::BenchPostgres;
use mailpoll_testkit::cluster;
use mailpoll_testkit::graph::{EmulatorConfig, GraphEmulator};
use mailpoll_testkit::kube::KubeEmulator;
use mailpoll_testkit::pg::{TestDatabase, free_port};
use mailpoll_testkit::webhook_receiver::WebhookReceiver;
use mailpoll_testkit::{Patience, try_wait_for};
use sqlx::PgPool;
use tokio::process::Child;

// The operator binary's allocator: the emulators share this process and this machine with
// the replicas and Postgres, and glibc's malloc took about 40% of their CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NAMESPACE: &str = "bench";
const NOISY: &str = "noisy";
const NOISY_BACKLOG: usize = 100_000;
const NOISY_RECEIVER_DELAY: Duration = Duration::from_secs(10);

/// What one run measures.
struct Scenario {
    mailbox_polls: usize,
    replicas: usize,
    interval_seconds: i64,
    window: Duration,
    noisy: bool,
    concurrency: String,
}

impl Scenario {
    fn from_env() -> Self {
        let big = env_flag("MAILPOLL_BIG");
        let number = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let (count, interval, window) = if big {
            (10_000, 60, 600)
        } else {
            (200, 30, 90)
        };
        Self {
            mailbox_polls: number("MAILPOLL_BENCH_MAILBOXPOLLS", count) as usize,
            replicas: number("MAILPOLL_BENCH_REPLICAS", 3).max(1) as usize,
            interval_seconds: number("MAILPOLL_BENCH_INTERVAL_SECONDS", interval) as i64,
            window: Duration::from_secs(number("MAILPOLL_BENCH_WINDOW_SECONDS", window)),
            noisy: env_flag("MAILPOLL_BENCH_NOISY"),
            // Polls mostly wait on Graph and Postgres: a replica needs about (polls per
            // second) x (seconds per poll) of them in flight.
            concurrency: std::env::var("MAILPOLL_WORKER_CONCURRENCY")
                .unwrap_or_else(|_| "64".to_owned()),
        }
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// The process's peak resident set size since it started (the kernel's high-water mark), so
/// the creation phase's peak counts too.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU ticks of every Postgres process of the server (backends, autovacuum, WAL writer, …),
/// by pid. Needs the server on this machine; a process that ends within the window takes its
/// ticks with it, so the figure is a lower bound.
async fn postgres_cpu(pool: &PgPool) -> anyhow::Result<std::collections::HashMap<i32, u64>> {
    let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity")
        .fetch_all(pool)
        .await?;
    Ok(pids
        .into_iter()
        .filter_map(|pid| Some((pid, cpu_ticks(pid)?)))
        .collect())
}

/// CPU ticks of these processes together (threads included).
fn processes_cpu(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|&pid| cpu_ticks(i32::try_from(pid).ok()?))
        .sum()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The database's clock: poll start times are stamped by it, so windows are too.
async fn db_now(pool: &PgPool) -> anyhow::Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(pool).await?)
}

/// A MailboxPoll delivering to `receiver` with a webhook timeout of `timeout`.
fn mailbox_poll(
    name: &str,
    mailbox: &str,
    interval_seconds: i64,
    receiver: &str,
    timeout: &str,
) -> anyhow::Result<MailboxPoll> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "mailpoll.dev/v1alpha1",
        "kind": "MailboxPoll",
        "metadata": {"name": name},
        "spec": {
            "mailbox": mailbox,
            "interval": format!("{interval_seconds}s"),
            "credentialsSecretRef": {"name": "graph"},
            "delivery": {"webhook": {"url": receiver, "timeout": timeout}},
        }
    }))?)
}

/// How long creating the MailboxPolls took, and until every one had finished its first poll.
struct Creation {
    created: Duration,
    all_first_polls: Duration,
}

/// Creates the MailboxPolls (16 requests at a time), then waits until each has finished its
/// first poll: that burst of first polls, and the status writes it makes, belong to creation,
/// not to the steady schedule measured after it.
async fn create_all(
    api: &Api<MailboxPoll>,
    polls: Vec<MailboxPoll>,
    pool: &PgPool,
) -> anyhow::Result<Creation> {
    let started = Instant::now();
    let count = polls.len();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(polls)
        .map(|poll| async move {
            let name = poll.metadata.name.clone().unwrap_or_default();
            api.create(&PostParams::default(), &poll)
                .await
                .map(drop)
                .with_context(|| format!("creating {name}"))
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let created = started.elapsed();
    let patience = Patience::new(Duration::from_secs(180 + count as u64 / 20))
        .every(Duration::from_millis(500));
    let all_polled = try_wait_for("every MailboxPoll's first poll", patience, || async {
        let polled: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT mailbox_uid) FROM polls WHERE finished_at IS NOT NULL",
        )
        .fetch_one(pool)
        .await
        .ok()?;
        (polled >= count as i64).then_some(())
    })
    .await;
    if let Err(error) = all_polled {
        diagnose_unpolled(api, pool).await?;
        return Err(error.into());
    }
    Ok(Creation {
        created,
        all_first_polls: started.elapsed(),
    })
}

/// Prints what is known of the MailboxPolls that have not finished a poll: whether the API
/// server has them, their status, their ledger identity, their tasks; and the leader terms.
async fn diagnose_unpolled(api: &Api<MailboxPoll>, pool: &PgPool) -> anyhow::Result<()> {
    let stored = api.list(&Default::default()).await?.items;
    let uids: Vec<uuid::Uuid> = stored
        .iter()
        .filter_map(|poll| poll.metadata.uid.as_deref()?.parse().ok())
        .collect();
    let unpolled: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT u FROM unnest($1::uuid[]) AS u
          WHERE NOT EXISTS (SELECT 1 FROM polls WHERE mailbox_uid = u AND finished_at IS NOT NULL)",
    )
    .bind(&uids)
    .fetch_all(pool)
    .await?;
    println!(
        "{} of {} stored MailboxPolls have not finished a poll",
        unpolled.len(),
        stored.len()
    );
    for uid in unpolled.iter().take(20) {
        let poll = stored
            .iter()
            .find(|p| p.metadata.uid.as_deref() == Some(&uid.to_string()));
        let (identity, tasks): (i64, Vec<String>) = (
            sqlx::query_scalar("SELECT count(*) FROM mailbox_identities WHERE uid = $1")
                .bind(uid)
                .fetch_one(pool)
                .await?,
            sqlx::query_scalar(
                "SELECT kind || ' ' || state || ' at ' || run_at::text FROM tasks WHERE owner_uid = $1",
            )
            .bind(uid)
            .fetch_all(pool)
            .await?,
        );
        println!(
            "  {} rv {} status {}: {identity} identity row(s), tasks {tasks:?}",
            poll.and_then(|p| p.metadata.name.clone())
                .unwrap_or_default(),
            poll.and_then(|p| p.metadata.resource_version.clone())
                .unwrap_or_default(),
            poll.and_then(|p| p.status.as_ref())
                .map_or("none".to_owned(), |s| format!("{s:?}")),
        );
    }
    let terms: Vec<(String, i64)> = sqlx::query_as("SELECT holder, term FROM leader_terms")
        .fetch_all(pool)
        .await?;
    println!("leader terms: {terms:?}");
    Ok(())
}

/// The steady-state window, in the database's clock, and what was sampled during it.
struct Window {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    writes: usize,
    /// The writes by verb and resource (`patch mailpoll.dev/mailboxpolls/status`, ...).
    writes_by_kind: std::collections::BTreeMap<String, usize>,
    /// The objects written most, with their writes, most first.
    most_written: Vec<(String, usize)>,
    postgres_cpu_seconds: f64,
    /// CPU time of the operator processes over the window.
    replicas_cpu_seconds: f64,
    /// CPU time of this process over the window: both emulators, the receivers and the
    /// benchmark's own sampling.
    emulators_cpu_seconds: f64,
    /// The noisy neighbour's deliveries running at once, at most (sampled every second).
    noisy_peak_deliveries: i64,
    /// The statements that took the most Postgres time in the window, when the server has
    /// `pg_stat_statements` loaded.
    statements: Vec<StatementCost>,
}

/// One statement's share of the window, from `pg_stat_statements`.
#[derive(sqlx::FromRow)]
struct StatementCost {
    calls: i64,
    total_ms: f64,
    rows: i64,
    query: String,
}

/// Starts counting statements afresh, when the server can (`pg_stat_statements` in
/// `shared_preload_libraries`); `false` when it cannot, which only leaves the profile out.
async fn reset_statement_counts(pool: &PgPool) -> bool {
    let created = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await;
    created.is_ok()
        // Only this database's counts: a shared server's other databases keep theirs.
        && sqlx::query(
            "SELECT pg_stat_statements_reset(0, \
             (SELECT oid FROM pg_database WHERE datname = current_database()), 0)",
        )
            .execute(pool)
            .await
            .is_ok()
}

/// The statements that took the most time since the reset, most first.
async fn costliest_statements(pool: &PgPool) -> anyhow::Result<Vec<StatementCost>> {
    Ok(sqlx::query_as(
        "SELECT calls, total_exec_time AS total_ms, rows,
                left(regexp_replace(query, '\\s+', ' ', 'g'), 90) AS query
         FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
         ORDER BY total_exec_time DESC LIMIT 12",
    )
    .fetch_all(pool)
    .await?)
}

/// Lets the operators run for `duration` while mail keeps arriving in the quiet mailboxes,
/// counting Kubernetes API writes from the start of the window (the MailboxPolls' creations
/// are the user's, and creation is over).
async fn measure(
    pool: &PgPool,
    replica_pids: &[u32],
    kube: &KubeEmulator,
    graph: &GraphEmulator,
    mailboxes: &[String],
    noisy: Option<uuid::Uuid>,
    duration: Duration,
) -> anyhow::Result<Window> {
    kube.clear_requests();
    let profiled = reset_statement_counts(pool).await;
    let start = db_now(pool).await?;
    let cpu_before = postgres_cpu(pool).await?;
    let replicas_before = processes_cpu(replica_pids);
    let emulators_before = processes_cpu(&[std::process::id()]);
    // One new message every 100 ms in one of the quiet mailboxes, in turn.
    let mut next_mailbox = mailboxes.iter().cycle();
    let mut noisy_peak_deliveries = 0;
    let until = Instant::now() + duration;
    let mut tick = 0u64;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        tick += 1;
        if let Some(mailbox) = next_mailbox.next() {
            graph.add_messages(mailbox, "inbox", 1)?;
        }
        if let Some(uid) = noisy.filter(|_| tick.is_multiple_of(10)) {
            let running: i64 = sqlx::query_scalar(
                // Running capped deliveries hold a slot: read through the small slot index,
                // not the owner's live tasks (the backlog of 100,000 pending ones).
                "SELECT count(*) FROM tasks
                  WHERE owner_uid = $1 AND kind = 'deliver' AND state = 'running'
                    AND owner_slot IS NOT NULL",
            )
            .bind(uid)
            .fetch_one(pool)
            .await?;
            noisy_peak_deliveries = noisy_peak_deliveries.max(running);
        }
    }
    let end = db_now(pool).await?;
    let cpu_after = postgres_cpu(pool).await?;
    let statements = if profiled {
        costliest_statements(pool).await?
    } else {
        Vec::new()
    };
    let replicas_ticks = processes_cpu(replica_pids).saturating_sub(replicas_before);
    let emulators_ticks = processes_cpu(&[std::process::id()]).saturating_sub(emulators_before);
    let ticks: u64 = cpu_after
        .iter()
        .map(|(pid, after)| after.saturating_sub(cpu_before.get(pid).copied().unwrap_or(0)))
        .sum();
    let mut writes_by_kind = std::collections::BTreeMap::new();
    let mut writes_by_object: std::collections::HashMap<String, usize> =
        std::collections::HashMap::new();
    for request in kube
        .requests()
        .into_iter()
        .filter(|r| matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete"))
        .filter(|r| r.group != "coordination.k8s.io")
    {
        *writes_by_kind.entry(request.rbac_key()).or_insert(0) += 1;
        let object = format!(
            "{}/{}",
            request.namespace.as_deref().unwrap_or("-"),
            request.name.as_deref().unwrap_or("-")
        );
        *writes_by_object.entry(object).or_insert(0) += 1;
    }
    let writes = writes_by_kind.values().sum();
    let mut most_written: Vec<(String, usize)> = writes_by_object.into_iter().collect();
    most_written.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    most_written.truncate(3);
    Ok(Window {
        start,
        end,
        writes,
        writes_by_kind,
        most_written,
        // Linux reports process CPU time in USER_HZ ticks, 100 a second.
        postgres_cpu_seconds: ticks as f64 / 100.0,
        replicas_cpu_seconds: replicas_ticks as f64 / 100.0,
        emulators_cpu_seconds: emulators_ticks as f64 / 100.0,
        noisy_peak_deliveries,
        statements,
    })
}

/// Lag of every scheduled poll of the quiet MailboxPolls due inside the window and started
/// before its end: its start minus one interval after the previous start.
async fn lags(
    pool: &PgPool,
    window: &Window,
    interval_seconds: i64,
    noisy: Option<uuid::Uuid>,
) -> anyhow::Result<Vec<f64>> {
    let mut lags: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM started_at - due)::float8
         FROM (SELECT mailbox_uid, started_at,
                      lag(started_at) OVER (PARTITION BY mailbox_uid ORDER BY started_at)
                          + $1 * interval '1 second' AS due
               FROM polls) AS p
         WHERE due >= $2 AND started_at < $3 AND mailbox_uid IS DISTINCT FROM $4",
    )
    .bind(interval_seconds as f64)
    .bind(window.start)
    .bind(window.end)
    .bind(noisy)
    .fetch_all(pool)
    .await?;
    lags.sort_by(f64::total_cmp);
    Ok(lags)
}

/// Quiet polls due before the window's end that had not started by then, and the most
/// overdue in seconds: lags the measured ones cannot show, as those polls have no start yet.
async fn overdue_at_end(
    pool: &PgPool,
    window: &Window,
    interval_seconds: i64,
    noisy: Option<uuid::Uuid>,
) -> anyhow::Result<(i64, f64)> {
    let (count, most): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), max(EXTRACT(EPOCH FROM $2 - due))::float8
         FROM (SELECT max(started_at) + $1 * interval '1 second' AS due
               FROM polls WHERE started_at < $2 AND mailbox_uid IS DISTINCT FROM $3
               GROUP BY mailbox_uid) AS last
         WHERE due < $2",
    )
    .bind(interval_seconds as f64)
    .bind(window.end)
    .bind(noisy)
    .fetch_one(pool)
    .await?;
    Ok((count, most.unwrap_or(0.0)))
}

/// The ledger identity a MailboxPoll's messages are recorded under.
async fn ledger_of(pool: &PgPool, uid: uuid::Uuid) -> anyhow::Result<uuid::Uuid> {
    Ok(
        sqlx::query_scalar("SELECT identity FROM mailbox_identities WHERE uid = $1")
            .bind(uid)
            .fetch_one(pool)
            .await?,
    )
}

/// Recorded-to-delivered latency of the quiet MailboxPolls' messages recorded in the window
/// (`noisy`: the neighbour's ledger identity).
async fn delivery_latencies(
    pool: &PgPool,
    window: &Window,
    noisy: Option<uuid::Uuid>,
) -> anyhow::Result<(Vec<f64>, i64)> {
    let mut latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM webhook_delivered_at - recorded_at)::float8
         FROM messages
         WHERE recorded_at >= $1 AND recorded_at < $2 AND webhook_delivered_at IS NOT NULL
           AND mailbox_uid IS DISTINCT FROM $3",
    )
    .bind(window.start)
    .bind(window.end)
    .bind(noisy)
    .fetch_all(pool)
    .await?;
    latencies.sort_by(f64::total_cmp);
    let undelivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages
         WHERE recorded_at >= $1 AND recorded_at < $2 AND webhook_delivered_at IS NULL
           AND mailbox_uid IS DISTINCT FROM $3",
    )
    .bind(window.start)
    .bind(window.end)
    .bind(noisy)
    .fetch_one(pool)
    .await?;
    Ok((latencies, undelivered))
}

/// An operator process.
struct Replica {
    child: Child,
    pid: u32,
    port: u16,
}

fn start_replica(
    index: usize,
    scenario: &Scenario,
    db: &TestDatabase,
    kube: &KubeEmulator,
    graph: &GraphEmulator,
) -> anyhow::Result<Replica> {
    let port = free_port()?;
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailpoll"))
        .args(["operator", "--http-addr", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", &db.url)
        .env(
            "KUBECONFIG",
            kube.kubeconfig_for(&format!("replica-{index}"))?,
        )
        .env("POD_NAME", format!("replica-{index}"))
        .env("MAILPOLL_LEASE_NAMESPACE", NAMESPACE)
        .env("MAILPOLL_GRAPH_AUTHORITY_URL", graph.base_url())
        .env("MAILPOLL_GRAPH_URL", graph.base_url())
        .env("MAILPOLL_WEBHOOK_ALLOW_LOOPBACK", "true")
        .env(
            "MAILPOLL_LOG",
            std::env::var("MAILPOLL_BENCH_REPLICA_LOG").unwrap_or_else(|_| "error".into()),
        )
        .env("MAILPOLL_WORKER_CONCURRENCY", &scenario.concurrency)
        .env("MAILPOLL_DB_MAX_CONNECTIONS", "40")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the operator")?;
    let pid = child.id().context("operator pid")?;
    Ok(Replica { child, pid, port })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mailpoll::install_crypto_provider();
    let scenario = Scenario::from_env();
    let count = scenario.mailbox_polls;
    let server = BenchPostgres::start().await?;
    let db = TestDatabase::create_on(server.admin_url()).await?;
    mailpoll::db::migrate(&db.pool).await?;
    let kube = KubeEmulator::start().await?;
    let client = kube.client()?;
    cluster::install_crd(&client).await?;
    cluster::create_namespace(&client, NAMESPACE).await?;
    cluster::create_credentials(&client, NAMESPACE, "graph", cluster::valid_client_secret())
        .await?;
    let mailboxes: Vec<String> = (0..count).map(|i| format!("box{i}@contoso.com")).collect();
    let noisy_mailbox = format!("{NOISY}@contoso.com");
    let mut all_mailboxes = mailboxes.clone();
    if scenario.noisy {
        all_mailboxes.push(noisy_mailbox.clone());
    }
    let graph = GraphEmulator::start(EmulatorConfig {
        mailboxes: all_mailboxes,
        ..EmulatorConfig::default()
    })
    .await?;
    for mailbox in mailboxes.iter().step_by(10) {
        graph.add_messages(mailbox, "inbox", 3)?;
    }
    let receiver = WebhookReceiver::start(None).await?;
    let slow_receiver = WebhookReceiver::start(None).await?;
    slow_receiver.set_delay(Some(NOISY_RECEIVER_DELAY));

    let mut replicas = (0..scenario.replicas)
        .map(|i| start_replica(i, &scenario, &db, &kube, &graph))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for replica in &replicas {
        wait_until_ready(replica.port).await?;
    }

    let api: Api<MailboxPoll> = Api::namespaced(client.clone(), NAMESPACE);
    let mut polls = Vec::with_capacity(count + 1);
    if scenario.noisy {
        graph.add_messages(&noisy_mailbox, "inbox", NOISY_BACKLOG)?;
        polls.push(mailbox_poll(
            NOISY,
            &noisy_mailbox,
            scenario.interval_seconds,
            &slow_receiver.url(),
            "30s",
        )?);
    }
    for (i, mailbox) in mailboxes.iter().enumerate() {
        polls.push(mailbox_poll(
            &format!("box{i}"),
            mailbox,
            scenario.interval_seconds,
            &receiver.url(),
            "10s",
        )?);
    }
    let creation = create_all(&api, polls, &db.pool).await?;
    println!(
        "creation: {} MailboxPolls created in {:.1} s; every one had finished its first poll \
         {:.1} s after the first create",
        count + usize::from(scenario.noisy),
        creation.created.as_secs_f64(),
        creation.all_first_polls.as_secs_f64(),
    );
    let noisy = if scenario.noisy {
        Some(uid_of(&api, NOISY).await?)
    } else {
        None
    };
    // The first polls leave work behind them: status writes still in flight, and the
    // reconciles each new MailboxPoll has scheduled a few seconds on; after an interval every
    // MailboxPoll is on its regular schedule. Half an interval more puts the window's edges
    // between the bursts of polls of MailboxPolls created together, not on them, where a
    // burst's polls and their status writes would fall on either side of an edge by chance.
    let settle = Duration::from_secs(scenario.interval_seconds as u64 * 3 / 2);
    println!(
        "measuring the steady state for {:?}, from {settle:?} after creation",
        scenario.window
    );
    tokio::time::sleep(settle).await;
    let replica_pids: Vec<u32> = replicas.iter().map(|replica| replica.pid).collect();
    let window = measure(
        &db.pool,
        &replica_pids,
        &kube,
        &graph,
        &mailboxes,
        noisy,
        scenario.window,
    )
    .await?;
    println!(
        "MailboxPolls: {count} at {}s{}, steady state measured for {:?}, {} replica(s), worker \
         concurrency {} each",
        scenario.interval_seconds,
        if scenario.noisy {
            format!(
                " plus a noisy neighbour ({NOISY_BACKLOG} messages, a receiver taking {}s)",
                NOISY_RECEIVER_DELAY.as_secs()
            )
        } else {
            String::new()
        },
        scenario.window,
        scenario.replicas,
        scenario.concurrency,
    );
    report(&db.pool, &window, &scenario, noisy).await?;
    for (i, replica) in replicas.iter().enumerate() {
        let rss = peak_rss_kib(replica.pid).context("reading a replica's peak RSS")?;
        println!(
            "replica {i}: peak RSS (whole run) {:.1} MiB",
            rss as f64 / 1024.0
        );
    }
    for (i, replica) in replicas.iter().enumerate() {
        print_reconcile_outcomes(i, replica.port).await;
    }
    forced_polls(&api, &db.pool, count.min(30)).await?;

    for replica in &mut replicas {
        if let Some(pid) = replica.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for replica in &mut replicas {
        let _ = tokio::time::timeout(Duration::from_secs(30), replica.child.wait()).await;
    }
    Ok(())
}

async fn uid_of(api: &Api<MailboxPoll>, name: &str) -> anyhow::Result<uuid::Uuid> {
    let poll = api.get(name).await?;
    let uid = poll.metadata.uid.context("a MailboxPoll without a uid")?;
    Ok(uid.parse()?)
}

/// Forces a poll of `tries` MailboxPolls one after another (`kubectl annotate`), while the
/// schedule goes on, and prints the time from the annotation to the start of the poll that
/// served it, in the database's clock.
async fn forced_polls(api: &Api<MailboxPoll>, pool: &PgPool, tries: usize) -> anyhow::Result<()> {
    let mut latencies = Vec::with_capacity(tries);
    let mut timed_out = 0;
    for i in 0..tries {
        let value = format!("bench-{i}-{}", Utc::now().timestamp_micros());
        let annotated = db_now(pool).await?;
        let patch = serde_json::json!({
            "metadata": {"annotations": {POLL_REQUESTED_AT_ANNOTATION: value}}
        });
        api.patch(
            &format!("box{i}"),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .with_context(|| format!("annotating box{i}"))?;
        let started = try_wait_for(
            format!("the poll forced by {value}"),
            Patience::new(Duration::from_secs(60)).every(Duration::from_millis(20)),
            || async {
                sqlx::query_scalar::<_, DateTime<Utc>>(
                    "SELECT started_at FROM polls WHERE poll_request = $1",
                )
                .bind(&value)
                .fetch_optional(pool)
                .await
                .ok()
                .flatten()
            },
        )
        .await;
        match started {
            Ok(started) => latencies.push((started - annotated).as_seconds_f64()),
            Err(_) => {
                // One is enough to tell; the others would wait as long.
                timed_out += 1;
                break;
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "forced polls: annotation to poll start over {tries} tries: p50 {:.3} s, p99 {:.3} s, \
         max {:.3} s; {timed_out} not started within 60 s (then stopped trying)",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    Ok(())
}

/// The leader's reconciles by outcome (`mailpoll_reconciles_total`): failures (a database
/// that keeps the reconciler waiting, say) back a MailboxPoll off and delay its next poll.
async fn print_reconcile_outcomes(index: usize, port: u16) {
    let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return;
    };
    let Ok(text) = response.text().await else {
        return;
    };
    let outcomes: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("mailpoll_reconciles_total"))
        .collect();
    if !outcomes.is_empty() {
        println!("replica {index}: {}", outcomes.join(", "));
    }
}

async fn wait_until_ready(port: u16) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    try_wait_for(
        "the operator to be ready",
        Duration::from_secs(60),
        || async {
            let response = http
                .get(format!("http://127.0.0.1:{port}/readyz"))
                .send()
                .await
                .ok()?;
            response.status().is_success().then_some(())
        },
    )
    .await?;
    Ok(())
}

/// Prints the window's figures: schedule lag, Kubernetes API writes per poll, Postgres CPU
/// per poll, delivery latency, and the noisy neighbour's deliveries.
async fn report(
    pool: &PgPool,
    window: &Window,
    scenario: &Scenario,
    noisy: Option<uuid::Uuid>,
) -> anyhow::Result<()> {
    let lags = lags(pool, window, scenario.interval_seconds, noisy).await?;
    let (overdue, most_overdue) =
        overdue_at_end(pool, window, scenario.interval_seconds, noisy).await?;
    let polls_in_window: i64 =
        sqlx::query_scalar("SELECT count(*) FROM polls WHERE started_at >= $1 AND started_at < $2")
            .bind(window.start)
            .bind(window.end)
            .fetch_one(pool)
            .await?;
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM polls WHERE outcome = 'failed'")
        .fetch_one(pool)
        .await?;
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(pool)
        .await?;
    println!(
        "scheduled polls measured: {} (failed polls over the whole run: {failed}, messages \
         recorded: {messages}); due but not started at the window's end: {overdue} (most \
         overdue {most_overdue:.3} s)",
        lags.len()
    );
    println!(
        "schedule lag (start - due): p50 {:.3} s, p99 {:.3} s, max {:.3} s",
        percentile(&lags, 0.50),
        percentile(&lags, 0.99),
        lags.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "Kubernetes API writes: {} for {polls_in_window} polls = {:.2} per poll ({})",
        window.writes,
        window.writes as f64 / polls_in_window.max(1) as f64,
        window
            .writes_by_kind
            .iter()
            .map(|(kind, count)| format!("{count} {kind}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "objects written most: {}",
        window
            .most_written
            .iter()
            .map(|(object, count)| format!("{object} {count}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let per_poll = |seconds: f64| seconds * 1000.0 / polls_in_window.max(1) as f64;
    println!(
        "Postgres CPU: {:.1} s over the window = {:.2} ms per poll",
        window.postgres_cpu_seconds,
        per_poll(window.postgres_cpu_seconds)
    );
    let total =
        window.postgres_cpu_seconds + window.replicas_cpu_seconds + window.emulators_cpu_seconds;
    println!(
        "CPU per poll: Postgres {:.2} ms, operator replicas {:.2} ms, emulators and benchmark \
         {:.2} ms; {:.2} ms in all, so one core carries about {:.0} polls/s of this load",
        per_poll(window.postgres_cpu_seconds),
        per_poll(window.replicas_cpu_seconds),
        per_poll(window.emulators_cpu_seconds),
        per_poll(total),
        1000.0 / per_poll(total).max(f64::EPSILON),
    );
    if !window.statements.is_empty() {
        println!("statements taking the most Postgres time in the window (pg_stat_statements):");
    }
    for statement in &window.statements {
        println!(
            "  {:>7.3} ms/poll  {:>5.2} calls/poll  {:>7.3} ms/call  {:>6.2} rows/call  {}",
            statement.total_ms / polls_in_window.max(1) as f64,
            statement.calls as f64 / polls_in_window.max(1) as f64,
            statement.total_ms / statement.calls.max(1) as f64,
            statement.rows as f64 / statement.calls.max(1) as f64,
            statement.query
        );
    }
    let noisy_ledger = match noisy {
        Some(uid) => Some(ledger_of(pool, uid).await?),
        None => None,
    };
    let (latencies, undelivered) = delivery_latencies(pool, window, noisy_ledger).await?;
    println!(
        "deliveries of mail arriving in the window (recorded to delivered): {} delivered, p50 \
         {:.3} s, p99 {:.3} s, max {:.3} s; {undelivered} not delivered by the end",
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    if let Some(uid) = noisy_ledger {
        let delivered: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM messages WHERE mailbox_uid = $1 AND webhook_delivered_at IS NOT NULL",
        )
        .bind(uid)
        .fetch_one(pool)
        .await?;
        println!(
            "noisy neighbour: at most {} deliveries in flight at once (sampled each second); \
             {delivered} of {NOISY_BACKLOG} delivered by the end",
            window.noisy_peak_deliveries
        );
    }
    Ok(())
}
