//! Taking a mailbox for a Graph-talking run (a poll or a batch of after-actions): the run
//! lease of the cursor, and the shared `Retry-After` of the mailbox.

use std::future::Future;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use tokio_util::sync::CancellationToken;

use crate::cursor::{self, Acquired, Cursor, CursorError, RunLease, Source};
use crate::db::{self, Heard};
use crate::graph::GraphClient;
use crate::graph::ThrottleNotice;
use crate::queue::HandlerError;
use crate::telemetry::metrics::SharedMetrics;

/// A snooze of `wait`, at least a short pause so a snooze never spins.
fn snooze_for(wait: Duration) -> HandlerError {
    HandlerError::snooze(wait.max(Duration::from_millis(200)))
}

/// Takes the mailbox's run lease (a poll's: one round per cursor at a time). Another live
/// run, or a `Retry-After` of the mailbox that has not run out (any replica may have received
/// it), snoozes the task instead: the busy wait is capped at `busy_wait`, a throttled mailbox
/// is waited out in full and this process's governor learns of it.
pub async fn take(
    pool: &PgPool,
    graph: &GraphClient,
    source: &Source,
    ttl: Duration,
    busy_wait: Duration,
) -> Result<(RunLease, Cursor), HandlerError> {
    let (lease, cursor) = match cursor::acquire(pool, source, ttl)
        .await
        .map_err(HandlerError::retryable)?
    {
        Acquired::Held(lease, cursor) => (lease, cursor),
        Acquired::Busy { left } => return Err(snooze_for(left.min(busy_wait))),
    };
    if let Some(left) = cursor.throttle_left() {
        give_back(pool, lease).await;
        graph.governor().pause_for(&source.mailbox, left);
        return Err(snooze_for(left));
    }
    Ok((lease, cursor))
}

/// Waits out a `Retry-After` of the mailbox that any replica received, before a run that
/// needs no cursor (after-actions): snoozes the task for the rest of it and tells this
/// process's governor.
pub async fn check_throttle(
    pool: &PgPool,
    graph: &GraphClient,
    mailbox: &str,
) -> Result<(), HandlerError> {
    let left = cursor::throttle_left(pool, mailbox)
        .await
        .map_err(HandlerError::retryable)?;
    match left {
        Some(left) => {
            graph.governor().pause_for(mailbox, left);
            Err(snooze_for(left))
        }
        None => Ok(()),
    }
}

/// The mailbox was throttled past what the Graph client waits out itself: every replica is
/// told to leave it alone until the wait is over (a failure to tell them is logged, the
/// client's own pause still holds), and the task snoozes that long, which is not a failed
/// attempt. A 429 without `Retry-After` waits [`DEFAULT_THROTTLE_WAIT`].
pub async fn share_throttle(
    pool: &PgPool,
    mailbox: &str,
    retry_after: Option<Duration>,
) -> HandlerError {
    let wait = retry_after.unwrap_or(DEFAULT_THROTTLE_WAIT);
    if let Err(error) = cursor::set_throttled_for(pool, mailbox, wait).await {
        tracing::warn!(%error, "cannot share a Retry-After with other replicas");
    }
    HandlerError::snooze(wait)
}

/// The mailbox's shared Graph slots stayed taken by others ([`crate::graph::GraphError::MailboxBusy`]):
/// the task snoozes a few seconds, which is not a failed attempt.
pub fn busy(error: &crate::graph::GraphError) -> HandlerError {
    tracing::info!(%error, "mailbox busy; trying again shortly");
    HandlerError::snooze(MAILBOX_BUSY_WAIT)
}

/// The snooze of a run that found the mailbox's shared slots taken for too long.
const MAILBOX_BUSY_WAIT: Duration = Duration::from_secs(5);

/// Makes every `Retry-After` this process's Graph client learns a pause of every replica:
/// each is recorded on the mailbox's cursors and announced ([`cursor::set_throttled_for`]),
/// and announcements from any replica pause this client at once, also in the middle of a
/// run. Without `listen` (behind a proxy that drops notifications) the others learn of it when
/// their next run takes the mailbox ([`take`]). Runs until `stop`.
pub fn share_retry_afters(
    pool: &PgPool,
    graph: &GraphClient,
    metrics: &SharedMetrics,
    listen: bool,
    stop: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let (notices, pending) = tokio::sync::mpsc::channel(1024);
    graph.governor().on_throttle(move |notice| {
        // Dropped when full: the run that hit the throttle snoozes on it all the same.
        let _ = notices.try_send(notice.clone());
    });
    let mut tasks = vec![tokio::spawn(record_retry_afters(
        pool.clone(),
        metrics.clone(),
        pending,
        stop.clone(),
    ))];
    if listen {
        let (pool, governor) = (pool.clone(), graph.governor().clone());
        let pause = move |heard: Heard<'_>| {
            let Heard::Notice(payload) = heard else {
                return;
            };
            match cursor::ThrottleAnnouncement::parse(payload) {
                Some(announced) => {
                    if let Some(wait) = announced.wait() {
                        governor.pause_for(&announced.mailbox, wait);
                    }
                }
                None => tracing::debug!(payload, "ignoring a malformed throttle announcement"),
            }
        };
        tasks.push(tokio::spawn(async move {
            db::listen(
                &pool,
                cursor::THROTTLED_CHANNEL,
                "Retry-After announcements",
                pause,
                stop,
            )
            .await;
        }));
    }
    tasks
}

async fn record_retry_afters(
    pool: PgPool,
    metrics: SharedMetrics,
    mut pending: tokio::sync::mpsc::Receiver<ThrottleNotice>,
    stop: CancellationToken,
) {
    loop {
        let notice = tokio::select! {
            () = stop.cancelled() => return,
            notice = pending.recv() => match notice {
                Some(notice) => notice,
                None => return,
            },
        };
        metrics.throttled_for(notice.retry_after);
        if let Err(error) =
            cursor::set_throttled_for(&pool, &notice.mailbox, notice.retry_after).await
        {
            tracing::warn!(%error, mailbox = %notice.mailbox, "cannot share a Graph Retry-After with other replicas");
        }
    }
}

/// The wait after a throttled run whose answers carried no `Retry-After`.
const DEFAULT_THROTTLE_WAIT: Duration = Duration::from_secs(30);

/// Gives the mailbox back; a lease that cannot be released expires on its own.
pub async fn give_back(pool: &PgPool, lease: RunLease) {
    if let Err(error) = cursor::release(pool, lease).await {
        tracing::warn!(%error, "cannot release the mailbox run lease; it expires on its own");
    }
}

/// Keeps a run lease alive while a run is in progress: a round can spend longer than the lease
/// between page commits (retries, `Retry-After` waits, slow pages), and a lease that ran out
/// lets another run take the mailbox mid-round. Extends it every third of its time-to-live;
/// when an extension finds the lease taken over, [`KeepAlive::lost`] fires. Stops when
/// dropped.
pub struct KeepAlive {
    task: JoinHandle<()>,
    lost: watch::Receiver<bool>,
}

impl KeepAlive {
    pub fn start(pool: PgPool, lease: RunLease, ttl: Duration) -> Self {
        let (tx, lost) = watch::channel(false);
        let task = tokio::spawn(async move {
            let every = (ttl / 3).max(Duration::from_millis(10));
            loop {
                tokio::time::sleep(every).await;
                match cursor::extend(&pool, lease, ttl).await {
                    Ok(()) => {}
                    Err(CursorError::LeaseLost) => {
                        let _ = tx.send(true);
                        return;
                    }
                    // The lease runs on; the next beat tries again well before it expires.
                    Err(error) => {
                        tracing::warn!(%error, "cannot extend the mailbox run lease");
                    }
                }
            }
        });
        Self { task, lost }
    }

    /// Resolves once the lease was found taken over (never, while it is held).
    pub async fn lost(&mut self) {
        // An error means the keeper ended without losing the lease: wait forever.
        if self.lost.wait_for(|lost| *lost).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Runs `run` while keeping the lease alive; stops it when the lease is lost (another run
    /// has the mailbox: this one's writes would be refused anyway) and snoozes the task.
    pub async fn guard<T>(
        mut self,
        run: impl Future<Output = Result<T, HandlerError>>,
    ) -> Result<T, HandlerError> {
        tokio::select! {
            result = run => result,
            () = self.lost() => {
                tracing::warn!("the mailbox run lease was taken over; stopping this run");
                Err(HandlerError::snooze(Duration::from_secs(1)))
            }
        }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}
