//! A message as the ledger stores it, read leniently from Graph's JSON: a field of the wrong
//! type is skipped, an item without an id is skipped as a whole, nothing panics.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

/// Fields selected on the first request of a round (`body` is added when delivery needs it).
pub const LEDGER_FIELDS: &[&str] = &[
    "id",
    "internetMessageId",
    "subject",
    "from",
    "sender",
    "toRecipients",
    "ccRecipients",
    "replyTo",
    "receivedDateTime",
    "sentDateTime",
    "isRead",
    "hasAttachments",
    "importance",
    "conversationId",
    "parentFolderId",
    "bodyPreview",
];

/// The `$select` value for a round.
pub fn select_fields(include_body: bool, include_categories: bool) -> String {
    let mut fields = LEDGER_FIELDS.join(",");
    if include_body {
        fields.push_str(",body");
    }
    if include_categories {
        fields.push_str(",categories");
    }
    fields
}

/// `{"emailAddress":{"name","address"}}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EmailAddress {
    pub name: Option<String>,
    pub address: Option<String>,
}

/// The message body, cut to the configured size.
#[derive(Clone, PartialEq, Eq)]
pub struct Body {
    /// `html` or `text`.
    pub content_type: String,
    pub content: String,
    /// Whether `content` was cut at the size limit.
    pub truncated: bool,
}

impl std::fmt::Debug for Body {
    // Message content stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("content_type", &self.content_type)
            .field("chars", &self.content.chars().count())
            .field("truncated", &self.truncated)
            .finish()
    }
}

/// Why delta reported a message as removed from the folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemovedReason {
    /// Deleted (or moved out, for some servers).
    Deleted,
    /// Changed so that it no longer belongs to the folder (moved out).
    Changed,
    Other(String),
}

impl RemovedReason {
    pub fn as_str(&self) -> &str {
        match self {
            RemovedReason::Deleted => "deleted",
            RemovedReason::Changed => "changed",
            RemovedReason::Other(other) => other,
        }
    }
}

/// One item of a page.
#[derive(Clone, PartialEq)]
pub struct Message {
    /// Immutable id (the client always asks for immutable ids).
    pub id: String,
    pub internet_message_id: Option<String>,
    pub subject: Option<String>,
    pub from: Option<EmailAddress>,
    pub sender: Option<EmailAddress>,
    pub to_recipients: Vec<EmailAddress>,
    pub cc_recipients: Vec<EmailAddress>,
    pub reply_to: Vec<EmailAddress>,
    pub received_date_time: Option<DateTime<Utc>>,
    pub sent_date_time: Option<DateTime<Utc>>,
    pub is_read: Option<bool>,
    pub has_attachments: Option<bool>,
    pub importance: Option<String>,
    pub conversation_id: Option<String>,
    pub parent_folder_id: Option<String>,
    pub body_preview: Option<String>,
    pub body: Option<Body>,
    /// The item as Graph sent it, without `body` (kept in `body`, possibly cut).
    pub raw: Value,
    /// Set for `@removed` items: the message left the folder; other fields are empty.
    pub removed: Option<RemovedReason>,
}

impl std::fmt::Debug for Message {
    // Subjects and bodies are personal data: only ids and times in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("id", &self.id)
            .field("received_date_time", &self.received_date_time)
            .field("removed", &self.removed)
            .finish_non_exhaustive()
    }
}

/// Why an item of a page was skipped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SkippedItem {
    #[error("page item is not a JSON object")]
    NotAnObject,
    #[error("page item has no string id")]
    NoId,
}

fn string(object: &Map<String, Value>, name: &str) -> Option<String> {
    object.get(name).and_then(Value::as_str).map(str::to_string)
}

fn boolean(object: &Map<String, Value>, name: &str) -> Option<bool> {
    object.get(name).and_then(Value::as_bool)
}

fn date(object: &Map<String, Value>, name: &str) -> Option<DateTime<Utc>> {
    let text = object.get(name)?.as_str()?;
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|moment| moment.with_timezone(&Utc))
}

fn address(value: &Value) -> Option<EmailAddress> {
    let inner = value.get("emailAddress")?.as_object()?;
    let address = EmailAddress {
        name: string(inner, "name"),
        address: string(inner, "address"),
    };
    (address.name.is_some() || address.address.is_some()).then_some(address)
}

fn addresses(object: &Map<String, Value>, name: &str) -> Vec<EmailAddress> {
    object
        .get(name)
        .and_then(Value::as_array)
        .map(|items| items.iter().filter_map(address).collect())
        .unwrap_or_default()
}

/// Cuts `text` to at most `max_chars` characters.
fn cut(text: &str, max_chars: usize) -> (String, bool) {
    match text.char_indices().nth(max_chars) {
        Some((at, _)) => (text[..at].to_string(), true),
        None => (text.to_string(), false),
    }
}

impl Message {
    /// Reads one page item. Bodies longer than `max_body_chars` are cut (and flagged).
    pub fn from_value(value: Value, max_body_chars: usize) -> Result<Self, SkippedItem> {
        let Value::Object(mut object) = value else {
            return Err(SkippedItem::NotAnObject);
        };
        let id = string(&object, "id")
            .filter(|id| !id.is_empty())
            .ok_or(SkippedItem::NoId)?;
        let removed = object.get("@removed").map(|removed| {
            match removed.get("reason").and_then(Value::as_str) {
                Some(reason) if reason.eq_ignore_ascii_case("deleted") => RemovedReason::Deleted,
                Some(reason) if reason.eq_ignore_ascii_case("changed") => RemovedReason::Changed,
                Some(reason) => RemovedReason::Other(reason.chars().take(64).collect()),
                None => RemovedReason::Other(String::new()),
            }
        });
        let body = object.remove("body").and_then(|body| {
            let content = body.get("content")?.as_str()?;
            let (content, truncated) = cut(content, max_body_chars);
            Some(Body {
                content_type: body
                    .get("contentType")
                    .and_then(Value::as_str)
                    .unwrap_or("text")
                    .to_ascii_lowercase(),
                content,
                truncated,
            })
        });
        Ok(Self {
            internet_message_id: string(&object, "internetMessageId"),
            subject: string(&object, "subject"),
            from: object.get("from").and_then(address),
            sender: object.get("sender").and_then(address),
            to_recipients: addresses(&object, "toRecipients"),
            cc_recipients: addresses(&object, "ccRecipients"),
            reply_to: addresses(&object, "replyTo"),
            received_date_time: date(&object, "receivedDateTime"),
            sent_date_time: date(&object, "sentDateTime"),
            is_read: boolean(&object, "isRead"),
            has_attachments: boolean(&object, "hasAttachments"),
            importance: string(&object, "importance"),
            conversation_id: string(&object, "conversationId"),
            parent_folder_id: string(&object, "parentFolderId"),
            body_preview: string(&object, "bodyPreview"),
            body,
            raw: Value::Object(object),
            removed,
            id,
        })
    }

    pub fn is_removed(&self) -> bool {
        self.removed.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_full_item_is_read() {
        let message = Message::from_value(
            json!({
                "@odata.etag": "W/\"x\"",
                "id": "AAk=",
                "subject": "Invoice 4471",
                "from": {"emailAddress": {"name": "Ops", "address": "ops@contoso.com"}},
                "toRecipients": [{"emailAddress": {"address": "a@b"}}, {"bogus": 1}],
                "receivedDateTime": "2025-03-04T10:15:02Z",
                "isRead": false,
                "body": {"contentType": "HTML", "content": "<p>hi</p>"},
                "@odata.unknownAnnotation": {"x": 1},
            }),
            100,
        )
        .expect("valid item");
        assert_eq!(message.id, "AAk=");
        assert_eq!(message.to_recipients.len(), 1);
        assert_eq!(
            message.from.and_then(|f| f.address).as_deref(),
            Some("ops@contoso.com")
        );
        assert_eq!(
            message.received_date_time.map(|d| d.timestamp()),
            Some(1741083302)
        );
        let body = message.body.expect("body");
        assert_eq!(body.content_type, "html");
        assert!(!body.truncated);
        assert!(message.raw.get("body").is_none());
        assert!(message.raw.get("@odata.unknownAnnotation").is_some());
    }

    #[test]
    fn wrong_types_are_skipped_fields_and_missing_ids_skipped_items() {
        let message = Message::from_value(
            json!({"id": "x", "subject": 42, "isRead": "yes", "receivedDateTime": "yesterday", "from": "me", "toRecipients": {"a": 1}}),
            10,
        )
        .expect("item with id");
        assert_eq!(message.subject, None);
        assert_eq!(message.is_read, None);
        assert_eq!(message.received_date_time, None);
        assert_eq!(message.from, None);
        assert!(message.to_recipients.is_empty());
        assert_eq!(
            Message::from_value(json!({"subject": "x"}), 10),
            Err(SkippedItem::NoId)
        );
        assert_eq!(
            Message::from_value(json!({"id": 7}), 10),
            Err(SkippedItem::NoId)
        );
        assert_eq!(
            Message::from_value(json!([1]), 10),
            Err(SkippedItem::NotAnObject)
        );
    }

    #[test]
    fn removed_items_and_huge_bodies() {
        let removed =
            Message::from_value(json!({"id": "x", "@removed": {"reason": "deleted"}}), 10)
                .expect("removed item");
        assert_eq!(removed.removed, Some(RemovedReason::Deleted));
        let big = "é".repeat(1000);
        let message = Message::from_value(
            json!({"id": "x", "body": {"contentType": "text", "content": big}}),
            10,
        )
        .expect("item");
        let body = message.body.expect("body");
        assert_eq!(body.content.chars().count(), 10);
        assert!(body.truncated);
        assert!(!format!("{body:?}").contains('é'));
    }
}
