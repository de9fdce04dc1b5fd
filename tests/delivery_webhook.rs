//! The webhook POST against the test receiver: signature, idempotency key, verdicts.

use std::time::Duration;

use mailpoll::delivery::endpoint::{Endpoint, ExtraHeaders, WebhookUrl};
use mailpoll::delivery::signing::message_key;
use mailpoll::delivery::webhook::{self, WebhookError};
use mailpoll_testkit::webhook_receiver::{TEST_SIGNING_SECRET, WebhookReceiver};
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
        Err(WebhookError::Retryable { reason }) => {
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
        Err(WebhookError::Retryable { reason }) => {
            assert!(reason.contains("connection failed"), "{reason}");
            assert!(
                !reason.contains("127.0.0.1"),
                "the URL stays out of the reason: {reason}"
            );
        }
        other => panic!("expected a retryable connection error, got {other:?}"),
    }
}
