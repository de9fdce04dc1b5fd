//! Attachments of emulated messages and the raw MIME of a message, as Graph serves them:
//!
//! - `GET .../messages/{id}/attachments`: the listing. Without `$select` every file
//!   attachment carries its whole content as `contentBytes` (Graph does the same, which is why
//!   a client selects); with it, only the selected properties (`contentId` may be named plain or
//!   cast as `microsoft.graph.fileAttachment/contentId`), plus `@odata.type` and `id`.
//! - `GET .../attachments/{aid}`: one attachment, file content included.
//! - `GET .../attachments/{aid}/$value`: the raw content of a file attachment, the MIME of an
//!   item attachment; a reference attachment has none (400).
//! - `GET .../messages/{id}/$value`: the message as RFC 5322 text, its attachments as base64
//!   MIME parts (inline ones in a `multipart/related` with their `Content-ID`).
//!
//! Graph's `hasAttachments` leaves inline attachments out: a message whose only attachments
//! are inline images says `false`, and the emulator does the same.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::state::ApiError;

/// The three kinds of attachment Graph has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AttachmentKind {
    /// `#microsoft.graph.fileAttachment`: bytes.
    #[default]
    File,
    /// `#microsoft.graph.itemAttachment`: an attached Outlook item (a forwarded message).
    Item,
    /// `#microsoft.graph.referenceAttachment`: a link to a file in OneDrive or SharePoint.
    Reference,
}

impl AttachmentKind {
    pub fn odata_type(self) -> &'static str {
        match self {
            Self::File => "#microsoft.graph.fileAttachment",
            Self::Item => "#microsoft.graph.itemAttachment",
            Self::Reference => "#microsoft.graph.referenceAttachment",
        }
    }
}

/// An attachment to add with a message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct NewAttachment {
    pub kind: AttachmentKind,
    /// Any text: names in any script pass through as given.
    pub name: String,
    pub content_type: Option<String>,
    /// The bytes of a file attachment, the MIME text of an item attachment; base64 in JSON.
    #[serde(with = "base64_bytes")]
    pub content: Vec<u8>,
    pub is_inline: bool,
    pub content_id: Option<String>,
    /// The size Graph reports; by default the content's length. Graph's own sizes run a little
    /// over the content (they count the attachment's metadata too).
    pub reported_size: Option<u64>,
}

impl NewAttachment {
    pub fn file(name: &str, content_type: &str, content: Vec<u8>) -> Self {
        Self {
            kind: AttachmentKind::File,
            name: name.into(),
            content_type: Some(content_type.into()),
            content,
            ..Self::default()
        }
    }

    /// An image shown in the HTML body through `cid:{content_id}`.
    pub fn inline_image(name: &str, content_id: &str, content: Vec<u8>) -> Self {
        Self {
            is_inline: true,
            content_id: Some(content_id.into()),
            ..Self::file(name, "image/png", content)
        }
    }

    /// A forwarded message attached as an Outlook item.
    pub fn item(name: &str, subject: &str) -> Self {
        let mime = format!(
            "Subject: {subject}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=\"utf-8\"\r\n\r\nForwarded.\r\n"
        );
        Self {
            kind: AttachmentKind::Item,
            name: name.into(),
            content_type: None,
            content: mime.into_bytes(),
            ..Self::default()
        }
    }

    /// A link to a cloud file.
    pub fn reference(name: &str) -> Self {
        Self {
            kind: AttachmentKind::Reference,
            name: name.into(),
            content_type: None,
            ..Self::default()
        }
    }

    fn size(&self) -> u64 {
        self.reported_size.unwrap_or(self.content.len() as u64)
    }
}

/// An attachment stored with its message.
#[derive(Clone, Debug)]
pub(super) struct StoredAttachment {
    pub id: String,
    pub attachment: NewAttachment,
}

/// The properties a listing or a get can carry, in Graph's order.
const PROPERTIES: &[&str] = &[
    "id",
    "lastModifiedDateTime",
    "name",
    "contentType",
    "size",
    "isInline",
    "contentId",
    "contentLocation",
    "contentBytes",
];

/// One attachment as Graph renders it, restricted to `select` (plus `@odata.type`, `id`).
pub(super) fn render(
    stored: &StoredAttachment,
    modified: &str,
    select: Option<&[String]>,
) -> Value {
    let attachment = &stored.attachment;
    let file = attachment.kind == AttachmentKind::File;
    let mut object = Map::new();
    object.insert("@odata.type".into(), json!(attachment.kind.odata_type()));
    for property in PROPERTIES {
        let wanted = match select {
            None => true,
            Some(select) => *property == "id" || selects(select, property),
        };
        // Only file attachments have content ids, locations and bytes.
        let file_only = matches!(*property, "contentId" | "contentLocation" | "contentBytes");
        if !wanted || (file_only && !file) {
            continue;
        }
        let value = match *property {
            "id" => json!(stored.id),
            "lastModifiedDateTime" => json!(modified),
            "name" => json!(attachment.name),
            "contentType" => json!(attachment.content_type),
            "size" => json!(attachment.size()),
            "isInline" => json!(attachment.is_inline),
            "contentId" => json!(attachment.content_id),
            "contentLocation" => Value::Null,
            _ => json!(STANDARD.encode(&attachment.content)),
        };
        object.insert((*property).into(), value);
    }
    Value::Object(object)
}

/// Whether `$select` names `property`, plain or cast to the file attachment type.
fn selects(select: &[String], property: &str) -> bool {
    select.iter().any(|field| {
        field == property
            || field
                .strip_prefix("microsoft.graph.fileAttachment/")
                .is_some_and(|name| name == property)
    })
}

/// The raw content of an attachment (`$value`) and its content type.
pub(super) fn raw_value(stored: &StoredAttachment) -> Result<(Vec<u8>, String), ApiError> {
    let attachment = &stored.attachment;
    match attachment.kind {
        AttachmentKind::File => Ok((
            attachment.content.clone(),
            attachment
                .content_type
                .clone()
                .unwrap_or_else(|| "application/octet-stream".into()),
        )),
        AttachmentKind::Item => Ok((attachment.content.clone(), "message/rfc822".into())),
        AttachmentKind::Reference => Err(ApiError::new(
            400,
            "ErrorInvalidRequest",
            "The raw content of a reference attachment cannot be read.",
        )),
    }
}

/// What a message's MIME is made of.
pub(super) struct MimeParts<'a> {
    /// Header lines, each without its line break.
    pub headers: Vec<String>,
    pub body: &'a str,
    pub body_is_html: bool,
    pub attachments: &'a [StoredAttachment],
    /// Seeds the boundaries, so one message's MIME is the same every time.
    pub boundary_seed: &'a str,
}

/// The message as RFC 5322 text. Without attachments, a single text part; with some, a
/// `multipart/mixed` whose first part is the body (wrapped with the inline ones in a
/// `multipart/related`) and whose other parts are the attachments, base64 in lines of 76.
pub(super) fn compose_mime(parts: &MimeParts<'_>) -> String {
    let mut text = String::new();
    for line in &parts.headers {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str("MIME-Version: 1.0\r\n");
    let body_part = body_part(parts.body, parts.body_is_html);
    if parts.attachments.is_empty() {
        text.push_str(&body_part);
        return text;
    }
    let (inline, attached): (Vec<_>, Vec<_>) = parts
        .attachments
        .iter()
        .filter(|stored| stored.attachment.kind != AttachmentKind::Reference)
        .partition(|stored| stored.attachment.is_inline);
    let mixed = format!("mixed_{}", parts.boundary_seed);
    text.push_str(&format!(
        "Content-Type: multipart/mixed; boundary=\"{mixed}\"\r\n\r\n"
    ));
    text.push_str(&format!("--{mixed}\r\n"));
    if inline.is_empty() {
        text.push_str(&body_part);
    } else {
        let related = format!("related_{}", parts.boundary_seed);
        text.push_str(&format!(
            "Content-Type: multipart/related; boundary=\"{related}\"\r\n\r\n"
        ));
        text.push_str(&format!("--{related}\r\n{body_part}\r\n"));
        for stored in inline {
            text.push_str(&format!("--{related}\r\n{}\r\n", attachment_part(stored)));
        }
        text.push_str(&format!("--{related}--\r\n"));
    }
    for stored in attached {
        text.push_str(&format!("\r\n--{mixed}\r\n{}", attachment_part(stored)));
    }
    text.push_str(&format!("\r\n--{mixed}--\r\n"));
    text
}

fn body_part(body: &str, is_html: bool) -> String {
    let content_type = if is_html { "text/html" } else { "text/plain" };
    format!(
        "Content-Type: {content_type}; charset=\"utf-8\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}",
        base64_lines(body.as_bytes())
    )
}

/// One attachment as a MIME part; names beyond ASCII as RFC 2231 parameters (`filename*`).
fn attachment_part(stored: &StoredAttachment) -> String {
    let attachment = &stored.attachment;
    let content_type = match attachment.kind {
        AttachmentKind::Item => "message/rfc822".to_string(),
        _ => attachment
            .content_type
            .clone()
            .unwrap_or_else(|| "application/octet-stream".into()),
    };
    let disposition = if attachment.is_inline {
        "inline"
    } else {
        "attachment"
    };
    let name = rfc2231_parameter("filename", &attachment.name);
    let mut part =
        format!("Content-Type: {content_type}\r\nContent-Disposition: {disposition}; {name}\r\n");
    if let Some(id) = &attachment.content_id {
        part.push_str(&format!("Content-ID: <{id}>\r\n"));
    }
    part.push_str(&format!(
        "Content-Transfer-Encoding: base64\r\n\r\n{}",
        base64_lines(&attachment.content)
    ));
    part
}

/// `name="text"` for plain ASCII, `name*=utf-8''percent-encoded` otherwise.
fn rfc2231_parameter(name: &str, value: &str) -> String {
    let plain = value
        .chars()
        .all(|c| (c.is_ascii_graphic() && c != '"' && c != '\\') || c == ' ');
    if plain {
        return format!("{name}=\"{value}\"");
    }
    let encoded: String = value
        .bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
                (byte as char).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect();
    format!("{name}*=utf-8''{encoded}")
}

fn base64_lines(bytes: &[u8]) -> String {
    let encoded = STANDARD.encode(bytes);
    let mut text = String::with_capacity(encoded.len() + encoded.len() / 38 + 2);
    for chunk in encoded.as_bytes().chunks(76) {
        text.push_str(&String::from_utf8_lossy(chunk));
        text.push_str("\r\n");
    }
    text
}

/// Bytes as base64 text in JSON (the admin API's messages).
mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// A header value as Exchange writes it: as is when ASCII, else an RFC 2047 encoded word.
pub(super) fn encoded_word(text: &str) -> String {
    if text.is_ascii() {
        text.to_string()
    } else {
        format!("=?utf-8?B?{}?=", STANDARD.encode(text.as_bytes()))
    }
}

/// Which attachment endpoint of a message a request names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum AttachmentRequest {
    /// `.../attachments`
    List,
    /// `.../attachments/{aid}`
    One(String),
    /// `.../attachments/{aid}/$value`
    Value(String),
}

impl AttachmentRequest {
    /// From the path segments after `.../messages/{id}/`.
    pub(super) fn parse(tail: &[&str]) -> Option<Self> {
        match tail {
            ["attachments"] => Some(Self::List),
            ["attachments", id] => Some(Self::One((*id).to_string())),
            ["attachments", id, "$value"] => Some(Self::Value((*id).to_string())),
            _ => None,
        }
    }

    /// The endpoint's name in the counters.
    pub(super) fn endpoint(&self) -> &'static str {
        match self {
            Self::List => "attachments",
            Self::One(_) => "attachment",
            Self::Value(_) => "attachmentValue",
        }
    }
}

/// The answer to an attachment request of a live message: a JSON document, or raw bytes and
/// their content type.
pub(super) enum AttachmentAnswer {
    Json(Value),
    Raw(Vec<u8>, String),
}

pub(super) fn answer(
    world: &super::state::World,
    mailbox: usize,
    message: usize,
    request: &AttachmentRequest,
    select: Option<&[String]>,
) -> Result<AttachmentAnswer, ApiError> {
    Ok(match request {
        AttachmentRequest::List => AttachmentAnswer::Json(json!({
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#users('emulator')/messages('emulator')/attachments",
            "value": world.attachment_listing(mailbox, message, select),
        })),
        AttachmentRequest::One(id) => {
            AttachmentAnswer::Json(world.attachment(mailbox, message, id)?)
        }
        AttachmentRequest::Value(id) => {
            let (bytes, content_type) = world.attachment_value(mailbox, message, id)?;
            AttachmentAnswer::Raw(bytes, content_type)
        }
    })
}

/// `$select` of an attachment request: base properties, or file attachment ones cast as
/// `microsoft.graph.fileAttachment/name`. Anything else is refused as Graph refuses it.
pub(super) fn parse_select(text: &str) -> Result<Vec<String>, ApiError> {
    text.split(',')
        .map(str::trim)
        .filter(|field| !field.is_empty())
        .map(|field| {
            let name = field
                .strip_prefix("microsoft.graph.fileAttachment/")
                .unwrap_or(field);
            if PROPERTIES.contains(&name) {
                Ok(field.to_string())
            } else {
                Err(ApiError::new(
                    400,
                    "RequestBroker--ParseUri",
                    format!("Could not find a property named '{field}' on type 'microsoft.graph.attachment'."),
                ))
            }
        })
        .collect()
}
