//! The notification endpoint Graph calls (`/notifications` and `/notifications/lifecycle`),
//! on every replica behind the Service: it answers the validation handshake, and answers
//! every notification `202` at once, handing the items to a background processor that checks
//! clientState and wakes the MailboxPoll. Nothing here calls Graph.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::payload::{self, Item, Signal};
use super::{store, wake};

/// Path of change notifications; lifecycle events go to [`LIFECYCLE_PATH`].
pub const NOTIFICATION_PATH: &str = "/notifications";
pub const LIFECYCLE_PATH: &str = "/notifications/lifecycle";
/// Largest notification body read (Graph's batches of basic notifications are a few KiB).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Longest validation token echoed (Graph's are well under this).
const MAX_VALIDATION_TOKEN_CHARS: usize = 1024;
/// Notification bodies waiting for the processor; beyond this they are dropped (polling is
/// the safety net) rather than holding Graph's request open.
const BACKLOG: usize = 1024;
/// Most queued bodies handled in one pass.
const DRAIN: usize = 256;

#[derive(Clone)]
struct EndpointState {
    backlog: mpsc::Sender<Vec<Item>>,
}

/// The endpoint's routes, and the processor they feed (runs until `stop`).
pub fn router(
    pool: PgPool,
    coalesce: Duration,
    stop: CancellationToken,
) -> (Router, tokio::task::JoinHandle<()>) {
    let (backlog, received) = mpsc::channel(BACKLOG);
    let processor = tokio::spawn(process(pool, coalesce, received, stop));
    let router = Router::new()
        .route(NOTIFICATION_PATH, post(receive))
        .route(LIFECYCLE_PATH, post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Arc::new(EndpointState { backlog }));
    (router, processor)
}

/// The query of a validation call (`?validationToken=...`, decoded); empty otherwise.
#[derive(Debug, Default, serde::Deserialize)]
struct ValidationQuery {
    #[serde(rename = "validationToken")]
    validation_token: Option<String>,
}

async fn receive(
    State(state): State<Arc<EndpointState>>,
    Query(query): Query<ValidationQuery>,
    body: Bytes,
) -> Response {
    if let Some(token) = query.validation_token {
        return handshake(token);
    }
    let items = match payload::parse(&body) {
        Ok(items) => items,
        Err(error) => {
            tracing::debug!(%error, "notification refused");
            return (StatusCode::BAD_REQUEST, "not a notification").into_response();
        }
    };
    if !items.is_empty() && state.backlog.try_send(items).is_err() {
        tracing::warn!("notification backlog full: notification dropped, polling catches up");
    }
    StatusCode::ACCEPTED.into_response()
}

/// Graph's validation handshake: the token back as plain text, at once.
fn handshake(token: String) -> Response {
    if token.chars().count() > MAX_VALIDATION_TOKEN_CHARS {
        return (StatusCode::BAD_REQUEST, "validation token too long").into_response();
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        token,
    )
        .into_response()
}

async fn process(
    pool: PgPool,
    coalesce: Duration,
    mut received: mpsc::Receiver<Vec<Item>>,
    stop: CancellationToken,
) {
    loop {
        let mut items = tokio::select! {
            () = stop.cancelled() => return,
            items = received.recv() => match items {
                Some(items) => items,
                None => return,
            },
        };
        // Everything that queued up meanwhile goes in the same pass: a burst wakes each
        // MailboxPoll once, however fast it arrives.
        for _ in 0..DRAIN {
            match received.try_recv() {
                Ok(more) => items.extend(more),
                Err(_) => break,
            }
        }
        if let Err(error) = handle_items(&pool, coalesce, &items).await {
            tracing::warn!(%error, "cannot act on a notification; polling catches up");
        }
    }
}

/// Acts on the items of the bodies queued together: each MailboxPoll is woken at most once.
async fn handle_items(
    pool: &PgPool,
    coalesce: Duration,
    items: &[Item],
) -> Result<(), wake::WakeError> {
    let mut woken: Vec<(String, String)> = Vec::new();
    let mut noted = Vec::new();
    for item in items {
        if item.signal == Signal::Changed
            && let Some((_, state)) = woken.iter().find(|(id, _)| id == &item.subscription_id)
        {
            // Already woken in this pass: nothing more to do, but a forged copy is still
            // reported as one.
            if !payload::client_state_matches(state, item.client_state.as_deref()) {
                tracing::warn!(subscription = %item.subscription_id, "notification with a wrong clientState dropped");
            }
            continue;
        }
        let Some(row) = store::of_subscription(pool, &item.subscription_id).await? else {
            tracing::debug!(subscription = %item.subscription_id, "notification for an unknown subscription dropped");
            continue;
        };
        if !payload::client_state_matches(&row.client_state, item.client_state.as_deref()) {
            tracing::warn!(%row, "notification with a wrong clientState dropped");
            continue;
        }
        let wakes = match item.signal {
            Signal::Changed | Signal::Missed => true,
            Signal::ReauthorizationRequired => {
                store::request_renewal(pool, &item.subscription_id).await?;
                false
            }
            Signal::SubscriptionRemoved => {
                store::forget_subscription(pool, &item.subscription_id).await?;
                true
            }
        };
        if item.signal != Signal::Changed {
            tracing::info!(%row, signal = ?item.signal, "subscription lifecycle event");
        }
        if !noted.contains(&row.mailbox_uid) {
            noted.push(row.mailbox_uid);
            store::note_notification(pool, row.mailbox_uid).await?;
        }
        if wakes && !woken.iter().any(|(id, _)| id == &item.subscription_id) {
            woken.push((item.subscription_id.clone(), row.client_state.clone()));
            let key = format!("{}/{}", row.namespace, row.name);
            wake::wake(pool, row.mailbox_uid, &key, coalesce).await?;
        }
    }
    Ok(())
}
