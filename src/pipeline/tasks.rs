//! The pipeline's task kinds and their arguments.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::queue::TaskArgs;

/// One delta round (or a few, for forced polls that arrive meanwhile) of a MailboxPoll.
/// At most one is pending or running per MailboxPoll.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollTask {
    pub mailbox_uid: Uuid,
}

impl TaskArgs for PollTask {
    const KIND: &'static str = "poll";

    fn owner(&self) -> Option<Uuid> {
        Some(self.mailbox_uid)
    }

    fn dedupe_key(&self) -> Option<String> {
        Some(poll_dedupe_key(self.mailbox_uid))
    }
}

/// The dedupe key of a MailboxPoll's poll task.
pub fn poll_dedupe_key(uid: Uuid) -> String {
    format!("{}:{uid}", PollTask::KIND)
}

/// The webhook step of one recorded message, then its after-actions queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliverTask {
    pub mailbox_uid: Uuid,
    pub message_id: String,
    /// The ledger the message was recorded in (its MailboxPoll's ledger identity then: a
    /// later change of folder does not move it). Absent in tasks written before identities
    /// existed, whose ledger is keyed by `mailbox_uid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_id: Option<Uuid>,
}

impl DeliverTask {
    /// The ledger holding the message.
    pub fn ledger(&self) -> Uuid {
        self.ledger_id.unwrap_or(self.mailbox_uid)
    }
}

impl TaskArgs for DeliverTask {
    const KIND: &'static str = "deliver";

    fn owner(&self) -> Option<Uuid> {
        Some(self.mailbox_uid)
    }
}

/// The queued after-actions (mark read, move) of one MailboxPoll, batched. One batch runner
/// per MailboxPoll at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionsTask {
    pub mailbox_uid: Uuid,
}

impl TaskArgs for ActionsTask {
    const KIND: &'static str = "actions";

    fn owner(&self) -> Option<Uuid> {
        Some(self.mailbox_uid)
    }

    fn dedupe_key(&self) -> Option<String> {
        Some(format!("{}:{}", Self::KIND, self.mailbox_uid))
    }
}
