//! Maintenance: rescue of expired leases (of any worker) and of tasks left waiting for a free
//! slot, and pruning of old tasks.

use std::sync::Arc;

use tokio::time::Instant;

use super::Shared;
use crate::queue::store;

/// Rescues expired leases and prunes old tasks, each on its own schedule.
pub(super) async fn run(shared: Arc<Shared>) {
    let config = &shared.config;
    let start = Instant::now();
    let mut rescue =
        tokio::time::interval_at(start + config.rescue_interval, config.rescue_interval);
    rescue.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prune = tokio::time::interval_at(start + config.prune_interval, config.prune_interval);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => break,
            _ = rescue.tick() => {
                rescue_expired(&shared).await;
                release_waiting(&shared).await;
            }
            _ = prune.tick() => prune_old(&shared).await,
        }
    }
}

/// Rounds per tick bound the work of one tick; what is left waits for the next one.
const MAINTENANCE_ROUNDS: usize = 20;

async fn rescue_expired(shared: &Shared) {
    for _ in 0..MAINTENANCE_ROUNDS {
        match store::rescue(&shared.db, shared.config.rescue_batch, &shared.config.retry).await {
            Ok(report) => {
                if report.total() > 0 {
                    tracing::warn!(
                        requeued = ?report.requeued,
                        dead = ?report.dead,
                        "rescued tasks whose lease expired"
                    );
                    shared.counters.add_rescued(report.total());
                    if !report.requeued.is_empty() {
                        shared.wake.notify_one();
                    }
                }
                if (report.total() as i64) < shared.config.rescue_batch
                    || shared.stop.is_cancelled()
                {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "rescuing expired leases failed");
                return;
            }
        }
    }
}

/// Releases tasks left waiting for a slot their owner has free (see [`store::release_waiting`]).
async fn release_waiting(shared: &Shared) {
    match store::release_waiting(&shared.db).await {
        Ok(0) => {}
        Ok(count) => {
            tracing::info!(
                count,
                "released tasks waiting for a free slot of their owner"
            );
            shared.wake.notify_one();
        }
        Err(error) => tracing::warn!(%error, "releasing tasks waiting for a slot failed"),
    }
}

async fn prune_old(shared: &Shared) {
    let mut deleted = 0;
    for _ in 0..MAINTENANCE_ROUNDS {
        match store::prune(
            &shared.db,
            shared.config.retention,
            shared.config.prune_batch,
        )
        .await
        {
            Ok(report) => {
                deleted += report.deleted;
                if (report.deleted as i64) < shared.config.prune_batch || shared.stop.is_cancelled()
                {
                    break;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "pruning old tasks failed");
                break;
            }
        }
    }
    if deleted > 0 {
        tracing::debug!(deleted, "pruned finished tasks past retention");
    }
}
