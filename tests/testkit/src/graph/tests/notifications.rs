//! Self-tests of change notifications: subscriptions, the validation call, notifications on
//! arrival and their switches, lifecycle events, expiry by emulator time.

use std::sync::Mutex as StdMutex;

use axum::extract::{Query, State};
use axum::response::IntoResponse;

use super::*;
use crate::graph::subscriptions::{LifecycleEvent, NotificationFaults};
use crate::wait::wait_until;

/// A notification receiver: answers the validation call as Graph requires (or not), and keeps
/// every notification body.
#[derive(Clone, Default)]
struct Receiver {
    bodies: Arc<StdMutex<Vec<Value>>>,
    refuse_validation: bool,
}

impl Receiver {
    async fn serve(self) -> String {
        let app = axum::Router::new()
            .route("/notify", axum::routing::post(Self::handle))
            .with_state(self);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}/notify")
    }

    async fn handle(
        State(receiver): State<Receiver>,
        Query(query): Query<HashMap<String, String>>,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        if let Some(token) = query.get("validationToken") {
            if receiver.refuse_validation {
                return axum::http::StatusCode::NOT_FOUND.into_response();
            }
            return ([("content-type", "text/plain")], token.clone()).into_response();
        }
        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        receiver.bodies.lock().expect("bodies").push(value);
        axum::http::StatusCode::ACCEPTED.into_response()
    }

    fn bodies(&self) -> Vec<Value> {
        self.bodies.lock().expect("bodies").clone()
    }
}

fn subscription_body(now: chrono::DateTime<chrono::Utc>, url: &str, minutes: i64) -> Value {
    let expiration = now + chrono::Duration::minutes(minutes);
    json!({
        "changeType": "created",
        "notificationUrl": url,
        "lifecycleNotificationUrl": url,
        "resource": format!("users/{MAILBOX}/mailFolders('inbox')/messages"),
        "expirationDateTime": expiration.to_rfc3339(),
        "clientState": "opaque-state",
    })
}

async fn subscribe(probe: &Probe, url: &str, minutes: i64) -> (StatusCode, Value) {
    let (status, _, body) = probe
        .send(
            reqwest::Method::POST,
            "/subscriptions",
            "",
            Some(subscription_body(probe.emulator.now(), url, minutes)),
            &probe.token,
        )
        .await;
    (status, body)
}

#[tokio::test]
async fn creating_validates_the_url_and_enforces_the_maximum_lifetime() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let receiver = Receiver::default();
    let url = receiver.clone().serve().await;

    let (status, body) = subscribe(&probe, &url, 10_081).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_code(&body), "ExtensionError");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("10080 minutes")),
        "{body}"
    );

    let (status, body) = subscribe(&probe, &url, 10_000).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["clientState"], "opaque-state");
    // The notification URL and the lifecycle URL were both validated.
    assert_eq!(probe.emulator.notification_counters().validation_calls, 2);
    assert_eq!(probe.emulator.subscriptions().len(), 1);

    let refusing = Receiver {
        refuse_validation: true,
        ..Receiver::default()
    };
    let bad_url = refusing.serve().await;
    let (status, body) = subscribe(&probe, &bad_url, 60).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_code(&body), "ValidationError");
    assert_eq!(probe.emulator.subscriptions().len(), 1);
}

#[tokio::test]
async fn renewal_delete_and_expiry_by_emulator_time() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let url = Receiver::default().serve().await;
    let (_, body) = subscribe(&probe, &url, 60).await;
    let id = body["id"].as_str().expect("id").to_string();

    let later = (chrono::Utc::now() + chrono::Duration::minutes(120)).to_rfc3339();
    let (status, _, renewed) = probe
        .send(
            reqwest::Method::PATCH,
            &format!("/subscriptions/{id}"),
            "",
            Some(json!({"expirationDateTime": later})),
            &probe.token,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{renewed}");
    assert_eq!(probe.emulator.subscriptions()[0].renewals, 1);

    // Two hours of emulator time later the subscription has expired.
    probe.emulator.advance_clock(Duration::from_secs(121 * 60));
    assert!(probe.emulator.subscriptions().is_empty());
    assert_eq!(probe.emulator.notification_counters().expired, 1);
    let (status, _, _) = probe
        .send(
            reqwest::Method::PATCH,
            &format!("/subscriptions/{id}"),
            "",
            Some(json!({"expirationDateTime": later})),
            &probe.token,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (_, body) = subscribe(&probe, &url, 60).await;
    let id = body["id"].as_str().expect("id").to_string();
    let (status, _, _) = probe
        .send(
            reqwest::Method::DELETE,
            &format!("/subscriptions/{id}"),
            "",
            None,
            &probe.token,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(probe.emulator.subscriptions().is_empty());
}

#[tokio::test]
async fn arrivals_notify_with_the_client_state_and_switches_lose_and_duplicate() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let receiver = Receiver::default();
    let url = receiver.clone().serve().await;
    let (_, body) = subscribe(&probe, &url, 60).await;
    let id = body["id"].as_str().expect("id").to_string();

    let added = probe
        .emulator
        .add_messages(MAILBOX, "inbox", 3)
        .expect("add");
    // Mail in another folder is not notified.
    probe
        .emulator
        .add_messages(MAILBOX, "archive", 2)
        .expect("add");
    wait_until("three notifications", Duration::from_secs(5), || async {
        receiver.bodies().len() == 3
    })
    .await;
    let mut notified: Vec<String> = receiver
        .bodies()
        .iter()
        .map(|body| {
            let item = &body["value"][0];
            assert_eq!(item["subscriptionId"], id.as_str());
            assert_eq!(item["clientState"], "opaque-state");
            assert_eq!(item["changeType"], "created");
            item["resourceData"]["id"].as_str().expect("id").to_string()
        })
        .collect();
    notified.sort();
    let mut expected: Vec<String> = added.iter().map(|ids| ids.immutable_id.clone()).collect();
    expected.sort();
    assert_eq!(notified, expected);

    probe.emulator.update_notification_faults(|faults| {
        *faults = NotificationFaults {
            loss_ratio: 1.0,
            ..NotificationFaults::default()
        }
    });
    probe
        .emulator
        .add_messages(MAILBOX, "inbox", 4)
        .expect("add");
    assert_eq!(probe.emulator.notification_counters().lost, 4);

    probe.emulator.update_notification_faults(|faults| {
        faults.loss_ratio = 0.0;
        faults.duplicate_ratio = 1.0;
        faults.reorder_window_ms = 50;
    });
    probe
        .emulator
        .add_messages(MAILBOX, "inbox", 2)
        .expect("add");
    wait_until(
        "two duplicated notifications",
        Duration::from_secs(5),
        || async { receiver.bodies().len() == 3 + 4 },
    )
    .await;
    let counters = probe.emulator.notification_counters();
    assert_eq!(counters.duplicated, 2);
    assert_eq!(counters.sent, 7);
}

#[tokio::test]
async fn lifecycle_events_go_to_the_lifecycle_url_and_removal_removes() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let receiver = Receiver::default();
    let url = receiver.clone().serve().await;
    let (_, body) = subscribe(&probe, &url, 60).await;
    let id = body["id"].as_str().expect("id").to_string();

    assert!(probe.emulator.lifecycle_event(&id, LifecycleEvent::Missed));
    assert!(
        probe
            .emulator
            .lifecycle_event(&id, LifecycleEvent::SubscriptionRemoved)
    );
    wait_until("two lifecycle events", Duration::from_secs(5), || async {
        receiver.bodies().len() == 2
    })
    .await;
    let mut events: Vec<String> = receiver
        .bodies()
        .iter()
        .map(|body| {
            body["value"][0]["lifecycleEvent"]
                .as_str()
                .expect("event")
                .to_string()
        })
        .collect();
    events.sort();
    assert_eq!(events, ["missed", "subscriptionRemoved"]);
    assert!(probe.emulator.subscriptions().is_empty());
    assert!(!probe.emulator.lifecycle_event(&id, LifecycleEvent::Missed));
}

#[tokio::test]
async fn the_admin_api_drives_notification_switches_and_lifecycle_events() {
    let probe = Probe::start(EmulatorConfig {
        admin_api: true,
        ..EmulatorConfig::default()
    })
    .await;
    let receiver = Receiver::default();
    let url = receiver.clone().serve().await;
    let (_, body) = subscribe(&probe, &url, 60).await;
    let id = body["id"].as_str().expect("id").to_string();
    let admin = |path: &str| format!("{}/_admin/{path}", probe.emulator.base_url());

    let answer = probe
        .http
        .put(admin("notification-faults"))
        .json(&json!({"lossRatio": 1.0}))
        .send()
        .await
        .expect("PUT faults");
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(probe.emulator.notification_faults().loss_ratio, 1.0);

    let listed: Value = probe
        .http
        .get(admin("subscriptions"))
        .send()
        .await
        .expect("GET subscriptions")
        .json()
        .await
        .expect("JSON");
    assert_eq!(listed[0]["id"], id.as_str());

    let answer = probe
        .http
        .post(admin(&format!("subscriptions/{id}/lifecycle/missed")))
        .send()
        .await
        .expect("POST lifecycle");
    assert_eq!(answer.status(), StatusCode::NO_CONTENT);
    wait_until("the missed event", Duration::from_secs(5), || async {
        receiver.bodies().len() == 1
    })
    .await;
    let answer = probe
        .http
        .post(admin("subscriptions/nobody/lifecycle/missed"))
        .send()
        .await
        .expect("POST lifecycle");
    assert_eq!(answer.status(), StatusCode::NOT_FOUND);
}
