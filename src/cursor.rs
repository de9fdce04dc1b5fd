//! The per-mailbox cursor (`mailbox_cursors`, every statement on it is here): where the next
//! delta round starts, the mailbox run lease, the shared `throttled_until`, and the times of
//! the last poll.
//!
//! A poll (or a batch of after-actions) takes the mailbox's run lease first, so one run per
//! mailbox talks to Graph at a time across every replica. Cursor writes are fenced twice: by
//! the lease token (a run whose lease was taken over changes nothing) and by what the cursor
//! was read for, the mailbox, folder and delta query ([`Fence`]), so a link of one source or
//! query never lands in a cursor that now belongs to another. The cursor is relabelled for a
//! new mailbox or folder only by the run that takes the lease.

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
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct Cursor {
    /// Delta link of the last finished round.
    pub delta_link: Option<String>,
    /// Continuation of an unfinished round (a crash mid-round resumes here).
    pub round_next_link: Option<String>,
    /// The delta query both links belong to (`DeltaOptions::fingerprint`); links of another
    /// query are not to be followed.
    pub query_fingerprint: Option<String>,
    /// Highest receivedDateTime recorded (for operations and the received-time fallback;
    /// resyncs are never bounded by it).
    pub watermark: Option<DateTime<Utc>>,
    /// Retry-After from Graph, shared by every replica (the database's clock).
    pub throttled_until: Option<DateTime<Utc>>,
    /// How long the mailbox's Retry-After still runs, by the database's clock: replicas'
    /// clocks may disagree, so the wait is measured where it was recorded.
    #[sqlx(default)]
    pub throttle_left_ms: Option<f64>,
}

impl Cursor {
    /// The rest of the mailbox's Retry-After, if one is running.
    pub fn throttle_left(&self) -> Option<Duration> {
        positive_millis(self.throttle_left_ms)
    }
}

fn positive_millis(millis: Option<f64>) -> Option<Duration> {
    millis
        .filter(|ms| ms.is_finite() && *ms > 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
}

/// Proof of holding a mailbox's run lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLease {
    pub uid: Uuid,
    pub token: Uuid,
}

/// What a round's cursor writes are fenced on: the run lease, and the mailbox, folder and
/// delta query the round reads. A write matches nothing once the lease was taken over or the
/// cursor was relabelled for another source or query.
#[derive(Debug, Clone, Copy)]
pub struct Fence<'a> {
    pub lease: RunLease,
    pub source: &'a Source,
    /// `DeltaOptions::fingerprint` of the round.
    pub query: &'a str,
}

impl Fence<'_> {
    /// Binds `$1` to `$5` of a fenced statement: the cursor, the run token, the mailbox, the
    /// folder and the query the run read the cursor for.
    fn bind<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.lease.uid)
            .bind(self.lease.token)
            .bind(self.source.mailbox.clone())
            .bind(self.source.folder.clone())
            .bind(self.query.to_owned())
    }
}

/// Why a round starts without a stored link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundStart {
    /// Nothing to continue: a new cursor, or one reset for a new mailbox or folder.
    First,
    /// The stored links were dropped: Graph expired them, or they belong to another query.
    Resync,
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
    /// Another run holds the mailbox for about this long still (the database's clock).
    Busy {
        left: Duration,
    },
}

/// Takes the run lease unless another live run holds it (creating the cursor row when
/// missing). Only the run that takes the lease relabels the row: a new mailbox or folder drops
/// the delta state there and then. A refused run changes nothing, so the holder's writes
/// still land in the cursor it read.
pub async fn acquire(
    pool: &PgPool,
    source: &Source,
    ttl: Duration,
) -> Result<Acquired, CursorError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        r#"INSERT INTO mailbox_cursors (mailbox_uid, namespace, name, mailbox, folder)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (mailbox_uid) DO NOTHING"#,
    )
    .bind(source.uid)
    .bind(&source.namespace)
    .bind(&source.name)
    .bind(&source.mailbox)
    .bind(&source.folder)
    .execute(&mut *tx)
    .await?;
    let token = Uuid::new_v4();
    // SET expressions read the row as it was: the CASEs compare with the old label.
    let held: Option<Cursor> = sqlx::query_as(
        r#"UPDATE mailbox_cursors c
           SET run_token = $2, run_lease_until = now() + $3 * interval '1 millisecond',
               namespace = $4, name = $5, mailbox = $6, folder = $7,
               delta_link = CASE WHEN (c.mailbox, c.folder) = ($6, $7) THEN c.delta_link END,
               round_next_link = CASE WHEN (c.mailbox, c.folder) = ($6, $7) THEN c.round_next_link END,
               query_fingerprint = CASE WHEN (c.mailbox, c.folder) = ($6, $7) THEN c.query_fingerprint END,
               watermark = CASE WHEN (c.mailbox, c.folder) = ($6, $7) THEN c.watermark END,
               updated_at = now()
           WHERE c.mailbox_uid = $1 AND (c.run_lease_until IS NULL OR c.run_lease_until < now())
           RETURNING c.delta_link, c.round_next_link, c.query_fingerprint, c.watermark,
                     -- Graph throttles per mailbox: any MailboxPoll of the same mailbox counts.
                     (SELECT max(o.throttled_until) FROM mailbox_cursors o
                      WHERE lower(o.mailbox) = lower(c.mailbox)) AS throttled_until,
                     (SELECT EXTRACT(EPOCH FROM max(o.throttled_until) - now())::float8 * 1000
                      FROM mailbox_cursors o
                      WHERE lower(o.mailbox) = lower(c.mailbox)) AS throttle_left_ms"#,
    )
    .bind(source.uid)
    .bind(token)
    .bind(millis(ttl))
    .bind(&source.namespace)
    .bind(&source.name)
    .bind(&source.mailbox)
    .bind(&source.folder)
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
            let left: Option<f64> = sqlx::query_scalar(
                "SELECT EXTRACT(EPOCH FROM run_lease_until - now())::float8 * 1000
                 FROM mailbox_cursors WHERE mailbox_uid = $1",
            )
            .bind(source.uid)
            .fetch_one(&mut *tx)
            .await?;
            Acquired::Busy {
                left: positive_millis(left).unwrap_or_default(),
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
    fence: Fence<'_>,
    next_link: Option<&str>,
    watermark: Option<DateTime<Utc>>,
    ttl: Duration,
) -> Result<(), CursorError> {
    let result = fence
        .bind(sqlx::query(
            r#"UPDATE mailbox_cursors
           SET round_next_link = $6,
               watermark = GREATEST(watermark, $7),
               run_lease_until = now() + $8 * interval '1 millisecond',
               updated_at = now()
           WHERE mailbox_uid = $1 AND run_token = $2 AND mailbox = $3 AND folder = $4
             AND query_fingerprint = $5"#,
        ))
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
    fence: Fence<'_>,
    delta_link: Option<&str>,
    watermark: Option<DateTime<Utc>>,
) -> Result<(), CursorError> {
    let result = fence
        .bind(sqlx::query(
            r#"UPDATE mailbox_cursors
           SET delta_link = $6, round_next_link = NULL, watermark = GREATEST(watermark, $7),
               last_success_at = now(), updated_at = now()
           WHERE mailbox_uid = $1 AND run_token = $2 AND mailbox = $3 AND folder = $4
             AND query_fingerprint = $5"#,
        ))
        .bind(delta_link)
        .bind(watermark)
        .execute(&mut *conn)
        .await?;
    fenced(result)
}

/// Starts a round from a fresh query, in its first page's transaction: drops the stored links
/// and records the round's query, which later writes of the round are fenced on. A resync is
/// counted.
pub async fn start_round(
    conn: &mut PgConnection,
    fence: Fence<'_>,
    start: RoundStart,
) -> Result<(), CursorError> {
    let result = fence
        .bind(sqlx::query(
            r#"UPDATE mailbox_cursors
           SET delta_link = NULL, round_next_link = NULL, query_fingerprint = $5,
               resyncs = resyncs + CASE WHEN $6 THEN 1 ELSE 0 END, updated_at = now()
           WHERE mailbox_uid = $1 AND run_token = $2 AND mailbox = $3 AND folder = $4"#,
        ))
        .bind(start == RoundStart::Resync)
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

/// The channel on which a recorded Retry-After is announced (payload: [`ThrottleAnnouncement`]
/// as JSON), so replicas in the middle of a run pause at once instead of at their next run.
pub const THROTTLED_CHANNEL: &str = "mailpoll_mailbox_throttled";

/// A mailbox's requests must wait `wait_ms` from now (a Retry-After some replica received).
/// A duration rather than a time: the replicas' clocks need not agree, and the announcement
/// arrives within milliseconds.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ThrottleAnnouncement {
    /// Lower-cased.
    pub mailbox: String,
    pub wait_ms: f64,
}

impl ThrottleAnnouncement {
    /// Reads a payload of [`THROTTLED_CHANNEL`]; `None` for anything else.
    pub fn parse(payload: &str) -> Option<Self> {
        serde_json::from_str(payload).ok()
    }

    /// The announced wait; `None` for a wait that is not a positive number.
    pub fn wait(&self) -> Option<Duration> {
        positive_millis(Some(self.wait_ms))
    }
}

/// Records a Retry-After of `wait` from now, by the database's clock, so every replica waits
/// it out before talking to this mailbox (all MailboxPolls of the mailbox: Graph counts per
/// mailbox, not per folder), and announces it on [`THROTTLED_CHANNEL`] for runs already under
/// way. A longer wait already recorded is kept.
pub async fn set_throttled_for(
    pool: &PgPool,
    mailbox: &str,
    wait: Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH recorded AS (
             UPDATE mailbox_cursors
             SET throttled_until = GREATEST(throttled_until, now() + $2 * interval '1 millisecond')
             WHERE lower(mailbox) = lower($1)
         )
         SELECT pg_notify($3, json_build_object('mailbox', lower($1), 'wait_ms', $2)::text)",
    )
    .bind(mailbox)
    .bind(millis(wait))
    .bind(THROTTLED_CHANNEL)
    .execute(pool)
    .await?;
    Ok(())
}

/// The rest of the mailbox's Retry-After (any MailboxPoll of it), by the database's clock.
pub async fn throttle_left(pool: &PgPool, mailbox: &str) -> Result<Option<Duration>, sqlx::Error> {
    let left: Option<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM max(throttled_until) - now())::float8 * 1000
         FROM mailbox_cursors WHERE lower(mailbox) = lower($1)",
    )
    .bind(mailbox)
    .fetch_one(pool)
    .await?;
    Ok(positive_millis(left))
}

/// Forgets the cursor of a MailboxPoll (its mailbox or folder changed, or it was deleted).
pub async fn delete<'e>(executor: impl sqlx::PgExecutor<'e>, uid: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM mailbox_cursors WHERE mailbox_uid = $1")
        .bind(uid)
        .execute(executor)
        .await?;
    Ok(())
}

/// The cursor as it is now (a forced poll's extra round starts from it).
pub async fn load(pool: &PgPool, uid: Uuid) -> Result<Cursor, sqlx::Error> {
    sqlx::query_as(
        "SELECT delta_link, round_next_link, query_fingerprint, watermark, throttled_until
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
