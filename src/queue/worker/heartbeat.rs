//! The heartbeat: extends the leases of the tasks this pool holds, on its own schedule, and
//! tells handlers whose lease was taken over.

use std::sync::Arc;

use tokio::time::Instant;

use super::Shared;
use crate::queue::store;

/// Beats every `heartbeat_interval` until the pool stops. It never waits for results to be
/// recorded: a keeper stuck on a batch cannot let the leases of running handlers expire.
pub(super) async fn run(shared: Arc<Shared>) {
    let config = &shared.config;
    let mut beat = tokio::time::interval_at(
        Instant::now() + config.heartbeat_interval,
        config.heartbeat_interval,
    );
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => break,
            _ = beat.tick() => send_heartbeat(&shared).await,
        }
    }
}

async fn send_heartbeat(shared: &Shared) {
    let leases = shared.held_leases();
    if leases.is_empty() {
        return;
    }
    match store::heartbeat(&shared.heartbeat_db, &leases, shared.config.lease).await {
        Ok(still_held) => {
            let still_held: std::collections::HashSet<i64> = still_held.into_iter().collect();
            let held = shared.held();
            for lease in &leases {
                if still_held.contains(&lease.id) {
                    continue;
                }
                if let Some(entry) = held.get(&lease.id)
                    && entry.token == lease.token
                    && !entry.recording
                {
                    tracing::warn!(
                        task = lease.id,
                        "lease lost (taken over or cancelled); the running handler's result will be refused"
                    );
                    let _ = entry.lost.send(true);
                }
            }
        }
        // The leases run on; the next beat tries again well before they expire.
        Err(error) => tracing::warn!(%error, tasks = leases.len(), "heartbeat failed"),
    }
}
