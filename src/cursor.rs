//! The per-mailbox cursor (`mailbox_cursors`, every statement on it is here): where the next
//! delta round starts, the mailbox run lease, the shared `throttled_until`, and the times of
//! the last poll.
//!
//! A poll (or a batch of after-actions) takes the mailbox's run lease first, so one run per
//! mailbox talks to Graph at a time across every replica. The lease token fences the cursor:
//! every cursor write names it, and a run whose lease was taken over changes nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// The source a cursor belongs to. A different mailbox or folder starts from scratch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub uid: Uuid,
    pub namespace: String,
    pub name: String,
    pub mailbox: String,
    pub folder: String,
}

/// Where the next request of a poll starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct Cursor {
    /// Delta link of the last finished round.
    pub delta_link: Option<String>,
    /// Continuation of an unfinished round (a crash mid-round resumes here).
    pub round_next_link: Option<String>,
    /// Highest receivedDateTime recorded: bounds a resync.
    pub watermark: Option<DateTime<Utc>>,
    /// Retry-After from Graph, shared by every replica.
    pub throttled_until: Option<DateTime<Utc>>,
}

/// Proof of holding a mailbox's run lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLease {
    pub uid: Uuid,
    pub token: Uuid,
}

#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    #[error("the mailbox run lease was taken over by another worker")]
    LeaseLost,
    #[error("database error on the mailbox cursor: {0}")]
    Db(#[from] sqlx::Error),
}

/// The outcome of trying to take the run lease.
#[derive(Debug)]
pub enum Acquired {
    Held(RunLease, Cursor),
    /// Another run holds the mailbox until about this time.
    Busy {
        until: DateTime<Utc>,
    },
}

/// Creates the cursor row when missing (resetting it when the mailbox or folder changed),
/// then takes the run lease unless another live run holds it.
pub async fn acquire(
    pool: &PgPool,
    source: &Source,
    ttl: Duration,
) -> Result<Acquired, CursorError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        r#"INSERT INTO mailbox_cursors (mailbox_uid, namespace, name, mailbox, folder)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (mailbox_uid) DO UPDATE SET
               namespace = EXCLUDED.namespace,
               name = EXCLUDED.name,
               mailbox = EXCLUDED.mailbox,
               folder = EXCLUDED.folder,
               delta_link = CASE WHEN (mailbox_cursors.mailbox, mailbox_cursors.folder) = (EXCLUDED.mailbox, EXCLUDED.folder)
                                 THEN mailbox_cursors.delta_link END,
               round_next_link = CASE WHEN (mailbox_cursors.mailbox, mailbox_cursors.folder) = (EXCLUDED.mailbox, EXCLUDED.folder)
                                      THEN mailbox_cursors.round_next_link END,
               watermark = CASE WHEN (mailbox_cursors.mailbox, mailbox_cursors.folder) = (EXCLUDED.mailbox, EXCLUDED.folder)
                                THEN mailbox_cursors.watermark END,
               updated_at = now()"#,
    )
    .bind(source.uid)
    .bind(&source.namespace)
    .bind(&source.name)
    .bind(&source.mailbox)
    .bind(&source.folder)
    .execute(&mut *tx)
    .await?;
    let token = Uuid::new_v4();
    let held: Option<Cursor> = sqlx::query_as(
        r#"UPDATE mailbox_cursors
           SET run_token = $2, run_lease_until = now() + $3 * interval '1 millisecond'
           WHERE mailbox_uid = $1 AND (run_lease_until IS NULL OR run_lease_until < now())
           RETURNING delta_link, round_next_link, watermark,
                     -- Graph throttles per mailbox: any MailboxPoll of the same mailbox counts.
                     (SELECT max(c.throttled_until) FROM mailbox_cursors c
                      WHERE lower(c.mailbox) = lower(mailbox_cursors.mailbox)) AS throttled_until"#,
    )
    .bind(source.uid)
    .bind(token)
    .bind(millis(ttl))
    .fetch_optional(&mut *tx)
    .await?;
    let outcome = match held {
        Some(cursor) => Acquired::Held(
            RunLease {
                uid: source.uid,
                token,
            },
            cursor,
        ),
        None => {
            let until: Option<DateTime<Utc>> = sqlx::query_scalar(
                "SELECT run_lease_until FROM mailbox_cursors WHERE mailbox_uid = $1",
            )
            .bind(source.uid)
            .fetch_one(&mut *tx)
            .await?;
            Acquired::Busy {
                until: until.unwrap_or_else(Utc::now),
            }
        }
    };
    tx.commit().await?;
    Ok(outcome)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Fails with `LeaseLost` unless exactly one row matched the fenced update.
fn fenced(result: sqlx::postgres::PgQueryResult) -> Result<(), CursorError> {
    if result.rows_affected() == 1 {
        Ok(())
    } else {
        Err(CursorError::LeaseLost)
    }
}

/// Saves the continuation of a round after a page was recorded, in the page's transaction,
/// and extends the lease.
pub async fn save_progress(
    conn: &mut PgConnection,
    lease: RunLease,
    next_link: Option<&str>,
    watermark: Option<DateTime<Utc>>,
    ttl: Duration,
) -> Result<(), CursorError> {
    let result = sqlx::query(
        r#"UPDATE mailbox_cursors
           SET round_next_link = $3,
               watermark = GREATEST(watermark, $4),
               run_lease_until = now() + $5 * interval '1 millisecond',
               updated_at = now()
           WHERE mailbox_uid = $1 AND run_token = $2"#,
    )
    .bind(lease.uid)
    .bind(lease.token)
    .bind(next_link)
    .bind(watermark)
    .bind(millis(ttl))
    .execute(&mut *conn)
    .await?;
    fenced(result)
}

/// Ends a round: the delta link becomes the cursor, the continuation is dropped.
pub async fn finish_round(
    conn: &mut PgConnection,
    lease: RunLease,
    delta_link: Option<&str>,
    watermark: Option<DateTime<Utc>>,
) -> Result<(), CursorError> {
    let result = sqlx::query(
        r#"UPDATE mailbox_cursors
           SET delta_link = $3, round_next_link = NULL, watermark = GREATEST(watermark, $4),
               last_success_at = now(), updated_at = now()
           WHERE mailbox_uid = $1 AND run_token = $2"#,
    )
    .bind(lease.uid)
    .bind(lease.token)
    .bind(delta_link)
    .bind(watermark)
    .execute(&mut *conn)
    .await?;
    fenced(result)
}

/// Drops the delta state (expired token): the next round is a bounded resync.
pub async fn start_resync(conn: &mut PgConnection, lease: RunLease) -> Result<(), CursorError> {
    let result = sqlx::query(
        r#"UPDATE mailbox_cursors
           SET delta_link = NULL, round_next_link = NULL, resyncs = resyncs + 1, updated_at = now()
           WHERE mailbox_uid = $1 AND run_token = $2"#,
    )
    .bind(lease.uid)
    .bind(lease.token)
    .execute(&mut *conn)
    .await?;
    fenced(result)
}

/// Keeps the lease alive while a long round waits (throttling, slow pages).
pub async fn extend(pool: &PgPool, lease: RunLease, ttl: Duration) -> Result<(), CursorError> {
    let result = sqlx::query(
        "UPDATE mailbox_cursors SET run_lease_until = now() + $3 * interval '1 millisecond'
         WHERE mailbox_uid = $1 AND run_token = $2",
    )
    .bind(lease.uid)
    .bind(lease.token)
    .bind(millis(ttl))
    .execute(pool)
    .await?;
    fenced(result)
}

/// Gives the mailbox back; a no-op when the lease was already taken over.
pub async fn release(pool: &PgPool, lease: RunLease) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE mailbox_cursors SET run_token = NULL, run_lease_until = NULL
         WHERE mailbox_uid = $1 AND run_token = $2",
    )
    .bind(lease.uid)
    .bind(lease.token)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a Retry-After so every replica waits it out before talking to this mailbox (all
/// MailboxPolls of the mailbox: Graph counts per mailbox, not per folder).
pub async fn set_throttled_until(
    pool: &PgPool,
    mailbox: &str,
    until: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE mailbox_cursors SET throttled_until = GREATEST(throttled_until, $2)
         WHERE lower(mailbox) = lower($1)",
    )
    .bind(mailbox)
    .bind(until)
    .execute(pool)
    .await?;
    Ok(())
}

/// Forgets the cursor of a MailboxPoll (its mailbox or folder changed, or it was deleted).
pub async fn delete(pool: &PgPool, uid: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM mailbox_cursors WHERE mailbox_uid = $1")
        .bind(uid)
        .execute(pool)
        .await?;
    Ok(())
}

/// The cursor as it is now (a forced poll's extra round starts from it).
pub async fn load(pool: &PgPool, uid: Uuid) -> Result<Cursor, sqlx::Error> {
    sqlx::query_as(
        "SELECT delta_link, round_next_link, watermark, throttled_until
         FROM mailbox_cursors WHERE mailbox_uid = $1",
    )
    .bind(uid)
    .fetch_one(pool)
    .await
}

/// A moment of a poll the cursor row keeps the time of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMoment {
    Started,
    Finished,
}

/// Notes the time of a poll's start or end, in the caller's transaction.
pub async fn note_poll(
    conn: &mut PgConnection,
    uid: Uuid,
    moment: PollMoment,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE mailbox_cursors
         SET last_poll_started_at = CASE WHEN $2 THEN now() ELSE last_poll_started_at END,
             last_poll_finished_at = CASE WHEN $2 THEN last_poll_finished_at ELSE now() END
         WHERE mailbox_uid = $1",
    )
    .bind(uid)
    .bind(moment == PollMoment::Started)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// MailboxPolls with a cursor older than `min_age`, in `namespaces` (all when `None`): the
/// candidates of the leader's sweep of deleted MailboxPolls.
pub async fn owners_older_than(
    pool: &PgPool,
    min_age: Duration,
    namespaces: Option<&[String]>,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT mailbox_uid FROM mailbox_cursors
         WHERE created_at < now() - $1 * interval '1 millisecond'
           AND ($2::text[] IS NULL OR namespace = ANY($2))",
    )
    .bind(millis(min_age))
    .bind(namespaces)
    .fetch_all(pool)
    .await
}
