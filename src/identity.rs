//! The ledger identity of a MailboxPoll (`mailbox_identities`; every statement on it is here).
//!
//! Messages and their idempotency keys are keyed by an identity that belongs to the
//! MailboxPoll's namespace, name, mailbox and folder, not to the Kubernetes object: deleting
//! and re-creating the same MailboxPoll (a GitOps re-sync, a restore, a move to another
//! cluster sharing the database) continues its ledger, and nothing is delivered again under
//! new keys. A different mailbox or folder is a different identity. [`forget`] starts over on
//! purpose.

use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// What the leader's sweep does with a ledger once its MailboxPoll is gone
/// (`spec.deletionPolicy`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum DeletionPolicy {
    /// Keep the ledger: a re-created MailboxPoll continues it (the GitOps case).
    #[default]
    Retain,
    /// Purge the ledger, cursor, poll history and identity.
    Delete,
}

impl DeletionPolicy {
    /// As stored in `mailbox_identities.deletion_policy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retain => "retain",
            Self::Delete => "delete",
        }
    }
}

/// What an identity belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub mailbox: &'a str,
    pub folder: &'a str,
}

/// The instant `spec.startFrom: now` stands for in ledger `identity`: fixed by the first call
/// (the first time the operator resolves the MailboxPoll with `now`), the same for every later
/// poll, resync and replica. `None` when the identity does not exist.
pub async fn start_now_at(
    pool: &PgPool,
    identity: Uuid,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE mailbox_identities SET start_now_at = COALESCE(start_now_at, now())
         WHERE identity = $1
         RETURNING start_now_at",
    )
    .bind(identity)
    .fetch_optional(pool)
    .await
}

/// The identity of `owner`, created on first sight; `uid` (the Kubernetes object's) is noted
/// as the one using it now.
pub async fn resolve(pool: &PgPool, owner: &Owner<'_>, uid: Uuid) -> Result<Uuid, sqlx::Error> {
    // Writes only when the identity is new or its object changed (a re-created MailboxPoll).
    let written: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO mailbox_identities (namespace, name, mailbox, folder, identity, uid)
         VALUES ($1, $2, lower($3), $4, $5, $6)
         ON CONFLICT (namespace, name, mailbox, folder) DO UPDATE
             SET uid = EXCLUDED.uid, updated_at = now()
             WHERE mailbox_identities.uid <> EXCLUDED.uid
         RETURNING identity",
    )
    .bind(owner.namespace)
    .bind(owner.name)
    .bind(owner.mailbox)
    .bind(owner.folder)
    .bind(Uuid::new_v4())
    .bind(uid)
    .fetch_optional(pool)
    .await?;
    match written {
        Some(identity) => Ok(identity),
        None => {
            sqlx::query_scalar(
                "SELECT identity FROM mailbox_identities
             WHERE namespace = $1 AND name = $2 AND mailbox = lower($3) AND folder = $4",
            )
            .bind(owner.namespace)
            .bind(owner.name)
            .bind(owner.mailbox)
            .bind(owner.folder)
            .fetch_one(pool)
            .await
        }
    }
}

/// The objects (Kubernetes uids) that use `identities` now, one per identity, in their order.
/// An identity nobody mapped (a ledger written before identities existed, keyed by its
/// object's uid) stands for itself.
pub async fn objects_for(pool: &PgPool, identities: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT COALESCE(m.uid, i.identity)
         FROM unnest($1::uuid[]) WITH ORDINALITY AS i(identity, n)
         LEFT JOIN mailbox_identities m ON m.identity = i.identity
         ORDER BY i.n",
    )
    .bind(identities)
    .fetch_all(pool)
    .await
}

/// Forgets the identities of a MailboxPoll (every mailbox and folder it had): its next poll
/// starts a new ledger, and every message in its folder is delivered again under new keys.
/// The old ledger stays until retention removes it. Returns how many identities were forgotten.
pub async fn forget(pool: &PgPool, namespace: &str, name: &str) -> Result<u64, sqlx::Error> {
    let forgotten =
        sqlx::query("DELETE FROM mailbox_identities WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .execute(pool)
            .await?;
    Ok(forgotten.rows_affected())
}

/// A MailboxPoll's ledger as the identities table knows it, for people looking it up by name.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct KnownLedger {
    pub identity: Uuid,
    /// The object that uses it now (the latest seen).
    pub uid: Uuid,
    pub mailbox: String,
    pub folder: String,
}

/// The ledgers of the MailboxPoll `namespace/name` (one per mailbox and folder it has had).
pub async fn ledgers_of(
    pool: &PgPool,
    namespace: &str,
    name: &str,
) -> Result<Vec<KnownLedger>, sqlx::Error> {
    sqlx::query_as(
        "SELECT identity, uid, mailbox, folder FROM mailbox_identities
         WHERE namespace = $1 AND name = $2
         ORDER BY updated_at DESC",
    )
    .bind(namespace)
    .bind(name)
    .fetch_all(pool)
    .await
}

/// `namespace/name` of the MailboxPolls whose object uid is in `uids` (those the table knows).
pub async fn names_of(
    pool: &PgPool,
    uids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, String>, sqlx::Error> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT DISTINCT ON (uid) uid, namespace || '/' || name FROM mailbox_identities
         WHERE uid = ANY($1)
         ORDER BY uid, updated_at DESC",
    )
    .bind(uids)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Remembers the deletion policy of the object `uid` on every identity it uses (written only
/// when it changed). Kept in Postgres while the object exists, so the sweep knows it once the
/// object is gone, without a finalizer.
pub async fn set_deletion_policy(
    pool: &PgPool,
    uid: Uuid,
    policy: DeletionPolicy,
) -> Result<u64, sqlx::Error> {
    let changed = sqlx::query(
        "UPDATE mailbox_identities SET deletion_policy = $2
         WHERE uid = $1 AND deletion_policy <> $2",
    )
    .bind(uid)
    .bind(policy.as_str())
    .execute(pool)
    .await?;
    Ok(changed.rows_affected())
}

/// An identity whose object asked for its ledger to be deleted with it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Doomed {
    pub identity: Uuid,
    /// The object that uses it (deleted, if it is not in the watch cache).
    pub uid: Uuid,
    pub namespace: String,
}

/// Identities with deletion policy `Delete`, unchanged for `min_age` (a younger one may belong
/// to an object too new for the watch cache), in `namespaces` (all when `None`).
pub async fn doomed(
    pool: &PgPool,
    min_age: std::time::Duration,
    namespaces: Option<&[String]>,
) -> Result<Vec<Doomed>, sqlx::Error> {
    sqlx::query_as(
        "SELECT identity, uid, namespace FROM mailbox_identities
         WHERE deletion_policy = 'delete'
           AND updated_at < now() - $1 * interval '1 microsecond'
           AND ($2::text[] IS NULL OR namespace = ANY($2))",
    )
    .bind(i64::try_from(min_age.as_micros()).unwrap_or(i64::MAX))
    .bind(namespaces)
    .fetch_all(pool)
    .await
}

/// Locks `doomed` for the rest of the caller's transaction if it still belongs to the same
/// object with policy `Delete`: a MailboxPoll re-created meanwhile (which takes the identity
/// over in [`resolve`]) waits, and the purge stops. Returns whether it is still doomed.
pub async fn lock_doomed(conn: &mut PgConnection, doomed: &Doomed) -> Result<bool, sqlx::Error> {
    let found: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM mailbox_identities
         WHERE identity = $1 AND uid = $2 AND deletion_policy = 'delete'
         FOR UPDATE",
    )
    .bind(doomed.identity)
    .bind(doomed.uid)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(found.is_some())
}

/// Deletes an identity (its ledger is gone), in the caller's transaction.
pub async fn delete(conn: &mut PgConnection, identity: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM mailbox_identities WHERE identity = $1")
        .bind(identity)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
