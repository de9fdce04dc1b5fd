//! The webhook wire contract, as literals a receiver would hard-code.
//!
//! Every expected value here is written out, recomputed with this file's own SHA-256 from
//! README's description, or checked with the Standard Webhooks reference crate as a receiver
//! would, never taken from mailpoll's functions or constants.
//! Receivers in the field store idempotency keys and check signatures: a changed key
//! derivation would make them process every message again after an upgrade, a changed header
//! or field name would break them, and the other tests, which compare mailpoll with itself,
//! would not notice.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use chrono::{TimeZone, Utc};
use mailpoll::cursor::Source;
use mailpoll::delivery::endpoint::{Endpoint, WebhookUrl};
use mailpoll::delivery::signing;
use mailpoll::delivery::signing::SigningSecret;
use mailpoll::delivery::webhook::{self, WebhookError};
use mailpoll::directory::MailboxConfig;
use mailpoll::graph::Credentials;
use mailpoll::ledger::{self, DeliveryState, LedgerMessage};
use mailpoll::pipeline::deliver::DeliverHandler;
use mailpoll::pipeline::{DELIVER, DeliverTask};
use mailpoll::queue::{self, NewTask, RetryPolicy, WorkerId, WorkerPool, WorkerPoolConfig};
use mailpoll::telemetry::metrics::Metrics;
use mailpoll_testkit::directory::StaticDirectory;
use mailpoll_testkit::pg::TestDatabase;
use mailpoll_testkit::wait_until;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::{Uuid, uuid};

/// A MailboxPoll's ledger identity (what its keys belong to), distinct from its object's uid.
const LEDGER_IDENTITY: Uuid = uuid!("6f1c2a4e-8b3d-4e5f-9a7b-0c1d2e3f4a5b");
const OBJECT_UID: Uuid = uuid!("0b7e4f2a-3c1d-4e8f-9a6b-5d4c3b2a1f0e");
/// A Graph immutable message id.
const MESSAGE_ID: &str = "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0AAIc1zcKcjUSk5tU4GIdpRwAAAbcdEAAA";
/// The idempotency key of `MESSAGE_ID` in the ledger `LEDGER_IDENTITY`, for ever (derived as
/// [`derived_key`] restates).
const MESSAGE_KEY: &str = "4fdf26ee0ed96779f05fad6d0adeeb13fa8ab71f560ae1e1484cfec2f52233d7";

/// The signing secret as a user stores it in the Secret: `whsec_` and base64 of 32 bytes.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw5bXv8cV9Zw4=";

/// Room for retries, so that a refusal retried by mistake would show.
const MAX_ATTEMPTS: i32 = 3;

/// README: a refusal is recorded with the first 200 characters of the receiver's answer.
const EXCERPT_CHARS: usize = 200;

/// The key derivation, restated: lowercase hex of SHA-256 over the ledger identity's 16 bytes
/// (RFC 4122 order), a `:` and the message id's UTF-8 bytes.
fn derived_key(ledger_identity: Uuid, message_id: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(ledger_identity.as_bytes());
    hasher.update(b":");
    hasher.update(message_id.as_bytes());
    hex::encode(hasher.finalize())
}

#[test]
fn the_idempotency_key_of_a_known_message_never_changes() {
    assert_eq!(
        signing::message_key(LEDGER_IDENTITY, MESSAGE_ID),
        MESSAGE_KEY
    );
    assert_eq!(derived_key(LEDGER_IDENTITY, MESSAGE_ID), MESSAGE_KEY);
}

#[test]
fn the_signature_of_a_known_request_is_the_standards() {
    // The Standard Webhooks specification's own test vector.
    let secret = SigningSecret::parse(b"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").expect("secret");
    assert_eq!(
        secret
            .sign(
                "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
                1649367553,
                br#"{"email":"test@example.com","username":"test_user"}"#
            )
            .as_deref(),
        Some("v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=")
    );
}

/// A receiver standing in for a customer's: keeps every request as it came and answers
/// with a fixed status and body.
#[derive(Clone)]
struct Capture {
    requests: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    answer: (StatusCode, &'static str),
}

impl Capture {
    /// Starts on a free port; returns the receiver and its URL.
    async fn start(status: StatusCode, body: &'static str) -> (Self, String) {
        let capture = Self {
            requests: Arc::default(),
            answer: (status, body),
        };
        let app = axum::Router::new()
            .route("/hook", post(keep))
            .with_state(capture.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let url = format!("http://{}/hook", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (capture, url)
    }

    fn requests(&self) -> Vec<(HeaderMap, Bytes)> {
        self.requests.lock().expect("requests lock").clone()
    }
}

async fn keep(
    State(capture): State<Capture>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    capture
        .requests
        .lock()
        .expect("requests lock")
        .push((headers, body));
    capture.answer
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("header {name} is sent: {headers:?}"))
        .to_str()
        .expect("header is text")
}

fn config(url: String) -> MailboxConfig {
    MailboxConfig {
        ledger_id: LEDGER_IDENTITY,
        source: Source {
            uid: OBJECT_UID,
            namespace: "support".into(),
            name: "support-inbox".into(),
            mailbox: "support@contoso.com".into(),
            folder: "inbox".into(),
        },
        credentials: Credentials::client_secret("contoso", "mailpoll", "not-used-by-deliveries"),
        webhook: Some(Endpoint {
            timeout: Duration::from_secs(5),
            signing_secret: Some(SigningSecret::parse(SECRET.as_bytes()).expect("secret")),
            ..Endpoint::new(WebhookUrl::parse(&url).expect("url"))
        }),
        include_body: true,
        mark_as_read: false,
        move_to_folder: None,
        max_attempts: MAX_ATTEMPTS,
        start: Default::default(),
        filter: None,
        max_concurrent_deliveries: None,
    }
}

/// The message README shows, as a poll records it.
fn invoice() -> LedgerMessage {
    let at = |h, m, s| Utc.with_ymd_and_hms(2025, 3, 4, h, m, s).single();
    LedgerMessage {
        message_id: MESSAGE_ID.into(),
        internet_message_id: Some("<4471@fabrikam.com>".into()),
        subject: Some("Invoice 4471".into()),
        from_address: Some("billing@fabrikam.com".into()),
        from_name: Some("Fabrikam Billing".into()),
        sender_address: Some("noreply@fabrikam.com".into()),
        sender_name: None,
        to_recipients: json!([{"name": "Support", "address": "support@contoso.com"}]),
        cc_recipients: json!([]),
        reply_to: json!([]),
        received_at: at(10, 15, 2),
        sent_at: at(10, 14, 58),
        is_read: Some(false),
        has_attachments: Some(true),
        importance: Some("high".into()),
        conversation_id: Some("AAQkAGI2TG93AAA=".into()),
        parent_folder_id: Some("AQMkAGI2AAAA".into()),
        body_preview: Some("Please find attached".into()),
        body_content_type: Some("html".into()),
        body: Some("<p>Please find attached</p>".into()),
        body_truncated: false,
        raw: json!({ "id": MESSAGE_ID }),
    }
}

/// The JSON document README promises for `invoice()`.
fn invoice_payload() -> Value {
    json!({
        "type": "mailpoll.message.received.v1",
        "key": "4fdf26ee0ed96779f05fad6d0adeeb13fa8ab71f560ae1e1484cfec2f52233d7",
        "mailboxPoll": {
            "namespace": "support",
            "name": "support-inbox",
            "uid": "0b7e4f2a-3c1d-4e8f-9a6b-5d4c3b2a1f0e",
            "mailbox": "support@contoso.com",
            "folder": "inbox"
        },
        "message": {
            "id": "AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0AAIc1zcKcjUSk5tU4GIdpRwAAAbcdEAAA",
            "internetMessageId": "<4471@fabrikam.com>",
            "subject": "Invoice 4471",
            "from": {"name": "Fabrikam Billing", "address": "billing@fabrikam.com"},
            "sender": {"name": null, "address": "noreply@fabrikam.com"},
            "toRecipients": [{"name": "Support", "address": "support@contoso.com"}],
            "ccRecipients": [],
            "replyTo": [],
            "receivedDateTime": "2025-03-04T10:15:02Z",
            "sentDateTime": "2025-03-04T10:14:58Z",
            "isRead": false,
            "hasAttachments": true,
            "importance": "high",
            "conversationId": "AAQkAGI2TG93AAA=",
            "bodyPreview": "Please find attached",
            "body": {"contentType": "html", "content": "<p>Please find attached</p>"},
            "bodyTruncated": false
        }
    })
}

/// Records `message` under `LEDGER_IDENTITY` with its deliver task, as a poll of the
/// MailboxPoll `OBJECT_UID` would.
async fn record(db: &TestDatabase, message: LedgerMessage) {
    let mut tx = db.pool.begin().await.expect("begin");
    let recorded = ledger::record_page(
        &mut tx,
        LEDGER_IDENTITY,
        &[message],
        &[],
        DeliveryState::Pending,
    )
    .await
    .expect("record");
    for message_id in recorded.new_ids {
        let task = NewTask::of(&DeliverTask {
            mailbox_uid: OBJECT_UID,
            message_id,
            ledger_id: Some(LEDGER_IDENTITY),
        })
        .expect("task")
        .max_attempts(MAX_ATTEMPTS);
        queue::enqueue(&mut tx, &task).await.expect("enqueue");
    }
    tx.commit().await.expect("commit");
}

/// Delivers the recorded messages to `url` until the deliver tasks are finished.
async fn deliver_all(db: &TestDatabase, url: String) {
    mailpoll::install_crypto_provider();
    let directory = StaticDirectory::default();
    directory.insert(config(url));
    let handler = DeliverHandler::new(
        db.pool.clone(),
        Arc::new(directory),
        mailpoll_testkit::webhook_receiver::loopback_webhook_client(),
        Arc::new(Metrics::new()),
    );
    let pool = WorkerPool::new(
        db.pool.clone(),
        WorkerPoolConfig {
            worker_id: WorkerId::named("contract"),
            poll_interval: Duration::from_millis(100),
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
    wait_until("deliver tasks finish", Duration::from_secs(30), || async {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state IN ('pending', 'running')")
                .fetch_one(&db.pool)
                .await
                .expect("count");
        open == 0
    })
    .await;
    pool.shutdown().await;
}

#[tokio::test]
async fn a_delivery_is_what_readme_shows() {
    let db = TestDatabase::create().await.expect("test database");
    let (capture, url) = Capture::start(StatusCode::NO_CONTENT, "").await;
    record(&db, invoice()).await;
    deliver_all(&db, url).await;

    let requests = capture.requests();
    assert_eq!(requests.len(), 1, "one POST");
    let (headers, body) = &requests[0];
    assert_eq!(header(headers, "Content-Type"), "application/json");
    assert_eq!(header(headers, "Idempotency-Key"), MESSAGE_KEY);
    assert_eq!(header(headers, "webhook-id"), MESSAGE_KEY);
    assert_eq!(header(headers, "Mailpoll-Delivery-Attempt"), "1");
    let timestamp = header(headers, "webhook-timestamp");
    let sent_at: i64 = timestamp.parse().expect("Unix seconds");
    assert!(
        (Utc::now().timestamp() - sent_at).abs() < 300,
        "the timestamp is the sending time: {timestamp}"
    );
    assert!(
        header(headers, "webhook-signature").starts_with("v1,"),
        "a Standard Webhooks v1 signature"
    );
    // What a receiver does: the reference library, the secret as stored, the raw body.
    standardwebhooks::Webhook::new(SECRET)
        .expect("a Standard Webhooks secret")
        .verify(body, headers)
        .expect("the signature verifies over the raw body as sent");
    let mut ours: Vec<&str> = headers
        .keys()
        .map(|name| name.as_str())
        .filter(|name| name.starts_with("mailpoll-") || name.starts_with("webhook-"))
        .collect();
    ours.sort_unstable();
    assert_eq!(
        ours,
        [
            "mailpoll-delivery-attempt",
            "webhook-id",
            "webhook-signature",
            "webhook-timestamp"
        ]
    );
    let payload: Value = serde_json::from_slice(body).expect("JSON body");
    assert_eq!(payload, invoice_payload());
}

/// Optional fields are `null`, never left out, except `body`, which is absent without one.
#[tokio::test]
async fn a_sparse_message_keeps_every_field_but_the_body() {
    let db = TestDatabase::create().await.expect("test database");
    let (capture, url) = Capture::start(StatusCode::OK, "stored").await;
    record(
        &db,
        LedgerMessage {
            message_id: "AAk=".into(),
            to_recipients: json!([]),
            cc_recipients: json!([]),
            reply_to: json!([]),
            raw: json!({ "id": "AAk=" }),
            ..LedgerMessage::default()
        },
    )
    .await;
    deliver_all(&db, url).await;

    let requests = capture.requests();
    assert_eq!(requests.len(), 1, "one POST");
    let (headers, body) = &requests[0];
    let key = "6ad9379fdfbbb6773582414806ddc0ea2209bb907bfe9d199f93e1ebab49f18a";
    assert_eq!(header(headers, "Idempotency-Key"), key);
    let payload: Value = serde_json::from_slice(body).expect("JSON body");
    assert_eq!(payload["key"], key);
    assert_eq!(
        payload["message"],
        json!({
            "id": "AAk=",
            "internetMessageId": null,
            "subject": null,
            "from": null,
            "sender": null,
            "toRecipients": [],
            "ccRecipients": [],
            "replyTo": [],
            "receivedDateTime": null,
            "sentDateTime": null,
            "isRead": null,
            "hasAttachments": null,
            "importance": null,
            "conversationId": null,
            "bodyPreview": null,
            "bodyTruncated": false
        })
    );
}

/// An answer longer than the excerpt: 199 `a`, then `b` (the 200th character), then more.
fn long_answer() -> &'static str {
    format!("{}bc{}", "a".repeat(199), "d".repeat(100)).leak()
}

/// What is kept of `long_answer()`: its first 200 characters and an ellipsis.
fn long_answer_excerpt() -> String {
    format!("{}b…", "a".repeat(199))
}

#[tokio::test]
async fn a_refusal_keeps_the_first_200_characters_of_the_answer() {
    let (_capture, url) = Capture::start(StatusCode::UNPROCESSABLE_ENTITY, long_answer()).await;
    let endpoint = Endpoint::new(WebhookUrl::parse(&url).expect("url"));
    mailpoll::install_crypto_provider();
    let result = webhook::post(&reqwest::Client::new(), &endpoint, "k", 1, b"{}".to_vec()).await;
    let Err(WebhookError::Rejected { status, excerpt }) = result else {
        panic!("a 422 is a refusal: {result:?}");
    };
    assert_eq!(status, 422);
    assert_eq!(excerpt.chars().count(), EXCERPT_CHARS + 1);
    assert_eq!(excerpt, long_answer_excerpt());
}

#[tokio::test]
async fn a_refused_message_is_failed_with_the_status_and_the_excerpt() {
    let db = TestDatabase::create().await.expect("test database");
    let (capture, url) = Capture::start(StatusCode::BAD_REQUEST, long_answer()).await;
    record(&db, invoice()).await;
    deliver_all(&db, url).await;

    assert_eq!(capture.requests().len(), 1, "a refusal is not retried");
    let task: (String, i32) = sqlx::query_as("SELECT state, attempts FROM tasks")
        .fetch_one(&db.pool)
        .await
        .expect("the deliver task");
    assert_eq!(task, ("dead".to_owned(), 1));
    // The handler records the refusal before its task ends.
    let (state, error): (String, String) = sqlx::query_as(
        "SELECT delivery_state, delivery_error FROM messages
          WHERE mailbox_uid = $1 AND message_id = $2",
    )
    .bind(LEDGER_IDENTITY)
    .bind(MESSAGE_ID)
    .fetch_one(&db.pool)
    .await
    .expect("ledger row");
    assert_eq!(state, "failed");
    assert!(error.contains("HTTP 400"), "{error}");
    let excerpt = long_answer_excerpt();
    assert!(error.ends_with(&format!(": {excerpt}")), "{error}");
}
