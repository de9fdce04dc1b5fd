//! Scheduling at scale: many MailboxPolls at a 30 s interval against the Kubernetes API and
//! Graph emulators, the operator as a real process. Prints the schedule lag (poll start minus
//! due time), the operator's peak RSS and the Kubernetes API writes per poll.
//!
//! ```text
//! DATABASE_URL=postgres://... cargo bench --bench operator                 # 100 for 90 s
//! MAILPOLL_BIG=1 DATABASE_URL=postgres://... cargo bench --bench operator  # 1,000 for 5 min
//! ```

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use kube::Api;
use kube::api::PostParams;
use mailpoll::resource::MailboxPoll;
use mailpoll_testkit::cluster;
use mailpoll_testkit::graph::{EmulatorConfig, GraphEmulator};
use mailpoll_testkit::kube::KubeEmulator;
use mailpoll_testkit::pg::{TestDatabase, free_port};
use mailpoll_testkit::try_wait_for;

const INTERVAL_SECONDS: i64 = 30;

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    mailpoll::install_crypto_provider();
    let big = std::env::var("MAILPOLL_BIG").is_ok_and(|v| v == "1");
    let (count, duration) = if big {
        (1000, Duration::from_secs(300))
    } else {
        (100, Duration::from_secs(90))
    };
    let db = TestDatabase::create().await?;
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

    let api: Api<MailboxPoll> = Api::namespaced(client.clone(), namespace);
    let created_at = Instant::now();
    for (i, mailbox) in mailboxes.iter().enumerate() {
        api.create(
            &PostParams::default(),
            &cluster::mailbox_poll(
                &format!("box{i}"),
                mailbox,
                &format!("{INTERVAL_SECONDS}s"),
                "graph",
            ),
        )
        .await
        .with_context(|| format!("creating box{i}"))?;
    }
    println!(
        "created {count} MailboxPolls in {:?}; measuring for {duration:?}",
        created_at.elapsed()
    );
    // Writes are counted from here: the creations above are the user's, not the operator's.
    kube.clear_requests();
    let window_start: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await?;
    let start = Instant::now();
    let mut peak_rss = 0;
    while start.elapsed() < duration {
        if let Some(rss) = rss_kib(pid) {
            peak_rss = peak_rss.max(rss);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let writes = kube
        .requests()
        .into_iter()
        .filter(|r| matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete"))
        .filter(|r| r.group != "coordination.k8s.io")
        .count();
    let polls_in_window: i64 =
        sqlx::query_scalar("SELECT count(*) FROM polls WHERE started_at >= $1")
            .bind(window_start)
            .fetch_one(&db.pool)
            .await?;
    // Lag of every scheduled poll: its start minus one interval after the previous start.
    let mut lags: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM started_at - (prev + $1 * interval '1 second'))::float8
         FROM (SELECT started_at,
                      lag(started_at) OVER (PARTITION BY mailbox_uid ORDER BY started_at) AS prev
               FROM polls) AS p
         WHERE prev IS NOT NULL",
    )
    .bind(INTERVAL_SECONDS as f64)
    .fetch_all(&db.pool)
    .await?;
    lags.sort_by(f64::total_cmp);
    let failed: i64 = sqlx::query_scalar("SELECT count(*) FROM polls WHERE outcome = 'failed'")
        .fetch_one(&db.pool)
        .await?;
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&db.pool)
        .await?;

    println!(
        "MailboxPolls: {count} at {INTERVAL_SECONDS}s, measured {duration:?}, one replica, worker concurrency {concurrency}"
    );
    println!(
        "scheduled polls measured: {} (failed polls: {failed}, messages recorded: {messages})",
        lags.len()
    );
    println!(
        "schedule lag (start - due): p50 {:.3} s, p99 {:.3} s, max {:.3} s",
        percentile(&lags, 0.50),
        percentile(&lags, 0.99),
        lags.last().copied().unwrap_or(f64::NAN)
    );
    println!("operator peak RSS: {:.1} MiB", peak_rss as f64 / 1024.0);
    println!(
        "Kubernetes API writes: {writes} for {polls_in_window} polls = {:.2} per poll",
        writes as f64 / polls_in_window.max(1) as f64
    );

    if let Some(pid) = operator.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), operator.wait()).await;
    Ok(())
}
