//! The validating admission webhook: `POST /validate-mailboxpoll` checks a MailboxPoll's
//! `spec.filter` and `spec.startFrom` with the code the reconciler uses, so that `kubectl
//! apply` refuses what the operator would only report later as a condition. The API server
//! calls webhooks over https only, hence a listener of its own with a certificate
//! ([`tls`]).

pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::serve::Listener;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::response::{StatusCause, StatusDetails};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::selection::{Filter, StartFrom};

/// The path the ValidatingWebhookConfiguration names.
pub const VALIDATE_PATH: &str = "/validate-mailboxpoll";

/// Largest AdmissionReview read. The API server takes request bodies of up to 3 MiB and etcd
/// objects of up to 1.5 MiB; an update's review carries the object and the old one.
pub const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

/// The code of a denial: the spec is invalid, as the API server's own validation says.
const INVALID_CODE: u16 = 422;

/// Where and with which certificate the admission listener serves.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    pub addr: SocketAddr,
    /// PEM certificate chain, server certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Serves the webhook until `stop`: binds, loads the certificate (both fail here, before
/// anything else starts) and watches its files for a renewal.
pub async fn start(
    config: &AdmissionConfig,
    stop: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<std::io::Result<()>>), tls::TlsError> {
    let cert = tls::ReloadingCert::load(config.cert.clone(), config.key.clone())?;
    let listener =
        tls::TlsListener::bind(config.addr, tls::server_config(cert.clone())?, stop.clone())
            .await?;
    let local = listener
        .local_addr()
        .map_err(|source| tls::TlsError::Bind {
            addr: config.addr,
            source,
        })?;
    tokio::spawn(cert.watch(stop.clone()));
    let task = tokio::spawn(async move {
        axum::serve(listener, router())
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
    tracing::info!(addr = %local, path = VALIDATE_PATH, "serving the admission webhook over TLS");
    Ok((local, task))
}

pub fn router() -> Router {
    Router::new()
        .route(VALIDATE_PATH, post(validate))
        .layer(DefaultBodyLimit::max(MAX_REVIEW_BYTES))
}

async fn validate(body: Bytes) -> Response {
    let (code, review) = answer(&body);
    (code, axum::Json(review)).into_response()
}

/// The answer to one AdmissionReview body: an unreadable one is refused with 400 (the API
/// server then applies the webhook's failure policy), a readable one gets a verdict.
pub fn answer(body: &[u8]) -> (StatusCode, AdmissionReview<DynamicObject>) {
    let request = match read_request(body) {
        Ok(request) => request,
        Err(detail) => {
            tracing::warn!(%detail, "unreadable admission review refused");
            return (
                StatusCode::BAD_REQUEST,
                AdmissionResponse::invalid(detail).into_review(),
            );
        }
    };
    (StatusCode::OK, verdict(&request).into_review())
}

fn read_request(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, String> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)
        .map_err(|error| format!("the body is not an AdmissionReview: {error}"))?;
    review
        .try_into()
        .map_err(|error| format!("the AdmissionReview has no request: {error}"))
}

/// Allowed, or denied with 422 and the first invalid field: in the message and as the cause
/// kubectl prints (`The MailboxPoll "x" is invalid: spec.filter: ...`).
pub fn verdict(request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return response;
    }
    let Some(object) = &request.object else {
        let mut response = response.deny("request.object is missing");
        response.result.code = 400;
        response.result.reason = "BadRequest".into();
        return response;
    };
    let old_spec = request.old_object.as_ref().and_then(|o| o.data.get("spec"));
    match check_spec(object.data.get("spec"), old_spec) {
        Ok(()) => response,
        Err(invalid) => {
            tracing::info!(
                namespace = request.namespace.as_deref().unwrap_or_default(),
                name = %request.name,
                field = invalid.field,
                "admission denied a MailboxPoll"
            );
            deny_invalid(response, request, &invalid)
        }
    }
}

fn deny_invalid(
    response: AdmissionResponse,
    request: &AdmissionRequest<DynamicObject>,
    invalid: &InvalidField,
) -> AdmissionResponse {
    let mut response = response.deny(invalid);
    response.result.code = INVALID_CODE;
    response.result.reason = "Invalid".into();
    response.result.details = Some(StatusDetails {
        name: request.name.clone(),
        group: request.kind.group.clone(),
        kind: request.kind.kind.clone(),
        uid: String::new(),
        causes: vec![StatusCause {
            reason: "FieldValueInvalid".into(),
            message: invalid.detail.clone(),
            field: invalid.field.into(),
        }],
        retry_after_seconds: 0,
    });
    response
}

/// A spec field the schema let through and mailpoll cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct InvalidField {
    pub field: &'static str,
    pub detail: String,
}

/// The checks the CRD schema cannot make: the filter compiles and type-checks, the start is
/// `all`, `now` or an RFC 3339 time. Fields of another type are the schema's to refuse. On an
/// update, a field left as it was is not checked again: an invalid value stored while the
/// webhook was down (the operator reports it) must not block unrelated edits, such as
/// `suspend: true` or a label.
pub fn check_spec(spec: Option<&Value>, old_spec: Option<&Value>) -> Result<(), InvalidField> {
    let changed = |field: &str| old_spec.is_none() || text(spec, field) != text(old_spec, field);
    if changed("startFrom") {
        StartFrom::parse(text(spec, "startFrom")).map_err(|error| InvalidField {
            field: "spec.startFrom",
            detail: strip_field("spec.startFrom", &error.to_string()),
        })?;
    }
    if let Some(source) = text(spec, "filter").filter(|_| changed("filter")) {
        Filter::compile(source).map_err(|error| InvalidField {
            field: "spec.filter",
            detail: error.detail,
        })?;
    }
    Ok(())
}

/// The string `field` of a spec, if it is one.
fn text<'a>(spec: Option<&'a Value>, field: &str) -> Option<&'a str> {
    spec.and_then(|s| s.get(field)).and_then(Value::as_str)
}

/// `detail` of a message that reads `field: detail`.
fn strip_field(field: &str, message: &str) -> String {
    message
        .strip_prefix(field)
        .and_then(|rest| rest.strip_prefix(": "))
        .unwrap_or(message)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(operation: &str, object: Value) -> Vec<u8> {
        review_with_old(operation, object, Value::Null)
    }

    fn review_with_old(operation: &str, object: Value, old_object: Value) -> Vec<u8> {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "mailpoll.dev", "version": "v1alpha1", "kind": "MailboxPoll"},
                "resource": {"group": "mailpoll.dev", "version": "v1alpha1", "resource": "mailboxpolls"},
                "name": "inbox",
                "namespace": "mail",
                "operation": operation,
                "userInfo": {"username": "admin"},
                "object": object,
                "oldObject": old_object,
                "dryRun": false
            }
        })
        .to_string()
        .into_bytes()
    }

    fn mailbox_poll(spec: Value) -> Value {
        json!({
            "apiVersion": "mailpoll.dev/v1alpha1",
            "kind": "MailboxPoll",
            "metadata": {"name": "inbox", "namespace": "mail"},
            "spec": spec
        })
    }

    fn response(body: &[u8]) -> (StatusCode, AdmissionResponse) {
        let (code, review) = answer(body);
        let response = review.response.expect("every answer carries a response");
        (code, response)
    }

    #[test]
    fn a_valid_filter_is_allowed_with_the_request_uid() {
        let spec = json!({"filter": "message.hasAttachments && message.importance == 'high'"});
        let (code, response) = response(&review("CREATE", mailbox_poll(spec)));
        assert_eq!(code, StatusCode::OK);
        assert!(response.allowed);
        assert_eq!(response.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
    }

    #[test]
    fn an_undeclared_reference_is_denied_naming_the_field() {
        let spec = json!({"filter": "mesage.isRead == false"});
        let (code, response) = response(&review("UPDATE", mailbox_poll(spec)));
        assert_eq!(code, StatusCode::OK);
        assert!(!response.allowed);
        assert_eq!(response.result.code, 422);
        assert_eq!(response.result.reason, "Invalid");
        assert!(
            response.result.message.starts_with("spec.filter: "),
            "{}",
            response.result.message
        );
        assert!(
            response.result.message.contains("mesage"),
            "{}",
            response.result.message
        );
        let details = response.result.details.expect("details name the field");
        assert_eq!(details.kind, "MailboxPoll");
        assert_eq!(details.name, "inbox");
        assert_eq!(details.causes.len(), 1);
        assert_eq!(details.causes[0].field, "spec.filter");
        assert!(!details.causes[0].message.starts_with("spec.filter"));
    }

    #[test]
    fn a_syntax_error_and_a_type_error_are_denied() {
        for filter in ["message.subject ==", "message.subject + 1 == 2"] {
            let spec = json!({"filter": filter});
            let (_, response) = response(&review("CREATE", mailbox_poll(spec)));
            assert!(!response.allowed, "{filter} allowed");
            assert!(
                response.result.message.starts_with("spec.filter: "),
                "{}",
                response.result.message
            );
        }
    }

    #[test]
    fn an_update_that_leaves_an_invalid_filter_as_it_was_is_allowed() {
        let stored = mailbox_poll(json!({"filter": "mesage.isRead"}));
        let suspended = mailbox_poll(json!({"filter": "mesage.isRead", "suspend": true}));
        let (_, unrelated) = response(&review_with_old("UPDATE", suspended, stored.clone()));
        assert!(unrelated.allowed, "unrelated edits go through");
        let retyped = mailbox_poll(json!({"filter": "mesage.isRead == true"}));
        let (_, changed) = response(&review_with_old("UPDATE", retyped, stored));
        assert!(!changed.allowed, "a changed filter is checked");
    }

    #[test]
    fn an_invalid_start_is_denied_naming_the_field() {
        let spec = json!({"startFrom": "yesterday"});
        let (_, response) = response(&review("CREATE", mailbox_poll(spec)));
        assert!(!response.allowed);
        assert!(
            response.result.message.starts_with("spec.startFrom: "),
            "{}",
            response.result.message
        );
    }

    #[test]
    fn no_filter_and_deletions_are_allowed() {
        let (_, response_create) = response(&review("CREATE", mailbox_poll(json!({}))));
        assert!(response_create.allowed);
        let (_, response_delete) = response(&review("DELETE", Value::Null));
        assert!(response_delete.allowed);
    }

    #[test]
    fn a_create_without_object_is_denied_as_a_bad_request() {
        let (code, response) = response(&review("CREATE", Value::Null));
        assert_eq!(code, StatusCode::OK);
        assert!(!response.allowed);
        assert_eq!(response.result.code, 400);
        assert_eq!(response.result.message, "request.object is missing");
    }

    #[test]
    fn malformed_bodies_are_refused_one_by_one() {
        for body in [
            &b"{not json"[..],
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            b"[]",
            b"",
        ] {
            let (code, response) = response(body);
            assert_eq!(code, StatusCode::BAD_REQUEST, "{body:?}");
            assert!(!response.allowed);
            assert!(!response.result.message.is_empty());
        }
    }
}
