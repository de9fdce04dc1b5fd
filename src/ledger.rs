//! The message ledger (`messages`, with its counters `ledger_counts` / `ledger_count_deltas`
//! and its retention horizon `ledger_horizons`; every statement on them is here): every message
//! seen, once per (ledger identity, immutable Graph id), and where its delivery stands.
//!
//! Retention clears content after a period and deletes rows after a longer one; a row goes
//! only together with a move of the ledger's horizon, below which a message the ledger does not
//! hold is never recorded again (see [`purge_identities`]).
//!
//! Recording is idempotent, so a replayed page, a resync or a crash between two statements
//! never creates a second row or a second delivery. Immutable ids survive moves, so a message
//! can leave the folder and come back: a row keeps it recorded once, and a tombstone (a
//! removal seen before the message itself) gives way to the message when it shows.

use std::collections::HashSet;

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::storable;

/// Longest delivery error kept on a message. Errors quote receivers and Graph, so they are
/// made storable (see [`storable`]) on their way in.
const MAX_DELIVERY_ERROR_BYTES: usize = 4096;

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
    /// A tombstone, or a message removed from the folder before it was delivered, or (with
    /// a `skip_reason`) received before `spec.startFrom`: never delivered.
    Skipped,
    /// `spec.filter` rejected it before delivery (`skip_reason` says why): never delivered,
    /// no after-actions.
    Filtered,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
            Self::Filtered => "filtered",
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
    /// Ids recorded for the first time (tombstones given way included), in ledger order; only
    /// these get deliver tasks.
    pub new_ids: Vec<String>,
    /// Messages on the page that the ledger already held (replays).
    pub already_known: usize,
    pub removals: usize,
}

impl Recorded {
    /// Adds what a later part of the same page recorded.
    pub fn absorb(&mut self, later: Recorded) {
        self.new_ids.extend(later.new_ids);
        self.already_known += later.already_known;
        self.removals += later.removals;
    }
}

/// A page as one array per column, borrowed from the messages (nothing is copied).
struct PageColumns<'a> {
    message_id: Vec<&'a str>,
    internet_message_id: Vec<Option<&'a str>>,
    subject: Vec<Option<&'a str>>,
    from_address: Vec<Option<&'a str>>,
    from_name: Vec<Option<&'a str>>,
    sender_address: Vec<Option<&'a str>>,
    sender_name: Vec<Option<&'a str>>,
    to_recipients: Vec<&'a Value>,
    cc_recipients: Vec<&'a Value>,
    reply_to: Vec<&'a Value>,
    received_at: Vec<Option<DateTime<Utc>>>,
    sent_at: Vec<Option<DateTime<Utc>>>,
    is_read: Vec<Option<bool>>,
    has_attachments: Vec<Option<bool>>,
    importance: Vec<Option<&'a str>>,
    conversation_id: Vec<Option<&'a str>>,
    parent_folder_id: Vec<Option<&'a str>>,
    body_preview: Vec<Option<&'a str>>,
    body_content_type: Vec<Option<&'a str>>,
    body: Vec<Option<&'a str>>,
    body_truncated: Vec<bool>,
    raw: Vec<&'a Value>,
}

impl<'a> PageColumns<'a> {
    fn of(messages: &'a [LedgerMessage]) -> Self {
        let column = |f: fn(&'a LedgerMessage) -> Option<&'a str>| -> Vec<Option<&'a str>> {
            messages.iter().map(f).collect()
        };
        Self {
            message_id: messages.iter().map(|m| m.message_id.as_str()).collect(),
            internet_message_id: column(|m| m.internet_message_id.as_deref()),
            subject: column(|m| m.subject.as_deref()),
            from_address: column(|m| m.from_address.as_deref()),
            from_name: column(|m| m.from_name.as_deref()),
            sender_address: column(|m| m.sender_address.as_deref()),
            sender_name: column(|m| m.sender_name.as_deref()),
            to_recipients: messages.iter().map(|m| &m.to_recipients).collect(),
            cc_recipients: messages.iter().map(|m| &m.cc_recipients).collect(),
            reply_to: messages.iter().map(|m| &m.reply_to).collect(),
            received_at: messages.iter().map(|m| m.received_at).collect(),
            sent_at: messages.iter().map(|m| m.sent_at).collect(),
            is_read: messages.iter().map(|m| m.is_read).collect(),
            has_attachments: messages.iter().map(|m| m.has_attachments).collect(),
            importance: column(|m| m.importance.as_deref()),
            conversation_id: column(|m| m.conversation_id.as_deref()),
            parent_folder_id: column(|m| m.parent_folder_id.as_deref()),
            body_preview: column(|m| m.body_preview.as_deref()),
            body_content_type: column(|m| m.body_content_type.as_deref()),
            body: column(|m| m.body.as_deref()),
            body_truncated: messages.iter().map(|m| m.body_truncated).collect(),
            raw: messages.iter().map(|m| &m.raw).collect(),
        }
    }
}

/// Records a page of messages and removals in the caller's transaction. New messages get
/// `state_for_new`; messages already in the ledger are left as they are, except that they are
/// no longer marked removed (they are back). A tombstone gives way to its message: the row is
/// replaced, so the message is new (counted, delivered) with a new `seq`. A removal marks a
/// known message (delivery still happens: it arrived) or records a tombstone that is never
/// delivered.
///
/// The common page costs one statement per kind (messages, removals); only a page holding
/// messages the ledger already had costs one more, and a tombstone coming back one more.
pub async fn record_page(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
    messages: &[LedgerMessage],
    removals: &[Removal],
    state_for_new: DeliveryState,
) -> Result<Recorded, sqlx::Error> {
    let mut recorded = Recorded::default();
    if !messages.is_empty() {
        hold_horizon(conn, mailbox_uid).await?;
        let mut new_ids = insert_new(conn, mailbox_uid, messages, state_for_new, None).await?;
        let distinct: HashSet<&str> = messages.iter().map(|m| m.message_id.as_str()).collect();
        if new_ids.len() < distinct.len() {
            let inserted: HashSet<&str> = new_ids.iter().map(|(id, _)| id.as_str()).collect();
            let known: Vec<&str> = distinct.difference(&inserted).copied().collect();
            let returned = take_back(conn, mailbox_uid, &known).await?;
            if !returned.is_empty() {
                let returned: HashSet<String> = returned.into_iter().collect();
                let revived: Vec<LedgerMessage> = messages
                    .iter()
                    .filter(|m| returned.contains(&m.message_id))
                    .cloned()
                    .collect();
                new_ids.extend(insert_new(conn, mailbox_uid, &revived, state_for_new, None).await?);
            }
        }
        new_ids.sort_by_key(|(_, seq)| *seq);
        recorded.already_known = distinct.len() - new_ids.len();
        recorded.new_ids = new_ids.into_iter().map(|(id, _)| id).collect();
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

/// Records messages received before `spec.startFrom`, in the caller's transaction: new ones
/// as `skipped` with `reason`, never delivered; messages the ledger already holds are left as
/// they are (a resync replaying them changes nothing). Returns how many were new.
pub async fn record_before_start(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
    messages: &[LedgerMessage],
    reason: &str,
) -> Result<usize, sqlx::Error> {
    if messages.is_empty() {
        return Ok(0);
    }
    hold_horizon(conn, mailbox_uid).await?;
    let reason = storable::text(reason, MAX_DELIVERY_ERROR_BYTES);
    let new = insert_new(
        conn,
        mailbox_uid,
        messages,
        DeliveryState::Skipped,
        Some(&reason),
    )
    .await?;
    Ok(new.len())
}

/// Advisory lock class of a ledger's horizon (the key's second half is the ledger's hash).
const HORIZON_LOCK_CLASS: i32 = 0x6d6c_6467;

/// Holds the ledger's horizon for the rest of the caller's transaction (shared: pages of one
/// round do not wait on each other). [`purge_identities`] takes it exclusively to move the
/// horizon and delete rows, so a page never reads the old horizon and then finds a purged
/// row gone: either the page commits first (and the purge deletes after it), or it waits for
/// the purge and its insert (a later statement, with a later snapshot) sees the new horizon.
async fn hold_horizon(conn: &mut PgConnection, ledger_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1, hashtext($2::text))")
        .bind(HORIZON_LOCK_CLASS)
        .bind(ledger_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Inserts the messages the ledger does not hold yet (and that are newer than its horizon);
/// returns their ids and `seq`s.
async fn insert_new(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
    messages: &[LedgerMessage],
    state_for_new: DeliveryState,
    skip_reason: Option<&str>,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let columns = PageColumns::of(messages);
    // One array per column, unnested server-side. Text columns travel as plain binary
    // text: binding the page as one JSON document made Postgres parse every body as JSON,
    // which cost more than the insert itself. Only the jsonb columns are parsed.
    sqlx::query_as(
        r#"
        INSERT INTO messages (
            mailbox_uid, message_id, internet_message_id, subject, from_address, from_name,
            sender_address, sender_name, to_recipients, cc_recipients, reply_to, received_at,
            sent_at, is_read, has_attachments, importance, conversation_id, parent_folder_id,
            body_preview, body_content_type, body, body_truncated, raw, delivery_state,
            skip_reason
        )
        SELECT $1, r.message_id, r.internet_message_id, r.subject, r.from_address,
               r.from_name, r.sender_address, r.sender_name,
               COALESCE(NULLIF(r.to_recipients, 'null'), '[]'),
               COALESCE(NULLIF(r.cc_recipients, 'null'), '[]'),
               COALESCE(NULLIF(r.reply_to, 'null'), '[]'), r.received_at, r.sent_at,
               r.is_read, r.has_attachments, r.importance, r.conversation_id,
               r.parent_folder_id, r.body_preview, r.body_content_type, r.body,
               r.body_truncated, COALESCE(NULLIF(r.raw, 'null'), '{}'), $24, $25
        FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                    $8::text[], $9::jsonb[], $10::jsonb[], $11::jsonb[], $12::timestamptz[],
                    $13::timestamptz[], $14::boolean[], $15::boolean[], $16::text[],
                    $17::text[], $18::text[], $19::text[], $20::text[], $21::text[],
                    $22::boolean[], $23::jsonb[])
             AS r(message_id, internet_message_id, subject, from_address, from_name,
                  sender_address, sender_name, to_recipients, cc_recipients, reply_to,
                  received_at, sent_at, is_read, has_attachments, importance,
                  conversation_id, parent_folder_id, body_preview, body_content_type, body,
                  body_truncated, raw)
        -- Received at or before the horizon and not in the ledger: its row was purged by
        -- retention (or it is older than anything the ledger may still hold). Never again.
        WHERE r.received_at IS NULL
           OR r.received_at > COALESCE(
                  (SELECT purged_through FROM ledger_horizons WHERE ledger_id = $1), '-infinity')
        ON CONFLICT (mailbox_uid, message_id) DO NOTHING
        RETURNING message_id, seq
        "#,
    )
    .bind(mailbox_uid)
    .bind(&columns.message_id)
    .bind(&columns.internet_message_id)
    .bind(&columns.subject)
    .bind(&columns.from_address)
    .bind(&columns.from_name)
    .bind(&columns.sender_address)
    .bind(&columns.sender_name)
    .bind(&columns.to_recipients)
    .bind(&columns.cc_recipients)
    .bind(&columns.reply_to)
    .bind(&columns.received_at)
    .bind(&columns.sent_at)
    .bind(&columns.is_read)
    .bind(&columns.has_attachments)
    .bind(&columns.importance)
    .bind(&columns.conversation_id)
    .bind(&columns.parent_folder_id)
    .bind(&columns.body_preview)
    .bind(&columns.body_content_type)
    .bind(&columns.body)
    .bind(&columns.body_truncated)
    .bind(&columns.raw)
    .bind(state_for_new.as_str())
    .bind(skip_reason)
    .fetch_all(&mut *conn)
    .await
}

/// Messages of a page that the ledger already held are back in the folder: a recorded one is
/// no longer marked removed, a tombstone is deleted so that the message takes its place.
/// Returns the ids of the tombstones deleted. One statement, on the primary key only.
async fn take_back(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
    ids: &[&str],
) -> Result<Vec<String>, sqlx::Error> {
    // The two parts touch disjoint rows: a tombstone is 'skipped' without a skip_reason. A
    // message skipped for spec.startFrom stays as it is: replacing it would deliver it.
    sqlx::query_scalar(
        r#"
        WITH back AS (
            UPDATE messages SET removed_at = NULL, removed_reason = NULL
            WHERE mailbox_uid = $1 AND message_id = ANY($2) AND removed_at IS NOT NULL
              AND (delivery_state <> 'skipped' OR skip_reason IS NOT NULL)
        )
        DELETE FROM messages
        WHERE mailbox_uid = $1 AND message_id = ANY($2) AND delivery_state = 'skipped'
          AND skip_reason IS NULL
        RETURNING message_id
        "#,
    )
    .bind(mailbox_uid)
    .bind(ids)
    .fetch_all(&mut *conn)
    .await
}

/// A ledger row as delivery sees it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredMessage {
    #[sqlx(flatten)]
    pub message: LedgerMessage,
    pub delivery_state: String,
    pub webhook_delivered_at: Option<DateTime<Utc>>,
    pub removed_at: Option<DateTime<Utc>>,
    /// Set when retention cleared the message's content.
    pub content_purged_at: Option<DateTime<Utc>>,
}

/// Reads one message, every column.
pub async fn get(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
    message_id: &str,
) -> Result<Option<StoredMessage>, sqlx::Error> {
    fetch_stored(conn, mailbox_uid, message_id, true).await
}

/// Reads one message for its webhook: only the columns the payload shows. `raw` (the largest
/// jsonb column, which the payload does not carry) comes back as `{}` and `parent_folder_id`
/// as NULL, so a delivery neither transfers nor decodes them.
pub async fn get_for_delivery(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
    message_id: &str,
) -> Result<Option<StoredMessage>, sqlx::Error> {
    fetch_stored(conn, mailbox_uid, message_id, false).await
}

/// One ledger row; without `everything`, `raw` and `parent_folder_id` are left out (a CASE
/// branch not taken never reads, let alone decompresses, its column).
async fn fetch_stored(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
    message_id: &str,
    everything: bool,
) -> Result<Option<StoredMessage>, sqlx::Error> {
    sqlx::query_as(
        r#"SELECT message_id, internet_message_id, subject, from_address, from_name, sender_address,
                  sender_name, to_recipients, cc_recipients, reply_to, received_at, sent_at, is_read,
                  has_attachments, importance, conversation_id,
                  CASE WHEN $3 THEN parent_folder_id END AS parent_folder_id,
                  body_preview, body_content_type, body, body_truncated,
                  CASE WHEN $3 THEN raw ELSE '{}'::jsonb END AS raw,
                  delivery_state, webhook_delivered_at, removed_at, content_purged_at
           FROM messages WHERE mailbox_uid = $1 AND message_id = $2"#,
    )
    .bind(mailbox_uid)
    .bind(message_id)
    .bind(everything)
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

/// A message whose delivery is complete: its webhook step (if any) and after-actions are done.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeliveredMark {
    pub mailbox_uid: Uuid,
    pub message_id: String,
    /// The webhook accepted the message in this attempt: its step is recorded in the same
    /// statement.
    pub webhook_posted: bool,
}

/// Marks messages delivered, all in one statement. Returns the `(mailbox_uid, message_id)` of
/// the rows that changed; a message already delivered is left alone (its effect happened
/// before and must not be counted again).
pub async fn mark_delivered(
    conn: &mut PgConnection,
    marks: &[DeliveredMark],
) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    let uids: Vec<Uuid> = marks.iter().map(|m| m.mailbox_uid).collect();
    let ids: Vec<&str> = marks.iter().map(|m| m.message_id.as_str()).collect();
    let posted: Vec<bool> = marks.iter().map(|m| m.webhook_posted).collect();
    sqlx::query_as(
        "UPDATE messages m
            SET delivery_state = 'delivered', delivered_at = now(), delivery_error = NULL,
                actions_due = false,
                webhook_delivered_at = COALESCE(m.webhook_delivered_at, CASE WHEN i.posted THEN now() END)
           FROM unnest($1::uuid[], $2::text[], $3::boolean[]) AS i(mailbox_uid, message_id, posted)
          WHERE m.mailbox_uid = i.mailbox_uid AND m.message_id = i.message_id
            AND m.delivery_state <> 'delivered'
      RETURNING m.mailbox_uid, m.message_id",
    )
    .bind(&uids)
    .bind(&ids)
    .bind(&posted)
    .fetch_all(&mut *conn)
    .await
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
    .bind(storable::text(error, MAX_DELIVERY_ERROR_BYTES))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records that `spec.filter` rejected a message before delivery: it is never delivered and
/// gets no after-actions. Only a message still waiting for delivery changes (a retried dead
/// task included); returns whether it did.
pub async fn mark_filtered(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
    message_id: &str,
    reason: &str,
) -> Result<bool, sqlx::Error> {
    let changed = sqlx::query(
        "UPDATE messages SET delivery_state = 'filtered', skip_reason = $3, delivery_error = NULL
         WHERE mailbox_uid = $1 AND message_id = $2 AND delivery_state IN ('pending', 'failed')
           AND webhook_delivered_at IS NULL AND NOT actions_due",
    )
    .bind(mailbox_uid)
    .bind(message_id)
    .bind(storable::text(reason, MAX_DELIVERY_ERROR_BYTES))
    .execute(&mut *conn)
    .await?;
    Ok(changed.rows_affected() == 1)
}

/// A message whose delivery failed for good, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedDelivery {
    pub mailbox_uid: Uuid,
    pub message_id: String,
    pub error: String,
}

/// Marks `failed` those of `failures` whose message is still `pending`: deliveries whose task
/// died without its handler saying so (a task whose lease ran out on its last attempt is made
/// dead by the queue's rescue, and no handler runs to record the failure). Returns how many
/// messages changed. A `tasks retry` later delivers them as usual.
pub async fn fail_pending(pool: &PgPool, failures: &[FailedDelivery]) -> Result<u64, sqlx::Error> {
    if failures.is_empty() {
        return Ok(0);
    }
    let uids: Vec<Uuid> = failures.iter().map(|f| f.mailbox_uid).collect();
    let ids: Vec<&str> = failures.iter().map(|f| f.message_id.as_str()).collect();
    let errors: Vec<Cow<'_, str>> = failures
        .iter()
        .map(|f| storable::text(&f.error, MAX_DELIVERY_ERROR_BYTES))
        .collect();
    let result = sqlx::query(
        "UPDATE messages m
            SET delivery_state = 'failed', delivery_error = f.error
           FROM unnest($1::uuid[], $2::text[], $3::text[]) AS f(mailbox_uid, message_id, error)
          WHERE m.mailbox_uid = f.mailbox_uid AND m.message_id = f.message_id
            AND m.delivery_state = 'pending'",
    )
    .bind(&uids)
    .bind(&ids)
    .bind(&errors)
    .execute(pool)
    .await?;
    Ok(result.rows_affected())
}

/// Up to `limit` messages of a MailboxPoll whose after-actions are due, oldest first. Parked
/// messages are left out: they must not stay first in line.
pub async fn actions_due(
    pool: &PgPool,
    mailbox_uid: Uuid,
    limit: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT message_id FROM messages
         WHERE mailbox_uid = $1 AND actions_due AND actions_parked_at IS NULL
         ORDER BY seq LIMIT $2",
    )
    .bind(mailbox_uid)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Marks messages delivered whose after-actions are done (every configured step is).
/// Returns how many changed.
pub async fn mark_actions_done(
    pool: &PgPool,
    mailbox_uid: Uuid,
    ids: &[String],
) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE messages SET actions_due = false, actions_done_at = now(), delivery_state = 'delivered',
                delivered_at = now(), delivery_error = NULL, actions_error = NULL,
                actions_parked_at = NULL
         WHERE mailbox_uid = $1 AND message_id = ANY($2) AND actions_due",
    )
    .bind(mailbox_uid)
    .bind(ids)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Counts one failed after-action attempt for each of `ids` and keeps `error` as the reason.
/// A message reaching `park_after` failures is parked: the actions run and the sweep skip it,
/// and it counts as failed. Returns the ids parked by this call.
pub async fn record_action_failures(
    pool: &PgPool,
    mailbox_uid: Uuid,
    ids: &[String],
    error: &str,
    park_after: i32,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH failed AS (
             UPDATE messages SET actions_failures = actions_failures + 1, actions_error = $3,
                    actions_parked_at = CASE WHEN actions_failures + 1 >= $4 THEN now() END,
                    delivery_state = CASE WHEN actions_failures + 1 >= $4 THEN 'failed'
                                          ELSE delivery_state END,
                    delivery_error = CASE WHEN actions_failures + 1 >= $4 THEN $3
                                          ELSE delivery_error END
             WHERE mailbox_uid = $1 AND message_id = ANY($2) AND actions_due
               AND actions_parked_at IS NULL
             RETURNING message_id, actions_parked_at
         )
         SELECT message_id FROM failed WHERE actions_parked_at IS NOT NULL",
    )
    .bind(mailbox_uid)
    .bind(ids)
    .bind(storable::text(error, MAX_DELIVERY_ERROR_BYTES))
    .bind(park_after)
    .fetch_all(pool)
    .await
}

/// Parks every message of a MailboxPoll whose after-actions are due, at once, with `error`
/// (a configuration error, such as a move destination that does not exist: every one of them
/// would fail the same way). Returns how many were parked.
pub async fn park_all_due_actions(
    pool: &PgPool,
    mailbox_uid: Uuid,
    error: &str,
) -> Result<u64, sqlx::Error> {
    let parked = sqlx::query(
        "UPDATE messages SET actions_parked_at = now(), actions_error = $2,
                delivery_state = 'failed', delivery_error = $2
         WHERE mailbox_uid = $1 AND actions_due AND actions_parked_at IS NULL",
    )
    .bind(mailbox_uid)
    .bind(storable::text(error, MAX_DELIVERY_ERROR_BYTES))
    .execute(pool)
    .await?;
    Ok(parked.rows_affected())
}

/// Gives parked after-actions of a MailboxPoll another run (the cause was fixed): their
/// failure counts start again. Returns how many were unparked.
pub async fn unpark_actions(pool: &PgPool, mailbox_uid: Uuid) -> Result<u64, sqlx::Error> {
    let unparked = sqlx::query(
        "UPDATE messages SET actions_parked_at = NULL, actions_failures = 0,
                delivery_state = 'pending', delivery_error = NULL
         WHERE mailbox_uid = $1 AND actions_due AND actions_parked_at IS NOT NULL",
    )
    .bind(mailbox_uid)
    .execute(pool)
    .await?;
    Ok(unparked.rows_affected())
}

/// Why after-actions of a MailboxPoll were parked most recently, if any are.
pub async fn latest_parked_error(
    conn: &mut PgConnection,
    mailbox_uid: Uuid,
) -> Result<Option<String>, sqlx::Error> {
    let error: Option<Option<String>> = sqlx::query_scalar(
        "SELECT actions_error FROM messages
         WHERE mailbox_uid = $1 AND actions_parked_at IS NOT NULL
         ORDER BY actions_parked_at DESC LIMIT 1",
    )
    .bind(mailbox_uid)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(error.flatten())
}

/// MailboxPolls that have after-actions due (parked ones do not count: a run cannot help them).
pub async fn owners_with_actions_due(pool: &PgPool) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT mailbox_uid FROM messages WHERE actions_due AND actions_parked_at IS NULL",
    )
    .fetch_all(pool)
    .await
}

/// Per-state message counts of one MailboxPoll, for its status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub delivered: i64,
    pub pending: i64,
    pub failed: i64,
    /// Recorded with nothing to deliver.
    pub recorded_only: i64,
    /// Of those failed, the ones whose after-actions are parked after repeated failures.
    pub actions_parked: i64,
    /// Rejected by `spec.filter`.
    pub filtered: i64,
    /// Received before `spec.startFrom`.
    pub before_start: i64,
}

/// The counts of one ledger, from its counters: the deltas its writes left since the last
/// read are folded into its `ledger_counts` row first, so the cost follows the writes since
/// then, never the ledger's size. Deltas another reader is folding right now are skipped
/// (they are in the counts once it commits), so concurrent readers never wait on each other.
pub async fn counts(conn: &mut PgConnection, ledger_id: Uuid) -> Result<Counts, sqlx::Error> {
    // Without deltas nothing is written (a ledger purged meanwhile gets no zero row back).
    let row: Option<(i64, i64, i64, i64, i64, i64, i64)> = sqlx::query_as(
        "WITH folded AS (
             DELETE FROM ledger_count_deltas WHERE id IN (
                 SELECT id FROM ledger_count_deltas WHERE ledger_id = $1
                 ORDER BY id FOR UPDATE SKIP LOCKED)
             RETURNING *
         ),
         written AS (
             INSERT INTO ledger_counts AS c
                 (ledger_id, delivered, pending, failed, recorded_only, skipped, actions_parked,
                  filtered, before_start)
             SELECT $1, COALESCE(sum(delivered), 0), COALESCE(sum(pending), 0),
                    COALESCE(sum(failed), 0), COALESCE(sum(recorded_only), 0),
                    COALESCE(sum(skipped), 0), COALESCE(sum(actions_parked), 0),
                    COALESCE(sum(filtered), 0), COALESCE(sum(before_start), 0)
             FROM folded
             HAVING count(*) > 0
             ON CONFLICT (ledger_id) DO UPDATE
                 SET delivered = c.delivered + EXCLUDED.delivered,
                     pending = c.pending + EXCLUDED.pending,
                     failed = c.failed + EXCLUDED.failed,
                     recorded_only = c.recorded_only + EXCLUDED.recorded_only,
                     skipped = c.skipped + EXCLUDED.skipped,
                     actions_parked = c.actions_parked + EXCLUDED.actions_parked,
                     filtered = c.filtered + EXCLUDED.filtered,
                     before_start = c.before_start + EXCLUDED.before_start
             RETURNING delivered, pending, failed, recorded_only, actions_parked, filtered,
                       before_start
         )
         SELECT delivered, pending, failed, recorded_only, actions_parked, filtered, before_start
         FROM written
         UNION ALL
         SELECT delivered, pending, failed, recorded_only, actions_parked, filtered, before_start
         FROM ledger_counts
         WHERE ledger_id = $1 AND NOT EXISTS (SELECT 1 FROM written)",
    )
    .bind(ledger_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(Counts::default());
    };
    let (delivered, pending, failed, recorded_only, actions_parked, filtered, before_start) = row;
    Ok(Counts {
        delivered,
        pending,
        failed,
        recorded_only,
        actions_parked,
        filtered,
        before_start,
    })
}

/// Every ledger that has rows or had them (its counters say so).
pub async fn ledgers(pool: &PgPool) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT ledger_id FROM ledger_counts
         UNION SELECT DISTINCT ledger_id FROM ledger_count_deltas",
    )
    .fetch_all(pool)
    .await
}

// Every bounded purge picks its rows in a MATERIALIZED CTE: as a subquery joined to the
// table, Postgres may rescan it per outer row, and each rescan (past the rows already
// deleted) picks a fresh `LIMIT`, so one statement deleted far more than its batch.

/// Clears the personal data of up to `limit` messages recorded more than `older_than` ago:
/// subject, addresses, recipients, preview, body and the raw Graph object. What "none twice"
/// needs stays (ids, delivery state, times). Messages still waiting for delivery keep their
/// content: their webhook needs it. Concurrent purgers take disjoint rows. Returns how many
/// were cleared.
pub async fn purge_content(
    pool: &PgPool,
    older_than: std::time::Duration,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let purged = sqlx::query(
        "WITH due AS MATERIALIZED (
             SELECT mailbox_uid, message_id FROM messages
             WHERE content_purged_at IS NULL
               AND recorded_at < now() - $1 * interval '1 microsecond'
               AND delivery_state <> 'pending'
             ORDER BY recorded_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         )
         UPDATE messages m
            SET internet_message_id = NULL, subject = NULL, from_address = NULL,
                from_name = NULL, sender_address = NULL, sender_name = NULL,
                to_recipients = '[]', cc_recipients = '[]', reply_to = '[]',
                body_preview = NULL, body_content_type = NULL, body = NULL,
                raw = '{}', conversation_id = NULL, delivery_error = NULL,
                actions_error = NULL, content_purged_at = now()
           FROM due
          WHERE m.mailbox_uid = due.mailbox_uid AND m.message_id = due.message_id",
    )
    .bind(micros(older_than))
    .bind(limit)
    .execute(pool)
    .await?;
    Ok(purged.rows_affected())
}

/// What one [`purge_identities`] round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdentityPurge {
    /// Rows deleted (messages and tombstones).
    pub deleted: u64,
    /// The ledger was busy (a page being recorded, or another purger): nothing was done.
    pub busy: bool,
}

/// Deletes up to `limit` rows of a ledger whose message was received more than `older_than`
/// ago (oldest first), and tombstones recorded that long ago. Rows still waiting for delivery
/// stay. In the same transaction the ledger's horizon moves to the newest received time
/// deleted: from then on a message received at or before it that the ledger does not hold is
/// never recorded, so a resync replaying the folder delivers nothing twice (see README, "Data
/// retention"). Never waits for a poll: a ledger whose page is being recorded is skipped.
pub async fn purge_identities(
    pool: &PgPool,
    ledger_id: Uuid,
    older_than: std::time::Duration,
    limit: i64,
) -> Result<IdentityPurge, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let locked: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext($2::text))")
            .bind(HORIZON_LOCK_CLASS)
            .bind(ledger_id)
            .fetch_one(&mut *tx)
            .await?;
    if !locked {
        return Ok(IdentityPurge {
            deleted: 0,
            busy: true,
        });
    }
    let messages: i64 = sqlx::query_scalar(
        "WITH due AS MATERIALIZED (
             SELECT message_id FROM messages
             WHERE mailbox_uid = $1
               AND received_at < now() - $2 * interval '1 microsecond'
               -- Held for the period too: a message received long ago but recorded lately
               -- (a first poll of an old inbox, old mail moved in) keeps its row as long.
               AND recorded_at < now() - $2 * interval '1 microsecond'
               AND delivery_state <> 'pending'
             ORDER BY received_at
             LIMIT $3
             FOR UPDATE
         ),
         gone AS (
             DELETE FROM messages m USING due
             WHERE m.mailbox_uid = $1 AND m.message_id = due.message_id
             RETURNING m.received_at
         ),
         horizon AS (
             INSERT INTO ledger_horizons AS h (ledger_id, purged_through)
             SELECT $1, max(received_at) FROM gone HAVING count(*) > 0
             ON CONFLICT (ledger_id) DO UPDATE
                 SET purged_through = GREATEST(h.purged_through, EXCLUDED.purged_through),
                     updated_at = now()
         )
         SELECT count(*) FROM gone",
    )
    .bind(ledger_id)
    .bind(micros(older_than))
    .bind(limit)
    .fetch_one(&mut *tx)
    .await?;
    // A tombstone is never delivered: when its message shows up later it is recorded and
    // delivered as new, which is right, so tombstones go without moving the horizon.
    let tombstones = sqlx::query(
        "WITH due AS MATERIALIZED (
             SELECT message_id FROM messages
             WHERE mailbox_uid = $1 AND received_at IS NULL AND delivery_state = 'skipped'
               AND recorded_at < now() - $2 * interval '1 microsecond'
             LIMIT $3
             FOR UPDATE
         )
         DELETE FROM messages m USING due
         WHERE m.mailbox_uid = $1 AND m.message_id = due.message_id",
    )
    .bind(ledger_id)
    .bind(micros(older_than))
    .bind(limit)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(IdentityPurge {
        deleted: u64::try_from(messages).unwrap_or(0) + tombstones.rows_affected(),
        busy: false,
    })
}

/// Deletes up to `limit` rows of a ledger whatever their age or state (its MailboxPoll is gone
/// and its deletion policy is `Delete`), in the caller's transaction. Once none is left, its
/// counters and horizon go too. Returns how many rows were deleted; fewer than `limit` means
/// the ledger is gone.
pub async fn delete_ledger(
    conn: &mut PgConnection,
    ledger_id: Uuid,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let deleted = sqlx::query(
        "WITH due AS MATERIALIZED (
             SELECT message_id FROM messages WHERE mailbox_uid = $1 LIMIT $2 FOR UPDATE
         )
         DELETE FROM messages m USING due
         WHERE m.mailbox_uid = $1 AND m.message_id = due.message_id",
    )
    .bind(ledger_id)
    .bind(limit)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if (deleted as i64) < limit {
        for statement in [
            "DELETE FROM ledger_count_deltas WHERE ledger_id = $1",
            "DELETE FROM ledger_counts WHERE ledger_id = $1",
            "DELETE FROM ledger_horizons WHERE ledger_id = $1",
        ] {
            sqlx::query(statement)
                .bind(ledger_id)
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(deleted)
}

/// A duration as whole microseconds for SQL intervals, saturating.
fn micros(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
/// One line of `mailpoll messages list`: what a person needs to find a message and see how far
/// it got. Content columns may be empty once retention purged them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
#[serde(rename_all = "camelCase")]
pub struct MessageListing {
    pub seq: i64,
    pub message_id: String,
    pub received_at: Option<DateTime<Utc>>,
    pub from_address: Option<String>,
    pub subject: Option<String>,
    pub delivery_state: String,
    pub delivered_at: Option<DateTime<Utc>>,
    /// Why the delivery failed, why the after-actions were parked, or why the message was
    /// skipped or filtered.
    pub error: Option<String>,
}

/// Messages of the ledgers `identities`, newest first, optionally in one delivery state.
pub async fn list(
    pool: &PgPool,
    identities: &[Uuid],
    state: Option<DeliveryState>,
    limit: i64,
) -> Result<Vec<MessageListing>, sqlx::Error> {
    sqlx::query_as(
        "SELECT seq, message_id, received_at, from_address, subject, delivery_state, delivered_at,
                COALESCE(delivery_error, actions_error, skip_reason) AS error
         FROM messages
         WHERE mailbox_uid = ANY($1) AND ($2::text IS NULL OR delivery_state = $2)
         ORDER BY seq DESC
         LIMIT $3",
    )
    .bind(identities)
    .bind(state.map(DeliveryState::as_str))
    .bind(limit)
    .fetch_all(pool)
    .await
}
