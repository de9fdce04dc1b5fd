//! What a handler implements ([`Handler`]) and what it can know about its run
//! ([`TaskContext`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::queue::{ClaimedTask, HandlerError};

/// What a handler can know about its run besides the task.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub(super) lease_lost: watch::Receiver<bool>,
    pub(super) shutdown: CancellationToken,
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
pub(super) trait DynHandler: Send + Sync {
    fn call(self: Arc<Self>, task: ClaimedTask, ctx: TaskContext) -> HandlerFuture;
}

impl<H: Handler> DynHandler for H {
    fn call(self: Arc<Self>, task: ClaimedTask, ctx: TaskContext) -> HandlerFuture {
        Box::pin(async move { self.handle(&task, &ctx).await })
    }
}
