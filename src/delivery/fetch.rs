//! What a delivery fetches from Graph at delivery time (nothing of it is stored in the
//! ledger): a message's attachments as [`content`](super::content) plans them, or its raw
//! MIME. Every request goes through the mailbox's Graph client, so its budget, slots and any
//! `Retry-After` apply; a [`GraphError::Throttled`] comes back to the caller to snooze on.

use crate::graph::{Attachment, GraphError, MailboxClient};

use super::content::{AttachmentView, ContentOptions, Omitted, Step, Unavailable, plan};

/// The attachments of a message for its payload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FetchedAttachments {
    pub views: Vec<AttachmentView>,
    /// Set when the message could not be listed (it is gone): `views` is empty.
    pub unavailable: Option<Unavailable>,
}

/// Why the raw MIME cannot be delivered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MimeError {
    #[error(
        "the raw MIME of the message is at least {size} bytes, over spec.delivery.webhook.maxMessageBytes ({limit}); raise the limit or use the json format"
    )]
    TooLarge { size: u64, limit: u64 },
    #[error(
        "the message no longer exists in the mailbox (deleted or moved out of reach before delivery), so its raw MIME cannot be fetched"
    )]
    MessageGone,
    #[error("cannot fetch the raw MIME: {0}")]
    Graph(#[from] GraphError),
}

/// Lists the message's attachments and, in `inline` mode, fetches the content of those the
/// limits allow, one after the other (each is one Graph request of the mailbox).
pub async fn attachments(
    mailbox: &MailboxClient,
    message_id: &str,
    options: &ContentOptions,
) -> Result<FetchedAttachments, GraphError> {
    let listed = match mailbox.list_attachments(message_id).await {
        Ok(listed) => listed,
        Err(GraphError::ItemNotFound { .. }) => {
            return Ok(FetchedAttachments {
                views: Vec::new(),
                unavailable: Some(Unavailable::MessageNotFound),
            });
        }
        Err(error) => return Err(error),
    };
    let steps = plan(&listed, options);
    let mut views = Vec::with_capacity(listed.len());
    for (attachment, step) in listed.iter().zip(steps) {
        let view = match step {
            Step::Describe => AttachmentView::metadata(attachment),
            Step::Omit(reason) => AttachmentView::omitted(attachment, reason),
            Step::Fetch => fetch_one(mailbox, message_id, attachment, options).await?,
        };
        views.push(view);
    }
    Ok(FetchedAttachments {
        views,
        unavailable: None,
    })
}

async fn fetch_one(
    mailbox: &MailboxClient,
    message_id: &str,
    attachment: &Attachment,
    options: &ContentOptions,
) -> Result<AttachmentView, GraphError> {
    match mailbox.attachment_content(message_id, &attachment.id).await {
        Ok(bytes) => Ok(AttachmentView::with_content(attachment, &bytes, options)),
        // Removed from the message (or the message deleted) since the listing.
        Err(GraphError::ItemNotFound { .. }) => {
            Ok(AttachmentView::omitted(attachment, Omitted::NotFound))
        }
        // The body was over the client's response cap: far over any limit.
        Err(GraphError::MalformedResponse { .. }) => {
            Ok(AttachmentView::omitted(attachment, Omitted::TooLarge))
        }
        Err(error) => Err(error),
    }
}

/// The message's raw MIME, at most `limit` bytes.
pub async fn raw_mime(
    mailbox: &MailboxClient,
    message_id: &str,
    limit: u64,
) -> Result<Vec<u8>, MimeError> {
    match mailbox.get_mime(message_id).await {
        Ok(raw) if raw.len() as u64 > limit => Err(MimeError::TooLarge {
            size: raw.len() as u64,
            limit,
        }),
        Ok(raw) => Ok(raw),
        Err(GraphError::ItemNotFound { .. }) => Err(MimeError::MessageGone),
        // Over the client's response cap, which is over any limit the spec allows.
        Err(GraphError::MalformedResponse { .. }) => Err(MimeError::TooLarge {
            size: mailbox.graph().config().max_response_bytes as u64,
            limit,
        }),
        Err(error) => Err(MimeError::Graph(error)),
    }
}
