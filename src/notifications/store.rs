//! The `notification_subscriptions` table (every statement on it is here): per MailboxPoll
//! with notifications on, its Graph subscription, the clientState it was created with and
//! what the endpoint asked the leader to do about it.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::storable;

/// Longest error text kept for the condition.
const MAX_ERROR_BYTES: usize = 1024;

/// One MailboxPoll's subscription. Its Debug and Display never show the clientState.
#[derive(Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SubscriptionRow {
    pub mailbox_uid: Uuid,
    pub namespace: String,
    pub name: String,
    pub subscription_id: Option<String>,
    pub client_state: String,
    pub folder: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub renew_requested: bool,
    pub last_notification_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

impl std::fmt::Debug for SubscriptionRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionRow")
            .field("mailbox_uid", &self.mailbox_uid)
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("subscription_id", &self.subscription_id)
            .field("client_state", &"<redacted>")
            .field("folder", &self.folder)
            .field("expires_at", &self.expires_at)
            .field("renew_requested", &self.renew_requested)
            .field("last_notification_at", &self.last_notification_at)
            .field("last_error", &self.last_error)
            .finish()
    }
}

impl std::fmt::Display for SubscriptionRow {
    // Never the clientState.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} subscription {}",
            self.namespace,
            self.name,
            self.subscription_id.as_deref().unwrap_or("(none)")
        )
    }
}

const COLUMNS: &str = "mailbox_uid, namespace, name, subscription_id, client_state, folder, \
     expires_at, renew_requested, last_notification_at, last_error";

pub async fn all(pool: &PgPool) -> Result<Vec<SubscriptionRow>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM notification_subscriptions");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await
}

pub async fn of_mailbox<'e>(
    executor: impl PgExecutor<'e>,
    uid: Uuid,
) -> Result<Option<SubscriptionRow>, sqlx::Error> {
    let sql = format!("SELECT {COLUMNS} FROM notification_subscriptions WHERE mailbox_uid = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(uid)
        .fetch_optional(executor)
        .await
}

/// The row of a Graph subscription id (what a notification names).
pub async fn of_subscription(
    pool: &PgPool,
    subscription_id: &str,
) -> Result<Option<SubscriptionRow>, sqlx::Error> {
    let sql =
        format!("SELECT {COLUMNS} FROM notification_subscriptions WHERE subscription_id = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(subscription_id)
        .fetch_optional(pool)
        .await
}

/// Records a subscription Graph accepted, with the clientState it was created with.
pub async fn record_created(
    pool: &PgPool,
    row: &SubscriptionRow,
    subscription_id: &str,
    expires_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO notification_subscriptions
             (mailbox_uid, namespace, name, subscription_id, client_state, folder, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (mailbox_uid) DO UPDATE
            SET namespace = $2, name = $3, subscription_id = $4, client_state = $5,
                folder = $6, expires_at = $7, renew_requested = false, last_error = NULL,
                updated_at = now()",
    )
    .bind(row.mailbox_uid)
    .bind(&row.namespace)
    .bind(&row.name)
    .bind(subscription_id)
    .bind(&row.client_state)
    .bind(&row.folder)
    .bind(expires_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a renewal: the new expiration; a reauthorization request is served.
pub async fn record_renewed(
    pool: &PgPool,
    uid: Uuid,
    expires_at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE notification_subscriptions
            SET expires_at = $2, renew_requested = false, last_error = NULL, updated_at = now()
          WHERE mailbox_uid = $1",
    )
    .bind(uid)
    .bind(expires_at)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records why creating or renewing failed (the MailboxPoll keeps polling meanwhile). A row
/// is created when there is none yet, so the condition can tell.
pub async fn record_failure(
    pool: &PgPool,
    row: &SubscriptionRow,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO notification_subscriptions
             (mailbox_uid, namespace, name, client_state, folder, last_error)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (mailbox_uid) DO UPDATE SET last_error = $6, updated_at = now()",
    )
    .bind(row.mailbox_uid)
    .bind(&row.namespace)
    .bind(&row.name)
    .bind(&row.client_state)
    .bind(&row.folder)
    // Graph's message can carry anything: made storable.
    .bind(storable::text(error, MAX_ERROR_BYTES))
    .execute(pool)
    .await?;
    Ok(())
}

/// Forgets the Graph subscription of a row (it was removed or expired): the leader creates a
/// new one at its next pass.
pub async fn forget_subscription(pool: &PgPool, subscription_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE notification_subscriptions
            SET subscription_id = NULL, expires_at = NULL, updated_at = now()
          WHERE subscription_id = $1",
    )
    .bind(subscription_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Asks the leader to renew a subscription at its next pass (`reauthorizationRequired`).
pub async fn request_renewal(pool: &PgPool, subscription_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE notification_subscriptions SET renew_requested = true, updated_at = now()
          WHERE subscription_id = $1",
    )
    .bind(subscription_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Notes when the MailboxPoll last heard from Graph (shown on status).
pub async fn note_notification(pool: &PgPool, uid: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE notification_subscriptions SET last_notification_at = now()
          WHERE mailbox_uid = $1",
    )
    .bind(uid)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn delete(pool: &PgPool, uid: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM notification_subscriptions WHERE mailbox_uid = $1")
        .bind(uid)
        .execute(pool)
        .await?;
    Ok(())
}
