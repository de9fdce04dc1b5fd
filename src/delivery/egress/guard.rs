//! The egress policy's I/O: name lookups, the resolver reqwest connects through (which sees
//! every address a webhook host resolves to, at connect time) and the client built on it.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use super::*;

/// A future of a lookup's answer.
pub type LookupFuture = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>>;

/// Name lookups, injectable so tests can make any name resolve anywhere.
pub trait Lookup: Send + Sync + 'static {
    /// The addresses of an absolute name (with its trailing dot).
    fn lookup(&self, name: &str) -> LookupFuture;
}

/// The system resolver (`getaddrinfo`, on a blocking thread).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(&self, name: &str) -> LookupFuture {
        let name = name.to_owned();
        Box::pin(async move {
            let found = tokio::net::lookup_host((name.as_str(), 0)).await?;
            Ok(found.map(|address| address.ip()).collect())
        })
    }
}

/// Why a name could not be resolved to an allowed address.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("cannot resolve {host}: {source}")]
    Lookup {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("{host} has no address")]
    NoAddress { host: String },
}

/// The policy and the lookup it applies to, shared by the webhook client's resolver and by
/// the checks made outside a delivery.
#[derive(Clone)]
pub struct EgressGuard {
    policy: Arc<EgressPolicy>,
    lookup: Arc<dyn Lookup>,
}

impl fmt::Debug for EgressGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressGuard")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Default for EgressGuard {
    fn default() -> Self {
        Self::new(EgressPolicy::default())
    }
}

impl EgressGuard {
    /// The policy over the system resolver.
    pub fn new(policy: EgressPolicy) -> Self {
        Self::with_lookup(policy, Arc::new(SystemLookup))
    }

    pub fn with_lookup(policy: EgressPolicy, lookup: Arc<dyn Lookup>) -> Self {
        Self {
            policy: Arc::new(policy),
            lookup,
        }
    }

    /// The allowed addresses of `host`.
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let addresses = match self.policy.lookup_plan(host) {
            None => LOCALHOST_ADDRESSES.to_vec(),
            Some(name) => {
                self.lookup
                    .lookup(&name)
                    .await
                    .map_err(|source| ResolveError::Lookup {
                        host: normalize_host(host),
                        source,
                    })?
            }
        };
        match self.policy.filter_addresses(host, &addresses) {
            Ok(allowed) => Ok(allowed),
            Err(Some(refusal)) => Err(refusal.into()),
            Err(None) => Err(ResolveError::NoAddress {
                host: normalize_host(host),
            }),
        }
    }

    /// Every rule on a webhook URL for a MailboxPoll in `namespace`, its name resolved too:
    /// what the reconciler reports before any delivery fails. A lookup that fails is no
    /// refusal (the delivery reports it and retries).
    pub async fn check_destination(&self, url: &str, namespace: &str) -> Result<(), Refusal> {
        let UrlHost::Name(name) = self.policy.check_url(url, namespace)? else {
            return Ok(());
        };
        match tokio::time::timeout(CHECK_LOOKUP_TIMEOUT, self.resolve(&name)).await {
            Ok(Err(ResolveError::Refused(refusal))) => Err(refusal),
            _ => Ok(()),
        }
    }

    /// An HTTP client for webhooks that connects only to addresses this guard allows, follows
    /// no redirect and uses no proxy (through a proxy the policy would check the proxy, not
    /// the receiver).
    pub fn client(&self, user_agent: &str) -> reqwest::Result<reqwest::Client> {
        // Building a client without a TLS provider panics.
        crate::install_crypto_provider();
        reqwest::Client::builder()
            .dns_resolver(Arc::new(EgressResolver {
                guard: self.clone(),
            }))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(user_agent)
            .build()
    }
}

/// reqwest's resolver for webhook connections: only allowed addresses are ever returned, so
/// the connection goes to an address the policy has seen. A refusal travels inside reqwest's
/// error as a [`Refusal`] ([`refusal_in`] finds it).
#[derive(Debug, Clone)]
pub struct EgressResolver {
    guard: EgressGuard,
}

impl reqwest::dns::Resolve for EgressResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let allowed = guard.resolve(&host).await.map_err(|error| -> BoxError {
                match error {
                    // The refusal itself, so `refusal_in` finds it in reqwest's error chain.
                    ResolveError::Refused(refusal) => Box::new(refusal),
                    other => Box::new(other),
                }
            })?;
            // Port 0: reqwest puts the URL's port in.
            let addresses: reqwest::dns::Addrs =
                Box::new(allowed.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addresses)
        })
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The refusal behind an error of the webhook client, if its resolver refused.
pub fn refusal_in(error: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(refusal) = error.downcast_ref::<Refusal>() {
            return Some(refusal.clone());
        }
        current = error.source();
    }
    None
}

/// The webhook HTTP client together with the guard its resolver enforces, so the check before
/// sending and the check at connect time always apply the same policy.
#[derive(Debug, Clone)]
pub struct GuardedClient {
    http: reqwest::Client,
    guard: EgressGuard,
}

impl GuardedClient {
    pub fn new(guard: EgressGuard, user_agent: &str) -> reqwest::Result<Self> {
        Ok(Self {
            http: guard.client(user_agent)?,
            guard,
        })
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The rules that depend on the MailboxPoll, checked before sending.
    pub fn check(&self, url: &str, namespace: &str) -> Result<(), Refusal> {
        self.guard.policy.check_url(url, namespace).map(|_| ())
    }
}
