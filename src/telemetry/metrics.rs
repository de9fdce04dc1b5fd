//! Prometheus metrics of one operator process, served on `/metrics`.
//!
//! Counters are bumped where things happen; gauges that describe shared state (queue depth,
//! oldest pending task) are refreshed from Postgres when scraped, so every replica reports the
//! same truth without a background loop.

use std::sync::Arc;
use std::time::Duration;

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
pub enum Outcome {
    Success,
    Failure,
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
pub struct KindLabels {
    pub kind: String,
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
            Outcome::Failure
        } else {
            Outcome::Success
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
            Outcome::Failure
        } else {
            Outcome::Success
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

    pub fn graph_response(&self, status: Option<u16>) {
        let status = status.map_or_else(|| "error".to_owned(), |s| s.to_string());
        self.graph_requests
            .get_or_create(&StatusLabels { status })
            .inc();
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
        metrics.graph_response(Some(429));
        metrics.graph_response(None);
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
            "mailpoll_reconciles_total{outcome=\"Success\"} 1",
            "mailpoll_reconcile_errors_total{reason=\"SecretNotFound\"} 1",
            "mailpoll_graph_requests_total{status=\"429\"} 1",
            "mailpoll_graph_requests_total{status=\"error\"} 1",
            "mailpoll_graph_throttle_wait_seconds_total 2.0",
            "mailpoll_queue_tasks{kind=\"poll\",state=\"pending\"} 3",
            "mailpoll_leader 1",
            "# EOF",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
    }
}
