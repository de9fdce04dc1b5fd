//! Client-credentials tokens, cached per credential set. A token is refreshed a margin before
//! it expires and when Graph refuses it (once per request). A credential set the token
//! endpoint refused is not tried again before a cool-down, so a wrong secret shared by many
//! mailboxes costs one call, not a storm. A `Retry-After` of the token endpoint (429, 5xx)
//! is waited out before the next try, and after a fetch gave up no caller with the same
//! credentials asks again before it has run out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;
use tokio::time::Instant;

use super::error::GraphError;
use super::governor::full_jitter;
use crate::storable;

/// A client secret. Debug and Display never show it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ClientSecret(String);

impl ClientSecret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }
    /// The secret itself, for the token request only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSecret([redacted])")
    }
}

impl std::fmt::Display for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// An app registration's credentials (client secret flavour).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Credentials {
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: ClientSecret,
}

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
}

#[derive(Default)]
struct Slot {
    token: Option<Cached>,
    /// Until when callers get this error without a token request: refused credentials (the
    /// cool-down), or an endpoint that asked to wait (its `Retry-After`).
    refused: Option<(Instant, GraphError)>,
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
    #[serde(default)]
    correlation_id: Option<String>,
}

use serde_json::Value;

/// Attempts at the token endpoint on network errors, 429 and 5xx, per token fetch.
const TOKEN_ATTEMPTS: u32 = 3;

/// Longest `Retry-After` of the token endpoint a fetch sleeps through before its next try;
/// a longer one ends the fetch (callers are answered from memory until it runs out).
const TOKEN_RETRY_AFTER_MAX: Duration = Duration::from_secs(10);

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

pub(crate) struct TokenCache {
    http: reqwest::Client,
    authority: Url,
    scope: String,
    margin: Duration,
    refused_cooldown: Duration,
    slots: Mutex<HashMap<Credentials, Arc<tokio::sync::Mutex<Slot>>>>,
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
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, credentials: &Credentials) -> Arc<tokio::sync::Mutex<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(credentials.clone())
            .or_default()
            .clone()
    }

    /// A valid token; one fetch at a time per credential set.
    pub(crate) async fn token(&self, credentials: &Credentials) -> Result<AccessToken, GraphError> {
        let slot = self.slot(credentials);
        let mut slot = slot.lock().await;
        let now = Instant::now();
        if let Some(cached) = &slot.token
            && cached.refresh_at > now
        {
            return Ok(cached.token.clone());
        }
        if let Some((until, error)) = &slot.refused
            && *until > now
        {
            return Err(error.clone());
        }
        match self.fetch(credentials).await {
            Ok((token, lifetime)) => {
                slot.refused = None;
                slot.token = Some(Cached {
                    token: token.clone(),
                    refresh_at: Instant::now() + refresh_after(lifetime, self.margin),
                });
                Ok(token)
            }
            Err(FetchError { error, retry_after }) => {
                if matches!(error, GraphError::AuthenticationFailed { .. }) {
                    slot.token = None;
                    slot.refused = Some((Instant::now() + self.refused_cooldown, error.clone()));
                } else if let Some(wait) = retry_after {
                    slot.refused = Some((Instant::now() + wait, error.clone()));
                }
                Err(error)
            }
        }
    }

    /// Drops `token` if it is still the cached one (Graph refused it).
    pub(crate) async fn invalidate(&self, credentials: &Credentials, token: &AccessToken) {
        let slot = self.slot(credentials);
        let mut slot = slot.lock().await;
        if slot
            .token
            .as_ref()
            .is_some_and(|cached| &cached.token == token)
        {
            slot.token = None;
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

    async fn fetch(
        &self,
        credentials: &Credentials,
    ) -> Result<(AccessToken, Duration), FetchError> {
        let url = self.endpoint(&credentials.tenant_id)?;
        let form = [
            ("client_id", credentials.client_id.as_str()),
            ("client_secret", credentials.client_secret.expose()),
            ("scope", self.scope.as_str()),
            ("grant_type", "client_credentials"),
        ];
        let mut attempt = 0;
        loop {
            let outcome = self.http.post(url.clone()).form(&form).send().await;
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
/// trace ids and timestamps), made storable: it ends up in poll errors and conditions.
fn refused(credentials: &Credentials, status: u16, body: &[u8]) -> GraphError {
    let refusal: TokenErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let description = storable::text(
        refusal.error_description.lines().next().unwrap_or_default(),
        400,
    );
    let code = storable::text(&refusal.error, 128);
    tracing::warn!(
        tenant = %credentials.tenant_id,
        client_id = %credentials.client_id,
        status,
        error = %code,
        "token endpoint refused the credentials"
    );
    GraphError::AuthenticationFailed {
        message: format!("token endpoint answered {status} {code}: {description}"),
        request_id: refusal.correlation_id.map(|id| storable::owned(id, 128)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_tokens_never_print() {
        let credentials = Credentials {
            tenant_id: "t".into(),
            client_id: "c".into(),
            client_secret: ClientSecret::new("hunter2"),
        };
        assert!(!format!("{credentials:?}").contains("hunter2"));
        assert!(!credentials.client_secret.to_string().contains("hunter2"));
        assert!(!format!("{:?}", AccessToken("tok-123".into())).contains("tok-123"));
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
