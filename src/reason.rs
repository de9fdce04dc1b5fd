//! Why something failed, as users read it on a MailboxPoll: one enum for the condition reason,
//! the Event reason, and what the failure means (does it need a person, does it pass by
//! itself). Stored on `polls.error_reason` as its condition reason.

use std::fmt;

/// A failure reason. [`Reason::as_str`] is the condition reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The credentials Secret does not exist.
    SecretNotFound,
    /// The credentials Secret lacks a key (or its value is empty or not text).
    SecretKeyMissing,
    /// The credentials are there but cannot work (a certificate that does not parse or match
    /// its key, a workload identity the operator lacks or may not lend to the namespace).
    InvalidCredentials,
    /// The operator may not read a referenced Secret (namespaced Secret access not granted).
    SecretForbidden,
    /// A webhook URL, header or signing secret that cannot be used (from the spec or a Secret).
    InvalidWebhook,
    /// `spec.filter` does not compile or check.
    InvalidFilter,
    /// `spec.startFrom` is not all, now or an RFC 3339 time.
    InvalidStartFrom,
    /// The MailboxPoll or its Secrets could not be read from the API server.
    KubernetesUnavailable,
    AuthenticationFailed,
    AccessDenied,
    MailboxNotFound,
    ItemNotFound,
    Throttled,
    ResyncRequired,
    /// Graph refused the query: a bug in the query, or a wrong folder.
    InvalidQuery,
    /// A timeout, a 5xx, a broken page, a lost database connection: the next try may work.
    Transient,
    ShuttingDown,
    /// After-delivery actions of some messages failed repeatedly and were parked.
    AfterActionsFailed,
    /// The move destination of the after-delivery actions does not exist in the mailbox.
    MoveDestinationNotFound,
    /// The operator's egress policy refuses the webhook's destination.
    WebhookForbidden,
    /// A reason this version does not know (written by another version).
    PollFailed,
}

impl Reason {
    pub const ALL: [Reason; 21] = [
        Reason::SecretNotFound,
        Reason::SecretKeyMissing,
        Reason::InvalidCredentials,
        Reason::SecretForbidden,
        Reason::InvalidWebhook,
        Reason::InvalidFilter,
        Reason::InvalidStartFrom,
        Reason::KubernetesUnavailable,
        Reason::AuthenticationFailed,
        Reason::AccessDenied,
        Reason::MailboxNotFound,
        Reason::ItemNotFound,
        Reason::Throttled,
        Reason::ResyncRequired,
        Reason::InvalidQuery,
        Reason::Transient,
        Reason::ShuttingDown,
        Reason::AfterActionsFailed,
        Reason::MoveDestinationNotFound,
        Reason::WebhookForbidden,
        Reason::PollFailed,
    ];

    /// The condition reason (CamelCase, as Kubernetes conventions want).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SecretNotFound => "SecretNotFound",
            Reason::SecretKeyMissing => "SecretKeyMissing",
            Reason::InvalidCredentials => "InvalidCredentials",
            Reason::SecretForbidden => "SecretForbidden",
            Reason::InvalidWebhook => "InvalidWebhook",
            Reason::InvalidFilter => "InvalidFilter",
            Reason::InvalidStartFrom => "InvalidStartFrom",
            Reason::KubernetesUnavailable => "KubernetesUnavailable",
            Reason::AuthenticationFailed => "AuthenticationFailed",
            Reason::AccessDenied => "AccessDenied",
            Reason::MailboxNotFound => "MailboxNotFound",
            Reason::ItemNotFound => "ItemNotFound",
            Reason::Throttled => "Throttled",
            Reason::ResyncRequired => "ResyncRequired",
            Reason::InvalidQuery => "InvalidQuery",
            Reason::Transient => "Transient",
            Reason::ShuttingDown => "ShuttingDown",
            Reason::AfterActionsFailed => "AfterActionsFailed",
            Reason::MoveDestinationNotFound => "MoveDestinationNotFound",
            Reason::WebhookForbidden => "WebhookForbidden",
            Reason::PollFailed => "PollFailed",
        }
    }

    /// The reason of a stored condition or poll; an unknown one reads as [`Reason::PollFailed`].
    pub fn parse(text: &str) -> Reason {
        Reason::ALL
            .into_iter()
            .find(|reason| reason.as_str() == text)
            .unwrap_or(Reason::PollFailed)
    }

    /// The failure goes away without anyone acting (throttling, a blip, a resync, a restart):
    /// it degrades a MailboxPoll but does not make it unready.
    pub fn passes_by_itself(self) -> bool {
        matches!(
            self,
            Reason::Throttled | Reason::Transient | Reason::ShuttingDown | Reason::ResyncRequired
        )
    }

    /// The failure comes from the configuration (the Secrets, the webhook's destination),
    /// which the reconciler checks itself: a failed poll with it says nothing once that check
    /// passes.
    pub fn from_configuration(self) -> bool {
        matches!(
            self,
            Reason::SecretNotFound
                | Reason::SecretKeyMissing
                | Reason::InvalidCredentials
                | Reason::SecretForbidden
                | Reason::InvalidWebhook
                | Reason::InvalidFilter
                | Reason::InvalidStartFrom
                | Reason::KubernetesUnavailable
                | Reason::WebhookForbidden
        )
    }

    /// Someone has to fix something (credentials, permissions, the mailbox, the spec).
    pub fn needs_person(self) -> bool {
        !self.passes_by_itself() && self != Reason::KubernetesUnavailable
    }

    /// Whether a failed poll with this reason says whether the MailboxPoll works.
    pub fn decides_readiness(self) -> bool {
        !self.passes_by_itself() && !self.from_configuration()
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_reads_back_as_itself() {
        for reason in Reason::ALL {
            assert_eq!(Reason::parse(reason.as_str()), reason);
        }
        assert_eq!(Reason::parse("SomethingNew"), Reason::PollFailed);
    }

    #[test]
    fn passing_and_configuration_reasons_do_not_decide_readiness() {
        let undecisive: Vec<_> = Reason::ALL
            .into_iter()
            .filter(|r| !r.decides_readiness())
            .map(Reason::as_str)
            .collect();
        assert_eq!(
            undecisive,
            [
                "SecretNotFound",
                "SecretKeyMissing",
                "InvalidCredentials",
                "SecretForbidden",
                "InvalidWebhook",
                "InvalidFilter",
                "InvalidStartFrom",
                "KubernetesUnavailable",
                "Throttled",
                "ResyncRequired",
                "Transient",
                "ShuttingDown",
                "WebhookForbidden"
            ]
        );
        assert!(Reason::AuthenticationFailed.needs_person());
        assert!(!Reason::Throttled.needs_person());
        assert!(Reason::WebhookForbidden.needs_person());
    }
}
