//! Graph change notifications as wake-ups, polling as the safety net.
//!
//! - [`manager`] (leader only): one Graph subscription per MailboxPoll with
//!   `spec.notifications.enabled`, renewed well before it expires, created again when Graph
//!   removes it, deleted when it is no longer wanted;
//! - [`endpoint`] (every replica): the URL Graph calls; validation handshake, `202` at once,
//!   clientState checked in constant time ([`payload`]);
//! - [`wake`]: a notification becomes a poll request through the forced-poll dedupe, so a
//!   burst costs one round;
//! - [`store`]: the `notification_subscriptions` table.
//!
//! A notification is never the record: the delta round it triggers is. A lost notification
//! costs at most one interval of delay, a duplicate or a late one at most one more round.

pub mod endpoint;
pub mod manager;
pub mod payload;
pub mod store;
pub mod wake;

use std::time::Duration;

use store::SubscriptionRow;

/// How the operator keeps subscriptions.
#[derive(Debug, Clone)]
pub struct NotificationSettings {
    /// The public URL Graph reaches the endpoint at (`https://host/notifications`); without
    /// it, MailboxPolls asking for notifications are polled only, and say so.
    pub public_url: Option<reqwest::Url>,
    /// Lifetime asked for each subscription (Graph's maximum for Outlook messages is 10,080
    /// minutes; a little less leaves room for clock skew).
    pub lifetime: Duration,
    /// How often the leader looks at every subscription.
    pub sync_interval: Duration,
    /// How long a wake-up waits for the rest of its burst before the poll starts.
    pub coalesce: Duration,
}

impl Default for NotificationSettings {
    fn default() -> Self {
        Self {
            public_url: None,
            lifetime: Duration::from_secs(10_000 * 60),
            sync_interval: Duration::from_secs(60),
            coalesce: Duration::from_millis(500),
        }
    }
}

/// Type of the condition that says whether notifications work.
pub const NOTIFICATIONS_READY: &str = "NotificationsReady";

/// What the `NotificationsReady` condition says about a subscription row: status (`None`:
/// unknown yet), reason, message.
pub fn condition(row: &SubscriptionRow) -> (Option<bool>, &'static str, String) {
    match (&row.subscription_id, &row.last_error) {
        (_, Some(error)) => (
            Some(false),
            "SubscriptionFailed",
            format!("{error}; new mail is picked up by polling every interval meanwhile"),
        ),
        (Some(_), None) => (
            Some(true),
            "Subscribed",
            "Graph notifies new messages; polling every interval stays as the safety net".into(),
        ),
        (None, None) => (
            None,
            "Subscribing",
            "the Graph subscription is being created".into(),
        ),
    }
}
