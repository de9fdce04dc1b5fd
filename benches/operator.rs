//! Scheduling at scale: many MailboxPolls at a 30 s interval against the Kubernetes API and
//! Graph emulators, the operator as a real process. Prints the server's settings, the creation
//! phase (creating the MailboxPolls until each has finished its first poll), then, for a
//! window that starts an interval and a half after creation is over, the schedule lag (poll start minus
//! due time) and the Kubernetes API writes per poll; the operator's peak RSS over the whole
//! run; and how soon a forced poll (`kubectl annotate`) starts.
//!
//! ```text
//! cargo bench --bench operator                 # 100 for 90 s
//! MAILPOLL_BIG=1 cargo bench --bench operator  # 1,000 for 5 min
//! ```
//!
//! Uses the Postgres of `DATABASE_URL` when set, else starts a private throwaway server.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use mailpoll::resource::{MailboxPoll, POLL_REQUESTED_AT_ANNOTATION};
use mailpoll_testkit::bench::BenchPostgres;
use mailpoll_testkit::cluster;
use mailpoll_testkit::graph::{EmulatorConfig, GraphEmulator};
use mailpoll_testkit::kube::KubeEmulator;
use mailpoll_testkit::pg::{TestDatabase, free_port};
use mailpoll_testkit::{Patience, try_wait_for};
use sqlx::PgPool;

const INTERVAL_SECONDS: i64 = 30;

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

/// How long creating the MailboxPolls took, and until every one had finished its first poll.
struct Creation {
    created: Duration,
    all_first_polls: Duration,
}

/// Creates one MailboxPoll per mailbox, then waits until each has finished its first poll:
/// that burst of first polls, and the status writes it makes, belong to creation, not to the
/// steady schedule measured after it.
async fn create_all(
    api: &Api<MailboxPoll>,
    mailboxes: &[String],
    pool: &PgPool,
) -> anyhow::Result<Creation> {
    let started = Instant::now();
    for (i, mailbox) in mailboxes.iter().enumerate() {
        let poll = cluster::mailbox_poll(
            &format!("box{i}"),
            mailbox,
            &format!("{INTERVAL_SECONDS}s"),
            "graph",
        );
        api.create(&PostParams::default(), &poll)
            .await
            .with_context(|| format!("creating box{i}"))?;
    }
    let created = started.elapsed();
    let patience = Patience::new(Duration::from_secs(120 + mailboxes.len() as u64 / 5))
        .every(Duration::from_millis(250));
    try_wait_for("every MailboxPoll's first poll", patience, || async {
        let polled: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT mailbox_uid) FROM polls WHERE finished_at IS NOT NULL",
        )
        .fetch_one(pool)
        .await
        .ok()?;
        (polled >= mailboxes.len() as i64).then_some(())
    })
    .await?;
    Ok(Creation {
        created,
        all_first_polls: started.elapsed(),
    })
}

/// The steady-state window, in the database's clock, and what was sampled during it.
struct Window {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    peak_rss_kib: u64,
    writes: usize,
}

/// Lets the operator run for `duration`, counting its Kubernetes API writes from the start of
/// the window (the MailboxPolls' creations are the user's, and creation is over).
async fn measure(
    pool: &PgPool,
    kube: &KubeEmulator,
    pid: u32,
    duration: Duration,
) -> anyhow::Result<Window> {
    kube.clear_requests();
    let start = db_now(pool).await?;
    tokio::time::sleep(duration).await;
    let end = db_now(pool).await?;
    let peak_rss_kib = peak_rss_kib(pid).context("reading the operator's peak RSS")?;
    let writes = kube
        .requests()
        .into_iter()
        .filter(|r| matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete"))
        .filter(|r| r.group != "coordination.k8s.io")
        .count();
    Ok(Window {
        start,
        end,
        peak_rss_kib,
        writes,
    })
}

/// Lag of every scheduled poll due inside the window and started before its end: its start
/// minus one interval after the previous start.
async fn lags(pool: &PgPool, window: &Window) -> anyhow::Result<Vec<f64>> {
    let mut lags: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM started_at - due)::float8
         FROM (SELECT started_at,
                      lag(started_at) OVER (PARTITION BY mailbox_uid ORDER BY started_at)
                          + $1 * interval '1 second' AS due
               FROM polls) AS p
         WHERE due >= $2 AND started_at < $3",
    )
    .bind(INTERVAL_SECONDS as f64)
    .bind(window.start)
    .bind(window.end)
    .fetch_all(pool)
    .await?;
    lags.sort_by(f64::total_cmp);
    Ok(lags)
}

/// Polls due before the window's end that had not started by then, and the most overdue in
/// seconds: lags the measured ones cannot show, as those polls have no start yet.
async fn overdue_at_end(pool: &PgPool, window: &Window) -> anyhow::Result<(i64, f64)> {
    let (count, most): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), max(EXTRACT(EPOCH FROM $2 - due))::float8
         FROM (SELECT max(started_at) + $1 * interval '1 second' AS due
               FROM polls WHERE started_at < $2 GROUP BY mailbox_uid) AS last
         WHERE due < $2",
    )
    .bind(INTERVAL_SECONDS as f64)
    .bind(window.end)
    .fetch_one(pool)
    .await?;
    Ok((count, most.unwrap_or(0.0)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mailpoll::install_crypto_provider();
    let big = std::env::var("MAILPOLL_BIG").is_ok_and(|v| v == "1");
    let (count, duration) = if big {
        (1000, Duration::from_secs(300))
    } else {
        (100, Duration::from_secs(90))
    };
    let server = BenchPostgres::start().await?;
    let db = TestDatabase::create_on(server.admin_url()).await?;
    mailpoll::db::migrate(&db.pool).await?;
    let kube = KubeEmulator::start().await?;
    let client = kube.client()?;
    cluster::install_crd(&client).await?;
    let namespace = "bench";
    cluster::create_namespace(&client, namespace).await?;
    cluster::create_credentials(&client, namespace, "graph", cluster::valid_client_secret())
        .await?;
    let mailboxes: Vec<String> = (0..count).map(|i| format!("box{i}@contoso.com")).collect();
    let graph = GraphEmulator::start(EmulatorConfig {
        mailboxes: mailboxes.clone(),
        ..EmulatorConfig::default()
    })
    .await?;
    for mailbox in mailboxes.iter().step_by(10) {
        graph.add_messages(mailbox, "inbox", 3)?;
    }

    // Polls mostly wait on Graph and Postgres: one replica needs about (polls per second) x
    // (seconds per poll) of them in flight.
    let concurrency =
        std::env::var("MAILPOLL_WORKER_CONCURRENCY").unwrap_or_else(|_| "64".to_owned());
    let port = free_port()?;
    let mut operator = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailpoll"))
        .args(["operator", "--http-addr", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", &db.url)
        .env("KUBECONFIG", kube.kubeconfig_path())
        .env("MAILPOLL_LEASE_NAMESPACE", namespace)
        .env("MAILPOLL_GRAPH_AUTHORITY_URL", graph.base_url())
        .env("MAILPOLL_GRAPH_URL", graph.base_url())
        .env("MAILPOLL_LOG", "error")
        .env("MAILPOLL_WORKER_CONCURRENCY", &concurrency)
        .env("MAILPOLL_DB_MAX_CONNECTIONS", "40")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the operator")?;
    let pid = operator.id().context("operator pid")?;
    wait_until_ready(port).await?;

    let api: Api<MailboxPoll> = Api::namespaced(client.clone(), namespace);
    let creation = create_all(&api, &mailboxes, &db.pool).await?;
    println!(
        "creation: {count} MailboxPolls created in {:.1} s; every one had finished its first \
         poll {:.1} s after the first create",
        creation.created.as_secs_f64(),
        creation.all_first_polls.as_secs_f64(),
    );
    // The first polls leave work behind them: status writes still in flight, and the
    // reconciles each new MailboxPoll has scheduled a few seconds on; after an interval every
    // MailboxPoll is on its regular schedule. Half an interval more puts the window's edges
    // between the bursts of polls of MailboxPolls created together, not on them, where a
    // burst's polls and their status writes would fall on either side of an edge by chance.
    let settle = Duration::from_secs(INTERVAL_SECONDS as u64 * 3 / 2);
    println!("measuring the steady state for {duration:?}, from {settle:?} after creation");
    tokio::time::sleep(settle).await;
    let window = measure(&db.pool, &kube, pid, duration).await?;
    println!(
        "MailboxPolls: {count} at {INTERVAL_SECONDS}s, steady state measured for {duration:?}, \
         one replica, worker concurrency {concurrency}"
    );
    report(&db.pool, &window).await?;
    forced_polls(&api, &db.pool, count.min(30)).await?;

    if let Some(pid) = operator.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), operator.wait()).await;
    Ok(())
}

/// Forces a poll of `tries` MailboxPolls one after another (`kubectl annotate`), while the
/// schedule goes on, and prints the time from the annotation to the start of the poll that
/// served it, in the database's clock.
async fn forced_polls(api: &Api<MailboxPoll>, pool: &PgPool, tries: usize) -> anyhow::Result<()> {
    let mut latencies = Vec::with_capacity(tries);
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
        .await?;
        latencies.push((started - annotated).as_seconds_f64());
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "forced polls: annotation to poll start over {tries} tries: p50 {:.3} s, p99 {:.3} s, \
         max {:.3} s",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
    Ok(())
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

/// Prints the window's figures: schedule lag, RSS, Kubernetes API writes per poll.
async fn report(pool: &PgPool, window: &Window) -> anyhow::Result<()> {
    let lags = lags(pool, window).await?;
    let (overdue, most_overdue) = overdue_at_end(pool, window).await?;
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
        "operator peak RSS (whole run): {:.1} MiB",
        window.peak_rss_kib as f64 / 1024.0
    );
    println!(
        "Kubernetes API writes: {} for {polls_in_window} polls = {:.2} per poll",
        window.writes,
        window.writes as f64 / polls_in_window.max(1) as f64
    );
    Ok(())
}
