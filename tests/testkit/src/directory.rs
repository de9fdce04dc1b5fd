//! A `Directory` over a fixed map, standing in for the Kubernetes-backed one in pipeline tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mailpoll::directory::{ConfigError, Directory, MailboxConfig};
use uuid::Uuid;

/// MailboxPolls by uid; clone it to share with handlers and keep changing it from the test.
#[derive(Clone, Default)]
pub struct StaticDirectory {
    entries: Arc<Mutex<HashMap<Uuid, Result<MailboxConfig, ConfigError>>>>,
}

impl StaticDirectory {
    pub fn insert(&self, config: MailboxConfig) {
        let uid = config.source.uid;
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid, Ok(config));
    }

    /// Makes lookups of `uid` fail, as a missing Secret would.
    pub fn break_with(&self, uid: Uuid, error: ConfigError) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid, Err(error));
    }

    pub fn remove(&self, uid: Uuid) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&uid);
    }
}

impl Directory for StaticDirectory {
    async fn lookup(&self, uid: Uuid) -> Result<Option<MailboxConfig>, ConfigError> {
        let entry = self
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&uid)
            .cloned();
        entry.transpose()
    }
}
