//! What deliveries carry, end to end: Graph emulator → deliver tasks → webhook receiver.
//! Attachments inline and as metadata within their limits, a Retry-After storm on the
//! attachment endpoints, CloudEvents read back with the SDK's HTTP binding, and raw MIME parsed
//! back as a mail.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use mailpoll::cursor::Source;
use mailpoll::delivery::content::{AttachmentMode, ContentOptions, Format};
use mailpoll::delivery::endpoint::Endpoint;
use mailpoll::delivery::signing::message_key;
use mailpoll::directory::MailboxConfig;
use mailpoll::graph::{Credentials, Governor, GovernorConfig, GraphClient, GraphConfig, Message};
use mailpoll::ledger::{self, DeliveryState, LedgerMessage};
use mailpoll::pipeline::deliver::DeliverHandler;
use mailpoll::pipeline::{DELIVER, DeliverTask, poll::to_ledger};
use mailpoll::queue::{
    self, NewTask, QueueCountersSnapshot, RetryPolicy, WorkerId, WorkerPool, WorkerPoolConfig,
};
use mailpoll::telemetry::metrics::Metrics;
use mailpoll_testkit::directory::StaticDirectory;
use mailpoll_testkit::graph::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT, EmulatorConfig, Faults,
    GraphEmulator, NewAttachment, NewMessage,
};
use mailpoll_testkit::pg::TestDatabase;
use mailpoll_testkit::wait_until;
use mailpoll_testkit::webhook_receiver::cloudevents::{AttributesReader, Data};
use mailpoll_testkit::webhook_receiver::mail_parser::{MessageParser, MimeHeaders};
use mailpoll_testkit::webhook_receiver::{WebhookReceiver, loopback_webhook_client};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

const SECRET: &str = mailpoll_testkit::webhook_receiver::TEST_SIGNING_SECRET;
const MAILBOX: &str = "invoices@contoso.com";

/// The test world: Postgres, the Graph emulator, a receiver and the MailboxPoll's config.
struct World {
    db: TestDatabase,
    graph: GraphEmulator,
    receiver: WebhookReceiver,
    directory: StaticDirectory,
    uid: Uuid,
}

impl World {
    async fn start(faults: Faults, content: ContentOptions) -> Self {
        mailpoll::install_crypto_provider();
        let db = TestDatabase::create().await.expect("test database");
        let graph = GraphEmulator::start(EmulatorConfig {
            mailboxes: vec![MAILBOX.into()],
            faults,
            ..EmulatorConfig::default()
        })
        .await
        .expect("emulator starts");
        let receiver = WebhookReceiver::start(Some(SECRET))
            .await
            .expect("receiver");
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
                ..receiver.endpoint(Some(SECRET)).expect("endpoint")
            }),
            include_body: true,
            mark_as_read: false,
            move_to_folder: None,
            max_attempts: 20,
            start: Default::default(),
            filter: None,
            max_concurrent_deliveries: None,
        });
        Self {
            db,
            graph,
            receiver,
            directory,
            uid,
        }
    }

    /// Adds messages to the mailbox and records them with their deliver tasks, as a poll
    /// would (the ledger row from Graph's own rendering of the message).
    async fn mail(&self, messages: Vec<NewMessage>) -> Vec<String> {
        let mut rows = Vec::new();
        for message in messages {
            let id = self
                .graph
                .add_message(MAILBOX, "inbox", message)
                .expect("message added")
                .immutable_id;
            let rendered = self
                .graph
                .message(MAILBOX, &id)
                .expect("read back")
                .expect("present");
            let parsed = Message::from_value(rendered, 1 << 20).expect("a Graph message");
            rows.push(LedgerMessage {
                message_id: id,
                ..to_ledger(parsed)
            });
        }
        record(&self.db.pool, self.uid, &rows).await
    }

    /// Runs deliver workers until every deliver task has ended; returns what the pool did.
    async fn deliver(&self, governor: GovernorConfig) -> QueueCountersSnapshot {
        let base = self.graph.base_url();
        let client = GraphClient::new(
            GraphConfig::with_urls(&base, &base).expect("config"),
            Governor::new(governor),
        )
        .expect("Graph client");
        let handler = DeliverHandler::new(
            self.db.pool.clone(),
            Arc::new(self.directory.clone()),
            loopback_webhook_client(),
            Arc::new(Metrics::new()),
        )
        .with_graph(client);
        let pool = WorkerPool::new(
            self.db.pool.clone(),
            WorkerPoolConfig {
                worker_id: WorkerId::named("deliver"),
                concurrency: 8,
                lease: Duration::from_secs(30),
                heartbeat_interval: Duration::from_secs(2),
                poll_interval: Duration::from_millis(50),
                retry: RetryPolicy {
                    base: Duration::from_millis(20),
                    cap: Duration::from_millis(100),
                },
                ..WorkerPoolConfig::default()
            },
        )
        .register(DELIVER, handler)
        .start()
        .expect("pool starts");
        let db = &self.db.pool;
        wait_until(
            "every deliver task to end",
            Duration::from_secs(90),
            || async {
                let open: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM tasks WHERE kind = 'deliver'
                     AND state NOT IN ('succeeded', 'dead')",
                )
                .fetch_one(db)
                .await
                .expect("open tasks");
                open == 0
            },
        )
        .await;
        let stats = pool.stats();
        pool.shutdown().await;
        stats
    }

    fn key(&self, id: &str) -> String {
        message_key(self.uid, id)
    }

    fn payload(&self, id: &str) -> Value {
        self.receiver
            .payloads()
            .remove(&self.key(id))
            .unwrap_or_else(|| panic!("no JSON delivery of {id}"))
    }

    /// The `lastModifiedDateTime` the emulator gives the attachments of a message.
    fn modified(&self, id: &str) -> Value {
        self.graph
            .message(MAILBOX, id)
            .expect("read")
            .map_or(Value::Null, |m| m["receivedDateTime"].clone())
    }

    async fn ledger_states(&self) -> BTreeMap<String, i64> {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT delivery_state, count(*) FROM messages WHERE mailbox_uid = $1 GROUP BY 1",
        )
        .bind(self.uid)
        .fetch_all(&self.db.pool)
        .await
        .expect("ledger states")
        .into_iter()
        .collect()
    }

    async fn dead_errors(&self) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT last_error FROM tasks WHERE kind = 'deliver' AND state = 'dead' ORDER BY id",
        )
        .fetch_all(&self.db.pool)
        .await
        .expect("dead tasks")
    }
}

async fn record(pool: &PgPool, uid: Uuid, rows: &[LedgerMessage]) -> Vec<String> {
    let mut tx = pool.begin().await.expect("begin");
    let recorded = ledger::record_page(&mut tx, uid, rows, &[], DeliveryState::Pending)
        .await
        .expect("record");
    let tasks: Vec<NewTask> = recorded
        .new_ids
        .iter()
        .map(|id| {
            NewTask::of(&DeliverTask {
                mailbox_uid: uid,
                message_id: id.clone(),
                ledger_id: None,
            })
            .expect("task")
            .max_attempts(20)
        })
        .collect();
    queue::enqueue_many_on(&mut tx, &tasks)
        .await
        .expect("enqueue");
    tx.commit().await.expect("commit");
    rows.iter().map(|row| row.message_id.clone()).collect()
}

fn quick_governor(max_retries: u32) -> GovernorConfig {
    GovernorConfig {
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(200),
        max_retries,
        ..GovernorConfig::default()
    }
}

fn content(format: Format, attachments: AttachmentMode, each: u64, all: u64) -> ContentOptions {
    ContentOptions {
        format,
        attachments,
        max_attachment_bytes: each,
        max_message_bytes: all,
    }
}

/// `len` bytes with every byte value, starting like a PDF.
fn bytes(len: usize) -> Vec<u8> {
    let mut bytes = b"%PDF-1.7\n".to_vec();
    bytes.extend((0..len.saturating_sub(9)).map(|i| (i % 251) as u8));
    bytes.truncate(len);
    bytes
}

const ARABIC_CYRILLIC_EMOJI: &str = "فاتورة-счёт-請求書 📎.pdf";

/// The expected JSON of an attachment, its id and time taken from what was delivered
/// (the emulator makes them up) after checking they are there.
fn expected(delivered: &Value, modified: &Value, fields: Value) -> Value {
    let id = delivered["id"].as_str().expect("an attachment id");
    assert!(id.starts_with("AAMkAGI2Att"), "{delivered}");
    let mut object = json!({"id": id, "lastModifiedDateTime": modified});
    for (name, value) in fields.as_object().expect("fields") {
        object[name] = value.clone();
    }
    object
}

#[tokio::test]
async fn attachments_inline_within_the_limits_and_metadata_with_a_reason_over_them() {
    let world = World::start(
        Faults::default(),
        content(Format::Json, AttachmentMode::Inline, 2500, 4000),
    )
    .await;
    let logo = vec![0x89, b'P', b'N', b'G', 0, 0xff, 0x10];
    let ids = world
        .mail(vec![
            NewMessage {
                subject: Some("Invoice 4471".into()),
                body: Some("<p>see attached</p><img src=\"cid:logo@fabrikam\">".into()),
                body_is_html: true,
                attachments: vec![
                    NewAttachment::file(ARABIC_CYRILLIC_EMOJI, "application/pdf", bytes(1500)),
                    NewAttachment::inline_image("logo.png", "logo@fabrikam", logo.clone()),
                    NewAttachment::file("scan.tiff", "image/tiff", bytes(3000)),
                    NewAttachment::file("terms.pdf", "application/pdf", bytes(2000)),
                    NewAttachment::file("notes.txt", "text/plain", bytes(500)),
                    NewAttachment::item("Fwd: PO 9912", "PO 9912 approved"),
                    NewAttachment::reference("Q3 forecast.xlsx"),
                ],
                ..NewMessage::default()
            },
            // No attachments: nothing is listed.
            NewMessage::default(),
            // Only an inline image: Graph says hasAttachments false, the body references it.
            NewMessage {
                body: Some("<img src=\"cid:sig@fabrikam\">".into()),
                body_is_html: true,
                attachments: vec![NewAttachment::inline_image(
                    "signature.png",
                    "sig@fabrikam",
                    vec![1, 2, 3],
                )],
                ..NewMessage::default()
            },
            // Deleted from the mailbox before its delivery.
            NewMessage {
                attachments: vec![NewAttachment::file(
                    "gone.pdf",
                    "application/pdf",
                    bytes(10),
                )],
                ..NewMessage::default()
            },
        ])
        .await;
    world
        .graph
        .delete_message(MAILBOX, &ids[3])
        .expect("deleted");
    let modified = world.modified(&ids[0]);

    world.deliver(quick_governor(6)).await;

    assert_eq!(
        world.ledger_states().await,
        BTreeMap::from([("delivered".to_string(), 4)])
    );
    let successes = world.receiver.successes();
    for id in &ids {
        assert_eq!(
            successes.get(&world.key(id)),
            Some(&1),
            "{id} delivered once"
        );
    }
    assert_eq!(world.receiver.bad_signatures(), 0);

    let first = world.payload(&ids[0]);
    let delivered = first["message"]["attachments"]
        .as_array()
        .expect("attachments")
        .clone();
    assert_eq!(delivered.len(), 7);
    let want = [
        json!({"kind": "file", "name": ARABIC_CYRILLIC_EMOJI, "contentType": "application/pdf",
               "size": 1500, "isInline": false, "contentId": null,
               "content": STANDARD.encode(bytes(1500))}),
        json!({"kind": "file", "name": "logo.png", "contentType": "image/png", "size": 7,
               "isInline": true, "contentId": "logo@fabrikam", "content": STANDARD.encode(&logo)}),
        json!({"kind": "file", "name": "scan.tiff", "contentType": "image/tiff", "size": 3000,
               "isInline": false, "contentId": null, "contentOmitted": "tooLarge"}),
        json!({"kind": "file", "name": "terms.pdf", "contentType": "application/pdf",
               "size": 2000, "isInline": false, "contentId": null,
               "content": STANDARD.encode(bytes(2000))}),
        json!({"kind": "file", "name": "notes.txt", "contentType": "text/plain", "size": 500,
               "isInline": false, "contentId": null, "contentOmitted": "messageTooLarge"}),
        json!({"kind": "item", "name": "Fwd: PO 9912", "contentType": null,
               "size": delivered[5]["size"], "isInline": false, "contentId": null,
               "contentOmitted": "notAFile"}),
        json!({"kind": "reference", "name": "Q3 forecast.xlsx", "contentType": null, "size": 0,
               "isInline": false, "contentId": null, "contentOmitted": "notAFile"}),
    ];
    for (index, (delivered, fields)) in delivered.iter().zip(want).enumerate() {
        assert_eq!(
            delivered,
            &expected(delivered, &modified, fields),
            "attachment {index}"
        );
    }
    assert!(first["message"].get("attachmentsUnavailable").is_none());
    assert_eq!(first["message"]["hasAttachments"], true);

    assert_eq!(world.payload(&ids[1])["message"]["attachments"], json!([]));
    let inline_only = world.payload(&ids[2]);
    assert_eq!(inline_only["message"]["hasAttachments"], false);
    let signature = &inline_only["message"]["attachments"][0];
    assert_eq!(signature["contentId"], "sig@fabrikam");
    assert_eq!(signature["isInline"], true);
    assert_eq!(signature["content"], STANDARD.encode([1, 2, 3]));
    let gone = world.payload(&ids[3]);
    assert_eq!(gone["message"]["attachments"], json!([]));
    assert_eq!(gone["message"]["attachmentsUnavailable"], "messageNotFound");

    // One listing per message that has (or references) attachments, one fetch per content
    // delivered: nothing fetched that the limits leave out.
    let counters = world.graph.counters();
    assert_eq!(counters.endpoint(MAILBOX, "attachments"), 3);
    assert_eq!(counters.endpoint(MAILBOX, "attachmentValue"), 4);
    assert_eq!(counters.endpoint(MAILBOX, "attachment"), 0);
}

#[tokio::test]
async fn metadata_mode_describes_every_kind_and_fetches_no_content() {
    let world = World::start(
        Faults::default(),
        content(Format::Json, AttachmentMode::Metadata, 10 << 20, 25 << 20),
    )
    .await;
    let ids = world
        .mail(vec![NewMessage {
            attachments: vec![
                NewAttachment::file("תעודה.pdf", "application/pdf", bytes(64)),
                NewAttachment::item("Fwd: PO 9912", "PO 9912 approved"),
                NewAttachment::reference("Q3 forecast.xlsx"),
            ],
            ..NewMessage::default()
        }])
        .await;
    let modified = world.modified(&ids[0]);
    world.deliver(quick_governor(6)).await;

    let payload = world.payload(&ids[0]);
    let delivered = payload["message"]["attachments"]
        .as_array()
        .expect("attachments")
        .clone();
    let want = [
        json!({"kind": "file", "name": "תעודה.pdf", "contentType": "application/pdf",
               "size": 64, "isInline": false, "contentId": null}),
        json!({"kind": "item", "name": "Fwd: PO 9912", "contentType": null,
               "size": delivered[1]["size"], "isInline": false, "contentId": null}),
        json!({"kind": "reference", "name": "Q3 forecast.xlsx", "contentType": null,
               "size": 0, "isInline": false, "contentId": null}),
    ];
    assert_eq!(delivered.len(), 3);
    for (delivered, fields) in delivered.iter().zip(want) {
        assert_eq!(delivered, &expected(delivered, &modified, fields));
    }
    assert!(delivered[1]["size"].as_u64().is_some_and(|size| size > 0));
    let counters = world.graph.counters();
    assert_eq!(counters.endpoint(MAILBOX, "attachments"), 1);
    assert_eq!(counters.endpoint(MAILBOX, "attachmentValue"), 0);
}

#[tokio::test]
async fn a_retry_after_storm_on_attachments_loses_nothing_and_stays_polite() {
    const MESSAGES: usize = 24;
    let world = World::start(
        Faults {
            attachment_storm: 8,
            retry_after_secs: 1,
            ..Faults::default()
        },
        content(Format::Json, AttachmentMode::Inline, 10 << 20, 25 << 20),
    )
    .await;
    let ids = world
        .mail(
            (0..MESSAGES)
                .map(|i| NewMessage {
                    subject: Some(format!("Invoice {i}")),
                    attachments: vec![NewAttachment::file(
                        &format!("invoice-{i}.pdf"),
                        "application/pdf",
                        bytes(100 + i),
                    )],
                    ..NewMessage::default()
                })
                .collect(),
        )
        .await;
    // No retries in the client: every 429 reaches the task, which must snooze on it.
    let stats = world.deliver(quick_governor(0)).await;

    assert_eq!(
        world.ledger_states().await,
        BTreeMap::from([("delivered".to_string(), MESSAGES as i64)]),
        "dead tasks: {:?}",
        world.dead_errors().await
    );
    let successes = world.receiver.successes();
    assert_eq!(successes.len(), MESSAGES);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            successes.get(&world.key(id)),
            Some(&1),
            "{id} delivered once"
        );
        let attachment = &world.payload(id)["message"]["attachments"][0];
        assert_eq!(attachment["content"], STANDARD.encode(bytes(100 + i)));
    }
    let counters = world.graph.counters();
    let storm: Vec<_> = counters
        .throttles
        .iter()
        .filter(|throttle| throttle.status == 429)
        .collect();
    assert!(storm.len() >= 8, "the storm was met: {storm:?}");
    assert_eq!(
        world.graph.faults().attachment_storm,
        0,
        "every storm order served"
    );
    // Each 429 postponed its delivery once; none counted as a failed attempt.
    assert_eq!(stats.snoozed, storm.len() as u64, "{stats:?}");
    assert_eq!(stats.retried, 0, "{stats:?}");
    assert_eq!(stats.dead, 0, "{stats:?}");
    // Polite: after a Retry-After reached the client, nothing more until it ran out (requests
    // already on their way when the 429 left are allowed a moment).
    let early = counters.early_requests(Duration::from_millis(150));
    assert!(early.is_empty(), "requests during a Retry-After: {early:?}");
    assert!(counters.peak_concurrency(MAILBOX) <= 4);
}

#[tokio::test]
async fn cloudevents_deliveries_are_read_by_the_sdks_http_binding() {
    let world = World::start(
        Faults::default(),
        content(
            Format::Cloudevents,
            AttachmentMode::Metadata,
            10 << 20,
            25 << 20,
        ),
    )
    .await;
    let ids = world
        .mail(vec![
            NewMessage {
                subject: Some("PO 9912 approved".into()),
                attachments: vec![NewAttachment::file("po.pdf", "application/pdf", bytes(20))],
                ..NewMessage::default()
            },
            NewMessage::default(),
        ])
        .await;
    world.deliver(quick_governor(6)).await;

    assert_eq!(world.receiver.bad_signatures(), 0);
    for id in &ids {
        let key = world.key(id);
        let event = world
            .receiver
            .cloudevent_of(&key)
            .expect("delivered")
            .expect("a CloudEvent");
        assert_eq!(event.specversion().as_str(), "1.0");
        assert_eq!(event.id(), key);
        assert_eq!(
            event.source().as_str(),
            "/apis/mailpoll.dev/v1alpha1/namespaces/finance/mailboxpolls/invoices"
        );
        assert_eq!(event.ty(), "dev.mailpoll.message.received.v1");
        assert_eq!(event.subject(), Some(id.as_str()));
        assert_eq!(event.datacontenttype(), Some("application/json"));
        let received = world
            .graph
            .message(MAILBOX, id)
            .expect("read")
            .expect("there")["receivedDateTime"]
            .clone();
        assert_eq!(
            event
                .time()
                .map(|time| time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            received.as_str().map(str::to_string)
        );
        let data = match event.data().expect("data") {
            Data::Json(value) => value.clone(),
            Data::Binary(bytes) => serde_json::from_slice(bytes).expect("JSON data"),
            Data::String(text) => serde_json::from_str(text).expect("JSON data"),
        };
        // The data is the json format's payload, unchanged.
        assert_eq!(data, world.payload(id));
        assert_eq!(data["key"], key);
        let headers = world.receiver.headers_of(&key).expect("headers");
        assert_eq!(headers["idempotency-key"], key.as_str());
        assert_eq!(headers["webhook-id"], key.as_str());
    }
    assert_eq!(
        world.payload(&ids[0])["message"]["attachments"][0]["name"],
        "po.pdf"
    );
}

#[tokio::test]
async fn mime_deliveries_parse_back_as_the_message_and_oversized_ones_fail_alone() {
    let world = World::start(
        Faults::default(),
        content(Format::Mime, AttachmentMode::None, 10_000, 20_000),
    )
    .await;
    let ids = world
        .mail(vec![
            NewMessage {
                subject: Some("Счёт 4471 🧾".into()),
                from: Some("billing@fabrikam.com".into()),
                body: Some("Invoice attached.\r\n".into()),
                attachments: vec![
                    NewAttachment::file(ARABIC_CYRILLIC_EMOJI, "application/pdf", bytes(3000)),
                    NewAttachment::inline_image("logo.png", "logo@fabrikam", vec![9, 8, 7]),
                ],
                ..NewMessage::default()
            },
            NewMessage {
                subject: Some("Too big".into()),
                attachments: vec![NewAttachment::file(
                    "big.bin",
                    "application/octet-stream",
                    bytes(30_000),
                )],
                ..NewMessage::default()
            },
            NewMessage {
                subject: Some("Deleted before delivery".into()),
                ..NewMessage::default()
            },
        ])
        .await;
    world
        .graph
        .delete_message(MAILBOX, &ids[2])
        .expect("deleted");
    world.deliver(quick_governor(6)).await;

    assert_eq!(
        world.ledger_states().await,
        BTreeMap::from([("delivered".to_string(), 1), ("failed".to_string(), 2)])
    );
    let errors = world.dead_errors().await;
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("over spec.delivery.webhook.maxMessageBytes (20000)")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("no longer exists in the mailbox")),
        "{errors:?}"
    );

    let key = world.key(&ids[0]);
    assert_eq!(world.receiver.successes().get(&key), Some(&1));
    assert_eq!(world.receiver.bad_signatures(), 0);
    let headers = world.receiver.headers_of(&key).expect("headers");
    assert_eq!(headers["content-type"], "message/rfc822");
    assert_eq!(headers["idempotency-key"], key.as_str());
    assert_eq!(headers["mailpoll-message-id"], ids[0].as_str());
    assert_eq!(headers["mailpoll-mailbox-poll"], "finance/invoices");
    let raw = world.receiver.body_of(&key).expect("body");
    let mail = MessageParser::default().parse(&raw[..]).expect("a mail");
    assert_eq!(mail.subject(), Some("Счёт 4471 🧾"));
    assert_eq!(
        mail.from()
            .and_then(|from| from.first())
            .and_then(|a| a.address()),
        Some("billing@fabrikam.com")
    );
    assert_eq!(mail.body_text(0).as_deref(), Some("Invoice attached.\r\n"));
    let attachments: Vec<_> = mail.attachments().collect();
    assert_eq!(attachments.len(), 2);
    assert_eq!(attachments[0].content_id(), Some("logo@fabrikam"));
    assert_eq!(attachments[0].contents(), &[9, 8, 7]);
    assert_eq!(
        attachments[1].attachment_name(),
        Some(ARABIC_CYRILLIC_EMOJI)
    );
    assert_eq!(attachments[1].contents(), bytes(3000).as_slice());
    let counters = world.graph.counters();
    assert_eq!(
        counters.endpoint(MAILBOX, "value"),
        3,
        "one MIME read per message"
    );
}
