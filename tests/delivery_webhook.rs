//! The webhook POST against the test receiver: signature, idempotency key, verdicts, the egress
//! policy, and receivers that misbehave.

use std::time::{Duration, Instant};

use mailpoll::delivery::egress::{self, EgressPolicy, GuardedClient};
use mailpoll::delivery::endpoint::{Endpoint, ExtraHeaders, WebhookUrl};
use mailpoll::delivery::signing::message_key;
use mailpoll::delivery::webhook::{self, WebhookError};
use mailpoll_testkit::webhook_receiver::{
    FixedLookup, HOSTILE_BODY_FILL, Hostile, TEST_SIGNING_SECRET, WebhookReceiver,
    loopback_webhook_client,
};
use uuid::Uuid;

/// Another valid Standard Webhooks secret.
const OTHER_SECRET: &str = "whsec_3q2+7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

fn endpoint(receiver: &WebhookReceiver, secret: Option<&str>) -> Endpoint {
    Endpoint {
        timeout: Duration::from_secs(2),
        ..receiver.endpoint(secret).expect("endpoint")
    }
}

fn client() -> reqwest::Client {
    mailpoll::install_crypto_provider();
    reqwest::Client::new()
}

#[tokio::test]
async fn signed_delivery_is_counted_once_per_key() {
    let receiver = WebhookReceiver::start(Some(TEST_SIGNING_SECRET))
        .await
        .expect("receiver");
    let key = message_key(Uuid::new_v4(), "AAk=");
    let endpoint = endpoint(&receiver, Some(TEST_SIGNING_SECRET));
    let status = webhook::post(&client(), &endpoint, &key, 1, br#"{"n":1}"#.to_vec())
        .await
        .expect("delivered");
    assert!(status.is_success());
    assert_eq!(receiver.successes().get(&key), Some(&1));
    assert_eq!(receiver.bad_signatures(), 0);
}

#[tokio::test]
async fn extra_headers_from_a_secret_are_sent_and_cannot_replace_the_contract() {
    let receiver = WebhookReceiver::start(Some(TEST_SIGNING_SECRET))
        .await
        .expect("receiver");
    let mut endpoint = endpoint(&receiver, Some(TEST_SIGNING_SECRET));
    endpoint.headers = ExtraHeaders::from_secret_data([
        ("Authorization", b"Bearer s3cr3t\n".as_slice()),
        ("x-api-key", b"k3y".as_slice()),
    ])
    .expect("headers");
    webhook::post(&client(), &endpoint, "k", 1, br#"{"n":1}"#.to_vec())
        .await
        .expect("delivered");
    let headers = receiver.headers_of("k").expect("delivered once");
    assert_eq!(headers["authorization"], "Bearer s3cr3t");
    assert_eq!(headers["x-api-key"], "k3y");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers.get_all("webhook-id").iter().count(), 1);
    assert!(
        ExtraHeaders::from_secret_data([("webhook-id", b"forged".as_slice())]).is_err(),
        "a Secret cannot forge the contract's headers"
    );
}

#[tokio::test]
async fn wrong_signing_key_is_refused_permanently() {
    let receiver = WebhookReceiver::start(Some(TEST_SIGNING_SECRET))
        .await
        .expect("receiver");
    let result = webhook::post(
        &client(),
        &endpoint(&receiver, Some(OTHER_SECRET)),
        "k",
        1,
        b"{}".to_vec(),
    )
    .await;
    assert!(
        matches!(result, Err(WebhookError::Rejected { status: 401, .. })),
        "{result:?}"
    );
    assert_eq!(receiver.bad_signatures(), 1);
    assert!(receiver.successes().is_empty());
}

#[tokio::test]
async fn rejections_are_permanent_and_outages_retryable() {
    let receiver = WebhookReceiver::start(None).await.expect("receiver");
    let endpoint = endpoint(&receiver, None);
    receiver.reject("refused");
    match webhook::post(&client(), &endpoint, "refused", 1, b"{}".to_vec()).await {
        Err(WebhookError::Rejected { status, excerpt }) => {
            assert_eq!(status, 400);
            assert_eq!(excerpt, "message refused by the receiver");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    receiver.fail_next(1);
    let result = webhook::post(&client(), &endpoint, "k", 1, b"{}".to_vec()).await;
    assert!(
        matches!(result, Err(WebhookError::Retryable { .. })),
        "{result:?}"
    );
    webhook::post(&client(), &endpoint, "k", 2, b"{}".to_vec())
        .await
        .expect("delivered after the outage");
    assert_eq!(receiver.successes().get("k"), Some(&1));
    assert_eq!(receiver.failed_attempts(), 2);
}

#[tokio::test]
async fn timeouts_and_refused_connections_are_retryable() {
    let receiver = WebhookReceiver::start(None).await.expect("receiver");
    receiver.set_delay(Some(Duration::from_secs(3)));
    let mut slow = endpoint(&receiver, None);
    slow.timeout = Duration::from_millis(200);
    let result = webhook::post(&client(), &slow, "k", 1, b"{}".to_vec()).await;
    match result {
        Err(WebhookError::Retryable { reason, .. }) => {
            assert!(reason.contains("timed out"), "{reason}")
        }
        other => panic!("expected a retryable timeout, got {other:?}"),
    }
    let closed = Endpoint::new(
        WebhookUrl::parse(&format!(
            "http://127.0.0.1:{}/hook",
            mailpoll_testkit::pg::free_port().expect("port")
        ))
        .expect("url"),
    );
    let result = webhook::post(&client(), &closed, "k", 1, b"{}".to_vec()).await;
    match result {
        Err(WebhookError::Retryable { reason, .. }) => {
            assert!(reason.contains("connection failed"), "{reason}");
            assert!(
                !reason.contains("127.0.0.1"),
                "the URL stays out of the reason: {reason}"
            );
        }
        other => panic!("expected a retryable connection error, got {other:?}"),
    }
}

// ---- The egress policy: what a webhook may reach ----

/// A webhook client with `policy` whose lookups answer from `names` (absolute names).
fn guarded(policy: EgressPolicy, names: &[(&str, &str)]) -> GuardedClient {
    let guard = FixedLookup::guard(policy, names).expect("lookup table");
    GuardedClient::new(guard, "mailpoll-test").expect("webhook client")
}

fn endpoint_at(url: String) -> Endpoint {
    Endpoint {
        timeout: Duration::from_secs(2),
        ..Endpoint::new(WebhookUrl::parse(&url).expect("a webhook URL the CRD accepts"))
    }
}

const NAMESPACE: &str = "support";

async fn refused(client: &GuardedClient, url: String) -> String {
    match webhook::post_checked(client, NAMESPACE, &endpoint_at(url), "k", 1, b"{}".to_vec()).await
    {
        Err(error @ WebhookError::Forbidden(_)) => {
            assert!(error.is_permanent());
            error.to_string()
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn refused_destinations_are_never_connected_to() {
    let receiver = WebhookReceiver::start(None).await.expect("receiver");
    let port = receiver.port();
    let client = guarded(
        EgressPolicy::default(),
        &[
            ("hooks.rebind.example.", "127.0.0.1"),
            ("hooks.mapped.example.", "::ffff:127.0.0.1"),
        ],
    );
    let cases = [
        (
            format!("http://127.0.0.1:{port}/hook?sig=s3cret"),
            "webhook address 127.0.0.1 is a loopback address; the operator does not allow \
             loopback destinations (--webhook-allow-loopback)",
        ),
        (
            format!("http://localhost:{port}/hook?sig=s3cret"),
            "webhook host localhost resolves to 127.0.0.1, a loopback address; the operator \
             does not allow loopback destinations (--webhook-allow-loopback)",
        ),
        // Only the resolver sees this one: the name looks external.
        (
            format!("https://hooks.rebind.example:{port}/hook?sig=s3cret"),
            "webhook host hooks.rebind.example resolves to 127.0.0.1, a loopback address; the \
             operator does not allow loopback destinations (--webhook-allow-loopback)",
        ),
        (
            format!("https://hooks.mapped.example:{port}/hook"),
            "webhook host hooks.mapped.example resolves to ::ffff:127.0.0.1, a loopback \
             address; the operator does not allow loopback destinations \
             (--webhook-allow-loopback)",
        ),
        (
            format!("https://[::ffff:127.0.0.1]:{port}/hook"),
            "webhook address ::ffff:127.0.0.1 is a loopback address; the operator does not \
             allow loopback destinations (--webhook-allow-loopback)",
        ),
        (
            "https://169.254.169.254/latest/meta-data/?sig=s3cret".to_owned(),
            "webhook address 169.254.169.254 is a link-local address (where cloud metadata \
             services answer); the operator does not allow link-local destinations \
             (--webhook-allow-link-local)",
        ),
        (
            format!("http://hooks.billing.svc:{port}/hook"),
            "webhook host hooks.billing.svc is in namespace billing; a MailboxPoll in \
             namespace support may only send to its own namespace's services unless the \
             operator allows the host (--webhook-allowed-hosts)",
        ),
    ];
    for (url, expected) in cases {
        let message = refused(&client, url.clone()).await;
        assert_eq!(message, expected, "{url}");
        assert!(
            !message.contains("s3cret") && !message.contains("/hook"),
            "{message}"
        );
    }
    assert_eq!(receiver.connections(), 0, "nothing reached the receiver");
}

#[tokio::test]
async fn allow_lists_and_flags_open_what_they_name() {
    let receiver = WebhookReceiver::start(None).await.expect("receiver");
    let port = receiver.port();
    let names = [
        ("hooks.billing.svc.cluster.local.", "127.0.0.1"),
        ("hooks.support.svc.cluster.local.", "127.0.0.1"),
        ("evil.example.", "127.0.0.1"),
    ];
    // A single allowed address, loopback though it is.
    let narrow = guarded(
        EgressPolicy {
            allowed_cidrs: egress::parse_list("127.0.0.1/32").expect("cidrs"),
            ..EgressPolicy::default()
        },
        &names,
    );
    let delivered = webhook::post_checked(
        &narrow,
        NAMESPACE,
        &endpoint_at(receiver.url()),
        "a",
        1,
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(delivered.expect("allowed range").as_u16(), 204);

    // Loopback allowed, another namespace's service allowed by name (any spelling), and the
    // loopback range denied except to the own namespace's services and allowed hosts.
    let open = guarded(
        EgressPolicy {
            allow_loopback: true,
            allowed_hosts: egress::parse_list("*.billing.svc.cluster.local").expect("hosts"),
            denied_cidrs: egress::parse_list("127.0.0.0/8").expect("cidrs"),
            ..EgressPolicy::default()
        },
        &names,
    );
    for (key, host) in [("b", "hooks.billing.svc"), ("c", "hooks.support.svc")] {
        let url = format!("http://{host}:{port}/hook");
        let sent =
            webhook::post_checked(&open, NAMESPACE, &endpoint_at(url), key, 1, b"{}".to_vec())
                .await;
        assert_eq!(sent.expect(host).as_u16(), 204, "{host}");
    }
    let denied = refused(&open, format!("https://evil.example:{port}/hook")).await;
    assert!(
        denied.contains("inside 127.0.0.0/8, a range the operator denies"),
        "{denied}"
    );
    assert_eq!(receiver.successes().len(), 3);
}

// ---- Hostile receivers: every answer ends in a clear verdict, in bounded time and memory ----

fn loopback() -> GuardedClient {
    loopback_webhook_client()
}

async fn post_to(
    receiver: &WebhookReceiver,
    timeout: Duration,
) -> (Result<u16, WebhookError>, Duration) {
    let mut endpoint = endpoint_at(format!("{}?sig=s3cret", receiver.url()));
    endpoint.timeout = timeout;
    let started = Instant::now();
    let result = webhook::post_checked(&loopback(), NAMESPACE, &endpoint, "k", 1, b"{}".to_vec())
        .await
        .map(|status| status.as_u16());
    (result, started.elapsed())
}

/// The excerpt of a body made of the hostile fill: its first 200 characters, one line.
fn fill_excerpt(bytes: usize) -> String {
    let body: Vec<u8> = HOSTILE_BODY_FILL
        .iter()
        .copied()
        .cycle()
        .take(bytes)
        .collect();
    webhook::excerpt(&String::from_utf8_lossy(&body))
}

const FIFTY_MB: u64 = 50 * 1024 * 1024;
/// What socket buffers may hold of an answer nobody reads.
const BUFFERED_AT_MOST: u64 = 16 * 1024 * 1024;

#[tokio::test]
async fn a_huge_rejection_body_is_read_only_as_far_as_its_excerpt() {
    let receiver = WebhookReceiver::start(None).await.expect("receiver");
    receiver.set_hostile(Some(Hostile::HugeBody {
        status: 400,
        bytes: FIFTY_MB,
    }));
    let (result, took) = post_to(&receiver, Duration::from_secs(10)).await;
    match result {
        Err(WebhookError::Rejected { status, excerpt }) => {
            assert_eq!(status, 400);
            assert_eq!(excerpt, fill_excerpt(4096));
            assert_eq!(
                excerpt.chars().count(),
                201,
                "200 characters and the ellipsis"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(took < Duration::from_secs(5), "took {took:?}");
    answer_ended(&receiver).await;
    let written = receiver.hostile_body_bytes();
    assert!(
        written < BUFFERED_AT_MOST,
        "the client stopped reading: {written} bytes written"
    );
    assert_eq!(receiver.hostile_requests(), 1);
}

/// Waits until the receiver's hostile answer has ended: the client closed the connection
/// (or it was written out), so the bytes it wrote are final.
async fn answer_ended(receiver: &WebhookReceiver) {
    mailpoll_testkit::wait_until(
        "the hostile answer to end",
        Duration::from_secs(30),
        || async { receiver.hostile_answers_ended() >= 1 },
    )
    .await;
}

#[tokio::test]
async fn a_huge_success_body_is_not_read_at_all() {
    let receiver = WebhookReceiver::start(None).await.expect("receiver");
    receiver.set_hostile(Some(Hostile::HugeBody {
        status: 200,
        bytes: FIFTY_MB,
    }));
    let (result, took) = post_to(&receiver, Duration::from_secs(10)).await;
    assert_eq!(result.expect("delivered"), 200);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    answer_ended(&receiver).await;
    let written = receiver.hostile_body_bytes();
    assert!(written < BUFFERED_AT_MOST, "{written} bytes written");
}

#[tokio::test]
async fn a_trickled_answer_times_out_within_the_webhook_timeout() {
    let receiver = WebhookReceiver::start(None).await.expect("receiver");
    receiver.set_hostile(Some(Hostile::TrickleHead {
        every: Duration::from_millis(100),
    }));
    let (result, took) = post_to(&receiver, Duration::from_millis(700)).await;
    match result {
        Err(WebhookError::Retryable { reason, .. }) => {
            assert!(reason.starts_with("timed out"), "{reason}");
            assert!(
                !reason.contains("s3cret") && !reason.contains("127.0.0.1"),
                "{reason}"
            );
        }
        other => panic!("expected a retryable timeout, got {other:?}"),
    }
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[tokio::test]
async fn a_trickled_rejection_body_keeps_what_arrived_before_the_timeout() {
    let receiver = WebhookReceiver::start(None).await.expect("receiver");
    receiver.set_hostile(Some(Hostile::TrickleBody {
        status: 422,
        every: Duration::from_millis(50),
    }));
    let (result, took) = post_to(&receiver, Duration::from_millis(700)).await;
    match result {
        Err(WebhookError::Rejected { status, excerpt }) => {
            assert_eq!(status, 422);
            // What trickled in before the deadline: a prefix of the body.
            let whole = fill_excerpt(1000);
            assert!(
                !excerpt.is_empty() && whole.starts_with(excerpt.trim_end()),
                "{excerpt:?}"
            );
            assert!(excerpt.len() < 40, "{excerpt:?}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // A success's body is never waited for.
    receiver.set_hostile(Some(Hostile::TrickleBody {
        status: 202,
        every: Duration::from_millis(50),
    }));
    let (result, took) = post_to(&receiver, Duration::from_millis(700)).await;
    assert_eq!(result.expect("delivered"), 202);
    assert!(took < Duration::from_millis(500), "took {took:?}");
}

#[tokio::test]
async fn redirects_are_refused_naming_only_the_target_host() {
    let receiver = WebhookReceiver::start(None).await.expect("receiver");
    for (status, location, host) in [
        (
            302,
            "https://elsewhere.example/collect?sig=s3cret",
            "elsewhere.example",
        ),
        (
            308,
            "http://169.254.169.254/latest/meta-data/",
            "169.254.169.254",
        ),
        (307, "/other/path?sig=s3cret", "the same host"),
    ] {
        receiver.set_hostile(Some(Hostile::Redirect {
            status,
            location: location.into(),
        }));
        let (result, _) = post_to(&receiver, Duration::from_secs(2)).await;
        let error = result.expect_err("a redirect is no delivery");
        assert!(error.is_permanent(), "{error}");
        assert_eq!(
            error.to_string(),
            format!(
                "webhook answered HTTP {status}, a redirect to {host}; redirects are not \
                 followed: set the webhook URL to the final address"
            )
        );
    }
    assert_eq!(
        receiver.hostile_requests(),
        3,
        "each redirect was not followed"
    );
}

#[tokio::test]
async fn a_connection_reset_mid_answer_is_retryable_or_keeps_the_status() {
    let receiver = WebhookReceiver::start(None).await.expect("receiver");
    // Reset within the status line: no answer at all.
    receiver.set_hostile(Some(Hostile::ResetMidResponse {
        status: 200,
        after: 10,
    }));
    let (result, took) = post_to(&receiver, Duration::from_secs(5)).await;
    match result {
        Err(WebhookError::Retryable { reason, .. }) => {
            assert_eq!(
                reason,
                "request failed: client error (SendRequest): connection error: Connection reset \
                 by peer (os error 104)"
            );
        }
        other => panic!("expected a retryable failure, got {other:?}"),
    }
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // Reset within a rejection's body: the status stands, with the body that arrived.
    let head = "HTTP/1.1 400 Hostile\r\ncontent-type: text/plain\r\ncontent-length: 1000\r\nconnection: close\r\n\r\n";
    receiver.set_hostile(Some(Hostile::ResetMidResponse {
        status: 400,
        after: head.len() + 100,
    }));
    let (result, _) = post_to(&receiver, Duration::from_secs(5)).await;
    match result {
        Err(WebhookError::Rejected { status, excerpt }) => {
            assert_eq!(status, 400);
            assert_eq!(excerpt, fill_excerpt(100));
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn control_characters_in_the_status_line_are_a_retryable_protocol_error() {
    let receiver = WebhookReceiver::start(None).await.expect("receiver");
    receiver.set_hostile(Some(Hostile::GarbageStatusLine { status: 400 }));
    let (result, took) = post_to(&receiver, Duration::from_secs(2)).await;
    match result {
        Err(WebhookError::Retryable { reason, .. }) => {
            assert!(
                !reason.contains('\u{0}')
                    && !reason.contains('\u{1b}')
                    && !reason.contains('\u{7}'),
                "{reason:?}"
            );
            assert_eq!(
                reason,
                "request failed: client error (SendRequest): invalid HTTP status-code parsed"
            );
        }
        other => panic!("expected a retryable protocol error, got {other:?}"),
    }
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[tokio::test]
async fn nul_and_escape_sequences_in_a_rejection_body_are_made_storable() {
    let receiver = WebhookReceiver::start(None).await.expect("receiver");
    receiver.garbage_next(1);
    let (result, _) = post_to(&receiver, Duration::from_secs(2)).await;
    match result {
        Err(WebhookError::Rejected { status, excerpt }) => {
            assert_eq!(status, 400);
            assert!(
                excerpt
                    .starts_with("refused\u{fffd} by\u{fffd} the\u{fffd} receiver\u{fffd}[31m red"),
                "{excerpt:?}"
            );
            assert!(!excerpt.chars().any(|c| c.is_control()), "{excerpt:?}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}
