//! The MailboxPolls as workers see them: every replica keeps a watch cache of the resources
//! and reads their Secrets on demand, so a spec change applies to the next task.
//!
//! [`Directory`] is what the pipeline asks ("what is MailboxPoll `uid` now?"); [`kube`] answers
//! it from the Kubernetes API. Tests answer it from a fixed table.

pub mod cache;
pub mod kube;
pub mod selection;

use std::future::Future;

use uuid::Uuid;

use crate::cursor::Source;
use crate::delivery::endpoint::Endpoint;
use crate::graph::Credentials;
use crate::reason::Reason;

pub use self::kube::{DirectorySettings, KubeDirectory, MailboxPolls, Scope, WorkloadIdentityEnv};

/// Everything a worker needs to know about a MailboxPoll, resolved from Kubernetes (the
/// resource and its Secrets) when a task runs.
#[derive(Debug, Clone)]
pub struct MailboxConfig {
    pub source: Source,
    /// What its ledger rows and idempotency keys are keyed by ([`crate::identity`]): the same
    /// for a MailboxPoll deleted and re-created with the same namespace, name, mailbox and
    /// folder.
    pub ledger_id: Uuid,
    /// The app registration's credentials, from the referenced Secret.
    pub credentials: Credentials,
    pub webhook: Option<Endpoint>,
    pub include_body: bool,
    pub mark_as_read: bool,
    pub move_to_folder: Option<String>,
    pub max_attempts: i32,
    /// `spec.startFrom` resolved: messages received earlier are recorded as skipped.
    pub start: crate::selection::start::Start,
    /// `spec.filter`, compiled: messages it rejects are recorded as filtered.
    pub filter: Option<crate::selection::Filter>,
    /// Deliveries running at once, cluster-wide (`spec.delivery.maxConcurrent`); `None`: the
    /// operator's default.
    pub max_concurrent_deliveries: Option<i32>,
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
    /// Credentials that are there but cannot work: a certificate that does not parse or does
    /// not match its key, a workload identity the operator does not have or may not lend.
    #[error("{field}: {detail}")]
    InvalidCredentials { field: String, detail: String },
    /// The operator may not read Secrets in the namespace: with the chart's namespaced Secret
    /// access, the namespace's owners have not bound the reader role yet.
    #[error(
        "the operator may not read Secret {namespace}/{name}: grant it with a RoleBinding of the operator's Secret reader ClusterRole in namespace {namespace} (see README, \"Secrets per namespace\")"
    )]
    SecretForbidden { namespace: String, name: String },
    /// A webhook URL, header or signing secret that cannot be used as it is.
    #[error("{field}: {detail}")]
    InvalidWebhook { field: String, detail: String },
    /// `spec.filter` does not compile or check (the text names the field).
    #[error("{detail}")]
    InvalidFilter { detail: String },
    /// `spec.startFrom` is not all, now or an RFC 3339 time (the text names the field).
    #[error("{detail}")]
    InvalidStartFrom { detail: String },
    #[error("cannot read the MailboxPoll or its Secrets: {0}")]
    Unavailable(String),
    #[error("cannot read the MailboxPoll's ledger identity: {0}")]
    Database(String),
    /// The operator's egress policy refuses the webhook's destination (the text names the
    /// rule and the host, never the rest of the URL).
    #[error("{0}")]
    WebhookForbidden(String),
}

impl ConfigError {
    /// The reason users see on the condition.
    pub fn reason(&self) -> Reason {
        match self {
            Self::SecretNotFound { .. } => Reason::SecretNotFound,
            Self::SecretKeyMissing { .. } => Reason::SecretKeyMissing,
            Self::InvalidCredentials { .. } => Reason::InvalidCredentials,
            Self::SecretForbidden { .. } => Reason::SecretForbidden,
            Self::InvalidWebhook { .. } => Reason::InvalidWebhook,
            Self::InvalidFilter { .. } => Reason::InvalidFilter,
            Self::InvalidStartFrom { .. } => Reason::InvalidStartFrom,
            Self::Unavailable(_) => Reason::KubernetesUnavailable,
            Self::Database(_) => Reason::Transient,
            Self::WebhookForbidden(_) => Reason::WebhookForbidden,
        }
    }

    /// Whether the configuration itself is fine and only reading it failed: try again soon.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Database(_))
    }
}

/// Looks MailboxPolls up by uid. `Ok(None)` means the resource no longer exists.
pub trait Directory: Send + Sync + 'static {
    fn lookup(
        &self,
        uid: Uuid,
    ) -> impl Future<Output = Result<Option<MailboxConfig>, ConfigError>> + Send;
}
