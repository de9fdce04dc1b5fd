//! `mailpoll messages list`: a MailboxPoll's ledger for people.

use super::table::{self, cell, time};
use crate::ledger::MessageListing;

pub fn render_table(messages: &[MessageListing]) -> String {
    let rows: Vec<[String; 7]> = messages
        .iter()
        .map(|message| {
            [
                message.seq.to_string(),
                message.delivery_state.clone(),
                time(message.received_at),
                cell(message.from_address.as_deref()),
                cell(message.subject.as_deref()),
                cell(Some(&message.message_id)),
                cell(message.error.as_deref()),
            ]
        })
        .collect();
    table::render(
        [
            "SEQ", "STATE", "RECEIVED", "FROM", "SUBJECT", "GRAPH ID", "ERROR",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_message_shows_why() {
        let table = render_table(&[MessageListing {
            seq: 42,
            message_id: "AAk=".into(),
            received_at: None,
            from_address: Some("billing@fabrikam.com".into()),
            subject: Some("Invoice\u{1b}[31m 4471".into()),
            delivery_state: "failed".into(),
            delivered_at: None,
            error: Some("webhook rejected the message with HTTP 422: bad".into()),
        }]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("SEQ  STATE   RECEIVED"));
        assert!(lines[1].starts_with("42   failed  -  "));
        assert!(
            lines[1].contains("Invoice [31m 4471"),
            "no escape reaches the terminal"
        );
        assert!(lines[1].ends_with("HTTP 422: bad"));
    }
}
