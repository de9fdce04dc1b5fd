//! The ledger identity of a MailboxPoll (`mailbox_identities`; every statement on it is here).
//!
//! Messages and their idempotency keys are keyed by an identity that belongs to the
//! MailboxPoll's namespace, name, mailbox and folder, not to the Kubernetes object: deleting
//! and re-creating the same MailboxPoll (a GitOps re-sync, a restore, a move to another
//! cluster sharing the database) continues its ledger, and nothing is delivered again under
//! new keys. A different mailbox or folder is a different identity. [`forget`] starts over on
//! purpose.

use sqlx::PgPool;
use uuid::Uuid;

/// What an identity belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub mailbox: &'a str,
    pub folder: &'a str,
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
