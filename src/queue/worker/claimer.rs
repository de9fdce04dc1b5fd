//! The claimer: claims as many due tasks as there are free slots, in one statement, and
//! starts a handler per task.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};

use super::budget::{self, HeldSlot};
use super::handler::{DynHandler, TaskContext};
use super::{ErrorBackoff, Finished, Held, Shared};
use crate::queue::RetryPolicy;
use crate::queue::transition::{self, HandlerError, Transition};
use crate::queue::{ClaimedTask, QueueError, store};

/// While the queue has a backlog, a claim waits up to this long for three quarters of the slots
/// to be free, so one statement claims many tasks rather than one per finished handler.
/// Prefetched tasks keep the handlers busy meanwhile. Every claim and every result statement
/// has a cost of its own on top of its rows (executor start-up, commit, the round trip), so
/// larger claims, and the larger result batches that follow them, cost less per task: with
/// half the slots, no-op tasks ran about a tenth slower.
const CLAIM_GATHER: Duration = Duration::from_millis(1);

/// Claims tasks for free slots and starts their handlers, until the pool stops.
pub(super) async fn run(shared: Arc<Shared>, results: mpsc::Sender<Finished>) {
    let mut backoff = ErrorBackoff::new();
    let config = &shared.config;
    let gather_target = config
        .claim_batch
        .min((config.concurrency + config.prefetch) * 3 / 4);
    // Whether the last claim got all it asked for: more tasks are probably due.
    let mut backlog = false;
    loop {
        let first = tokio::select! {
            _ = shared.stop.cancelled() => break,
            permit = shared.slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let mut permits = vec![first];
        take_free_slots(&shared, &mut permits);
        if backlog && permits.len() < gather_target {
            let gather = async {
                while permits.len() < gather_target {
                    match shared.slots.clone().acquire_owned().await {
                        Ok(permit) => permits.push(permit),
                        Err(_) => break,
                    }
                }
            };
            let _ = tokio::time::timeout(CLAIM_GATHER, gather).await;
            take_free_slots(&shared, &mut permits);
        }
        let wanted = permits.len();
        let claimed = claim(&shared, wanted).await;
        match claimed {
            Ok(mut tasks) => {
                // Start the oldest first (RETURNING has no order).
                tasks.sort_unstable_by_key(|task| task.id);
                backoff.reset();
                let got = tasks.len();
                backlog = got == wanted;
                shared.backlog.store(backlog, Ordering::Relaxed);
                shared.counters.add_claimed(got);
                for (task, permit) in tasks.into_iter().zip(permits.drain(..)) {
                    let slot = (shared.held_by_kind.hold(&task.kind), permit);
                    dispatch(&shared, task, slot, results.clone());
                }
                drop(permits);
                if got < wanted {
                    tokio::select! {
                        _ = shared.stop.cancelled() => break,
                        _ = shared.wake.notified() => {}
                        _ = tokio::time::sleep(config.poll_interval) => {}
                    }
                }
            }
            Err(error) => {
                drop(permits);
                backlog = false;
                shared.backlog.store(false, Ordering::Relaxed);
                let pause = backoff.next();
                tracing::warn!(%error, retry_in = ?pause, "claiming tasks failed");
                tokio::select! {
                    _ = shared.stop.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// How often a claim that lost a race for an owner's slot is tried again at once.
const SLOT_CONFLICT_RETRIES: usize = 3;

/// Claims up to `wanted` tasks, each kind within its budget.
async fn claim(shared: &Shared, wanted: usize) -> Result<Vec<ClaimedTask>, QueueError> {
    let config = &shared.config;
    let mut attempt = 0;
    loop {
        let kinds = budget::kind_claims(
            &shared.kinds,
            &config.budgets,
            &config.owner_caps,
            |kind| shared.held_by_kind.get(kind),
            wanted,
        );
        let claimed = store::claim_kinds(
            &shared.db,
            &kinds,
            wanted,
            config.worker_id.as_str(),
            config.lease,
        )
        .await;
        match claimed {
            // Another replica's claim took the slot first and has committed: a new claim sees
            // it.
            Err(error) if error.is_slot_conflict() && attempt < SLOT_CONFLICT_RETRIES => {
                tracing::debug!(%error, "claim lost a race for an owner's slot; claiming again");
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Adds the slots free right now, up to a claim's batch size.
fn take_free_slots(shared: &Arc<Shared>, permits: &mut Vec<OwnedSemaphorePermit>) {
    while permits.len() < shared.config.claim_batch {
        match shared.slots.clone().try_acquire_owned() {
            Ok(permit) => permits.push(permit),
            Err(_) => break,
        }
    }
}

/// Starts the handler of a claimed task; the slot is given back when the handler ends.
fn dispatch(
    shared: &Arc<Shared>,
    task: ClaimedTask,
    permit: (HeldSlot, OwnedSemaphorePermit),
    results: mpsc::Sender<Finished>,
) {
    let lease = task.lease();
    let (lost_tx, lost_rx) = watch::channel(false);
    // Registered before the handler starts, so its result can never arrive unregistered.
    shared.held().insert(
        lease.id,
        Held {
            token: lease.token,
            lost: lost_tx,
            abort: None,
            recording: false,
        },
    );
    let ctx = TaskContext {
        lease_lost: lost_rx,
        shutdown: shared.stop.clone(),
    };
    let handler = shared.handlers.get(&task.kind).cloned();
    let policy = shared.config.retry;
    let running = shared.running.clone();
    let stop = shared.stop.clone();
    let handle = tokio::spawn(async move {
        // Prefetched tasks wait here for a free handler (the semaphore is fair, so roughly in
        // the order they were dispatched).
        let Some(_running) = running.acquire(&task.kind).await else {
            return;
        };
        if stop.is_cancelled() {
            // Shutting down: a task that has not started goes back unstarted.
            let _ = results
                .send(Finished {
                    lease,
                    kind: task.kind,
                    transition: Transition::Release,
                })
                .await;
            drop(permit);
            return;
        }
        let finished = run_handler(handler, task, ctx, &policy).await;
        // Waiting here when the keeper falls behind holds the permit, so the claimer slows
        // down instead of piling up unrecorded results.
        let _ = results.send(finished).await;
        drop(permit);
    });
    if let Some(held) = shared.held().get_mut(&lease.id) {
        held.abort = Some(handle.abort_handle());
    }
}

/// Runs a task's handler (a panic is a retryable failure) and decides its transition.
async fn run_handler(
    handler: Option<Arc<dyn DynHandler>>,
    task: ClaimedTask,
    ctx: TaskContext,
    policy: &RetryPolicy,
) -> Finished {
    // The handler gets the task itself; only these small fields are kept for the result
    // (a clone would copy the whole payload).
    let lease = task.lease();
    let kind = task.kind.clone();
    let (attempts, max_attempts) = (task.attempts, task.max_attempts);
    let result = match handler {
        Some(handler) => match AssertUnwindSafe(handler.call(task, ctx))
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(panic) => Err(HandlerError::Retryable(format!(
                "the {kind} handler panicked: {}",
                panic_message(panic.as_ref())
            ))),
        },
        // Claims only ask for registered kinds; this guards the invariant.
        None => Err(HandlerError::Retryable(format!(
            "no handler for tasks of kind {kind}"
        ))),
    };
    let transition = transition::after_run(
        result,
        attempts,
        max_attempts,
        policy,
        rand::random::<f64>(),
    );
    Finished {
        lease,
        kind,
        transition,
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_recovered() {
        let text: Box<dyn std::any::Any + Send> = Box::new("index out of bounds");
        assert_eq!(panic_message(text.as_ref()), "index out of bounds");
        let formatted: Box<dyn std::any::Any + Send> = Box::new(String::from("bad task 7"));
        assert_eq!(panic_message(formatted.as_ref()), "bad task 7");
        let other: Box<dyn std::any::Any + Send> = Box::new(42u8);
        assert_eq!(panic_message(other.as_ref()), "(no message)");
    }
}
