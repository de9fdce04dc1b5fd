//! `spec.startFrom` and `spec.filter` as a MailboxPoll's configuration: the start resolved
//! to an instant (`now` fixed once, in Postgres) and the filter compiled, both cached, since
//! every task resolves its MailboxPoll's configuration.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::ConfigError;
use crate::identity;
use crate::selection::{Filter, StartFrom, start::Start};

/// Filters compiled so far, by their text; bounded so that a stream of edits cannot grow it.
const MAX_CACHED_FILTERS: usize = 1024;

#[derive(Default)]
pub struct SelectionCache {
    /// `startFrom: now` instants by ledger: once fixed they never change.
    now_starts: Mutex<HashMap<Uuid, DateTime<Utc>>>,
    filters: Mutex<HashMap<String, Result<Filter, ConfigError>>>,
}

impl SelectionCache {
    /// The start of ledger `ledger_id` for the spec's `startFrom`.
    pub async fn start(
        &self,
        db: &sqlx::PgPool,
        ledger_id: Uuid,
        start_from: Option<&str>,
    ) -> Result<Start, ConfigError> {
        let parsed =
            StartFrom::parse(start_from).map_err(|error| ConfigError::InvalidStartFrom {
                detail: error.to_string(),
            })?;
        match parsed {
            StartFrom::All => Ok(Start(None)),
            StartFrom::At(at) => Ok(Start(Some(at))),
            StartFrom::Now => self
                .now_start(db, ledger_id)
                .await
                .map(|at| Start(Some(at))),
        }
    }

    async fn now_start(
        &self,
        db: &sqlx::PgPool,
        ledger_id: Uuid,
    ) -> Result<DateTime<Utc>, ConfigError> {
        if let Some(at) = self.lock_starts().get(&ledger_id) {
            return Ok(*at);
        }
        let at = identity::start_now_at(db, ledger_id)
            .await
            .map_err(|error| ConfigError::Database(error.to_string()))?
            .ok_or_else(|| {
                ConfigError::Database(format!("ledger identity {ledger_id} not found"))
            })?;
        self.lock_starts().insert(ledger_id, at);
        Ok(at)
    }

    /// The spec's filter, compiled and checked.
    pub fn filter(&self, source: Option<&str>) -> Result<Option<Filter>, ConfigError> {
        let Some(source) = source else {
            return Ok(None);
        };
        let mut filters = self.filters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(compiled) = filters.get(source) {
            return compiled.clone().map(Some);
        }
        let compiled = Filter::compile(source).map_err(|error| ConfigError::InvalidFilter {
            detail: error.to_string(),
        });
        if filters.len() >= MAX_CACHED_FILTERS {
            filters.clear();
        }
        filters.insert(source.to_owned(), compiled.clone());
        compiled.map(Some)
    }

    fn lock_starts(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, DateTime<Utc>>> {
        self.now_starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
