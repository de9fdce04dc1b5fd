//! A message's attachments: the listing (metadata only) and the raw content of one file
//! attachment. Both go through [`MailboxClient::execute`], so they count against the
//! mailbox's budget and slots and honour every `Retry-After` like any other request.
//!
//! The listing selects its properties: without `$select`, Graph puts every file's whole
//! content (`contentBytes`, base64) in the listing. Content comes from `$value`, the raw bytes,
//! one attachment at a time, which the caller fetches only for what fits its limits.

use reqwest::Method;
use serde_json::Value;

use super::error::GraphError;
use super::{Call, MailboxClient};
use crate::storable;

/// Properties of the listing. `contentId` belongs to file attachments only, hence the cast.
const LISTING_SELECT: &str = "id,name,contentType,size,isInline,lastModifiedDateTime,microsoft.graph.fileAttachment/contentId";

/// Longest name, content type or content id kept, in bytes (Graph allows 255-character names; anything
/// much longer is hostile).
const MAX_TEXT_BYTES: usize = 1024;

/// Most attachments of one message read from a listing (Outlook's own limit is far lower).
const MAX_ATTACHMENTS: usize = 500;

/// The three kinds of Graph attachment, plus whatever a later Graph version adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum AttachmentKind {
    /// `#microsoft.graph.fileAttachment`: bytes, fetched by `$value`.
    File,
    /// `#microsoft.graph.itemAttachment`: an attached Outlook item (message, event, contact).
    Item,
    /// `#microsoft.graph.referenceAttachment`: a link to a file in OneDrive or SharePoint.
    Reference,
    /// An `@odata.type` this version does not know: metadata only.
    Other,
}

impl AttachmentKind {
    fn from_odata_type(odata_type: Option<&str>) -> Self {
        match odata_type.map(|t| t.trim_start_matches('#').to_ascii_lowercase()) {
            Some(t) if t == "microsoft.graph.fileattachment" => Self::File,
            Some(t) if t == "microsoft.graph.itemattachment" => Self::Item,
            Some(t) if t == "microsoft.graph.referenceattachment" => Self::Reference,
            _ => Self::Other,
        }
    }
}

/// One attachment as the listing describes it (no content).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub id: String,
    pub kind: AttachmentKind,
    pub name: String,
    pub content_type: Option<String>,
    /// As Graph reports it; it can run a little over the content's length.
    pub size: u64,
    pub is_inline: bool,
    pub content_id: Option<String>,
    pub last_modified: Option<String>,
}

impl Attachment {
    /// Reads one listing entry; an entry without an id is not an attachment anyone can fetch.
    pub fn from_value(value: &Value) -> Result<Self, String> {
        let text = |name: &str| {
            value
                .get(name)
                .and_then(Value::as_str)
                .map(|text| storable::text(text, MAX_TEXT_BYTES).into_owned())
        };
        let id = text("id").ok_or("an attachment without an id")?;
        Ok(Self {
            id,
            kind: AttachmentKind::from_odata_type(value.get("@odata.type").and_then(Value::as_str)),
            name: text("name").unwrap_or_default(),
            content_type: text("contentType"),
            // A negative or fractional size is nonsense: treated as unknown (0), and the
            // fetched content's length is checked against the limits anyway.
            size: value.get("size").and_then(Value::as_u64).unwrap_or(0),
            is_inline: value
                .get("isInline")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            content_id: text("contentId"),
            last_modified: text("lastModifiedDateTime"),
        })
    }
}

impl MailboxClient {
    /// `GET .../messages/{id}/attachments` with metadata only. A 404 `ErrorItemNotFound`
    /// (the message is gone) comes back as [`GraphError::ItemNotFound`].
    pub async fn list_attachments(&self, message_id: &str) -> Result<Vec<Attachment>, GraphError> {
        let mut url = self.url(&["messages", message_id, "attachments"])?;
        url.query_pairs_mut().append_pair("$select", LISTING_SELECT);
        let reply = self.execute(&get(url)).await?;
        let malformed = |message: String| GraphError::MalformedResponse {
            message,
            request_id: reply.request_id.clone(),
        };
        let body: Value = serde_json::from_slice(&reply.body)
            .map_err(|_| malformed("an attachment listing that is not JSON".into()))?;
        let entries = body
            .get("value")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed("an attachment listing without a value array".into()))?;
        if entries.len() > MAX_ATTACHMENTS {
            return Err(malformed(format!(
                "an attachment listing of {} entries (at most {MAX_ATTACHMENTS} are read)",
                entries.len()
            )));
        }
        entries
            .iter()
            .map(|entry| Attachment::from_value(entry).map_err(malformed))
            .collect()
    }

    /// The raw content of a file attachment: `GET .../attachments/{aid}/$value`.
    pub async fn attachment_content(
        &self,
        message_id: &str,
        attachment_id: &str,
    ) -> Result<Vec<u8>, GraphError> {
        let url = self.url(&[
            "messages",
            message_id,
            "attachments",
            attachment_id,
            "$value",
        ])?;
        Ok(self.execute(&get(url)).await?.body)
    }
}

fn get(url: reqwest::Url) -> Call {
    Call {
        method: Method::GET,
        url,
        prefer: Vec::new(),
        body: None,
        weight: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn listing_entries_keep_names_in_any_script_and_mark_kinds() {
        let entry = json!({
            "@odata.type": "#microsoft.graph.fileAttachment",
            "id": "AAMk=",
            "name": "فاتورة-請求書 📎.pdf",
            "contentType": "application/pdf",
            "size": 3000,
            "isInline": false,
            "contentId": null,
        });
        let attachment = Attachment::from_value(&entry).expect("an attachment");
        assert_eq!(attachment.name, "فاتورة-請求書 📎.pdf");
        assert_eq!(attachment.kind, AttachmentKind::File);
        assert_eq!(attachment.size, 3000);
        assert_eq!(attachment.content_id, None);
        for (odata_type, kind) in [
            ("#microsoft.graph.itemAttachment", AttachmentKind::Item),
            (
                "#Microsoft.Graph.ReferenceAttachment",
                AttachmentKind::Reference,
            ),
            ("#microsoft.graph.somethingNew", AttachmentKind::Other),
        ] {
            let entry = json!({"@odata.type": odata_type, "id": "x", "size": -5});
            let attachment = Attachment::from_value(&entry).expect("an attachment");
            assert_eq!(attachment.kind, kind);
            assert_eq!(attachment.size, 0, "a negative size is unknown");
        }
        assert!(Attachment::from_value(&json!({"name": "no id"})).is_err());
        let hostile =
            Attachment::from_value(&json!({"id": "x", "name": "a\u{0}b"})).expect("an attachment");
        assert_eq!(hostile.name, "a\u{fffd}b", "made storable");
    }
}
