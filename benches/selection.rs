//! What `spec.filter` costs: compiling and checking a filter (once per spec change and
//! process, then cached), deciding one message (once per delivery, before the webhook), and
//! the admission webhook's answer to one review (parse, compile, answer; once per apply).
//! Prints a Markdown table.
//!
//!   cargo bench --bench selection

use std::hint::black_box;
use std::time::{Duration, Instant};

use chrono::Utc;
use mailpoll::ledger::LedgerMessage;
use mailpoll::selection::{Filter, Verdict};

const FILTERS: &[(&str, &str)] = &[
    ("one comparison", r#"message.importance == "high""#),
    (
        "Power Automate set",
        r#"message.hasAttachments && message.importance == "high" && message.subject.contains("Invoice") && message.from.address.endsWith("@fabrikam.com")"#,
    ),
    (
        "recipients exists",
        r#"message.toRecipients.exists(r, r.address == "invoices@contoso.com") || message.ccRecipients.exists(r, r.address == "invoices@contoso.com")"#,
    ),
    (
        "regex on subject",
        r#"message.subject.matches("^(Invoice|Rechnung|Facture) [0-9-]+")"#,
    ),
];

fn message() -> LedgerMessage {
    // Ten recipients, the one the filters look for last.
    let mut recipients: Vec<serde_json::Value> = (0..9)
        .map(|i| serde_json::json!({"name": format!("R{i}"), "address": format!("r{i}@contoso.com")}))
        .collect();
    recipients.push(serde_json::json!({"name": "Invoices", "address": "Invoices@Contoso.com"}));
    LedgerMessage {
        message_id: "AAMk-bench".into(),
        subject: Some("Invoice 2026-117 for December".into()),
        from_address: Some("billing@fabrikam.com".into()),
        from_name: Some("Fabrikam Billing".into()),
        to_recipients: serde_json::Value::Array(recipients.clone()),
        cc_recipients: serde_json::Value::Array(recipients),
        received_at: Some(Utc::now()),
        has_attachments: Some(true),
        importance: Some("high".into()),
        body_preview: Some("Please find attached the invoice for December.".into()),
        raw: serde_json::json!({"categories": ["Finance"]}),
        ..LedgerMessage::default()
    }
}

/// An AdmissionReview of a MailboxPoll create with `filter`, as the API server sends it.
fn review(filter: &str) -> Vec<u8> {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "e911857d-c318-11e8-bbad-025000000001",
            "kind": {"group": "mailpoll.dev", "version": "v1alpha1", "kind": "MailboxPoll"},
            "resource": {"group": "mailpoll.dev", "version": "v1alpha1", "resource": "mailboxpolls"},
            "name": "invoices",
            "namespace": "mail",
            "operation": "CREATE",
            "userInfo": {"username": "admin"},
            "object": {
                "apiVersion": "mailpoll.dev/v1alpha1",
                "kind": "MailboxPoll",
                "metadata": {"name": "invoices", "namespace": "mail"},
                "spec": {"mailbox": "invoices@contoso.com", "filter": filter}
            }
        }
    })
    .to_string()
    .into_bytes()
}

/// Mean time per call of `f` over `rounds` calls.
fn per_call(rounds: u32, mut f: impl FnMut()) -> Duration {
    let started = Instant::now();
    for _ in 0..rounds {
        f();
    }
    started.elapsed() / rounds
}

fn main() {
    let message = message();
    println!("| filter | compile + check | decide one message | answer one admission review |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, source) in FILTERS {
        let compile = per_call(200, || {
            black_box(Filter::compile(black_box(source)).ok());
        });
        let filter = match Filter::compile(source) {
            Ok(filter) => filter,
            Err(error) => panic!("{name}: {error}"),
        };
        let mut delivered = 0u32;
        let decide = per_call(20_000, || {
            if filter.verdict(black_box(&message)) == Verdict::Deliver {
                delivered += 1;
            }
        });
        assert!(delivered > 0, "{name}: the bench message should match");
        let body = review(source);
        let admit = per_call(200, || {
            black_box(mailpoll::admission::answer(black_box(&body)));
        });
        println!("| {name} | {compile:.2?} | {decide:.2?} | {admit:.2?} |");
    }
}
