//! Numbers for metrics: counters a worker pool keeps, and the queue depth read from Postgres
//! ([`super::store::depth`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::TaskState;
use super::transition::Transition;

/// Monotonic counters of one worker pool; cheap to update from every task.
#[derive(Debug, Default)]
pub struct QueueCounters {
    claimed: AtomicU64,
    completed: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    snoozed: AtomicU64,
    released: AtomicU64,
    rescued: AtomicU64,
    lease_lost: AtomicU64,
}

/// A copy of [`QueueCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCountersSnapshot {
    /// Tasks this pool claimed.
    pub claimed: u64,
    /// Tasks that succeeded.
    pub completed: u64,
    /// Failed attempts that will be retried.
    pub retried: u64,
    /// Tasks that failed for good.
    pub dead: u64,
    /// Runs that asked to be retried later without counting an attempt.
    pub snoozed: u64,
    /// Tasks handed back unfinished at shutdown.
    pub released: u64,
    /// Expired leases (of any worker) this pool took back.
    pub rescued: u64,
    /// Results refused because the lease had been taken over.
    pub lease_lost: u64,
}

impl QueueCountersSnapshot {
    /// Failed attempts, retried or not.
    pub fn failures(&self) -> u64 {
        self.retried + self.dead
    }
}

impl QueueCounters {
    pub fn snapshot(&self) -> QueueCountersSnapshot {
        QueueCountersSnapshot {
            claimed: self.claimed.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
            snoozed: self.snoozed.load(Ordering::Relaxed),
            released: self.released.load(Ordering::Relaxed),
            rescued: self.rescued.load(Ordering::Relaxed),
            lease_lost: self.lease_lost.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add_claimed(&self, n: usize) {
        self.claimed.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_rescued(&self, n: usize) {
        self.rescued.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_lease_lost(&self, n: usize) {
        self.lease_lost.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a transition the database accepted.
    pub(crate) fn record(&self, transition: &Transition) {
        let counter = match transition {
            Transition::Succeed => &self.completed,
            Transition::Retry { .. } => &self.retried,
            Transition::Dead { .. } => &self.dead,
            Transition::Snooze { .. } => &self.snoozed,
            Transition::Release => &self.released,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Tasks in one state of one kind.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthRow {
    pub state: TaskState,
    pub kind: String,
    pub tasks: i64,
    /// For pending tasks: how long the oldest due one has waited (none when none is due).
    pub oldest_due_age: Option<Duration>,
}

/// Queue depth by state and kind, for pending, running and dead tasks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueDepth {
    pub rows: Vec<DepthRow>,
}

impl QueueDepth {
    /// Tasks in `state`, all kinds together.
    pub fn count(&self, state: TaskState) -> i64 {
        self.rows
            .iter()
            .filter(|row| row.state == state)
            .map(|row| row.tasks)
            .sum()
    }

    /// The longest any due task has waited, all kinds together.
    pub fn oldest_pending_age(&self) -> Option<Duration> {
        self.rows.iter().filter_map(|row| row.oldest_due_age).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_follow_transitions() {
        let counters = QueueCounters::default();
        counters.add_claimed(3);
        counters.record(&Transition::Succeed);
        counters.record(&Transition::Retry {
            delay: Duration::ZERO,
            error: "x".into(),
        });
        counters.record(&Transition::Dead { error: "y".into() });
        counters.record(&Transition::Release);
        counters.add_lease_lost(1);
        let s = counters.snapshot();
        assert_eq!(
            (
                s.claimed,
                s.completed,
                s.failures(),
                s.released,
                s.lease_lost
            ),
            (3, 1, 2, 1, 1)
        );
    }

    #[test]
    fn depth_sums_kinds_and_finds_the_oldest_wait() {
        let row = |state, kind: &str, tasks, age: Option<u64>| DepthRow {
            state,
            kind: kind.into(),
            tasks,
            oldest_due_age: age.map(Duration::from_secs),
        };
        let depth = QueueDepth {
            rows: vec![
                row(TaskState::Pending, "deliver", 4, Some(3)),
                row(TaskState::Pending, "poll", 2, Some(9)),
                row(TaskState::Running, "poll", 1, None),
            ],
        };
        assert_eq!(depth.count(TaskState::Pending), 6);
        assert_eq!(depth.count(TaskState::Dead), 0);
        assert_eq!(depth.oldest_pending_age(), Some(Duration::from_secs(9)));
    }
}
