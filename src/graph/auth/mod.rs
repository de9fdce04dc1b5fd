//! Client-credentials tokens, cached per credential set, for each kind of proof (client
//! secret, certificate assertion, federated service account token).
//!
//! A token is refreshed a margin before it expires and when Graph refuses it (once per
//! request). While a cached token is still valid, its refresh runs in the background and
//! callers keep using it, also when the refresh fails: an outage or a slow token endpoint
//! costs no poll. Failed fetches back off (a `Retry-After` of the endpoint is honoured, else
//! exponentially) and callers meanwhile get the last error from memory, so a failing endpoint
//! sees a bounded number of requests. A credential set the endpoint refused is not tried again
//! before a cool-down, so a wrong secret shared by many mailboxes costs one call, not a storm.
//! A rotated Secret is a new credential set with tokens of its own; the old set's token is
//! never used again and is dropped once idle.

mod assertion;
mod credentials;
pub(crate) mod hint;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use super::error::GraphError;
use super::governor::full_jitter;
use crate::storable;
pub use assertion::ASSERTION_LIFETIME;
use assertion::{Claims, ClientAssertion};
pub use credentials::{Certificate, CertificateError, ClientSecret, Credentials, Proof};

/// A bearer token. Debug never shows it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct AccessToken(String);

impl AccessToken {
    pub(crate) fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken([redacted])")
    }
}

struct Cached {
    token: AccessToken,
    refresh_at: Instant,
    /// After this the token is not offered any more (a little before Entra's expiry, so a
    /// request sent at the last moment still carries a live token).
    expires_at: Instant,
}

/// What a credential set's cache knows. Every decision takes `now`, so it is tested without
/// a clock or a network.
#[derive(Default)]
struct SlotState {
    token: Option<Cached>,
    /// No token request before this instant; callers without a valid token get the error.
    /// Set by a refusal (the cool-down), a `Retry-After`, or the backoff after a failed fetch.
    blocked: Option<(Instant, GraphError)>,
    /// Fetches that failed in a row, for the backoff between fetches.
    failures: u32,
}

/// What a caller does next.
enum Plan {
    Use(AccessToken),
    Fail(GraphError),
    /// Fetch a token; `valid` is the cached one still worth sending meanwhile.
    Fetch {
        valid: Option<AccessToken>,
    },
}

/// Backoff between failed fetches without a `Retry-After`: doubling from the base...
const FETCH_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// ...up to this.
const FETCH_BACKOFF_CAP: Duration = Duration::from_secs(60);
/// The shortest pause between two fetches of a credential set after a failure.
const FETCH_BACKOFF_MIN: Duration = Duration::from_millis(500);

impl SlotState {
    fn valid_token(&self, now: Instant) -> Option<AccessToken> {
        self.token
            .as_ref()
            .filter(|cached| cached.expires_at > now)
            .map(|cached| cached.token.clone())
    }

    fn plan(&self, now: Instant) -> Plan {
        if let Some(cached) = &self.token
            && cached.refresh_at > now
        {
            return Plan::Use(cached.token.clone());
        }
        let valid = self.valid_token(now);
        if let Some((until, error)) = &self.blocked
            && *until > now
        {
            return match valid {
                Some(token) => Plan::Use(token),
                None => Plan::Fail(error.clone()),
            };
        }
        Plan::Fetch { valid }
    }

    fn fetched(&mut self, token: AccessToken, lifetime: Duration, margin: Duration, now: Instant) {
        self.token = Some(Cached {
            token,
            refresh_at: now + refresh_after(lifetime, margin),
            expires_at: now + usable_for(lifetime),
        });
        self.blocked = None;
        self.failures = 0;
    }

    /// Records a failed fetch; returns how long no fetch is made.
    fn failed(
        &mut self,
        error: GraphError,
        retry_after: Option<Duration>,
        refused_cooldown: Duration,
        now: Instant,
    ) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let token_left = self
            .token
            .as_ref()
            .map(|cached| cached.expires_at.saturating_duration_since(now))
            .filter(|left| !left.is_zero());
        let wait = if matches!(error, GraphError::AuthenticationFailed { .. }) {
            refused_cooldown.max(retry_after.unwrap_or_default())
        } else {
            fetch_backoff(self.failures, retry_after, token_left)
        };
        self.blocked = Some((now + wait, error));
        wait
    }
}

/// The pause after the `failures`-th failed fetch in a row. A `Retry-After` is honoured as
/// given; otherwise the wait doubles, but with a token still valid the next try comes while
/// at least half of its remaining life is left, so a recovered endpoint is asked in time.
pub(crate) fn fetch_backoff(
    failures: u32,
    retry_after: Option<Duration>,
    token_left: Option<Duration>,
) -> Duration {
    if let Some(wait) = retry_after {
        return wait.max(FETCH_BACKOFF_MIN);
    }
    let doubled = FETCH_BACKOFF_BASE
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(FETCH_BACKOFF_CAP);
    match token_left {
        Some(left) => doubled.min(left / 2),
        None => doubled,
    }
    .max(FETCH_BACKOFF_MIN)
}

/// How long a token for `lifetime` is offered: up to 30 s less, for clock skew and requests in
/// flight, but never under nine tenths of it.
pub(crate) fn usable_for(lifetime: Duration) -> Duration {
    lifetime.saturating_sub(Duration::from_secs(30).min(lifetime / 10))
}

/// A credential set's cache entry: its state, and one fetch at a time.
struct Slot {
    state: Mutex<SlotState>,
    fetching: Arc<tokio::sync::Mutex<()>>,
    last_used: Mutex<Instant>,
}

impl Slot {
    fn new(now: Instant) -> Self {
        Self {
            state: Mutex::new(SlotState::default()),
            fetching: Arc::new(tokio::sync::Mutex::new(())),
            last_used: Mutex::new(now),
        }
    }
    fn state(&self) -> MutexGuard<'_, SlotState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    fn touch(&self, now: Instant) {
        *self
            .last_used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = now;
    }
    fn idle_since(&self) -> Instant {
        *self
            .last_used
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<Value>,
}

#[derive(Deserialize, Default)]
struct TokenErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
    /// Numbers, but read leniently: a body of another shape must still give its description.
    #[serde(default)]
    error_codes: Value,
    #[serde(default)]
    correlation_id: Option<String>,
}

/// Attempts at the token endpoint on network errors, 429 and 5xx, per token fetch.
const TOKEN_ATTEMPTS: u32 = 3;

/// Longest `Retry-After` of the token endpoint a fetch sleeps through before its next try;
/// a longer one ends the fetch (callers are answered from memory until it runs out).
const TOKEN_RETRY_AFTER_MAX: Duration = Duration::from_secs(10);

/// One token request may take this long; Entra answers in well under a second.
const TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A credential set unused this long loses its cache entry (and its token).
const IDLE_SLOT: Duration = Duration::from_secs(15 * 60);

/// `client_assertion_type` of certificate and federated credentials.
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A failed token fetch, and how long the endpoint asked not to be called.
struct FetchError {
    error: GraphError,
    retry_after: Option<Duration>,
}

impl From<GraphError> for FetchError {
    fn from(error: GraphError) -> Self {
        Self {
            error,
            retry_after: None,
        }
    }
}

/// The slots, and when idle ones were last pruned.
struct Slots {
    by_credentials: HashMap<Credentials, Arc<Slot>>,
    pruned_at: Instant,
}

pub(crate) struct TokenCache {
    http: reqwest::Client,
    authority: Url,
    scope: String,
    margin: Duration,
    refused_cooldown: Duration,
    slots: Mutex<Slots>,
}

/// When to refresh a token valid for `lifetime`: `margin` before expiry, but never in the
/// first half of its life (short-lived tokens would otherwise be refreshed on every call).
pub(crate) fn refresh_after(lifetime: Duration, margin: Duration) -> Duration {
    lifetime.saturating_sub(margin).max(lifetime / 2)
}

impl TokenCache {
    pub(crate) fn new(
        http: reqwest::Client,
        authority: Url,
        scope: String,
        margin: Duration,
        refused_cooldown: Duration,
    ) -> Self {
        Self {
            http,
            authority,
            scope,
            margin,
            refused_cooldown,
            slots: Mutex::new(Slots {
                by_credentials: HashMap::new(),
                pruned_at: Instant::now(),
            }),
        }
    }

    fn slot(&self, credentials: &Credentials) -> Arc<Slot> {
        let now = Instant::now();
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now.saturating_duration_since(slots.pruned_at) >= IDLE_SLOT / 4 {
            // Rotated or deleted credentials are never asked for again: forget their tokens.
            slots
                .by_credentials
                .retain(|_, slot| now.saturating_duration_since(slot.idle_since()) < IDLE_SLOT);
            slots.pruned_at = now;
        }
        let slot = slots
            .by_credentials
            .entry(credentials.clone())
            .or_insert_with(|| Arc::new(Slot::new(now)))
            .clone();
        slot.touch(now);
        slot
    }

    /// Credential sets with a cache entry (tests check that rotated ones go).
    #[cfg(test)]
    fn slot_count(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .by_credentials
            .len()
    }

    /// A valid token. One fetch at a time per credential set; while a cached token is still
    /// valid, nobody waits for its refresh.
    pub(crate) async fn token(
        self: &Arc<Self>,
        credentials: &Credentials,
    ) -> Result<AccessToken, GraphError> {
        let slot = self.slot(credentials);
        let plan = slot.state().plan(Instant::now());
        match plan {
            Plan::Use(token) => Ok(token),
            Plan::Fail(error) => Err(error),
            Plan::Fetch { valid: Some(token) } => {
                if let Ok(guard) = slot.fetching.clone().try_lock_owned() {
                    let cache = self.clone();
                    let credentials = credentials.clone();
                    tokio::spawn(async move {
                        let _guard = guard;
                        let _ = cache.refresh(&credentials, &slot).await;
                    });
                }
                Ok(token)
            }
            Plan::Fetch { valid: None } => {
                let _guard = slot.fetching.clone().lock_owned().await;
                self.refresh(credentials, &slot).await
            }
        }
    }

    /// Fetches a token unless another fetch made that unnecessary meanwhile. Call with the
    /// slot's fetch lock held.
    async fn refresh(
        &self,
        credentials: &Credentials,
        slot: &Slot,
    ) -> Result<AccessToken, GraphError> {
        match slot.state().plan(Instant::now()) {
            Plan::Use(token) => return Ok(token),
            Plan::Fail(error) => return Err(error),
            Plan::Fetch { .. } => {}
        }
        match self.fetch(credentials).await {
            Ok((token, lifetime)) => {
                slot.state()
                    .fetched(token.clone(), lifetime, self.margin, Instant::now());
                Ok(token)
            }
            Err(FetchError { error, retry_after }) => {
                let now = Instant::now();
                let mut state = slot.state();
                let wait = state.failed(error.clone(), retry_after, self.refused_cooldown, now);
                let valid = state.valid_token(now);
                drop(state);
                tracing::warn!(
                    tenant = %credentials.tenant_id,
                    client_id = %credentials.client_id,
                    kind = credentials.kind(),
                    next_try_in_seconds = wait.as_secs_f64(),
                    cached_token_still_valid = valid.is_some(),
                    %error,
                    "token request failed"
                );
                valid.ok_or(error)
            }
        }
    }

    /// Drops `token` if it is still the cached one (Graph refused it).
    pub(crate) async fn invalidate(&self, credentials: &Credentials, token: &AccessToken) {
        let slot = self.slot(credentials);
        let mut state = slot.state();
        if state
            .token
            .as_ref()
            .is_some_and(|cached| &cached.token == token)
        {
            state.token = None;
        }
    }

    fn endpoint(&self, tenant: &str) -> Result<Url, GraphError> {
        let mut url = self.authority.clone();
        url.path_segments_mut()
            .map_err(|_| GraphError::Config("authority URL cannot have a path".into()))?
            .pop_if_empty()
            .push(tenant)
            .extend(["oauth2", "v2.0", "token"]);
        Ok(url)
    }

    /// The form fields that prove the client's identity. An assertion is made (or read) per
    /// fetch: certificate assertions are short-lived, and the kubelet rotates the federated
    /// token file.
    async fn proof_fields(
        credentials: &Credentials,
        endpoint: &Url,
    ) -> Result<Vec<(&'static str, String)>, GraphError> {
        let assertion = match &credentials.proof {
            Proof::Secret(secret) => {
                return Ok(vec![("client_secret", secret.expose().to_owned())]);
            }
            Proof::Certificate(certificate) => {
                let claims = Claims {
                    client_id: &credentials.client_id,
                    audience: endpoint.as_str(),
                    now: unix_now(),
                    jti: uuid::Uuid::new_v4().to_string(),
                };
                assertion::sign(certificate, &claims).map_err(|error| {
                    GraphError::AuthenticationFailed {
                        message: format!("cannot sign the client assertion: {error}"),
                        request_id: None,
                    }
                })?
            }
            Proof::FederatedTokenFile(path) => read_federated_token(path).await?,
        };
        Ok(vec![
            ("client_assertion_type", JWT_BEARER.to_owned()),
            ("client_assertion", assertion.expose().to_owned()),
        ])
    }

    async fn fetch(
        &self,
        credentials: &Credentials,
    ) -> Result<(AccessToken, Duration), FetchError> {
        let url = self.endpoint(&credentials.tenant_id)?;
        let mut form = vec![
            ("client_id", credentials.client_id.clone()),
            ("scope", self.scope.clone()),
            ("grant_type", "client_credentials".to_owned()),
        ];
        form.extend(Self::proof_fields(credentials, &url).await?);
        let mut attempt = 0;
        loop {
            let outcome = self
                .http
                .post(url.clone())
                .timeout(TOKEN_REQUEST_TIMEOUT)
                .form(&form)
                .send()
                .await;
            let mut retry_after = None;
            let transient = match outcome {
                Ok(response) => {
                    let status = response.status().as_u16();
                    retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|value| value.to_str().ok())
                        .and_then(super::parse_retry_after);
                    let body = response
                        .bytes()
                        .await
                        .map_err(|error| GraphError::Transient {
                            status: Some(status),
                            message: format!("reading the token response: {error}"),
                            request_id: None,
                        })?;
                    if (200..300).contains(&status) {
                        return Ok(parse_token(&body)?);
                    }
                    if status == 400 || status == 401 || status == 403 {
                        return Err(refused(credentials, status, &body).into());
                    }
                    GraphError::Transient {
                        status: Some(status),
                        message: "token endpoint failed".into(),
                        request_id: None,
                    }
                }
                Err(error) => GraphError::Transient {
                    status: None,
                    message: format!("token endpoint unreachable: {}", super::describe(error)),
                    request_id: None,
                },
            };
            attempt += 1;
            if attempt >= TOKEN_ATTEMPTS
                || retry_after.is_some_and(|wait| wait > TOKEN_RETRY_AFTER_MAX)
            {
                return Err(FetchError {
                    error: transient,
                    retry_after,
                });
            }
            tokio::time::sleep(retry_after.unwrap_or_else(|| {
                full_jitter(Duration::from_millis(200), Duration::from_secs(5), attempt)
            }))
            .await;
        }
    }
}

/// The projected service account token, read afresh (the kubelet replaces it before it
/// expires). A file that cannot be read is a configuration error of the pod.
async fn read_federated_token(path: &std::path::Path) -> Result<ClientAssertion, GraphError> {
    let unusable = |what: String| GraphError::AuthenticationFailed {
        message: format!(
            "the workload identity token file {} {what} (to fix: label the operator's pods azure.workload.identity/use: \"true\" and annotate its service account with azure.workload.identity/client-id, or mount a projected service account token with audience api://AzureADTokenExchange and set AZURE_FEDERATED_TOKEN_FILE)",
            path.display()
        ),
        request_id: None,
    };
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|error| unusable(format!("cannot be read: {}", error.kind())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(unusable("is empty".into()));
    }
    Ok(ClientAssertion::new(token.to_owned()))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

fn parse_token(body: &[u8]) -> Result<(AccessToken, Duration), GraphError> {
    let malformed = |message: &str| GraphError::MalformedResponse {
        message: format!("token response: {message}"),
        request_id: None,
    };
    let response: TokenResponse =
        serde_json::from_slice(body).map_err(|_| malformed("not the expected JSON"))?;
    if response.access_token.is_empty() {
        return Err(malformed("empty access_token"));
    }
    // Entra sends a number; some proxies and older endpoints send a string.
    let seconds = match &response.expires_in {
        Some(Value::Number(number)) => number.as_u64(),
        Some(Value::String(text)) => text.parse().ok(),
        _ => None,
    }
    .unwrap_or(3599);
    Ok((
        AccessToken(response.access_token),
        Duration::from_secs(seconds.max(1)),
    ))
}

/// The error of a token request the endpoint refused (400/401/403): a configuration error,
/// with the AADSTS description's first line (it names the code and the cause; the rest is
/// trace ids and timestamps) and what to do about it, made storable: it ends up in poll
/// errors and conditions.
fn refused(credentials: &Credentials, status: u16, body: &[u8]) -> GraphError {
    let refusal: TokenErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let first_line = refusal.error_description.lines().next().unwrap_or_default();
    let description = storable::text(first_line, 400);
    let code = storable::text(&refusal.error, 128);
    let codes: Vec<u64> = refusal
        .error_codes
        .as_array()
        .map(|codes| codes.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    let remedy = hint::code_of(&codes, first_line)
        .and_then(hint::aadsts)
        .map(|hint| format!(" (to fix: {hint})"))
        .unwrap_or_default();
    GraphError::AuthenticationFailed {
        message: format!(
            "the token endpoint refused the {} credentials ({status} {code}): {description}{remedy}",
            credentials.kind()
        ),
        request_id: refusal.correlation_id.map(|id| storable::owned(id, 128)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_credential_sets_lose_their_entry() {
        crate::install_crypto_provider();
        let cache = TokenCache::new(
            reqwest::Client::new(),
            Url::parse("http://127.0.0.1:9").expect("url"),
            "https://graph.example/.default".into(),
            Duration::from_secs(300),
            Duration::from_secs(60),
        );
        let old = Credentials::client_secret("t", "c", "old");
        let new = Credentials::client_secret("t", "c", "new");
        cache.slot(&old);
        tokio::time::advance(IDLE_SLOT / 2).await;
        cache.slot(&new);
        assert_eq!(cache.slot_count(), 2, "both used within the idle time");
        tokio::time::advance(IDLE_SLOT / 2 + Duration::from_secs(1)).await;
        cache.slot(&new);
        assert_eq!(cache.slot_count(), 1, "the rotated-away set is gone");
    }

    #[test]
    fn tokens_never_print() {
        assert!(!format!("{:?}", AccessToken("tok-123".into())).contains("tok-123"));
    }

    fn token(text: &str) -> AccessToken {
        AccessToken(text.into())
    }

    fn transient() -> GraphError {
        GraphError::Transient {
            status: Some(503),
            message: "down".into(),
            request_id: None,
        }
    }

    #[test]
    fn a_valid_token_is_used_while_its_refresh_fails() {
        let start = Instant::now();
        let lifetime = Duration::from_secs(3600);
        let mut state = SlotState::default();
        state.fetched(token("a"), lifetime, Duration::from_secs(300), start);
        assert!(matches!(state.plan(start), Plan::Use(_)));
        let due = start + Duration::from_secs(3300);
        assert!(matches!(state.plan(due), Plan::Fetch { valid: Some(_) }));
        let wait = state.failed(transient(), None, Duration::from_secs(60), due);
        assert_eq!(wait, Duration::from_secs(1));
        // Blocked: the cached token answers, no fetch.
        assert!(matches!(
            state.plan(due + Duration::from_millis(500)),
            Plan::Use(_)
        ));
        // Once expired (30 s before Entra's expiry), the stored error answers.
        let expired = start + Duration::from_secs(3571);
        state.failed(transient(), None, Duration::from_secs(60), expired);
        assert!(matches!(
            state.plan(expired),
            Plan::Fail(GraphError::Transient { .. })
        ));
        state.fetched(token("b"), lifetime, Duration::from_secs(300), expired);
        assert_eq!(state.failures, 0);
        assert!(state.blocked.is_none());
    }

    #[test]
    fn a_refusal_keeps_the_valid_token_and_cools_down() {
        let start = Instant::now();
        let mut state = SlotState::default();
        state.fetched(
            token("a"),
            Duration::from_secs(3600),
            Duration::from_secs(300),
            start,
        );
        let due = start + Duration::from_secs(3400);
        let refusal = GraphError::AuthenticationFailed {
            message: "AADSTS7000222".into(),
            request_id: None,
        };
        let wait = state.failed(refusal, None, Duration::from_secs(60), due);
        assert_eq!(wait, Duration::from_secs(60));
        assert!(matches!(
            state.plan(due + Duration::from_secs(59)),
            Plan::Use(_)
        ));
        assert!(matches!(
            state.plan(due + Duration::from_secs(61)),
            Plan::Fetch { valid: Some(_) }
        ));
    }

    #[test]
    fn fetch_backoff_doubles_honours_retry_after_and_leaves_time_to_recover() {
        let secs = Duration::from_secs;
        assert_eq!(fetch_backoff(1, None, None), secs(1));
        assert_eq!(fetch_backoff(3, None, None), secs(4));
        assert_eq!(fetch_backoff(30, None, None), secs(60));
        assert_eq!(fetch_backoff(1, Some(secs(120)), Some(secs(10))), secs(120));
        assert_eq!(
            fetch_backoff(1, Some(Duration::ZERO), None),
            FETCH_BACKOFF_MIN
        );
        assert_eq!(fetch_backoff(10, None, Some(secs(20))), secs(10));
        assert_eq!(fetch_backoff(10, None, Some(secs(0))), FETCH_BACKOFF_MIN);
        assert_eq!(usable_for(secs(3599)), secs(3569));
        assert_eq!(usable_for(secs(10)), secs(9));
    }

    #[test]
    fn refusals_name_the_kind_and_say_what_to_do() {
        let body = serde_json::json!({
            "error": "invalid_client",
            "error_description": "AADSTS7000222: The provided client secret keys for app 'x' are expired.\r\nTrace ID: 1",
            "error_codes": [7000222],
            "correlation_id": "c-1"
        });
        let credentials = Credentials::client_secret("t", "c", "s");
        let error = refused(&credentials, 401, body.to_string().as_bytes());
        let text = error.to_string();
        assert!(
            text.contains("client secret credentials (401 invalid_client)"),
            "{text}"
        );
        assert!(
            text.contains("AADSTS7000222") && text.contains("has expired"),
            "{text}"
        );
        assert!(!text.contains("Trace ID"), "{text}");
        assert_eq!(error.request_id(), Some("c-1"));
        // A code only in the description, and a body of another shape.
        let text = refused(&credentials, 400, br#"{"error":"unauthorized_client","error_description":"AADSTS700016: Application not found","error_codes":"x"}"#).to_string();
        assert!(text.contains("Application (client) ID"), "{text}");
        let text = refused(&credentials, 400, b"<html>").to_string();
        assert!(text.contains("(400 )"), "{text}");
    }

    #[test]
    fn refresh_comes_a_margin_early_but_not_in_the_first_half() {
        let margin = Duration::from_secs(300);
        assert_eq!(
            refresh_after(Duration::from_secs(3599), margin),
            Duration::from_secs(3299)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(4), margin),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn token_responses_are_read_leniently() {
        let (_, lifetime) =
            parse_token(br#"{"token_type":"Bearer","expires_in":"120","access_token":"x"}"#)
                .expect("string expires_in");
        assert_eq!(lifetime, Duration::from_secs(120));
        assert!(parse_token(b"{").is_err());
        assert!(parse_token(br#"{"access_token":""}"#).is_err());
    }
}
