//! LISTEN for enqueue notifications and wake the claim loop. A lost notification (a dropped
//! connection, a proxy that does not pass them) only delays work until the next poll, so every
//! failure here is logged and retried, never fatal.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::WAKE_CHANNEL;

const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Listens until `stop` is cancelled, calling `wake.notify_one()` on every notification and
/// after every (re)connection, since notifications sent while disconnected are lost.
pub(crate) async fn listen(db: PgPool, wake: Arc<Notify>, stop: CancellationToken) {
    // A connection of its own: the listener holds it for good and must not take a slot of
    // the pool that claims and completes tasks.
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
        let mut listener = match connect(&listen_pool).await {
            Ok(listener) => listener,
            Err(error) => {
                if !failing {
                    tracing::warn!(%error, "cannot listen for task notifications; polling until it can");
                    failing = true;
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        if failing {
            tracing::info!("listening for task notifications again");
            failing = false;
        }
        delay = RECONNECT_MIN;
        wake.notify_one();
        loop {
            let received = tokio::select! {
                _ = stop.cancelled() => break,
                received = listener.try_recv() => received,
            };
            match received {
                Ok(Some(_)) => {
                    // A burst of notifications wakes the claim loop once.
                    while listener.next_buffered().is_some() {}
                    wake.notify_one();
                }
                // The connection dropped and was re-established: anything in between is lost.
                Ok(None) => wake.notify_one(),
                Err(error) => {
                    tracing::debug!(%error, "task notification listener failed; reconnecting");
                    break;
                }
            }
        }
    }
    listen_pool.close().await;
}

async fn connect(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    // Wait for the notification instead of giving up when the pool closes: the pool is ours.
    listener.ignore_pool_close_event(true);
    listener.listen(WAKE_CHANNEL).await?;
    Ok(listener)
}
