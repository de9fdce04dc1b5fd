//! The HTTP face of the emulator: routes every path to discovery, OpenAPI or a resource verb,
//! decodes bodies by content type, answers JSON (or Table for kubectl), and records requests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::admission::{self, Attempt};
use super::discovery;
use super::record::RequestRecord;
use super::resource::ResourceType;
use super::select::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::store::{FieldValidation, PatchKind, Store, WriteContext, Written};
use super::table::{self, IncludeObject};
use super::watch::{self, WatchRequest};

/// Tunables of a running emulator.
#[derive(Debug, Clone)]
pub struct Options {
    /// Changes kept for watches to resume from; older versions answer 410 Expired.
    pub history_limit: usize,
    /// How often a watch that allows bookmarks gets one.
    pub bookmark_interval: Duration,
    /// Lifetime of a watch that names no `timeoutSeconds`.
    pub watch_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            history_limit: 10_000,
            bookmark_interval: Duration::from_secs(10),
            watch_timeout: Duration::from_secs(1800),
        }
    }
}

/// A failure to answer instead of serving matching requests, for testing how clients cope.
#[derive(Debug, Clone)]
pub struct Fault {
    /// RBAC verb to match (`update`, `patch`, `watch`, ...); None matches every verb.
    pub verb: Option<String>,
    /// Plural resource to match (`leases`); None matches every resource.
    pub resource: Option<String>,
    /// Requesting user to match (bearer token); None matches everyone.
    pub user: Option<String>,
    /// How many matching requests are affected before the fault is spent.
    pub times: usize,
    pub effect: FaultEffect,
}

/// What an injected fault does to a matching request.
#[derive(Debug, Clone)]
pub enum FaultEffect {
    /// Refused with this error; nothing changes.
    Fail(ApiError),
    /// Carried out, but the answer is held back this long (a slow API server: the write took
    /// effect, the client hears of it late or gives up waiting).
    Hold(Duration),
    /// Not carried out; after this long the answer is a 504 timeout (a partitioned API
    /// server, as a client whose own timeout is shorter experiences it).
    Stall(Duration),
}

/// State shared by every request of one emulator.
pub struct Shared {
    store: Mutex<Store>,
    /// Carries the latest resourceVersion to waiting watches.
    pub notify: tokio::sync::watch::Sender<u64>,
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// While true, watches send nothing (no event, no bookmark) and never end by themselves:
    /// an API server that went silent with the connections still open.
    pub silent: tokio::sync::watch::Sender<bool>,
    open_watches: Arc<std::sync::atomic::AtomicUsize>,
    records: Mutex<Vec<RequestRecord>>,
    /// Requests received and not answered yet, by arrival number.
    unanswered: Mutex<std::collections::BTreeMap<u64, Unanswered>>,
    arrivals: std::sync::atomic::AtomicU64,
    faults: Mutex<Vec<Fault>>,
    pub options: Options,
    pub address: String,
}

/// A request the emulator has received and not yet answered.
#[derive(Debug, Clone)]
pub struct Unanswered {
    pub user: Option<String>,
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub arrived_at: std::time::Instant,
}

/// An open watch, counted while it lives.
pub struct OpenWatch(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Takes a request off the unanswered list when it is answered or its client goes away.
struct Answering<'a> {
    shared: &'a Shared,
    number: u64,
}

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        lock(&self.shared.unanswered).remove(&self.number);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    pub fn new(options: Options, address: String) -> Self {
        let store = Store::new(options.history_limit);
        let (notify, _) = tokio::sync::watch::channel(store.resource_version());
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let (silent, _) = tokio::sync::watch::channel(false);
        Self {
            store: Mutex::new(store),
            notify,
            shutdown,
            silent,
            open_watches: Arc::default(),
            records: Mutex::new(Vec::new()),
            unanswered: Mutex::new(std::collections::BTreeMap::new()),
            arrivals: std::sync::atomic::AtomicU64::new(0),
            faults: Mutex::new(Vec::new()),
            options,
            address,
        }
    }

    /// The store; a panic in another request must not take the server down with it.
    pub fn lock_store(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn records(&self) -> Vec<RequestRecord> {
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn clear_records(&self) {
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }

    /// Requests received and not answered yet, oldest first.
    pub fn unanswered(&self) -> Vec<Unanswered> {
        lock(&self.unanswered).values().cloned().collect()
    }

    fn arrive(&self, request: Unanswered) -> Answering<'_> {
        let number = self
            .arrivals
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&self.unanswered).insert(number, request);
        Answering {
            shared: self,
            number,
        }
    }

    pub fn clear_faults(&self) {
        self.faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }

    pub fn add_fault(&self, fault: Fault) {
        self.faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(fault);
    }

    /// The injected fault for this request, if one matches (and is consumed).
    fn take_fault(&self, record: &RequestRecord) -> Option<FaultEffect> {
        let mut faults = self
            .faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let index = faults.iter().position(|f| {
            f.times > 0
                && f.verb.as_deref().is_none_or(|v| v == record.verb)
                && f.resource.as_deref().is_none_or(|r| r == record.resource)
                && f.user
                    .as_ref()
                    .is_none_or(|u| Some(u) == record.user.as_ref())
        })?;
        let fault = &mut faults[index];
        fault.times -= 1;
        let effect = fault.effect.clone();
        if fault.times == 0 {
            faults.remove(index);
        }
        Some(effect)
    }

    fn push_record(&self, record: RequestRecord) {
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(record);
    }

    /// Counts a watch as open until the returned guard is dropped.
    pub fn watch_opened(&self) -> OpenWatch {
        self.open_watches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        OpenWatch(self.open_watches.clone())
    }

    pub fn open_watches(&self) -> usize {
        self.open_watches.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Wakes the watches after a write made outside a request.
    pub fn notify_changed(&self) {
        self.changed();
    }

    fn changed(&self) {
        let rv = self.lock_store().resource_version();
        self.notify.send_replace(rv);
    }
}

pub fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(shared)
}

fn json_response(code: StatusCode, body: &Value, warnings: &[String]) -> Response {
    let mut response = (code, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for warning in warnings {
        let text = format!("299 - \"{}\"", warning.replace('"', "\\\""));
        if let Ok(value) = HeaderValue::from_str(&text) {
            response.headers_mut().append("Warning", value);
        }
    }
    response
}

/// What a request asks for, once its path is understood.
struct Target {
    rt: Arc<ResourceType>,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: HashMap<String, String> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let path = uri.path().to_owned();
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let user = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let _answering = shared.arrive(Unanswered {
        user: user.clone(),
        method: method.to_string(),
        uri: uri.to_string(),
        arrived_at: std::time::Instant::now(),
    });
    let mut record = RequestRecord {
        verb: method.as_str().to_lowercase(),
        group: String::new(),
        version: String::new(),
        resource: String::new(),
        subresource: None,
        namespace: None,
        name: None,
        path: path.clone(),
        field_manager: query.get("fieldManager").cloned(),
        user_agent: user_agent.clone(),
        user,
        held_for: None,
        answered_at: std::time::Instant::now(),
        code: 0,
    };
    let response = match route(&shared, &method, &path, &query, &headers, body, &mut record).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    if let Some(hold) = record.held_for {
        tokio::time::sleep(hold).await;
    }
    record.answered_at = std::time::Instant::now();
    record.code = response.status().as_u16();
    shared.push_record(record);
    response
}

fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

#[allow(clippy::too_many_arguments)]
async fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
    record: &mut RequestRecord,
) -> Result<Response, ApiError> {
    let parts = segments(path);
    let ok = |value: Value| Ok(json_response(StatusCode::OK, &value, &[]));
    let types = || shared.lock_store().types().to_vec();
    match parts.as_slice() {
        ["version"] => return ok(discovery::version()),
        ["healthz" | "readyz" | "livez"] => return Ok((StatusCode::OK, "ok").into_response()),
        ["api"] => return ok(discovery::core_versions(&shared.address)),
        ["apis"] => return ok(discovery::group_list(&types())),
        ["api", version] => {
            return discovery::resource_list(&types(), "", version)
                .map_or_else(|| Err(ApiError::not_found_path()), ok);
        }
        ["apis", group] => {
            return discovery::group(&types(), group)
                .map_or_else(|| Err(ApiError::not_found_path()), ok);
        }
        ["apis", group, version] => {
            return discovery::resource_list(&types(), group, version)
                .map_or_else(|| Err(ApiError::not_found_path()), ok);
        }
        ["openapi", "v3"] => {
            let (types, revision) = {
                let store = shared.lock_store();
                (store.types().to_vec(), store.types_revision())
            };
            return ok(discovery::openapi_root(&types, revision));
        }
        ["openapi", "v3", "api", version] => {
            return discovery::openapi_group_version(&types(), "", version)
                .map_or_else(|| Err(ApiError::not_found_path()), ok);
        }
        ["openapi", "v3", "apis", group, version] => {
            return discovery::openapi_group_version(&types(), group, version)
                .map_or_else(|| Err(ApiError::not_found_path()), ok);
        }
        _ => {}
    }
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] if !rest.is_empty() => ("", *version, rest),
        ["apis", group, version, rest @ ..] if !rest.is_empty() => (*group, *version, rest),
        _ => return Err(ApiError::not_found_path()),
    };
    let target = resolve(shared, group, version, rest)?;
    record.group = target.rt.group.clone();
    record.version = target.rt.version.clone();
    record.resource = target.rt.plural.clone();
    record.subresource = target.subresource.clone();
    record.namespace = target.namespace.clone();
    record.name = target.name.clone();
    check_accept(headers)?;
    if target.rt.namespaced && target.namespace.is_none() && method != Method::GET {
        // The all-namespaces path of a namespaced resource only lists and watches.
        return Err(ApiError::method_not_allowed(format!(
            "the server does not allow this method on the requested resource ({method} across all namespaces)"
        )));
    }
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    record.verb = match (method, target.name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if watching => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, false) => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => {
            return Err(ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource ({method})"
            )));
        }
    }
    .into();
    match shared.take_fault(record) {
        Some(FaultEffect::Fail(error)) => return Err(error),
        Some(FaultEffect::Hold(hold)) => record.held_for = Some(hold),
        Some(FaultEffect::Stall(hold)) => {
            record.held_for = Some(hold);
            return Err(ApiError::with_code(
                504,
                "injected stall: request timed out",
            ));
        }
        None => {}
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let table = table::wants_table(accept)
        .then(|| IncludeObject::parse(query.get("includeObject").map(String::as_str)));
    match record.verb.as_str() {
        "get" => get(shared, &target, table),
        "list" => list(shared, &target, query, table),
        "watch" => watch_resource(shared, target, query, table),
        "create" => {
            let object = decode_body(headers, &body, &target.rt)?;
            let ctx = write_context(query, headers, false)?;
            let namespace = target.namespace.as_deref().unwrap_or_default();
            let written = admitted_write(shared, &target, &ctx, record, |s, ctx| {
                s.create(&target.rt, namespace, object.clone(), ctx)
            })
            .await?;
            Ok(written_response(written, StatusCode::CREATED))
        }
        "update" => {
            let object = decode_body(headers, &body, &target.rt)?;
            let ctx = write_context(query, headers, false)?;
            let name = target.name.clone().unwrap_or_default();
            let namespace = target.namespace.as_deref().unwrap_or_default();
            let written = admitted_write(shared, &target, &ctx, record, |s, ctx| {
                s.update(
                    &target.rt,
                    namespace,
                    &name,
                    object.clone(),
                    target.subresource.is_some(),
                    ctx,
                )
            })
            .await?;
            let code = if written.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(written_response(written, code))
        }
        "patch" => patch(shared, &target, query, headers, &body, record).await,
        "delete" => delete(shared, &target, query, &body),
        "deletecollection" => delete_collection(shared, &target, query),
        _ => Err(ApiError::not_found_path()),
    }
}

fn with_store<T>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&mut Store) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let result = {
        let mut store = shared.lock_store();
        f(&mut store)
    };
    shared.changed();
    result
}

/// A create, update or patch. When validating webhooks are configured, they are shown the
/// object as it would be stored (the write done as a dry run, after defaulting and schema
/// validation, as in kube-apiserver) and may refuse it before it is written.
async fn admitted_write(
    shared: &Arc<Shared>,
    target: &Target,
    ctx: &WriteContext,
    record: &RequestRecord,
    write: impl Fn(&mut Store, &WriteContext) -> Result<Written, ApiError> + Send,
) -> Result<Written, ApiError> {
    // Webhook rules here name main resources; status writes are never sent.
    let webhooks = match target.subresource {
        Some(_) => Vec::new(),
        None => admission::configured(&shared.lock_store()),
    };
    if webhooks.is_empty() {
        return with_store(shared, |s| write(s, ctx));
    }
    let trial_ctx = WriteContext {
        dry_run: true,
        ..ctx.clone()
    };
    let trial = with_store(shared, |s| write(s, &trial_ctx))?;
    let namespace = target.namespace.as_deref().unwrap_or_default();
    let name = trial
        .object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let old = match trial.created {
        true => None,
        false => shared.lock_store().get(&target.rt, namespace, name).ok(),
    };
    let attempt = Attempt {
        rt: &target.rt,
        namespace,
        object: &trial.object,
        old_object: old.as_ref(),
        create: trial.created,
        dry_run: ctx.dry_run,
        user: record.user.as_deref(),
    };
    for webhook in webhooks.iter().filter(|w| w.matches(&attempt)) {
        webhook.admit(&attempt).await?;
    }
    if ctx.dry_run {
        return Ok(trial);
    }
    with_store(shared, |s| write(s, ctx))
}

fn written_response(written: Written, code: StatusCode) -> Response {
    json_response(code, &written.object, &written.warnings)
}

fn check_accept(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let acceptable = accept.split(',').any(|item| {
        let media = item.split(';').next().unwrap_or_default().trim();
        matches!(media, "application/json" | "*/*" | "application/*" | "")
    });
    if acceptable {
        Ok(())
    } else {
        Err(ApiError {
            code: 406,
            reason: "NotAcceptable",
            message: format!(
                "only the following media types are accepted: application/json, application/yaml, application/vnd.kubernetes.protobuf (asked for {accept})"
            ),
            details: None,
        })
    }
}

fn resolve(
    shared: &Arc<Shared>,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Result<Target, ApiError> {
    let (namespace, rest): (Option<String>, Vec<&str>) = match rest {
        ["namespaces", ns, resource, tail @ ..]
            if !(group.is_empty()
                && tail.is_empty()
                && matches!(*resource, "status" | "finalize")) =>
        {
            let mut rest = vec![*resource];
            rest.extend_from_slice(tail);
            (Some((*ns).to_owned()), rest)
        }
        other => (None, other.to_vec()),
    };
    let (plural, name, subresource) = match rest.as_slice() {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some((*name).to_owned()), None),
        [plural, name, sub] => (*plural, Some((*name).to_owned()), Some((*sub).to_owned())),
        _ => return Err(ApiError::not_found_path()),
    };
    let rt = shared
        .lock_store()
        .lookup(group, version, plural)
        .ok_or_else(ApiError::not_found_path)?;
    if namespace.is_some() && !rt.namespaced {
        return Err(ApiError::not_found_path());
    }
    if rt.namespaced && namespace.is_none() && name.is_some() {
        return Err(ApiError::not_found_path());
    }
    match subresource.as_deref() {
        None => {}
        Some("status") if rt.status_subresource => {}
        Some(_) => return Err(ApiError::not_found_path()),
    }
    Ok(Target {
        rt,
        namespace,
        name,
        subresource,
    })
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_lowercase()
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "the object provided is unrecognized: couldn't get version/kind; json parse error: {e}"
        ))
    })
}

fn parse_yaml(body: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| {
        ApiError::bad_request("error converting YAML to JSON: the body is not UTF-8")
    })?;
    serde_saphyr::from_str::<Value>(text)
        .map_err(|e| ApiError::bad_request(format!("error converting YAML to JSON: {e}")))
}

fn decode_body(headers: &HeaderMap, body: &[u8], rt: &ResourceType) -> Result<Value, ApiError> {
    let value = match content_type(headers).as_str() {
        "application/json" | "" => parse_json(body)?,
        "application/yaml" => parse_yaml(body)?,
        other => {
            // Protobuf is not spoken here: kubectl's `create secret` must go through `apply -f`.
            return Err(ApiError::unsupported_media_type(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {other})"
            )));
        }
    };
    if !value.is_object() {
        return Err(ApiError::bad_request(format!(
            "the object provided is unrecognized: {} in version \"{}\" cannot be handled as a {}: the body is not an object",
            rt.kind, rt.version, rt.kind
        )));
    }
    Ok(value)
}

fn write_context(
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    apply: bool,
) -> Result<WriteContext, ApiError> {
    let field_validation = match query.get("fieldValidation").map(String::as_str) {
        None | Some("") | Some("Warn") => FieldValidation::Warn,
        Some("Strict") => FieldValidation::Strict,
        Some("Ignore") => FieldValidation::Ignore,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "fieldValidation: Unsupported value: \"{other}\": supported values: \"Ignore\", \"Strict\", \"Warn\""
            )));
        }
    };
    let manager = match query.get("fieldManager").filter(|m| !m.is_empty()) {
        Some(manager) => manager.clone(),
        None if apply => {
            return Err(ApiError::unprocessable(
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            ));
        }
        None => headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .filter(|m| !m.is_empty())
            .unwrap_or("unknown")
            .chars()
            .take(128)
            .collect(),
    };
    let dry_run = query.get("dryRun").is_some_and(|d| d == "All");
    Ok(WriteContext {
        manager,
        field_validation,
        dry_run,
    })
}

fn get(
    shared: &Arc<Shared>,
    target: &Target,
    table: Option<IncludeObject>,
) -> Result<Response, ApiError> {
    let name = target.name.as_deref().unwrap_or_default();
    let object = shared.lock_store().get(
        &target.rt,
        target.namespace.as_deref().unwrap_or_default(),
        name,
    )?;
    let body = match table {
        Some(include) => {
            let rv = object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            table::table(&target.rt, &[object], &rv, include)
        }
        None => object,
    };
    Ok(json_response(StatusCode::OK, &body, &[]))
}

fn selectors(
    target: &Target,
    query: &HashMap<String, String>,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(
        query.get("fieldSelector").map_or("", String::as_str),
        &target.rt.kind,
        &target.rt.api_version(),
    )?;
    Ok((labels, fields))
}

fn list(
    shared: &Arc<Shared>,
    target: &Target,
    query: &HashMap<String, String>,
    table: Option<IncludeObject>,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(target, query)?;
    let limit = match query.get("limit") {
        Some(text) => Some(
            text.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit: {text}")))?,
        ),
        None => None,
    };
    let page = shared.lock_store().list(
        &target.rt,
        target.namespace.as_deref(),
        &labels,
        &fields,
        limit,
        query
            .get("continue")
            .map(String::as_str)
            .filter(|c| !c.is_empty()),
    )?;
    let rv = page.resource_version.to_string();
    let body = match table {
        Some(include) => {
            let mut table = table::table(&target.rt, &page.items, &rv, include);
            if let Some(token) = &page.continue_token {
                table["metadata"]["continue"] = json!(token);
            }
            table
        }
        None => {
            let mut metadata = json!({"resourceVersion": rv});
            if let Some(token) = &page.continue_token {
                metadata["continue"] = json!(token);
            }
            if let Some(remaining) = page.remaining {
                metadata["remainingItemCount"] = json!(remaining);
            }
            json!({
                "kind": target.rt.list_kind(),
                "apiVersion": target.rt.api_version(),
                "metadata": metadata,
                "items": page.items,
            })
        }
    };
    Ok(json_response(StatusCode::OK, &body, &[]))
}

fn watch_resource(
    shared: &Arc<Shared>,
    target: Target,
    query: &HashMap<String, String>,
    table: Option<IncludeObject>,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(&target, query)?;
    let flag = |name: &str| query.get(name).map(|v| v == "true" || v == "1");
    let timeout = match query.get("timeoutSeconds") {
        Some(text) => Duration::from_secs(
            text.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds: {text}")))?,
        ),
        None => shared.options.watch_timeout,
    };
    let request = WatchRequest {
        rt: target.rt,
        namespace: target.namespace,
        labels,
        fields,
        resource_version: query.get("resourceVersion").cloned(),
        resource_version_match: query
            .get("resourceVersionMatch")
            .cloned()
            .filter(|m| !m.is_empty()),
        send_initial_events: flag("sendInitialEvents"),
        bookmarks: flag("allowWatchBookmarks").unwrap_or(false),
        timeout,
        table,
    };
    let body: Body = watch::start(shared.clone(), request)?;
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

async fn patch(
    shared: &Arc<Shared>,
    target: &Target,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
    record: &RequestRecord,
) -> Result<Response, ApiError> {
    let kind = match content_type(headers).as_str() {
        "application/merge-patch+json" => PatchKind::Merge,
        "application/json-patch+json" => PatchKind::Json,
        "application/strategic-merge-patch+json" => PatchKind::Strategic,
        "application/apply-patch+yaml" => PatchKind::Apply {
            force: query.get("force").is_some_and(|f| f == "true" || f == "1"),
        },
        other => {
            let accepted = if target.rt.custom {
                "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
            } else {
                "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json"
            };
            return Err(ApiError::unsupported_media_type(format!(
                "the body of the request was in an unknown format - accepted media types include: {accepted} (got {other:?})"
            )));
        }
    };
    if kind == PatchKind::Strategic && target.rt.custom {
        return Err(ApiError::strategic_merge_unsupported());
    }
    let apply = matches!(kind, PatchKind::Apply { .. });
    if !apply && query.contains_key("force") {
        return Err(ApiError::unprocessable(
            "PatchOptions.meta.k8s.io \"\" is invalid: force: Forbidden: may not be specified for non-apply patch",
        ));
    }
    let body = if apply {
        parse_yaml(body)?
    } else {
        parse_json(body)?
    };
    let ctx = write_context(query, headers, apply)?;
    let name = target.name.clone().unwrap_or_default();
    let namespace = target.namespace.as_deref().unwrap_or_default();
    let written = admitted_write(shared, target, &ctx, record, |s, ctx| {
        s.patch(
            &target.rt,
            namespace,
            &name,
            kind,
            &body,
            target.subresource.is_some(),
            ctx,
        )
    })
    .await?;
    let code = if written.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(written_response(written, code))
}

fn delete(
    shared: &Arc<Shared>,
    target: &Target,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Result<Response, ApiError> {
    let options: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        parse_json(body)?
    };
    let text = |pointer: &str| {
        options
            .pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let dry_run = query.get("dryRun").is_some_and(|d| d == "All")
        || options
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|d| d.iter().any(|v| v == "All"));
    let name = target.name.clone().unwrap_or_default();
    let (object, _pending) = with_store(shared, |s| {
        s.delete(
            &target.rt,
            target.namespace.as_deref().unwrap_or_default(),
            &name,
            text("/preconditions/resourceVersion").as_deref(),
            text("/preconditions/uid").as_deref(),
            dry_run,
        )
    })?;
    Ok(json_response(StatusCode::OK, &object, &[]))
}

fn delete_collection(
    shared: &Arc<Shared>,
    target: &Target,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(target, query)?;
    let deleted = with_store(shared, |s| {
        let page = s.list(
            &target.rt,
            target.namespace.as_deref(),
            &labels,
            &fields,
            None,
            None,
        )?;
        let mut deleted = Vec::new();
        for object in page.items {
            let ns = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let name = object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if s.delete(&target.rt, &ns, &name, None, None, false).is_ok() {
                deleted.push(object);
            }
        }
        Ok(deleted)
    })?;
    let body = json!({
        "kind": target.rt.list_kind(),
        "apiVersion": target.rt.api_version(),
        "metadata": {"resourceVersion": shared.lock_store().resource_version().to_string()},
        "items": deleted,
    });
    Ok(json_response(StatusCode::OK, &body, &[]))
}
