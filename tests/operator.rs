//! The operator in-process against the Kubernetes API emulator, the Graph emulator and real
//! Postgres: first poll and status, forced polls, suspend, Secret problems, API write budget,
//! watched namespaces.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use mailpoll::delivery::egress::{EgressGuard, EgressPolicy};
use mailpoll::directory::{DirectorySettings, Scope};
use mailpoll::graph::{Certificate, GovernorConfig};
use mailpoll::identity::DeletionPolicy;
use mailpoll::operator::{self, KubeSource, OperatorConfig, OperatorError};
use mailpoll::queue::WorkerId;
use mailpoll::resource::{
    AfterDelivery, Delivery, MailboxPoll, MailboxPollSpec, MailboxPollStatus,
    POLL_REQUESTED_AT_ANNOTATION,
};
use mailpoll_testkit::cluster;
use mailpoll_testkit::graph::{
    AppRegistration, BatchFaults, EmulatorConfig, GraphEmulator, NewMessage, default_app,
};
use mailpoll_testkit::kube::{KubeEmulator, RequestRecord};
use mailpoll_testkit::pg::{TestDatabase, free_port};
use mailpoll_testkit::webhook_receiver::{FixedLookup, TEST_SIGNING_SECRET, WebhookReceiver};
use mailpoll_testkit::{try_wait_for, wait_for, wait_until};
use serde_json::json;
use uuid::Uuid;

const MAILBOX: &str = "support@contoso.com";
const SECRET: &str = "graph-credentials";
/// Upper bound of waits for things that normally take well under a second.
const PATIENCE: Duration = Duration::from_secs(30);
/// How long the operator reuses a Secret it read.
const SECRET_TTL: Duration = Duration::from_millis(500);

struct World {
    db: TestDatabase,
    kube: KubeEmulator,
    graph: GraphEmulator,
    client: Client,
    namespace: String,
    http_port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    operator: Option<tokio::task::JoinHandle<Result<(), OperatorError>>>,
}

impl World {
    /// The operator handling the MailboxPolls of every namespace.
    async fn start() -> Self {
        Self::start_in(Scope::All).await
    }

    /// The operator handling the MailboxPolls of `scope`, whose namespaces are created first.
    /// The world's own namespace holds the Lease, as a release namespace does; it is watched
    /// only when `scope` is all namespaces.
    async fn start_in(scope: Scope) -> Self {
        // The test receivers listen on loopback.
        Self::start_with(scope, EgressGuard::new(EgressPolicy::allowing_loopback())).await
    }

    /// The operator with the webhook egress policy `egress`.
    async fn start_with(scope: Scope, egress: EgressGuard) -> Self {
        Self::start_tuned(scope, egress, |_| {}).await
    }

    /// The operator of [`Self::start_with`], its configuration changed by `tune` last.
    async fn start_tuned(
        scope: Scope,
        egress: EgressGuard,
        tune: impl FnOnce(&mut OperatorConfig),
    ) -> Self {
        mailpoll::install_crypto_provider();
        let db = TestDatabase::create().await.expect("test database");
        let kube = KubeEmulator::start()
            .await
            .expect("Kubernetes API emulator");
        let client = kube.client().expect("client for the emulator");
        cluster::install_crd(&client).await.expect("CRD installed");
        let namespace = format!("op-{}", &Uuid::new_v4().simple().to_string()[..8]);
        cluster::create_namespace(&client, &namespace)
            .await
            .expect("namespace");
        if let Scope::Namespaces(watched) = &scope {
            for watched in watched {
                cluster::create_namespace(&client, watched)
                    .await
                    .expect("watched namespace");
            }
        }
        let graph = GraphEmulator::start(EmulatorConfig {
            mailboxes: vec![MAILBOX.into()],
            ..EmulatorConfig::default()
        })
        .await
        .expect("Graph emulator");
        let http_port = free_port().expect("free port");
        let mut config = OperatorConfig::new(
            db.url.clone(),
            format!("127.0.0.1:{http_port}").parse().expect("address"),
            KubeSource::Config(Box::new(kube.config().expect("emulator config"))),
        );
        config.scope = scope;
        config.webhook_egress = egress;
        config.pool.max_connections = 8;
        config.workers.worker_id = WorkerId::named("operator-test");
        config.workers.poll_interval = Duration::from_millis(200);
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
            secret_ttl: SECRET_TTL,
            miss_grace: Duration::from_secs(3),
            sync_timeout: Duration::from_secs(30),
            ..DirectorySettings::default()
        };
        config.leader_work.reconcile.config_requeue = Duration::from_secs(1);
        config.leader_work.sweep_interval = Duration::from_secs(1);
        config.leader_work.sweep_min_age = Duration::from_secs(2);
        tune(&mut config);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let operator = tokio::spawn(operator::run(config, async move {
            let _ = stopped.await;
        }));
        let world = Self {
            db,
            kube,
            graph,
            client,
            namespace,
            http_port,
            stop: Some(stop),
            operator: Some(operator),
        };
        world.wait_ready().await;
        world
    }

    async fn wait_ready(&self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.http_port);
        let http = reqwest::Client::new();
        wait_for("the operator to be ready", PATIENCE, || async {
            let response = http.get(&url).send().await.ok()?;
            response.status().is_success().then_some(())
        })
        .await;
    }

    fn api(&self) -> Api<MailboxPoll> {
        self.api_in(&self.namespace)
    }

    fn api_in(&self, namespace: &str) -> Api<MailboxPoll> {
        Api::namespaced(self.client.clone(), namespace)
    }

    async fn credentials(&self, client_secret: &str) {
        self.credentials_in(&self.namespace, client_secret).await;
    }

    async fn credentials_in(&self, namespace: &str, client_secret: &str) {
        cluster::create_credentials(&self.client, namespace, SECRET, client_secret)
            .await
            .expect("credentials Secret");
    }

    async fn create(&self, name: &str, interval: &str, secret: &str) -> Uuid {
        self.create_in(&self.namespace, name, interval, secret)
            .await
    }

    async fn create_in(&self, namespace: &str, name: &str, interval: &str, secret: &str) -> Uuid {
        let created = self
            .api_in(namespace)
            .create(
                &PostParams::default(),
                &cluster::mailbox_poll(name, MAILBOX, interval, secret),
            )
            .await
            .expect("MailboxPoll created");
        Uuid::parse_str(&created.uid().expect("uid")).expect("uid is a UUID")
    }

    /// A MailboxPoll of [`MAILBOX`] every hour with credentials from [`SECRET`], its spec
    /// changed by `shape` first.
    async fn create_with(&self, name: &str, shape: impl FnOnce(&mut MailboxPollSpec)) -> Uuid {
        let mut poll = cluster::mailbox_poll(name, MAILBOX, "1h", SECRET);
        shape(&mut poll.spec);
        let created = self
            .api()
            .create(&PostParams::default(), &poll)
            .await
            .expect("MailboxPoll created");
        Uuid::parse_str(&created.uid().expect("uid")).expect("uid is a UUID")
    }

    /// A MailboxPoll delivering to `url` (no signing key).
    async fn create_delivering(&self, name: &str, url: &str) -> Uuid {
        self.create_with(name, |spec| {
            spec.delivery = Some(delivery(json!({"url": url})))
        })
        .await
    }

    /// Ledger rows of the MailboxPoll `name` (through its ledger identity).
    async fn ledger_rows(&self, name: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM messages m JOIN mailbox_identities i ON i.identity = m.mailbox_uid
             WHERE i.namespace = $1 AND i.name = $2",
        )
        .bind(&self.namespace)
        .bind(name)
        .fetch_one(&self.db.pool)
        .await
        .expect("ledger rows")
    }

    async fn cursors(&self, uid: Uuid) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM mailbox_cursors WHERE mailbox_uid = $1")
            .bind(uid)
            .fetch_one(&self.db.pool)
            .await
            .expect("cursor count")
    }

    async fn patch(&self, name: &str, patch: serde_json::Value) {
        self.patch_in(&self.namespace, name, patch).await;
    }

    async fn patch_in(&self, namespace: &str, name: &str, patch: serde_json::Value) {
        self.api_in(namespace)
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .expect("MailboxPoll patched");
    }

    async fn request_poll(&self, name: &str, value: &str) {
        self.request_poll_in(&self.namespace, name, value).await;
    }

    async fn request_poll_in(&self, namespace: &str, name: &str, value: &str) {
        self.patch_in(
            namespace,
            name,
            json!({"metadata": {"annotations": {POLL_REQUESTED_AT_ANNOTATION: value}}}),
        )
        .await;
    }

    /// Waits until the status satisfies `check`.
    async fn wait_status(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&MailboxPollStatus) -> bool,
    ) -> MailboxPollStatus {
        self.wait_status_in(&self.namespace, name, what, check)
            .await
    }

    /// Waits until the status of `namespace/name` satisfies `check`.
    async fn wait_status_in(
        &self,
        namespace: &str,
        name: &str,
        what: &str,
        check: impl Fn(&MailboxPollStatus) -> bool,
    ) -> MailboxPollStatus {
        let api = self.api_in(namespace);
        let found = try_wait_for(what, PATIENCE, || async {
            let status = api.get(name).await.ok()?.status?;
            check(&status).then_some(status)
        })
        .await;
        match found {
            Ok(status) => status,
            Err(error) => {
                let last = api.get(name).await.ok().and_then(|p| p.status);
                panic!("{error}; the status is {last:#?}")
            }
        }
    }

    async fn polls(&self, uid: Uuid) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM polls WHERE mailbox_uid = $1")
            .bind(uid)
            .fetch_one(&self.db.pool)
            .await
            .expect("count polls")
    }

    /// Finished polls of `uid`.
    async fn finished_polls(&self, uid: Uuid) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM polls WHERE mailbox_uid = $1 AND finished_at IS NOT NULL",
        )
        .bind(uid)
        .fetch_one(&self.db.pool)
        .await
        .expect("count finished polls")
    }

    /// Waits until the forced-poll request `value` of `uid` was served by a poll.
    async fn wait_served(&self, uid: Uuid, value: &str) {
        wait_until(
            format!("a poll to serve the request {value:?}"),
            PATIENCE,
            || async {
                sqlx::query_scalar::<_, bool>(
                    "SELECT served_at IS NOT NULL FROM poll_requests
                     WHERE mailbox_uid = $1 AND value = $2",
                )
                .bind(uid)
                .bind(value)
                .fetch_optional(&self.db.pool)
                .await
                .expect("poll request")
                .unwrap_or(false)
            },
        )
        .await;
    }

    /// What would make `uid` poll within the hour, if anything: a running poll task, a
    /// pending one due within the hour, or a forced-poll request not served yet.
    async fn poll_wanted(&self, uid: Uuid) -> Option<String> {
        sqlx::query_scalar(
            "SELECT 'a ' || state || ' poll task due at ' || run_at::text FROM tasks
              WHERE kind = 'poll' AND owner_uid = $1
                AND (state = 'running' OR (state = 'pending' AND run_at < now() + interval '1 hour'))
             UNION ALL
             SELECT 'the request ' || value || ', not served' FROM poll_requests
              WHERE mailbox_uid = $1 AND served_at IS NULL
             LIMIT 1",
        )
        .bind(uid)
        .fetch_optional(&self.db.pool)
        .await
        .expect("wanted polls")
    }

    /// Reconciles the operator has finished (any outcome), from `/metrics`.
    async fn reconciles(&self) -> u64 {
        self.metric_sum("mailpoll_reconciles_total{").await
    }

    /// The sum of the `/metrics` samples whose line starts with `prefix`.
    async fn metric_sum(&self, prefix: &str) -> u64 {
        let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.http_port))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        metrics
            .lines()
            .filter(|line| line.starts_with(prefix))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// A MailboxPoll with `deletionPolicy: Delete`.
    async fn create_doomed(&self, name: &str) -> Uuid {
        self.create_with(name, |spec| spec.deletion_policy = DeletionPolicy::Delete)
            .await
    }

    /// Rows left of a MailboxPoll `name` with object `uid`: `[ledger, identities, polls,
    /// ledger counters]`.
    async fn rows_of(&self, name: &str, uid: Uuid) -> [i64; 4] {
        sqlx::query_as::<_, (i64, i64, i64, i64)>(
            "SELECT (SELECT count(*) FROM messages m JOIN mailbox_identities i
                       ON i.identity = m.mailbox_uid WHERE i.namespace = $1 AND i.name = $2),
                    (SELECT count(*) FROM mailbox_identities WHERE namespace = $1 AND name = $2),
                    (SELECT count(*) FROM polls WHERE mailbox_uid = $3),
                    (SELECT count(*) FROM ledger_counts c JOIN mailbox_identities i
                       ON i.identity = c.ledger_id WHERE i.namespace = $1 AND i.name = $2)",
        )
        .bind(&self.namespace)
        .bind(name)
        .bind(uid)
        .fetch_one(&self.db.pool)
        .await
        .map(|(a, b, c, d)| [a, b, c, d])
        .expect("rows")
    }

    async fn live_poll_task(&self, uid: Uuid) -> Option<String> {
        sqlx::query_scalar(
            "SELECT state FROM tasks WHERE kind = 'poll' AND owner_uid = $1
             AND state IN ('pending', 'running')",
        )
        .bind(uid)
        .fetch_optional(&self.db.pool)
        .await
        .expect("live poll task")
    }

    async fn events(&self, name: &str) -> Vec<Event> {
        self.events_in(&self.namespace, name).await
    }

    async fn events_in(&self, namespace: &str, name: &str) -> Vec<Event> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), namespace);
        events
            .list(&ListParams::default())
            .await
            .expect("list Events")
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .collect()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(operator) = self.operator.take() {
            tokio::time::timeout(PATIENCE, operator)
                .await
                .expect("operator stops within the patience")
                .expect("operator task")
                .expect("operator stops cleanly");
        }
    }
}

/// `spec.delivery` with this webhook.
fn delivery(webhook: serde_json::Value) -> Delivery {
    serde_json::from_value(json!({ "webhook": webhook })).expect("delivery spec")
}

fn condition<'a>(status: &'a MailboxPollStatus, type_: &str) -> Option<(&'a str, &'a str)> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

fn is_ready(status: &MailboxPollStatus) -> bool {
    condition(status, "Ready") == Some(("True", "Polling"))
}

#[tokio::test]
async fn first_poll_records_messages_and_reports_ready_with_counts() {
    let world = World::start().await;
    world
        .graph
        .add_messages(MAILBOX, "inbox", 7)
        .expect("messages added");
    world.credentials(cluster::valid_client_secret()).await;
    let uid = world.create("support", "1h", SECRET).await;

    let status = world
        .wait_status("support", "Ready=True with 7 messages", |s| {
            is_ready(s) && s.messages_delivered == Some(7)
        })
        .await;
    assert_eq!(status.last_poll_messages, Some(7));
    assert_eq!(status.messages_pending, Some(0));
    assert_eq!(status.messages_failed, Some(0));
    assert!(status.last_poll_time.is_some());
    assert!(status.last_successful_poll_time.is_some());
    assert_eq!(condition(&status, "Degraded"), Some(("False", "Healthy")));
    let generation = world
        .api()
        .get("support")
        .await
        .expect("get")
        .metadata
        .generation;
    assert_eq!(status.observed_generation, generation);
    let next = world
        .wait_status("support", "nextPollTime set", |s| {
            s.next_poll_time.is_some()
        })
        .await
        .next_poll_time
        .expect("next poll");
    let last = status.last_poll_time.expect("last poll");
    let ahead = next.0.as_second() - last.0.as_second();
    assert!(
        (3590..=3610).contains(&ahead),
        "the next poll is one interval (1h) after the last, not {ahead} s"
    );
    assert_eq!(
        world.ledger_rows("support").await,
        7,
        "every message is recorded once"
    );
    assert_eq!(world.polls(uid).await, 1, "one scheduled poll, no more");

    let metrics = reqwest::get(format!("http://127.0.0.1:{}/metrics", world.http_port))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    for family in [
        "mailpoll_leader 1",
        "mailpoll_reconciles_total{outcome=\"success\"}",
        "mailpoll_polls_total{outcome=\"success\"} 1",
        "mailpoll_messages_recorded_total 7",
        "mailpoll_graph_requests_total{status=\"200\"}",
        "mailpoll_graph_request_duration_seconds_count",
        "mailpoll_poll_duration_seconds_count 1",
        "mailpoll_mailboxpoll_ready{namespace=",
        ",name=\"support\",reason=\"Polling\"} 1",
        "mailpoll_mailboxpoll_messages{",
    ] {
        assert!(
            metrics.contains(family),
            "/metrics lacks {family}:\n{metrics}"
        );
    }
    world.stop().await;
}

#[tokio::test]
async fn each_new_annotation_value_causes_exactly_one_poll() {
    let world = World::start().await;
    world.credentials(cluster::valid_client_secret()).await;
    // A long interval: every poll after the first is a forced one.
    let uid = world.create("forced", "24h", SECRET).await;
    world
        .wait_status("forced", "the first poll", is_ready)
        .await;
    assert_eq!(world.polls(uid).await, 1);

    let tries = 20;
    let mut polls = 1;
    // Annotation to poll start, printed only: how fast is the scheduling benchmark's
    // question; here it only has to happen within the patience.
    let mut latencies = Vec::with_capacity(tries);
    for i in 0..tries {
        let value = format!("request-{i}");
        let start = Instant::now();
        world.request_poll("forced", &value).await;
        wait_until(
            format!("the poll forced by {value:?} to start"),
            PATIENCE,
            || async { world.polls(uid).await > polls },
        )
        .await;
        latencies.push(start.elapsed());
        world.wait_served(uid, &value).await;
        polls += 1;
        // Counted from the first poll on: a late second poll for the previous value started
        // before this value's poll (one poll task is live at a time), so it shows here.
        assert_eq!(
            world.polls(uid).await,
            polls,
            "exactly one poll per value, up to {value:?}"
        );
    }
    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[(latencies.len() * 99).div_ceil(100) - 1];
    println!(
        "forced poll: annotation to poll start p50 {p50:?}, p99 {p99:?} over {tries} tries: {latencies:?}"
    );
    let status = world
        .wait_status("forced", "the last request echoed", |s| {
            s.last_handled_poll_request.as_deref() == Some("request-19")
        })
        .await;
    assert!(is_ready(&status));

    // The same value again, then an old value (with an unrelated label change), cause nothing.
    // Each patch also changes the spec (maxAttempts, which nothing here depends on): the
    // status's observedGeneration reaching the patch's generation is the barrier. It proves a
    // reconcile has run on an object carrying the value (a reconcile records the forced-poll
    // request before it writes the status), and a poll that value wrongly caused would have
    // to be running, pending within the hour or already counted by then.
    for (value, max_attempts, labels) in [
        ("request-19", 7, json!({})),
        ("request-3", 6, json!({"touched": "yes"})),
    ] {
        let generation = world
            .api()
            .patch(
                "forced",
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "metadata": {
                        "annotations": {POLL_REQUESTED_AT_ANNOTATION: value},
                        "labels": labels,
                    },
                    "spec": {"maxAttempts": max_attempts},
                })),
            )
            .await
            .expect("MailboxPoll patched")
            .metadata
            .generation;
        world
            .wait_status(
                "forced",
                &format!("the reconcile of generation {generation:?} ({value:?})"),
                |s| s.observed_generation == generation,
            )
            .await;
        assert_eq!(
            world.polls(uid).await,
            polls,
            "{value:?} was seen before: it causes no poll"
        );
        assert_eq!(
            world.poll_wanted(uid).await,
            None,
            "{value:?} was seen before: it wants no poll"
        );
    }
    // And a new value still polls, once: the next poll after the old values.
    world.request_poll("forced", "request-last").await;
    world.wait_served(uid, "request-last").await;
    assert_eq!(
        world.polls(uid).await,
        polls + 1,
        "one poll for the new value, none for the old ones"
    );
    world.stop().await;
}

#[tokio::test]
async fn suspend_stops_scheduled_polls_but_not_forced_ones() {
    let world = World::start().await;
    world.credentials(cluster::valid_client_secret()).await;
    let uid = world.create("paused", "10s", SECRET).await;
    world
        .wait_status("paused", "the first poll", is_ready)
        .await;

    world
        .patch("paused", json!({"spec": {"suspend": true}}))
        .await;
    world
        .wait_status("paused", "nextPollTime cleared while suspended", |s| {
            s.next_poll_time.is_none()
        })
        .await;
    assert_eq!(
        world.live_poll_task(uid).await,
        None,
        "no poll is scheduled while suspended"
    );
    let before = world.polls(uid).await;

    world.request_poll("paused", "while-suspended").await;
    world
        .wait_status("paused", "the forced poll while suspended", |s| {
            s.last_handled_poll_request.as_deref() == Some("while-suspended")
        })
        .await;
    assert_eq!(
        world.polls(uid).await,
        before + 1,
        "the forced poll ran once"
    );
    assert_eq!(
        world.live_poll_task(uid).await,
        None,
        "still nothing scheduled after the forced poll"
    );

    world
        .patch("paused", json!({"spec": {"suspend": false}}))
        .await;
    world
        .wait_status("paused", "nextPollTime back after resume", |s| {
            s.next_poll_time.is_some()
        })
        .await;
    wait_for("a scheduled poll after resume", PATIENCE, || async {
        (world.polls(uid).await > before + 1).then_some(())
    })
    .await;
    world.stop().await;
}

#[tokio::test]
async fn missing_secret_is_reported_once_and_recovers_without_restart() {
    let world = World::start().await;
    world.create("nosecret", "1h", SECRET).await;
    let status = world
        .wait_status("nosecret", "Ready=False SecretNotFound", |s| {
            condition(s, "Ready") == Some(("False", "SecretNotFound"))
        })
        .await;
    let message = &status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready")
        .message;
    assert!(
        message.contains(SECRET),
        "the message names the Secret: {message}"
    );
    // Several reconciles pass while the Secret is missing (they requeue every second). The
    // reconcile counter is the barrier: a reconcile is counted when it returns, after the
    // Events it published were accepted by the API server, so once three more are counted
    // any Event they repeated is there to be seen.
    let reconciled = world.reconciles().await;
    wait_until(
        "three more reconciles while the Secret is missing",
        PATIENCE,
        || async { world.reconciles().await >= reconciled + 3 },
    )
    .await;
    let events = world.events("nosecret").await;
    let reasons: Vec<_> = events.iter().map(|e| e.reason.clone()).collect();
    assert_eq!(
        reasons,
        [Some("SecretNotFound".to_string())],
        "exactly one Event while the Secret is missing"
    );
    // A repeat of the same Event is not a new Event: the recorder adds it to the first one's
    // series.
    assert!(
        events.iter().all(|e| e.series.is_none()),
        "the Event was published once, not repeated: {events:#?}"
    );

    world.credentials(cluster::valid_client_secret()).await;
    world
        .wait_status("nosecret", "Ready=True once the Secret exists", is_ready)
        .await;
    let reasons: Vec<String> = wait_for("the Recovered Event", PATIENCE, || async {
        let reasons: Vec<String> = world
            .events("nosecret")
            .await
            .into_iter()
            .filter_map(|e| e.reason)
            .collect();
        reasons.iter().any(|r| r == "Recovered").then_some(reasons)
    })
    .await;
    assert_eq!(
        reasons.iter().filter(|r| *r == "SecretNotFound").count(),
        1,
        "{reasons:?}"
    );
    world.stop().await;
}

#[tokio::test]
async fn wrong_client_secret_is_authentication_failed() {
    let world = World::start().await;
    world.credentials("not-the-secret").await;
    world.create("badauth", "1h", SECRET).await;
    let status = world
        .wait_status("badauth", "Ready=False AuthenticationFailed", |s| {
            condition(s, "Ready") == Some(("False", "AuthenticationFailed"))
        })
        .await;
    let text = serde_json::to_string(&status).expect("status JSON");
    assert!(
        !text.contains("not-the-secret"),
        "no secret in the status: {text}"
    );
    wait_for("the AuthenticationFailed Event", PATIENCE, || async {
        let events = world.events("badauth").await;
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("AuthenticationFailed"))
            .then_some(())
    })
    .await;
    for event in world.events("badauth").await {
        let note = event.note.unwrap_or_default();
        assert!(
            !note.contains("not-the-secret"),
            "no secret in Events: {note}"
        );
    }
    world.stop().await;
}

/// README: "a poll costs one status write". Over several scheduled polls of an idle
/// MailboxPoll at the shortest interval, the Kubernetes emulator's request record holds no API
/// write but status writes (the Lease aside), and no more of them than polls.
#[tokio::test]
async fn a_poll_costs_one_status_write() {
    let world = World::start().await;
    world.credentials(cluster::valid_client_secret()).await;
    let uid = world.create("idle", "10s", SECRET).await;
    // The first poll's write (its outcome and the next poll's time) is in before the count
    // starts.
    world
        .wait_status("idle", "the first poll and the next one planned", |s| {
            is_ready(s) && s.next_poll_time.is_some()
        })
        .await;
    let reconciles_before = world.reconciles().await;
    let (polls, status_writes, writes) = count_status_writes(&world, uid, 3).await;
    let reconciles = world.reconciles().await - reconciles_before;
    println!(
        "idle MailboxPoll at 10s: {polls} polls finished, {reconciles} reconciles, {status_writes} status writes, {} API writes in all: {writes:?}",
        writes.len()
    );
    assert!(polls >= 3, "scheduled polls kept running ({polls})");
    // The poll's end, announced, is reconciled once its task's completion has landed: no
    // look at the due time to see it running, none to see it finishing.
    assert!(
        reconciles <= 2 * u64::try_from(polls).expect("small"),
        "about one reconcile per poll: {reconciles} reconciles for {polls} polls"
    );
    assert_eq!(
        status_writes,
        writes.len(),
        "an idle MailboxPoll's only API writes are its status writes: {writes:?}"
    );
    assert!(
        i64::try_from(status_writes).expect("small") <= polls,
        "at most one status write per poll: {status_writes} writes for {polls} polls"
    );
    world.stop().await;
}

/// Status writes of `uid`'s polls: counted from a finished poll until the poll after
/// `counted` more has started, so every write the counted polls caused is in the record.
/// Returns (polls finished, status writes, every API write but Leases).
async fn count_status_writes(world: &World, uid: Uuid, counted: i64) -> (i64, usize, Vec<String>) {
    let started_before = world.polls(uid).await;
    let finished_before = world.finished_polls(uid).await;
    world.kube.clear_requests();
    wait_until(
        format!("{} more scheduled polls", counted + 1),
        PATIENCE + Duration::from_secs(10 * (counted as u64 + 1)),
        || async { world.polls(uid).await > started_before + counted },
    )
    .await;
    let records = world.kube.requests();
    // Counted after the record was read: a poll's write follows its end.
    let polls = world.finished_polls(uid).await - finished_before;
    let writes: Vec<String> = records
        .iter()
        .filter(|r| matches!(r.verb.as_str(), "create" | "update" | "patch" | "delete"))
        .filter(|r| r.group != "coordination.k8s.io")
        .map(|r| r.rbac_key())
        .collect();
    let status_writes = writes
        .iter()
        .filter(|w| {
            *w == "patch mailpoll.dev/mailboxpolls/status"
                || *w == "update mailpoll.dev/mailboxpolls/status"
        })
        .count();
    (polls, status_writes, writes)
}

/// Mail arrives between polls: a poll and the deliveries it starts still cost one status
/// write, which shows both (the write waits for the deliveries, up to a bound), even with the
/// controller looking at pending messages every second.
#[tokio::test]
async fn a_poll_with_mail_and_its_deliveries_cost_one_status_write() {
    let world = World::start_tuned(
        Scope::All,
        EgressGuard::new(EgressPolicy::allowing_loopback()),
        |config| {
            config.leader_work.reconcile.pending_requeue = Duration::from_secs(1);
            // Loopback deliveries take milliseconds; the bound is generous for a loaded CI.
            config.leader_work.reconcile.delivery_hold = Duration::from_secs(8);
        },
    )
    .await;
    let receiver = WebhookReceiver::start(None)
        .await
        .expect("webhook receiver");
    world.credentials(cluster::valid_client_secret()).await;
    let uid = world
        .create_with("busy", |spec| {
            spec.interval = "10s".into();
            spec.delivery = Some(delivery(json!({"url": receiver.url()})));
        })
        .await;
    world
        .wait_status("busy", "the first poll and the next one planned", |s| {
            is_ready(s) && s.next_poll_time.is_some()
        })
        .await;
    let arriving = async {
        loop {
            world
                .graph
                .add_messages(MAILBOX, "inbox", 1)
                .expect("a message arrives");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    };
    let (polls, status_writes, writes) = tokio::select! {
        counted = count_status_writes(&world, uid, 3) => counted,
        _ = arriving => unreachable!("mail keeps arriving"),
    };
    println!(
        "MailboxPoll at 10s with mail: {polls} polls finished, {status_writes} status writes: {writes:?}"
    );
    assert!(polls >= 3, "scheduled polls kept running ({polls})");
    assert!(
        !receiver.successes().is_empty(),
        "mail was delivered meanwhile"
    );
    assert_eq!(
        status_writes,
        writes.len(),
        "only status writes: {writes:?}"
    );
    assert!(
        i64::try_from(status_writes).expect("small") <= polls,
        "at most one status write per poll: {status_writes} writes for {polls} polls"
    );
    world.stop().await;
}

#[tokio::test]
async fn deleting_a_mailbox_poll_sweeps_its_tasks_and_cursor_and_keeps_the_ledger() {
    let world = World::start().await;
    world
        .graph
        .add_messages(MAILBOX, "inbox", 2)
        .expect("messages added");
    world.credentials(cluster::valid_client_secret()).await;
    let uid = world.create("doomed", "1h", SECRET).await;
    world
        .wait_status("doomed", "the first poll", |s| {
            is_ready(s) && s.next_poll_time.is_some()
        })
        .await;
    assert_eq!(world.live_poll_task(uid).await.as_deref(), Some("pending"));

    world
        .api()
        .delete("doomed", &Default::default())
        .await
        .expect("MailboxPoll deleted");
    wait_for(
        "the sweep of the deleted MailboxPoll's cursor and pending poll",
        PATIENCE,
        || async {
            let cursors: i64 =
                sqlx::query_scalar("SELECT count(*) FROM mailbox_cursors WHERE mailbox_uid = $1")
                    .bind(uid)
                    .fetch_one(&world.db.pool)
                    .await
                    .ok()?;
            (cursors == 0 && world.live_poll_task(uid).await.is_none()).then_some(())
        },
    )
    .await;
    assert_eq!(
        world.ledger_rows("doomed").await,
        2,
        "the ledger outlives the MailboxPoll"
    );
    world.stop().await;
}

/// `deletionPolicy: Delete` purges a deleted MailboxPoll's ledger, counters, poll history and
/// identity, and nothing of its neighbours; removing the CRD (which deletes every MailboxPoll)
/// makes the sweep refuse, so the remaining `Delete` ledgers survive it.
#[tokio::test]
async fn the_delete_policy_purges_a_deleted_mailbox_poll_but_a_removed_crd_purges_nothing() {
    let world = World::start().await;
    world
        .graph
        .add_messages(MAILBOX, "inbox", 3)
        .expect("messages added");
    world.credentials(cluster::valid_client_secret()).await;
    let doomed = world.create_doomed("doomed").await;
    let survivor = world.create_doomed("survivor").await;
    let kept = world.create("kept", "1h", SECRET).await;
    for name in ["doomed", "survivor", "kept"] {
        world
            .wait_status(name, "the first poll", |s| {
                is_ready(s) && s.next_poll_time.is_some()
            })
            .await;
    }
    assert_eq!(world.rows_of("doomed", doomed).await, [3, 1, 1, 1]);

    world
        .api()
        .delete("doomed", &Default::default())
        .await
        .expect("MailboxPoll deleted");
    wait_for("the Delete policy's purge", PATIENCE, || async {
        (world.rows_of("doomed", doomed).await == [0, 0, 0, 0]).then_some(())
    })
    .await;
    assert_eq!(world.rows_of("survivor", survivor).await, [3, 1, 1, 1]);
    assert_eq!(world.rows_of("kept", kept).await, [3, 1, 1, 1]);

    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(world.client.clone());
    crds.delete("mailboxpolls.mailpoll.dev", &Default::default())
        .await
        .expect("CRD deleted");
    // Sweeps run every second: three refusals are three sweeps that purged nothing.
    wait_until("sweeps refused for the missing CRD", PATIENCE, || async {
        world
            .metric_sum("mailpoll_sweep_refusals_total{reason=\"CrdMissing\"}")
            .await
            >= 3
    })
    .await;
    assert_eq!(
        world.rows_of("survivor", survivor).await,
        [3, 1, 1, 1],
        "a Delete ledger survives the CRD's removal"
    );
    assert_eq!(world.rows_of("kept", kept).await, [3, 1, 1, 1]);
    world.stop().await;
}

/// Deleting a MailboxPoll and creating it again with the same namespace, name, mailbox and
/// folder (a GitOps re-sync, a restore, a cluster move) continues its ledger: what was
/// delivered is not delivered again, and new mail gets keys of the same ledger. Forgetting the
/// identity on purpose starts a new ledger.
#[tokio::test]
async fn a_recreated_mailbox_poll_continues_its_ledger_and_keys() {
    let world = World::start().await;
    let receiver = WebhookReceiver::start(None)
        .await
        .expect("webhook receiver");
    world
        .graph
        .add_messages(MAILBOX, "inbox", 3)
        .expect("messages added");
    world.credentials(cluster::valid_client_secret()).await;
    let first = world.create_delivering("orders", &receiver.url()).await;
    world
        .wait_status("orders", "the first delivery", |s| {
            s.messages_delivered == Some(3)
        })
        .await;
    let keys_before: HashSet<String> = receiver.successes().into_keys().collect();
    assert_eq!(keys_before.len(), 3);

    world
        .api()
        .delete("orders", &Default::default())
        .await
        .expect("MailboxPoll deleted");
    wait_until("the sweep of the deleted MailboxPoll", PATIENCE, || async {
        world.live_poll_task(first).await.is_none() && world.cursors(first).await == 0
    })
    .await;
    world
        .graph
        .add_messages(MAILBOX, "inbox", 2)
        .expect("more mail");
    let second = world.create_delivering("orders", &receiver.url()).await;
    assert_ne!(first, second, "a new object");
    world
        .wait_status("orders", "the new mail's delivery", |s| {
            s.messages_delivered == Some(5)
        })
        .await;
    assert_eq!(
        world.ledger_rows("orders").await,
        5,
        "one ledger, continued"
    );
    let keys_after = receiver.successes();
    assert_eq!(
        keys_after.len(),
        5,
        "the first three were not delivered again"
    );
    assert!(keys_before.iter().all(|key| keys_after.contains_key(key)));
    assert!(
        keys_after.values().all(|&n| n == 1),
        "no key twice: {keys_after:?}"
    );

    // Starting over on purpose: forget the identity, re-create, and the folder is new mail.
    world
        .api()
        .delete("orders", &Default::default())
        .await
        .expect("MailboxPoll deleted again");
    wait_until(
        "the sweep of the re-created MailboxPoll",
        PATIENCE,
        || async {
            world.live_poll_task(second).await.is_none() && world.cursors(second).await == 0
        },
    )
    .await;
    let forgotten = mailpoll::identity::forget(&world.db.pool, &world.namespace, "orders")
        .await
        .expect("forget");
    assert_eq!(forgotten, 1);
    world.create_delivering("orders", &receiver.url()).await;
    world
        .wait_status("orders", "the fresh ledger's deliveries", |s| {
            s.messages_delivered == Some(5)
        })
        .await;
    assert_eq!(
        receiver.successes().len(),
        10,
        "a new ledger gives new keys"
    );
    world.stop().await;
}

/// A webhook whose URL, extra headers and signing secret all come from Secrets: deliveries
/// carry them, and a value that cannot work (binary junk in a header, a Secret the operator
/// may not read) is a condition naming the Secret and key, never showing a value.
#[tokio::test]
async fn webhook_credentials_come_from_secrets_and_bad_ones_are_explained() {
    let world = World::start().await;
    let receiver = WebhookReceiver::start(Some(TEST_SIGNING_SECRET))
        .await
        .expect("webhook receiver");
    world
        .graph
        .add_messages(MAILBOX, "inbox", 2)
        .expect("messages added");
    world.credentials(cluster::valid_client_secret()).await;
    let url = format!("{}?sig=s3cr3t-sig", receiver.url());
    put_secret(&world, "hook-url", &[("url", &url)]).await;
    put_secret(&world, "hook-headers", &[("Authorization", "Bearer t0k3n")]).await;
    put_secret(
        &world,
        "hook-signing",
        &[("signingSecret", TEST_SIGNING_SECRET)],
    )
    .await;
    world
        .create_with("hooked", |spec| {
            spec.delivery = Some(delivery(json!({
                "urlSecretRef": {"name": "hook-url"},
                "headersSecretRef": {"name": "hook-headers"},
                "signingSecretRef": {"name": "hook-signing"}
            })))
        })
        .await;
    world
        .wait_status("hooked", "both messages delivered", |s| {
            s.messages_delivered == Some(2)
        })
        .await;
    let keys: Vec<String> = receiver.successes().into_keys().collect();
    assert_eq!(keys.len(), 2);
    for key in &keys {
        let headers = receiver.headers_of(key).expect("delivered");
        assert_eq!(headers["authorization"], "Bearer t0k3n");
        assert_eq!(receiver.query_of(key).as_deref(), Some("sig=s3cr3t-sig"));
    }
    assert_eq!(receiver.bad_signatures(), 0, "signed with the Secret's key");

    put_secret_bytes(
        &world,
        "hook-headers",
        &[(
            "Authorization",
            b"Bearer t0k3n\x00\xff\x1b[31m\r\nX-Injected: 1",
        )],
    )
    .await;
    // Secrets are not watched: the next poll reads them again, once the cached read is stale.
    tokio::time::sleep(SECRET_TTL).await;
    world.request_poll("hooked", "after-junk").await;
    let status = world
        .wait_status("hooked", "Ready=False InvalidWebhook", |s| {
            condition(s, "Ready") == Some(("False", "InvalidWebhook"))
        })
        .await;
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert!(
        ready.message.contains("hook-headers") && ready.message.contains("\"Authorization\""),
        "the message names the Secret and key: {}",
        ready.message
    );

    put_secret(&world, "hook-headers", &[("Authorization", "Bearer t0k3n")]).await;
    world
        .kube
        .inject_failure(Some("get"), Some("secrets"), 100_000, 403);
    tokio::time::sleep(SECRET_TTL).await;
    world.request_poll("hooked", "after-forbidden").await;
    let status = world
        .wait_status("hooked", "Ready=False SecretForbidden", |s| {
            condition(s, "Ready") == Some(("False", "SecretForbidden"))
        })
        .await;
    let forbidden = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert!(
        forbidden.message.contains("RoleBinding"),
        "the message says what to grant: {}",
        forbidden.message
    );
    world.kube.clear_faults();
    world
        .wait_status(
            "hooked",
            "Ready=True once the Secrets are readable",
            is_ready,
        )
        .await;

    let shown = format!(
        "{} {:?}",
        serde_json::to_string(&world.api().get("hooked").await.expect("MailboxPoll"))
            .expect("JSON"),
        world.events("hooked").await
    );
    for secret in ["t0k3n", "s3cr3t-sig", TEST_SIGNING_SECRET] {
        assert!(!shown.contains(secret), "{secret} leaked: {shown}");
    }
    let reasons: Vec<String> = world
        .events("hooked")
        .await
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(
        reasons.iter().any(|r| r == "InvalidWebhook")
            && reasons.iter().any(|r| r == "SecretForbidden"),
        "{reasons:?}"
    );
    world.stop().await;
}

/// A new MailboxPoll is observed at once (`Ready=Unknown`, reason `Reconciling`, its
/// generation observed), not only when its first poll has finished: `kubectl wait` and GitOps
/// health checks see it.
#[tokio::test]
async fn a_new_mailbox_poll_is_observed_at_once_as_reconciling() {
    let world = World::start().await;
    world.credentials(cluster::valid_client_secret()).await;
    world
        .graph
        .add_messages(MAILBOX, "inbox", 2)
        .expect("messages added");
    // A slow first poll, so its end cannot be what writes the first status.
    world
        .graph
        .update_faults(|faults| faults.slow_page_ms = 4000);
    world.create("fresh", "1h", SECRET).await;
    let status = world
        .wait_status("fresh", "Ready=Unknown Reconciling", |s| {
            condition(s, "Ready") == Some(("Unknown", "Reconciling"))
        })
        .await;
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        condition(&status, "Stalled"),
        Some(("False", "Progressing"))
    );
    assert!(status.last_poll_time.is_none(), "no poll has finished yet");
    world.graph.update_faults(|faults| faults.slow_page_ms = 0);
    world.wait_status("fresh", "Ready=True", is_ready).await;
    world.stop().await;
}

/// A spec change is observed at once, even while a poll runs: `observedGeneration` reaches
/// the new generation before that poll has finished.
#[tokio::test]
async fn a_spec_change_is_observed_at_once_while_a_poll_runs() {
    let world = World::start().await;
    world.credentials(cluster::valid_client_secret()).await;
    let uid = world.create("busy", "1h", SECRET).await;
    world.wait_status("busy", "Ready=True", is_ready).await;
    assert_eq!(world.finished_polls(uid).await, 1);
    // A forced poll that stays running while the spec changes.
    world
        .graph
        .update_faults(|faults| faults.slow_page_ms = 8000);
    world.request_poll("busy", "slow-one").await;
    wait_until("the forced poll to run", PATIENCE, || async {
        world.live_poll_task(uid).await.as_deref() == Some("running")
    })
    .await;
    world
        .patch("busy", json!({"spec": {"interval": "2h"}}))
        .await;
    let status = world
        .wait_status("busy", "observedGeneration 2", |s| {
            s.observed_generation == Some(2)
        })
        .await;
    assert_eq!(
        world.finished_polls(uid).await,
        1,
        "the running poll has not finished: it is not what wrote the new generation"
    );
    assert_eq!(world.live_poll_task(uid).await.as_deref(), Some("running"));
    assert!(is_ready(&status), "readiness still shows the last poll");
    world.graph.update_faults(|faults| faults.slow_page_ms = 0);
    wait_until("the forced poll to finish", PATIENCE, || async {
        world.finished_polls(uid).await == 2
    })
    .await;
    world.stop().await;
}

/// Workers saturated (one worker, held by a slow poll): the MailboxPolls whose polls are due
/// wait, and the controller looks at each after a delay that grows with its lateness rather
/// than every second. Over the window each overdue MailboxPoll is reconciled when created and
/// then at lateness 1, 2, 4 and 8 s (the wait doubles as the lateness does), at most 6 times;
/// a look every second would be 15 or more.
#[tokio::test]
async fn overdue_polls_under_saturated_workers_are_not_reconciled_in_a_hot_loop() {
    let world = World::start_tuned(
        Scope::All,
        EgressGuard::new(EgressPolicy::allowing_loopback()),
        |config| {
            config.workers.concurrency = 1;
            config.workers.prefetch = 0;
            config.leader_work.reconcile.overdue = Duration::from_secs(1);
        },
    )
    .await;
    world.credentials(cluster::valid_client_secret()).await;
    world
        .graph
        .update_faults(|faults| faults.slow_page_ms = 30_000);
    let blocker = world.create("blocker", "1h", SECRET).await;
    wait_until("the blocking poll to run", PATIENCE, || async {
        world.live_poll_task(blocker).await.as_deref() == Some("running")
    })
    .await;
    let before = world.reconciles().await;
    const WAITING: u64 = 4;
    let mut waiting = Vec::new();
    for n in 0..WAITING {
        waiting.push(world.create(&format!("waiting-{n}"), "1h", SECRET).await);
    }
    tokio::time::sleep(Duration::from_secs(15)).await;
    let reconciles = world.reconciles().await - before;
    for uid in &waiting {
        assert_eq!(
            world.live_poll_task(*uid).await.as_deref(),
            Some("pending"),
            "the workers stayed saturated for the whole window"
        );
    }
    // Each waiting MailboxPoll: its creation and at most five looks; the blocker: at most two
    // fallback looks while it runs (every 10 s).
    let bound = WAITING * 6 + 2;
    assert!(
        reconciles <= bound,
        "{reconciles} reconciles in 15 s for {WAITING} overdue MailboxPolls (at most {bound})"
    );
    assert!(
        reconciles >= WAITING,
        "every new MailboxPoll was reconciled ({reconciles})"
    );
    world.graph.update_faults(|faults| faults.slow_page_ms = 0);
    world.stop().await;
}

/// The leader's controller and the workers' directory share the replica's one watch of
/// MailboxPolls: one LIST and one WATCH of them, not one each.
#[tokio::test]
async fn the_leader_keeps_one_watch_of_mailbox_polls() {
    let world = World::start().await;
    world.credentials(cluster::valid_client_secret()).await;
    world.create("shared", "1h", SECRET).await;
    // Ready: the controller (leader only) has reconciled it, so both users of the watch run.
    world.wait_status("shared", "Ready=True", is_ready).await;
    let records = world.kube.requests();
    let watches = records
        .iter()
        .filter(|r| r.resource == "mailboxpolls" && r.verb == "watch")
        .count();
    assert_eq!(watches, 1, "one watch of MailboxPolls");
    world.stop().await;
}

/// The API server goes silent: the replica's watches of MailboxPolls stay open and send
/// nothing. The client's read timeout (12 s here, longer than the emulator's 10 s bookmarks)
/// gives up on each; the second one in a row without an answer makes the replica unready. Once
/// the API server answers again, the watch resumes: a MailboxPoll created during the silence is
/// seen and polled, and the replica is ready again.
#[tokio::test]
async fn a_silent_watch_is_given_up_and_a_mailbox_poll_created_meanwhile_is_polled() {
    let world = World::start_tuned(
        Scope::All,
        EgressGuard::new(EgressPolicy::allowing_loopback()),
        |config| config.kube_read_timeout = Duration::from_secs(12),
    )
    .await;
    world.credentials(cluster::valid_client_secret()).await;
    world.create("before", "1h", SECRET).await;
    world.wait_status("before", "Ready=True", is_ready).await;

    world.kube.silence_watches(true);
    let after = world.create("after", "1h", SECRET).await;
    let http = reqwest::Client::new();
    let readyz = format!("http://127.0.0.1:{}/readyz", world.http_port);
    wait_for(
        "the replica to turn unready while its watch stays silent",
        Duration::from_secs(60),
        || async {
            let response = http.get(&readyz).send().await.ok()?;
            (!response.status().is_success()).then_some(())
        },
    )
    .await;
    assert_eq!(world.finished_polls(after).await, 0, "not seen yet");
    // The open watches stay silent; the ones the operator opens next are answered.
    world.kube.silence_watches(false);
    let polled = try_wait_for(
        "the MailboxPoll created during the silence to be polled",
        Duration::from_secs(60),
        || async { (world.finished_polls(after).await == 1).then_some(()) },
    )
    .await;
    assert!(polled.is_ok(), "{polled:?}");
    world.wait_ready().await;
    world.wait_status("after", "Ready=True", is_ready).await;
    world.stop().await;
}

/// The status is written by server-side apply with the controller's field manager: a
/// condition another manager applies stays through the controller's later writes.
#[tokio::test]
async fn the_status_is_applied_and_other_managers_conditions_stay() {
    let world = World::start().await;
    world.credentials(cluster::valid_client_secret()).await;
    let uid = world.create("shared-status", "1h", SECRET).await;
    world
        .wait_status("shared-status", "Ready=True", is_ready)
        .await;
    let applied = json!({
        "apiVersion": "mailpoll.dev/v1alpha1", "kind": "MailboxPoll",
        "metadata": {"name": "shared-status"},
        "status": {"conditions": [{
            "type": "Synced", "status": "True", "reason": "InGit", "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z"
        }]},
    });
    world
        .api()
        .patch_status(
            "shared-status",
            &PatchParams::apply("gitops-agent"),
            &Patch::Apply(&applied),
        )
        .await
        .expect("another manager's condition");
    world
        .graph
        .add_messages(MAILBOX, "inbox", 1)
        .expect("messages added");
    world.request_poll("shared-status", "again").await;
    let status = world
        .wait_status("shared-status", "the second poll's status", |s| {
            s.last_poll_messages == Some(1)
        })
        .await;
    assert_eq!(world.finished_polls(uid).await, 2);
    assert_eq!(condition(&status, "Synced"), Some(("True", "InGit")));
    assert!(is_ready(&status));
    let poll = world.api().get("shared-status").await.expect("get");
    let managers: Vec<(String, String, String)> = poll
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .map(|m| {
            (
                m.manager.unwrap_or_default(),
                m.operation.unwrap_or_default(),
                m.subresource.unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        managers.contains(&(
            "mailpoll-controller".into(),
            "Apply".into(),
            "status".into()
        )),
        "{managers:?}"
    );
    world.stop().await;
}

/// An app without Mail.ReadWrite: mail is polled and delivered, but Graph refuses the
/// after-actions with 403. The refusal shows at once (Degraded and Stalled with Graph's
/// reason, a warning Event of the after-delivery step), the messages are not tried one by one
/// until each runs out, and once the permission is granted a forced poll brings them back. A
/// `$batch` refused whole by a tenant policy shows the same way.
#[tokio::test]
async fn after_actions_refused_by_graph_are_shown_with_graphs_reason() {
    let world = World::start().await;
    // Tokens short-lived, so a permission granted in Entra reaches the operator soon (a real
    // token keeps its roles for about an hour).
    world
        .graph
        .update_faults(|faults| faults.token_lifetime_secs = 2);
    world.graph.add_app(AppRegistration {
        roles: vec!["Mail.Read".into()],
        ..default_app()
    });
    world
        .graph
        .add_messages(MAILBOX, "inbox", 3)
        .expect("messages added");
    world.credentials(cluster::valid_client_secret()).await;
    world
        .create_with("readonly", |spec| {
            spec.after_delivery = Some(AfterDelivery {
                mark_as_read: true,
                move_to_folder: None,
            })
        })
        .await;
    let refused = |s: &MailboxPollStatus| {
        condition(s, "Degraded") == Some(("True", "AccessDenied"))
            && condition(s, "Stalled") == Some(("True", "AccessDenied"))
    };
    let status = world
        .wait_status("readonly", "all three parked, AccessDenied", |s| {
            refused(s) && s.messages_failed == Some(3)
        })
        .await;
    assert!(is_ready(&status), "polling itself works: {status:?}");
    // Parked at the first refusal: no message was tried twice (the deliveries may have
    // reached one actions run or several, one $batch each).
    let batches_before = world.graph.counters().batches;
    assert!(
        (1..=3).contains(&batches_before),
        "{batches_before} $batch requests for three messages"
    );
    let event = wait_for("the AccessDenied Event", PATIENCE, || async {
        world
            .events("readonly")
            .await
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("AccessDenied"))
    })
    .await;
    assert_eq!(event.action.as_deref(), Some("AfterDelivery"));
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(
        event
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("Mail.ReadWrite"),
        "the Event says which permission is missing: {event:?}"
    );

    // Granted; a forced poll retries the parked actions, with a token that has the role.
    world.graph.add_app(default_app());
    tokio::time::sleep(Duration::from_secs(3)).await;
    world.request_poll("readonly", "after-grant").await;
    let status = world
        .wait_status("readonly", "the actions done", |s| {
            s.messages_delivered == Some(3)
                && condition(s, "Stalled") == Some(("False", "Progressing"))
        })
        .await;
    assert_eq!(condition(&status, "Degraded"), Some(("False", "Healthy")));
    assert_eq!(status.messages_failed, Some(0));
    assert!(
        world.graph.counters().batches > batches_before,
        "the actions ran again"
    );

    // A tenant policy refuses every $batch envelope.
    world.graph.update_faults(|faults| {
        faults.batch = BatchFaults {
            fail_next: 1000,
            status: 403,
            ..BatchFaults::default()
        }
    });
    world
        .graph
        .add_messages(MAILBOX, "inbox", 2)
        .expect("more mail");
    world.request_poll("readonly", "under-policy").await;
    world
        .wait_status("readonly", "both new messages parked AccessDenied", |s| {
            refused(s) && s.messages_failed == Some(2)
        })
        .await;
    world.stop().await;
}

/// A webhook whose host resolves to a loopback address: the Ready condition and an Event say
/// which rule refuses it (never the URL's secret), scheduled polls pause, a forced poll's
/// deliveries fail at once without reaching the receiver, and a new URL clears it.
#[tokio::test]
async fn a_refused_webhook_destination_is_a_condition_and_nothing_reaches_it() {
    let receiver = WebhookReceiver::start(None)
        .await
        .expect("webhook receiver");
    let port = receiver.port();
    let names = [
        ("hooks.rebind.example.", "127.0.0.1"),
        ("hooks.public.example.", "203.0.113.7"),
    ];
    let egress = FixedLookup::guard(EgressPolicy::default(), &names).expect("lookup table");
    let world = World::start_with(Scope::All, egress).await;
    world
        .graph
        .add_messages(MAILBOX, "inbox", 2)
        .expect("messages added");
    world.credentials(cluster::valid_client_secret()).await;
    let uid = world
        .create_delivering(
            "refused",
            &format!("https://hooks.rebind.example:{port}/hook?sig=s3cret"),
        )
        .await;
    let expected = "webhook host hooks.rebind.example resolves to 127.0.0.1, a loopback address; \
                    the operator does not allow loopback destinations (--webhook-allow-loopback)";
    let status = world
        .wait_status("refused", "the refused destination", |s| {
            condition(s, "Ready") == Some(("False", "WebhookForbidden"))
        })
        .await;
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.message, expected);
    assert_eq!(
        condition(&status, "Stalled"),
        Some(("True", "WebhookForbidden")),
        "progress waits for a person"
    );
    let events = world.events("refused").await;
    let warning = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("WebhookForbidden"))
        .unwrap_or_else(|| panic!("a WebhookForbidden Event: {events:?}"));
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert_eq!(
        warning.note.as_deref(),
        Some(format!("WebhookForbidden: {expected}").as_str())
    );
    assert_eq!(
        world.polls(uid).await,
        0,
        "scheduled polls wait for a usable destination"
    );

    // A forced poll still runs; each of its deliveries fails at its first attempt.
    world.request_poll("refused", "1").await;
    let status = world
        .wait_status("refused", "the failed deliveries", |s| {
            s.messages_failed == Some(2)
        })
        .await;
    assert_eq!(
        condition(&status, "Ready"),
        Some(("False", "WebhookForbidden"))
    );
    let tasks: Vec<(String, i32, Option<String>)> = sqlx::query_as(
        "SELECT state, attempts, last_error FROM tasks WHERE kind = 'deliver' AND owner_uid = $1",
    )
    .bind(uid)
    .fetch_all(&world.db.pool)
    .await
    .expect("deliver tasks");
    assert_eq!(
        tasks,
        vec![("dead".to_owned(), 1, Some(expected.to_owned())); 2]
    );
    assert_eq!(receiver.connections(), 0, "nothing reached the receiver");
    let events = world.events("refused").await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("DeliveryFailed")),
        "{events:?}"
    );
    for event in events {
        let note = event.note.unwrap_or_default();
        assert!(
            !note.contains("s3cret") && !note.contains("/hook"),
            "{note}"
        );
    }

    // A destination the policy allows clears the condition.
    world
        .patch(
            "refused",
            json!({"spec": {"delivery": {"webhook": {"url": format!("https://hooks.public.example:{port}/hook")}}}}),
        )
        .await;
    world
        .wait_status("refused", "the refusal to clear", |s| {
            condition(s, "Ready").is_some_and(|(_, reason)| reason != "WebhookForbidden")
        })
        .await;
    world.stop().await;
}

/// Runs the operator through its whole life (missing Secret, recovery, scheduled and forced
/// polls, status, Events, leadership and its release) and writes every Kubernetes API call
/// it made, as the authorizer sees them, to `target/rbac/operator-calls.json`. The chart tests
/// (`tests/chart/test_rbac.py`) check the chart's RBAC against that file.
#[tokio::test]
async fn every_kubernetes_call_of_the_operator_is_recorded_for_the_rbac_check() {
    let world = World::start().await;
    world.create("rbac", "10s", SECRET).await;
    world
        .wait_status("rbac", "Ready=False SecretNotFound", |s| {
            condition(s, "Ready") == Some(("False", "SecretNotFound"))
        })
        .await;
    world.credentials(cluster::valid_client_secret()).await;
    world
        .wait_status("rbac", "Ready=True once the Secret exists", is_ready)
        .await;
    world.request_poll("rbac", "rbac-1").await;
    world
        .wait_status("rbac", "the forced poll handled", |s| {
            s.last_handled_poll_request.as_deref() == Some("rbac-1")
        })
        .await;
    let lease_namespace = world.namespace.clone();
    let records = world.kube.requests();
    world.stop().await;
    let operator_records = operator_calls(&records);
    assert!(
        !operator_records.is_empty(),
        "the operator's calls are recorded"
    );
    // Placeholders let the chart test map the test's namespaces onto a release's.
    write_calls(
        &operator_records,
        &lease_namespace,
        "operator-calls.json",
        "Kubernetes API calls the operator made in tests/operator.rs (written by the test)",
        |namespace| match namespace {
            None => json!("${watch_scope}"),
            Some(_) => json!("${object_namespace}"),
        },
    );
}

/// With a list of namespaces to handle (`watchNamespaces` in the chart), the operator polls
/// the MailboxPolls there and nothing else: a MailboxPoll in another namespace is never polled
/// nor written, and every Kubernetes call the operator makes names a watched namespace, or its
/// own namespace for the Lease; none is cluster-wide. The calls are written, as the authorizer
/// sees them, to `target/rbac/operator-calls-watch-namespaces.json`; the chart tests
/// (`tests/chart/test_rbac.py`) check the RBAC the chart renders for `watchNamespaces` against
/// that file.
#[tokio::test]
async fn watched_namespaces_confine_every_call_of_the_operator() {
    const WATCHED: [&str; 2] = ["team-a", "team-b"];
    const UNWATCHED: &str = "team-c";
    let world = World::start_in(Scope::Namespaces(WATCHED.map(String::from).to_vec())).await;
    cluster::create_namespace(&world.client, UNWATCHED)
        .await
        .expect("unwatched namespace");
    // The unwatched MailboxPoll comes first, with its Secret and a forced-poll request: an
    // operator that handled it would poll it at once.
    world
        .credentials_in(UNWATCHED, cluster::valid_client_secret())
        .await;
    let stray = world.create_in(UNWATCHED, "inbox", "1h", SECRET).await;
    world.request_poll_in(UNWATCHED, "inbox", "now").await;

    // team-a works at once; team-b's Secret comes late, so Events (SecretNotFound, then
    // Recovered) are among the calls.
    world
        .credentials_in(WATCHED[0], cluster::valid_client_secret())
        .await;
    let uids = [
        world.create_in(WATCHED[0], "inbox", "1h", SECRET).await,
        world.create_in(WATCHED[1], "inbox", "1h", SECRET).await,
    ];
    world
        .wait_status_in(WATCHED[1], "inbox", "Ready=False SecretNotFound", |s| {
            condition(s, "Ready") == Some(("False", "SecretNotFound"))
        })
        .await;
    world
        .credentials_in(WATCHED[1], cluster::valid_client_secret())
        .await;
    for namespace in WATCHED {
        world
            .wait_status_in(namespace, "inbox", "the first poll", is_ready)
            .await;
        world.request_poll_in(namespace, "inbox", "second").await;
    }
    for (namespace, uid) in WATCHED.into_iter().zip(uids) {
        world
            .wait_status_in(namespace, "inbox", "the forced second poll", |s| {
                s.last_handled_poll_request.as_deref() == Some("second")
            })
            .await;
        assert_eq!(
            world.polls(uid).await,
            2,
            "{namespace}: the scheduled first poll and the forced one"
        );
    }
    wait_until("team-b's Recovered Event", PATIENCE, || async {
        world
            .events_in(WATCHED[1], "inbox")
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some("Recovered"))
    })
    .await;

    // The barrier for the unwatched MailboxPoll: both watched ones, created after it, have
    // been polled twice and had their status written after each poll. An operator that saw
    // it would have polled it (its request was waiting) and written its status by now.
    assert_eq!(
        world.polls(stray).await,
        0,
        "the unwatched one is never polled"
    );
    assert_eq!(
        world.live_poll_task(stray).await,
        None,
        "nothing is scheduled for the unwatched one"
    );
    let requests: i64 =
        sqlx::query_scalar("SELECT count(*) FROM poll_requests WHERE mailbox_uid = $1")
            .bind(stray)
            .fetch_one(&world.db.pool)
            .await
            .expect("poll requests");
    assert_eq!(requests, 0, "the unwatched one's request is never recorded");
    let untouched = world
        .api_in(UNWATCHED)
        .get("inbox")
        .await
        .expect("the unwatched MailboxPoll");
    assert!(
        untouched.status.is_none(),
        "the unwatched one has no status: {:?}",
        untouched.status
    );

    let lease_namespace = world.namespace.clone();
    let records = world.kube.requests();
    world.stop().await;
    let operator_records = operator_calls(&records);
    // Confined: MailboxPolls, Secrets and Events in a watched namespace, the Lease in the
    // operator's own namespace, nothing cluster-wide. Which verbs the chart grants there is
    // the chart tests' check, on the file written below.
    let outside: Vec<String> = operator_records
        .iter()
        .filter(|r| {
            let lease = r.group == "coordination.k8s.io" && r.resource == "leases";
            match r.namespace.as_deref() {
                Some(ns) if WATCHED.contains(&ns) => lease,
                Some(ns) if ns == lease_namespace => !lease,
                _ => true,
            }
        })
        .map(|r| format!("{} in {:?}", r.rbac_key(), r.namespace))
        .collect();
    assert!(
        outside.is_empty(),
        "calls outside the watched namespaces and the Lease: {outside:?}"
    );
    // Each watched namespace has watches of its own.
    for namespace in WATCHED {
        for verb in ["list", "watch"] {
            assert!(
                operator_records.iter().any(|r| r.verb == verb
                    && r.resource == "mailboxpolls"
                    && r.namespace.as_deref() == Some(namespace)),
                "no {verb} of the MailboxPolls in {namespace}"
            );
        }
    }

    // Placeholders let the chart test map the test's namespaces onto a release's; a call
    // anywhere else keeps its namespace (null: cluster-wide), which the chart refuses.
    write_calls(
        &operator_records,
        &lease_namespace,
        "operator-calls-watch-namespaces.json",
        "Kubernetes API calls the operator made in tests/operator.rs watching two namespaces (written by the test)",
        |namespace| match namespace {
            Some(ns) => match WATCHED.iter().position(|w| *w == ns) {
                Some(index) => json!(format!("${{watched_namespace_{}}}", index + 1)),
                None => json!(ns),
            },
            None => serde_json::Value::Null,
        },
    );
}

/// A move to a folder the mailbox does not have parks the after-actions with the reason on the
/// resource (Degraded, an Event); fixing the spec tries them again, and they complete.
#[tokio::test]
async fn parked_after_actions_are_retried_once_the_spec_is_fixed() {
    let world = World::start().await;
    world
        .graph
        .add_messages(MAILBOX, "inbox", 2)
        .expect("messages added");
    world.credentials(cluster::valid_client_secret()).await;
    world
        .create_with("filing", |spec| {
            spec.after_delivery = Some(AfterDelivery {
                mark_as_read: false,
                move_to_folder: Some("no-such-folder".into()),
            })
        })
        .await;
    let status = world
        .wait_status("filing", "the parked after-actions on the status", |s| {
            condition(s, "Degraded") == Some(("True", "MoveDestinationNotFound"))
                && condition(s, "Stalled") == Some(("True", "MoveDestinationNotFound"))
        })
        .await;
    assert_eq!(status.messages_delivered, Some(0));
    assert_eq!(world.graph.folder_len(MAILBOX, "inbox").expect("inbox"), 2);
    assert!(
        world
            .events("filing")
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some("MoveDestinationNotFound")),
        "an Event names why the after-actions were parked"
    );

    world
        .patch(
            "filing",
            json!({"spec": {"afterDelivery": {"moveToFolder": "archive"}}}),
        )
        .await;
    world
        .wait_status("filing", "the after-actions done after the fix", |s| {
            s.messages_delivered == Some(2)
                && condition(s, "Degraded").is_some_and(|(status, _)| status == "False")
        })
        .await;
    assert_eq!(
        world.graph.folder_len(MAILBOX, "archive").expect("archive"),
        2
    );
    assert_eq!(world.graph.folder_len(MAILBOX, "inbox").expect("inbox"), 0);
    world.stop().await;
}

/// A Secret's data, written whole (created, or replaced in place by a merge patch so the
/// Secret never goes missing between two values).
async fn put_secret(world: &World, name: &str, values: &[(&str, &str)]) {
    let values: Vec<(&str, &[u8])> = values.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    put_secret_bytes(world, name, &values).await;
}

async fn put_secret_bytes(world: &World, name: &str, values: &[(&str, &[u8])]) {
    use base64::Engine as _;
    let data: serde_json::Map<String, serde_json::Value> = values
        .iter()
        .map(|(key, value)| {
            (
                (*key).to_owned(),
                json!(base64::engine::general_purpose::STANDARD.encode(value)),
            )
        })
        .collect();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(world.client.clone(), &world.namespace);
    if secrets.get_opt(name).await.expect("Secret read").is_some() {
        secrets
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"data": data})),
            )
            .await
            .expect("Secret replaced");
    } else {
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}, "data": data}))
                    .expect("Secret"),
            )
            .await
            .expect("Secret created");
    }
}

/// A MailboxPoll with certificate credentials from the Secret `secret`.
async fn create_with_certificate(world: &World, name: &str, secret: &str) -> Uuid {
    world
        .create_with(name, |spec| {
            spec.credentials_secret_ref = None;
            spec.certificate = Some(
                serde_json::from_value(json!({
                    "tenantId": mailpoll_testkit::graph::DEFAULT_TENANT,
                    "clientId": mailpoll_testkit::graph::DEFAULT_CLIENT_ID,
                    "secretRef": {"name": secret}
                }))
                .expect("certificate spec"),
            );
        })
        .await
}

fn credential_count(world: &World, label: &str) -> (u64, u64) {
    let counters = world.graph.counters();
    (
        counters
            .tokens_by_credential
            .get(label)
            .copied()
            .unwrap_or(0),
        counters
            .requests_by_credential
            .get(label)
            .copied()
            .unwrap_or(0),
    )
}

/// Rotation as a tenant admin does it: a new client secret is added, the Secret updated, the
/// old secret removed. The next poll fetches a token with the new secret (the old token,
/// still valid for an hour, is not used again), without a restart.
#[tokio::test]
async fn a_rotated_client_secret_is_used_at_the_next_poll_without_a_restart() {
    let world = World::start().await;
    world.credentials(cluster::valid_client_secret()).await;
    let uid = world.create("rotating", "1h", SECRET).await;
    world
        .wait_status("rotating", "Ready after the first poll", is_ready)
        .await;
    let issued = world.graph.counters().tokens_issued;

    let rotated = "rotated~secret.value";
    world
        .graph
        .add_app(mailpoll_testkit::graph::AppRegistration {
            client_secret: rotated.into(),
            ..mailpoll_testkit::graph::default_app()
        });
    put_secret(
        &world,
        SECRET,
        &[
            ("tenantId", mailpoll_testkit::graph::DEFAULT_TENANT),
            ("clientId", mailpoll_testkit::graph::DEFAULT_CLIENT_ID),
            ("clientSecret", rotated),
        ],
    )
    .await;
    // The directory rereads Secrets after 500 ms in this world.
    tokio::time::sleep(Duration::from_millis(600)).await;
    world.request_poll("rotating", "after-rotation").await;
    world.wait_served(uid, "after-rotation").await;
    let status = world
        .wait_status("rotating", "Ready after the rotation", is_ready)
        .await;
    assert!(is_ready(&status));
    let counters = world.graph.counters();
    assert_eq!(
        counters.tokens_issued,
        issued + 1,
        "one token fetched with the new secret; the old one is not used again"
    );
    assert_eq!(
        counters.tokens_by_credential.get("secret"),
        Some(&(issued + 1))
    );
    world.stop().await;
}

/// A certificate rotated in the Secret: the new pair signs the next assertion, and Graph sees
/// only tokens issued for the new certificate from then on.
#[tokio::test]
async fn a_rotated_certificate_is_used_at_the_next_poll_without_a_restart() {
    use mailpoll_testkit::credentials::{APP_CERT_PEM, APP_KEY_PEM, OTHER_CERT_PEM, OTHER_KEY_PEM};
    let world = World::start().await;
    // Entra first: the new certificate is uploaded beside the old one.
    world
        .graph
        .add_app(mailpoll_testkit::graph::AppRegistration {
            certificates: vec![APP_CERT_PEM.into(), OTHER_CERT_PEM.into()],
            ..mailpoll_testkit::graph::default_app()
        });
    let app = Certificate::from_pem(APP_CERT_PEM.as_bytes(), APP_KEY_PEM.as_bytes()).expect("pair");
    let other =
        Certificate::from_pem(OTHER_CERT_PEM.as_bytes(), OTHER_KEY_PEM.as_bytes()).expect("pair");
    let old_label = format!("certificate:{}", app.thumbprint_s256());
    let new_label = format!("certificate:{}", other.thumbprint_s256());
    put_secret(
        &world,
        "graph-certificate",
        &[("tls.crt", APP_CERT_PEM), ("tls.key", APP_KEY_PEM)],
    )
    .await;
    let uid = create_with_certificate(&world, "certified", "graph-certificate").await;
    world
        .wait_status("certified", "Ready with the first certificate", is_ready)
        .await;
    let (old_tokens, old_requests) = credential_count(&world, &old_label);
    assert_eq!(old_tokens, 1);
    assert!(old_requests > 0);

    put_secret(
        &world,
        "graph-certificate",
        &[("tls.crt", OTHER_CERT_PEM), ("tls.key", OTHER_KEY_PEM)],
    )
    .await;
    // Then the old certificate is removed from the app registration.
    world
        .graph
        .add_app(mailpoll_testkit::graph::AppRegistration {
            certificates: vec![OTHER_CERT_PEM.into()],
            ..mailpoll_testkit::graph::default_app()
        });
    tokio::time::sleep(Duration::from_millis(600)).await;
    world.request_poll("certified", "after-rotation").await;
    world.wait_served(uid, "after-rotation").await;
    world
        .wait_status("certified", "Ready with the new certificate", is_ready)
        .await;
    assert_eq!(credential_count(&world, &new_label).0, 1);
    assert!(credential_count(&world, &new_label).1 > 0);
    assert_eq!(
        credential_count(&world, &old_label).1,
        old_requests,
        "no Graph request with the old certificate's token after the rotation"
    );
    world.stop().await;
}

/// What the token endpoint never sees: a certificate whose key belongs to another
/// certificate, a workload identity the operator does not have. Both are named on the
/// resource without any key material.
#[tokio::test]
async fn unusable_credentials_are_invalid_credentials_without_key_material() {
    use mailpoll_testkit::credentials::{APP_CERT_PEM, OTHER_KEY_PEM, pem_body_line};
    let world = World::start().await;
    put_secret(
        &world,
        "mismatched",
        &[("tls.crt", APP_CERT_PEM), ("tls.key", OTHER_KEY_PEM)],
    )
    .await;
    create_with_certificate(&world, "mismatched", "mismatched").await;
    let status = world
        .wait_status("mismatched", "Ready=False InvalidCredentials", |s| {
            condition(s, "Ready") == Some(("False", "InvalidCredentials"))
        })
        .await;
    let text = serde_json::to_string(&status).expect("status JSON");
    assert!(
        text.contains("does not belong to the certificate"),
        "{text}"
    );
    assert!(
        text.contains("tls.key"),
        "the message names the key: {text}"
    );
    assert!(!text.contains(pem_body_line(OTHER_KEY_PEM)), "{text}");

    world
        .create_with("federated", |spec| {
            spec.credentials_secret_ref = None;
            spec.workload_identity = Some(Default::default());
        })
        .await;
    let status = world
        .wait_status("federated", "Ready=False InvalidCredentials", |s| {
            condition(s, "Ready") == Some(("False", "InvalidCredentials"))
        })
        .await;
    let message = &status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready")
        .message;
    assert!(message.contains("workloadIdentity.enabled"), "{message}");
    for event in world.events("mismatched").await {
        assert!(
            !event
                .note
                .unwrap_or_default()
                .contains(pem_body_line(OTHER_KEY_PEM))
        );
    }
    world.stop().await;
}

/// The resource requests the operator made (it names itself in its user agent).
fn operator_calls(records: &[RequestRecord]) -> Vec<&RequestRecord> {
    records
        .iter()
        .filter(|r| r.is_resource_request())
        .filter(|r| {
            r.user_agent
                .as_deref()
                .is_some_and(|ua| ua.starts_with("mailpoll/"))
        })
        .collect()
}

/// Writes the distinct calls of `records`, as the authorizer sees them, to `target/rbac/{file}`
/// for the chart tests: the Lease's namespace and name become placeholders, every other
/// namespace what `namespace_of` makes of it.
fn write_calls(
    records: &[&RequestRecord],
    lease_namespace: &str,
    file: &str,
    description: &str,
    namespace_of: impl Fn(Option<&str>) -> serde_json::Value,
) {
    let mut calls: Vec<serde_json::Value> = Vec::new();
    for record in records {
        let lease = record.resource == "leases";
        let namespace = match record.namespace.as_deref() {
            Some(ns) if lease && ns == lease_namespace => json!("${release_namespace}"),
            other => namespace_of(other),
        };
        let name = if lease {
            record.name.as_ref().map(|_| json!("${lease_name}"))
        } else {
            None
        };
        let call = json!({
            "verb": record.verb,
            "apiGroup": record.group,
            "resource": record.resource,
            "subresource": record.subresource.clone().unwrap_or_default(),
            "namespace": namespace,
            "name": name,
        });
        if !calls.contains(&call) {
            calls.push(call);
        }
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/rbac");
    std::fs::create_dir_all(&dir).expect("target/rbac");
    let body = json!({ "description": description, "calls": calls });
    std::fs::write(
        dir.join(file),
        serde_json::to_vec_pretty(&body).expect("JSON"),
    )
    .unwrap_or_else(|e| panic!("write {file}: {e}"));
}

/// A filter the operator cannot use stops the MailboxPoll with reason InvalidFilter (a message
/// naming spec.filter, an Event, no poll); once fixed, mail is polled and the filter decides:
/// the status counts the filtered and the delivered mail exactly, and the receiver gets only
/// what the filter let through. Older mail than spec.startFrom is counted as skipped.
#[tokio::test]
async fn an_invalid_filter_stops_the_mailbox_poll_and_a_fixed_one_filters_with_exact_counts() {
    let world = World::start().await;
    let receiver = WebhookReceiver::start(None)
        .await
        .expect("webhook receiver");
    let recent = chrono::Utc::now() - chrono::Duration::minutes(5);
    let from = |address: &str, received: chrono::DateTime<chrono::Utc>| NewMessage {
        from: Some(address.into()),
        received: Some(received),
        ..NewMessage::default()
    };
    for _ in 0..2 {
        world
            .graph
            .add_message(MAILBOX, "inbox", from("invoices@fabrikam.com", recent))
            .expect("message added");
    }
    for _ in 0..3 {
        world
            .graph
            .add_message(MAILBOX, "inbox", from("news@contoso.com", recent))
            .expect("message added");
    }
    let old = recent - chrono::Duration::days(30);
    world
        .graph
        .add_message(MAILBOX, "inbox", from("invoices@fabrikam.com", old))
        .expect("message added");
    world.credentials(cluster::valid_client_secret()).await;
    let uid = world
        .create_with("filtered", |spec| {
            spec.delivery = Some(delivery(json!({"url": receiver.url()})));
            spec.filter = Some("message.sujbect.contains('Invoice')".into());
            spec.start_from = Some("2026-01-01T00:00:00Z".into());
        })
        .await;
    let expected = "spec.filter: message has no field \"sujbect\"; its fields are id, \
                    internetMessageId, conversationId, subject, bodyPreview, importance, isRead, \
                    hasAttachments, categories, from, sender, toRecipients, ccRecipients, \
                    replyTo, receivedDateTime, sentDateTime";
    let status = world
        .wait_status("filtered", "Ready=False InvalidFilter", |s| {
            condition(s, "Ready") == Some(("False", "InvalidFilter"))
        })
        .await;
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.message, expected);
    assert_eq!(
        condition(&status, "Stalled"),
        Some(("True", "InvalidFilter")),
        "progress waits for a person"
    );
    let events = world.events("filtered").await;
    let warning = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("InvalidFilter"))
        .unwrap_or_else(|| panic!("an InvalidFilter Event: {events:?}"));
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert_eq!(
        world.polls(uid).await,
        0,
        "no poll until the filter is fixed"
    );

    let start = recent - chrono::Duration::days(1);
    world
        .patch(
            "filtered",
            json!({"spec": {
                "filter": "message.from.address.endsWith('@fabrikam.com')",
                "startFrom": start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            }}),
        )
        .await;
    let status = world
        .wait_status("filtered", "2 delivered, 3 filtered, 1 skipped", |s| {
            s.messages_delivered == Some(2)
                && s.messages_filtered == Some(3)
                && s.messages_skipped == Some(1)
        })
        .await;
    assert_eq!(status.messages_pending, Some(0));
    assert_eq!(status.messages_failed, Some(0));
    assert_eq!(condition(&status, "Ready").map(|(s, _)| s), Some("True"));
    let ledger = world.ledger_rows("filtered").await;
    assert_eq!(ledger, 6, "every message is recorded once");
    let successes = receiver.successes();
    assert_eq!(successes.len(), 2, "only the filter's matches are posted");
    assert!(successes.values().all(|posts| *posts == 1), "{successes:?}");
    world.stop().await;
}

/// MailboxPolls created while the API server keeps compacting its history (watches resuming
/// from an old resourceVersion get 410 Expired and list again, over and over) are every one
/// reconciled and polled. Objects first seen in a re-list used to reach the controller before
/// the store held them: dropped as not found, their spec marked seen, never reconciled (about
/// half of them on a loaded machine). A watch that keeps up is never refused, so on an idle
/// machine there may be no re-list at all; `directory::cache`'s
/// `a_relisted_object_reaches_subscribers_once_the_store_holds_it` shows the order for certain.
#[tokio::test]
async fn mailbox_polls_created_while_watches_keep_expiring_are_all_polled() {
    const COUNT: usize = 300;
    let world = World::start().await;
    world.credentials(cluster::valid_client_secret()).await;
    let compacting = async {
        loop {
            world.kube.compact_history();
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    };
    let api = world.api();
    let unpolled = |uids: Vec<Uuid>| async {
        sqlx::query_scalar::<_, Uuid>(
            "SELECT u FROM unnest($1::uuid[]) AS u
              WHERE NOT EXISTS (SELECT 1 FROM polls WHERE mailbox_uid = u AND finished_at IS NOT NULL)",
        )
        .bind(uids)
        .fetch_all(&world.db.pool)
        .await
        .expect("unpolled MailboxPolls")
    };
    let work = async {
        let uids: Vec<Uuid> = futures::stream::iter(0..COUNT)
            .map(|i| {
                let api = api.clone();
                async move {
                    let poll = cluster::mailbox_poll(&format!("churn-{i}"), MAILBOX, "1h", SECRET);
                    let created = api
                        .create(&PostParams::default(), &poll)
                        .await
                        .expect("MailboxPoll created");
                    Uuid::parse_str(&created.uid().expect("uid")).expect("uid is a UUID")
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let polled = try_wait_for(
            "every MailboxPoll's first poll while the history is compacted",
            Duration::from_secs(120),
            || async { unpolled(uids.clone()).await.is_empty().then_some(()) },
        )
        .await;
        (uids, polled)
    };
    let (uids, all_polled) = tokio::select! {
        done = work => done,
        () = compacting => unreachable!("compacts until the work is done"),
    };
    if all_polled.is_err() {
        let left = unpolled(uids).await;
        let identities: i64 =
            sqlx::query_scalar("SELECT count(*) FROM mailbox_identities WHERE uid = ANY($1)")
                .bind(&left)
                .fetch_one(&world.db.pool)
                .await
                .expect("identities");
        let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE owner_uid = ANY($1)")
            .bind(&left)
            .fetch_one(&world.db.pool)
            .await
            .expect("tasks");
        panic!(
            "{} of {COUNT} MailboxPolls were never polled ({identities} with a ledger identity, \
             {tasks} tasks): {:?}",
            left.len(),
            &left[..left.len().min(10)]
        );
    }
    world.stop().await;
}
