//! Fencing of leader-only writes (owner of the `leader_terms` table).
//!
//! Stepping down at the renew deadline keeps two leaders from acting at once only as long as
//! every write of the old leader has landed by then; a write that was slow to reach Postgres
//! (a stalled connection, a paused process) may land after a successor took over. So the
//! leader records a term when it takes over ([`begin_term`]: the term number only grows), and
//! each leader-only write runs in a transaction that first locks the term row
//! ([`LeaderTerm::check`], `FOR SHARE`): if another term was recorded since, the write is
//! refused; if not, a successor's [`begin_term`] waits for the write's transaction to end.

use sqlx::{PgConnection, PgPool};

/// One term of leadership of a Lease, as recorded in Postgres.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderTerm {
    pub lease: String,
    pub holder: String,
    pub term: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// Another term was recorded since this one began: this process no longer leads.
    #[error(
        "leadership of {lease} moved on (term {ours} of {holder} is over; the current term is {current:?}): leader-only writes are refused"
    )]
    Deposed {
        lease: String,
        holder: String,
        ours: i64,
        current: Option<(String, i64)>,
    },
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Records a new term of `lease` held by `holder`, after every term before it.
pub async fn begin_term(
    pool: &PgPool,
    lease: &str,
    holder: &str,
) -> Result<LeaderTerm, FenceError> {
    let term: i64 = sqlx::query_scalar(
        "INSERT INTO leader_terms (lease, holder, term) VALUES ($1, $2, 1)
         ON CONFLICT (lease) DO UPDATE
            SET holder = excluded.holder, term = leader_terms.term + 1, started_at = now()
         RETURNING term",
    )
    .bind(lease)
    .bind(holder)
    .fetch_one(pool)
    .await?;
    Ok(LeaderTerm {
        lease: lease.to_owned(),
        holder: holder.to_owned(),
        term,
    })
}

impl LeaderTerm {
    /// Succeeds when this is still the recorded term, and keeps it so until the transaction
    /// `tx` ends: call it first in the transaction of every leader-only write.
    pub async fn check(&self, tx: &mut PgConnection) -> Result<(), FenceError> {
        let current: Option<(String, i64)> =
            sqlx::query_as("SELECT holder, term FROM leader_terms WHERE lease = $1 FOR SHARE")
                .bind(&self.lease)
                .fetch_optional(&mut *tx)
                .await?;
        match current {
            Some((holder, term)) if holder == self.holder && term == self.term => Ok(()),
            current => Err(FenceError::Deposed {
                lease: self.lease.clone(),
                holder: self.holder.clone(),
                ours: self.term,
                current,
            }),
        }
    }
}
