//! What attachments cost a delivery: the same messages (each with one PDF) delivered with
//! `attachments: none`, `metadata` and `inline`, then as `mime`, through the Graph emulator and
//! a signing-checking receiver on loopback. Prints a Markdown table: messages per second, Graph
//! requests per message, bytes received per message. Fails if any message is not delivered
//! exactly once.
//!
//!   cargo bench --bench content      # MAILPOLL_BENCH_MESSAGES=N (default 500),
//!                                    # MAILPOLL_BENCH_ATTACHMENT_BYTES=N (default 200,000)
//!
//! Uses the Postgres of `DATABASE_URL` when set, else a private throwaway server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mailpoll::cursor::Source;
use mailpoll::delivery::content::{AttachmentMode, ContentOptions, Format};
use mailpoll::delivery::endpoint::Endpoint;
use mailpoll::directory::MailboxConfig;
use mailpoll::graph::{Credentials, Governor, GovernorConfig, GraphClient, GraphConfig, Message};
use mailpoll::ledger::{self, DeliveryState, LedgerMessage};
use mailpoll::pipeline::deliver::DeliverHandler;
use mailpoll::pipeline::{DELIVER, DeliverTask, poll::to_ledger};
use mailpoll::queue::{self, NewTask, WorkerId, WorkerPool, WorkerPoolConfig};
use mailpoll::telemetry::metrics::Metrics;
use mailpoll_testkit::bench::BenchPostgres;
use mailpoll_testkit::directory::StaticDirectory;
use mailpoll_testkit::graph::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT, EmulatorConfig, GraphEmulator,
    NewAttachment, NewMessage,
};
use mailpoll_testkit::pg::TestDatabase;
use mailpoll_testkit::webhook_receiver::{
    TEST_SIGNING_SECRET, WebhookReceiver, loopback_webhook_client,
};
use uuid::Uuid;

// The operator binary's allocator, so the figures are the shipped code's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const MAILBOX: &str = "invoices@contoso.com";

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// One case: a fresh database, the messages recorded with their deliver tasks, a pool of 16
/// delivering them; returns the seconds it took.
async fn run_case(
    server: &BenchPostgres,
    emulator: &GraphEmulator,
    ids: &[String],
    content: ContentOptions,
) -> BenchResult<(f64, WebhookReceiver)> {
    let db = TestDatabase::create_on(server.admin_url()).await?;
    mailpoll::db::migrate(&db.pool).await?;
    let receiver = WebhookReceiver::start(Some(TEST_SIGNING_SECRET)).await?;
    let uid = Uuid::new_v4();
    let directory = StaticDirectory::default();
    directory.insert(MailboxConfig {
        ledger_id: uid,
        source: Source {
            uid,
            namespace: "finance".into(),
            name: "invoices".into(),
            mailbox: MAILBOX.into(),
            folder: "inbox".into(),
        },
        credentials: Credentials::client_secret(
            DEFAULT_TENANT,
            DEFAULT_CLIENT_ID,
            DEFAULT_CLIENT_SECRET,
        ),
        webhook: Some(Endpoint {
            content,
            timeout: Duration::from_secs(60),
            ..receiver.endpoint(Some(TEST_SIGNING_SECRET))?
        }),
        include_body: false,
        mark_as_read: false,
        move_to_folder: None,
        max_attempts: 8,
        start: Default::default(),
        filter: None,
        max_concurrent_deliveries: None,
    });
    let mut rows = Vec::with_capacity(ids.len());
    for id in ids {
        let rendered = emulator.message(MAILBOX, id)?.ok_or("message missing")?;
        let parsed = Message::from_value(rendered, 1 << 20).map_err(|e| format!("{e:?}"))?;
        rows.push(LedgerMessage {
            message_id: id.clone(),
            ..to_ledger(parsed)
        });
    }
    let mut tx = db.pool.begin().await?;
    ledger::record_page(&mut tx, uid, &rows, &[], DeliveryState::Pending).await?;
    let tasks = ids
        .iter()
        .map(|id| {
            NewTask::of(&DeliverTask {
                mailbox_uid: uid,
                message_id: id.clone(),
                ledger_id: None,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    queue::enqueue_many_on(&mut tx, &tasks).await?;
    tx.commit().await?;

    let base = emulator.base_url();
    let graph = GraphClient::new(
        GraphConfig::with_urls(&base, &base)?,
        Governor::new(GovernorConfig::default()),
    )?;
    let handler = DeliverHandler::new(
        db.pool.clone(),
        Arc::new(directory),
        loopback_webhook_client(),
        Arc::new(Metrics::new()),
    )
    .with_graph(graph);
    let started = Instant::now();
    let pool = WorkerPool::new(
        db.pool.clone(),
        WorkerPoolConfig {
            worker_id: WorkerId::named("bench"),
            concurrency: 16,
            poll_interval: Duration::from_millis(50),
            ..WorkerPoolConfig::default()
        },
    )
    .register(DELIVER, handler)
    .start()?;
    while receiver.successes().len() < ids.len() {
        if started.elapsed() > Duration::from_secs(600) {
            return Err("deliveries did not finish within 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    pool.shutdown().await;
    let successes = receiver.successes();
    if successes.len() != ids.len() || successes.values().any(|&count| count != 1) {
        return Err(format!("deliveries not exactly once: {} keys", successes.len()).into());
    }
    if receiver.bad_signatures() != 0 {
        return Err("bad signatures".into());
    }
    Ok((seconds, receiver))
}

#[tokio::main]
async fn main() -> BenchResult<()> {
    mailpoll::install_crypto_provider();
    let messages = setting("MAILPOLL_BENCH_MESSAGES", 500);
    let attachment_bytes = setting("MAILPOLL_BENCH_ATTACHMENT_BYTES", 200_000);
    let server = BenchPostgres::start().await?;
    let emulator = GraphEmulator::start(EmulatorConfig {
        mailboxes: vec![MAILBOX.into()],
        ..EmulatorConfig::default()
    })
    .await?;
    let pdf: Vec<u8> = (0..attachment_bytes).map(|i| (i % 251) as u8).collect();
    let mut ids = Vec::with_capacity(messages);
    for i in 0..messages {
        let message = NewMessage {
            subject: Some(format!("Invoice {i}")),
            attachments: vec![NewAttachment::file(
                &format!("invoice-{i}.pdf"),
                "application/pdf",
                pdf.clone(),
            )],
            ..NewMessage::default()
        };
        ids.push(
            emulator
                .add_message(MAILBOX, "inbox", message)?
                .immutable_id,
        );
    }
    println!("{messages} messages, one {attachment_bytes}-byte PDF each, pool concurrency 16");
    println!();
    println!(
        "| format / attachments | seconds | messages per second | Graph requests per message | bytes received per message |"
    );
    println!("|---|---|---|---|---|");
    let cases = [
        ("json / none", Format::Json, AttachmentMode::None),
        ("json / metadata", Format::Json, AttachmentMode::Metadata),
        ("json / inline", Format::Json, AttachmentMode::Inline),
        (
            "cloudevents / inline",
            Format::Cloudevents,
            AttachmentMode::Inline,
        ),
        ("mime", Format::Mime, AttachmentMode::None),
    ];
    for (label, format, attachments) in cases {
        emulator.reset_counters();
        let content = ContentOptions {
            format,
            attachments,
            ..ContentOptions::default()
        };
        let (seconds, receiver) = run_case(&server, &emulator, &ids, content).await?;
        let requests = emulator.counters().requests(MAILBOX);
        let bytes = receiver_bytes(&receiver);
        println!(
            "| {label} | {seconds:.2} | {:.0} | {:.2} | {:.0} |",
            messages as f64 / seconds,
            requests as f64 / messages as f64,
            bytes as f64 / messages as f64,
        );
    }
    Ok(())
}

/// Every body the receiver kept, in bytes.
fn receiver_bytes(receiver: &WebhookReceiver) -> usize {
    receiver
        .successes()
        .keys()
        .filter_map(|key| receiver.body_of(key))
        .map(|body| body.len())
        .sum()
}
