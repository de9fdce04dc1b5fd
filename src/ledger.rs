//! The message ledger: every message ever seen, once per (MailboxPoll uid, immutable Graph id).
//!
//! Recording is idempotent, so a replayed page, a resync or a crash between two statements
//! never creates a second row or a second delivery.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

/// Where a recorded message stands with respect to delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryState {
    /// Nothing to deliver (no webhook, no after-actions): recording is the delivery.
    None,
    /// A deliver task exists.
    Pending,
    Delivered,
    /// The deliver task is dead; `tasks retry` can bring it back.
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
        }
    }
}

/// One message as the ledger stores it (column names as in the `messages` table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow, Default)]
pub struct LedgerMessage {
    pub message_id: String,
    pub internet_message_id: Option<String>,
    pub subject: Option<String>,
    pub from_address: Option<String>,
    pub from_name: Option<String>,
    pub sender_address: Option<String>,
    pub sender_name: Option<String>,
    /// `[{"name": .., "address": ..}]`
    pub to_recipients: Value,
    pub cc_recipients: Value,
    pub reply_to: Value,
    pub received_at: Option<DateTime<Utc>>,
    pub sent_at: Option<DateTime<Utc>>,
    pub is_read: Option<bool>,
    pub has_attachments: Option<bool>,
    pub importance: Option<String>,
    pub conversation_id: Option<String>,
    pub parent_folder_id: Option<String>,
    pub body_preview: Option<String>,
    pub body_content_type: Option<String>,
    pub body: Option<String>,
    pub body_truncated: bool,
    /// The Graph message object without its body (the body has its own column).
    pub raw: Value,
}

/// A message Graph reported as deleted or moved out of the folder (`@removed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removal {
    pub message_id: String,
    pub reason: String,
}

/// What recording one page changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Ids recorded for the first time, in page order; only these get deliver tasks.
    pub new_ids: Vec<String>,
    /// Messages on the page that the ledger already held (replays).
    pub already_known: usize,
    pub removals: usize,
}

/// Records a page of messages and removals in the caller's transaction. New messages get
/// `state_for_new`; messages already in the ledger are left untouched. A removal marks a
/// known message (delivery still happens: it arrived) or records a tombstone that is never
/// delivered.
pub async fn record_page(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
    messages: &[LedgerMessage],
    removals: &[Removal],
    state_for_new: DeliveryState,
) -> Result<Recorded, sqlx::Error> {
    let mut recorded = Recorded::default();
    if !messages.is_empty() {
        let page = serde_json::to_value(messages).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let new_ids: Vec<(String, i64)> = sqlx::query_as(
            r#"
            INSERT INTO messages (
                mailbox_uid, message_id, internet_message_id, subject, from_address, from_name,
                sender_address, sender_name, to_recipients, cc_recipients, reply_to, received_at,
                sent_at, is_read, has_attachments, importance, conversation_id, parent_folder_id,
                body_preview, body_content_type, body, body_truncated, raw, delivery_state
            )
            SELECT $1, r.message_id, r.internet_message_id, r.subject, r.from_address, r.from_name,
                   r.sender_address, r.sender_name,
                   COALESCE(r.to_recipients, '[]'), COALESCE(r.cc_recipients, '[]'),
                   COALESCE(r.reply_to, '[]'), r.received_at, r.sent_at, r.is_read,
                   r.has_attachments, r.importance, r.conversation_id, r.parent_folder_id,
                   r.body_preview, r.body_content_type, r.body, COALESCE(r.body_truncated, false),
                   COALESCE(r.raw, '{}'), $3
            FROM jsonb_to_recordset($2) AS r(
                message_id text, internet_message_id text, subject text, from_address text,
                from_name text, sender_address text, sender_name text, to_recipients jsonb,
                cc_recipients jsonb, reply_to jsonb, received_at timestamptz, sent_at timestamptz,
                is_read boolean, has_attachments boolean, importance text, conversation_id text,
                parent_folder_id text, body_preview text, body_content_type text, body text,
                body_truncated boolean, raw jsonb
            )
            ON CONFLICT (mailbox_uid, message_id) DO NOTHING
            RETURNING message_id, seq
            "#,
        )
        .bind(mailbox_uid)
        .bind(page)
        .bind(state_for_new.as_str())
        .fetch_all(&mut *conn)
        .await?;
        let mut new_ids = new_ids;
        new_ids.sort_by_key(|(_, seq)| *seq);
        recorded.new_ids = new_ids.into_iter().map(|(id, _)| id).collect();
        let distinct: std::collections::HashSet<&str> =
            messages.iter().map(|m| m.message_id.as_str()).collect();
        recorded.already_known = distinct.len() - recorded.new_ids.len();
    }
    if !removals.is_empty() {
        let ids: Vec<&str> = removals.iter().map(|r| r.message_id.as_str()).collect();
        let reasons: Vec<&str> = removals.iter().map(|r| r.reason.as_str()).collect();
        // DISTINCT ON: a page may report the same removal twice, and one statement cannot
        // update a row twice.
        let result = sqlx::query(
            r#"
            INSERT INTO messages (mailbox_uid, message_id, removed_at, removed_reason, delivery_state, raw)
            SELECT DISTINCT ON (id) $1, id, now(), reason, 'skipped',
                   jsonb_build_object('id', id, '@removed', jsonb_build_object('reason', reason))
            FROM unnest($2::text[], $3::text[]) AS r(id, reason)
            ON CONFLICT (mailbox_uid, message_id) DO UPDATE
                SET removed_at = COALESCE(messages.removed_at, EXCLUDED.removed_at),
                    removed_reason = COALESCE(messages.removed_reason, EXCLUDED.removed_reason)
                WHERE messages.removed_at IS NULL
            "#,
        )
        .bind(mailbox_uid)
        .bind(&ids)
        .bind(&reasons)
        .execute(&mut *conn)
        .await?;
        recorded.removals = result.rows_affected() as usize;
    }
    Ok(recorded)
}

/// A ledger row as delivery sees it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredMessage {
    #[sqlx(flatten)]
    pub message: LedgerMessage,
    pub delivery_state: String,
    pub webhook_delivered_at: Option<DateTime<Utc>>,
    pub removed_at: Option<DateTime<Utc>>,
}

/// Reads one message for delivery.
pub async fn get(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
    message_id: &str,
) -> Result<Option<StoredMessage>, sqlx::Error> {
    sqlx::query_as(
        r#"SELECT message_id, internet_message_id, subject, from_address, from_name, sender_address,
                  sender_name, to_recipients, cc_recipients, reply_to, received_at, sent_at, is_read,
                  has_attachments, importance, conversation_id, parent_folder_id, body_preview,
                  body_content_type, body, body_truncated, raw, delivery_state, webhook_delivered_at,
                  removed_at
           FROM messages WHERE mailbox_uid = $1 AND message_id = $2"#,
    )
    .bind(mailbox_uid)
    .bind(message_id)
    .fetch_optional(&mut *conn)
    .await
}

/// Records that the webhook accepted a message, so a retry of the later steps does not post
/// it again.
pub async fn mark_webhook_delivered(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
    message_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE messages SET webhook_delivered_at = COALESCE(webhook_delivered_at, now())
         WHERE mailbox_uid = $1 AND message_id = $2",
    )
    .bind(mailbox_uid)
    .bind(message_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Queues a message's after-actions (mark read, move) for the mailbox's batched actions run.
pub async fn mark_actions_due(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
    message_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE messages SET actions_due = true
         WHERE mailbox_uid = $1 AND message_id = $2 AND actions_done_at IS NULL AND delivery_state <> 'delivered'",
    )
    .bind(mailbox_uid)
    .bind(message_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Marks a message delivered (`webhook_posted`: and records its webhook step in the same
/// statement). Returns false when it already was delivered (the effect happened before and
/// must not be repeated).
pub async fn mark_delivered(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
    message_id: &str,
    webhook_posted: bool,
) -> Result<bool, sqlx::Error> {
    let result = sqlx::query(
        "UPDATE messages SET delivery_state = 'delivered', delivered_at = now(), delivery_error = NULL,
                actions_due = false,
                webhook_delivered_at = COALESCE(webhook_delivered_at, CASE WHEN $3 THEN now() END)
         WHERE mailbox_uid = $1 AND message_id = $2 AND delivery_state <> 'delivered'",
    )
    .bind(mailbox_uid)
    .bind(message_id)
    .bind(webhook_posted)
    .execute(&mut *conn)
    .await?;
    Ok(result.rows_affected() == 1)
}

/// Records why delivery of a message failed for good (its task is dead).
pub async fn mark_failed(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
    message_id: &str,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE messages SET delivery_state = 'failed', delivery_error = $3
         WHERE mailbox_uid = $1 AND message_id = $2 AND delivery_state <> 'delivered'",
    )
    .bind(mailbox_uid)
    .bind(message_id)
    .bind(error)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Per-state message counts of one MailboxPoll, for its status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub delivered: i64,
    pub pending: i64,
    pub failed: i64,
    /// Recorded with nothing to deliver.
    pub recorded_only: i64,
}

pub async fn counts(conn: &mut PgConnection, mailbox_uid: Uuid) -> Result<Counts, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT delivery_state, count(*) FROM messages WHERE mailbox_uid = $1 GROUP BY delivery_state",
    )
    .bind(mailbox_uid)
    .fetch_all(&mut *conn)
    .await?;
    let mut counts = Counts::default();
    for (state, n) in rows {
        match state.as_str() {
            "delivered" => counts.delivered = n,
            "pending" => counts.pending = n,
            "failed" => counts.failed = n,
            "none" => counts.recorded_only = n,
            _ => {}
        }
    }
    Ok(counts)
}
