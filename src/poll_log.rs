//! The poll log (`polls`, `poll_requests`; every statement on them is here): one row per poll
//! round with what it did and how it ended, and every forced-poll request
//! (`mailpoll.dev/poll-requested-at` value) with the poll that served it.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::reason::Reason;
use crate::storable;

/// What a poll round did so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub pages: i32,
    /// Graph calls of the round, retries included (tokens are counted by the token cache).
    pub graph_requests: i32,
    pub seen: i32,
    pub new: i32,
    pub resynced: bool,
}

/// Starts a poll row; returns its id.
pub async fn start(conn: &mut PgConnection, uid: Uuid, task_id: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("INSERT INTO polls (mailbox_uid, task_id) VALUES ($1, $2) RETURNING id")
        .bind(uid)
        .bind(task_id)
        .fetch_one(&mut *conn)
        .await
}

/// Records a round's progress (with each committed page, in the page's transaction).
pub async fn record_progress(
    conn: &mut PgConnection,
    poll_id: i64,
    progress: Progress,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE polls SET pages = $2, graph_requests = $6, messages_seen = $3, messages_new = $4,
                          resynced = $5
         WHERE id = $1",
    )
    .bind(poll_id)
    .bind(progress.pages)
    .bind(progress.seen)
    .bind(progress.new)
    .bind(progress.resynced)
    .bind(progress.graph_requests)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Longest poll error message kept.
const MAX_ERROR_MESSAGE_BYTES: usize = 4096;

/// Ends a poll: succeeded, or failed with a reason and a message. Returns its MailboxPoll.
pub async fn finish(
    conn: &mut PgConnection,
    poll_id: i64,
    failure: Option<(Reason, &str)>,
) -> Result<Uuid, sqlx::Error> {
    let outcome = if failure.is_some() {
        "failed"
    } else {
        "succeeded"
    };
    sqlx::query_scalar(
        "UPDATE polls SET finished_at = now(), outcome = $2, error_reason = $3, error_message = $4
         WHERE id = $1 RETURNING mailbox_uid",
    )
    .bind(poll_id)
    .bind(outcome)
    .bind(failure.map(|(reason, _)| reason.as_str()))
    // The message can quote Graph or a receiver: made storable whatever its source.
    .bind(failure.map(|(_, message)| storable::text(message, MAX_ERROR_MESSAGE_BYTES)))
    .fetch_one(&mut *conn)
    .await
}

/// Records a forced-poll request. Returns whether the value is new: each value is accepted
/// once per MailboxPoll, forever (across leader changes and restarts).
pub async fn request(pool: &PgPool, uid: Uuid, value: &str) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO poll_requests (mailbox_uid, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(uid)
    .bind(value)
    .execute(pool)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Prefix of the poll requests a change notification makes (never an annotation's value on
/// status, never the request pruning keeps for the annotation).
pub const WAKEUP_PREFIX: &str = "notification:";

/// Records a poll request of a change notification. Each one is a row of its own, so one
/// that arrives while a round runs gets the round after it; a burst before a round starts is
/// served by that one round.
pub async fn request_wakeup(pool: &PgPool, uid: Uuid) -> Result<(), sqlx::Error> {
    let value = format!("{WAKEUP_PREFIX}{}", Uuid::new_v4());
    sqlx::query("INSERT INTO poll_requests (mailbox_uid, value) VALUES ($1, $2)")
        .bind(uid)
        .bind(value)
        .execute(pool)
        .await?;
    Ok(())
}

/// Marks forced-poll requests made before `round_started` as served by this task, and names
/// the newest of them on the round's `polls` row. Returns whether requests made since are
/// still waiting (they need a round of their own).
pub async fn serve_requests(
    pool: &PgPool,
    uid: Uuid,
    task_id: i64,
    poll_id: i64,
    round_started: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    sqlx::query(
        "WITH served AS (
             UPDATE poll_requests SET served_at = now(), task_id = $2
             WHERE mailbox_uid = $1 AND served_at IS NULL AND requested_at <= $3
             RETURNING value, requested_at
         )
         UPDATE polls
            SET poll_request = (SELECT value FROM served ORDER BY requested_at DESC LIMIT 1)
          WHERE id = $4 AND EXISTS (SELECT 1 FROM served)",
    )
    .bind(uid)
    .bind(task_id)
    .bind(round_started)
    .bind(poll_id)
    .execute(pool)
    .await?;
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM poll_requests WHERE mailbox_uid = $1 AND served_at IS NULL)",
    )
    .bind(uid)
    .fetch_one(pool)
    .await
}

/// What the scheduler needs: when the last poll started, and whether forced polls wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct ScheduleFacts {
    pub last_started: Option<DateTime<Utc>>,
    pub waiting_requests: bool,
}

pub async fn schedule_facts(pool: &PgPool, uid: Uuid) -> Result<ScheduleFacts, sqlx::Error> {
    sqlx::query_as(
        "SELECT (SELECT max(started_at) FROM polls WHERE mailbox_uid = $1) AS last_started,
                EXISTS (SELECT 1 FROM poll_requests WHERE mailbox_uid = $1 AND served_at IS NULL)
                    AS waiting_requests",
    )
    .bind(uid)
    .fetch_one(pool)
    .await
}

/// One finished poll.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct FinishedPoll {
    pub id: i64,
    pub finished_at: DateTime<Utc>,
    pub succeeded: bool,
    pub messages_new: i32,
    pub resynced: bool,
    pub error_reason: Option<String>,
    pub error_message: Option<String>,
}

impl FinishedPoll {
    /// Why it failed (`None` when it succeeded).
    pub fn reason(&self) -> Option<Reason> {
        (!self.succeeded).then(|| Reason::parse(self.error_reason.as_deref().unwrap_or("")))
    }

    /// Whether its outcome says whether the MailboxPoll works: it succeeded, or failed for a
    /// reason that needs someone to act (not throttling, not a configuration error).
    pub fn is_decisive(&self) -> bool {
        self.reason().is_none_or(Reason::decides_readiness)
    }
}

/// The columns of a [`FinishedPoll`].
const FINISHED_POLL: &str = "id, finished_at, outcome = 'succeeded' AS succeeded, messages_new, \
     resynced, error_reason, error_message";

/// The latest finished poll.
pub async fn latest_finished(
    conn: &mut PgConnection,
    uid: Uuid,
) -> Result<Option<FinishedPoll>, sqlx::Error> {
    let sql = format!(
        "SELECT {FINISHED_POLL} FROM polls WHERE mailbox_uid = $1 AND finished_at IS NOT NULL
         ORDER BY started_at DESC, id DESC LIMIT 1"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(uid)
        .fetch_optional(&mut *conn)
        .await
}

/// The latest finished poll that is [decisive](FinishedPoll::is_decisive).
pub async fn latest_decisive(
    conn: &mut PgConnection,
    uid: Uuid,
) -> Result<Option<FinishedPoll>, sqlx::Error> {
    let undecisive = undecisive_reasons();
    let sql = format!(
        "SELECT {FINISHED_POLL} FROM polls
         WHERE mailbox_uid = $1 AND finished_at IS NOT NULL
           AND (outcome = 'succeeded' OR NOT (error_reason = ANY($2)))
         ORDER BY started_at DESC, id DESC LIMIT 1"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(uid)
        .bind(undecisive)
        .fetch_optional(&mut *conn)
        .await
}

/// Totals over a MailboxPoll's polls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Summary {
    pub last_success: Option<DateTime<Utc>>,
    /// Highest poll id that was a resync.
    pub last_resync_poll: Option<i64>,
    pub last_poll_id: Option<i64>,
    /// Whether the latest poll is still running.
    pub latest_open: Option<bool>,
}

/// Each part reads the latest rows through an index (`polls_latest`, `polls_succeeded`,
/// `polls_resynced`): the cost does not grow with the poll history.
pub async fn summary(conn: &mut PgConnection, uid: Uuid) -> Result<Summary, sqlx::Error> {
    sqlx::query_as(
        "SELECT (SELECT finished_at FROM polls WHERE mailbox_uid = $1 AND outcome = 'succeeded'
                 ORDER BY started_at DESC, id DESC LIMIT 1) AS last_success,
                (SELECT id FROM polls WHERE mailbox_uid = $1 AND resynced
                 ORDER BY id DESC LIMIT 1) AS last_resync_poll,
                latest.id AS last_poll_id, latest.finished_at IS NULL AS latest_open
         FROM (SELECT 1) AS one
         LEFT JOIN LATERAL (SELECT id, finished_at FROM polls WHERE mailbox_uid = $1
                            ORDER BY started_at DESC, id DESC LIMIT 1) AS latest ON true",
    )
    .bind(uid)
    .fetch_one(&mut *conn)
    .await
}

/// The forced-poll request served last.
pub async fn last_handled_request(
    conn: &mut PgConnection,
    uid: Uuid,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT value FROM poll_requests WHERE mailbox_uid = $1 AND served_at IS NOT NULL
           AND NOT starts_with(value, $2)
         ORDER BY served_at DESC, requested_at DESC LIMIT 1",
    )
    .bind(uid)
    .bind(WAKEUP_PREFIX)
    .fetch_optional(&mut *conn)
    .await
}

/// Deletes up to `limit` finished polls that started more than `older_than` ago, oldest
/// first, except those status still reads: for each MailboxPoll the latest poll, the latest
/// successful one, the latest resync and the latest [decisive](FinishedPoll::is_decisive)
/// one. Concurrent pruners take disjoint rows. Returns how many were deleted.
pub async fn prune_polls(
    pool: &PgPool,
    older_than: std::time::Duration,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let pruned = sqlx::query(
        "WITH due AS MATERIALIZED (
             SELECT p.id FROM polls p
             WHERE p.finished_at IS NOT NULL
               AND p.started_at < now() - $1 * interval '1 microsecond'
               AND EXISTS (SELECT 1 FROM polls n WHERE n.mailbox_uid = p.mailbox_uid
                           AND (n.started_at, n.id) > (p.started_at, p.id))
               AND (p.outcome <> 'succeeded'
                    OR EXISTS (SELECT 1 FROM polls n WHERE n.mailbox_uid = p.mailbox_uid
                               AND n.outcome = 'succeeded'
                               AND (n.started_at, n.id) > (p.started_at, p.id)))
               AND (NOT p.resynced
                    OR EXISTS (SELECT 1 FROM polls n WHERE n.mailbox_uid = p.mailbox_uid
                               AND n.resynced AND n.id > p.id))
               AND (NOT (p.outcome = 'succeeded' OR NOT (p.error_reason = ANY($3)))
                    OR EXISTS (SELECT 1 FROM polls n WHERE n.mailbox_uid = p.mailbox_uid
                               AND n.finished_at IS NOT NULL
                               AND (n.outcome = 'succeeded' OR NOT (n.error_reason = ANY($3)))
                               AND (n.started_at, n.id) > (p.started_at, p.id)))
             ORDER BY p.id
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         )
         DELETE FROM polls WHERE id IN (SELECT id FROM due)",
    )
    .bind(micros(older_than))
    .bind(limit)
    .bind(undecisive_reasons())
    .execute(pool)
    .await?;
    Ok(pruned.rows_affected())
}

/// Deletes up to `limit` served forced-poll requests made more than `older_than` ago, except
/// each MailboxPoll's latest annotation value (notification wake-ups do not count), which must
/// not cause a poll again after a restart. Returns how many were deleted.
pub async fn prune_requests(
    pool: &PgPool,
    older_than: std::time::Duration,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let pruned = sqlx::query(
        "WITH due AS MATERIALIZED (
             SELECT p.mailbox_uid, p.value FROM poll_requests p
             WHERE p.served_at IS NOT NULL
               AND p.requested_at < now() - $1 * interval '1 microsecond'
               AND (starts_with(p.value, $3)
                    OR EXISTS (SELECT 1 FROM poll_requests n WHERE n.mailbox_uid = p.mailbox_uid
                               AND n.requested_at > p.requested_at
                               AND NOT starts_with(n.value, $3)))
             ORDER BY p.requested_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         )
         DELETE FROM poll_requests r USING due
         WHERE r.mailbox_uid = due.mailbox_uid AND r.value = due.value",
    )
    .bind(micros(older_than))
    .bind(limit)
    .bind(WAKEUP_PREFIX)
    .execute(pool)
    .await?;
    Ok(pruned.rows_affected())
}

/// Deletes up to `limit` polls and forced-poll requests of a MailboxPoll that is gone (its
/// deletion policy is `Delete`), in the caller's transaction. Returns how many rows went;
/// fewer than `limit` means none is left.
pub async fn delete_for(
    conn: &mut PgConnection,
    uid: Uuid,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    let polls = sqlx::query(
        "WITH due AS MATERIALIZED (SELECT id FROM polls WHERE mailbox_uid = $1 LIMIT $2)
         DELETE FROM polls WHERE id IN (SELECT id FROM due)",
    )
    .bind(uid)
    .bind(limit)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    let requests = sqlx::query(
        "WITH due AS MATERIALIZED (SELECT value FROM poll_requests WHERE mailbox_uid = $1 LIMIT $2)
         DELETE FROM poll_requests r USING due
         WHERE r.mailbox_uid = $1 AND r.value = due.value",
    )
    .bind(uid)
    .bind(limit)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(polls.max(requests))
}

fn undecisive_reasons() -> Vec<&'static str> {
    Reason::ALL
        .into_iter()
        .filter(|reason| !reason.decides_readiness())
        .map(Reason::as_str)
        .collect()
}

/// A duration as whole microseconds for SQL intervals, saturating.
fn micros(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
