//! The poll and delivery pipeline: what a worker does with `poll`, `deliver` and `actions`
//! tasks.
//!
//! - `poll`: one delta round of a mailbox folder; per page, in one transaction, the messages
//!   are recorded, their deliver tasks enqueued and the cursor advanced.
//! - `deliver`: the webhook POST of one message, then its after-actions are queued.
//! - `actions`: the queued after-actions of one mailbox (mark read, move), batched.

pub mod actions;
pub mod cursor;
pub mod deliver;
pub mod delivered;
pub mod poll;

use std::future::Future;

use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::queue::{ClaimedTask, HandlerError};

use crate::delivery::webhook::Endpoint;
use crate::graph::Credentials;

/// Task kinds of the pipeline.
pub const POLL: &str = "poll";
pub const DELIVER: &str = "deliver";
pub const ACTIONS: &str = "actions";

/// Everything a worker needs to know about a MailboxPoll, resolved from Kubernetes (the
/// resource and its Secrets) when a task runs, so a spec change applies to the next task.
#[derive(Debug, Clone)]
pub struct MailboxConfig {
    pub source: cursor::Source,
    /// The app registration's credentials, from the referenced Secret.
    pub credentials: Credentials,
    pub webhook: Option<Endpoint>,
    pub include_body: bool,
    pub mark_as_read: bool,
    pub move_to_folder: Option<String>,
    pub max_attempts: i32,
}

impl MailboxConfig {
    /// Whether a recorded message has anything left to do after the webhook.
    pub fn has_after_actions(&self) -> bool {
        self.mark_as_read || self.move_to_folder.is_some()
    }

    /// Whether a recorded message needs a deliver task at all.
    pub fn has_per_message_work(&self) -> bool {
        self.webhook.is_some() || self.has_after_actions()
    }
}

/// Why a MailboxPoll's configuration could not be resolved; each maps to a condition reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("Secret {namespace}/{name} not found")]
    SecretNotFound { namespace: String, name: String },
    #[error("Secret {namespace}/{name} has no key {key:?}")]
    SecretKeyMissing {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("cannot read the MailboxPoll or its Secrets: {0}")]
    Unavailable(String),
}

impl ConfigError {
    /// The condition reason users see.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::SecretNotFound { .. } => "SecretNotFound",
            Self::SecretKeyMissing { .. } => "SecretKeyMissing",
            Self::Unavailable(_) => "KubernetesUnavailable",
        }
    }
}

/// Looks MailboxPolls up by uid. `Ok(None)` means the resource no longer exists.
pub trait Directory: Send + Sync + 'static {
    fn lookup(
        &self,
        uid: Uuid,
    ) -> impl Future<Output = Result<Option<MailboxConfig>, ConfigError>> + Send;
}

/// A task's payload; one that does not parse can never succeed, so its task is dead at once.
pub(crate) fn payload<T: DeserializeOwned>(task: &ClaimedTask) -> Result<T, HandlerError> {
    serde_json::from_value(task.payload.clone())
        .map_err(|e| HandlerError::permanent(format!("malformed {} task payload: {e}", task.kind)))
}
