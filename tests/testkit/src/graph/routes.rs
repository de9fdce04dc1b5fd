//! The HTTP face of the emulator: the token endpoint, the mail endpoints and `$batch`. Every
//! mail request, inner batch requests included, goes through one admission path (counters,
//! concurrency cap, auth, mailbox state, budget, injected faults) before the world answers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures::StreamExt;
use futures::future::BoxFuture;
use percent_encoding::percent_decode_str;
use rand::RngExt;
use rand::seq::SliceRandom;
use serde_json::{Value, json};

use super::Shared;
use super::attachments::{self, AttachmentAnswer, AttachmentRequest};
use super::faults::{
    Arrival, BatchFaults, CONTROL_CHARS, Faults, MalformedKind, RetryAfterFormat, ThrottleRecord,
};
use super::query::{parse_delta_filter, parse_filter, parse_orderby, parse_select, parse_top};
use super::state::{ApiError, DeltaBehaviour, DeltaQuery, ListQuery, ProofCheck};

/// Largest `$batch`, as Graph allows.
const MAX_BATCH: usize = 20;
/// Inner requests of one batch run at most this many at a time, as Outlook does.
const BATCH_PARALLELISM: usize = 4;
/// Delta page size when the client sends no `odata.maxpagesize`.
const DEFAULT_DELTA_PAGE: usize = 10;
/// List page size without `$top`.
const DEFAULT_LIST_PAGE: usize = 10;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token))
        .merge(super::subscriptions::routes())
        .fallback(graph)
        .with_state(shared)
}

// ---------------------------------------------------------------------------- token endpoint

async fn token(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Response {
    let faults = shared.faults();
    if faults.token_endpoint.delay_ms > 0 {
        // A slow authority: every answer waits, good or bad.
        tokio::time::sleep(Duration::from_millis(faults.token_endpoint.delay_ms)).await;
    }
    let trace_id = {
        let mut traffic = shared.traffic();
        traffic.counters.token_requests += 1;
        uuid::Uuid::from_u128(traffic.rng.random::<u128>()).to_string()
    };
    if shared.take_token_failure() {
        shared.traffic().counters.token_faults += 1;
        return token_fault(&faults, &trace_id);
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let lifetime = Duration::from_secs(faults.token_lifetime_secs.max(1));
    let proof = ProofCheck {
        endpoint: format!("{}/{tenant}/oauth2/v2.0/token", shared.base_url),
        unix_now: chrono::Utc::now().timestamp().try_into().unwrap_or(0),
        wrong_certificate: faults.token_endpoint.wrong_certificate,
    };
    let outcome = shared
        .world()
        .issue_token(&form, &tenant, lifetime, Instant::now(), &proof);
    match outcome {
        Ok((access_token, grant)) => {
            {
                let mut traffic = shared.traffic();
                traffic.counters.tokens_issued += 1;
                traffic.counters.assertion_ids.extend(grant.assertion_id);
                *traffic
                    .counters
                    .tokens_by_credential
                    .entry(grant.credential)
                    .or_default() += 1;
            }
            let seconds = lifetime.as_secs();
            axum::Json(json!({
                "token_type": "Bearer",
                "expires_in": seconds,
                "ext_expires_in": seconds,
                "access_token": access_token,
            }))
            .into_response()
        }
        Err(error) => token_error(
            StatusCode::BAD_REQUEST,
            error.error,
            error.code,
            &error.description,
            &trace_id,
            &faults,
        ),
    }
}

/// An injected token endpoint failure: Entra's throttling (429) or an outage (5xx).
fn token_fault(faults: &Faults, trace_id: &str) -> Response {
    let settings = &faults.token_endpoint;
    let status = StatusCode::from_u16(settings.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let (code, description) = if status == StatusCode::TOO_MANY_REQUESTS {
        (
            90055,
            "AADSTS90055: TenantThrottlingError - There are too many incoming requests.",
        )
    } else {
        (
            90033,
            "AADSTS90033: A transient error has occurred. Please try again.",
        )
    };
    let mut response = token_error(
        status,
        "temporarily_unavailable",
        code,
        description,
        trace_id,
        faults,
    );
    let format = if status == StatusCode::TOO_MANY_REQUESTS {
        faults.retry_after_format
    } else {
        RetryAfterFormat::Seconds
    };
    let header = settings
        .retry_after_secs
        .and_then(|seconds| format.header(seconds, chrono::Utc::now()))
        .and_then(|value| HeaderValue::from_str(&value).ok());
    if let Some(value) = header {
        response.headers_mut().insert("retry-after", value);
    }
    response
}

/// An OAuth error body as Entra writes it.
fn token_error(
    status: StatusCode,
    error: &str,
    code: u32,
    description: &str,
    trace_id: &str,
    faults: &Faults,
) -> Response {
    let description = format!(
        "{description}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {trace_id}\r\nTimestamp: {}",
        graph_date()
    );
    (
        status,
        axum::Json(json!({
            "error": error,
            "error_description": error_text(&description, faults),
            "error_codes": [code],
            "timestamp": graph_date(),
            "trace_id": trace_id,
            "correlation_id": trace_id,
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        })),
    )
        .into_response()
}

/// An error text, with control characters appended when the switch asks for them.
fn error_text(text: &str, faults: &Faults) -> String {
    if faults.control_chars_in_errors {
        format!("{text}{CONTROL_CHARS}")
    } else {
        text.to_string()
    }
}

fn graph_date() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S").to_string()
}

// ---------------------------------------------------------------------------- requests

/// A mail request, from HTTP or from inside a `$batch`.
#[derive(Clone, Debug)]
pub struct GraphRequest {
    pub method: Method,
    /// Path without the `/v1.0` prefix, e.g. `/users/a@b/mailFolders/inbox/messages`.
    pub path: String,
    pub query: String,
    pub headers: HashMap<String, String>,
    pub body: Bytes,
}

/// The emulator's answer, before it becomes HTTP or a `$batch` entry.
#[derive(Clone, Debug)]
pub struct GraphResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: GraphBody,
    /// The wait the response tells the client, whatever form its `Retry-After` takes (0
    /// for a 429 without one), for the throttle records.
    pub wait: Option<u64>,
}

#[derive(Clone, Debug)]
pub enum GraphBody {
    Json(Value),
    /// A JSON document already serialized (delta pages, assembled from cached items).
    JsonText(String),
    Text(String, &'static str),
    /// Deliberately broken bytes served as JSON.
    Raw(String),
    /// Bytes of any kind (an attachment's raw content) and their content type.
    Binary(Vec<u8>, String),
}

impl GraphResponse {
    fn json(status: u16, value: Value) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: GraphBody::Json(value),
            wait: None,
        }
    }

    fn error(error: &ApiError, request_id: &str, faults: &Faults) -> Self {
        let mut response = Self::json(
            error.status,
            json!({"error": {
                "code": error.code,
                "message": error_text(&error.message, faults),
                "innerError": {"date": graph_date(), "request-id": request_id, "client-request-id": request_id},
            }}),
        );
        if let Some(location) = &error.location {
            response.headers.push(("Location".into(), location.clone()));
        }
        if let Some(seconds) = error.retry_after {
            response.set_retry_after(seconds, faults.retry_after_format);
        }
        response
    }

    /// Writes `Retry-After`: on a 429 in the form the switch says, otherwise in seconds.
    fn set_retry_after(&mut self, seconds: u64, format: RetryAfterFormat) {
        let format = if self.status == 429 {
            format
        } else {
            RetryAfterFormat::Seconds
        };
        self.wait = Some(format.advertised(seconds));
        if let Some(value) = format.header(seconds, chrono::Utc::now()) {
            self.headers.push(("Retry-After".into(), value));
        }
    }
}

/// Which endpoint a path names.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    List {
        user: String,
        folder: String,
    },
    Delta {
        user: String,
        folder: String,
    },
    Message {
        user: String,
        id: String,
    },
    Value {
        user: String,
        id: String,
    },
    Move {
        user: String,
        id: String,
    },
    Attachments {
        user: String,
        id: String,
        request: AttachmentRequest,
    },
}

impl Route {
    fn user(&self) -> &str {
        match self {
            Route::List { user, .. }
            | Route::Delta { user, .. }
            | Route::Message { user, .. }
            | Route::Value { user, .. }
            | Route::Move { user, .. }
            | Route::Attachments { user, .. } => user,
        }
    }

    fn endpoint(&self, method: &Method) -> &'static str {
        match self {
            Route::List { .. } => "list",
            Route::Delta { .. } => "delta",
            Route::Message { .. } if method == Method::PATCH => "patch",
            Route::Message { .. } => "get",
            Route::Value { .. } => "value",
            Route::Move { .. } => "move",
            Route::Attachments { request, .. } => request.endpoint(),
        }
    }
}

/// `users('x')` and `users/x` both name a user; segments are percent-decoded.
fn parse_route(path: &str) -> Option<Route> {
    let path = path.strip_prefix("/v1.0").unwrap_or(path);
    let mut segments: Vec<String> = Vec::new();
    for raw in path.split('/').filter(|segment| !segment.is_empty()) {
        let decoded = percent_decode_str(raw).decode_utf8().ok()?.into_owned();
        // `users('a@b')` and `mailFolders('inbox')` carry the key in parentheses.
        if let Some((name, key)) = decoded.split_once("('")
            && let Some(key) = key.strip_suffix("')")
        {
            segments.push(name.to_string());
            segments.push(key.to_string());
        } else {
            segments.push(decoded);
        }
    }
    let parts: Vec<&str> = segments.iter().map(String::as_str).collect();
    let (user, rest) = match parts.as_slice() {
        ["users", user, rest @ ..] => (user.to_string(), rest),
        _ => return None,
    };
    let (id, tail) = match rest {
        ["mailFolders", folder, "messages"] => {
            return Some(Route::List {
                user,
                folder: folder.to_string(),
            });
        }
        ["mailFolders", folder, "messages", "delta"] => {
            return Some(Route::Delta {
                user,
                folder: folder.to_string(),
            });
        }
        ["mailFolders", _, "messages", id, tail @ ..] | ["messages", id, tail @ ..] => (*id, tail),
        _ => return None,
    };
    let id = id.to_string();
    match tail {
        [] => Some(Route::Message { user, id }),
        ["$value"] => Some(Route::Value { user, id }),
        ["move"] => Some(Route::Move { user, id }),
        tail => {
            AttachmentRequest::parse(tail).map(|request| Route::Attachments { user, id, request })
        }
    }
}

/// `Prefer` values, from one or several headers, lower-cased names.
struct Preferences {
    immutable_ids: bool,
    max_page_size: Option<usize>,
}

fn preferences(headers: &HashMap<String, String>) -> Preferences {
    let mut prefs = Preferences {
        immutable_ids: false,
        max_page_size: None,
    };
    if let Some(prefer) = headers.get("prefer") {
        for part in prefer.split(',').map(str::trim) {
            let (name, value) = part.split_once('=').unwrap_or((part, ""));
            let value = value.trim().trim_matches('"');
            if name.trim().eq_ignore_ascii_case("IdType") {
                prefs.immutable_ids = value.eq_ignore_ascii_case("ImmutableId");
            } else if name.trim().eq_ignore_ascii_case("odata.maxpagesize") {
                prefs.max_page_size = value.parse().ok().filter(|&size: &usize| size > 0);
            }
        }
    }
    prefs
}

async fn graph(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, 64 * 1024 * 1024).await {
        Ok(body) => body,
        Err(_) => return StatusCode::PAYLOAD_TOO_LARGE.into_response(),
    };
    let headers = header_map(&parts.headers);
    let path = parts.uri.path();
    if path == "/v1.0/$batch" || path == "/v1.0/%24batch" {
        return into_http(batch(shared, headers, body).await);
    }
    if path.starts_with("/_admin/") && shared.admin_api {
        return super::admin::handle(&shared, &parts.method, path, &body);
    }
    let request = GraphRequest {
        method: parts.method,
        path: path.strip_prefix("/v1.0").unwrap_or(path).to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        headers,
        body,
    };
    into_http(dispatch(shared, request).await)
}

fn header_map(headers: &HeaderMap) -> HashMap<String, String> {
    let mut map: HashMap<String, String> = HashMap::new();
    for (name, value) in headers {
        let Ok(value) = value.to_str() else { continue };
        map.entry(name.as_str().to_ascii_lowercase())
            .and_modify(|existing| {
                existing.push_str(", ");
                existing.push_str(value);
            })
            .or_insert_with(|| value.to_string());
    }
    map
}

const JSON_CONTENT_TYPE: &str = "application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false; charset=utf-8";

fn into_http(response: GraphResponse) -> Response {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let (content_type, body) = match response.body {
        GraphBody::Json(value) => (JSON_CONTENT_TYPE, Body::from(value.to_string())),
        GraphBody::JsonText(text) => (JSON_CONTENT_TYPE, Body::from(text)),
        GraphBody::Text(text, content_type) => (content_type, Body::from(text)),
        GraphBody::Raw(text) => ("application/json; charset=utf-8", Body::from(text)),
        GraphBody::Binary(bytes, content_type) => {
            let mut http = Response::new(Body::from(bytes));
            if let Ok(value) = HeaderValue::from_str(&content_type) {
                http.headers_mut().insert("content-type", value);
            }
            return with_status_and_headers(http, status, response.headers);
        }
    };
    let mut http = Response::new(body);
    http.headers_mut()
        .insert("content-type", HeaderValue::from_static(content_type));
    with_status_and_headers(http, status, response.headers)
}

fn with_status_and_headers(
    mut http: Response,
    status: StatusCode,
    headers: Vec<(String, String)>,
) -> Response {
    *http.status_mut() = status;
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            http.headers_mut().append(name, value);
        }
    }
    http
}

/// Releases the in-flight slot of a mailbox when the request is answered.
struct InFlight {
    shared: Arc<Shared>,
    mailbox: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut traffic = self.shared.traffic();
        if let Some(count) = traffic.in_flight.get_mut(&self.mailbox) {
            *count = count.saturating_sub(1);
        }
    }
}

/// One mail request through admission and the world.
pub fn dispatch(shared: Arc<Shared>, request: GraphRequest) -> BoxFuture<'static, GraphResponse> {
    Box::pin(async move {
        let faults = shared.faults();
        let request_id = {
            let mut traffic = shared.traffic();
            uuid::Uuid::from_u128(traffic.rng.random::<u128>()).to_string()
        };
        let mut response = match parse_route(&request.path) {
            None => GraphResponse::error(
                &ApiError::new(
                    400,
                    "BadRequest",
                    format!("Resource not found for the segment '{}'.", request.path),
                ),
                &request_id,
                &faults,
            ),
            Some(route) => admit_and_answer(&shared, &request, &route, &request_id, &faults).await,
        };
        response
            .headers
            .push(("request-id".into(), request_id.clone()));
        if let Some(client_id) = request.headers.get("client-request-id") {
            response
                .headers
                .push(("client-request-id".into(), client_id.clone()));
        }
        response
    })
}

async fn admit_and_answer(
    shared: &Arc<Shared>,
    request: &GraphRequest,
    route: &Route,
    request_id: &str,
    faults: &Faults,
) -> GraphResponse {
    let mailbox_key = route.user().to_ascii_lowercase();
    let endpoint = route.endpoint(&request.method);

    // Arrival: counted before anything can refuse it, as Graph counts usage.
    let (in_flight, at) = {
        let mut traffic = shared.traffic();
        let at = traffic.started.elapsed();
        let count = traffic.in_flight.entry(mailbox_key.clone()).or_insert(0);
        *count += 1;
        let in_flight = *count;
        traffic.counters.arrivals.push(Arrival {
            mailbox: mailbox_key.clone(),
            at,
        });
        let counters = traffic
            .counters
            .mailboxes
            .entry(mailbox_key.clone())
            .or_default();
        counters.requests += 1;
        *counters.by_endpoint.entry(endpoint.into()).or_insert(0) += 1;
        counters.peak_concurrency = counters.peak_concurrency.max(in_flight);
        (in_flight, at)
    };
    let _slot = InFlight {
        shared: shared.clone(),
        mailbox: mailbox_key.clone(),
    };

    let response = match admit(shared, request, route, faults, in_flight).await {
        Ok(()) => answer(shared, request, route, faults)
            .await
            .unwrap_or_else(|error| GraphResponse::error(&error, request_id, faults)),
        Err(error) => GraphResponse::error(&error, request_id, faults),
    };

    let mut traffic = shared.traffic();
    if let Some(retry_after) = response.wait {
        // Only a wait the client was really told holds the mailbox (not 0, none or huge).
        let hold = response.status == 429 && faults.retry_after_format.holds();
        if let Some(until) = Instant::now().checked_add(Duration::from_secs(retry_after))
            && hold
        {
            let held = traffic
                .throttled_until
                .entry(mailbox_key.clone())
                .or_insert(until);
            *held = (*held).max(until);
        }
        traffic.counters.throttles.push(ThrottleRecord {
            mailbox: mailbox_key.clone(),
            at,
            status: response.status,
            retry_after_secs: retry_after,
        });
    }
    let counters = traffic.counters.mailboxes.entry(mailbox_key).or_default();
    *counters.by_status.entry(response.status).or_insert(0) += 1;
    response
}

/// A wait in whole seconds, rounded up, at least 1 (Retry-After has no fractions).
fn whole_seconds(left: Duration) -> u64 {
    (left.as_secs() + u64::from(left.subsec_nanos() > 0)).max(1)
}

fn throttled(code: &str, message: &str, retry_after: u64) -> ApiError {
    ApiError {
        retry_after: Some(retry_after),
        ..ApiError::new(429, code, message)
    }
}

/// Everything that can refuse a request before the world looks at it, in Graph's order.
async fn admit(
    shared: &Arc<Shared>,
    request: &GraphRequest,
    route: &Route,
    faults: &Faults,
    in_flight: usize,
) -> Result<(), ApiError> {
    if faults.concurrency_cap > 0 && in_flight > faults.concurrency_cap {
        return Err(throttled(
            "ApplicationThrottled",
            "Application is over its MailboxConcurrency limit.",
            faults.retry_after_secs,
        ));
    }
    let grant = request
        .headers
        .get("authorization")
        .and_then(|value| value.strip_prefix("Bearer "))
        .and_then(|token| shared.world().check_token(token, Instant::now()));
    let Some(grant) = grant else {
        return Err(ApiError::new(
            401,
            "InvalidAuthenticationToken",
            "Access token has expired or is not yet valid.",
        ));
    };
    *shared
        .traffic()
        .counters
        .requests_by_credential
        .entry(grant.credential.clone())
        .or_default() += 1;
    {
        let mut world = shared.world();
        let Some(mailbox) = world.find_mailbox(route.user()) else {
            return Err(ApiError::new(
                404,
                "ResourceNotFound",
                "Resource could not be discovered.",
            ));
        };
        if let Some(error) = world.mailbox_error(mailbox) {
            return Err(error);
        }
    }
    {
        let mut traffic = shared.traffic();
        let mailbox_key = route.user().to_ascii_lowercase();
        let now = Instant::now();
        let mut over_budget = None;
        if let Some(budget) = faults.budget {
            let window = Duration::from_secs(budget.window_secs.max(1));
            let entry = traffic
                .budgets
                .entry(mailbox_key.clone())
                .or_insert((now, 0));
            if now.duration_since(entry.0) >= window {
                *entry = (now, 0);
            }
            entry.1 += 1;
            if entry.1 > budget.requests {
                over_budget = Some(whole_seconds(
                    window.saturating_sub(now.duration_since(entry.0)),
                ));
            }
        }
        if faults.hold_retry_after
            && let Some(until) = traffic.throttled_until.get(&mailbox_key)
            && *until > now
        {
            return Err(throttled(
                "TooManyRequests",
                "Please retry again later.",
                whole_seconds(*until - now),
            ));
        }
        if let Some(seconds) = over_budget {
            return Err(throttled(
                "TooManyRequests",
                "Please retry again later.",
                seconds,
            ));
        }
        if matches!(route, Route::Attachments { .. }) && shared.take_attachment_storm() {
            return Err(throttled(
                "TooManyRequests",
                "Please retry again later.",
                faults.retry_after_secs,
            ));
        }
        if faults.throttle_ratio > 0.0 && traffic.rng.random::<f64>() < faults.throttle_ratio {
            return Err(throttled(
                "TooManyRequests",
                "Please retry again later.",
                faults.retry_after_secs,
            ));
        }
        if faults.server_error_ratio > 0.0
            && traffic.rng.random::<f64>() < faults.server_error_ratio
        {
            return Err(if traffic.rng.random::<bool>() {
                ApiError {
                    retry_after: faults.server_error_retry_after_secs,
                    ..ApiError::new(
                        503,
                        "serviceNotAvailable",
                        "The service is temporarily unavailable.",
                    )
                }
            } else {
                ApiError::new(504, "UnknownError", "")
            });
        }
    }
    let writes = matches!(route, Route::Move { .. })
        || (matches!(route, Route::Message { .. }) && request.method == Method::PATCH);
    let allowed = if writes {
        grant.can_write()
    } else {
        grant.can_read()
    };
    if !allowed {
        return Err(ApiError::new(
            403,
            "ErrorAccessDenied",
            "Access is denied. Check credentials and try again.",
        ));
    }
    Ok(())
}

fn query_map(query: &str) -> HashMap<String, String> {
    url::form_urlencoded::parse(query.as_bytes())
        .map(|(name, value)| (name.to_ascii_lowercase(), value.into_owned()))
        .collect()
}

fn invalid_body() -> ApiError {
    ApiError::new(400, "BadRequest", "Invalid request body.")
}

async fn answer(
    shared: &Arc<Shared>,
    request: &GraphRequest,
    route: &Route,
    faults: &Faults,
) -> Result<GraphResponse, ApiError> {
    let prefs = preferences(&request.headers);
    let params = query_map(&request.query);
    let (mut response, poison) = {
        let mut world = shared.world();
        let mailbox = world.find_mailbox(route.user()).ok_or_else(|| {
            ApiError::new(404, "ResourceNotFound", "Resource could not be discovered.")
        })?;
        // Poisoned ids in every form a page may show them in.
        let poison: Vec<String> = faults
            .poison_ids
            .iter()
            .flat_map(|id| world.id_aliases(mailbox, id))
            .collect();
        let folder_of = |world: &super::state::World, key: &str| {
            world.find_folder(mailbox, key).ok_or_else(|| {
                ApiError::new(
                    404,
                    "ErrorItemNotFound",
                    "The specified folder could not be found in the store.",
                )
            })
        };
        let message_of = |world: &super::state::World, id: &str| {
            world
                .find_message(mailbox, id)
                .ok_or_else(ApiError::item_not_found)
        };
        // Changes of these messages always fail (the `refused_action_ids` switch).
        let refuse_change = |world: &super::state::World, id: &str| {
            let refused = faults.refused_action_ids.iter().any(|refused| {
                world
                    .id_aliases(mailbox, refused)
                    .iter()
                    .any(|alias| alias == id)
            });
            if refused {
                Err(ApiError::new(
                    400,
                    "ErrorInvalidRequest",
                    "The request is invalid for this item.",
                ))
            } else {
                Ok(())
            }
        };
        let wrong_method = || {
            ApiError::new(
                405,
                "Request_BadRequest",
                "The HTTP method is not allowed for this resource.",
            )
        };
        let response = match route {
            Route::List { user, folder } => {
                if request.method != Method::GET {
                    return Err(wrong_method());
                }
                let folder_index = folder_of(&world, folder)?;
                let list = ListQuery {
                    select: params.get("$select").map(|s| parse_select(s)).transpose()?,
                    filter: params
                        .get("$filter")
                        .map(|f| parse_filter(f))
                        .transpose()?
                        .unwrap_or_default(),
                    order: params
                        .get("$orderby")
                        .map(|o| parse_orderby(o))
                        .transpose()?
                        .unwrap_or_default(),
                    top: params
                        .get("$top")
                        .map(|t| parse_top(t))
                        .transpose()?
                        .unwrap_or(DEFAULT_LIST_PAGE),
                    skip: match params.get("$skip") {
                        Some(skip) => skip.parse().map_err(|_| {
                            ApiError::new(400, "ErrorInvalidUrlQuery", "Invalid $skip.")
                        })?,
                        None => 0,
                    },
                };
                too_large_unselected(faults, list.select.is_none(), list.top)?;
                let page = world.list(
                    mailbox,
                    folder_index,
                    &list,
                    prefs.immutable_ids,
                    faults.skip_jump,
                )?;
                let mut body = json!({
                    "@odata.context": format!("{}/v1.0/$metadata#users('{}')/mailFolders('{}')/messages", shared.base_url, user, folder),
                    "value": page.items,
                });
                if let Some(skip) = page.next_skip {
                    let mut next = url::form_urlencoded::Serializer::new(String::new());
                    for name in ["$select", "$filter", "$orderby"] {
                        if let Some(value) = params.get(name) {
                            next.append_pair(name, value);
                        }
                    }
                    next.append_pair("$top", &list.top.to_string());
                    next.append_pair("$skip", &skip.to_string());
                    body["@odata.nextLink"] = json!(format!(
                        "{}/v1.0/users/{}/mailFolders/{}/messages?{}",
                        shared.base_url,
                        user,
                        folder,
                        next.finish()
                    ));
                }
                GraphResponse::json(200, body)
            }
            Route::Delta { user, folder } => {
                if request.method != Method::GET {
                    return Err(wrong_method());
                }
                let folder_index = folder_of(&world, folder)?;
                let query = DeltaQuery {
                    select: params.get("$select").map(|s| parse_select(s)).transpose()?,
                    filter: params
                        .get("$filter")
                        .map(|f| parse_delta_filter(f))
                        .transpose()?,
                    skip_token: params.get("$skiptoken").cloned(),
                    delta_token: params.get("$deltatoken").cloned(),
                    page_size: prefs
                        .max_page_size
                        .or_else(|| params.get("$top").and_then(|t| t.parse().ok()))
                        .unwrap_or(DEFAULT_DELTA_PAGE)
                        .min(1000),
                    change_type: params.get("changetype").cloned(),
                };
                let first = query.skip_token.is_none() && query.delta_token.is_none();
                if first {
                    too_large_unselected(faults, query.select.is_none(), query.page_size)?;
                }
                let link_base = format!(
                    "{}/v1.0/users/{}/mailFolders/{}/messages/delta",
                    shared.base_url, user, folder
                );
                let page = world.delta(
                    mailbox,
                    folder_index,
                    &query,
                    DeltaBehaviour {
                        replay_ratio: faults.replay_ratio,
                        eviction: faults.eviction,
                        filtered_cap: faults.filtered_delta_cap,
                        partial_updates: faults.partial_updates,
                    },
                    prefs.immutable_ids,
                    link_base.clone(),
                )?;
                let context = format!("{}/v1.0/$metadata#Collection(message)", shared.base_url);
                let link = match page.next {
                    Ok(skip) => (
                        "@odata.nextLink",
                        format!("{link_base}?%24skiptoken={skip}"),
                    ),
                    Err(delta) => (
                        "@odata.deltaLink",
                        format!("{link_base}?%24deltatoken={delta}"),
                    ),
                };
                let mut response = GraphResponse {
                    status: 200,
                    headers: Vec::new(),
                    body: GraphBody::JsonText(delta_page_text(&context, &page.items, link)),
                    wait: None,
                };
                if prefs.max_page_size.is_some() {
                    response.headers.push((
                        "Preference-Applied".into(),
                        format!("odata.maxpagesize={}", query.page_size),
                    ));
                }
                response
            }
            Route::Message { id, .. } => {
                let message = message_of(&world, id)?;
                if request.method == Method::PATCH {
                    refuse_change(&world, id)?;
                    let patch: Value =
                        serde_json::from_slice(&request.body).map_err(|_| invalid_body())?;
                    if let Some(is_read) = patch.get("isRead") {
                        let is_read = is_read.as_bool().ok_or_else(invalid_body)?;
                        world.set_read(mailbox, message, is_read);
                    }
                } else if request.method != Method::GET {
                    return Err(wrong_method());
                }
                let select = params.get("$select").map(|s| parse_select(s)).transpose()?;
                GraphResponse::json(
                    200,
                    world.render(mailbox, message, select.as_deref(), prefs.immutable_ids),
                )
            }
            Route::Value { id, .. } => {
                if request.method != Method::GET {
                    return Err(wrong_method());
                }
                let message = message_of(&world, id)?;
                GraphResponse {
                    status: 200,
                    headers: Vec::new(),
                    body: GraphBody::Text(world.mime(mailbox, message), "text/plain"),
                    wait: None,
                }
            }
            Route::Attachments {
                id,
                request: attachment_request,
                ..
            } => {
                if request.method != Method::GET {
                    return Err(wrong_method());
                }
                let message = message_of(&world, id)?;
                let select = params
                    .get("$select")
                    .map(|s| attachments::parse_select(s))
                    .transpose()?;
                match attachments::answer(
                    &world,
                    mailbox,
                    message,
                    attachment_request,
                    select.as_deref(),
                )? {
                    AttachmentAnswer::Json(value) => GraphResponse::json(200, value),
                    AttachmentAnswer::Raw(bytes, content_type) => GraphResponse {
                        status: 200,
                        headers: Vec::new(),
                        body: GraphBody::Binary(bytes, content_type),
                        wait: None,
                    },
                }
            }
            Route::Move { id, .. } => {
                if request.method != Method::POST {
                    return Err(wrong_method());
                }
                let message = message_of(&world, id)?;
                refuse_change(&world, id)?;
                let body: Value =
                    serde_json::from_slice(&request.body).map_err(|_| invalid_body())?;
                let destination = body
                    .get("destinationId")
                    .and_then(Value::as_str)
                    .ok_or_else(invalid_body)?;
                let folder_index = folder_of(&world, destination)?;
                world.move_message(mailbox, message, folder_index);
                GraphResponse::json(
                    201,
                    world.render(mailbox, message, None, prefs.immutable_ids),
                )
            }
        };
        (response, poison)
    };

    let is_change = matches!(route, Route::Move { .. })
        || matches!(route, Route::Message { .. } if request.method == Method::PATCH);
    if is_change && faults.slow_change_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.slow_change_ms)).await;
    }
    if matches!(route, Route::List { .. } | Route::Delta { .. }) {
        if faults.slow_page_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.slow_page_ms)).await;
        }
        // A poisoned page breaks every time; otherwise pending one-shot orders apply.
        if holds_any_id(&response.body, &poison) {
            response.body = malformed(&response.body, faults.malformed_kind);
        } else if let Some(kind) = shared.take_malformed() {
            response.body = malformed(&response.body, kind);
        }
    }
    Ok(response)
}

/// Whether a page's JSON holds one of `ids` as a string value.
fn holds_any_id(body: &GraphBody, ids: &[String]) -> bool {
    if ids.is_empty() {
        return false;
    }
    let text = match body {
        GraphBody::Json(value) => value.to_string(),
        GraphBody::JsonText(text) => text.clone(),
        GraphBody::Text(..) | GraphBody::Raw(_) | GraphBody::Binary(..) => return false,
    };
    ids.iter().any(|id| text.contains(&format!("\"{id}\"")))
}

/// A delta page as Graph lays it out: context, items, then the link. The items are already
/// JSON text, so the page is assembled rather than serialized again.
fn delta_page_text(context: &str, items: &[Arc<str>], (name, link): (&str, String)) -> String {
    let quoted = |text: &str| Value::String(text.to_owned()).to_string();
    let context = quoted(context);
    let link = quoted(&link);
    let size = items.iter().map(|item| item.len() + 1).sum::<usize>() + context.len() + link.len();
    let mut text = String::with_capacity(size + 64);
    text.push_str("{\"@odata.context\":");
    text.push_str(&context);
    text.push_str(",\"value\":[");
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            text.push(',');
        }
        text.push_str(item);
    }
    text.push_str("],\"");
    text.push_str(name);
    text.push_str("\":");
    text.push_str(&link);
    text.push('}');
    text
}

fn too_large_unselected(faults: &Faults, unselected: bool, page: usize) -> Result<(), ApiError> {
    match faults.unselected_page_limit {
        Some(limit) if unselected && page > limit => Err(ApiError::new(504, "UnknownError", "")),
        _ => Ok(()),
    }
}

fn malformed(body: &GraphBody, kind: MalformedKind) -> GraphBody {
    match kind {
        MalformedKind::TruncatedJson => {
            let text = match body {
                GraphBody::Json(value) => value.to_string(),
                GraphBody::JsonText(text) => text.clone(),
                _ => String::from("{\"value\":[{\"id\":\"x\""),
            };
            let cut = text.len() / 2;
            let cut = (0..=cut)
                .rev()
                .find(|&at| text.is_char_boundary(at))
                .unwrap_or(0);
            GraphBody::Raw(text[..cut].to_string())
        }
        MalformedKind::WrongShape => {
            let mut value = match body {
                GraphBody::Json(value) => value.clone(),
                GraphBody::JsonText(text) => {
                    serde_json::from_str(text).unwrap_or_else(|_| json!({}))
                }
                _ => json!({}),
            };
            value["value"] = json!({"unexpected": "object"});
            GraphBody::Json(value)
        }
        MalformedKind::NotJson => {
            GraphBody::Raw("<html><body><h1>Service Unavailable</h1></body></html>".to_string())
        }
    }
}

// ---------------------------------------------------------------------------- $batch

/// One inner request of a `$batch`, with the ids of the requests it waits for.
struct BatchStep {
    id: String,
    depends_on: Vec<String>,
    request: GraphRequest,
}

async fn batch(
    shared: Arc<Shared>,
    headers: HashMap<String, String>,
    body: Bytes,
) -> GraphResponse {
    let faults = shared.faults();
    let request_id = {
        let mut traffic = shared.traffic();
        traffic.counters.batches += 1;
        uuid::Uuid::from_u128(traffic.rng.random::<u128>()).to_string()
    };
    let outcome = if shared.take_batch_failure() {
        // Refused at the front door: no inner request runs or counts. The wait it carries is
        // recorded against the mailboxes its requests address, so `early_requests` sees a
        // client that ignores it.
        let mailboxes: Vec<String> = parse_batch(&headers, &body)
            .map(|steps| {
                let mut keys: Vec<String> = steps
                    .iter()
                    .filter_map(|step| parse_route(&step.request.path))
                    .map(|route| route.user().to_ascii_lowercase())
                    .collect();
                keys.sort();
                keys.dedup();
                keys
            })
            .unwrap_or_default();
        let mut traffic = shared.traffic();
        traffic.counters.batches_refused += 1;
        let at = traffic.started.elapsed();
        for mailbox in mailboxes {
            traffic.counters.throttles.push(ThrottleRecord {
                mailbox,
                at,
                status: faults.batch.status,
                retry_after_secs: faults.batch.retry_after_secs,
            });
        }
        drop(traffic);
        Err(envelope_refusal(&faults.batch))
    } else {
        batch_inner(&shared, &headers, &body, &faults).await
    };
    let mut response =
        outcome.unwrap_or_else(|error| GraphResponse::error(&error, &request_id, &faults));
    response.headers.push(("request-id".into(), request_id));
    response
}

/// The error a refused `$batch` envelope gets.
fn envelope_refusal(batch: &BatchFaults) -> ApiError {
    let error = if batch.status == 429 {
        ApiError::new(429, "TooManyRequests", "Please retry again later.")
    } else if batch.status == 403 {
        // A tenant policy (Conditional Access for workload identities, an application access
        // policy) refusing the whole request: no Retry-After, nothing passes by itself.
        return ApiError::new(
            403,
            "Forbidden",
            "Access is denied. Check credentials and try again.",
        );
    } else {
        ApiError::new(
            batch.status,
            "serviceNotAvailable",
            "The service is temporarily unavailable.",
        )
    };
    ApiError {
        retry_after: Some(batch.retry_after_secs),
        ..error
    }
}

fn invalid_batch(message: &str) -> ApiError {
    ApiError::new(400, "BadRequest", message)
}

/// The envelope's steps, checked: 1 to 20 of them, each with an id, a method and a url.
fn parse_batch(
    headers: &HashMap<String, String>,
    body: &Bytes,
) -> Result<Vec<BatchStep>, ApiError> {
    let envelope: Value =
        serde_json::from_slice(body).map_err(|_| invalid_batch("Invalid batch payload format."))?;
    let requests = envelope
        .get("requests")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid_batch("Invalid batch payload format."))?;
    if requests.is_empty() || requests.len() > MAX_BATCH {
        return Err(invalid_batch(
            "Number of batch request steps exceeds the maximum of 20.",
        ));
    }
    requests
        .iter()
        .map(|entry| parse_step(headers, entry))
        .collect()
}

fn parse_step(headers: &HashMap<String, String>, entry: &Value) -> Result<BatchStep, ApiError> {
    let id = entry
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_batch("Each batch request needs an id."))?;
    let method = entry
        .get("method")
        .and_then(Value::as_str)
        .and_then(|method| Method::from_bytes(method.to_ascii_uppercase().as_bytes()).ok())
        .ok_or_else(|| invalid_batch("Each batch request needs a method."))?;
    let url = entry
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_batch("Each batch request needs a url."))?;
    let depends_on = match entry.get("dependsOn") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(ids)) => ids
            .iter()
            .map(|id| id.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid_batch("dependsOn must list request ids."))?,
        Some(_) => return Err(invalid_batch("dependsOn must list request ids.")),
    };
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let mut inner_headers = headers.clone();
    inner_headers.remove("content-length");
    if let Some(own) = entry.get("headers").and_then(Value::as_object) {
        for (name, value) in own {
            if let Some(value) = value.as_str() {
                inner_headers.insert(name.to_ascii_lowercase(), value.to_string());
            }
        }
    }
    let body = entry
        .get("body")
        .map(|body| Bytes::from(body.to_string()))
        .unwrap_or_default();
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    Ok(BatchStep {
        id: id.to_string(),
        depends_on,
        request: GraphRequest {
            method,
            path,
            query: query.to_string(),
            headers: inner_headers,
            body,
        },
    })
}

/// The steps in waves: each wave's steps depend only on steps of earlier waves. Ids must be
/// unique, dependencies known and free of cycles, else the whole batch is a 400.
fn dependency_waves(steps: &[BatchStep]) -> Result<Vec<Vec<usize>>, ApiError> {
    let mut position: HashMap<&str, usize> = HashMap::new();
    for (index, step) in steps.iter().enumerate() {
        if position.insert(step.id.as_str(), index).is_some() {
            return Err(invalid_batch("Batch request ids must be unique."));
        }
    }
    let mut dependencies = Vec::with_capacity(steps.len());
    for step in steps {
        let indexes = step
            .depends_on
            .iter()
            .map(|id| position.get(id.as_str()).copied())
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| invalid_batch("dependsOn names a request not in the batch."))?;
        dependencies.push(indexes);
    }
    let mut placed = vec![false; steps.len()];
    let mut waves = Vec::new();
    while placed.iter().any(|done| !done) {
        let ready: Vec<usize> = (0..steps.len())
            .filter(|&index| !placed[index] && dependencies[index].iter().all(|&dep| placed[dep]))
            .collect();
        if ready.is_empty() {
            return Err(invalid_batch("dependsOn forms a cycle."));
        }
        for &index in &ready {
            placed[index] = true;
        }
        waves.push(ready);
    }
    Ok(waves)
}

/// An inner response as a `$batch` entry.
fn batch_entry(id: &str, response: GraphResponse) -> Value {
    let headers: serde_json::Map<String, Value> = response
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), json!(value)))
        .collect();
    let body = match response.body {
        GraphBody::Json(value) => value,
        GraphBody::JsonText(text) => serde_json::from_str(&text).unwrap_or(Value::Null),
        GraphBody::Text(text, _) | GraphBody::Raw(text) => json!(text),
        GraphBody::Binary(bytes, _) => json!(STANDARD.encode(bytes)),
    };
    json!({"id": id, "status": response.status, "headers": headers, "body": body})
}

/// The answer to a step whose dependency failed: it is not run, and not counted.
fn failed_dependency(id: &str) -> Value {
    json!({"id": id, "status": 424, "body": {"error": {
        "code": "FailedDependency",
        "message": "The request was not run because a request it depends on failed.",
    }}})
}

async fn batch_inner(
    shared: &Arc<Shared>,
    headers: &HashMap<String, String>,
    body: &Bytes,
    faults: &Faults,
) -> Result<GraphResponse, ApiError> {
    let steps = parse_batch(headers, body)?;
    let waves = dependency_waves(&steps)?;
    let mut entries: Vec<Option<Value>> = vec![None; steps.len()];
    let mut succeeded = vec![false; steps.len()];
    let position: HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(index, step)| (step.id.as_str(), index))
        .collect();
    for wave in waves {
        let mut runnable = Vec::new();
        for index in wave {
            let blocked = steps[index]
                .depends_on
                .iter()
                .any(|id| position.get(id.as_str()).is_none_or(|&dep| !succeeded[dep]));
            if blocked {
                entries[index] = Some(failed_dependency(&steps[index].id));
            } else {
                runnable.push(index);
            }
        }
        // Each inner request goes through the mailbox's admission on its own, at most
        // BATCH_PARALLELISM at a time, as Outlook runs them.
        let answered: Vec<(usize, GraphResponse)> = futures::stream::iter(runnable)
            .map(|index| {
                let shared = shared.clone();
                let request = steps[index].request.clone();
                async move { (index, dispatch(shared, request).await) }
            })
            .buffered(BATCH_PARALLELISM)
            .collect()
            .await;
        for (index, response) in answered {
            succeeded[index] = (200..300).contains(&response.status);
            entries[index] = Some(batch_entry(&steps[index].id, response));
        }
    }
    let mut responses: Vec<Value> = entries.into_iter().flatten().collect();
    if faults.batch.shuffle_responses {
        shuffle_responses(shared, &mut responses);
    }
    Ok(GraphResponse::json(200, json!({"responses": responses})))
}

/// Puts the responses out of request order: shuffled, and never left as they were when
/// there are two or more, so a client relying on the order always notices.
fn shuffle_responses(shared: &Shared, responses: &mut [Value]) {
    let before: Vec<Value> = responses.to_vec();
    responses.shuffle(&mut shared.traffic().rng);
    if responses.len() > 1 && responses == before.as_slice() {
        responses.reverse();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_both_user_forms_and_the_message_endpoints() {
        assert_eq!(
            parse_route("/v1.0/users/ops%40contoso.com/mailFolders/inbox/messages/delta"),
            Some(Route::Delta {
                user: "ops@contoso.com".into(),
                folder: "inbox".into()
            })
        );
        assert_eq!(
            parse_route("/users('ops@contoso.com')/mailFolders('inbox')/messages"),
            Some(Route::List {
                user: "ops@contoso.com".into(),
                folder: "inbox".into()
            })
        );
        assert_eq!(
            parse_route("/users/a@b/messages/AAk%3D/$value"),
            Some(Route::Value {
                user: "a@b".into(),
                id: "AAk=".into()
            })
        );
        assert_eq!(
            parse_route("/users/a@b/messages/X/move"),
            Some(Route::Move {
                user: "a@b".into(),
                id: "X".into()
            })
        );
        assert_eq!(parse_route("/me/messages"), None);
    }

    #[test]
    fn prefer_headers_combine() {
        let headers = HashMap::from([(
            "prefer".to_string(),
            "IdType=\"ImmutableId\", odata.maxpagesize=50".to_string(),
        )]);
        let prefs = preferences(&headers);
        assert!(prefs.immutable_ids);
        assert_eq!(prefs.max_page_size, Some(50));
    }
}
