//! The delivery-side decision of `spec.filter`: a message it rejects is recorded as filtered
//! and its deliver task ends there (no webhook, no after-actions).

use sqlx::PgConnection;
use uuid::Uuid;

use crate::directory::MailboxConfig;
use crate::ledger::{self, StoredMessage};
use crate::queue::HandlerError;
use crate::selection::Verdict;

/// Applies the MailboxPoll's filter to a message about to be delivered; returns whether it was
/// filtered out (recorded so). A message whose webhook already accepted it is past the
/// decision: a retry of its later steps is not filtered.
pub async fn filter_out(
    conn: &mut PgConnection,
    config: &MailboxConfig,
    ledger_id: Uuid,
    stored: &StoredMessage,
) -> Result<bool, HandlerError> {
    let Some(filter) = &config.filter else {
        return Ok(false);
    };
    if stored.webhook_delivered_at.is_some() {
        return Ok(false);
    }
    match filter.verdict(&stored.message) {
        Verdict::Deliver => Ok(false),
        Verdict::Filtered(reason) => {
            ledger::mark_filtered(conn, ledger_id, &stored.message.message_id, &reason)
                .await
                .map_err(HandlerError::retryable)?;
            Ok(true)
        }
        Verdict::Undecided(error) => {
            // Delivered as if there were no filter: a filter must not lose mail by accident.
            let source = &config.source;
            tracing::warn!(
                namespace = %source.namespace,
                name = %source.name,
                message_id = %stored.message.message_id,
                %error,
                "spec.filter could not decide; delivering the message"
            );
            Ok(false)
        }
    }
}
