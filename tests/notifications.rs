//! Graph change notifications end to end: the operator in-process against the Kubernetes API
//! emulator, the Graph emulator (which calls the operator's notification endpoint) and real
//! Postgres. Notifications are wake-ups; the interval stays the safety net.

use std::time::Duration;

use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use mailpoll::delivery::egress::{EgressGuard, EgressPolicy};
use mailpoll::directory::DirectorySettings;
use mailpoll::graph::GovernorConfig;
use mailpoll::operator::{self, KubeSource, OperatorConfig, OperatorError};
use mailpoll::queue::WorkerId;
use mailpoll::resource::{MailboxPoll, MailboxPollStatus, NotificationsStatus};
use mailpoll_testkit::cluster;
use mailpoll_testkit::graph::subscriptions::{LifecycleEvent, Subscription};
use mailpoll_testkit::graph::{EmulatorConfig, GraphEmulator};
use mailpoll_testkit::kube::KubeEmulator;
use mailpoll_testkit::pg::{TestDatabase, free_port};
use mailpoll_testkit::webhook_receiver::WebhookReceiver;
use mailpoll_testkit::{wait_for, wait_until};
use serde_json::json;
use uuid::Uuid;

const MAILBOX: &str = "support@contoso.com";
const SECRET: &str = "graph-credentials";
const PATIENCE: Duration = Duration::from_secs(30);

struct World {
    db: TestDatabase,
    _kube: KubeEmulator,
    graph: GraphEmulator,
    client: Client,
    namespace: String,
    http_port: u16,
    receiver: WebhookReceiver,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    operator: Option<tokio::task::JoinHandle<Result<(), OperatorError>>>,
}

impl World {
    async fn start() -> Self {
        Self::start_with(Duration::from_secs(600), Duration::from_millis(500)).await
    }

    /// The operator, asking for subscriptions of `lifetime`, starting a woken poll
    /// `coalesce` after the first notification of a burst.
    async fn start_with(lifetime: Duration, coalesce: Duration) -> Self {
        mailpoll::install_crypto_provider();
        let db = TestDatabase::create().await.expect("test database");
        let kube = KubeEmulator::start().await.expect("Kubernetes emulator");
        let client = kube.client().expect("client for the emulator");
        cluster::install_crd(&client).await.expect("CRD installed");
        let namespace = format!("nt-{}", &Uuid::new_v4().simple().to_string()[..8]);
        cluster::create_namespace(&client, &namespace)
            .await
            .expect("namespace");
        cluster::create_credentials(
            &client,
            &namespace,
            SECRET,
            mailpoll_testkit::graph::DEFAULT_CLIENT_SECRET,
        )
        .await
        .expect("credentials Secret");
        let graph = GraphEmulator::start(EmulatorConfig {
            mailboxes: vec![MAILBOX.into()],
            ..EmulatorConfig::default()
        })
        .await
        .expect("Graph emulator");
        let receiver = WebhookReceiver::start(None).await.expect("receiver");
        let http_port = free_port().expect("free port");
        let mut config = OperatorConfig::new(
            db.url.clone(),
            format!("127.0.0.1:{http_port}").parse().expect("address"),
            KubeSource::Config(Box::new(kube.config().expect("emulator config"))),
        );
        config.webhook_egress = EgressGuard::new(EgressPolicy::allowing_loopback());
        config.pool.max_connections = 8;
        config.workers.worker_id = WorkerId::named("notifications-test");
        config.workers.poll_interval = Duration::from_millis(100);
        config.workers.concurrency = 4;
        config.workers.shutdown_grace = Duration::from_secs(2);
        config.lease_namespace = namespace.clone();
        config.lease_duration = Duration::from_secs(3);
        config.lease_renew_deadline = Duration::from_secs(2);
        config.lease_retry_period = Duration::from_millis(500);
        config.graph_authority_url = graph.base_url();
        config.graph_url = graph.base_url();
        config.governor = GovernorConfig {
            backoff_base: Duration::from_millis(20),
            backoff_cap: Duration::from_millis(200),
            ..GovernorConfig::default()
        };
        config.directory = DirectorySettings {
            sync_timeout: Duration::from_secs(30),
            ..DirectorySettings::default()
        };
        config.notifications.public_url = Some(
            format!("http://127.0.0.1:{http_port}/notifications")
                .parse()
                .expect("URL"),
        );
        config.notifications.lifetime = lifetime;
        config.notifications.coalesce = coalesce;
        config.notifications.sync_interval = Duration::from_millis(300);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let operator = tokio::spawn(operator::run(config, async move {
            let _ = stopped.await;
        }));
        let world = Self {
            db,
            _kube: kube,
            graph,
            client,
            namespace,
            http_port,
            receiver,
            stop: Some(stop),
            operator: Some(operator),
        };
        let http = reqwest::Client::new();
        let ready = format!("http://127.0.0.1:{http_port}/readyz");
        wait_for("the operator to be ready", PATIENCE, || async {
            let response = http.get(&ready).send().await.ok()?;
            response.status().is_success().then_some(())
        })
        .await;
        world
    }

    fn api(&self) -> Api<MailboxPoll> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn endpoint(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// A MailboxPoll with notifications on, delivering to the receiver, polled every
    /// `interval`.
    async fn create(&self, name: &str, interval: &str) -> Uuid {
        let mut poll = cluster::mailbox_poll(name, MAILBOX, interval, SECRET);
        poll.spec.notifications = Some(mailpoll::resource::Notifications { enabled: true });
        poll.spec.delivery = Some(
            serde_json::from_value(json!({"webhook": {"url": self.receiver.url()}}))
                .expect("delivery"),
        );
        let created = self
            .api()
            .create(&PostParams::default(), &poll)
            .await
            .expect("MailboxPoll created");
        Uuid::parse_str(&created.uid().expect("uid")).expect("uid is a UUID")
    }

    /// Poll rounds that finished.
    async fn rounds(&self, uid: Uuid) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM polls WHERE mailbox_uid = $1 AND finished_at IS NOT NULL",
        )
        .bind(uid)
        .fetch_one(&self.db.pool)
        .await
        .expect("poll count")
    }

    /// Poll requests notifications made.
    async fn wakeups(&self, uid: Uuid) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM poll_requests WHERE mailbox_uid = $1
               AND starts_with(value, 'notification:')",
        )
        .bind(uid)
        .fetch_one(&self.db.pool)
        .await
        .expect("wake-up count")
    }

    async fn unserved_requests(&self, uid: Uuid) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM poll_requests WHERE mailbox_uid = $1 AND served_at IS NULL",
        )
        .bind(uid)
        .fetch_one(&self.db.pool)
        .await
        .expect("unserved requests")
    }

    async fn last_notification(&self, uid: Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
        sqlx::query_scalar(
            "SELECT last_notification_at FROM notification_subscriptions WHERE mailbox_uid = $1",
        )
        .bind(uid)
        .fetch_optional(&self.db.pool)
        .await
        .expect("subscription row")
        .flatten()
    }

    /// The one live subscription, once the operator created it.
    async fn subscription(&self) -> Subscription {
        wait_for("the subscription to be created", PATIENCE, || async {
            let mut live = self.graph.subscriptions();
            (live.len() == 1).then(|| live.remove(0))
        })
        .await
    }

    /// Waits for `rounds` finished rounds and for no poll to be running or due soon.
    async fn wait_rounds(&self, uid: Uuid, rounds: i64) {
        wait_until(format!("{rounds} poll round(s)"), PATIENCE, || async {
            self.rounds(uid).await == rounds
        })
        .await;
    }

    async fn status(&self, name: &str) -> Option<MailboxPollStatus> {
        self.api().get(name).await.ok()?.status
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(operator) = self.operator.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
        }
    }
}

fn condition(status: &MailboxPollStatus, type_: &str) -> Option<(String, String)> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

#[tokio::test]
async fn the_endpoint_answers_the_handshake_and_refuses_what_is_not_a_notification() {
    let world = World::start().await;
    let http = reqwest::Client::new();
    for path in ["/notifications", "/notifications/lifecycle"] {
        let answer = http
            .post(world.endpoint(path))
            .query(&[("validationToken", "Validation: Testing +/=& ünïcode")])
            .header("content-type", "text/plain")
            .send()
            .await
            .expect("validation call");
        assert_eq!(answer.status(), reqwest::StatusCode::OK);
        let content_type = answer
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        assert_eq!(
            answer.text().await.expect("body"),
            "Validation: Testing +/=& ünïcode"
        );
    }
    let garbage = http
        .post(world.endpoint("/notifications"))
        .body("{\"value\": 42")
        .send()
        .await
        .expect("garbage");
    assert_eq!(garbage.status(), reqwest::StatusCode::BAD_REQUEST);
    let huge = http
        .post(world.endpoint("/notifications"))
        .body(vec![b'x'; 2 * 1024 * 1024])
        .send()
        .await
        .expect("huge body");
    assert_eq!(huge.status(), reqwest::StatusCode::PAYLOAD_TOO_LARGE);
    // An unknown subscription is accepted (Graph must not retry it) and does nothing.
    let unknown = http
        .post(world.endpoint("/notifications"))
        .json(&json!({"value": [{"subscriptionId": "nobody", "clientState": "x"}]}))
        .send()
        .await
        .expect("unknown subscription");
    assert_eq!(unknown.status(), reqwest::StatusCode::ACCEPTED);
    // The operator still serves.
    let ready = http
        .get(world.endpoint("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert!(ready.status().is_success());
    world.stop().await;
}

#[tokio::test]
async fn a_notification_wakes_a_poll_and_status_shows_the_subscription() {
    let world = World::start().await;
    let uid = world.create("support", "1h").await;
    let subscription = world.subscription().await;
    assert_eq!(subscription.change_type, "created");
    assert!(subscription.lifecycle_notification_url.is_some());
    world.wait_rounds(uid, 1).await;

    world
        .graph
        .add_messages(MAILBOX, "inbox", 1)
        .expect("message arrives");
    wait_until("the message delivered", PATIENCE, || async {
        world.receiver.successes().len() == 1
    })
    .await;
    assert_eq!(world.rounds(uid).await, 2, "one round for the notification");

    let status = wait_for("status to show the subscription", PATIENCE, || async {
        let status = world.status("support").await?;
        let shown = status.notifications.as_ref()?;
        (shown.subscription_id.as_deref() == Some(subscription.id.as_str())
            && shown.last_notification_time.is_some())
        .then_some(status)
    })
    .await;
    assert_eq!(
        condition(&status, "NotificationsReady"),
        Some(("True".into(), "Subscribed".into()))
    );
    world.stop().await;
}

#[tokio::test]
async fn a_wrong_client_state_is_dropped_without_a_poll() {
    let world = World::start().await;
    let uid = world.create("support", "1h").await;
    let subscription = world.subscription().await;
    world.wait_rounds(uid, 1).await;

    let forged = json!({"value": [{
        "subscriptionId": subscription.id, "clientState": "forged-state",
        "changeType": "created", "resource": "Users/x/Messages/y",
    }]});
    world
        .graph
        .send_raw_notification(&subscription.notification_url, forged);
    let missing = json!({"value": [{"subscriptionId": subscription.id, "changeType": "created"}]});
    world
        .graph
        .send_raw_notification(&subscription.notification_url, missing);
    wait_until("both forged notifications answered", PATIENCE, || async {
        world.graph.notification_counters().accepted == 2
    })
    .await;
    // The genuine one comes after them through the same processor.
    world
        .graph
        .lifecycle_event(&subscription.id, LifecycleEvent::Missed);
    wait_until("the genuine event acted on", PATIENCE, || async {
        world.last_notification(uid).await.is_some()
    })
    .await;
    assert_eq!(world.wakeups(uid).await, 1, "only the genuine event woke");
    world.wait_rounds(uid, 2).await;
    world.stop().await;
}

#[tokio::test]
async fn subscriptions_are_renewed_before_they_expire() {
    // Four-second subscriptions: renewed once half is gone, so they never lapse.
    let world = World::start_with(Duration::from_secs(4), Duration::from_millis(500)).await;
    world.create("support", "1h").await;
    let first = world.subscription().await;
    wait_until("three renewals", PATIENCE, || async {
        world
            .graph
            .subscriptions()
            .first()
            .is_some_and(|s| s.renewals >= 3)
    })
    .await;
    let counters = world.graph.notification_counters();
    assert_eq!(counters.expired, 0, "no subscription lapsed");
    assert_eq!(counters.created, 1, "the same subscription all along");
    assert_eq!(world.graph.subscriptions()[0].id, first.id);
    world.stop().await;
}

#[tokio::test]
async fn a_removed_subscription_is_created_again_and_missed_polls() {
    let world = World::start().await;
    let uid = world.create("support", "1h").await;
    let first = world.subscription().await;
    world.wait_rounds(uid, 1).await;

    assert!(
        world
            .graph
            .lifecycle_event(&first.id, LifecycleEvent::Missed)
    );
    world.wait_rounds(uid, 2).await;

    assert!(
        world
            .graph
            .lifecycle_event(&first.id, LifecycleEvent::SubscriptionRemoved)
    );
    let second = wait_for("a new subscription", PATIENCE, || async {
        let live = world.graph.subscriptions();
        live.into_iter().find(|s| s.id != first.id)
    })
    .await;
    assert_ne!(
        second.client_state, first.client_state,
        "a fresh clientState"
    );
    world.wait_rounds(uid, 3).await;

    // The new subscription works.
    world
        .graph
        .add_messages(MAILBOX, "inbox", 1)
        .expect("message arrives");
    wait_until("the message delivered", PATIENCE, || async {
        world.receiver.successes().len() == 1
    })
    .await;
    world.stop().await;
}

#[tokio::test]
async fn with_notifications_lost_every_message_is_still_delivered_once() {
    let world = World::start().await;
    world.graph.update_notification_faults(|faults| {
        faults.loss_ratio = 0.3;
        faults.duplicate_ratio = 0.2;
        faults.reorder_window_ms = 200;
    });
    // The shortest interval: the safety net for the lost notifications.
    let uid = world.create("support", "10s").await;
    world.subscription().await;
    world.wait_rounds(uid, 1).await;
    for _ in 0..5 {
        world
            .graph
            .add_messages(MAILBOX, "inbox", 6)
            .expect("messages arrive");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_until("30 messages delivered", Duration::from_secs(60), || async {
        world.receiver.successes().len() == 30
    })
    .await;
    let counters = world.graph.notification_counters();
    assert!(
        counters.lost > 0,
        "some notifications were lost: {counters:?}"
    );
    let successes = world.receiver.successes();
    assert!(
        successes.values().all(|count| *count == 1),
        "each message once: {successes:?}"
    );
    world.stop().await;
}

#[tokio::test]
async fn a_burst_of_notifications_costs_one_round() {
    // A coalescing window far longer than the burst takes to arrive on a busy machine.
    let world = World::start_with(Duration::from_secs(600), Duration::from_secs(2)).await;
    let uid = world.create("support", "1h").await;
    let subscription = world.subscription().await;
    world.wait_rounds(uid, 1).await;

    world
        .graph
        .add_messages(MAILBOX, "inbox", 25)
        .expect("a burst arrives");
    wait_until("25 messages delivered", PATIENCE, || async {
        world.receiver.successes().len() == 25
    })
    .await;
    wait_until("25 notifications answered", PATIENCE, || async {
        world.graph.notification_counters().accepted == 25
    })
    .await;
    // A lifecycle event after the burst goes through the same processor: once it is acted
    // on (a renewal), every notification of the burst has been.
    let renewed = world.graph.notification_counters().renewed;
    world
        .graph
        .lifecycle_event(&subscription.id, LifecycleEvent::ReauthorizationRequired);
    wait_until("the reauthorization served", PATIENCE, || async {
        world.graph.notification_counters().renewed > renewed
    })
    .await;
    wait_until("every poll request served", PATIENCE, || async {
        world.unserved_requests(uid).await == 0
    })
    .await;
    assert_eq!(world.rounds(uid).await, 2, "the burst cost one round");
    world.stop().await;
}

#[tokio::test]
async fn turning_notifications_off_deletes_the_subscription() {
    let world = World::start().await;
    world.create("support", "1h").await;
    world.subscription().await;
    world
        .api()
        .patch(
            "support",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"notifications": {"enabled": false}}})),
        )
        .await
        .expect("patched");
    wait_until("the subscription deleted", PATIENCE, || async {
        world.graph.subscriptions().is_empty()
    })
    .await;
    assert_eq!(world.graph.notification_counters().deleted, 1);
    // Server-side apply removes the fields the controller no longer writes; the API server
    // may keep the emptied object behind (as structured-merge-diff does for a struct).
    wait_until("status without notifications", PATIENCE, || async {
        world.status("support").await.is_some_and(|status| {
            status
                .notifications
                .as_ref()
                .is_none_or(|shown| *shown == NotificationsStatus::default())
                && condition(&status, "NotificationsReady").is_none()
        })
    })
    .await;
    world.stop().await;
}

#[tokio::test]
async fn an_unreachable_endpoint_is_a_condition_and_polling_goes_on() {
    let world = World::start().await;
    world
        .graph
        .update_notification_faults(|faults| faults.unreachable = true);
    let uid = world.create("support", "10s").await;
    let status = wait_for("NotificationsReady=False", PATIENCE, || async {
        let status = world.status("support").await?;
        (condition(&status, "NotificationsReady")
            == Some(("False".into(), "SubscriptionFailed".into())))
        .then_some(status)
    })
    .await;
    let message = status
        .conditions
        .iter()
        .find(|c| c.type_ == "NotificationsReady")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("validation"), "{message}");
    world
        .graph
        .add_messages(MAILBOX, "inbox", 1)
        .expect("message arrives");
    wait_until("the message delivered by polling", PATIENCE, || async {
        world.receiver.successes().len() == 1
    })
    .await;
    assert!(world.rounds(uid).await >= 2);
    world.stop().await;
}
