//! The webhook POST: payload, headers, and what each response means.

use std::fmt;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::content::{AttachmentView, Unavailable};
use super::egress::{self, GuardedClient, Refusal};
pub use super::endpoint::Endpoint;
use super::format::Outgoing;
use super::signing::{
    ATTEMPT_HEADER, ID_HEADER, IDEMPOTENCY_KEY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use crate::ledger::LedgerMessage;
use crate::storable;

/// Event type of the payload, versioned so receivers can evolve with it.
pub const EVENT_TYPE: &str = "mailpoll.message.received.v1";

/// Longest excerpt of a receiver's response body kept as an error reason.
const EXCERPT_CHARS: usize = 200;

/// Most bytes of a response body ever read: enough for the excerpt (at most 4 bytes per
/// character), so a receiver answering gigabytes costs a few kilobytes.
const BODY_PREFIX_BYTES: usize = 4 * EXCERPT_CHARS;

/// The JSON body POSTed for one message.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Payload<'a> {
    #[serde(rename = "type")]
    pub event_type: &'static str,
    /// Same value as the `Idempotency-Key` header.
    pub key: &'a str,
    pub mailbox_poll: Source<'a>,
    pub message: MessageView<'a>,
}

/// The MailboxPoll a message came from.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: Uuid,
    pub mailbox: &'a str,
    pub folder: &'a str,
}

/// A message in Graph's own field names, so receivers that know Graph need no mapping.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageView<'a> {
    pub id: &'a str,
    pub internet_message_id: Option<&'a str>,
    pub subject: Option<&'a str>,
    pub from: Option<Address<'a>>,
    pub sender: Option<Address<'a>>,
    pub to_recipients: &'a Value,
    pub cc_recipients: &'a Value,
    pub reply_to: &'a Value,
    pub received_date_time: Option<DateTime<Utc>>,
    pub sent_date_time: Option<DateTime<Utc>>,
    pub is_read: Option<bool>,
    pub has_attachments: Option<bool>,
    pub importance: Option<&'a str>,
    pub conversation_id: Option<&'a str>,
    pub body_preview: Option<&'a str>,
    /// Present only when the MailboxPoll asks for bodies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Body<'a>>,
    pub body_truncated: bool,
    /// Present when the webhook asks for attachments (`metadata` or `inline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachments: Option<Vec<AttachmentView>>,
    /// Why `attachments` is empty although asked for: the message could not be listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attachments_unavailable: Option<Unavailable>,
}

#[derive(Debug, Serialize)]
pub struct Address<'a> {
    pub name: Option<&'a str>,
    pub address: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Body<'a> {
    pub content_type: &'a str,
    pub content: &'a str,
}

impl<'a> MessageView<'a> {
    pub fn new(message: &'a LedgerMessage) -> Self {
        let address = |address: &'a Option<String>, name: &'a Option<String>| {
            address.as_deref().map(|address| Address {
                name: name.as_deref(),
                address,
            })
        };
        Self {
            id: &message.message_id,
            internet_message_id: message.internet_message_id.as_deref(),
            subject: message.subject.as_deref(),
            from: address(&message.from_address, &message.from_name),
            sender: address(&message.sender_address, &message.sender_name),
            to_recipients: &message.to_recipients,
            cc_recipients: &message.cc_recipients,
            reply_to: &message.reply_to,
            received_date_time: message.received_at,
            sent_date_time: message.sent_at,
            is_read: message.is_read,
            has_attachments: message.has_attachments,
            importance: message.importance.as_deref(),
            conversation_id: message.conversation_id.as_deref(),
            body_preview: message.body_preview.as_deref(),
            body: message.body.as_deref().map(|content| Body {
                content_type: message.body_content_type.as_deref().unwrap_or("text"),
                content,
            }),
            body_truncated: message.body_truncated,
            attachments: None,
            attachments_unavailable: None,
        }
    }
}

/// What a response (or its absence) means for the delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookError {
    /// 408, 429, 5xx, a timeout or a connection failure: try again later.
    Retryable {
        /// The HTTP status, when an answer came (408, 425, 429, 5xx).
        status: Option<u16>,
        reason: String,
    },
    /// Any other non-2xx: the receiver refuses this message; retrying will not help.
    Rejected { status: u16, excerpt: String },
    /// The body is not UTF-8, which Standard Webhooks signatures cannot cover.
    Unsignable,
    /// A 3xx: redirects are not followed (the new address would escape the egress policy
    /// and the signature's intent); the URL must name the final address.
    Redirected {
        status: u16,
        /// The host of the `Location`, never its path or query.
        location_host: Option<String>,
    },
    /// The operator's egress policy refuses the destination; nothing was sent.
    Forbidden(Refusal),
}

impl WebhookError {
    /// Whether trying again cannot help: the delivery fails for good at once.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Retryable { .. })
    }
}

/// How a POST ended, as the `class` label of the webhook metrics: `2xx` to `5xx` by the
/// status of an answer, `error` when none came (timeout, reset, refused connection),
/// `forbidden` when the egress policy stopped it and `unsent` when it could not be signed.
pub fn outcome_class(result: &Result<StatusCode, WebhookError>) -> &'static str {
    let by_status = |status: u16| match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    match result {
        Ok(status) => by_status(status.as_u16()),
        Err(WebhookError::Retryable {
            status: Some(status),
            ..
        })
        | Err(WebhookError::Rejected { status, .. })
        | Err(WebhookError::Redirected { status, .. }) => by_status(*status),
        Err(WebhookError::Retryable { status: None, .. }) => "error",
        Err(WebhookError::Forbidden(_)) => "forbidden",
        Err(WebhookError::Unsignable) => "unsent",
    }
}

impl fmt::Display for WebhookError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retryable { reason, .. } => {
                write!(f, "webhook delivery failed, will retry: {reason}")
            }
            Self::Rejected { status, excerpt } => {
                write!(
                    f,
                    "webhook rejected the message with HTTP {status}: {excerpt}"
                )
            }
            Self::Unsignable => f.write_str(
                "the payload is not UTF-8 text, which a Standard Webhooks signature cannot cover",
            ),
            Self::Redirected {
                status,
                location_host,
            } => {
                let target = location_host.as_deref().unwrap_or("an unreadable location");
                write!(
                    f,
                    "webhook answered HTTP {status}, a redirect to {target}; redirects are not \
                     followed: set the webhook URL to the final address"
                )
            }
            Self::Forbidden(refusal) => write!(f, "{refusal}"),
        }
    }
}

impl std::error::Error for WebhookError {}

/// Classification of a response status, the contract documented in README.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Retry,
    Redirect,
    Reject,
}

pub fn classify(status: StatusCode) -> Verdict {
    match status.as_u16() {
        200..=299 => Verdict::Delivered,
        300..=399 => Verdict::Redirect,
        408 | 425 | 429 | 500..=599 => Verdict::Retry,
        _ => Verdict::Reject,
    }
}

/// POSTs the JSON `body` for the message `key`. `attempt` is 1 for the first try.
pub async fn post(
    client: &reqwest::Client,
    endpoint: &Endpoint,
    key: &str,
    attempt: i32,
    body: Vec<u8>,
) -> Result<StatusCode, WebhookError> {
    send(client, endpoint, key, attempt, Outgoing::json(body)).await
}

/// POSTs `outgoing` (a body in any format, with its headers) for the message `key`, signed
/// and keyed as every format is.
pub async fn send(
    client: &reqwest::Client,
    endpoint: &Endpoint,
    key: &str,
    attempt: i32,
    outgoing: Outgoing,
) -> Result<StatusCode, WebhookError> {
    let Outgoing {
        body,
        content_type,
        headers: format_headers,
    } = outgoing;
    let timestamp = Utc::now().timestamp();
    // Extra headers first: the schema and `ExtraHeaders` keep them off mailpoll's own names,
    // and the ones set after them would win anyway.
    let mut request = client
        .post(endpoint.url.as_url().clone())
        .timeout(endpoint.timeout)
        .headers(endpoint.headers.map().clone())
        .header(reqwest::header::CONTENT_TYPE, content_type)
        .header(ID_HEADER, key)
        .header(TIMESTAMP_HEADER, timestamp.to_string())
        .header(IDEMPOTENCY_KEY_HEADER, key)
        .header(ATTEMPT_HEADER, attempt.to_string());
    for (name, value) in format_headers {
        request = request.header(name, value);
    }
    if let Some(secret) = &endpoint.signing_secret {
        let signature = secret
            .sign(key, timestamp, &body)
            .ok_or(WebhookError::Unsignable)?;
        request = request.header(SIGNATURE_HEADER, signature);
    }
    let response =
        request
            .body(body)
            .send()
            .await
            .map_err(|error| match egress::refusal_in(&error) {
                Some(refusal) => WebhookError::Forbidden(refusal),
                None => WebhookError::Retryable {
                    status: None,
                    reason: describe_transport_error(&error),
                },
            })?;
    let status = response.status();
    match classify(status) {
        // The body is never read: a receiver's answer to a success means nothing here.
        Verdict::Delivered => Ok(status),
        Verdict::Retry => Err(WebhookError::Retryable {
            status: Some(status.as_u16()),
            reason: format!("HTTP {}", status.as_u16()),
        }),
        Verdict::Redirect => Err(WebhookError::Redirected {
            status: status.as_u16(),
            location_host: location_host(response.headers()),
        }),
        Verdict::Reject => {
            let prefix = body_prefix(response, BODY_PREFIX_BYTES).await;
            Err(WebhookError::Rejected {
                status: status.as_u16(),
                excerpt: excerpt(&String::from_utf8_lossy(&prefix)),
            })
        }
    }
}

/// [`post`] within the egress policy, for a MailboxPoll in `namespace`: the rules that depend
/// on the namespace (and IP literals, which no resolver sees) are checked before sending, the
/// addresses by the client's resolver when it connects.
pub async fn post_checked(
    client: &GuardedClient,
    namespace: &str,
    endpoint: &Endpoint,
    key: &str,
    attempt: i32,
    body: Vec<u8>,
) -> Result<StatusCode, WebhookError> {
    send_checked(
        client,
        namespace,
        endpoint,
        key,
        attempt,
        Outgoing::json(body),
    )
    .await
}

/// [`send`] within the egress policy, as [`post_checked`].
pub async fn send_checked(
    client: &GuardedClient,
    namespace: &str,
    endpoint: &Endpoint,
    key: &str,
    attempt: i32,
    outgoing: Outgoing,
) -> Result<StatusCode, WebhookError> {
    client
        .check(endpoint.url.as_url().as_str(), namespace)
        .map_err(WebhookError::Forbidden)?;
    send(client.http(), endpoint, key, attempt, outgoing).await
}

/// At most `limit` bytes of a response body; whatever arrived when the body ends, breaks or
/// times out (the request's timeout covers the body). Dropping the rest closes the connection.
async fn body_prefix(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut prefix = Vec::new();
    while prefix.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(limit - prefix.len());
                prefix.extend_from_slice(&chunk[..take]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    prefix
}

/// The host a redirect points to; a relative `Location` stays on the webhook's host.
fn location_host(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let location = headers.get(reqwest::header::LOCATION)?.to_str().ok()?;
    match reqwest::Url::parse(location) {
        Ok(url) => url
            .host_str()
            .map(|host| storable::text(host, 253).into_owned()),
        Err(_) if location.starts_with('/') && !location.starts_with("//") => {
            Some("the same host".into())
        }
        Err(_) => None,
    }
}

/// A transport error without the URL (it may carry credentials in its userinfo or query).
fn describe_transport_error(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else if error.is_request() {
        "request failed"
    } else {
        "transport error"
    };
    // Only the source chain: reqwest's own message repeats the URL. The whole chain, since
    // its last link says what happened ("connection reset by peer", "invalid status-line").
    let mut detail = String::new();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    storable::text(&format!("{kind}{detail}"), 1024).into_owned()
}

/// First characters of a response body on one line, for an error reason. Made storable
/// (see [`storable`]): a receiver's body is outside text, and a NUL in it once made recording
/// the failure fail, so the task's result was retried forever.
pub fn excerpt(text: &str) -> String {
    let text = storable::text(text, usize::MAX);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut chars = one_line.chars();
    let cut: String = chars.by_ref().take(EXCERPT_CHARS).collect();
    if chars.next().is_some() {
        format!("{cut}…")
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_fall_into_the_metric_classes() {
        let status = |code| StatusCode::from_u16(code).expect("valid status");
        let retry = |status| WebhookError::Retryable {
            status,
            reason: String::new(),
        };
        for (result, class) in [
            (Ok(status(204)), "2xx"),
            (Err(retry(Some(503))), "5xx"),
            (Err(retry(Some(429))), "4xx"),
            (Err(retry(None)), "error"),
            (
                Err(WebhookError::Rejected {
                    status: 422,
                    excerpt: String::new(),
                }),
                "4xx",
            ),
            (
                Err(WebhookError::Redirected {
                    status: 302,
                    location_host: None,
                }),
                "3xx",
            ),
            (Err(WebhookError::Unsignable), "unsent"),
        ] {
            assert_eq!(outcome_class(&result), class, "{result:?}");
        }
    }

    #[test]
    fn statuses_map_to_the_documented_verdicts() {
        for (code, verdict) in [
            (200, Verdict::Delivered),
            (202, Verdict::Delivered),
            (204, Verdict::Delivered),
            (408, Verdict::Retry),
            (429, Verdict::Retry),
            (500, Verdict::Retry),
            (503, Verdict::Retry),
            (400, Verdict::Reject),
            (401, Verdict::Reject),
            (404, Verdict::Reject),
            (410, Verdict::Reject),
            (422, Verdict::Reject),
            (301, Verdict::Redirect),
            (302, Verdict::Redirect),
            (307, Verdict::Redirect),
            (308, Verdict::Redirect),
        ] {
            let status = StatusCode::from_u16(code).expect("valid status");
            assert_eq!(classify(status), verdict, "HTTP {code}");
        }
    }

    #[test]
    fn excerpts_are_short_and_single_line() {
        assert_eq!(excerpt("bad\n  request\tbody"), "bad request body");
        let long = "x".repeat(500);
        let cut = excerpt(&long);
        // README promises the first 200 characters; written out so a change of the
        // constant shows here.
        assert_eq!(cut, format!("{}…", "x".repeat(200)));
        let garbage = excerpt("no\0pe \u{1}\u{1b}[31m\u{7f} \u{fffd}");
        assert_eq!(
            garbage,
            "no\u{fffd}pe \u{fffd}\u{fffd}[31m\u{fffd} \u{fffd}"
        );
    }

    #[test]
    fn payload_uses_graph_field_names() {
        let message = LedgerMessage {
            message_id: "AAk=".into(),
            subject: Some("Invoice 4471".into()),
            from_address: Some("billing@fabrikam.com".into()),
            from_name: Some("Fabrikam Billing".into()),
            to_recipients: serde_json::json!([{"name": "Ops", "address": "ops@contoso.com"}]),
            body: Some("<p>hi</p>".into()),
            body_content_type: Some("html".into()),
            ..Default::default()
        };
        let payload = Payload {
            event_type: EVENT_TYPE,
            key: "k",
            mailbox_poll: Source {
                namespace: "support",
                name: "support-inbox",
                uid: Uuid::nil(),
                mailbox: "support@contoso.com",
                folder: "inbox",
            },
            message: MessageView::new(&message),
        };
        let json = serde_json::to_value(&payload).expect("payload serializes");
        assert_eq!(json["type"], "mailpoll.message.received.v1");
        assert_eq!(json["mailboxPoll"]["name"], "support-inbox");
        assert_eq!(json["message"]["from"]["address"], "billing@fabrikam.com");
        assert_eq!(
            json["message"]["toRecipients"][0]["address"],
            "ops@contoso.com"
        );
        assert_eq!(json["message"]["body"]["contentType"], "html");
        assert_eq!(json["message"]["bodyTruncated"], false);
    }
}
