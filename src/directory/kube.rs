//! The Kubernetes-backed [`Directory`]: MailboxPolls from a watch cache (every replica keeps
//! one), their Secrets read on demand through a short-lived cache.
//!
//! Secret values only ever live in [`Credentials`], [`SigningSecret`], [`WebhookUrl`] and
//! [`ExtraHeaders`], whose `Debug` output is redacted; errors name Secrets and keys, never
//! values.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use tokio::time::Instant;
use uuid::Uuid;

use super::{ConfigError, Directory, MailboxConfig};
use crate::cursor::Source;
use crate::delivery::content::ContentOptions;
use crate::delivery::endpoint::{Endpoint, ExtraHeaders, WebhookUrl};
use crate::delivery::signing::SigningSecret;
use crate::graph::{Certificate, Credentials, Proof};
use crate::identity;
use crate::resource::{CertificateCredentials, MailboxPoll, WorkloadIdentity, parse_duration};

/// Which namespaces the operator watches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Scope {
    #[default]
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

pub use super::cache::{MailboxPolls, WATCH_TIMEOUT_SECONDS, watch_config};

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
    /// The operator pod's workload identity, for MailboxPolls with `spec.workloadIdentity`.
    pub workload_identity: WorkloadIdentityEnv,
}

impl Default for DirectorySettings {
    fn default() -> Self {
        Self {
            secret_ttl: Duration::from_secs(5),
            miss_grace: Duration::from_secs(3),
            sync_timeout: Duration::from_secs(30),
            workload_identity: WorkloadIdentityEnv::default(),
        }
    }
}

/// The operator pod's Azure workload identity, as the workload identity webhook (or the
/// chart's projected token volume) sets it: `AZURE_FEDERATED_TOKEN_FILE`, `AZURE_CLIENT_ID`,
/// `AZURE_TENANT_ID`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadIdentityEnv {
    /// The projected service account token; `None`: the pod has no workload identity.
    pub token_file: Option<PathBuf>,
    /// Default client id of MailboxPolls that name none.
    pub client_id: Option<String>,
    /// Default tenant id of MailboxPolls that name none.
    pub tenant_id: Option<String>,
    /// Namespaces whose MailboxPolls may use the operator's identity (every watched one when
    /// `All`). Anyone who may create a MailboxPoll there acts with the app's mail permissions.
    pub namespaces: Scope,
}

impl WorkloadIdentityEnv {
    /// The credentials of a MailboxPoll in `namespace` that asks for `wanted`.
    pub fn credentials(
        &self,
        namespace: &str,
        wanted: &WorkloadIdentity,
    ) -> Result<Credentials, ConfigError> {
        let unusable = |detail: String| ConfigError::InvalidCredentials {
            field: "spec.workloadIdentity".into(),
            detail,
        };
        let Some(token_file) = &self.token_file else {
            return Err(unusable("the operator has no workload identity (AZURE_FEDERATED_TOKEN_FILE is unset): install the chart with workloadIdentity.enabled=true".into()));
        };
        if !self.namespaces.contains(namespace) {
            return Err(unusable(format!(
                "the operator's workload identity may not be used in namespace {namespace} (chart value workloadIdentity.namespaces)"
            )));
        }
        let pick = |spec: &Option<String>, default: &Option<String>, what: &str| {
            spec.clone()
                .or_else(|| default.clone())
                .filter(|value| !value.trim().is_empty())
                .ok_or_else(|| unusable(format!("no {what}: set spec.workloadIdentity.{what}, or AZURE_{} on the operator (chart value workloadIdentity.{what})", if what == "clientId" { "CLIENT_ID" } else { "TENANT_ID" })))
        };
        Ok(Credentials {
            client_id: pick(&wanted.client_id, &self.client_id, "clientId")?,
            tenant_id: pick(&wanted.tenant_id, &self.tenant_id, "tenantId")?,
            proof: Proof::FederatedTokenFile(token_file.clone()),
        })
    }
}

type SecretData = Option<BTreeMap<String, ByteString>>;

/// Parsed certificate credentials by a digest of their PEM texts, so a task does not parse
/// and check the key again. Bounded: cleared when it grows past [`MAX_CERTIFICATES`].
type CertificateCache = HashMap<[u8; 32], Arc<Certificate>>;

const MAX_CERTIFICATES: usize = 256;

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
    certificates: Mutex<CertificateCache>,
    selections: super::selection::SelectionCache,
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
            certificates: Mutex::new(HashMap::new()),
            selections: Default::default(),
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
        let secret = api.get_opt(name).await.map_err(|error| match error {
            kube::Error::Api(status) if status.code == 403 => ConfigError::SecretForbidden {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
            error => {
                ConfigError::Unavailable(format!("reading Secret {namespace}/{name}: {error}"))
            }
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
        let namespace = source.namespace.as_str();
        let credentials = self.credentials(namespace, spec).await?;
        let delivery = spec.delivery.clone().unwrap_or_default();
        let webhook = self.webhook(namespace, delivery.webhook.as_ref()).await?;
        let after = spec.after_delivery.clone().unwrap_or_default();
        let filter = self.selections.filter(spec.filter.as_deref())?;
        let ledger_id = self.ledger_id(&source).await?;
        let start = self
            .selections
            .start(&self.db, ledger_id, spec.start_from.as_deref())
            .await?;
        Ok(MailboxConfig {
            ledger_id,
            source,
            credentials,
            webhook,
            include_body: delivery.include_body,
            mark_as_read: after.mark_as_read,
            move_to_folder: after.move_to_folder,
            max_attempts: spec.max_attempts,
            start,
            filter,
            max_concurrent_deliveries: delivery.max_concurrent,
        })
    }

    /// The app credentials of the kind the spec names (the schema lets exactly one through).
    async fn credentials(
        &self,
        namespace: &str,
        spec: &crate::resource::MailboxPollSpec,
    ) -> Result<Credentials, ConfigError> {
        if let Some(wanted) = &spec.workload_identity {
            return self
                .settings
                .workload_identity
                .credentials(namespace, wanted);
        }
        if let Some(certificate) = &spec.certificate {
            return self.certificate_credentials(namespace, certificate).await;
        }
        let Some(creds) = &spec.credentials_secret_ref else {
            return Err(ConfigError::InvalidCredentials {
                field: "spec".into(),
                detail: "no credentials: set spec.credentialsSecretRef, spec.certificate or spec.workloadIdentity".into(),
            });
        };
        Ok(Credentials::client_secret(
            self.secret_text(namespace, &creds.name, &creds.tenant_id_key)
                .await?,
            self.secret_text(namespace, &creds.name, &creds.client_id_key)
                .await?,
            self.secret_text(namespace, &creds.name, &creds.client_secret_key)
                .await?,
        ))
    }

    /// Certificate credentials: ids from the spec or the Secret, the pair from the Secret.
    async fn certificate_credentials(
        &self,
        namespace: &str,
        spec: &CertificateCredentials,
    ) -> Result<Credentials, ConfigError> {
        let reference = &spec.secret_ref;
        let tenant_id = match &spec.tenant_id {
            Some(id) => id.clone(),
            None => {
                self.secret_text(namespace, &reference.name, &reference.tenant_id_key)
                    .await?
            }
        };
        let client_id = match &spec.client_id {
            Some(id) => id.clone(),
            None => {
                self.secret_text(namespace, &reference.name, &reference.client_id_key)
                    .await?
            }
        };
        let pem = self
            .secret_value(namespace, &reference.name, &reference.certificate_key)
            .await?;
        let key = self
            .secret_value(namespace, &reference.name, &reference.private_key_key)
            .await?;
        let certificate =
            self.certificate(&pem, &key)
                .map_err(|error| ConfigError::InvalidCredentials {
                    field: format!(
                        "Secret {namespace}/{} keys {} and {}",
                        reference.name, reference.certificate_key, reference.private_key_key
                    ),
                    detail: error.to_string(),
                })?;
        Ok(Credentials {
            tenant_id,
            client_id,
            proof: Proof::Certificate(certificate),
        })
    }

    /// A parsed and checked certificate pair, from the cache when these texts were seen.
    fn certificate(
        &self,
        pem: &[u8],
        key: &[u8],
    ) -> Result<Arc<Certificate>, crate::graph::CertificateError> {
        use sha2::{Digest, Sha256};
        let mut digest = Sha256::new();
        digest.update((pem.len() as u64).to_be_bytes());
        digest.update(pem);
        digest.update(key);
        let digest: [u8; 32] = digest.finalize().into();
        let mut cache = self
            .certificates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(known) = cache.get(&digest) {
            return Ok(known.clone());
        }
        let parsed = Arc::new(Certificate::from_pem(pem, key)?);
        if cache.len() >= MAX_CERTIFICATES {
            cache.clear();
        }
        cache.insert(digest, parsed.clone());
        Ok(parsed)
    }

    /// The webhook endpoint: its URL, extra headers and signing secret, the ones that come
    /// from Secrets read and checked here so a bad value is a condition, not a failed POST.
    async fn webhook(
        &self,
        namespace: &str,
        hook: Option<&crate::resource::Webhook>,
    ) -> Result<Option<Endpoint>, ConfigError> {
        let Some(hook) = hook else {
            return Ok(None);
        };
        let url = match (&hook.url, &hook.url_secret_ref) {
            (Some(url), _) => {
                WebhookUrl::parse(url).map_err(|error| ConfigError::InvalidWebhook {
                    field: "spec.delivery.webhook.url".into(),
                    detail: error.to_string(),
                })?
            }
            (None, Some(reference)) => {
                let value = self
                    .secret_value(namespace, &reference.name, &reference.key)
                    .await?;
                WebhookUrl::from_secret_value(&value).map_err(|error| {
                    invalid_secret_value(namespace, &reference.name, &reference.key, error)
                })?
            }
            (None, None) => {
                return Err(ConfigError::InvalidWebhook {
                    field: "spec.delivery.webhook".into(),
                    detail: "needs url or urlSecretRef".into(),
                });
            }
        };
        let headers = match &hook.headers_secret_ref {
            None => ExtraHeaders::default(),
            Some(reference) => self.extra_headers(namespace, &reference.name).await?,
        };
        let signing_secret = match &hook.signing_secret_ref {
            None => None,
            Some(reference) => {
                let value = self
                    .secret_value(namespace, &reference.name, &reference.key)
                    .await?;
                Some(SigningSecret::parse(&value).map_err(|error| {
                    invalid_secret_value(namespace, &reference.name, &reference.key, error)
                })?)
            }
        };
        Ok(Some(Endpoint {
            url,
            timeout: parse_duration(&hook.timeout).unwrap_or(Endpoint::DEFAULT_TIMEOUT),
            signing_secret,
            headers,
            content: ContentOptions {
                format: hook.format,
                attachments: hook.attachments,
                // The schema bounds them to 1..=50 MiB; a value it let through anyway is
                // read as the smallest limit rather than none.
                max_attachment_bytes: u64::try_from(hook.max_attachment_bytes).unwrap_or(1),
                max_message_bytes: u64::try_from(hook.max_message_bytes).unwrap_or(1),
            },
        }))
    }

    /// Every key of a Secret as a request header.
    async fn extra_headers(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<ExtraHeaders, ConfigError> {
        let data = self.secret(namespace, name).await?;
        let Some(data) = data.as_ref() else {
            return Err(ConfigError::SecretNotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            });
        };
        ExtraHeaders::from_secret_data(
            data.iter()
                .map(|(key, value)| (key.as_str(), value.0.as_slice())),
        )
        .map_err(|error| ConfigError::InvalidWebhook {
            field: format!("Secret {namespace}/{name}"),
            detail: error.to_string(),
        })
    }
}

/// A Secret value the webhook cannot use; the error says why, never what the value is.
fn invalid_secret_value(
    namespace: &str,
    name: &str,
    key: &str,
    error: impl std::fmt::Display,
) -> ConfigError {
    ConfigError::InvalidWebhook {
        field: format!("Secret {namespace}/{name} key {key:?}"),
        detail: error.to_string(),
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

    fn wanted(client_id: Option<&str>) -> WorkloadIdentity {
        WorkloadIdentity {
            client_id: client_id.map(str::to_owned),
            tenant_id: None,
        }
    }

    #[test]
    fn workload_identity_takes_ids_from_the_spec_or_the_pod_and_obeys_the_namespaces() {
        let pod = WorkloadIdentityEnv {
            token_file: Some("/var/run/secrets/azure/tokens/azure-identity-token".into()),
            client_id: Some("pod-client".into()),
            tenant_id: Some("pod-tenant".into()),
            namespaces: Scope::parse("mail"),
        };
        let from_pod = pod.credentials("mail", &wanted(None)).expect("usable");
        assert_eq!(
            (from_pod.client_id.as_str(), from_pod.tenant_id.as_str()),
            ("pod-client", "pod-tenant")
        );
        assert_eq!(from_pod.kind(), "workload identity");
        let own = pod
            .credentials("mail", &wanted(Some("other-app")))
            .expect("usable");
        assert_eq!(own.client_id, "other-app");
        let elsewhere = pod
            .credentials("team-b", &wanted(None))
            .expect_err("not allowed");
        assert_eq!(elsewhere.reason().as_str(), "InvalidCredentials");
        assert!(elsewhere.to_string().contains("team-b"), "{elsewhere}");
        let none = WorkloadIdentityEnv::default()
            .credentials("mail", &wanted(None))
            .expect_err("no token file");
        assert!(
            none.to_string().contains("workloadIdentity.enabled"),
            "{none}"
        );
        let no_client = WorkloadIdentityEnv {
            client_id: None,
            ..pod
        }
        .credentials("mail", &wanted(None))
        .expect_err("no client id");
        assert!(
            no_client.to_string().contains("AZURE_CLIENT_ID"),
            "{no_client}"
        );
    }

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
