//! What the sweep may delete, and the `Delete` deletion policy.
//!
//! The sweep acts on MailboxPolls that are missing from the watch cache. A cache that is not
//! synced, or empty because the watch lost its way, or a CRD that was removed (which deletes
//! every MailboxPoll at once) would make every ledger look orphaned; [`judge`] refuses the
//! sweep then, and the caller logs and counts why. [`purge`] deletes the ledger of a gone
//! MailboxPoll whose policy was `Delete`, in bounded batches.

use std::collections::HashSet;

use kube::api::{Api, ListParams};
use sqlx::PgPool;
use uuid::Uuid;

use super::fence::{FenceError, LeaderTerm};
use crate::directory::Scope;
use crate::identity::{self, Doomed};
use crate::ledger;
use crate::poll_log;
use crate::resource::MailboxPoll;

/// Why a sweep was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the MailboxPoll watch cache has not listed every object yet")]
    NotSynced,
    #[error("the MailboxPoll CRD is missing from the API server")]
    CrdMissing,
    #[error("the MailboxPoll watch cache is empty while the API server lists MailboxPolls")]
    CacheEmpty,
    #[error("the API server could not be asked whether MailboxPolls exist")]
    ApiUnavailable,
}

impl Refusal {
    /// Label value of `mailpoll_sweep_refusals_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotSynced => "NotSynced",
            Self::CrdMissing => "CrdMissing",
            Self::CacheEmpty => "CacheEmpty",
            Self::ApiUnavailable => "ApiUnavailable",
        }
    }
}

/// What the API server said when asked for one MailboxPoll per watched scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiView {
    /// The CRD is not served (404).
    Missing,
    /// Any other error.
    Unavailable,
    /// Whether any MailboxPoll exists in the watched scopes.
    Listed { any: bool },
}

/// Whether the sweep may act on what the cache is missing.
pub fn judge(synced: bool, cached: usize, api: ApiView) -> Result<(), Refusal> {
    if !synced {
        return Err(Refusal::NotSynced);
    }
    match api {
        ApiView::Missing => Err(Refusal::CrdMissing),
        ApiView::Unavailable => Err(Refusal::ApiUnavailable),
        ApiView::Listed { any: true } if cached == 0 => Err(Refusal::CacheEmpty),
        ApiView::Listed { .. } => Ok(()),
    }
}

/// Asks the API server (not the cache) for one MailboxPoll in each watched scope.
pub async fn ask_api(client: &kube::Client, scope: &Scope) -> ApiView {
    let mut any = false;
    for (_, api) in scope.apis::<MailboxPoll>(client) {
        let api: Api<MailboxPoll> = api;
        match api.list(&ListParams::default().limit(1)).await {
            Ok(list) => any |= !list.items.is_empty(),
            Err(kube::Error::Api(status)) if status.code == 404 => return ApiView::Missing,
            Err(error) => {
                tracing::debug!(%error, "listing MailboxPolls for the sweep");
                return ApiView::Unavailable;
            }
        }
    }
    ApiView::Listed { any }
}

/// What one [`purge`] call removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    pub messages: u64,
    pub history: u64,
    /// Identities whose purge finished.
    pub identities: u64,
}

/// Purges, batch by batch (one transaction each, at most `max_batches`), the ledgers, poll
/// history and identities of `doomed` whose object is not in `existing`. A MailboxPoll
/// re-created meanwhile takes its identity back and stops the purge (see
/// [`identity::lock_doomed`]). What is left continues at the next sweep. Each batch is fenced
/// by the leader's `term`: a deposed leader purges nothing.
pub async fn purge(
    pool: &PgPool,
    term: &LeaderTerm,
    doomed: &[Doomed],
    existing: &HashSet<Uuid>,
    batch: i64,
    max_batches: usize,
) -> Result<Purged, FenceError> {
    let mut purged = Purged::default();
    for one in doomed.iter().filter(|d| !existing.contains(&d.uid)) {
        for _ in 0..max_batches {
            let mut tx = pool.begin().await?;
            term.check(&mut tx).await?;
            if !identity::lock_doomed(&mut tx, one).await? {
                break;
            }
            let messages = ledger::delete_ledger(&mut tx, one.identity, batch).await?;
            let history = poll_log::delete_for(&mut tx, one.uid, batch).await?;
            let done = messages < batch.unsigned_abs() && history < batch.unsigned_abs();
            if done {
                identity::delete(&mut tx, one.identity).await?;
            }
            tx.commit().await?;
            purged.messages += messages;
            purged.history += history;
            if done {
                purged.identities += 1;
                tracing::info!(namespace = %one.namespace, uid = %one.uid, identity = %one.identity,
                    "deletion policy Delete: the ledger of a deleted MailboxPoll is purged");
                break;
            }
        }
    }
    Ok(purged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unsynced_cache_is_never_trusted() {
        assert_eq!(
            judge(false, 3, ApiView::Listed { any: true }),
            Err(Refusal::NotSynced)
        );
    }

    #[test]
    fn a_missing_crd_refuses_even_with_an_empty_cache() {
        assert_eq!(judge(true, 0, ApiView::Missing), Err(Refusal::CrdMissing));
        assert_eq!(
            judge(true, 0, ApiView::Unavailable),
            Err(Refusal::ApiUnavailable)
        );
    }

    #[test]
    fn an_empty_cache_is_trusted_only_when_the_api_agrees() {
        assert_eq!(
            judge(true, 0, ApiView::Listed { any: true }),
            Err(Refusal::CacheEmpty)
        );
        assert_eq!(judge(true, 0, ApiView::Listed { any: false }), Ok(()));
        assert_eq!(judge(true, 2, ApiView::Listed { any: true }), Ok(()));
    }
}
