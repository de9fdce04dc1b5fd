//! The keeper: records handlers' results in batches, and at shutdown releases the tasks that
//! never finished.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{ErrorBackoff, Finished, Shared};
use crate::queue::transition::Transition;
use crate::queue::{Lease, store};

#[derive(Debug, Default)]
pub(super) struct KeeperReport {
    pub abandoned: usize,
}

/// While the claimer drains a backlog, the keeper waits up to this long for a batch as large as
/// the tasks the pool may hold (running and prefetched) before recording it. Every result
/// statement costs a commit and a round trip on top of its rows, and competes for the cores
/// with the claim the pool waits on. Recording only what finished while the previous statement
/// ran gave batches of about 30 no-op tasks in the queue benchmark; gathered, about 47: a third
/// fewer result statements (and commits) per task. A result waits at most this long more before
/// it is recorded, and only under a backlog; handlers never wait for it (their slots are given
/// back when the result is handed over).
const RESULT_GATHER: Duration = Duration::from_millis(1);

/// Records results in batches as they come until every sender is gone (the pool is shutting
/// down), then releases what was never finished.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut results: mpsc::Receiver<Finished>,
) -> KeeperReport {
    let config = &shared.config;
    let gather_target = config
        .completion_batch
        .min(config.concurrency + config.prefetch);
    let mut batch: Vec<Finished> = Vec::new();
    while let Some(finished) = results.recv().await {
        batch.push(finished);
        // Whatever finished while the previous statement ran goes into this one: the busier
        // the pool, the larger the batches, with no added wait when it is quiet.
        while batch.len() < config.completion_batch {
            match results.try_recv() {
                Ok(finished) => batch.push(finished),
                Err(_) => break,
            }
        }
        // Under a backlog, up to RESULT_GATHER more for a full batch.
        if batch.len() < gather_target && shared.backlog.load(Ordering::Relaxed) {
            let gather = async {
                while batch.len() < gather_target {
                    match results.recv().await {
                        Some(finished) => batch.push(finished),
                        None => break,
                    }
                }
            };
            let _ = tokio::time::timeout(RESULT_GATHER, gather).await;
        }
        record(&shared, &mut batch).await;
    }
    // Results of handlers that finished are recorded above; tasks whose handlers were stopped
    // go back to pending.
    release_unfinished(&shared).await
}

/// Hands every task still held back to pending, retrying for a while; what cannot be
/// released is left to be rescued when its lease expires.
async fn release_unfinished(shared: &Shared) -> KeeperReport {
    let deadline = Instant::now() + Duration::from_secs(10);
    let leases = shared.held_leases();
    let mut report = KeeperReport::default();
    if leases.is_empty() {
        return report;
    }
    let mut backoff = ErrorBackoff::new();
    loop {
        match store::release(&shared.db, &leases).await {
            Ok(outcome) => {
                for _ in &outcome.applied {
                    shared.counters.record(&Transition::Release);
                }
                shared.counters.add_lease_lost(outcome.refused.len());
                shared.held().clear();
                return report;
            }
            Err(error) if Instant::now() < deadline => {
                let pause = backoff.next();
                tracing::warn!(%error, retry_in = ?pause, "releasing unfinished tasks failed");
                tokio::time::sleep(pause).await;
            }
            Err(error) => {
                report.abandoned = leases.len();
                tracing::error!(
                    %error,
                    tasks = leases.len(),
                    "cannot release unfinished tasks; they will be rescued when their leases expire"
                );
                return report;
            }
        }
    }
}

/// How long results are retried once shutdown has begun; after that their tasks are left to
/// be rescued (and run again) rather than holding up the process's exit.
const SHUTDOWN_RECORD_PATIENCE: Duration = Duration::from_secs(10);

/// Records a batch of results, retrying until the database takes them. A result is never
/// dropped while the pool runs; during shutdown, after [`SHUTDOWN_RECORD_PATIENCE`].
async fn record(shared: &Shared, batch: &mut Vec<Finished>) {
    if batch.is_empty() {
        return;
    }
    // Ascending ids, as the heartbeat's: two statements never lock rows in opposite orders.
    batch.sort_unstable_by_key(|finished| finished.lease.id);
    {
        let mut held = shared.held();
        for finished in batch.iter() {
            if let Some(entry) = held.get_mut(&finished.lease.id) {
                entry.recording = true;
            }
        }
    }
    let items: Vec<(Lease, Transition)> = batch
        .iter()
        .map(|finished| (finished.lease, finished.transition.clone()))
        .collect();
    let mut backoff = ErrorBackoff::new();
    let mut first_failure: Option<Instant> = None;
    let outcome = loop {
        match store::finish(&shared.db, &items).await {
            Ok(outcome) => break outcome,
            Err(error) => {
                let since = *first_failure.get_or_insert_with(Instant::now);
                if shared.stop.is_cancelled() && since.elapsed() >= SHUTDOWN_RECORD_PATIENCE {
                    tracing::error!(%error, tasks = items.len(), "giving up recording task results; the tasks will run again");
                    batch.clear();
                    return;
                }
                let pause = backoff.next();
                tracing::warn!(%error, tasks = items.len(), retry_in = ?pause, "recording task results failed");
                tokio::time::sleep(pause).await;
            }
        }
    };
    {
        let mut held = shared.held();
        for finished in batch.iter() {
            held.remove(&finished.lease.id);
        }
    }
    let refused: std::collections::HashSet<i64> = outcome.refused.iter().copied().collect();
    for finished in batch.drain(..) {
        if refused.contains(&finished.lease.id) {
            tracing::warn!(
                task = finished.lease.id,
                kind = %finished.kind,
                "result refused: the lease was taken over while the handler ran"
            );
        } else {
            log_transition(&finished);
            shared.counters.record(&finished.transition);
        }
    }
    shared.counters.add_lease_lost(refused.len());
}

fn log_transition(finished: &Finished) {
    let task = finished.lease.id;
    let kind = &finished.kind;
    match &finished.transition {
        Transition::Succeed => tracing::trace!(task, %kind, "task succeeded"),
        Transition::Retry { delay, error } => {
            tracing::info!(task, %kind, %error, retry_in = ?delay, "task failed; retrying later");
        }
        Transition::Dead { error } => {
            tracing::warn!(task, %kind, %error, "task failed for good");
        }
        Transition::Snooze { delay } => tracing::debug!(task, %kind, ?delay, "task snoozed"),
        Transition::Release => tracing::debug!(task, %kind, "task released"),
    }
}
