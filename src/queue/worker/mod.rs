//! The worker pool: claims tasks in batches, runs their handlers with bounded concurrency,
//! records results in batches, keeps leases alive, rescues expired leases of any worker,
//! prunes old tasks, and shuts down gracefully.
//!
//! Inside one pool:
//! - the *claimer* claims as many tasks as there are free slots (one statement), each kind
//!   within its [`SlotBudget`], and spawns a handler per task; a few more than `concurrency` may be held (`prefetch`), so the next
//!   handlers start without waiting for a claim; when the queue runs dry it sleeps until a
//!   notification, the polling interval, or shutdown;
//! - the *keeper* records results in batches (while there is a backlog, it waits up to a
//!   millisecond for a batch as large as the tasks the pool may hold) and releases what is left
//!   at shutdown;
//! - the *heartbeat* keeps the leases of held tasks alive on its own schedule, so a slow or
//!   failing result statement never lets leases run out; both write rows in ascending id
//!   order, so their statements never lock the same rows in opposite orders;
//! - the *listener* turns `NOTIFY` into wake-ups ([`crate::db::listen`]);
//! - *maintenance* rescues expired leases and prunes old tasks.
//!
//! Files: [`handler`] (what handlers implement and see), this module (settings, the pool and
//! its lifecycle), [`budget`] (slot budgets per kind), [`claimer`], [`keeper`], [`heartbeat`],
//! [`maintenance`].

mod budget;
mod claimer;
mod handler;
mod heartbeat;
mod keeper;
mod maintenance;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use budget::{HeldByKind, RunPermits};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::backoff::RetryPolicy;
use super::stats::{QueueCounters, QueueCountersSnapshot};
use super::transition::Transition;
use super::{Lease, QueueError, WAKE_CHANNEL};
use crate::db;
use handler::DynHandler;
use keeper::KeeperReport;

pub use budget::SlotBudget;
pub use handler::{FnHandler, Handler, TaskContext, handler_fn};

/// Identity of one worker process: the pod name plus a UUID of this process, so a restarted
/// pod that reuses its name neither inherits nor hides its predecessor's leases.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkerId(String);

impl WorkerId {
    /// `POD_NAME`, else the host name, plus a fresh UUID.
    pub fn from_environment() -> Self {
        let name = std::env::var("POD_NAME")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "mailpoll".to_owned());
        Self::named(&name)
    }

    /// `name` plus a fresh UUID.
    pub fn named(name: &str) -> Self {
        Self(format!("{name}/{}", Uuid::new_v4().simple()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for WorkerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Settings of a worker pool. The defaults suit production; tests shorten the times.
#[derive(Debug, Clone)]
pub struct WorkerPoolConfig {
    pub worker_id: WorkerId,
    /// Handlers running at once.
    pub concurrency: usize,
    /// Tasks claimed ahead of free handlers, so a finishing handler's successor needs no claim
    /// round trip. They hold a lease while they wait (heartbeats keep it); at shutdown they are
    /// released unstarted.
    pub prefetch: usize,
    /// Most tasks claimed by one statement.
    pub claim_batch: usize,
    /// How long a claim or heartbeat holds a task; another worker rescues it after that.
    pub lease: Duration,
    /// How often leases of running handlers are extended; well under `lease`.
    pub heartbeat_interval: Duration,
    /// How often an idle pool looks for due tasks without a notification (scheduled tasks,
    /// retries, lost notifications).
    pub poll_interval: Duration,
    /// Whether to LISTEN for enqueue notifications. Turn off behind a transaction-pooling proxy
    /// (PgBouncer), which does not deliver them; polling then does all the work.
    pub listen: bool,
    /// Slot budgets by task kind (reserved slots, most slots); kinds not listed share the
    /// slots no kind has reserved. A reservation counts against `concurrency` too: that many
    /// handlers of the kind can always run.
    pub budgets: HashMap<String, SlotBudget>,
    /// By task kind: the kinds capped per owner (MailboxPoll), and how many of an owner's
    /// tasks run at once across every pool on the database unless a task carries its own
    /// `max_running`. Pools sharing a database should agree on which kinds are capped.
    pub owner_caps: HashMap<String, i32>,
    /// Backoff of failed tasks.
    pub retry: RetryPolicy,
    /// Most results recorded by one statement.
    pub completion_batch: usize,
    /// How often expired leases are looked for.
    pub rescue_interval: Duration,
    /// Most expired leases taken back by one statement.
    pub rescue_batch: i64,
    /// Succeeded and cancelled tasks are deleted this long after they finished.
    pub retention: Duration,
    /// How often old tasks are pruned.
    pub prune_interval: Duration,
    /// Most tasks deleted by one statement.
    pub prune_batch: i64,
    /// At shutdown, how long running handlers may take to finish before they are stopped and
    /// their tasks released.
    pub shutdown_grace: Duration,
}

impl Default for WorkerPoolConfig {
    fn default() -> Self {
        Self {
            worker_id: WorkerId::from_environment(),
            concurrency: 16,
            prefetch: 32,
            claim_batch: 100,
            lease: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(20),
            poll_interval: Duration::from_secs(2),
            listen: true,
            budgets: HashMap::new(),
            owner_caps: HashMap::new(),
            retry: RetryPolicy::default(),
            completion_batch: 1000,
            rescue_interval: Duration::from_secs(15),
            rescue_batch: 500,
            retention: Duration::from_secs(7 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
            prune_batch: 1000,
            shutdown_grace: Duration::from_secs(20),
        }
    }
}

/// A worker pool being configured. [`WorkerPool::start`] runs it.
pub struct WorkerPool {
    db: PgPool,
    config: WorkerPoolConfig,
    handlers: HashMap<String, Arc<dyn DynHandler>>,
}

impl WorkerPool {
    pub fn new(db: PgPool, config: WorkerPoolConfig) -> Self {
        Self {
            db,
            config,
            handlers: HashMap::new(),
        }
    }

    /// Runs tasks of `kind` with `handler`. The pool claims only kinds it has handlers for.
    pub fn register(mut self, kind: impl Into<String>, handler: impl Handler) -> Self {
        self.handlers.insert(kind.into(), Arc::new(handler));
        self
    }

    /// Starts the pool's tasks on the current Tokio runtime.
    pub fn start(self) -> Result<RunningPool, QueueError> {
        let config = self.config;
        if self.handlers.is_empty() {
            return Err(QueueError::Invalid(
                "a worker pool needs at least one handler".into(),
            ));
        }
        if config.concurrency == 0 || config.claim_batch == 0 || config.completion_batch == 0 {
            return Err(QueueError::Invalid(
                "concurrency, claim_batch and completion_batch must be at least 1".into(),
            ));
        }
        if config.heartbeat_interval.is_zero() || config.heartbeat_interval >= config.lease {
            return Err(QueueError::Invalid(format!(
                "the heartbeat interval ({:?}) must be positive and shorter than the lease ({:?})",
                config.heartbeat_interval, config.lease
            )));
        }
        let mut kinds: Vec<String> = self.handlers.keys().cloned().collect();
        kinds.sort();
        check_budgets(&config, &kinds)?;
        // Results wait here for the keeper while it records the previous batch. A full channel
        // makes handlers keep their slots, so the tasks held at once stay bounded.
        let (results_tx, results_rx) = mpsc::channel(config.concurrency + config.prefetch);
        let shared = Arc::new(Shared {
            slots: Arc::new(Semaphore::new(config.concurrency + config.prefetch)),
            running: Arc::new(RunPermits::new(config.concurrency, &config.budgets)),
            held_by_kind: HeldByKind::new(&kinds),
            // Heartbeats on a connection of their own: handlers holding every pooled connection
            // (a poll records two pages at once) must not starve the leases they run under.
            heartbeat_db: PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(config.heartbeat_interval)
                .connect_lazy_with((*self.db.connect_options()).clone()),
            db: self.db,
            kinds,
            handlers: self.handlers,
            counters: Arc::new(QueueCounters::default()),
            held: Mutex::new(HashMap::new()),
            wake: Arc::new(Notify::new()),
            stop: CancellationToken::new(),
            backlog: AtomicBool::new(false),
            config,
        });
        tracing::info!(
            worker = %shared.config.worker_id,
            kinds = ?shared.kinds,
            concurrency = shared.config.concurrency,
            "worker pool started"
        );
        let claimer = tokio::spawn(claimer::run(shared.clone(), results_tx));
        let keeper = tokio::spawn(keeper::run(shared.clone(), results_rx));
        let heartbeat = tokio::spawn(heartbeat::run(shared.clone()));
        let listener = shared.config.listen.then(|| {
            let (db, wake, stop) = (shared.db.clone(), shared.wake.clone(), shared.stop.clone());
            // A burst of notifications wakes the claim loop once; a reconnection wakes it too,
            // since notifications sent meanwhile are lost.
            tokio::spawn(async move {
                db::listen(
                    &db,
                    WAKE_CHANNEL,
                    "task notifications",
                    |_| wake.notify_one(),
                    stop,
                )
                .await;
            })
        });
        let maintenance = tokio::spawn(maintenance::run(shared.clone()));
        Ok(RunningPool {
            shared,
            claimer: Some(claimer),
            keeper: Some(keeper),
            heartbeat: Some(heartbeat),
            listener,
            maintenance: Some(maintenance),
        })
    }
}

/// What graceful shutdown did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Handlers still running when the grace period ended, stopped.
    pub stopped: usize,
    /// Tasks handed back to pending without counting an attempt: stopped handlers' tasks and
    /// prefetched tasks that never started.
    pub released: usize,
    /// Tasks that could not be released (database unreachable); rescued when their lease ends.
    pub abandoned: usize,
}

/// A started worker pool. Call [`RunningPool::shutdown`] to stop it gracefully; dropping it
/// stops everything at once like a crash, leaving held tasks to be rescued.
pub struct RunningPool {
    shared: Arc<Shared>,
    claimer: Option<JoinHandle<()>>,
    keeper: Option<JoinHandle<KeeperReport>>,
    heartbeat: Option<JoinHandle<()>>,
    listener: Option<JoinHandle<()>>,
    maintenance: Option<JoinHandle<()>>,
}

impl RunningPool {
    pub fn worker_id(&self) -> &WorkerId {
        &self.shared.config.worker_id
    }

    /// The pool's counters, shared: read them any time, also after shutdown.
    pub fn counters(&self) -> Arc<QueueCounters> {
        self.shared.counters.clone()
    }

    pub fn stats(&self) -> QueueCountersSnapshot {
        self.shared.counters.snapshot()
    }

    /// Handlers running now.
    pub fn in_flight(&self) -> usize {
        self.shared.running.in_use()
    }

    /// Stops claiming, lets running handlers finish within the grace period, stops the rest,
    /// records every result and releases the unfinished tasks without counting an attempt.
    pub async fn shutdown(mut self) -> ShutdownReport {
        let shared = self.shared.clone();
        shared.stop.cancel();
        tracing::info!(worker = %shared.config.worker_id, "worker pool shutting down");
        if let Some(claimer) = self.claimer.take() {
            let _ = claimer.await;
        }
        let all =
            u32::try_from(shared.config.concurrency + shared.config.prefetch).unwrap_or(u32::MAX);
        let mut report = ShutdownReport::default();
        let finished =
            tokio::time::timeout(shared.config.shutdown_grace, shared.slots.acquire_many(all))
                .await;
        if finished.is_err() {
            let running = shared.running.in_use();
            shared.abort_handlers();
            report.stopped = running;
            tracing::warn!(
                running,
                grace = ?shared.config.shutdown_grace,
                "handlers still running after the grace period; stopping them and releasing their tasks"
            );
            // Aborted handlers end at their next await; one blocking a thread cannot be
            // stopped, and its task is released (or rescued) regardless.
            let _ =
                tokio::time::timeout(Duration::from_secs(5), shared.slots.acquire_many(all)).await;
        }
        // The claimer and every handler have dropped their result senders: the keeper records
        // what is left, releases unfinished tasks and ends.
        if let Some(keeper) = self.keeper.take() {
            match keeper.await {
                Ok(keeper_report) => report.abandoned = keeper_report.abandoned,
                Err(error) => tracing::error!(%error, "the task result keeper failed"),
            }
        }
        // Only shutdown releases tasks: prefetched ones that never started, and those whose
        // handlers were stopped.
        report.released =
            usize::try_from(shared.counters.snapshot().released).unwrap_or(usize::MAX);
        for handle in [
            self.heartbeat.take(),
            self.listener.take(),
            self.maintenance.take(),
        ]
        .into_iter()
        .flatten()
        {
            let _ = handle.await;
        }
        tracing::info!(
            worker = %shared.config.worker_id,
            stopped = report.stopped,
            released = report.released,
            abandoned = report.abandoned,
            "worker pool stopped"
        );
        report
    }
}

impl Drop for RunningPool {
    fn drop(&mut self) {
        for handle in [
            self.claimer.take(),
            self.heartbeat.take(),
            self.listener.take(),
            self.maintenance.take(),
        ]
        .into_iter()
        .flatten()
        {
            handle.abort();
        }
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
        self.shared.stop.cancel();
        self.shared.abort_handlers();
    }
}

/// State shared by a pool's tasks.
struct Shared {
    db: PgPool,
    heartbeat_db: PgPool,
    config: WorkerPoolConfig,
    kinds: Vec<String>,
    handlers: HashMap<String, Arc<dyn DynHandler>>,
    counters: Arc<QueueCounters>,
    /// One permit per task this pool may hold (running or prefetched); returned when the task's
    /// handler has ended and its result is handed to the keeper.
    slots: Arc<Semaphore>,
    /// Permits of handlers that may run at once, some kept for kinds with reserved slots.
    running: Arc<RunPermits>,
    /// Slots held per kind, for the budgets.
    held_by_kind: HeldByKind,
    /// Tasks this pool holds a lease on whose results are not recorded yet.
    held: Mutex<HashMap<i64, Held>>,
    wake: Arc<Notify>,
    stop: CancellationToken,
    /// Whether the claimer's last claim got every task it asked for: more tasks are probably
    /// due, and the keeper gathers larger result batches.
    backlog: AtomicBool,
}

struct Held {
    token: Uuid,
    lost: watch::Sender<bool>,
    abort: Option<AbortHandle>,
    /// Its result is being recorded: a heartbeat that finds its lease gone saw the result
    /// land, not a takeover.
    recording: bool,
}

impl Shared {
    fn held(&self) -> MutexGuard<'_, HashMap<i64, Held>> {
        // The map stays consistent even if a holder panicked: every update is one call.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Aborts handlers that have not ended, started or not.
    fn abort_handlers(&self) {
        for entry in self.held().values() {
            if let Some(abort) = &entry.abort {
                abort.abort();
            }
        }
    }

    fn held_leases(&self) -> Vec<Lease> {
        let mut leases: Vec<Lease> = self
            .held()
            .iter()
            .map(|(&id, held)| Lease {
                id,
                token: held.token,
            })
            .collect();
        leases.sort_by_key(|lease| lease.id);
        leases
    }
}

/// Refuses budgets that leave a registered kind no handler, or name an invalid cap.
fn check_budgets(config: &WorkerPoolConfig, kinds: &[String]) -> Result<(), QueueError> {
    let reserved: usize = config.budgets.values().map(|budget| budget.reserved).sum();
    let unreserved_kind = kinds.iter().find(|kind| {
        config
            .budgets
            .get(kind.as_str())
            .is_none_or(|budget| budget.reserved == 0)
    });
    if reserved > config.concurrency
        || (reserved == config.concurrency && unreserved_kind.is_some())
    {
        return Err(QueueError::Invalid(format!(
            "{reserved} reserved slots leave no handler for {} with a concurrency of {}",
            unreserved_kind.map_or("every kind", String::as_str),
            config.concurrency
        )));
    }
    if let Some((kind, budget)) = config
        .budgets
        .iter()
        .find(|(_, budget)| budget.max.is_some_and(|max| max < budget.reserved.max(1)))
    {
        return Err(QueueError::Invalid(format!(
            "the most slots of {kind} ({:?}) must be at least 1 and at least its reservation ({})",
            budget.max, budget.reserved
        )));
    }
    if let Some((kind, cap)) = config
        .owner_caps
        .iter()
        .find(|(_, cap)| !(1..=super::MAX_RUNNING_LIMIT).contains(*cap))
    {
        return Err(QueueError::Invalid(format!(
            "the cap of running {kind} tasks per owner must be between 1 and {}, not {cap}",
            super::MAX_RUNNING_LIMIT
        )));
    }
    Ok(())
}

/// A handler's result on its way to the keeper.
struct Finished {
    lease: Lease,
    kind: String,
    transition: Transition,
}

/// Grows a pause after consecutive database errors, so an outage is not hammered.
struct ErrorBackoff {
    next: Duration,
}

impl ErrorBackoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Self { next: Self::MIN }
    }

    fn reset(&mut self) {
        self.next = Self::MIN;
    }

    fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_are_unique_per_process_even_with_one_pod_name() {
        let a = WorkerId::named("mailpoll-0");
        let b = WorkerId::named("mailpoll-0");
        assert_ne!(a, b, "a restarted pod must not reuse its predecessor's id");
        assert!(a.as_str().starts_with("mailpoll-0/"));
        assert_eq!(a.as_str().len(), "mailpoll-0/".len() + 32);
    }

    #[test]
    fn error_backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = ErrorBackoff::new();
        let pauses: Vec<u64> = (0..9).map(|_| backoff.next().as_millis() as u64).collect();
        assert_eq!(
            pauses,
            vec![100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        backoff.reset();
        assert_eq!(backoff.next(), Duration::from_millis(100));
    }

    #[test]
    fn default_settings_keep_heartbeats_well_inside_the_lease() {
        let config = WorkerPoolConfig::default();
        assert!(config.heartbeat_interval * 2 < config.lease);
        assert!(
            config.shutdown_grace < Duration::from_secs(30),
            "inside Kubernetes' default grace period"
        );
    }
}
