//! Graph errors, typed by what the operator does about them. Decisions rest on the HTTP
//! status first and the error code second (case-insensitive), never on message text.

use std::time::Duration;

use serde::Deserialize;

use super::auth::hint;
use crate::reason::Reason;
use crate::storable;

/// Longest Graph error message kept in an error (they can be long; they are for people).
const MAX_MESSAGE_BYTES: usize = 1024;

/// A failed Graph (or token endpoint) call. Display never includes secrets or tokens.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GraphError {
    /// Bad or unknown client credentials, or a token refused twice in a row.
    #[error("authentication failed: {message}{}", rid(request_id))]
    AuthenticationFailed {
        message: String,
        request_id: Option<String>,
    },
    /// 403: the app may not access this mailbox, or lacks a permission (e.g. Mail.ReadWrite).
    #[error("access denied ({code}): {message}{}", rid(request_id))]
    AccessDenied {
        code: String,
        message: String,
        request_id: Option<String>,
    },
    /// 404 `MailboxNotEnabledForRESTAPI`/`ResourceNotFound` (or an unknown folder).
    #[error("mailbox not found ({code}): {message}{}", rid(request_id))]
    MailboxNotFound {
        code: String,
        message: String,
        request_id: Option<String>,
    },
    /// 404 `ErrorItemNotFound` on a message: gone or moved. Not an error for a post-action
    /// that already took effect.
    #[error("message not found: {message}{}", rid(request_id))]
    ItemNotFound {
        message: String,
        request_id: Option<String>,
    },
    /// 429 (or a 503/504 that persisted): wait `retry_after` before the next request to the
    /// mailbox. Also returned without a request when the governor's wait would be too long.
    #[error("throttled by Graph{}{}", retry_after.map(|d| format!(", retry after {}s", d.as_secs_f64().ceil())).unwrap_or_default(), rid(request_id))]
    Throttled {
        retry_after: Option<Duration>,
        request_id: Option<String>,
    },
    /// Every one of the mailbox's shared Graph slots stayed taken (by other replicas, or other
    /// MailboxPolls of the same mailbox) for as long as the governor waits: no request was sent.
    /// Try again soon; nothing is wrong with the mailbox.
    #[error("the mailbox's {cap} concurrent Graph requests stayed taken for {}s by other replicas or MailboxPolls of the same mailbox", waited.as_secs())]
    MailboxBusy { cap: u32, waited: Duration },
    /// The delta cursor is no longer valid: drop it and re-read the whole folder.
    #[error("delta cursor expired ({code}), resync required{}", rid(request_id))]
    ResyncRequired {
        code: String,
        /// The `Location` of a 410, when Graph gave one.
        location: Option<String>,
        request_id: Option<String>,
    },
    /// 400-class error caused by the request itself: a bug, not something to retry quickly.
    #[error("invalid query ({status} {code}): {message}{}", rid(request_id))]
    InvalidQuery {
        status: u16,
        code: String,
        message: String,
        request_id: Option<String>,
    },
    /// A network failure, a 5xx, or a 503/504 that outlasted the retries.
    #[error("transient Graph failure{}: {message}{}", status.map(|s| format!(" ({s})")).unwrap_or_default(), rid(request_id))]
    Transient {
        status: Option<u16>,
        message: String,
        request_id: Option<String>,
    },
    /// Graph answered something that is not what the protocol says (bad JSON, wrong shape,
    /// a body over the size limit). Treated as transient by conditions.
    #[error("malformed Graph response: {message}{}", rid(request_id))]
    MalformedResponse {
        message: String,
        request_id: Option<String>,
    },
    /// The client itself is misconfigured (e.g. a base URL that cannot be joined).
    #[error("Graph client configuration: {0}")]
    Config(String),
}

fn rid(request_id: &Option<String>) -> String {
    request_id
        .as_deref()
        .map(|id| format!(" [request-id {id}]"))
        .unwrap_or_default()
}

impl GraphError {
    /// The condition reason this error reports on a MailboxPoll.
    pub fn reason(&self) -> Reason {
        match self {
            GraphError::AuthenticationFailed { .. } => Reason::AuthenticationFailed,
            GraphError::AccessDenied { .. } => Reason::AccessDenied,
            GraphError::MailboxNotFound { .. } => Reason::MailboxNotFound,
            GraphError::ItemNotFound { .. } => Reason::ItemNotFound,
            GraphError::Throttled { .. } | GraphError::MailboxBusy { .. } => Reason::Throttled,
            GraphError::ResyncRequired { .. } => Reason::ResyncRequired,
            GraphError::InvalidQuery { .. } | GraphError::Config(_) => Reason::InvalidQuery,
            GraphError::Transient { .. } | GraphError::MalformedResponse { .. } => {
                Reason::Transient
            }
        }
    }

    /// Graph's request-id of the failed call, for support tickets.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            GraphError::AuthenticationFailed { request_id, .. }
            | GraphError::AccessDenied { request_id, .. }
            | GraphError::MailboxNotFound { request_id, .. }
            | GraphError::ItemNotFound { request_id, .. }
            | GraphError::Throttled { request_id, .. }
            | GraphError::ResyncRequired { request_id, .. }
            | GraphError::InvalidQuery { request_id, .. }
            | GraphError::Transient { request_id, .. }
            | GraphError::MalformedResponse { request_id, .. } => request_id.as_deref(),
            GraphError::Config(_) | GraphError::MailboxBusy { .. } => None,
        }
    }

    /// How long to wait before trying again, when Graph said so.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GraphError::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether trying the same thing again later can succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            GraphError::Throttled { .. }
                | GraphError::MailboxBusy { .. }
                | GraphError::Transient { .. }
                | GraphError::MalformedResponse { .. }
        )
    }
}

/// Graph's error body: `{"error":{"code","message","innerError":{"request-id"}}}`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(default)]
    pub error: ErrorDetail,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ErrorDetail {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, rename = "innerError")]
    pub inner_error: Option<InnerError>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct InnerError {
    #[serde(default, rename = "request-id")]
    pub request_id: Option<String>,
}

/// What a failed response said: status, code, message, ids and wait hints.
#[derive(Debug, Clone, Default)]
pub(crate) struct FailedResponse {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub request_id: Option<String>,
    pub retry_after: Option<Duration>,
    pub location: Option<String>,
}

impl FailedResponse {
    /// Parses an error body leniently: a body that is not Graph's shape still gives a status.
    pub fn parse(
        status: u16,
        body: &[u8],
        header_request_id: Option<String>,
        retry_after: Option<Duration>,
        location: Option<String>,
    ) -> Self {
        let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
        // Error texts end up in `polls.error_message`, task errors and conditions: made
        // storable (Postgres refuses NUL) and short here, where they enter.
        let body_request_id = parsed
            .error
            .inner_error
            .and_then(|inner| inner.request_id)
            .filter(|id| !id.is_empty())
            .map(|id| storable::owned(id, 128));
        let mut message = storable::owned(parsed.error.message, MAX_MESSAGE_BYTES);
        if message.is_empty() {
            message = format!("HTTP {status}");
        }
        Self {
            status,
            code: storable::owned(parsed.error.code, 128),
            message,
            request_id: header_request_id.or(body_request_id),
            retry_after,
            location,
        }
    }

    fn code_is(&self, candidates: &[&str]) -> bool {
        candidates
            .iter()
            .any(|candidate| self.code.eq_ignore_ascii_case(candidate))
    }

    /// Whether this asks for a fresh delta round.
    pub fn is_resync(&self) -> bool {
        self.status == 410
            || self.code_is(&["syncStateNotFound", "resyncRequired", "syncStateInvalid"])
    }

    /// Whether a later retry of the same request may succeed (429, 503, 504, other 5xx).
    pub fn is_retryable(&self) -> bool {
        self.status == 429 || self.status >= 500
    }

    /// Maps to a typed error (after the retries the caller chose to make).
    pub fn into_error(self) -> GraphError {
        let FailedResponse {
            status,
            code,
            message,
            request_id,
            retry_after,
            location,
        } = self.clone();
        if self.is_resync() {
            let code = if code.is_empty() {
                format!("HTTP {status}")
            } else {
                code
            };
            return GraphError::ResyncRequired {
                code,
                location,
                request_id,
            };
        }
        match status {
            401 => GraphError::AuthenticationFailed {
                message: format!(
                    "access token refused ({code}): {message} (to fix: {})",
                    hint::TOKEN_REFUSED
                ),
                request_id,
            },
            403 => GraphError::AccessDenied {
                code,
                message: format!("{message} (to fix: {})", hint::ACCESS_DENIED),
                request_id,
            },
            404 if self.code_is(&["ErrorItemNotFound"]) => GraphError::ItemNotFound {
                message,
                request_id,
            },
            404 => GraphError::MailboxNotFound {
                code,
                message,
                request_id,
            },
            429 => GraphError::Throttled {
                retry_after,
                request_id,
            },
            500..=599 => GraphError::Transient {
                status: Some(status),
                message: if code.is_empty() {
                    message
                } else {
                    format!("{code}: {message}")
                },
                request_id,
            },
            _ => GraphError::InvalidQuery {
                status,
                code,
                message,
                request_id,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(status: u16, code: &str) -> GraphError {
        let body = serde_json::json!({"error": {"code": code, "message": "m", "innerError": {"request-id": "rid-1"}}});
        FailedResponse::parse(status, body.to_string().as_bytes(), None, None, None).into_error()
    }

    #[test]
    fn statuses_and_codes_map_to_condition_reasons() {
        assert_eq!(
            failed(401, "InvalidAuthenticationToken").reason().as_str(),
            "AuthenticationFailed"
        );
        assert_eq!(
            failed(403, "ErrorAccessDenied").reason().as_str(),
            "AccessDenied"
        );
        assert_eq!(
            failed(404, "MailboxNotEnabledForRESTAPI").reason().as_str(),
            "MailboxNotFound"
        );
        assert_eq!(
            failed(404, "ResourceNotFound").reason().as_str(),
            "MailboxNotFound"
        );
        assert_eq!(
            failed(404, "errorItemNotFound").reason().as_str(),
            "ItemNotFound"
        );
        assert_eq!(
            failed(400, "InefficientFilter").reason().as_str(),
            "InvalidQuery"
        );
        assert_eq!(
            failed(400, "ErrorInvalidUrlQuery").reason().as_str(),
            "InvalidQuery"
        );
        assert_eq!(failed(410, "").reason().as_str(), "ResyncRequired");
        assert_eq!(
            failed(400, "SYNCSTATENOTFOUND").reason().as_str(),
            "ResyncRequired"
        );
        assert_eq!(
            failed(400, "resyncRequired").reason().as_str(),
            "ResyncRequired"
        );
        assert_eq!(
            failed(429, "TooManyRequests").reason().as_str(),
            "Throttled"
        );
        assert_eq!(
            failed(503, "serviceNotAvailable").reason().as_str(),
            "Transient"
        );
        assert_eq!(failed(504, "").reason().as_str(), "Transient");
    }

    #[test]
    fn access_denied_says_what_to_check() {
        let text = failed(403, "ErrorAccessDenied").to_string();
        for needle in [
            "Mail.Read",
            "Test-ServicePrincipalAuthorization",
            "Test-ApplicationAccessPolicy",
            "an hour",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
    }

    #[test]
    fn request_id_comes_from_the_header_or_the_body() {
        assert_eq!(failed(403, "ErrorAccessDenied").request_id(), Some("rid-1"));
        let from_header =
            FailedResponse::parse(500, b"not json", Some("hdr".into()), None, None).into_error();
        assert_eq!(from_header.request_id(), Some("hdr"));
        assert!(from_header.to_string().contains("HTTP 500"));
    }

    #[test]
    fn control_characters_in_error_bodies_are_made_storable() {
        let body = serde_json::json!({"error": {
            "code": "Error\u{0}AccessDenied",
            "message": "Access denied.\u{0}\u{1}\u{1b}[31m\u{7f}\u{0}",
            "innerError": {"request-id": "rid\u{0}"}
        }});
        let error =
            FailedResponse::parse(403, body.to_string().as_bytes(), None, None, None).into_error();
        let text = error.to_string();
        assert!(
            !text.contains('\u{0}') && !text.contains('\u{1b}'),
            "{text:?}"
        );
        assert!(text.contains("Access denied.\u{fffd}"), "{text:?}");
        assert_eq!(error.reason().as_str(), "AccessDenied");
        let long = serde_json::json!({"error": {"code": "x", "message": "é".repeat(5000)}});
        let error =
            FailedResponse::parse(500, long.to_string().as_bytes(), None, None, None).into_error();
        assert!(error.to_string().len() < 1200);
    }

    #[test]
    fn garbage_bodies_still_give_typed_errors() {
        for body in [
            &b""[..],
            b"{",
            b"[1,2]",
            b"{\"error\":42}",
            b"{\"error\":{\"code\":7}}",
        ] {
            let error = FailedResponse::parse(403, body, None, None, None).into_error();
            assert_eq!(error.reason().as_str(), "AccessDenied");
        }
    }
}
