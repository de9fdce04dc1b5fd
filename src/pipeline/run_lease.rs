//! Taking a mailbox for a Graph-talking run (a poll or a batch of after-actions): the run
//! lease of the cursor, and the shared `Retry-After` of the mailbox.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use crate::cursor::{self, Acquired, Cursor, RunLease, Source};
use crate::graph::GraphClient;
use crate::queue::HandlerError;

/// How long until `until`, at least a short pause so a snooze never spins.
pub fn wait_until(until: DateTime<Utc>) -> Duration {
    (until - Utc::now())
        .to_std()
        .unwrap_or_default()
        .max(Duration::from_millis(200))
}

/// Takes the mailbox's run lease. Another live run, or a `Retry-After` of the mailbox that
/// has not run out (any replica may have received it), snoozes the task instead: the busy
/// wait is capped at `busy_wait`, a throttled mailbox is waited out in full and this
/// process's governor learns of it.
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
        Acquired::Busy { until } => {
            return Err(HandlerError::snooze(wait_until(until).min(busy_wait)));
        }
    };
    if let Some(until) = cursor.throttled_until.filter(|t| *t > Utc::now()) {
        give_back(pool, lease).await;
        graph.governor().pause_until(&source.mailbox, until);
        return Err(HandlerError::snooze(wait_until(until)));
    }
    Ok((lease, cursor))
}

/// Gives the mailbox back; a lease that cannot be released expires on its own.
pub async fn give_back(pool: &PgPool, lease: RunLease) {
    if let Err(error) = cursor::release(pool, lease).await {
        tracing::warn!(%error, "cannot release the mailbox run lease; it expires on its own");
    }
}
