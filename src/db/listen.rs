//! LISTEN on a Postgres channel for as long as a process runs. What a notification announces
//! is always found again by a slower path (the claim loop's polling, a requeue timer, the
//! check at the start of a run), so a lost one only delays it: every failure here is logged
//! and retried, never fatal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio_util::sync::CancellationToken;

const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Whether this process LISTENs at all; see [`disable_listening`].
static LISTENING: AtomicBool = AtomicBool::new(true);

/// Makes every [`listen`] of this process wait for its stop signal without listening: behind
/// a pooler in transaction mode (PgBouncer) a LISTEN holds no server connection of its own,
/// so notifications never arrive. What they would announce is found by the slower paths.
pub fn disable_listening() {
    LISTENING.store(false, Ordering::Relaxed);
}

/// Whether [`listen`] listens (not turned off by [`disable_listening`]).
pub fn listening() -> bool {
    LISTENING.load(Ordering::Relaxed)
}

/// What a listener hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard<'a> {
    /// Listening (again): notifications sent while disconnected are lost, so whatever they
    /// could have announced should be looked for now.
    Connected,
    /// A notification's payload.
    Notice(&'a str),
}

/// Listens on `channel` until `stop` is cancelled, telling `hear` of every notification and
/// every (re)connection. `what` names the notifications in log lines.
pub async fn listen(
    db: &PgPool,
    channel: &'static str,
    what: &'static str,
    mut hear: impl FnMut(Heard<'_>),
    stop: CancellationToken,
) {
    if !listening() {
        tracing::debug!("not listening for {what} (--no-listen): polling finds them");
        stop.cancelled().await;
        return;
    }
    // A connection of its own: the listener holds it for good and must not take a slot of
    // the pool that does the work.
    let listen_pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .idle_timeout(None)
        .max_lifetime(None)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with((*db.connect_options()).clone());
    let mut delay = RECONNECT_MIN;
    let mut failing = false;
    while !stop.is_cancelled() {
        let mut listener = match connect(&listen_pool, channel).await {
            Ok(listener) => listener,
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "cannot listen for {what}; retrying");
                    failing = true;
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        if failing {
            tracing::info!("listening for {what} again");
            failing = false;
        }
        delay = RECONNECT_MIN;
        hear(Heard::Connected);
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => break,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(notification)) => hear(Heard::Notice(notification.payload())),
                // The connection dropped and was re-established: anything in between is lost.
                Ok(None) => hear(Heard::Connected),
                Err(error) => {
                    tracing::debug!(%error, "listener for {what} failed; reconnecting");
                    break;
                }
            }
        }
    }
    listen_pool.close().await;
}

async fn connect(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Wait for the notification instead of giving up when the pool closes: the pool is ours.
    listener.ignore_pool_close_event(true);
    listener.listen(channel).await?;
    Ok(listener)
}
