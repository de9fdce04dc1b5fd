//! The admin API under `/_admin/`, so tests in other processes (and people driving the
//! `graph-emulator` binary) can do what the in-process handle does:
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/_admin/counters` | | `Counters` |
//! | POST | `/_admin/counters/reset` | | 204 |
//! | GET, PUT | `/_admin/faults` | `Faults` (PUT) | `Faults` |
//! | POST | `/_admin/apps` | `AppRegistration` | 204 |
//! | POST | `/_admin/tokens/revoke` | | 204 |
//! | POST | `/_admin/mailboxes` | `{"upn"}` | `{"objectId"}` |
//! | PUT | `/_admin/mailboxes/{upn}/state` | `{"state":"enabled"\|"notEnabledForRest"\|"accessDenied"}` | 204 |
//! | POST | `/_admin/mailboxes/{upn}/evict-delta` | | 204 |
//! | POST | `/_admin/mailboxes/{upn}/folders/{folder}/messages` | `{"count"}` or `{"messages":[NewMessage],"late"}` | `[MessageIds]` |
//! | GET | `/_admin/mailboxes/{upn}/messages/{id}` | | the message |
//! | DELETE | `/_admin/mailboxes/{upn}/messages/{id}` | | 204 |
//! | POST | `/_admin/mailboxes/{upn}/messages/{id}/move` | `{"destination"}` | `MessageIds` |
//! | PUT | `/_admin/mailboxes/{upn}/messages/{id}/read` | `{"isRead"}` | 204 |
//! | GET, PUT | `/_admin/notification-faults` | `NotificationFaults` (PUT) | `NotificationFaults` |
//! | GET | `/_admin/subscriptions` | | the live subscriptions |
//! | POST | `/_admin/subscriptions/{id}/lifecycle/{event}` | | 204 (404: no such subscription) |

use std::sync::Arc;

use axum::Json;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use percent_encoding::percent_decode_str;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::subscriptions::{LifecycleEvent, NotificationFaults};
use super::{AppRegistration, Faults, MailboxState, NewMessage, Shared};

#[derive(Deserialize)]
struct NewMailbox {
    upn: String,
}

#[derive(Deserialize)]
struct StateChange {
    state: MailboxState,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct AddMessages {
    count: Option<usize>,
    messages: Vec<NewMessage>,
    late: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReadFlag {
    is_read: bool,
}

#[derive(Deserialize)]
struct MoveTo {
    destination: String,
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|error| format!("invalid body: {error}"))
}

fn bad_request(error: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": error}))).into_response()
}

fn failed(error: anyhow::Error) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("{error:#}")})),
    )
        .into_response()
}

fn done(result: anyhow::Result<()>) -> Response {
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => failed(error),
    }
}

pub(crate) fn handle(shared: &Arc<Shared>, method: &Method, path: &str, body: &[u8]) -> Response {
    match route(shared, method, path, body) {
        Ok(response) => response,
        Err(error) => bad_request(error),
    }
}

fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    body: &[u8],
) -> Result<Response, String> {
    let segments: Vec<String> = path
        .trim_start_matches("/_admin/")
        .split('/')
        .filter(|segment| !segment.is_empty())
        .map(|segment| percent_decode_str(segment).decode_utf8_lossy().into_owned())
        .collect();
    let parts: Vec<&str> = segments.iter().map(String::as_str).collect();
    Ok(match (method.as_str(), parts.as_slice()) {
        ("GET", ["counters"]) => Json(shared.traffic().counters.clone()).into_response(),
        ("POST", ["counters", "reset"]) => {
            shared.reset_counters();
            StatusCode::NO_CONTENT.into_response()
        }
        ("GET", ["faults"]) => Json(shared.faults()).into_response(),
        ("PUT", ["faults"]) => {
            let faults: Faults = parse(body)?;
            shared.set_faults(faults.clone());
            Json(faults).into_response()
        }
        ("POST", ["apps"]) => {
            let app: AppRegistration = parse(body)?;
            shared.world().add_app(app);
            StatusCode::NO_CONTENT.into_response()
        }
        ("POST", ["tokens", "revoke"]) => {
            shared.world().revoke_tokens();
            StatusCode::NO_CONTENT.into_response()
        }
        ("POST", ["mailboxes"]) => {
            let new: NewMailbox = parse(body)?;
            let object_id = shared.world().add_mailbox(&new.upn);
            Json(json!({"objectId": object_id})).into_response()
        }
        ("PUT", ["mailboxes", upn, "state"]) => {
            let change: StateChange = parse(body)?;
            done(shared.set_mailbox_state(upn, change.state))
        }
        ("POST", ["mailboxes", upn, "evict-delta"]) => done(shared.evict_delta_tokens(upn)),
        ("POST", ["mailboxes", upn, "folders", folder, "messages"]) => {
            let add: AddMessages = parse(body)?;
            let mut messages = add.messages;
            messages.extend(std::iter::repeat_n(
                NewMessage::default(),
                add.count.unwrap_or(0),
            ));
            match shared.add_messages(upn, folder, messages, add.late) {
                Ok(ids) => Json(ids).into_response(),
                Err(error) => failed(error),
            }
        }
        ("GET", ["mailboxes", upn, "messages", id]) => match shared.message(upn, id) {
            Ok(Some(message)) => Json(message).into_response(),
            Ok(None) => failed(anyhow::anyhow!("no message {id} in {upn}")),
            Err(error) => failed(error),
        },
        ("DELETE", ["mailboxes", upn, "messages", id]) => done(shared.delete_message(upn, id)),
        ("POST", ["mailboxes", upn, "messages", id, "move"]) => {
            let to: MoveTo = parse(body)?;
            match shared.move_message(upn, id, &to.destination) {
                Ok(ids) => Json(ids).into_response(),
                Err(error) => failed(error),
            }
        }
        ("PUT", ["mailboxes", upn, "messages", id, "read"]) => {
            let flag: ReadFlag = parse(body)?;
            done(shared.set_read(upn, id, flag.is_read))
        }
        ("GET", ["notification-faults"]) => Json(shared.notification_faults()).into_response(),
        ("PUT", ["notification-faults"]) => {
            let faults: NotificationFaults = parse(body)?;
            shared.set_notification_faults(faults.clone());
            Json(faults).into_response()
        }
        ("GET", ["subscriptions"]) => Json(shared.subscription_list()).into_response(),
        ("POST", ["subscriptions", id, "lifecycle", event]) => {
            let event = LifecycleEvent::parse(event)
                .ok_or_else(|| format!("unknown lifecycle event {event:?}"))?;
            if shared.lifecycle_event(id, event) {
                StatusCode::NO_CONTENT.into_response()
            } else {
                failed(anyhow::anyhow!("no subscription {id}"))
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no admin endpoint {method} {path}")})),
        )
            .into_response(),
    })
}
