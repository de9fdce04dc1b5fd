//! Turning a notification into a poll, from any replica: the same dedupe as a forced poll.
//!
//! A wake-up records a poll request (so a round already running is followed by one more) and
//! pulls the MailboxPoll's one pending poll task forward to a moment a short coalescing delay
//! ahead: every notification of a burst that arrives before the round starts is served by
//! that one round. When no poll task is pending (the leader has not planned one yet), the
//! leader is told through the channel a finished poll uses, and its reconcile plans the poll
//! for the request.

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::pipeline::poll::MAILBOX_CHANGED_CHANNEL;
use crate::pipeline::poll_dedupe_key;
use crate::poll_log;
use crate::queue::{self, QueueError};

#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    #[error("cannot record the notification's poll request: {0}")]
    Db(#[from] sqlx::Error),
    #[error("cannot pull the poll task forward: {0}")]
    Queue(#[from] QueueError),
}

/// Wakes the MailboxPoll `uid` (`namespace/name` for the leader's channel).
pub async fn wake(
    pool: &PgPool,
    uid: Uuid,
    key: &str,
    coalesce: Duration,
) -> Result<(), WakeError> {
    poll_log::request_wakeup(pool, uid).await?;
    let run_at = crate::db::now(pool).await?
        + chrono::Duration::from_std(coalesce).unwrap_or(chrono::Duration::zero());
    let key_of_task = poll_dedupe_key(uid);
    if queue::pull_forward(pool, &key_of_task, run_at).await? {
        return Ok(());
    }
    // Nothing moved: a round already due or running serves the request (a running one with a
    // round of its own after the current one). Only when no poll task exists at all is the
    // leader asked: its reconcile plans one for the waiting request. Asking it every time
    // would pull the task to "now" and cut the burst's coalescing short.
    if queue::live_task(pool, &key_of_task).await?.is_none() {
        crate::db::notify(pool, MAILBOX_CHANGED_CHANNEL, key).await?;
    }
    Ok(())
}
