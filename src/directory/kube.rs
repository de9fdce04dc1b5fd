//! The Kubernetes-backed [`Directory`]: MailboxPolls from a watch cache (every replica keeps
//! one), their Secrets read on demand through a short-lived cache.
//!
//! Secret values only ever live in [`Credentials`] and [`SigningKey`], whose `Debug` output
//! is redacted; errors name Secrets and keys, never values.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{ConfigError, Directory, MailboxConfig};
use crate::cursor::Source;
use crate::delivery::webhook::{Endpoint, SigningKey};
use crate::graph::{ClientSecret, Credentials};
use crate::identity;
use crate::resource::{MailboxPoll, parse_duration};

/// Which namespaces the operator watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Namespaces(Vec<String>),
}

impl Scope {
    /// From a comma-separated list; empty means all namespaces.
    pub fn parse(list: &str) -> Self {
        let mut namespaces: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        namespaces.sort();
        namespaces.dedup();
        if namespaces.is_empty() {
            Self::All
        } else {
            Self::Namespaces(namespaces)
        }
    }

    /// One API per watch: all namespaces, or each listed one.
    pub fn apis<K>(&self, client: &kube::Client) -> Vec<(Option<String>, Api<K>)>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match self {
            Self::All => vec![(None, Api::all(client.clone()))],
            Self::Namespaces(list) => list
                .iter()
                .map(|ns| (Some(ns.clone()), Api::namespaced(client.clone(), ns)))
                .collect(),
        }
    }

    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            Self::All => true,
            Self::Namespaces(list) => list.iter().any(|n| n == namespace),
        }
    }
}

/// Seconds after which the API server ends a watch (it is then resumed from its last
/// resourceVersion): shorter than the client's read timeout, so a quiet watch ends cleanly
/// rather than by a timeout.
pub const WATCH_TIMEOUT_SECONDS: u32 = 25;

/// The settings of every MailboxPoll watch.
pub fn watch_config() -> watcher::Config {
    watcher::Config::default().timeout(WATCH_TIMEOUT_SECONDS)
}

/// Watch caches of MailboxPolls, one per watched scope.
#[derive(Clone)]
pub struct MailboxPolls {
    stores: Vec<Store<MailboxPoll>>,
    /// Per store: whether its watch has listed every object once. Kept apart from
    /// `Store::wait_until_ready`, whose waiters share one wake-up slot: with two waiting at
    /// once (readiness and a worker's lookup), one of them was never woken and the replica
    /// stayed unready for good.
    synced: Vec<watch::Receiver<bool>>,
}

impl MailboxPolls {
    /// Starts the watches; they run until `stop`.
    pub fn start(client: &kube::Client, scope: &Scope, stop: CancellationToken) -> Self {
        let mut stores = Vec::new();
        let mut synced = Vec::new();
        for (namespace, api) in scope.apis::<MailboxPoll>(client) {
            let (reader, writer) = reflector::store();
            let (listed, synced_rx) = watch::channel(false);
            let stream = watcher(api, watch_config())
                .default_backoff()
                .reflect(writer);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream.take_until(stop.cancelled_owned()));
                while let Some(item) = stream.next().await {
                    match item {
                        Ok(watcher::Event::InitDone) => {
                            listed.send_replace(true);
                        }
                        Ok(_) => {}
                        Err(error) => {
                            tracing::warn!(namespace = namespace.as_deref().unwrap_or("*"), %error, "MailboxPoll watch error; retrying");
                        }
                    }
                }
            });
            stores.push(reader);
            synced.push(synced_rx);
        }
        Self { stores, synced }
    }

    /// Whether every watch has listed its objects once.
    pub async fn wait_synced(&self) {
        for synced in &self.synced {
            // An error means the watch task ended (shutdown); nothing left to wait for.
            let _ = synced.clone().wait_for(|listed| *listed).await;
        }
    }

    pub fn find(&self, uid: Uuid) -> Option<Arc<MailboxPoll>> {
        let uid = uid.to_string();
        self.stores
            .iter()
            .find_map(|store| store.find(|o| o.metadata.uid.as_deref() == Some(uid.as_str())))
    }

    /// Uids of every MailboxPoll in the caches.
    pub fn uids(&self) -> Vec<Uuid> {
        self.stores
            .iter()
            .flat_map(|store| store.state())
            .filter_map(|o| {
                o.metadata
                    .uid
                    .as_deref()
                    .and_then(|u| Uuid::parse_str(u).ok())
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.stores.iter().map(Store::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Settings of the directory.
#[derive(Debug, Clone)]
pub struct DirectorySettings {
    /// How long a Secret read (or its absence) is reused.
    pub secret_ttl: Duration,
    /// How long a lookup waits for a MailboxPoll the cache does not know yet (it may have
    /// been created a moment ago) before answering that it does not exist.
    pub miss_grace: Duration,
    /// How long a lookup waits for the watch cache's first list before failing (the task is
    /// retried).
    pub sync_timeout: Duration,
}

impl Default for DirectorySettings {
    fn default() -> Self {
        Self {
            secret_ttl: Duration::from_secs(5),
            miss_grace: Duration::from_secs(3),
            sync_timeout: Duration::from_secs(30),
        }
    }
}

type SecretData = Option<BTreeMap<String, ByteString>>;

/// Secret data by (namespace, name), with the time it was read.
type SecretCache = HashMap<(String, String), (Instant, Arc<SecretData>)>;

/// Ledger identities by (object uid, mailbox, folder), with the time they were read.
type IdentityCache = HashMap<(Uuid, String, String), (Instant, Uuid)>;

/// How long a ledger identity is reused before it is read again (`mailpoll ledger forget`
/// takes effect within this).
const IDENTITY_TTL: Duration = Duration::from_secs(60);

/// See the module documentation.
pub struct KubeDirectory {
    client: kube::Client,
    db: sqlx::PgPool,
    polls: MailboxPolls,
    settings: DirectorySettings,
    secrets: Mutex<SecretCache>,
    identities: Mutex<IdentityCache>,
}

impl KubeDirectory {
    pub fn new(
        client: kube::Client,
        db: sqlx::PgPool,
        polls: MailboxPolls,
        settings: DirectorySettings,
    ) -> Self {
        Self {
            client,
            db,
            polls,
            settings,
            secrets: Mutex::new(HashMap::new()),
            identities: Mutex::new(HashMap::new()),
        }
    }

    /// The ledger identity of a MailboxPoll's source, cached for [`IDENTITY_TTL`].
    async fn ledger_id(&self, source: &Source) -> Result<Uuid, ConfigError> {
        let key = (
            source.uid,
            source.mailbox.to_lowercase(),
            source.folder.clone(),
        );
        if let Some((at, id)) = self
            .identities
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            && at.elapsed() < IDENTITY_TTL
        {
            return Ok(*id);
        }
        let owner = identity::Owner {
            namespace: &source.namespace,
            name: &source.name,
            mailbox: &source.mailbox,
            folder: &source.folder,
        };
        let id = identity::resolve(&self.db, &owner, source.uid)
            .await
            .map_err(|error| ConfigError::Database(error.to_string()))?;
        self.identities
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, (Instant::now(), id));
        Ok(id)
    }

    pub fn polls(&self) -> &MailboxPolls {
        &self.polls
    }

    /// A Secret's data (`None`: the Secret does not exist), cached for the TTL.
    async fn secret(&self, namespace: &str, name: &str) -> Result<Arc<SecretData>, ConfigError> {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some((at, data)) = self
            .secrets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            && at.elapsed() < self.settings.secret_ttl
        {
            return Ok(data.clone());
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = api.get_opt(name).await.map_err(|error| {
            ConfigError::Unavailable(format!("reading Secret {namespace}/{name}: {error}"))
        })?;
        let data = Arc::new(secret.map(|s| s.data.unwrap_or_default()));
        self.secrets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, (Instant::now(), data.clone()));
        Ok(data)
    }

    async fn secret_value(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Vec<u8>, ConfigError> {
        let data = self.secret(namespace, name).await?;
        let Some(data) = data.as_ref() else {
            return Err(ConfigError::SecretNotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            });
        };
        data.get(key)
            .map(|value| value.0.clone())
            .ok_or_else(|| ConfigError::SecretKeyMissing {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                key: key.to_owned(),
            })
    }

    async fn secret_text(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<String, ConfigError> {
        let bytes = self.secret_value(namespace, name, key).await?;
        // Values pasted with `echo` end in a newline; ids and client secrets never do.
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::SecretKeyMissing {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            key: format!("{key} (its value is not UTF-8 text)"),
        })?;
        let text = text.trim();
        if text.is_empty() {
            return Err(ConfigError::SecretKeyMissing {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                key: format!("{key} (its value is empty)"),
            });
        }
        Ok(text.to_owned())
    }

    /// The source a MailboxPoll reads.
    fn source_of(poll: &MailboxPoll) -> Result<Source, ConfigError> {
        let uid = poll
            .metadata
            .uid
            .as_deref()
            .and_then(|u| Uuid::parse_str(u).ok())
            .ok_or_else(|| ConfigError::Unavailable("the MailboxPoll has no uid".into()))?;
        Ok(Source {
            uid,
            namespace: poll.namespace().unwrap_or_default(),
            name: poll.name_any(),
            mailbox: poll.spec.mailbox.clone(),
            folder: poll.spec.folder.clone(),
        })
    }

    /// The ledger identity of a MailboxPoll, whatever the state of its Secrets.
    pub async fn ledger_id_of(&self, poll: &MailboxPoll) -> Result<Uuid, ConfigError> {
        self.ledger_id(&Self::source_of(poll)?).await
    }

    /// The full configuration of a MailboxPoll, Secrets included.
    pub async fn resolve(&self, poll: &MailboxPoll) -> Result<MailboxConfig, ConfigError> {
        let source = Self::source_of(poll)?;
        let spec = &poll.spec;
        let creds = &spec.credentials_secret_ref;
        let namespace = source.namespace.as_str();
        let credentials = Credentials {
            tenant_id: self
                .secret_text(namespace, &creds.name, &creds.tenant_id_key)
                .await?,
            client_id: self
                .secret_text(namespace, &creds.name, &creds.client_id_key)
                .await?,
            client_secret: ClientSecret::new(
                self.secret_text(namespace, &creds.name, &creds.client_secret_key)
                    .await?,
            ),
        };
        let delivery = spec.delivery.clone().unwrap_or_default();
        let webhook = self.webhook(namespace, delivery.webhook.as_ref()).await?;
        let after = spec.after_delivery.clone().unwrap_or_default();
        Ok(MailboxConfig {
            ledger_id: self.ledger_id(&source).await?,
            source,
            credentials,
            webhook,
            include_body: delivery.include_body,
            mark_as_read: after.mark_as_read,
            move_to_folder: after.move_to_folder,
            max_attempts: spec.max_attempts,
        })
    }

    /// The webhook endpoint, its signing key read from its Secret.
    async fn webhook(
        &self,
        namespace: &str,
        hook: Option<&crate::resource::Webhook>,
    ) -> Result<Option<Endpoint>, ConfigError> {
        let Some(hook) = hook else {
            return Ok(None);
        };
        let signing_key = match &hook.signing_secret_ref {
            None => None,
            Some(reference) => Some(SigningKey::new(
                self.secret_value(namespace, &reference.name, &reference.key)
                    .await?,
            )),
        };
        Ok(Some(Endpoint {
            url: hook.url.clone(),
            timeout: parse_duration(&hook.timeout).unwrap_or(Duration::from_secs(10)),
            signing_key,
        }))
    }
}

impl Directory for KubeDirectory {
    async fn lookup(&self, uid: Uuid) -> Result<Option<MailboxConfig>, ConfigError> {
        // Before the first list a miss would look like a deletion.
        tokio::time::timeout(self.settings.sync_timeout, self.polls.wait_synced())
            .await
            .map_err(|_| {
                ConfigError::Unavailable("the MailboxPoll watch has not listed yet".into())
            })?;
        let deadline = Instant::now() + self.settings.miss_grace;
        let poll = loop {
            if let Some(poll) = self.polls.find(uid) {
                break poll;
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.resolve(&poll).await.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_lists_are_trimmed_and_deduplicated() {
        assert_eq!(Scope::parse(""), Scope::All);
        assert_eq!(Scope::parse(" , "), Scope::All);
        assert_eq!(
            Scope::parse("b, a,b"),
            Scope::Namespaces(vec!["a".into(), "b".into()])
        );
        assert!(Scope::parse("a").contains("a"));
        assert!(!Scope::parse("a").contains("b"));
        assert!(Scope::All.contains("anything"));
    }
}
