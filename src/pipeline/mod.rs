//! The poll and delivery pipeline: what a worker does with `poll`, `deliver` and `actions`
//! tasks ([`tasks`] holds their arguments).
//!
//! - `poll`: one delta round of a mailbox folder; per page, in one transaction, the messages
//!   are recorded, their deliver tasks enqueued and the cursor advanced.
//! - `deliver`: the webhook POST of one message, then its after-actions are queued.
//! - `actions`: the queued after-actions of one mailbox (mark read, move), batched.

pub mod actions;
pub mod deliver;
pub mod delivered;
pub mod poll;
pub mod run_lease;
pub mod selection;
pub mod tasks;

use uuid::Uuid;

use crate::directory::{Directory, MailboxConfig};
use crate::queue::{HandlerError, TaskArgs};

pub use tasks::{ActionsTask, DeliverTask, PollTask, poll_dedupe_key};

/// Task kinds of the pipeline.
pub const POLL: &str = PollTask::KIND;
pub const DELIVER: &str = DeliverTask::KIND;
pub const ACTIONS: &str = ActionsTask::KIND;

/// The MailboxPoll of a deliver or actions task; `None` when it was deleted (nothing left to
/// do). Any lookup failure is retried.
async fn lookup<D: Directory>(
    directory: &D,
    uid: Uuid,
) -> Result<Option<MailboxConfig>, HandlerError> {
    directory.lookup(uid).await.map_err(HandlerError::retryable)
}
