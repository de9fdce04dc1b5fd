//! Graph messages as ledger rows.

use serde_json::json;

use crate::graph::{EmailAddress, Message};
use crate::ledger::{LedgerMessage, Removal};
use crate::storable::{self, clean, clean_opt};

/// The ledger's view of a page: messages, and the removals Graph reported. Takes the page's
/// items by value: bodies and raw objects move into the rows instead of being copied.
///
/// Updated items that carry only their changed properties (see `is_partial`) are left out: the
/// ledger keeps a message's content as first recorded, so for a known message they change
/// nothing, and a message the ledger never saw must not be recorded (and delivered) without
/// its content. Such a message is recorded when Graph serves it whole: when it changes
/// folder, or on the next resync.
pub fn split_page(page: Vec<Message>) -> (Vec<LedgerMessage>, Vec<Removal>) {
    let mut messages = Vec::with_capacity(page.len());
    let mut removals = Vec::new();
    let mut partial = 0usize;
    for item in page {
        match &item.removed {
            Some(reason) => removals.push(Removal {
                message_id: clean(item.id),
                reason: reason.as_str().to_owned(),
            }),
            None if is_partial(&item) => partial += 1,
            None => messages.push(to_ledger(item)),
        }
    }
    if partial > 0 {
        tracing::debug!(
            partial,
            "left out updated items carrying only changed properties"
        );
    }
    (messages, removals)
}

/// Whether a delta item carries only the properties changed since the round's cursor (Graph
/// may serve updated messages so). Every round selects `receivedDateTime`, which every
/// message has: an item without it is not the whole message.
fn is_partial(item: &Message) -> bool {
    item.removed.is_none() && item.raw.get("receivedDateTime").is_none()
}

fn recipients(list: &[EmailAddress]) -> serde_json::Value {
    serde_json::Value::Array(
        list.iter()
            .map(|a| {
                json!({
                    "name": a.name.as_deref().map(|t| storable::text(t, usize::MAX)),
                    "address": a.address.as_deref().map(|t| storable::text(t, usize::MAX)),
                })
            })
            .collect(),
    )
}

/// A Graph message as a ledger row. Every text from Graph is made storable here (see
/// [`storable`]): one NUL in one subject would otherwise make Postgres refuse the whole page,
/// and the poll would fail on it forever.
pub fn to_ledger(message: Message) -> LedgerMessage {
    let (from_address, from_name) = address_parts(message.from);
    let (sender_address, sender_name) = address_parts(message.sender);
    let (body_content_type, body, body_truncated) = match message.body {
        Some(body) => (
            Some(clean(body.content_type)),
            Some(clean(body.content)),
            body.truncated,
        ),
        None => (None, None, false),
    };
    let mut raw = message.raw;
    storable::clean_json(&mut raw);
    LedgerMessage {
        // Graph ids are base64url; should one ever carry a NUL, recording it under a replaced
        // id beats failing the page for good.
        message_id: clean(message.id),
        internet_message_id: clean_opt(message.internet_message_id),
        subject: clean_opt(message.subject),
        from_address,
        from_name,
        sender_address,
        sender_name,
        to_recipients: recipients(&message.to_recipients),
        cc_recipients: recipients(&message.cc_recipients),
        reply_to: recipients(&message.reply_to),
        received_at: message.received_date_time,
        sent_at: message.sent_date_time,
        is_read: message.is_read,
        has_attachments: message.has_attachments,
        importance: clean_opt(message.importance),
        conversation_id: clean_opt(message.conversation_id),
        parent_folder_id: clean_opt(message.parent_folder_id),
        body_preview: clean_opt(message.body_preview),
        body_content_type,
        body,
        body_truncated,
        raw,
    }
}

fn address_parts(address: Option<EmailAddress>) -> (Option<String>, Option<String>) {
    match address {
        Some(EmailAddress { name, address }) => (clean_opt(address), clean_opt(name)),
        None => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(value: serde_json::Value) -> Message {
        Message::from_value(value, 1000).expect("item")
    }

    #[test]
    fn items_carrying_only_changed_properties_are_left_out() {
        let (messages, removals) = split_page(vec![
            item(
                json!({"id": "whole", "subject": "s", "receivedDateTime": "2025-03-04T10:15:02Z"}),
            ),
            item(json!({"id": "partial", "isRead": true})),
            item(json!({"id": "gone", "@removed": {"reason": "deleted"}})),
            // A value of the wrong type is still a whole message (read leniently).
            item(json!({"id": "odd", "receivedDateTime": 7})),
        ]);
        let ids: Vec<&str> = messages.iter().map(|m| m.message_id.as_str()).collect();
        assert_eq!(ids, ["whole", "odd"]);
        assert_eq!(removals.len(), 1);
    }
}
