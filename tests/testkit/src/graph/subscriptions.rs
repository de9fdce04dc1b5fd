//! Change notifications: `POST/PATCH/DELETE /v1.0/subscriptions`, as Graph serves them for
//! Outlook messages, and the notifications the emulator then sends.
//!
//! What Microsoft documents, each behaviour here or behind a switch of [`NotificationFaults`]:
//! - creating a subscription first POSTs `?validationToken=...` to the notification URL (and to
//!   the lifecycle URL); anything but a quick `200` with the token echoed as text refuses the
//!   subscription with `400 ValidationError`;
//! - an expiration beyond the resource's maximum (Outlook messages: 10,080 minutes) is refused
//!   with `400 ExtensionError`; a subscription that reaches its expiration is gone;
//! - a new message in the folder POSTs `{"value":[{subscriptionId, clientState, changeType,
//!   resource, resourceData, ...}]}` to the notification URL; notifications can be late, lost,
//!   duplicated and out of order;
//! - lifecycle events (`reauthorizationRequired`, `subscriptionRemoved`, `missed`) go to the
//!   lifecycle URL, on demand.
//!
//! Emulator time is the wall clock plus an offset tests can advance, so expiry can be reached
//! without waiting days.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post};
use chrono::{DateTime, SecondsFormat, Utc};
use rand::RngExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::state::ApiError;
use super::{Shared, lock};

/// Longest lifetime of a subscription to Outlook messages, in minutes (Microsoft Graph's
/// documented maximum, "under 7 days").
pub const OUTLOOK_MESSAGE_MAX_MINUTES: i64 = 10_080;
/// How long Graph waits for the validation answer.
pub const VALIDATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Switches of the notification side, flipped while tests run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NotificationFaults {
    /// Every notification waits this long before it is sent.
    pub delay_ms: u64,
    /// Each notification also waits a random extra time below this, so notifications of one
    /// burst arrive out of order.
    pub reorder_window_ms: u64,
    /// Share of notifications never sent.
    pub loss_ratio: f64,
    /// Share of notifications sent twice.
    pub duplicate_ratio: f64,
    /// Maximum lifetime of a subscription, in minutes.
    pub max_expiration_minutes: i64,
    /// Refuse every new subscription as if the validation call had failed (a notification
    /// URL Graph cannot reach).
    pub unreachable: bool,
}

impl Default for NotificationFaults {
    fn default() -> Self {
        Self {
            delay_ms: 0,
            reorder_window_ms: 0,
            loss_ratio: 0.0,
            duplicate_ratio: 0.0,
            max_expiration_minutes: OUTLOOK_MESSAGE_MAX_MINUTES,
            unreachable: false,
        }
    }
}

/// Lifecycle events Graph sends to `lifecycleNotificationUrl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleEvent {
    ReauthorizationRequired,
    SubscriptionRemoved,
    Missed,
}

impl LifecycleEvent {
    /// Graph's name of the event (also what the admin API takes).
    pub fn parse(name: &str) -> Option<Self> {
        [
            Self::ReauthorizationRequired,
            Self::SubscriptionRemoved,
            Self::Missed,
        ]
        .into_iter()
        .find(|event| event.as_str().eq_ignore_ascii_case(name))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReauthorizationRequired => "reauthorizationRequired",
            Self::SubscriptionRemoved => "subscriptionRemoved",
            Self::Missed => "missed",
        }
    }
}

/// One subscription as the emulator keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct Subscription {
    pub id: String,
    /// Mailbox key (lower-case UPN) and folder id the resource names.
    pub mailbox: String,
    pub folder_id: String,
    pub resource: String,
    pub change_type: String,
    pub notification_url: String,
    pub lifecycle_notification_url: Option<String>,
    pub client_state: Option<String>,
    pub expiration: DateTime<Utc>,
    /// Times the expiration was extended with PATCH.
    pub renewals: u32,
}

/// What tests read back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NotificationCounters {
    pub created: u64,
    pub renewed: u64,
    pub deleted: u64,
    /// Subscriptions that reached their expiration without renewal.
    pub expired: u64,
    /// Creations refused (validation failed, expiration too far, bad resource).
    pub refused: u64,
    pub validation_calls: u64,
    /// Notification POSTs sent (duplicates included) and answered 2xx.
    pub sent: u64,
    pub accepted: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub lifecycle_sent: u64,
}

/// The subscriptions, the switches and the emulator clock.
#[derive(Default)]
pub struct Registry {
    subscriptions: Vec<Subscription>,
    faults: NotificationFaults,
    clock_offset: chrono::Duration,
    counters: NotificationCounters,
}

impl Registry {
    /// Emulator time.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.clock_offset
    }

    /// Drops subscriptions whose expiration has passed.
    fn expire_due(&mut self) {
        let now = self.now();
        let before = self.subscriptions.len();
        self.subscriptions.retain(|s| s.expiration > now);
        self.counters.expired += (before - self.subscriptions.len()) as u64;
    }

    fn latest_allowed(&self) -> DateTime<Utc> {
        self.now() + chrono::Duration::minutes(self.faults.max_expiration_minutes)
    }

    fn find(&mut self, id: &str) -> Option<&mut Subscription> {
        self.expire_due();
        self.subscriptions.iter_mut().find(|s| s.id == id)
    }
}

/// The routes, merged into the Graph router.
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1.0/subscriptions", post(create).get(list))
        .route("/v1.0/subscriptions/{id}", patch(renew).delete(remove))
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({"error": {"code": code, "message": message,
        "innerError": {"date": Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
                       "request-id": uuid::Uuid::new_v4().to_string()}}});
    (status, axum::Json(body)).into_response()
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .and_then(|token| shared.world().check_token(token, std::time::Instant::now()))
        .is_some()
}

fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "InvalidAuthenticationToken",
        "Access token has expired or is not yet valid.",
    )
}

fn render(subscription: &Subscription) -> Value {
    json!({
        "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#subscriptions/$entity",
        "id": subscription.id,
        "resource": subscription.resource,
        "applicationId": super::DEFAULT_CLIENT_ID,
        "changeType": subscription.change_type,
        "clientState": subscription.client_state,
        "notificationUrl": subscription.notification_url,
        "lifecycleNotificationUrl": subscription.lifecycle_notification_url,
        "expirationDateTime": subscription.expiration.to_rfc3339_opts(SecondsFormat::Micros, true),
        "latestSupportedTlsVersion": "v1_2",
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    change_type: String,
    notification_url: String,
    #[serde(default)]
    lifecycle_notification_url: Option<String>,
    resource: String,
    expiration_date_time: DateTime<Utc>,
    #[serde(default)]
    client_state: Option<String>,
}

/// `users/{id}/mailFolders/{folder}/messages`, each key also written as `users('{id}')`,
/// with or without a leading slash: the mailbox and the folder.
pub fn parse_resource(resource: &str) -> Option<(String, String)> {
    // Flatten `name('key')` into `name`, `key`.
    let mut parts = Vec::new();
    for segment in resource.trim_start_matches('/').split('/') {
        match segment.split_once("('") {
            Some((name, key)) => {
                parts.push(name.to_string());
                parts.push(key.strip_suffix("')")?.to_string());
            }
            None => parts.push(segment.to_string()),
        }
    }
    let [users, user, folders, folder, messages] = parts.as_slice() else {
        return None;
    };
    if !(users.eq_ignore_ascii_case("users")
        && folders.eq_ignore_ascii_case("mailFolders")
        && messages.eq_ignore_ascii_case("messages"))
    {
        return None;
    }
    let user = percent_encoding::percent_decode_str(user)
        .decode_utf8()
        .ok()?
        .into_owned();
    (!user.is_empty() && !folder.is_empty()).then(|| (user, folder.clone()))
}

async fn create(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    let Ok(body) = serde_json::from_slice::<CreateBody>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "Invalid request body.",
        );
    };
    match admit_creation(&shared, &body) {
        Ok(target) => finish_creation(shared, body, target).await,
        Err(refusal) => {
            lock(&shared.subscriptions).counters.refused += 1;
            let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_REQUEST);
            error(status, &refusal.code, &refusal.message)
        }
    }
}

/// Checks what can be checked without calling out: change type, resource, expiration.
fn admit_creation(shared: &Shared, body: &CreateBody) -> Result<(String, String), ApiError> {
    let bad = |message: &str| ApiError::new(400, "ExtensionError", message);
    if !body
        .change_type
        .split(',')
        .all(|kind| matches!(kind.trim(), "created" | "updated" | "deleted"))
    {
        return Err(bad("Invalid changeType."));
    }
    let Some((user, folder)) = parse_resource(&body.resource) else {
        return Err(ApiError::new(
            400,
            "InvalidRequest",
            "Resource is not supported.",
        ));
    };
    let target = {
        let world = shared.world();
        let mailbox = world.find_mailbox(&user);
        let folder = mailbox.and_then(|m| world.find_folder(m, &folder).map(|f| (m, f)));
        folder.map(|(m, f)| (world.mailbox_key(m), world.folder_id(m, f)))
    };
    let Some(target) = target else {
        return Err(ApiError::new(
            404,
            "ResourceNotFound",
            "Resource could not be discovered.",
        ));
    };
    let registry = lock(&shared.subscriptions);
    if body.expiration_date_time <= registry.now() {
        return Err(bad("Subscription expiration must be in the future."));
    }
    if body.expiration_date_time > registry.latest_allowed() {
        let message = format!(
            "Subscription expiration can only be {} minutes in the future.",
            registry.faults.max_expiration_minutes
        );
        return Err(bad(&message));
    }
    Ok(target)
}

async fn finish_creation(
    shared: Arc<Shared>,
    body: CreateBody,
    (mailbox, folder_id): (String, String),
) -> Response {
    let unreachable = lock(&shared.subscriptions).faults.unreachable;
    let mut urls = vec![body.notification_url.clone()];
    urls.extend(body.lifecycle_notification_url.clone());
    for url in &urls {
        if unreachable || !validate(&shared, url).await {
            lock(&shared.subscriptions).counters.refused += 1;
            return error(
                StatusCode::BAD_REQUEST,
                "ValidationError",
                "Subscription validation request failed. Notification endpoint must respond with 200 OK to validation request.",
            );
        }
    }
    let subscription = Subscription {
        id: uuid::Uuid::new_v4().to_string(),
        mailbox,
        folder_id,
        resource: body.resource,
        change_type: body.change_type,
        notification_url: body.notification_url,
        lifecycle_notification_url: body.lifecycle_notification_url,
        client_state: body.client_state,
        expiration: body.expiration_date_time,
        renewals: 0,
    };
    let rendered = render(&subscription);
    let mut registry = lock(&shared.subscriptions);
    registry.counters.created += 1;
    registry.subscriptions.push(subscription);
    (StatusCode::CREATED, axum::Json(rendered)).into_response()
}

/// The validation handshake: POST `url?validationToken=...`; the answer must be `200`, plain
/// text, the token itself, within [`VALIDATION_TIMEOUT`].
async fn validate(shared: &Shared, url: &str) -> bool {
    lock(&shared.subscriptions).counters.validation_calls += 1;
    // Characters that need escaping: the endpoint must decode the query.
    let token = format!(
        "Validation: Testing client application reachability for subscription Request-Id: {} +/=&",
        uuid::Uuid::new_v4()
    );
    let Ok(mut target) = url::Url::parse(url) else {
        return false;
    };
    target
        .query_pairs_mut()
        .append_pair("validationToken", &token);
    let answer = shared
        .http
        .post(target)
        .header("content-type", "text/plain; charset=utf-8")
        .timeout(VALIDATION_TIMEOUT)
        .send()
        .await;
    let Ok(answer) = answer else {
        return false;
    };
    let plain = answer
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/plain"));
    answer.status() == reqwest::StatusCode::OK
        && plain
        && answer.text().await.is_ok_and(|text| text == token)
}

async fn list(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    let mut registry = lock(&shared.subscriptions);
    registry.expire_due();
    let value: Vec<Value> = registry.subscriptions.iter().map(render).collect();
    axum::Json(json!({ "value": value })).into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RenewBody {
    expiration_date_time: DateTime<Utc>,
}

fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        "The object was not found.",
    )
}

async fn renew(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    let Ok(body) = serde_json::from_slice::<RenewBody>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "Invalid request body.",
        );
    };
    let mut registry = lock(&shared.subscriptions);
    let latest = registry.latest_allowed();
    let max = registry.faults.max_expiration_minutes;
    let now = registry.now();
    let Some(subscription) = registry.find(&id) else {
        return not_found();
    };
    if body.expiration_date_time <= now || body.expiration_date_time > latest {
        let message = format!("Subscription expiration can only be {max} minutes in the future.");
        return error(StatusCode::BAD_REQUEST, "ExtensionError", &message);
    }
    subscription.expiration = body.expiration_date_time;
    subscription.renewals += 1;
    let rendered = render(subscription);
    registry.counters.renewed += 1;
    axum::Json(rendered).into_response()
}

async fn remove(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&shared, &headers) {
        return unauthorized();
    }
    let mut registry = lock(&shared.subscriptions);
    if registry.find(&id).is_none() {
        return not_found();
    }
    registry.subscriptions.retain(|s| s.id != id);
    registry.counters.deleted += 1;
    StatusCode::NO_CONTENT.into_response()
}

/// One notification on its way: where, and the JSON body.
struct Outgoing {
    url: String,
    body: Value,
    /// Wait before sending.
    wait: Duration,
}

impl Shared {
    /// Notifies the subscriptions to `folder_id` of `mailbox` (subscribed to `created`) of a
    /// new message, as the switches say.
    pub(crate) fn notify_created(
        self: &Arc<Self>,
        mailbox: &str,
        folder_id: &str,
        message_id: &str,
    ) {
        let outgoing = {
            let mut registry = lock(&self.subscriptions);
            registry.expire_due();
            let faults = registry.faults.clone();
            let matching: Vec<Subscription> = registry
                .subscriptions
                .iter()
                .filter(|s| s.mailbox == mailbox && s.folder_id == folder_id)
                .filter(|s| {
                    s.change_type
                        .split(',')
                        .any(|kind| kind.trim() == "created")
                })
                .cloned()
                .collect();
            let mut outgoing = Vec::new();
            for subscription in matching {
                let (lost, copies, jitter) = {
                    let mut traffic = self.traffic();
                    let lost = traffic.rng.random::<f64>() < faults.loss_ratio;
                    let twice = traffic.rng.random::<f64>() < faults.duplicate_ratio;
                    let jitter = if faults.reorder_window_ms > 0 {
                        traffic.rng.random_range(0..faults.reorder_window_ms)
                    } else {
                        0
                    };
                    (lost, if twice { 2 } else { 1 }, jitter)
                };
                if lost {
                    registry.counters.lost += 1;
                    continue;
                }
                if copies > 1 {
                    registry.counters.duplicated += 1;
                }
                let body = change_body(&subscription, message_id);
                for copy in 0..copies {
                    outgoing.push(Outgoing {
                        url: subscription.notification_url.clone(),
                        body: body.clone(),
                        wait: Duration::from_millis(faults.delay_ms + jitter + copy * 10),
                    });
                }
            }
            outgoing
        };
        for item in outgoing {
            self.send_later(item, false);
        }
    }

    /// See [`super::GraphEmulator::lifecycle_event`].
    pub(crate) fn lifecycle_event(
        self: &Arc<Self>,
        subscription_id: &str,
        event: LifecycleEvent,
    ) -> bool {
        let subscription = {
            let mut registry = lock(&self.subscriptions);
            let Some(found) = registry.find(subscription_id).cloned() else {
                return false;
            };
            if event == LifecycleEvent::SubscriptionRemoved {
                registry.subscriptions.retain(|s| s.id != subscription_id);
            }
            found
        };
        let url = subscription
            .lifecycle_notification_url
            .clone()
            .unwrap_or_else(|| subscription.notification_url.clone());
        self.send_later(
            Outgoing {
                url,
                body: lifecycle_body(&subscription, event),
                wait: Duration::ZERO,
            },
            true,
        );
        true
    }

    /// The switches, for the admin API.
    pub(crate) fn notification_faults(&self) -> NotificationFaults {
        lock(&self.subscriptions).faults.clone()
    }

    pub(crate) fn set_notification_faults(&self, faults: NotificationFaults) {
        lock(&self.subscriptions).faults = faults;
    }

    /// The live subscriptions' ids, resources and expirations, for the admin API.
    pub(crate) fn subscription_list(&self) -> Value {
        let mut registry = lock(&self.subscriptions);
        registry.expire_due();
        Value::Array(registry.subscriptions.iter().map(render).collect())
    }

    fn send_later(self: &Arc<Self>, item: Outgoing, lifecycle: bool) {
        let shared = self.clone();
        tokio::spawn(async move {
            if !item.wait.is_zero() {
                tokio::time::sleep(item.wait).await;
            }
            let answer = shared
                .http
                .post(&item.url)
                .json(&item.body)
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            let accepted = answer.is_ok_and(|answer| answer.status().is_success());
            let mut registry = lock(&shared.subscriptions);
            if lifecycle {
                registry.counters.lifecycle_sent += 1;
            } else {
                registry.counters.sent += 1;
            }
            if accepted {
                registry.counters.accepted += 1;
            }
        });
    }
}

fn change_body(subscription: &Subscription, message_id: &str) -> Value {
    let resource = format!("Users/{}/Messages/{message_id}", subscription.mailbox);
    json!({"value": [{
        "subscriptionId": subscription.id,
        "subscriptionExpirationDateTime":
            subscription.expiration.to_rfc3339_opts(SecondsFormat::Micros, true),
        "changeType": "created",
        "resource": resource,
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.Message",
            "@odata.id": resource,
            "@odata.etag": "W/\"CQAAABYAAAB7\"",
            "id": message_id,
        },
        "clientState": subscription.client_state,
        "tenantId": super::DEFAULT_TENANT,
    }]})
}

fn lifecycle_body(subscription: &Subscription, event: LifecycleEvent) -> Value {
    json!({"value": [{
        "subscriptionId": subscription.id,
        "subscriptionExpirationDateTime":
            subscription.expiration.to_rfc3339_opts(SecondsFormat::Micros, true),
        "tenantId": super::DEFAULT_TENANT,
        "clientState": subscription.client_state,
        "lifecycleEvent": event.as_str(),
    }]})
}

/// What tests do with subscriptions, through the emulator handle.
impl super::GraphEmulator {
    /// The live subscriptions (expired ones dropped first).
    pub fn subscriptions(&self) -> Vec<Subscription> {
        let mut registry = lock(&self.shared.subscriptions);
        registry.expire_due();
        registry.subscriptions.clone()
    }

    pub fn notification_counters(&self) -> NotificationCounters {
        lock(&self.shared.subscriptions).counters.clone()
    }

    pub fn notification_faults(&self) -> NotificationFaults {
        lock(&self.shared.subscriptions).faults.clone()
    }

    pub fn update_notification_faults(&self, change: impl FnOnce(&mut NotificationFaults)) {
        change(&mut lock(&self.shared.subscriptions).faults);
    }

    /// Emulator time.
    pub fn now(&self) -> DateTime<Utc> {
        lock(&self.shared.subscriptions).now()
    }

    /// Moves emulator time forward; subscriptions whose expiration passes are gone.
    pub fn advance_clock(&self, by: Duration) {
        let mut registry = lock(&self.shared.subscriptions);
        registry.clock_offset += chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        registry.expire_due();
    }

    /// Sends a lifecycle event for a subscription to its lifecycle URL (its notification URL
    /// when it has none). `subscriptionRemoved` removes the subscription first. Returns
    /// whether the subscription existed.
    pub fn lifecycle_event(&self, subscription_id: &str, event: LifecycleEvent) -> bool {
        self.shared.lifecycle_event(subscription_id, event)
    }

    /// Sends any JSON body to a subscription's notification URL, as a forger would (a wrong
    /// clientState, a hostile body).
    pub fn send_raw_notification(&self, url: &str, body: Value) {
        self.shared.send_later(
            Outgoing {
                url: url.to_string(),
                body,
                wait: Duration::ZERO,
            },
            false,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::parse_resource;

    #[test]
    fn resources_in_both_spellings() {
        let expected = Some(("ops@contoso.com".to_string(), "inbox".to_string()));
        assert_eq!(
            parse_resource("users/ops@contoso.com/mailFolders/inbox/messages"),
            expected
        );
        assert_eq!(
            parse_resource("/users('ops%40contoso.com')/mailFolders('inbox')/messages"),
            expected
        );
        assert_eq!(
            parse_resource("users/ops@contoso.com/mailFolders('inbox')/messages"),
            expected
        );
        assert_eq!(parse_resource("me/messages"), None);
        assert_eq!(parse_resource("users/x/events"), None);
    }
}
