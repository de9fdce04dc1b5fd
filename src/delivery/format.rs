//! The body and format headers of one request, by `spec.delivery.webhook.format`:
//!
//! - `json`: the payload, `content-type: application/json`.
//! - `cloudevents`: the same payload as a CloudEvent in the HTTP binding's binary mode
//!   (`ce-specversion`, `ce-id` = the idempotency key, `ce-source`, `ce-type`, `ce-subject`,
//!   `ce-time`), so Knative Eventing, Argo Events or Dapr take it as it is.
//! - `mime`: the raw message as Graph has it, `content-type: message/rfc822`.
//!
//! The signature, `webhook-id`, `Idempotency-Key` and attempt headers are the same in every
//! format ([`super::webhook::send`] adds them).
//!
//! The CloudEvents headers are written here rather than with the `cloudevents-sdk` crate: its
//! HTTP client binding is built on reqwest 0.12 (this project is on 0.13), which would bring a
//! second HTTP client stack into the operator for six headers. The tests read deliveries back
//! with the SDK's HTTP binding, as a receiver would.

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::header::{HeaderName, HeaderValue};

/// The CloudEvents specification version of the binary-mode headers.
pub const CLOUDEVENTS_SPEC_VERSION: &str = "1.0";
/// `ce-type` of a delivered message (reverse-DNS, as the specification recommends).
pub const CLOUDEVENTS_TYPE: &str = "dev.mailpoll.message.received.v1";
/// Names the MailboxPoll of a `mime` delivery: `<namespace>/<name>`.
pub const MAILBOX_POLL_HEADER: &str = "mailpoll-mailbox-poll";
/// The Graph (immutable) id of the message of a `mime` delivery.
pub const MESSAGE_ID_HEADER: &str = "mailpoll-message-id";

pub const JSON_CONTENT_TYPE: &str = "application/json";
pub const MIME_CONTENT_TYPE: &str = "message/rfc822";

/// A request's body and the headers that describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub body: Vec<u8>,
    pub content_type: &'static str,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// What the CloudEvents attributes are made of.
#[derive(Debug, Clone, Copy)]
pub struct EventContext<'a> {
    /// The idempotency key.
    pub key: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    /// The Graph message id.
    pub message_id: &'a str,
    pub received: Option<DateTime<Utc>>,
}

impl Outgoing {
    pub fn json(body: Vec<u8>) -> Self {
        Self {
            body,
            content_type: JSON_CONTENT_TYPE,
            headers: Vec::new(),
        }
    }

    /// The JSON payload as a binary-mode CloudEvent.
    pub fn cloudevent(body: Vec<u8>, event: &EventContext<'_>) -> Self {
        let mut headers = Vec::with_capacity(6);
        push(&mut headers, "ce-specversion", CLOUDEVENTS_SPEC_VERSION);
        push(&mut headers, "ce-id", event.key);
        push(
            &mut headers,
            "ce-source",
            &cloudevents_source(event.namespace, event.name),
        );
        push(&mut headers, "ce-type", CLOUDEVENTS_TYPE);
        push(
            &mut headers,
            "ce-subject",
            &percent_encode(event.message_id),
        );
        if let Some(received) = event.received {
            push(
                &mut headers,
                "ce-time",
                &received.to_rfc3339_opts(SecondsFormat::Secs, true),
            );
        }
        Self {
            body,
            content_type: JSON_CONTENT_TYPE,
            headers,
        }
    }

    /// The raw message, with headers naming its MailboxPoll and Graph id.
    pub fn mime(raw: Vec<u8>, event: &EventContext<'_>) -> Self {
        let mut headers = Vec::with_capacity(2);
        push(
            &mut headers,
            MAILBOX_POLL_HEADER,
            &format!("{}/{}", event.namespace, event.name),
        );
        push(
            &mut headers,
            MESSAGE_ID_HEADER,
            &percent_encode(event.message_id),
        );
        Self {
            body: raw,
            content_type: MIME_CONTENT_TYPE,
            headers,
        }
    }
}

/// `ce-source` of a MailboxPoll: the path of the resource in the Kubernetes API, a URI
/// reference unique per MailboxPoll (namespaces and names are DNS labels: nothing to escape).
pub fn cloudevents_source(namespace: &str, name: &str) -> String {
    format!("/apis/mailpoll.dev/v1alpha1/namespaces/{namespace}/mailboxpolls/{name}")
}

/// Adds a header. Names are lower-case constants; values are ASCII by construction, so one
/// that does not fit a header (never expected) is left out rather than failing the delivery.
fn push(headers: &mut Vec<(HeaderName, HeaderValue)>, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.push((HeaderName::from_static(name), value));
    }
}

/// The CloudEvents HTTP binding's header encoding: printable ASCII except space, `"` and `%`
/// as is, everything else percent-encoded as UTF-8.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x21..=0x7e).contains(&byte) && byte != b'"' && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(received: Option<DateTime<Utc>>) -> EventContext<'static> {
        EventContext {
            key: "5f1c",
            namespace: "support",
            name: "support-inbox",
            message_id: "AAk/+=",
            received,
        }
    }

    fn header<'a>(outgoing: &'a Outgoing, name: &str) -> Option<&'a str> {
        outgoing
            .headers
            .iter()
            .find(|(header, _)| header.as_str() == name)
            .and_then(|(_, value)| value.to_str().ok())
    }

    #[test]
    fn cloudevents_headers_follow_the_binary_mode() {
        let received = DateTime::parse_from_rfc3339("2025-03-04T10:15:02Z")
            .ok()
            .map(|moment| moment.with_timezone(&Utc));
        let outgoing = Outgoing::cloudevent(b"{}".to_vec(), &event(received));
        assert_eq!(outgoing.content_type, "application/json");
        assert_eq!(header(&outgoing, "ce-specversion"), Some("1.0"));
        assert_eq!(header(&outgoing, "ce-id"), Some("5f1c"));
        assert_eq!(
            header(&outgoing, "ce-source"),
            Some("/apis/mailpoll.dev/v1alpha1/namespaces/support/mailboxpolls/support-inbox")
        );
        assert_eq!(
            header(&outgoing, "ce-type"),
            Some("dev.mailpoll.message.received.v1")
        );
        assert_eq!(header(&outgoing, "ce-subject"), Some("AAk/+="));
        assert_eq!(header(&outgoing, "ce-time"), Some("2025-03-04T10:15:02Z"));
        let without_time = Outgoing::cloudevent(Vec::new(), &event(None));
        assert_eq!(header(&without_time, "ce-time"), None);
    }

    #[test]
    fn mime_requests_name_their_source_and_message() {
        let outgoing = Outgoing::mime(b"Subject: x\r\n\r\n".to_vec(), &event(None));
        assert_eq!(outgoing.content_type, "message/rfc822");
        assert_eq!(
            header(&outgoing, "mailpoll-mailbox-poll"),
            Some("support/support-inbox")
        );
        assert_eq!(header(&outgoing, "mailpoll-message-id"), Some("AAk/+="));
    }

    #[test]
    fn header_values_outside_printable_ascii_are_percent_encoded() {
        assert_eq!(percent_encode("a b%\"é"), "a%20b%25%22%C3%A9");
    }
}
