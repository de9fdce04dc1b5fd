//! Prometheus metrics of one operator process, served on `/metrics`.
//!
//! Counters are bumped where things happen. What describes shared state is exported by the
//! leader only, so a `sum` over replicas counts it once: the queue gauges (refreshed from
//! Postgres) and the per-MailboxPoll series (set from the status each reconcile computes).
//!
//! Label values are lowercase, except `reason`, which is the condition reason exactly as
//! `kubectl` shows it (`SecretNotFound`), as kube-state-metrics exports Kubernetes reasons.
//! Per-MailboxPoll series are bounded by the number of MailboxPolls: a handful per object.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uuid::Uuid;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // the variant names are the label values
pub enum Outcome {
    success,
    failure,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// HTTP status, or `error` when no response arrived.
    pub status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub kind: String,
    pub state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// `2xx` … `5xx`, `error` (no answer), `forbidden` (egress policy), `unsent`.
    pub class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

/// One MailboxPoll.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    pub namespace: String,
    pub name: String,
    /// The Ready condition's reason.
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MessageStateLabels {
    pub namespace: String,
    pub name: String,
    /// `delivered`, `pending` or `failed`.
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
}

/// What the leader exports of one MailboxPoll, taken from the status it computed.
#[derive(Debug, Clone, PartialEq)]
pub struct MailboxPollSample {
    pub namespace: String,
    pub name: String,
    pub ready: bool,
    pub reason: String,
    pub suspended: bool,
    pub interval: Duration,
    pub last_success: Option<chrono::DateTime<chrono::Utc>>,
    pub last_poll: Option<chrono::DateTime<chrono::Utc>>,
    pub delivered: i64,
    pub pending: i64,
    pub failed: i64,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The per-MailboxPoll families, and which label sets each object has, so a deleted object or
/// a changed reason leaves no stale series behind.
#[derive(Default)]
struct ObjectSeries {
    ready: Family<ReadyLabels, Gauge>,
    suspended: Family<ObjectLabels, Gauge>,
    interval: Family<ObjectLabels, FloatGauge>,
    last_success: Family<ObjectLabels, FloatGauge>,
    last_poll: Family<ObjectLabels, FloatGauge>,
    messages: Family<MessageStateLabels, Gauge>,
    exported: Mutex<HashMap<Uuid, ReadyLabels>>,
}

impl ObjectSeries {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "mailboxpoll_ready",
            "1 while the MailboxPoll is Ready=True, else 0; reason is the Ready condition's reason (leader only)",
            self.ready.clone(),
        );
        registry.register(
            "mailboxpoll_suspended",
            "1 while the MailboxPoll's scheduled polls are suspended (leader only)",
            self.suspended.clone(),
        );
        registry.register(
            "mailboxpoll_interval_seconds",
            "The MailboxPoll's poll interval (leader only)",
            self.interval.clone(),
        );
        registry.register(
            "mailboxpoll_last_success_timestamp_seconds",
            "Unix time the MailboxPoll's last successful poll finished (leader only)",
            self.last_success.clone(),
        );
        registry.register(
            "mailboxpoll_last_poll_timestamp_seconds",
            "Unix time the MailboxPoll's last poll finished, successful or not (leader only)",
            self.last_poll.clone(),
        );
        registry.register(
            "mailboxpoll_messages",
            "Messages of the MailboxPoll's ledger by delivery state, as its status counts them (leader only)",
            self.messages.clone(),
        );
    }

    fn observe(&self, uid: Uuid, sample: &MailboxPollSample) {
        let object = ObjectLabels {
            namespace: sample.namespace.clone(),
            name: sample.name.clone(),
        };
        let ready = ReadyLabels {
            namespace: sample.namespace.clone(),
            name: sample.name.clone(),
            reason: sample.reason.clone(),
        };
        let previous = self.exported().insert(uid, ready.clone());
        if let Some(previous) = previous.filter(|previous| *previous != ready) {
            self.remove(&previous);
        }
        self.ready
            .get_or_create(&ready)
            .set(i64::from(sample.ready));
        self.suspended
            .get_or_create(&object)
            .set(i64::from(sample.suspended));
        self.interval
            .get_or_create(&object)
            .set(sample.interval.as_secs_f64());
        let seconds = |at: Option<chrono::DateTime<chrono::Utc>>| {
            at.map_or(0.0, |at| at.timestamp_millis() as f64 / 1000.0)
        };
        self.last_success
            .get_or_create(&object)
            .set(seconds(sample.last_success));
        self.last_poll
            .get_or_create(&object)
            .set(seconds(sample.last_poll));
        for (state, count) in [
            ("delivered", sample.delivered),
            ("pending", sample.pending),
            ("failed", sample.failed),
        ] {
            self.messages
                .get_or_create(&MessageStateLabels {
                    namespace: sample.namespace.clone(),
                    name: sample.name.clone(),
                    state,
                })
                .set(count);
        }
    }

    fn forget(&self, uid: Uuid) {
        if let Some(labels) = self.exported().remove(&uid) {
            self.remove(&labels);
        }
    }

    fn clear(&self) {
        self.exported().clear();
        self.ready.clear();
        self.suspended.clear();
        self.interval.clear();
        self.last_success.clear();
        self.last_poll.clear();
        self.messages.clear();
    }

    fn remove(&self, ready: &ReadyLabels) {
        let object = ObjectLabels {
            namespace: ready.namespace.clone(),
            name: ready.name.clone(),
        };
        self.ready.remove(ready);
        self.suspended.remove(&object);
        self.interval.remove(&object);
        self.last_success.remove(&object);
        self.last_poll.remove(&object);
        for state in ["delivered", "pending", "failed"] {
            self.messages.remove(&MessageStateLabels {
                namespace: object.namespace.clone(),
                name: object.name.clone(),
                state,
            });
        }
    }

    fn exported(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, ReadyLabels>> {
        self.exported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PurgeLabels {
    /// The table rows were deleted from or cleared in.
    pub table: String,
    /// What removed them: `content`, `identity`, `history`, `dead`, `deletion_policy`.
    pub kind: String,
}

/// Every metric the operator exports.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<OutcomeLabels, Counter>,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub polls: Family<OutcomeLabels, Counter>,
    pub poll_failures: Family<ReasonLabels, Counter>,
    pub messages_recorded: Counter,
    pub messages_delivered: Counter,
    pub messages_failed: Counter,
    pub graph_requests: Family<StatusLabels, Counter>,
    pub throttle_waits: Counter,
    pub throttle_wait_seconds: Counter<f64>,
    pub queue_tasks: Family<QueueLabels, Gauge>,
    pub queue_oldest_pending_seconds: Family<KindLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub leader: Gauge,
    pub leader_changes: Counter,
    pub poll_duration: Histogram,
    pub graph_request_duration: Histogram,
    pub webhook_responses: Family<ClassLabels, Counter>,
    pub webhook_request_duration: Histogram,
    objects: ObjectSeries,
    pub retention_purged_rows: Family<PurgeLabels, Counter>,
    pub retention_errors: Family<PurgeLabels, Counter>,
    pub sweep_refusals: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric. Long on purpose: it is one flat list, a registration per
    /// metric, read top to bottom beside `/metrics`; splitting it would only scatter it.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mailpoll");
        let reconciles = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "reconciles",
            "MailboxPoll reconciliations by outcome",
            reconciles.clone(),
        );
        let reconcile_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciliations by error reason",
            reconcile_errors.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation",
            reconcile_duration.clone(),
        );
        let polls = Family::<OutcomeLabels, Counter>::default();
        registry.register("polls", "Mailbox polls by outcome", polls.clone());
        let poll_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "poll_failures",
            "Failed polls by condition reason",
            poll_failures.clone(),
        );
        let messages_recorded = Counter::default();
        registry.register(
            "messages_recorded",
            "Messages recorded in the ledger for the first time",
            messages_recorded.clone(),
        );
        let messages_delivered = Counter::default();
        registry.register(
            "messages_delivered",
            "Messages delivered",
            messages_delivered.clone(),
        );
        let messages_failed = Counter::default();
        registry.register(
            "messages_failed",
            "Messages whose delivery failed for good",
            messages_failed.clone(),
        );
        let graph_requests = Family::<StatusLabels, Counter>::default();
        registry.register(
            "graph_requests",
            "Microsoft Graph requests by HTTP status",
            graph_requests.clone(),
        );
        let throttle_waits = Counter::default();
        registry.register(
            "graph_throttle_waits",
            "Times a Graph request waited for a mailbox's Retry-After or concurrency slot",
            throttle_waits.clone(),
        );
        let throttle_wait_seconds = Counter::<f64>::default();
        registry.register(
            "graph_throttle_wait_seconds",
            "Time Graph requests spent waiting for throttling",
            throttle_wait_seconds.clone(),
        );
        let queue_tasks = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_tasks",
            "Tasks in the queue by kind and state",
            queue_tasks.clone(),
        );
        let queue_oldest_pending_seconds =
            Family::<KindLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "queue_oldest_pending_seconds",
            "Age of the oldest due pending task by kind",
            queue_oldest_pending_seconds.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica is the scheduling leader",
            leader.clone(),
        );
        let leader_changes = Counter::default();
        registry.register(
            "leader_changes",
            "Times this replica became or stopped being the scheduling leader",
            leader_changes.clone(),
        );
        let poll_duration = Histogram::new(exponential_buckets(0.05, 2.0, 14));
        registry.register(
            "poll_duration_seconds",
            "Time one poll round took, Graph pages and recording included",
            poll_duration.clone(),
        );
        let graph_request_duration = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "graph_request_duration_seconds",
            "Time one Microsoft Graph request took, until its body was read",
            graph_request_duration.clone(),
        );
        let webhook_responses = Family::<ClassLabels, Counter>::default();
        registry.register(
            "webhook_responses",
            "Webhook POSTs by how they ended: status class, error (no answer), forbidden, unsent",
            webhook_responses.clone(),
        );
        let webhook_request_duration = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        registry.register(
            "webhook_request_duration_seconds",
            "Time one webhook POST took, until its answer (or its failure)",
            webhook_request_duration.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the version label says which mailpoll runs",
            build_info,
        );
        let objects = ObjectSeries::default();
        objects.register(&mut registry);
        let retention_purged_rows = Family::<PurgeLabels, Counter>::default();
        registry.register(
            "retention_purged_rows",
            "Rows deleted or cleared by retention and deletion policies, by table and kind",
            retention_purged_rows.clone(),
        );
        let retention_errors = Family::<PurgeLabels, Counter>::default();
        registry.register(
            "retention_errors",
            "Retention rounds that failed, by table and kind",
            retention_errors.clone(),
        );
        let sweep_refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "sweep_refusals",
            "Sweeps of deleted MailboxPolls refused, by reason",
            sweep_refusals.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            polls,
            poll_failures,
            messages_recorded,
            messages_delivered,
            messages_failed,
            graph_requests,
            throttle_waits,
            throttle_wait_seconds,
            queue_tasks,
            queue_oldest_pending_seconds,
            leader,
            leader_changes,
            poll_duration,
            graph_request_duration,
            webhook_responses,
            webhook_request_duration,
            objects,
            retention_purged_rows,
            retention_errors,
            sweep_refusals,
        }
    }

    /// Counts rows a retention round purged.
    pub fn purged(&self, table: &str, kind: &str, rows: u64) {
        self.retention_purged_rows
            .get_or_create(&PurgeLabels {
                table: table.to_owned(),
                kind: kind.to_owned(),
            })
            .inc_by(rows);
    }

    /// Counts a retention round that failed.
    pub fn purge_failed(&self, table: &str, kind: &str) {
        self.retention_errors
            .get_or_create(&PurgeLabels {
                table: table.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn reconciled(&self, elapsed: Duration, error_reason: Option<&str>) {
        self.reconcile_duration.observe(elapsed.as_secs_f64());
        let outcome = if error_reason.is_some() {
            Outcome::failure
        } else {
            Outcome::success
        };
        self.reconciles
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        if let Some(reason) = error_reason {
            self.reconcile_errors
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .inc();
        }
    }

    /// Counts a finished poll; `failure` is the condition reason of a failed one.
    pub fn poll_finished(&self, failure: Option<&str>) {
        let outcome = if failure.is_some() {
            Outcome::failure
        } else {
            Outcome::success
        };
        self.polls.get_or_create(&OutcomeLabels { outcome }).inc();
        if let Some(reason) = failure {
            self.poll_failures
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .inc();
        }
    }

    pub fn graph_response(&self, status: Option<u16>, took: Duration) {
        let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        self.graph_requests
            .get_or_create(&StatusLabels { status })
            .inc();
        self.graph_request_duration.observe(took.as_secs_f64());
    }

    /// A webhook POST ended with `class` (see `delivery::webhook::outcome_class`); `took` is
    /// `None` when nothing was sent.
    pub fn webhook_posted(&self, class: &'static str, took: Option<Duration>) {
        self.webhook_responses
            .get_or_create(&ClassLabels { class })
            .inc();
        if let Some(took) = took {
            self.webhook_request_duration.observe(took.as_secs_f64());
        }
    }

    /// This replica became (`true`) or stopped being the leader. Stepping down clears what
    /// only the leader exports, so the next leader's series are the only ones.
    pub fn leading(&self, leading: bool) {
        self.leader.set(i64::from(leading));
        self.leader_changes.inc();
        if !leading {
            self.objects.clear();
            self.queue_tasks.clear();
            self.queue_oldest_pending_seconds.clear();
        }
    }

    /// Exports a MailboxPoll's state (leader only).
    pub fn observe_mailbox_poll(&self, uid: Uuid, sample: &MailboxPollSample) {
        self.objects.observe(uid, sample);
    }

    /// Drops a deleted MailboxPoll's series.
    pub fn forget_mailbox_poll(&self, uid: Uuid) {
        self.objects.forget(uid);
    }

    pub fn throttled_for(&self, waited: Duration) {
        self.throttle_waits.inc();
        self.throttle_wait_seconds.inc_by(waited.as_secs_f64());
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Shared handle.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_family_with_the_prefix() {
        let metrics = Metrics::new();
        metrics.reconciled(Duration::from_millis(3), None);
        metrics.reconciled(Duration::from_millis(3), Some("SecretNotFound"));
        metrics.graph_response(Some(429), Duration::from_millis(20));
        metrics.graph_response(None, Duration::from_millis(20));
        metrics.throttled_for(Duration::from_secs(2));
        metrics
            .queue_tasks
            .get_or_create(&QueueLabels {
                kind: "poll".into(),
                state: "pending".into(),
            })
            .set(3);
        metrics.leader.set(1);
        let text = metrics.encode().expect("metrics encode");
        for expected in [
            "mailpoll_reconciles_total{outcome=\"success\"} 1",
            "mailpoll_reconcile_errors_total{reason=\"SecretNotFound\"} 1",
            "mailpoll_graph_requests_total{status=\"429\"} 1",
            "mailpoll_graph_requests_total{status=\"error\"} 1",
            "mailpoll_graph_throttle_wait_seconds_total 2.0",
            "mailpoll_queue_tasks{kind=\"poll\",state=\"pending\"} 3",
            "mailpoll_leader 1",
            "mailpoll_graph_request_duration_seconds_count 2",
            "mailpoll_build_info{version=\"",
            "# EOF",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }

    fn sample(reason: &str, ready: bool) -> MailboxPollSample {
        MailboxPollSample {
            namespace: "support".into(),
            name: "support-inbox".into(),
            ready,
            reason: reason.into(),
            suspended: false,
            interval: Duration::from_secs(60),
            last_success: chrono::DateTime::from_timestamp(1_764_498_000, 0),
            last_poll: chrono::DateTime::from_timestamp(1_764_498_000, 0),
            delivered: 7,
            pending: 2,
            failed: 1,
        }
    }

    #[test]
    fn a_mailbox_poll_has_one_ready_series_and_none_once_gone() {
        let metrics = Metrics::new();
        let uid = Uuid::from_u128(7);
        metrics.observe_mailbox_poll(uid, &sample("Polling", true));
        let text = metrics.encode().expect("encode");
        for expected in [
            "mailpoll_mailboxpoll_ready{namespace=\"support\",name=\"support-inbox\",reason=\"Polling\"} 1",
            "mailpoll_mailboxpoll_last_success_timestamp_seconds{namespace=\"support\",name=\"support-inbox\"} 1764498000.0",
            "mailpoll_mailboxpoll_interval_seconds{namespace=\"support\",name=\"support-inbox\"} 60.0",
            "mailpoll_mailboxpoll_messages{namespace=\"support\",name=\"support-inbox\",state=\"failed\"} 1",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        metrics.observe_mailbox_poll(uid, &sample("AccessDenied", false));
        let text = metrics.encode().expect("encode");
        assert!(!text.contains("reason=\"Polling\""), "{text}");
        assert!(text.contains("reason=\"AccessDenied\"} 0"), "{text}");
        metrics.forget_mailbox_poll(uid);
        let text = metrics.encode().expect("encode");
        assert!(!text.contains("support-inbox"), "{text}");
        metrics.observe_mailbox_poll(uid, &sample("Polling", true));
        metrics.leading(false);
        let text = metrics.encode().expect("encode");
        assert!(
            !text.contains("support-inbox"),
            "a follower exports none: {text}"
        );
        assert!(text.contains("mailpoll_leader_changes_total 1"), "{text}");
    }
}
