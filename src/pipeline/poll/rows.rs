//! Graph messages as ledger rows.

use serde_json::json;

use crate::graph::{EmailAddress, Message};
use crate::ledger::{LedgerMessage, Removal};

/// The ledger's view of a page: messages, and the removals Graph reported. Takes the page's
/// items by value: bodies and raw objects move into the rows instead of being copied.
pub fn split_page(page: Vec<Message>) -> (Vec<LedgerMessage>, Vec<Removal>) {
    let mut messages = Vec::with_capacity(page.len());
    let mut removals = Vec::new();
    for item in page {
        match &item.removed {
            Some(reason) => removals.push(Removal {
                message_id: item.id,
                reason: reason.as_str().to_owned(),
            }),
            None => messages.push(to_ledger(item)),
        }
    }
    (messages, removals)
}

fn recipients(list: &[EmailAddress]) -> serde_json::Value {
    serde_json::Value::Array(
        list.iter()
            .map(|a| json!({ "name": a.name, "address": a.address }))
            .collect(),
    )
}

/// A Graph message as a ledger row.
pub fn to_ledger(message: Message) -> LedgerMessage {
    let (from_address, from_name) = address_parts(message.from);
    let (sender_address, sender_name) = address_parts(message.sender);
    let (body_content_type, body, body_truncated) = match message.body {
        Some(body) => (Some(body.content_type), Some(body.content), body.truncated),
        None => (None, None, false),
    };
    LedgerMessage {
        message_id: message.id,
        internet_message_id: message.internet_message_id,
        subject: message.subject,
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
        importance: message.importance,
        conversation_id: message.conversation_id,
        parent_folder_id: message.parent_folder_id,
        body_preview: message.body_preview,
        body_content_type,
        body,
        body_truncated,
        raw: message.raw,
    }
}

fn address_parts(address: Option<EmailAddress>) -> (Option<String>, Option<String>) {
    match address {
        Some(EmailAddress { name, address }) => (address, name),
        None => (None, None),
    }
}
