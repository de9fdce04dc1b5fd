//! When a MailboxPoll's next poll runs: the pure decision, and the queue operations that carry
//! it out.
//!
//! One live poll task per MailboxPoll (dedupe key [`poll_dedupe_key`]) serves both the schedule
//! and forced polls: a forced poll pulls the pending task forward to now, a running task serves
//! requests that arrived during its round itself (see the poll handler), and a finished task
//! is followed by a new pending one due one interval after the last poll started.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use super::reconcile::ReconcileError;
use crate::pipeline::{PollTask, poll_dedupe_key};
use crate::poll_log;
use crate::queue::{self, NewTask, QueueError, TaskState};

/// The mailbox's live poll task, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveTask {
    Pending { run_at: DateTime<Utc> },
    Running,
}

/// What the scheduler knows about one MailboxPoll's polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollState {
    /// When the last poll started (any outcome).
    pub last_started: Option<DateTime<Utc>>,
    /// Forced-poll requests not served yet.
    pub waiting_requests: bool,
    pub live: Option<LiveTask>,
}

/// What the scheduler wants, besides timing: is the schedule on (not suspended, configuration
/// valid) and how often.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub active: bool,
    pub interval: Duration,
}

/// The queue operation that makes the live task match the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Nothing,
    Enqueue { run_at: DateTime<Utc> },
    PullForward { run_at: DateTime<Utc> },
    CancelPending,
}

/// When the next scheduled poll is due: one interval after the last one started, now when
/// the mailbox was never polled.
pub fn next_due(
    last_started: Option<DateTime<Utc>>,
    interval: Duration,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    match last_started {
        Some(started) => {
            started + chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::MAX)
        }
        None => now,
    }
}

/// The run time the live task should have: the scheduled due time (when the schedule is on)
/// or now (when forced polls wait), whichever is sooner; `None` when no poll is wanted.
pub fn wanted_run_at(
    state: &PollState,
    schedule: Schedule,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let scheduled = schedule
        .active
        .then(|| next_due(state.last_started, schedule.interval, now));
    let forced = state.waiting_requests.then_some(now);
    match (scheduled, forced) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Decides the step. A running task is never touched: it serves requests that arrive during
/// its round, and its successor is planned once it has finished. A pending task is only ever
/// moved forward, so a retry backoff or a Graph `Retry-After` is not cut short by a longer
/// interval; it is cancelled when no poll is wanted (suspended, nothing forced).
pub fn plan(state: &PollState, schedule: Schedule, now: DateTime<Utc>) -> Step {
    let wanted = wanted_run_at(state, schedule, now);
    match (state.live, wanted) {
        (Some(LiveTask::Running), _) => Step::Nothing,
        (Some(LiveTask::Pending { .. }), None) => Step::CancelPending,
        (Some(LiveTask::Pending { run_at }), Some(wanted)) if wanted < run_at => {
            Step::PullForward { run_at: wanted }
        }
        (Some(LiveTask::Pending { .. }), Some(_)) => Step::Nothing,
        (None, Some(run_at)) => Step::Enqueue { run_at },
        (None, None) => Step::Nothing,
    }
}

/// Reads the scheduling state of one MailboxPoll.
pub async fn load(pool: &PgPool, uid: Uuid) -> Result<PollState, ReconcileError> {
    let facts = poll_log::schedule_facts(pool, uid).await?;
    let live = queue::live_task(pool, &poll_dedupe_key(uid))
        .await?
        .map(|live| match live.state {
            TaskState::Running => LiveTask::Running,
            _ => LiveTask::Pending {
                run_at: live.run_at,
            },
        });
    Ok(PollState {
        last_started: facts.last_started,
        waiting_requests: facts.waiting_requests,
        live,
    })
}

/// The poll task of a MailboxPoll.
pub fn poll_task(
    uid: Uuid,
    max_attempts: i32,
    run_at: DateTime<Utc>,
) -> Result<NewTask, QueueError> {
    Ok(NewTask::of(&PollTask { mailbox_uid: uid })?
        .run_at(run_at)
        .max_attempts(max_attempts.clamp(1, queue::MAX_ATTEMPTS_LIMIT)))
}

/// Carries out a step. Races with workers are harmless: enqueue resolves to a live task that
/// appeared meanwhile, and the other operations only touch a task that is still pending.
pub async fn apply(
    pool: &PgPool,
    uid: Uuid,
    max_attempts: i32,
    step: Step,
) -> Result<(), QueueError> {
    match step {
        Step::Nothing => Ok(()),
        Step::Enqueue { run_at } => {
            let enqueued = queue::enqueue(pool, &poll_task(uid, max_attempts, run_at)?).await?;
            if !enqueued.fresh {
                queue::pull_forward(pool, &poll_dedupe_key(uid), run_at).await?;
            }
            Ok(())
        }
        Step::PullForward { run_at } => {
            queue::pull_forward(pool, &poll_dedupe_key(uid), run_at).await?;
            Ok(())
        }
        Step::CancelPending => {
            queue::cancel_pending(pool, &poll_dedupe_key(uid)).await?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).expect("valid time")
    }

    const ON: Schedule = Schedule {
        active: true,
        interval: Duration::from_secs(60),
    };
    const OFF: Schedule = Schedule {
        active: false,
        interval: Duration::from_secs(60),
    };

    fn state(last: Option<i64>, waiting: bool, live: Option<LiveTask>) -> PollState {
        PollState {
            last_started: last.map(at),
            waiting_requests: waiting,
            live,
        }
    }

    #[test]
    fn never_polled_is_due_now() {
        assert_eq!(
            plan(&state(None, false, None), ON, at(5)),
            Step::Enqueue { run_at: at(5) }
        );
    }

    #[test]
    fn next_poll_is_one_interval_after_the_last_start() {
        assert_eq!(
            plan(&state(Some(0), false, None), ON, at(5)),
            Step::Enqueue { run_at: at(60) }
        );
        // Already pending at that time: nothing to do, so repeated reconciles are no-ops.
        let pending = Some(LiveTask::Pending { run_at: at(60) });
        assert_eq!(
            plan(&state(Some(0), false, pending), ON, at(5)),
            Step::Nothing
        );
    }

    #[test]
    fn a_shorter_interval_pulls_forward_a_longer_one_does_not_push_back() {
        let pending = Some(LiveTask::Pending { run_at: at(300) });
        assert_eq!(
            plan(&state(Some(0), false, pending), ON, at(5)),
            Step::PullForward { run_at: at(60) }
        );
        let soon = Some(LiveTask::Pending { run_at: at(30) });
        assert_eq!(plan(&state(Some(0), false, soon), ON, at(5)), Step::Nothing);
    }

    #[test]
    fn a_forced_poll_is_due_now_even_when_suspended() {
        let pending = Some(LiveTask::Pending { run_at: at(60) });
        assert_eq!(
            plan(&state(Some(0), true, pending), ON, at(5)),
            Step::PullForward { run_at: at(5) }
        );
        assert_eq!(
            plan(&state(Some(0), true, pending), OFF, at(5)),
            Step::PullForward { run_at: at(5) }
        );
        assert_eq!(
            plan(&state(Some(0), true, None), OFF, at(5)),
            Step::Enqueue { run_at: at(5) }
        );
    }

    #[test]
    fn suspending_cancels_the_pending_scheduled_poll_only() {
        let pending = Some(LiveTask::Pending { run_at: at(60) });
        assert_eq!(
            plan(&state(Some(0), false, pending), OFF, at(5)),
            Step::CancelPending
        );
        assert_eq!(
            plan(&state(Some(0), false, None), OFF, at(5)),
            Step::Nothing
        );
    }

    #[test]
    fn a_running_poll_is_left_alone() {
        for schedule in [ON, OFF] {
            for waiting in [false, true] {
                assert_eq!(
                    plan(
                        &state(Some(0), waiting, Some(LiveTask::Running)),
                        schedule,
                        at(5)
                    ),
                    Step::Nothing
                );
            }
        }
    }
}
