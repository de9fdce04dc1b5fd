//! The worker pool: claims tasks in batches, runs their handlers with bounded concurrency,
//! records results in batches, keeps leases alive, rescues expired leases of any worker,
//! prunes old tasks, and shuts down gracefully.
//!
//! Inside one pool:
//! - the *claimer* claims as many tasks as there are free slots (one statement) and spawns a
//!   handler per task; a few more than `concurrency` may be held (`prefetch`), so the next
//!   handlers start without waiting for a claim; when the queue runs dry it sleeps until a
//!   notification, the polling interval, or shutdown;
//! - the *keeper* is the only writer of held tasks: it records results in batches, sends
//!   heartbeats and releases what is left at shutdown. One writer per pool means two of its
//!   statements never lock the same rows in different orders;
//! - the *listener* turns `NOTIFY` into wake-ups ([`super::wakeup`]);
//! - *maintenance* rescues expired leases and prunes old tasks.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::FutureExt;
use sqlx::PgPool;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::backoff::RetryPolicy;
use super::stats::{QueueCounters, QueueCountersSnapshot};
use super::transition::{self, HandlerError, Transition};
use super::{ClaimedTask, Lease, QueueError, store, wakeup};

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

/// What a handler can know about its run besides the task.
#[derive(Debug, Clone)]
pub struct TaskContext {
    lease_lost: watch::Receiver<bool>,
    shutdown: CancellationToken,
}

impl TaskContext {
    /// Whether another worker took the task over; the result of this run will be refused.
    pub fn is_lease_lost(&self) -> bool {
        *self.lease_lost.borrow()
    }

    /// Resolves when the lease is lost. A long handler can select on it to stop early.
    pub async fn lease_lost(&self) {
        let mut lost = self.lease_lost.clone();
        if lost.wait_for(|lost| *lost).await.is_err() {
            // The pool is gone, and with it any chance to record this run.
            std::future::pending::<()>().await;
        }
    }

    /// Whether the pool is shutting down: a long handler should finish soon or return a
    /// snooze so the task is picked up again elsewhere.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Resolves when the pool starts shutting down.
    pub async fn shutting_down(&self) {
        self.shutdown.cancelled().await;
    }
}

/// Runs tasks of one kind. Return `Ok` when done, or a [`HandlerError`] saying whether to
/// retry, give up, or run again later. A panic counts as a retryable failure.
///
/// Handlers run at least once per task: after a crash or a lost lease a task runs again, so
/// its effects must be idempotent (the message ledger is what makes deliveries so).
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        task: &ClaimedTask,
        ctx: &TaskContext,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// A handler made of an async closure over owned values.
pub struct FnHandler<F>(F);

/// Wraps `f` into a [`Handler`].
pub fn handler_fn<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(ClaimedTask, TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    FnHandler(f)
}

impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(ClaimedTask, TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    fn handle(
        &self,
        task: &ClaimedTask,
        ctx: &TaskContext,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send {
        (self.0)(task.clone(), ctx.clone())
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;

/// [`Handler`] behind a pointer, so handlers of different types share one map.
trait DynHandler: Send + Sync {
    fn call(self: Arc<Self>, task: ClaimedTask, ctx: TaskContext) -> HandlerFuture;
}

impl<H: Handler> DynHandler for H {
    fn call(self: Arc<Self>, task: ClaimedTask, ctx: TaskContext) -> HandlerFuture {
        Box::pin(async move { self.handle(&task, &ctx).await })
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
        // Results wait here for the keeper while it records the previous batch. A full channel
        // makes handlers keep their slots, so the tasks held at once stay bounded.
        let (results_tx, results_rx) = mpsc::channel(config.concurrency + config.prefetch);
        let shared = Arc::new(Shared {
            slots: Arc::new(Semaphore::new(config.concurrency + config.prefetch)),
            running: Arc::new(Semaphore::new(config.concurrency)),
            db: self.db,
            kinds,
            handlers: self.handlers,
            counters: Arc::new(QueueCounters::default()),
            held: Mutex::new(HashMap::new()),
            wake: Arc::new(Notify::new()),
            stop: CancellationToken::new(),
            config,
        });
        tracing::info!(
            worker = %shared.config.worker_id,
            kinds = ?shared.kinds,
            concurrency = shared.config.concurrency,
            "worker pool started"
        );
        let claimer = tokio::spawn(claimer(shared.clone(), results_tx));
        let keeper = tokio::spawn(keeper(shared.clone(), results_rx));
        let listener = shared.config.listen.then(|| {
            tokio::spawn(wakeup::listen(
                shared.db.clone(),
                shared.wake.clone(),
                shared.stop.clone(),
            ))
        });
        let maintenance = tokio::spawn(maintenance(shared.clone()));
        Ok(RunningPool {
            shared,
            claimer: Some(claimer),
            keeper: Some(keeper),
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
        self.shared.config.concurrency - self.shared.running.available_permits()
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
            let running = shared.config.concurrency - shared.running.available_permits();
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
        for handle in [self.listener.take(), self.maintenance.take()]
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
    config: WorkerPoolConfig,
    kinds: Vec<String>,
    handlers: HashMap<String, Arc<dyn DynHandler>>,
    counters: Arc<QueueCounters>,
    /// One permit per task this pool may hold (running or prefetched); returned when the task's
    /// handler has ended and its result is handed to the keeper.
    slots: Arc<Semaphore>,
    /// One permit per handler that may run at once.
    running: Arc<Semaphore>,
    /// Tasks this pool holds a lease on whose results are not recorded yet.
    held: Mutex<HashMap<i64, Held>>,
    wake: Arc<Notify>,
    stop: CancellationToken,
}

struct Held {
    token: Uuid,
    lost: watch::Sender<bool>,
    abort: Option<AbortHandle>,
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

/// While the queue has a backlog, a claim waits up to this long for three quarters of the slots
/// to be free, so one statement claims many tasks rather than one per finished handler.
/// Prefetched tasks keep the handlers busy meanwhile. Every claim and every result statement
/// has a cost of its own on top of its rows (executor start-up, commit, the round trip), so
/// larger claims, and the larger result batches that follow them, cost less per task: with
/// half the slots, no-op tasks ran about a tenth slower.
const CLAIM_GATHER: Duration = Duration::from_millis(1);

async fn claimer(shared: Arc<Shared>, results: mpsc::Sender<Finished>) {
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
        let claimed = store::claim(
            &shared.db,
            &shared.kinds,
            wanted,
            config.worker_id.as_str(),
            config.lease,
        )
        .await;
        match claimed {
            Ok(mut tasks) => {
                // Start the oldest first (RETURNING has no order).
                tasks.sort_unstable_by_key(|task| task.id);
                backoff.reset();
                let got = tasks.len();
                backlog = got == wanted;
                shared.counters.add_claimed(got);
                for (task, permit) in tasks.into_iter().zip(permits.drain(..)) {
                    dispatch(&shared, task, permit, results.clone());
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

/// Adds the slots free right now, up to a claim's batch size.
fn take_free_slots(shared: &Arc<Shared>, permits: &mut Vec<OwnedSemaphorePermit>) {
    while permits.len() < shared.config.claim_batch {
        match shared.slots.clone().try_acquire_owned() {
            Ok(permit) => permits.push(permit),
            Err(_) => break,
        }
    }
}

/// Starts the handler of a claimed task; the permit is returned when the handler ends.
fn dispatch(
    shared: &Arc<Shared>,
    task: ClaimedTask,
    permit: OwnedSemaphorePermit,
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
        let Ok(_running) = running.acquire_owned().await else {
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
        // The handler gets the task itself; only these small fields are kept for the result
        // (a clone would copy the whole payload).
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
            &policy,
            rand::random::<f64>(),
        );
        let finished = Finished {
            lease,
            kind,
            transition,
        };
        // Waiting here when the keeper falls behind holds the permit, so the claimer slows
        // down instead of piling up unrecorded results.
        let _ = results.send(finished).await;
        drop(permit);
    });
    if let Some(held) = shared.held().get_mut(&lease.id) {
        held.abort = Some(handle.abort_handle());
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

#[derive(Debug, Default)]
struct KeeperReport {
    abandoned: usize,
}

/// The single writer of this pool's held tasks: records results in batches as they come,
/// heartbeats while handlers run, and at the end releases what was never finished.
async fn keeper(shared: Arc<Shared>, mut results: mpsc::Receiver<Finished>) -> KeeperReport {
    let config = &shared.config;
    let mut heartbeat = tokio::time::interval_at(
        Instant::now() + config.heartbeat_interval,
        config.heartbeat_interval,
    );
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<Finished> = Vec::new();
    loop {
        tokio::select! {
            // Heartbeats first: under a steady stream of results they must still go out.
            biased;
            _ = heartbeat.tick() => {
                send_heartbeat(&shared).await;
                continue;
            }
            received = results.recv() => match received {
                Some(finished) => batch.push(finished),
                None => break,
            },
        }
        // Whatever finished while the previous statement ran goes into this one: the busier
        // the pool, the larger the batches, with no added wait when it is quiet.
        while batch.len() < config.completion_batch {
            match results.try_recv() {
                Ok(finished) => batch.push(finished),
                Err(_) => break,
            }
        }
        record(&shared, &mut batch).await;
    }
    // Every sender is gone: the pool is shutting down. Results of handlers that finished are
    // recorded above; tasks whose handlers were stopped go back to pending.
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

async fn send_heartbeat(shared: &Shared) {
    let leases = shared.held_leases();
    if leases.is_empty() {
        return;
    }
    match store::heartbeat(&shared.db, &leases, shared.config.lease).await {
        Ok(still_held) => {
            let still_held: std::collections::HashSet<i64> = still_held.into_iter().collect();
            let held = shared.held();
            for lease in &leases {
                if still_held.contains(&lease.id) {
                    continue;
                }
                if let Some(entry) = held.get(&lease.id)
                    && entry.token == lease.token
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

/// Rescues expired leases and prunes old tasks, each on its own schedule.
async fn maintenance(shared: Arc<Shared>) {
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
            _ = rescue.tick() => rescue_expired(&shared).await,
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
    fn panic_messages_are_recovered() {
        let text: Box<dyn std::any::Any + Send> = Box::new("index out of bounds");
        assert_eq!(panic_message(text.as_ref()), "index out of bounds");
        let formatted: Box<dyn std::any::Any + Send> = Box::new(String::from("bad task 7"));
        assert_eq!(panic_message(formatted.as_ref()), "bad task 7");
        let other: Box<dyn std::any::Any + Send> = Box::new(42u8);
        assert_eq!(panic_message(other.as_ref()), "(no message)");
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
