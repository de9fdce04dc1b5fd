//! The operator's Microsoft Graph client: tokens, delta rounds page by page, the received-time
//! fallback, post-actions, all behind the process-wide throttling governor.
//!
//! ```text
//! GraphClient (one per process: HTTP pool, token cache, governor)
//!   └─ MailboxClient (credentials + mailbox)
//!        ├─ delta_round / received_since_round → Round::next_page → Page
//!        ├─ mark_read, move_message, get_mime, post_actions (batched)
//!        └─ list_attachments, attachment_content
//! ```
//!
//! Secrets and tokens are never logged; message bodies only at trace level.

mod actions;
mod attachments;
mod auth;
mod delta;
mod error;
mod governor;
mod message;
mod subscriptions;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes_ext::read_limited;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, Url};
use serde_json::Value;

pub use actions::{MAX_BATCH, PostAction};
pub use attachments::{Attachment, AttachmentKind};
pub use auth::{
    ASSERTION_LIFETIME, Certificate, CertificateError, ClientSecret, Credentials, Proof,
};
pub use delta::{DeltaOptions, DeltaStart, ListOptions, Page, PageLink, Round};
pub use error::GraphError;
pub use governor::{
    Governor, GovernorConfig, RETRY_AFTER_CEILING, RETRY_AFTER_FLOOR, RequestBudget, SharedSlots,
    SlotAsk, SlotKey, ThrottleNotice, full_jitter,
};
pub use message::{
    Body, EmailAddress, LEDGER_FIELDS, Message, RemovedReason, SkippedItem, select_fields,
};
pub use subscriptions::{Subscription, SubscriptionRequest, is_subscription_gone};

use auth::TokenCache;
use error::FailedResponse;

/// Public-cloud authority.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// Public-cloud Graph.
pub const DEFAULT_GRAPH: &str = "https://graph.microsoft.com";

/// Hosts, timeouts and limits of the client.
#[derive(Clone, Debug)]
pub struct GraphConfig {
    /// Entra authority, e.g. `https://login.microsoftonline.us` in a national cloud.
    pub authority_url: Url,
    /// Graph root without version, e.g. `https://graph.microsoft.us`. The token scope is
    /// `{graph_url}/.default`, and links Graph returns must stay on this origin.
    pub graph_url: Url,
    pub connect_timeout: Duration,
    /// Whole-request timeout (Graph itself gives up after about 100 s).
    pub request_timeout: Duration,
    /// Refresh a token this long before it expires.
    pub token_refresh_margin: Duration,
    /// After the token endpoint refused a credential set, answer from memory this long.
    pub auth_refused_cooldown: Duration,
    /// Largest response body read; larger is a malformed response.
    pub max_response_bytes: usize,
    /// Message bodies longer than this many characters are cut (and flagged).
    pub max_body_chars: usize,
}

impl GraphConfig {
    /// Public cloud defaults.
    pub fn public_cloud() -> Result<Self, GraphError> {
        Self::with_urls(DEFAULT_AUTHORITY, DEFAULT_GRAPH)
    }

    /// Defaults with the given authority and Graph base URLs (national clouds, emulators).
    pub fn with_urls(authority_url: &str, graph_url: &str) -> Result<Self, GraphError> {
        let parse = |text: &str, what: &str| {
            let url = Url::parse(text)
                .map_err(|error| GraphError::Config(format!("{what} {text:?}: {error}")))?;
            if !matches!(url.scheme(), "https" | "http") || url.cannot_be_a_base() {
                return Err(GraphError::Config(format!(
                    "{what} {text:?} is not an http(s) URL"
                )));
            }
            Ok(url)
        };
        Ok(Self {
            authority_url: parse(authority_url, "authority URL")?,
            graph_url: parse(graph_url, "Graph URL")?,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            token_refresh_margin: Duration::from_secs(300),
            auth_refused_cooldown: Duration::from_secs(60),
            max_response_bytes: 64 * 1024 * 1024,
            max_body_chars: 1024 * 1024,
        })
    }
}

struct Inner {
    http: reqwest::Client,
    config: GraphConfig,
    governor: Arc<Governor>,
    tokens: Arc<TokenCache>,
    response_hook: std::sync::Mutex<Option<ResponseHook>>,
}

/// Told of every Graph response status (`None` when no response arrived), for metrics.
type ResponseHook = Arc<dyn Fn(Option<u16>, Duration) + Send + Sync>;

/// The process's Graph client; cheap to clone.
#[derive(Clone)]
pub struct GraphClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GraphClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphClient")
            .field("graph_url", &self.inner.config.graph_url.as_str())
            .finish_non_exhaustive()
    }
}

impl GraphClient {
    /// Builds the client. Call [`crate::install_crypto_provider`] first.
    pub fn new(config: GraphConfig, governor: Arc<Governor>) -> Result<Self, GraphError> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .user_agent(concat!("mailpoll/", env!("CARGO_PKG_VERSION")))
            // A redirect would carry the bearer token to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| GraphError::Config(format!("HTTP client: {error}")))?;
        let scope = format!(
            "{}/.default",
            config.graph_url.as_str().trim_end_matches('/')
        );
        let tokens = Arc::new(TokenCache::new(
            http.clone(),
            config.authority_url.clone(),
            scope,
            config.token_refresh_margin,
            config.auth_refused_cooldown,
        ));
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                config,
                governor,
                tokens,
                response_hook: std::sync::Mutex::new(None),
            }),
        })
    }

    pub fn governor(&self) -> &Arc<Governor> {
        &self.inner.governor
    }

    pub fn config(&self) -> &GraphConfig {
        &self.inner.config
    }

    /// Sets the function told of every response status (`None`: no response arrived) and how
    /// long the request took. It runs on the request's task: keep it quick.
    pub fn on_response(&self, hook: impl Fn(Option<u16>, Duration) + Send + Sync + 'static) {
        *self
            .inner
            .response_hook
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(hook));
    }

    fn report_response(&self, status: Option<u16>, took: Duration) {
        let hook = self
            .inner
            .response_hook
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(hook) = hook {
            hook(status, took);
        }
    }

    /// A client for one mailbox (UPN or object id) with one credential set.
    pub fn mailbox(&self, credentials: Credentials, mailbox: impl Into<String>) -> MailboxClient {
        MailboxClient {
            client: self.clone(),
            credentials: Arc::new(credentials),
            mailbox: mailbox.into(),
            requests: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// Graph calls for one mailbox with one credential set; cheap to clone.
#[derive(Clone, Debug)]
pub struct MailboxClient {
    client: GraphClient,
    credentials: Arc<Credentials>,
    mailbox: String,
    /// Graph requests sent through this client and its clones (retries included).
    requests: Arc<AtomicU64>,
}

/// One HTTP request to make, with its governor weight.
pub(crate) struct Call {
    pub method: Method,
    pub url: Url,
    pub prefer: Vec<String>,
    pub body: Option<Value>,
    /// Graph requests this call stands for (inner requests of a `$batch`).
    pub weight: u32,
}

/// A successful answer.
pub(crate) struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub request_id: Option<String>,
}

/// `Retry-After` in delta-seconds or as an HTTP-date, kept within
/// [`governor::RETRY_AFTER_FLOOR`] and [`governor::RETRY_AFTER_CEILING`]: a zero, a date in the
/// past and a number too large for any clock all give a wait that is safe to honour. `None`
/// when the value is neither (then the caller backs off on its own).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Digits too many for a u64 are a very long wait, not no wait.
        let wait = value
            .parse::<u64>()
            .map_or(governor::RETRY_AFTER_CEILING, Duration::from_secs);
        return Some(governor::clamp_retry_after(wait));
    }
    let moment = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let left = (moment.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .unwrap_or(Duration::ZERO);
    Some(governor::clamp_retry_after(left))
}

/// A transport error with its causes (connection refused, timeout, TLS), without the URL.
pub(crate) fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(|value| value.chars().take(256).collect())
}

mod bytes_ext {
    use super::GraphError;

    /// Reads a response body, refusing more than `limit` bytes.
    pub(super) async fn read_limited(
        mut response: reqwest::Response,
        limit: usize,
        request_id: &Option<String>,
    ) -> Result<Vec<u8>, GraphError> {
        let too_big = || GraphError::MalformedResponse {
            message: format!("response body over {limit} bytes"),
            request_id: request_id.clone(),
        };
        if response
            .content_length()
            .is_some_and(|length| length > limit as u64)
        {
            return Err(too_big());
        }
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > limit {
                        return Err(too_big());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                Err(error) => {
                    return Err(GraphError::Transient {
                        status: None,
                        message: format!("reading the response: {}", super::describe(error)),
                        request_id: request_id.clone(),
                    });
                }
            }
        }
    }
}

impl MailboxClient {
    pub fn mailbox(&self) -> &str {
        &self.mailbox
    }

    pub fn graph(&self) -> &GraphClient {
        &self.client
    }

    /// Graph requests (HTTP calls to Graph, retries included; token calls excluded) sent
    /// through this client and its clones, e.g. for a poll's statistics.
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// `{graph}/v1.0/users/{mailbox}/{segments...}`, each segment escaped.
    pub(crate) fn url(&self, segments: &[&str]) -> Result<Url, GraphError> {
        let mut url = self.client.inner.config.graph_url.clone();
        url.path_segments_mut()
            .map_err(|_| GraphError::Config("Graph URL cannot have a path".into()))?
            .pop_if_empty()
            .extend(["v1.0", "users", self.mailbox.as_str()])
            .extend(segments);
        Ok(url)
    }

    /// Whether a link Graph returned points at the configured Graph origin (the bearer token
    /// must not travel anywhere else).
    pub(crate) fn trusted_link(&self, link: &str) -> Result<Url, GraphError> {
        let url = Url::parse(link).map_err(|_| GraphError::MalformedResponse {
            message: "a page link is not a URL".into(),
            request_id: None,
        })?;
        if url.origin() != self.client.inner.config.graph_url.origin() {
            return Err(GraphError::MalformedResponse {
                message: format!(
                    "a page link points at {} instead of the Graph host",
                    url.origin().ascii_serialization()
                ),
                request_id: None,
            });
        }
        Ok(url)
    }

    /// Sends a call through the governor: token, 401 refresh once, retries with backoff on
    /// 429/503/504 and network errors, `Retry-After` shared with every request to the mailbox.
    pub(crate) async fn execute(&self, call: &Call) -> Result<Reply, GraphError> {
        let inner = &self.client.inner;
        let mut attempt: u32 = 0;
        let mut refreshed = false;
        loop {
            // Token first: a slow token endpoint must not hold one of the mailbox's slots.
            let token = inner.tokens.token(&self.credentials).await?;
            let answer = self.send_once(call, &token).await?;
            match self.judge(answer, attempt, refreshed) {
                Next::Done(reply) => return Ok(reply),
                Next::Fail(error) => return Err(error),
                Next::RefreshToken => {
                    // Expired early, revoked, or rotated: one fresh token, then give up.
                    inner.tokens.invalidate(&self.credentials, &token).await;
                    refreshed = true;
                }
                Next::Retry { pause } => {
                    if let Some(pause) = pause {
                        tokio::time::sleep(pause).await;
                    }
                    attempt += 1;
                }
            }
        }
    }

    /// One request under one of the mailbox's slots; the slot is given back before the body
    /// is judged. The inner error is a failure to get an answer (worth retrying); the outer
    /// one, the governor refusing a slot.
    async fn send_once(
        &self,
        call: &Call,
        token: &auth::AccessToken,
    ) -> Result<Result<Answer, String>, GraphError> {
        let inner = &self.client.inner;
        let key = SlotKey::new(
            &self.credentials.tenant_id,
            &self.credentials.client_id,
            &self.mailbox,
        );
        let permit = inner.governor.acquire_for(&key, call.weight).await?;
        let mut request = inner
            .http
            .request(call.method.clone(), call.url.clone())
            .header(reqwest::header::AUTHORIZATION, token.bearer());
        let mut prefer = vec!["IdType=\"ImmutableId\"".to_string()];
        prefer.extend(call.prefer.iter().cloned());
        if let Ok(value) = HeaderValue::from_str(&prefer.join(", ")) {
            request = request.header("Prefer", value);
        }
        if let Some(body) = &call.body {
            request = request.json(body);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let sent = std::time::Instant::now();
        let outcome = match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                let request_id = header(&headers, "request-id");
                let body =
                    read_limited(response, inner.config.max_response_bytes, &request_id).await;
                Ok(Answer {
                    status,
                    headers,
                    request_id,
                    body,
                })
            }
            Err(error) => Err(describe(error)),
        };
        drop(permit);
        self.client.report_response(
            outcome.as_ref().ok().map(|answer| answer.status),
            sent.elapsed(),
        );
        Ok(outcome)
    }

    /// What follows an answer (or a failure to get one) on attempt `attempt`.
    fn judge(&self, answer: Result<Answer, String>, attempt: u32, refreshed: bool) -> Next {
        let governor = &self.client.inner.governor;
        let retries_left = attempt < governor.config().max_retries;
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) => {
                tracing::debug!(mailbox = %self.mailbox, attempt, %error, "Graph request failed");
                if !retries_left {
                    return Next::Fail(GraphError::Transient {
                        status: None,
                        message: format!("Graph unreachable: {error}"),
                        request_id: None,
                    });
                }
                return Next::Retry {
                    pause: Some(governor.backoff(attempt)),
                };
            }
        };
        let Answer {
            status,
            headers,
            request_id,
            body,
        } = answer;
        tracing::debug!(mailbox = %self.mailbox, status, request_id = request_id.as_deref().unwrap_or(""), attempt, "Graph request");
        let body = match body {
            Ok(body) => body,
            // A connection cut while reading is worth another try; an oversized body is not.
            Err(GraphError::Transient { .. }) if retries_left => {
                return Next::Retry {
                    pause: Some(governor.backoff(attempt)),
                };
            }
            Err(error) => return Next::Fail(error),
        };
        if (200..300).contains(&status) {
            tracing::trace!(mailbox = %self.mailbox, body = %String::from_utf8_lossy(&body), "Graph response body");
            return Next::Done(Reply {
                status,
                body,
                request_id,
            });
        }
        let retry_after = header(&headers, "retry-after").and_then(|v| parse_retry_after(&v));
        let failed = FailedResponse::parse(
            status,
            &body,
            request_id,
            retry_after,
            header(&headers, "location"),
        );
        if status == 401 && !refreshed {
            return Next::RefreshToken;
        }
        self.after_refusal(failed, status, attempt)
    }

    /// What follows a non-2xx answer: give up, or retry after sharing any wait it asks for
    /// with every request to the mailbox.
    fn after_refusal(&self, failed: FailedResponse, status: u16, attempt: u32) -> Next {
        let governor = &self.client.inner.governor;
        if !failed.is_retryable() {
            return Next::Fail(failed.into_error());
        }
        match failed.retry_after {
            Some(wait) => governor.report_retry_after(&self.mailbox, wait),
            // A 429 without Retry-After still means the whole mailbox should slow down, for
            // at least the floor.
            None if status == 429 => {
                governor.report_retry_after(&self.mailbox, governor.throttle_backoff(attempt))
            }
            None => {}
        }
        if attempt >= governor.config().max_retries {
            return Next::Fail(failed.into_error());
        }
        // A Retry-After (or a 429's pause) is waited out by the governor before the next slot.
        let pause =
            (failed.retry_after.is_none() && status != 429).then(|| governor.backoff(attempt));
        Next::Retry { pause }
    }
}

/// A Graph answer, its body read (or the reason it could not be).
struct Answer {
    status: u16,
    headers: HeaderMap,
    request_id: Option<String>,
    body: Result<Vec<u8>, GraphError>,
}

/// What [`MailboxClient::execute`] does after an attempt.
enum Next {
    Done(Reply),
    Fail(GraphError),
    /// A 401: get a fresh token and try again (once).
    RefreshToken,
    /// Try again, after `pause` (besides any wait the governor imposes).
    Retry {
        pause: Option<Duration>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates_within_floor_and_ceiling() {
        use governor::{RETRY_AFTER_CEILING, RETRY_AFTER_FLOOR};
        assert_eq!(parse_retry_after("12"), Some(Duration::from_secs(12)));
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("0"), Some(RETRY_AFTER_FLOOR));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(RETRY_AFTER_FLOOR),
            "a date in the past"
        );
        let soon = chrono::Utc::now() + chrono::Duration::seconds(30);
        let wait = parse_retry_after(&soon.format("%a, %d %b %Y %H:%M:%S GMT").to_string())
            .expect("an HTTP-date");
        assert!(
            (Duration::from_secs(28)..=Duration::from_secs(30)).contains(&wait),
            "{wait:?}"
        );
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT"),
            Some(RETRY_AFTER_CEILING)
        );
        assert_eq!(
            parse_retry_after("1000000000000"),
            Some(RETRY_AFTER_CEILING)
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999999"),
            Some(RETRY_AFTER_CEILING)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-5"), None);
        assert_eq!(parse_retry_after(""), None);
    }

    #[test]
    fn urls_escape_the_mailbox_and_keep_national_cloud_paths() {
        crate::install_crypto_provider();
        let config = GraphConfig::with_urls("https://login.example", "https://graph.example/")
            .expect("config");
        let client =
            GraphClient::new(config, Governor::new(GovernorConfig::default())).expect("client");
        let credentials = Credentials::client_secret("t", "c", "s");
        let mailbox = client.mailbox(credentials, "ops@contoso.com");
        let url = mailbox
            .url(&["mailFolders", "in/box", "messages"])
            .expect("url");
        assert_eq!(
            url.as_str(),
            "https://graph.example/v1.0/users/ops@contoso.com/mailFolders/in%2Fbox/messages"
        );
        assert!(
            mailbox
                .trusted_link("https://graph.example/v1.0/x?$skiptoken=1")
                .is_ok()
        );
        assert!(mailbox.trusted_link("https://evil.example/v1.0/x").is_err());
    }
}
