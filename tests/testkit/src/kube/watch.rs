//! Watch streams: resume from a resourceVersion out of the history (410 Expired once it is
//! compacted away), initial events for unversioned watches and streaming lists
//! (`sendInitialEvents`, ended by the `k8s.io/initial-events-end` bookmark), periodic
//! bookmarks and `timeoutSeconds`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::builtin;
use super::resource::ResourceType;
use super::select::{FieldSelector, LabelSelector};
use super::server::Shared;
use super::status::ApiError;
use super::store::{Change, EventType};
use super::table::{self, IncludeObject};

/// A watch as requested.
pub struct WatchRequest {
    pub rt: Arc<ResourceType>,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub send_initial_events: Option<bool>,
    pub bookmarks: bool,
    pub timeout: Duration,
    /// Rows of a Table instead of objects (kubectl get -w).
    pub table: Option<IncludeObject>,
}

enum Start {
    /// Initial ADDED events, then changes after the given version.
    Initial {
        objects: Vec<Value>,
        from: u64,
        end_bookmark: bool,
    },
    /// Changes after the given version.
    Resume(u64),
    /// The version is compacted away.
    Expired(String),
}

/// Starts a watch; the body streams events until timeout, disconnect or shutdown.
pub fn start(shared: Arc<Shared>, request: WatchRequest) -> Result<Body, ApiError> {
    let send_initial = request.send_initial_events == Some(true);
    if request.send_initial_events.is_some() {
        if request.resource_version_match.as_deref() != Some("NotOlderThan") {
            return Err(ApiError::unprocessable(
                "resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        if send_initial && !request.bookmarks {
            return Err(ApiError::unprocessable(
                "allowWatchBookmarks: Forbidden: sendInitialEvents requires allowWatchBookmarks=true",
            ));
        }
    } else if request.resource_version_match.is_some() {
        return Err(ApiError::unprocessable(
            "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        ));
    }
    let requested: Option<u64> = match request.resource_version.as_deref() {
        None | Some("") => None,
        Some(text) => Some(
            text.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {text}")))?,
        ),
    };
    let mut changes = shared.notify.subscribe();
    let start = {
        let store = shared.lock_store();
        let current = store.resource_version();
        match requested {
            _ if send_initial => Start::Initial {
                objects: store.snapshot(
                    &request.rt,
                    request.namespace.as_deref(),
                    &request.labels,
                    &request.fields,
                ),
                from: current,
                end_bookmark: true,
            },
            // Asked explicitly for no initial events: start at the most recent version.
            None if request.send_initial_events == Some(false) => Start::Resume(current),
            None | Some(0) => Start::Initial {
                objects: store.snapshot(
                    &request.rt,
                    request.namespace.as_deref(),
                    &request.labels,
                    &request.fields,
                ),
                from: current,
                end_bookmark: false,
            },
            Some(version) if version < store.compacted() => Start::Expired(format!(
                "too old resource version: {version} ({})",
                store.compacted() + 1
            )),
            Some(version) => Start::Resume(version),
        }
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let mut shutdown = shared.shutdown.subscribe();
    let mut silent = shared.silent.subscribe();
    let bookmark_interval = shared.options.bookmark_interval;
    let open = shared.watch_opened();
    tokio::spawn(async move {
        let _open = open;
        let send = |event: Value| {
            let tx = tx.clone();
            async move {
                let mut line = event.to_string();
                line.push('\n');
                tx.send(Ok(Bytes::from(line))).await.is_ok()
            }
        };
        let rt = request.rt.clone();
        let silenced = *silent.borrow_and_update();
        if silenced {
            return hang(&tx, &mut shutdown).await;
        }
        let mut last = match start {
            Start::Expired(message) => {
                let status = ApiError::expired(message).to_status();
                let _ = send(json!({"type": "ERROR", "object": status})).await;
                return;
            }
            Start::Resume(version) => version,
            Start::Initial {
                objects,
                from,
                end_bookmark,
            } => {
                for object in objects {
                    if !send(render(&rt, &request, EventType::Added, object)).await {
                        return;
                    }
                }
                if end_bookmark {
                    let bookmark = bookmark(&rt, from, true);
                    if !send(bookmark).await {
                        return;
                    }
                }
                from
            }
        };
        let deadline = tokio::time::sleep(request.timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval(bookmark_interval);
        ticker.tick().await;
        loop {
            let silenced = *silent.borrow_and_update();
            if silenced {
                return hang(&tx, &mut shutdown).await;
            }
            // Catch up with everything stored so far.
            let (pending, current) = {
                let store = shared.lock_store();
                (
                    store.changes_since(&rt.storage, last),
                    store.resource_version(),
                )
            };
            match pending {
                None => {
                    let status = ApiError::expired(format!(
                        "too old resource version: {last} ({})",
                        shared.lock_store().compacted() + 1
                    ))
                    .to_status();
                    let _ = send(json!({"type": "ERROR", "object": status})).await;
                    return;
                }
                Some(pending) => {
                    for change in pending {
                        let Some(kind) = selected(&request, &change) else {
                            continue;
                        };
                        let object = builtin::to_view(&rt, change.object);
                        if !send(render(&rt, &request, kind, object)).await {
                            return;
                        }
                    }
                    last = last.max(current);
                }
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = ticker.tick(), if request.bookmarks => {
                    if !send(bookmark(&rt, last, false)).await {
                        return;
                    }
                }
                _ = &mut deadline => return,
                _ = shutdown.changed() => return,
                _ = tx.closed() => return,
                silenced = async { silent.wait_for(|silent| *silent).await.is_ok() } => {
                    if silenced {
                        return hang(&tx, &mut shutdown).await;
                    }
                    return;
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(Body::from_stream(stream))
}

/// The event a change is for this watch: a modification that moves an object into the
/// selection is ADDED, out of it DELETED, as the API server's watch cache reports it.
/// A silenced watch: the connection stays open and nothing more is sent, until the client
/// gives up (or the emulator stops). Not even the watch's timeout ends it.
async fn hang(
    tx: &mpsc::Sender<Result<Bytes, Infallible>>,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) {
    tokio::select! {
        _ = tx.closed() => {}
        _ = shutdown.changed() => {}
    }
}

fn selected(request: &WatchRequest, change: &Change) -> Option<EventType> {
    if let Some(ns) = &request.namespace
        && &change.namespace != ns
    {
        return None;
    }
    if request.labels.is_empty() && request.fields.is_empty() {
        return Some(change.kind);
    }
    let wanted = |object: &Value| {
        let object = builtin::to_view(&request.rt, object.clone());
        request.labels.matches_object(&object) && request.fields.matches(&object)
    };
    let now = wanted(&change.object);
    match (change.kind, change.previous.as_ref().map(wanted)) {
        (EventType::Modified, Some(true)) if !now => Some(EventType::Deleted),
        (EventType::Modified, Some(false)) if now => Some(EventType::Added),
        (EventType::Modified, Some(false)) => None,
        (kind, _) => now.then_some(kind),
    }
}

fn render(rt: &ResourceType, request: &WatchRequest, kind: EventType, object: Value) -> Value {
    let object = match request.table {
        Some(include) => {
            let rv = object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            table::table(rt, &[object], &rv, include)
        }
        None => object,
    };
    json!({"type": kind.as_str(), "object": object})
}

fn bookmark(rt: &ResourceType, resource_version: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": resource_version.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({
        "type": "BOOKMARK",
        "object": {"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": metadata},
    })
}
