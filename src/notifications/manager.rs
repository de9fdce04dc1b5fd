//! The leader's side: one Graph subscription per MailboxPoll with notifications on, created
//! with a fresh random clientState, renewed well before it expires (or when Graph asks for
//! reauthorization), created again when Graph removed it or the folder changed, deleted when
//! notifications are turned off or the MailboxPoll goes. [`plan`] decides (pure); [`Manager`]
//! carries it out through the mailbox's Graph client (tokens, governor, Retry-After).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::store::{self, SubscriptionRow};
use super::{NotificationSettings, endpoint};
use crate::directory::KubeDirectory;
use crate::graph::{
    GraphClient, GraphError, MailboxClient, SubscriptionRequest, is_subscription_gone,
};
use crate::pipeline::poll::MAILBOX_CHANGED_CHANNEL;

/// What a MailboxPoll wants: a subscription to this folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub folder: String,
}

/// What to do about one MailboxPoll's subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    Create,
    Renew {
        id: String,
    },
    /// The folder changed: the old subscription goes, a new one comes.
    Replace {
        old: String,
    },
    /// Notifications are off or the MailboxPoll is gone.
    Delete {
        id: String,
    },
    /// Only the row is left (no Graph subscription behind it).
    Forget,
}

/// Decides the action. A subscription is renewed once less than half of its lifetime is
/// left: with Outlook's maximum (about 7 days) that is days ahead, so a leader change, an
/// outage or throttling of hours cannot make it lapse.
pub fn plan(
    wanted: Option<&Wanted>,
    row: Option<&SubscriptionRow>,
    now: DateTime<Utc>,
    lifetime: Duration,
) -> Action {
    let id = row.and_then(|row| row.subscription_id.clone());
    let (Some(wanted), Some(row)) = (wanted, row) else {
        return match (wanted, row, id) {
            (Some(_), None, _) => Action::Create,
            (None, Some(_), Some(id)) => Action::Delete { id },
            (None, Some(_), None) => Action::Forget,
            _ => Action::Nothing,
        };
    };
    let Some(id) = id else {
        return Action::Create;
    };
    if row.folder != wanted.folder {
        return Action::Replace { old: id };
    }
    let half = chrono::Duration::from_std(lifetime / 2).unwrap_or(chrono::Duration::MAX);
    match row.expires_at {
        Some(expires) if expires <= now => Action::Create,
        Some(expires) if !row.renew_requested && expires - now > half => Action::Nothing,
        _ => Action::Renew { id },
    }
}

/// A fresh clientState: 32 random bytes, URL-safe base64.
fn new_client_state() -> Result<String, ring::error::Unspecified> {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{0}")]
    Graph(#[from] GraphError),
    #[error("cannot draw a random clientState")]
    Random,
    #[error(
        "the operator has no public notification URL (flag --notification-url, Helm value notifications.publicUrl): polling only"
    )]
    NoPublicUrl,
    #[error("{0}")]
    Config(String),
}

/// How long after a MailboxPoll changed the keeper looks, so a burst of changes costs one pass.
const CHANGES_SETTLE: Duration = Duration::from_secs(2);

/// The subscription keeper; runs on the leader only.
pub struct Manager {
    pub pool: PgPool,
    pub directory: Arc<KubeDirectory>,
    pub graph: GraphClient,
    pub settings: NotificationSettings,
    /// Clients of MailboxPolls seen in this term, so a subscription can still be deleted
    /// after its MailboxPoll (and the way to its credentials) is gone.
    clients: HashMap<Uuid, MailboxClient>,
    /// When a Graph call for a MailboxPoll's subscription last failed: it is tried again only
    /// a sync interval later, however often MailboxPolls change (a failed attempt writes the
    /// status, which is a change itself).
    failed_at: HashMap<Uuid, tokio::time::Instant>,
}

impl Manager {
    pub fn new(
        pool: PgPool,
        directory: Arc<KubeDirectory>,
        graph: GraphClient,
        settings: NotificationSettings,
    ) -> Self {
        Self {
            pool,
            directory,
            graph,
            settings,
            clients: HashMap::new(),
            failed_at: HashMap::new(),
        }
    }

    /// Keeps subscriptions while `leading` says so, until `stop`.
    pub async fn run(mut self, mut leading: watch::Receiver<bool>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = leading.wait_for(|l| *l) => if changed.is_err() { return },
            }
            self.directory.polls().wait_synced().await;
            let mut changes = self.directory.polls().changes();
            while *leading.borrow() && !stop.is_cancelled() {
                if let Err(error) = self.pass().await {
                    tracing::warn!(%error, "notification subscriptions: pass failed");
                }
                // A new or changed MailboxPoll gets its subscription within seconds, not at
                // the next periodic pass; a burst of changes (status writes) costs one pass.
                let changed = tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(self.settings.sync_interval) => false,
                    Ok(()) = changes.changed() => true,
                    _ = leading.wait_for(|l| !*l) => false,
                };
                if changed {
                    tokio::time::sleep(CHANGES_SETTLE).await;
                    changes.mark_unchanged();
                }
            }
            self.clients.clear();
            self.failed_at.clear();
        }
    }

    /// One look at every MailboxPoll and every subscription row.
    pub async fn pass(&mut self) -> Result<(), sqlx::Error> {
        let mut rows: HashMap<Uuid, SubscriptionRow> = store::all(&self.pool)
            .await?
            .into_iter()
            .map(|row| (row.mailbox_uid, row))
            .collect();
        let now = crate::db::now(&self.pool).await?;
        let directory = self.directory.clone();
        let polls = directory.polls();
        let mut uids = polls.uids();
        let orphans: Vec<Uuid> = rows
            .keys()
            .copied()
            .filter(|uid| !uids.contains(uid))
            .collect();
        uids.extend(orphans);
        for uid in uids {
            let poll = polls.find(uid);
            let wanted = poll
                .as_ref()
                .filter(|poll| poll.spec.notifications_enabled())
                .map(|poll| Wanted {
                    folder: poll.spec.folder.clone(),
                });
            let row = rows.remove(&uid);
            let action = plan(wanted.as_ref(), row.as_ref(), now, self.settings.lifetime);
            if action == Action::Nothing || self.failed_recently(uid) {
                continue;
            }
            let label = poll.as_ref().map(|p| {
                format!(
                    "{}/{}",
                    p.metadata.namespace.as_deref().unwrap_or(""),
                    p.metadata.name.as_deref().unwrap_or("")
                )
            });
            let outcome = self.act(uid, poll.as_deref(), row.as_ref(), &action).await;
            if outcome.is_err() {
                self.failed_at.insert(uid, tokio::time::Instant::now());
            } else {
                self.failed_at.remove(&uid);
            }
            self.report(uid, poll.as_deref(), row, &action, outcome)
                .await?;
            if let Some(label) = label {
                // The leader refreshes the MailboxPoll's status.
                crate::db::notify(&self.pool, MAILBOX_CHANGED_CHANNEL, &label).await?;
            }
        }
        Ok(())
    }

    fn failed_recently(&self, uid: Uuid) -> bool {
        self.failed_at
            .get(&uid)
            .is_some_and(|at| at.elapsed() < self.settings.sync_interval)
    }

    async fn client_of(
        &mut self,
        uid: Uuid,
        poll: Option<&crate::resource::MailboxPoll>,
    ) -> Result<Option<(MailboxClient, crate::cursor::Source)>, PassError> {
        let Some(poll) = poll else {
            return Ok(None);
        };
        let config = self
            .directory
            .resolve(poll)
            .await
            .map_err(|error| PassError::Config(error.to_string()))?;
        let client = self
            .graph
            .mailbox(config.credentials.clone(), config.source.mailbox.clone());
        self.clients.insert(uid, client.clone());
        Ok(Some((client, config.source)))
    }

    async fn act(
        &mut self,
        uid: Uuid,
        poll: Option<&crate::resource::MailboxPoll>,
        row: Option<&SubscriptionRow>,
        action: &Action,
    ) -> Result<Option<(String, DateTime<Utc>, SubscriptionRow)>, PassError> {
        match action {
            Action::Nothing | Action::Forget => Ok(None),
            Action::Delete { id } => {
                let client = match self.client_of(uid, poll).await {
                    Ok(Some((client, _))) => Some(client),
                    _ => self.clients.get(&uid).cloned(),
                };
                match client {
                    Some(client) => client.delete_subscription(id).await?,
                    // No way to the credentials left: Graph drops it at its expiration, and
                    // its notifications name a subscription no row knows (dropped).
                    None => tracing::info!(subscription = %id, "subscription left to expire"),
                }
                self.clients.remove(&uid);
                Ok(None)
            }
            Action::Renew { id } => {
                let Some((client, source)) = self.client_of(uid, poll).await? else {
                    return Ok(None);
                };
                let expiration = Utc::now() + chrono_duration(self.settings.lifetime);
                match client.renew_subscription(id, expiration).await {
                    Ok(renewed) => Ok(Some((
                        renewed.id,
                        renewed.expiration_date_time,
                        self.row_for(&source, row)?,
                    ))),
                    // Removed or expired meanwhile: a new one.
                    Err(error) if is_subscription_gone(&error) => {
                        self.create(&client, &source, row).await.map(Some)
                    }
                    Err(error) => Err(error.into()),
                }
            }
            Action::Create | Action::Replace { .. } => {
                let Some((client, source)) = self.client_of(uid, poll).await? else {
                    return Ok(None);
                };
                if let Action::Replace { old } = action {
                    client.delete_subscription(old).await?;
                }
                self.create(&client, &source, None).await.map(Some)
            }
        }
    }

    /// The row a subscription of `source` is recorded in: the existing clientState is kept
    /// for renewals, a new one drawn for new subscriptions.
    fn row_for(
        &self,
        source: &crate::cursor::Source,
        existing: Option<&SubscriptionRow>,
    ) -> Result<SubscriptionRow, PassError> {
        let client_state = match existing {
            Some(row) => row.client_state.clone(),
            None => new_client_state().map_err(|_| PassError::Random)?,
        };
        Ok(SubscriptionRow {
            mailbox_uid: source.uid,
            namespace: source.namespace.clone(),
            name: source.name.clone(),
            subscription_id: None,
            client_state,
            folder: source.folder.clone(),
            expires_at: None,
            renew_requested: false,
            last_notification_at: existing.and_then(|row| row.last_notification_at),
            last_error: None,
        })
    }

    async fn create(
        &self,
        client: &MailboxClient,
        source: &crate::cursor::Source,
        _previous: Option<&SubscriptionRow>,
    ) -> Result<(String, DateTime<Utc>, SubscriptionRow), PassError> {
        let Some(base) = self.settings.public_url.as_ref() else {
            return Err(PassError::NoPublicUrl);
        };
        // Every new subscription gets a new clientState.
        let row = self.row_for(source, None)?;
        let request = SubscriptionRequest {
            folder: source.folder.clone(),
            notification_url: endpoint_url(base, endpoint::NOTIFICATION_PATH),
            lifecycle_notification_url: endpoint_url(base, endpoint::LIFECYCLE_PATH),
            client_state: row.client_state.clone(),
            expiration: Utc::now() + chrono_duration(self.settings.lifetime),
        };
        let created = client.create_subscription(&request).await?;
        Ok((created.id, created.expiration_date_time, row))
    }

    /// Records what an action did, or why it failed.
    async fn report(
        &self,
        uid: Uuid,
        poll: Option<&crate::resource::MailboxPoll>,
        row: Option<SubscriptionRow>,
        action: &Action,
        outcome: Result<Option<(String, DateTime<Utc>, SubscriptionRow)>, PassError>,
    ) -> Result<(), sqlx::Error> {
        match (action, outcome) {
            (Action::Delete { .. } | Action::Forget, Ok(_)) => store::delete(&self.pool, uid).await,
            (Action::Renew { .. }, Ok(Some((id, expires, fresh))))
                if row.as_ref().and_then(|r| r.subscription_id.as_deref()) == Some(id.as_str()) =>
            {
                tracing::debug!(%fresh, %expires, "subscription renewed");
                store::record_renewed(&self.pool, uid, expires).await
            }
            (_, Ok(Some((id, expires, fresh)))) => {
                tracing::info!(%fresh, subscription = %id, %expires, "subscription created");
                store::record_created(&self.pool, &fresh, &id, expires).await
            }
            (_, Ok(None)) => Ok(()),
            (_, Err(error)) => {
                tracing::warn!(mailbox_uid = %uid, %error, "notification subscription failed; polling continues");
                let Some(failed) = failure_row(uid, poll, row) else {
                    return Ok(());
                };
                store::record_failure(&self.pool, &failed, &error.to_string()).await
            }
        }
    }
}

/// The row a failure is recorded on: the existing one, or a new one for the MailboxPoll.
fn failure_row(
    uid: Uuid,
    poll: Option<&crate::resource::MailboxPoll>,
    row: Option<SubscriptionRow>,
) -> Option<SubscriptionRow> {
    if row.is_some() {
        return row;
    }
    let poll = poll?;
    Some(SubscriptionRow {
        mailbox_uid: uid,
        namespace: poll.metadata.namespace.clone().unwrap_or_default(),
        name: poll.metadata.name.clone().unwrap_or_default(),
        subscription_id: None,
        // Never sent anywhere: a row without a subscription matches no notification.
        client_state: String::new(),
        folder: poll.spec.folder.clone(),
        expires_at: None,
        renew_requested: false,
        last_notification_at: None,
        last_error: None,
    })
}

/// `base` with `path` in place of its path (the public URL names the host, maybe a prefix).
pub fn endpoint_url(base: &reqwest::Url, path: &str) -> String {
    let prefix = base.path().trim_end_matches('/');
    let prefix = prefix
        .strip_suffix(endpoint::NOTIFICATION_PATH)
        .unwrap_or(prefix);
    let mut url = base.clone();
    url.set_path(&format!("{prefix}{path}"));
    url.set_query(None);
    url.to_string()
}

fn chrono_duration(duration: Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).expect("valid time")
    }

    fn row(id: Option<&str>, folder: &str, expires: Option<i64>) -> SubscriptionRow {
        SubscriptionRow {
            mailbox_uid: Uuid::nil(),
            namespace: "ns".into(),
            name: "support".into(),
            subscription_id: id.map(str::to_string),
            client_state: "state".into(),
            folder: folder.into(),
            expires_at: expires.map(at),
            renew_requested: false,
            last_notification_at: None,
            last_error: None,
        }
    }

    fn inbox() -> Wanted {
        Wanted {
            folder: "inbox".into(),
        }
    }

    #[test]
    fn wanted_without_a_subscription_creates_one() {
        assert_eq!(plan(Some(&inbox()), None, at(0), LIFETIME), Action::Create);
        let failed = row(None, "inbox", None);
        assert_eq!(
            plan(Some(&inbox()), Some(&failed), at(0), LIFETIME),
            Action::Create
        );
    }

    #[test]
    fn renewal_once_half_the_lifetime_is_gone_or_when_graph_asks() {
        let half = 7 * 24 * 3600 / 2;
        let fresh = row(Some("s"), "inbox", Some(half + 60));
        assert_eq!(
            plan(Some(&inbox()), Some(&fresh), at(0), LIFETIME),
            Action::Nothing
        );
        let aging = row(Some("s"), "inbox", Some(half - 60));
        assert_eq!(
            plan(Some(&inbox()), Some(&aging), at(0), LIFETIME),
            Action::Renew { id: "s".into() }
        );
        let asked = SubscriptionRow {
            renew_requested: true,
            ..fresh
        };
        assert_eq!(
            plan(Some(&inbox()), Some(&asked), at(0), LIFETIME),
            Action::Renew { id: "s".into() }
        );
        let expired = row(Some("s"), "inbox", Some(-1));
        assert_eq!(
            plan(Some(&inbox()), Some(&expired), at(0), LIFETIME),
            Action::Create
        );
    }

    #[test]
    fn a_new_folder_replaces_and_unwanted_subscriptions_go() {
        let other = row(Some("s"), "archive", Some(3600 * 24 * 6));
        assert_eq!(
            plan(Some(&inbox()), Some(&other), at(0), LIFETIME),
            Action::Replace { old: "s".into() }
        );
        assert_eq!(
            plan(None, Some(&other), at(0), LIFETIME),
            Action::Delete { id: "s".into() }
        );
        assert_eq!(
            plan(None, Some(&row(None, "inbox", None)), at(0), LIFETIME),
            Action::Forget
        );
        assert_eq!(plan(None, None, at(0), LIFETIME), Action::Nothing);
    }

    #[test]
    fn endpoint_urls_keep_the_host_and_prefix() {
        let base: reqwest::Url = "https://mail.example.com/notifications"
            .parse()
            .expect("URL");
        assert_eq!(
            endpoint_url(&base, endpoint::LIFECYCLE_PATH),
            "https://mail.example.com/notifications/lifecycle"
        );
        let prefixed: reqwest::Url = "https://example.com/mailpoll/".parse().expect("URL");
        assert_eq!(
            endpoint_url(&prefixed, endpoint::NOTIFICATION_PATH),
            "https://example.com/mailpoll/notifications"
        );
    }

    #[test]
    fn rows_never_print_their_client_state() {
        let row = row(Some("s"), "inbox", None);
        assert!(!format!("{row:?}").contains("state\""));
        assert!(!format!("{row:?} {row}").contains("\"state\""));
        assert!(format!("{row:?}").contains("<redacted>"));
    }

    #[test]
    fn client_states_are_random_and_long() {
        let a = new_client_state().expect("random");
        let b = new_client_state().expect("random");
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
    }
}
