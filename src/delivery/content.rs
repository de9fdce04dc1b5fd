//! What a webhook request carries besides the message's fields: the body's format and the
//! message's attachments, within size limits. The choices here are pure; fetching what they
//! ask for from Graph is [`super::fetch`]'s.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::graph::{Attachment, AttachmentKind};

/// The body of each request (`spec.delivery.webhook.format`).
// No doc comments on the variants: schemars would turn them into a `oneOf`, which a CRD's
// structural schema does not take; README describes each value.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Json,
    Cloudevents,
    Mime,
}

/// Attachments in the JSON payload (`spec.delivery.webhook.attachments`).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AttachmentMode {
    #[default]
    None,
    Metadata,
    Inline,
}

/// Largest attachment whose content is put in a payload, unless the spec says otherwise.
pub const DEFAULT_MAX_ATTACHMENT_BYTES: u64 = 10 * 1024 * 1024;
/// Most attachment content (or raw MIME) per message, unless the spec says otherwise.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 25 * 1024 * 1024;
/// The highest either limit may be set to: under the Graph client's 64 MiB response cap,
/// and a request of that size is already more than most receivers take.
pub const MAX_SIZE_LIMIT_BYTES: u64 = 50 * 1024 * 1024;

/// The content settings of a webhook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContentOptions {
    pub format: Format,
    pub attachments: AttachmentMode,
    /// Per attachment, in decoded bytes (base64 adds a third on the wire).
    pub max_attachment_bytes: u64,
    /// Per message: the attachments' content together, or the raw MIME.
    pub max_message_bytes: u64,
}

impl Default for ContentOptions {
    fn default() -> Self {
        Self {
            format: Format::Json,
            attachments: AttachmentMode::None,
            max_attachment_bytes: DEFAULT_MAX_ATTACHMENT_BYTES,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl ContentOptions {
    /// Whether a delivery lists the message's attachments (the JSON formats only: the MIME
    /// carries them itself).
    pub fn lists_attachments(&self) -> bool {
        self.format != Format::Mime && self.attachments != AttachmentMode::None
    }
}

/// Whether a message's attachments are worth listing. Graph's `hasAttachments` leaves inline
/// attachments out, so a message whose only attachments are inline images says `false`: an
/// HTML body that references a `cid:` is listed too. Unknown (`None`) is listed.
pub fn worth_listing(has_attachments: Option<bool>, body: Option<&str>) -> bool {
    has_attachments != Some(false) || body.is_some_and(|body| body.contains("cid:"))
}

/// Why an attachment's content is not in the payload (`inline` mode only).
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Omitted {
    /// Larger than `maxAttachmentBytes`.
    TooLarge,
    /// It would take the message's attachments over `maxMessageBytes`.
    MessageTooLarge,
    /// An item or reference attachment: it has no file content.
    NotAFile,
    /// Gone from the message between the listing and the fetch.
    NotFound,
}

/// Why a message's attachments could not be listed at all.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Unavailable {
    /// The message was deleted from the mailbox (or moved out of reach) before delivery.
    MessageNotFound,
}

/// One attachment in the JSON payload, Graph's names, content base64 as Postmark posts it.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentView {
    pub id: String,
    pub kind: AttachmentKind,
    pub name: String,
    pub content_type: Option<String>,
    pub size: u64,
    pub is_inline: bool,
    pub content_id: Option<String>,
    pub last_modified_date_time: Option<String>,
    /// Base64 of the content (`inline` mode, within the limits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Why `content` is absent (`inline` mode only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_omitted: Option<Omitted>,
}

impl AttachmentView {
    pub fn metadata(attachment: &Attachment) -> Self {
        Self {
            id: attachment.id.clone(),
            kind: attachment.kind,
            name: attachment.name.clone(),
            content_type: attachment.content_type.clone(),
            size: attachment.size,
            is_inline: attachment.is_inline,
            content_id: attachment.content_id.clone(),
            last_modified_date_time: attachment.last_modified.clone(),
            content: None,
            content_omitted: None,
        }
    }

    pub fn omitted(attachment: &Attachment, reason: Omitted) -> Self {
        Self {
            content_omitted: Some(reason),
            ..Self::metadata(attachment)
        }
    }

    /// With its content, unless the bytes fetched are over the per-attachment limit (the
    /// listed size can be wrong; the bytes are what counts).
    pub fn with_content(attachment: &Attachment, bytes: &[u8], options: &ContentOptions) -> Self {
        if bytes.len() as u64 > options.max_attachment_bytes {
            return Self::omitted(attachment, Omitted::TooLarge);
        }
        Self {
            size: bytes.len() as u64,
            content: Some(STANDARD.encode(bytes)),
            ..Self::metadata(attachment)
        }
    }
}

/// What to do with each listed attachment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Its metadata only (`metadata` mode).
    Describe,
    /// Fetch its content.
    Fetch,
    /// Its metadata and why there is no content.
    Omit(Omitted),
}

/// The step for each attachment, in order: within `inline`, file attachments are fetched while
/// each fits the per-attachment limit and all fetched so far fit the per-message limit (by
/// their listed sizes); a large one does not stop smaller ones after it.
pub fn plan(attachments: &[Attachment], options: &ContentOptions) -> Vec<Step> {
    let mut budget = options.max_message_bytes;
    attachments
        .iter()
        .map(|attachment| {
            if options.attachments != AttachmentMode::Inline {
                return Step::Describe;
            }
            if attachment.kind != AttachmentKind::File {
                return Step::Omit(Omitted::NotAFile);
            }
            if attachment.size > options.max_attachment_bytes {
                return Step::Omit(Omitted::TooLarge);
            }
            if attachment.size > budget {
                return Step::Omit(Omitted::MessageTooLarge);
            }
            budget -= attachment.size;
            Step::Fetch
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, size: u64) -> Attachment {
        Attachment {
            id: format!("id-{name}"),
            kind: AttachmentKind::File,
            name: name.into(),
            content_type: Some("application/pdf".into()),
            size,
            is_inline: false,
            content_id: None,
            last_modified: None,
        }
    }

    fn inline(limit_each: u64, limit_all: u64) -> ContentOptions {
        ContentOptions {
            attachments: AttachmentMode::Inline,
            max_attachment_bytes: limit_each,
            max_message_bytes: limit_all,
            ..ContentOptions::default()
        }
    }

    #[test]
    fn files_are_fetched_within_both_limits_and_the_rest_say_why() {
        let item = Attachment {
            kind: AttachmentKind::Item,
            ..file("fwd", 10)
        };
        let attachments = [
            file("a", 40),
            file("huge", 101),
            file("b", 50),
            item,
            file("c", 20),
            file("d", 10),
        ];
        assert_eq!(
            plan(&attachments, &inline(100, 100)),
            vec![
                Step::Fetch,
                Step::Omit(Omitted::TooLarge),
                Step::Fetch,
                Step::Omit(Omitted::NotAFile),
                Step::Omit(Omitted::MessageTooLarge),
                Step::Fetch,
            ]
        );
        let metadata = ContentOptions {
            attachments: AttachmentMode::Metadata,
            ..inline(100, 100)
        };
        assert!(
            plan(&attachments, &metadata)
                .iter()
                .all(|step| *step == Step::Describe)
        );
    }

    #[test]
    fn fetched_bytes_over_the_limit_are_omitted_whatever_the_listing_said() {
        let listed = file("liar", 10);
        let view = AttachmentView::with_content(&listed, &[7; 11], &inline(10, 100));
        assert_eq!(view.content, None);
        assert_eq!(view.content_omitted, Some(Omitted::TooLarge));
        let view = AttachmentView::with_content(&listed, &[0xff, 0, 1], &inline(10, 100));
        assert_eq!(view.content.as_deref(), Some("/wAB"));
        assert_eq!(view.size, 3);
    }

    #[test]
    fn inline_only_messages_are_listed_when_the_body_references_them() {
        assert!(worth_listing(Some(true), None));
        assert!(worth_listing(None, None));
        assert!(!worth_listing(Some(false), None));
        assert!(!worth_listing(Some(false), Some("<p>no images</p>")));
        assert!(worth_listing(Some(false), Some("<img src=\"cid:logo\">")));
    }

    #[test]
    fn the_payload_shape_uses_graph_names_and_says_why_content_is_missing() {
        let view = AttachmentView::omitted(&file("a.pdf", 5), Omitted::MessageTooLarge);
        let json = serde_json::to_value(&view).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "id": "id-a.pdf",
                "kind": "file",
                "name": "a.pdf",
                "contentType": "application/pdf",
                "size": 5,
                "isInline": false,
                "contentId": null,
                "lastModifiedDateTime": null,
                "contentOmitted": "messageTooLarge",
            })
        );
    }
}
