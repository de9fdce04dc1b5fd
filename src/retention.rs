//! Retention rounds: message content, ledger identities, poll history and dead tasks are
//! purged after their periods, in bounded batches, by the owners' named operations
//! (`ledger`, `poll_log`, `queue`). The leader runs the rounds (see `controller`); every
//! operation takes disjoint rows (`SKIP LOCKED`, a per-ledger try-lock), so an old leader
//! still finishing a round beside a new one is harmless.

use std::future::Future;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::ledger;
use crate::poll_log;
use crate::queue;
use crate::telemetry::metrics::SharedMetrics;

/// Retention periods and how purging is paced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionSettings {
    /// A message's content is cleared this long after it was recorded (once delivered or
    /// given up on).
    pub content: Duration,
    /// A ledger row goes this long after its message was received (see README, "Data
    /// retention": the ledger's horizon keeps resyncs from delivering it again).
    pub identity: Duration,
    /// Polls and served forced-poll requests go this long after they started; the latest ones
    /// status reads are kept.
    pub poll_history: Duration,
    /// Dead tasks go this long after they died.
    pub dead_tasks: Duration,
    /// Time between rounds.
    pub interval: Duration,
    /// Rows per statement (and transaction).
    pub batch: i64,
    /// Statements per table and round: what is left waits for the next round.
    pub max_batches: usize,
}

const DAY: Duration = Duration::from_secs(24 * 3600);

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            content: 30 * DAY,
            identity: 180 * DAY,
            poll_history: 30 * DAY,
            dead_tasks: 30 * DAY,
            interval: Duration::from_secs(300),
            batch: 1000,
            max_batches: 100,
        }
    }
}

/// Runs a round every `settings.interval` until `stop`.
pub async fn run(
    pool: PgPool,
    metrics: SharedMetrics,
    settings: RetentionSettings,
    stop: CancellationToken,
) {
    loop {
        round(&pool, &metrics, &settings, &stop).await;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(settings.interval) => {}
        }
    }
}

/// One round over every table. Failures are logged and counted; the next round tries again.
pub async fn round(
    pool: &PgPool,
    metrics: &SharedMetrics,
    settings: &RetentionSettings,
    stop: &CancellationToken,
) {
    let limit = settings.batch;
    let pass = Pass {
        metrics,
        settings,
        stop,
    };
    pass.drain("messages", "content", || {
        ledger::purge_content(pool, settings.content, limit)
    })
    .await;
    purge_identities(pool, &pass).await;
    pass.drain("polls", "history", || {
        poll_log::prune_polls(pool, settings.poll_history, limit)
    })
    .await;
    pass.drain("poll_requests", "history", || {
        poll_log::prune_requests(pool, settings.poll_history, limit)
    })
    .await;
    pass.drain("tasks", "dead", || async {
        queue::prune_dead(pool, settings.dead_tasks, limit)
            .await
            .map(|report| report.deleted)
    })
    .await;
}

/// Identity rows, ledger by ledger; folds each ledger's counter deltas on the way, so the
/// delta table stays small even for MailboxPolls whose status nobody reads.
async fn purge_identities(pool: &PgPool, pass: &Pass<'_>) {
    let ledgers = match ledger::ledgers(pool).await {
        Ok(ledgers) => ledgers,
        Err(error) => {
            tracing::warn!(%error, "listing ledgers for retention failed");
            pass.metrics.purge_failed("messages", "identity");
            return;
        }
    };
    for ledger_id in ledgers {
        if pass.stop.is_cancelled() {
            return;
        }
        pass.drain("messages", "identity", || async move {
            let purge = ledger::purge_identities(
                pool,
                ledger_id,
                pass.settings.identity,
                pass.settings.batch,
            )
            .await?;
            // A busy ledger (a page being recorded) waits for the next round.
            Ok::<u64, sqlx::Error>(purge.deleted)
        })
        .await;
        if let Ok(mut conn) = pool.acquire().await
            && let Err(error) = ledger::counts(&mut conn, ledger_id).await
        {
            tracing::debug!(%error, "folding ledger counters failed");
        }
    }
}

/// What a round needs to drain one table.
struct Pass<'a> {
    metrics: &'a SharedMetrics,
    settings: &'a RetentionSettings,
    stop: &'a CancellationToken,
}

impl Pass<'_> {
    /// Calls `purge` (one bounded batch) until a batch comes back short, the round's budget is
    /// spent, or the process stops.
    async fn drain<F, Fut, E>(&self, table: &str, kind: &str, mut purge: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<u64, E>>,
        E: std::fmt::Display,
    {
        let mut total = 0;
        for _ in 0..self.settings.max_batches {
            match purge().await {
                Ok(rows) => {
                    total += rows;
                    if !batch_was_full(rows, self.settings.batch) || self.stop.is_cancelled() {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, table, kind, "retention round failed");
                    self.metrics.purge_failed(table, kind);
                    break;
                }
            }
        }
        if total > 0 {
            self.metrics.purged(table, kind, total);
            tracing::info!(table, kind, rows = total, "retention purged rows");
        }
    }
}

/// Whether a batch took as many rows as it could: more may be waiting.
fn batch_was_full(rows: u64, limit: i64) -> bool {
    i64::try_from(rows).is_ok_and(|rows| rows >= limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_batch_ends_the_table() {
        assert!(batch_was_full(1000, 1000));
        assert!(!batch_was_full(999, 1000));
        assert!(!batch_was_full(0, 1000));
    }

    #[test]
    fn identities_outlive_content_by_default() {
        let settings = RetentionSettings::default();
        assert!(settings.identity > settings.content);
        assert!(settings.batch > 0 && settings.max_batches > 0);
    }
}
