//! The task queue: one Postgres table (`tasks`), a handful of named operations, and a worker
//! pool that runs them.
//!
//! Every state change of a task happens in exactly one operation of [`store`]:
//!
//! | operation | from | to |
//! |---|---|---|
//! | [`enqueue`] / [`enqueue_many`] | (new) | `pending` (or the live task with the same dedupe key) |
//! | [`claim`] | `pending`, due | `running`, with a lease and a fresh lock token |
//! | [`heartbeat`] | `running` (own lease) | `running`, lease extended |
//! | [`finish`] ([`complete`], [`fail`], [`snooze`], [`release`]) | `running` (own lease) | `succeeded`, `pending` or `dead` |
//! | [`rescue`] | `running`, lease expired | `pending` (an attempt counted) or `dead` |
//! | [`retry_dead_matching`] | `dead` (by id, kind, owner) | `pending`, attempts reset (`cancelled` when another task holds or takes its dedupe key) |
//! | [`pull_forward`] | `pending`, due later | `pending`, due sooner |
//! | [`cancel_owner`] | `pending` / `running` | `cancelled` |
//! | [`cancel_pending`] | `pending` (by dedupe key) | `cancelled` |
//! | [`cancel_matching`] | `pending` / `dead` (by id, kind, owner) | `cancelled` |
//! | [`prune`] | `succeeded` / `cancelled`, old | deleted |
//!
//! Operations on a held task are fenced by its [`Lease`] (task id and the lock token of the
//! claim): once a lease has been taken over, its old holder's writes change nothing and report
//! [`QueueError::LeaseLost`]. `attempts` counts attempts that ended badly (a failure or an
//! expired lease); snoozing and releasing do not count.
//!
//! Which transition follows a handler's result is decided by the pure [`transition`] module,
//! with the retry delays of [`backoff`]; [`worker`] runs handlers and batches their results.

mod args;
pub mod backoff;
pub mod stats;
pub mod store;
pub mod transition;
pub mod worker;

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use args::TaskArgs;
pub use backoff::RetryPolicy;
pub use stats::{QueueCounters, QueueCountersSnapshot, QueueDepth};
pub use store::{
    FinishOutcome, PruneReport, RescueReport, RetryReport, TaskFilter, TaskSelection,
    cancel_matching, cancel_owner, cancel_pending, claim, claim_kinds, complete, dead_tasks, depth,
    enqueue, enqueue_many, enqueue_many_on, enqueue_or_rerun_on, fail, finish, finish_on, get,
    heartbeat, list, live_owners_older_than, live_task, prune, prune_dead, pull_forward, release,
    release_waiting, rescue, retry_dead_matching, snooze,
};
pub use transition::{HandlerError, Transition};
pub use worker::{
    FnHandler, Handler, RunningPool, ShutdownReport, SlotBudget, TaskContext, WorkerId, WorkerPool,
    WorkerPoolConfig, handler_fn,
};

/// The Postgres channel enqueues notify so idle workers wake up at once.
pub const WAKE_CHANNEL: &str = "mailpoll_tasks";

/// Attempts a task gets unless its enqueuer says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 8;

/// The most attempts the schema allows for one task.
pub const MAX_ATTEMPTS_LIMIT: i32 = 1000;

/// The most tasks of one owner and kind the schema allows to run at once.
pub const MAX_RUNNING_LIMIT: i32 = 1000;

/// How far apart in the fair order enqueue places one owner's tasks of a kind. It only orders
/// tasks (a backlog with nobody else waiting runs at full speed): an owner with nothing pending
/// goes ahead of another owner's backlog, and backlogs of several owners alternate.
pub const FAIR_SPACING: std::time::Duration = std::time::Duration::from_millis(100);

/// What one claim may take of one kind of task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindClaim {
    pub kind: String,
    /// At most this many tasks of the kind.
    pub room: usize,
    /// This many of them (at most `room`) go before other kinds' tasks: places the kind has
    /// reserved and not filled yet.
    pub reserved: usize,
    /// Whether tasks of this kind are capped per owner, cluster-wide, and at how many running
    /// at once: at a task's own `max_running`, else this. `None`: not capped (and a claim with
    /// no capped kind is cheaper).
    pub owner_cap: Option<i32>,
}

/// The lifecycle state of a task, as stored in `tasks.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Pending,
    Running,
    Succeeded,
    Dead,
    Cancelled,
}

impl TaskState {
    pub const ALL: [TaskState; 5] = [
        TaskState::Pending,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Dead,
        TaskState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Dead => "dead",
            TaskState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                format!("unknown task state {s:?}: expected pending, running, succeeded, dead or cancelled")
            })
    }
}

/// A task to add to the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// What the task does; workers claim tasks by kind (`poll`, `deliver`, ...).
    pub kind: String,
    pub payload: serde_json::Value,
    /// The MailboxPoll (by uid) the task works for, so its tasks can be cancelled on deletion.
    pub owner_uid: Option<Uuid>,
    /// While a pending or running task has this key, enqueueing it again returns that task.
    pub dedupe_key: Option<String>,
    /// Not before this time; `None` means now (by the database's clock).
    pub run_at: Option<DateTime<Utc>>,
    /// Attempts (failures or lost leases) before the task is kept as `dead`.
    pub max_attempts: i32,
    /// At most this many tasks of its owner and kind run at once, cluster-wide (deliveries of
    /// one MailboxPoll), when the claiming pools cap the kind; `None`: their default cap.
    pub max_running: Option<i32>,
}

impl NewTask {
    pub fn new(kind: impl Into<String>, payload: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            payload,
            owner_uid: None,
            dedupe_key: None,
            run_at: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_running: None,
        }
    }

    pub fn owner(mut self, owner_uid: Uuid) -> Self {
        self.owner_uid = Some(owner_uid);
        self
    }

    pub fn dedupe_key(mut self, key: impl Into<String>) -> Self {
        self.dedupe_key = Some(key.into());
        self
    }

    pub fn run_at(mut self, run_at: DateTime<Utc>) -> Self {
        self.run_at = Some(run_at);
        self
    }

    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    pub fn max_running(mut self, max_running: i32) -> Self {
        self.max_running = Some(max_running);
        self
    }

    /// Checks what the schema would refuse, so a bad task fails with a clear message before
    /// it reaches the database (and cannot fail a whole batch there).
    pub fn validate(&self) -> Result<(), QueueError> {
        if self.kind.is_empty() {
            return Err(QueueError::Invalid("a task kind must not be empty".into()));
        }
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&self.max_attempts) {
            return Err(QueueError::Invalid(format!(
                "max_attempts of a {} task must be between 1 and {MAX_ATTEMPTS_LIMIT}, not {}",
                self.kind, self.max_attempts
            )));
        }
        if let Some(max_running) = self.max_running
            && !(1..=MAX_RUNNING_LIMIT).contains(&max_running)
        {
            return Err(QueueError::Invalid(format!(
                "max_running of a {} task must be between 1 and {MAX_RUNNING_LIMIT}, not {max_running}",
                self.kind
            )));
        }
        if self.max_running.is_some() && self.owner_uid.is_none() {
            return Err(QueueError::Invalid(format!(
                "a {} task with max_running needs an owner: the cap is per owner",
                self.kind
            )));
        }
        Ok(())
    }
}

/// The live task of a dedupe key: pending (due at `run_at`) or running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveTask {
    pub state: TaskState,
    pub run_at: DateTime<Utc>,
}

/// The task an enqueue resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    pub id: i64,
    /// `false` when a live task with the same dedupe key was returned instead of a new one.
    pub fresh: bool,
}

/// What proves a worker holds a task: its id and the lock token of the claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    pub id: i64,
    pub token: Uuid,
}

/// A task claimed by a worker, with its lease.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ClaimedTask {
    pub id: i64,
    pub kind: String,
    pub payload: serde_json::Value,
    pub owner_uid: Option<Uuid>,
    pub dedupe_key: Option<String>,
    /// Attempts that already ended badly; this run is attempt `attempts + 1`.
    pub attempts: i32,
    pub max_attempts: i32,
    pub lock_token: Uuid,
    pub lease_expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

impl ClaimedTask {
    pub fn lease(&self) -> Lease {
        Lease {
            id: self.id,
            token: self.lock_token,
        }
    }

    /// The number of this run, from 1.
    pub fn attempt(&self) -> i32 {
        self.attempts + 1
    }
}

/// A task as people see it (`mailpoll tasks list`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct TaskRow {
    pub id: i64,
    pub kind: String,
    #[sqlx(try_from = "String")]
    pub state: TaskState,
    pub payload: serde_json::Value,
    pub owner_uid: Option<Uuid>,
    pub dedupe_key: Option<String>,
    pub run_at: DateTime<Utc>,
    pub attempts: i32,
    pub max_attempts: i32,
    /// The worker holding the task, or the last one that ran it.
    pub locked_by: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Set while a pending task waits for a slot of its owner, which runs this many tasks of
    /// its kind (its cap) already.
    pub waiting_cap: Option<i32>,
}

impl TryFrom<String> for TaskState {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The lease was taken over (rescued after it expired, released, or the task cancelled):
    /// the caller no longer holds the task and changed nothing.
    #[error("task {id} is no longer held under this lease; nothing was changed")]
    LeaseLost { id: i64 },
    #[error("invalid task: {0}")]
    Invalid(String),
    #[error("task queue: {operation} failed: {source}")]
    Database {
        operation: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

impl QueueError {
    /// A claim lost a race for an owner's slot to another replica's claim, which committed
    /// first; nothing was claimed, and claiming again is safe.
    pub fn is_slot_conflict(&self) -> bool {
        match self {
            QueueError::Database {
                source: sqlx::Error::Database(error),
                ..
            } => error.constraint() == Some("tasks_owner_slot"),
            _ => false,
        }
    }

    pub(crate) fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> QueueError {
        move |source| QueueError::Database { operation, source }
    }
}
