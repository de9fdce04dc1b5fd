//! Pipeline benchmark: ingest of a folder from the Graph emulator into the ledger (pages of
//! 1000, bodies included), and signed webhook deliveries to a local receiver that verifies them.
//! Prints the server's settings, then a Markdown table; fails unless the receiver got every
//! message exactly once, every one correctly signed.
//!
//!   cargo bench --bench pipeline
//!
//! `MAILPOLL_BENCH_MESSAGES` sets the folder size (default 100,000), `MAILPOLL_BENCH_CONCURRENCY`
//! the delivery case's worker concurrency (default 64); `DATABASE_URL` the
//! server (else a private throwaway one is started).

use std::sync::Arc;
use std::time::{Duration, Instant};

use mailpoll::cursor::Source;
use mailpoll::delivery::endpoint::Endpoint;
use mailpoll::directory::MailboxConfig;
use mailpoll::graph::{
    Credentials, DeltaOptions, DeltaStart, Governor, GovernorConfig, GraphClient, GraphConfig,
};
use mailpoll::pipeline::deliver::DeliverHandler;
use mailpoll::pipeline::poll::{PollHandler, PollSettings};
use mailpoll::pipeline::{DELIVER, POLL};
use mailpoll::pipeline::{PollTask, poll_dedupe_key};
use mailpoll::queue::{self, NewTask, WorkerId, WorkerPool, WorkerPoolConfig};
use mailpoll::telemetry::metrics::Metrics;
use mailpoll_testkit::bench::BenchPostgres;
use mailpoll_testkit::directory::StaticDirectory;
use mailpoll_testkit::graph::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT, EmulatorConfig, GraphEmulator,
    NewMessage,
};
use mailpoll_testkit::pg::TestDatabase;
use mailpoll_testkit::webhook_receiver::WebhookReceiver;
use uuid::Uuid;

// The operator binary's allocator, so the figures are the shipped code's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const MAILBOX: &str = "bench@contoso.com";

/// Deliveries are signed as in production, and the receiver verifies every signature.
const SIGNING_SECRET: &str = mailpoll_testkit::webhook_receiver::TEST_SIGNING_SECRET;

/// Worker concurrency of the delivery case (`MAILPOLL_BENCH_CONCURRENCY`, default 64).
fn delivery_concurrency() -> usize {
    std::env::var("MAILPOLL_BENCH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(64)
}

fn messages() -> usize {
    std::env::var("MAILPOLL_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn config(uid: Uuid, webhook: Option<Endpoint>) -> MailboxConfig {
    MailboxConfig {
        ledger_id: uid,
        source: Source {
            uid,
            namespace: "bench".into(),
            name: "bench".into(),
            mailbox: MAILBOX.into(),
            folder: "inbox".into(),
        },
        credentials: Credentials::client_secret(
            DEFAULT_TENANT,
            DEFAULT_CLIENT_ID,
            DEFAULT_CLIENT_SECRET,
        ),
        webhook,
        include_body: true,
        mark_as_read: false,
        move_to_folder: None,
        max_attempts: 8,
        start: Default::default(),
        filter: None,
        max_concurrent_deliveries: None,
    }
}

/// Waits until `counters` (metrics the handlers bump after each commit) add up to `expected`.
/// Reading in-process counters costs nothing; polling `count(*)` on the ledger every few
/// milliseconds took a sizeable share of Postgres's CPU away from the pipeline it measured.
async fn wait_for(counters: &[&prometheus_client::metrics::counter::Counter], expected: u64) {
    while counters.iter().map(|c| c.get()).sum::<u64>() < expected {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One measured poll of the whole folder.
struct Case {
    label: String,
    webhook: Option<Endpoint>,
    concurrency: usize,
    /// Counts the messages done in the ledger, checked once the metrics say all are done.
    done_when: &'static str,
}

impl Case {
    async fn run(
        &self,
        pool: &sqlx::PgPool,
        graph: &GraphClient,
        total: usize,
    ) -> BenchResult<(Duration, i64)> {
        let directory = Arc::new(StaticDirectory::default());
        let uid = Uuid::new_v4();
        directory.insert(config(uid, self.webhook.clone()));
        let metrics = Arc::new(Metrics::new());
        let workers = WorkerPool::new(
            pool.clone(),
            WorkerPoolConfig {
                worker_id: WorkerId::named("bench"),
                concurrency: self.concurrency,
                ..WorkerPoolConfig::default()
            },
        )
        .register(
            POLL,
            PollHandler {
                pool: pool.clone(),
                directory: directory.clone(),
                graph: graph.clone(),
                metrics: metrics.clone(),
                settings: PollSettings {
                    page_size: 1000,
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
                metrics.clone(),
            ),
        )
        .start()?;
        let started = Instant::now();
        let poll = NewTask::new(POLL, serde_json::to_value(PollTask { mailbox_uid: uid })?)
            .owner(uid)
            .dedupe_key(poll_dedupe_key(uid));
        queue::enqueue(pool, &poll).await?;
        // Failed deliveries end the wait too: the ledger check below then reports them, where
        // waiting for deliveries alone would never end.
        let done = if self.webhook.is_some() {
            vec![&metrics.messages_delivered, &metrics.messages_failed]
        } else {
            vec![&metrics.messages_recorded]
        };
        wait_for(&done, total as u64).await;
        let elapsed = started.elapsed();
        workers.shutdown().await;
        let in_ledger: i64 = sqlx::query_scalar(self.done_when)
            .bind(uid)
            .fetch_one(pool)
            .await?;
        if in_ledger != total as i64 {
            return Err(format!(
                "{}: {in_ledger} of {total} messages done in the ledger",
                self.label
            )
            .into());
        }
        let pages: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(pages), 0)::bigint FROM polls WHERE mailbox_uid = $1",
        )
        .bind(uid)
        .fetch_one(pool)
        .await?;
        Ok((elapsed, pages))
    }
}

#[tokio::main]
async fn main() -> BenchResult<()> {
    mailpoll::install_crypto_provider();
    let total = messages();
    let server = BenchPostgres::start().await?;

    let emulator = GraphEmulator::start(EmulatorConfig {
        mailboxes: vec![MAILBOX.into()],
        ..EmulatorConfig::default()
    })
    .await?;
    let body = "<p>".to_owned() + &"Lorem ipsum dolor sit amet. ".repeat(40) + "</p>";
    let seed_started = Instant::now();
    for i in 0..total {
        let message = NewMessage {
            subject: Some(format!("Order {i}")),
            from: Some("orders@fabrikam.com".into()),
            to: vec![MAILBOX.into()],
            body: Some(body.clone()),
            body_is_html: true,
            ..NewMessage::default()
        };
        emulator.add_message(MAILBOX, "inbox", message)?;
    }
    eprintln!("seeded {total} messages in {:?}", seed_started.elapsed());

    let base = emulator.base_url();
    let graph = GraphClient::new(
        GraphConfig::with_urls(&base, &base)?,
        Governor::new(GovernorConfig::default()),
    )?;
    let receiver = WebhookReceiver::start(Some(SIGNING_SECRET)).await?;

    println!("| measurement | messages | seconds | per second | Graph requests |");
    println!("|---|---|---|---|---|");

    // The Graph side alone: the same round read and parsed, nothing recorded. The first read
    // renders every message in the emulator; later rounds serve the rendered text again, as
    // the ledger cases below do.
    for label in ["first read", "again"] {
        let mailbox = graph.mailbox(config(Uuid::nil(), None).credentials, MAILBOX);
        let mut options = DeltaOptions::new(
            "inbox",
            DeltaStart::Initial {
                received_since: None,
            },
        );
        options.page_size = 1000;
        options.include_body = true;
        let started = Instant::now();
        let mut round = mailbox.delta_round(options)?;
        let mut read = 0usize;
        while let Some(page) = round.next_page().await? {
            read += page.messages.len();
        }
        let elapsed = started.elapsed();
        println!(
            "| read the folder from the emulator only (no ledger, {label}) | {read} | {:.2} | {:.0} | {} pages |",
            elapsed.as_secs_f64(),
            read as f64 / elapsed.as_secs_f64(),
            round.pages(),
        );
    }
    let delivery_concurrency = delivery_concurrency();
    let ingest = Case {
        label: "ingest into the ledger (pages of 1000, bodies)".into(),
        webhook: None,
        concurrency: 4,
        done_when: "SELECT count(*) FROM messages WHERE mailbox_uid = $1",
    };
    let deliver = Case {
        label: format!("ingest + webhook delivery (concurrency {delivery_concurrency})"),
        webhook: Some(receiver.endpoint(Some(SIGNING_SECRET)).expect("endpoint")),
        concurrency: delivery_concurrency,
        done_when: "SELECT count(*) FROM messages WHERE mailbox_uid = $1 AND delivery_state = 'delivered'",
    };
    for case in [ingest, deliver] {
        let db = TestDatabase::create_on(server.admin_url()).await?;
        mailpoll::db::migrate(&db.pool).await?;
        emulator.reset_counters();
        let (elapsed, pages) = case.run(&db.pool, &graph, total).await?;
        println!(
            "| {} | {total} | {:.2} | {:.0} | {} for {pages} pages |",
            case.label,
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64(),
            emulator.counters().requests(MAILBOX),
        );
    }
    println!("{}", check_exactly_once(&receiver, total)?);
    Ok(())
}

/// Fails unless the receiver accepted every message exactly once (one success per idempotency
/// key, as many keys as messages) and saw no bad signature; otherwise says what it got.
fn check_exactly_once(receiver: &WebhookReceiver, total: usize) -> BenchResult<String> {
    let successes = receiver.successes();
    let duplicated = successes.values().filter(|&&n| n > 1).count();
    let delivered: u64 = successes.values().map(|&n| u64::from(n)).sum();
    let bad_signatures = receiver.bad_signatures();
    let summary = format!(
        "receiver: {} keys, {delivered} successful deliveries, {duplicated} keys delivered more \
         than once, {bad_signatures} bad signatures, {} requests",
        successes.len(),
        receiver.requests()
    );
    if successes.len() != total || delivered != total as u64 || bad_signatures != 0 {
        return Err(
            format!("expected each of {total} messages delivered once, signed; {summary}").into(),
        );
    }
    Ok(summary)
}
