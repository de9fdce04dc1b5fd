use super::*;

fn message() -> LedgerMessage {
    LedgerMessage {
        message_id: "AAMk-1".into(),
        subject: Some("Invoice 2026-117 for December".into()),
        from_address: Some("Billing@Fabrikam.com".into()),
        from_name: Some("Fabrikam Billing".into()),
        to_recipients: serde_json::json!([
            {"name": "Invoices", "address": "invoices@contoso.com"},
            {"name": null, "address": "ap@contoso.com"}
        ]),
        cc_recipients: serde_json::Value::Null,
        received_at: DateTime::parse_from_rfc3339("2026-12-01T09:30:00Z")
            .ok()
            .map(|t| t.with_timezone(&Utc)),
        is_read: Some(false),
        has_attachments: Some(true),
        importance: Some("high".into()),
        body_preview: Some("Please pay".into()),
        raw: serde_json::json!({"categories": ["Finance", "Urgent"]}),
        ..LedgerMessage::default()
    }
}

fn verdict(source: &str) -> Verdict {
    Filter::compile(source)
        .unwrap_or_else(|e| panic!("{source}: {e}"))
        .verdict(&message())
}

fn rejection(source: &str) -> String {
    Filter::compile(source)
        .err()
        .unwrap_or_else(|| panic!("{source} should be rejected"))
        .to_string()
}

/// The Power Automate "When a new email arrives (V3)" filters, as README shows them.
#[test]
fn power_automate_filters_as_cel() {
    let deliver = [
        r#"message.from.address == "billing@fabrikam.com""#,
        r#"message.toRecipients.exists(r, r.address == "invoices@contoso.com")"#,
        r#"message.subject.contains("Invoice")"#,
        r#"message.importance == "high""#,
        "message.hasAttachments",
        r#"message.from.address.endsWith("@fabrikam.com") && message.hasAttachments"#,
        "!message.isRead",
        r#""Finance" in message.categories"#,
        r#"message.receivedDateTime >= timestamp("2026-12-01T00:00:00Z")"#,
        r#"message.subject.matches("^Invoice [0-9-]+")"#,
        "size(message.ccRecipients) == 0",
        r#"message.from.name.startsWith("Fabrikam")"#,
    ];
    for source in deliver {
        assert_eq!(verdict(source), Verdict::Deliver, "{source}");
    }
    let filtered = [
        r#"message.from.address == "someone@else.com""#,
        r#"message.importance == "low""#,
        "message.isRead",
        r#"message.subject.contains("Receipt")"#,
        r#"message.ccRecipients.exists(r, r.address == "invoices@contoso.com")"#,
    ];
    for source in filtered {
        assert_eq!(
            verdict(source),
            Verdict::Filtered("spec.filter did not match".into()),
            "{source}"
        );
    }
}

#[test]
fn broken_filters_are_rejected_naming_the_field() {
    let cases = [
        ("", "spec.filter: must not be empty"),
        (
            "message.subject ==",
            "spec.filter: syntax error: ERROR: <input>:1:",
        ),
        (
            "mesage.subject == 'x'",
            "spec.filter: unknown variable \"mesage\"",
        ),
        (
            "message.sujbect == 'x'",
            "spec.filter: message has no field \"sujbect\"",
        ),
        (
            "message.from.email == 'x'",
            "spec.filter: message.from has no field \"email\"",
        ),
        (
            "message.subject",
            "spec.filter: must evaluate to a bool (true delivers the message), not a string",
        ),
        (
            "size(message.toRecipients)",
            "spec.filter: must evaluate to a bool (true delivers the message), not a int",
        ),
        ("message.subject > 3", "spec.filter: "),
        ("nosuchfunction(message.subject)", "spec.filter: "),
    ];
    for (source, expected) in cases {
        let error = rejection(source);
        assert!(error.starts_with(expected), "{source:?}: {error}");
    }
    let long = format!("message.subject == '{}'", "x".repeat(MAX_FILTER_CHARS));
    assert_eq!(
        rejection(&long),
        format!("spec.filter: must be at most {MAX_FILTER_CHARS} characters")
    );
}

#[test]
fn data_dependent_failures_deliver() {
    // Valid on the sample (one recipient), failing on a message without recipients.
    let filter = Filter::compile(r#"message.ccRecipients[0].address == "x@contoso.com""#)
        .unwrap_or_else(|e| panic!("{e}"));
    match filter.verdict(&message()) {
        Verdict::Undecided(reason) => {
            assert!(reason.starts_with("spec.filter failed: "), "{reason}")
        }
        other => panic!("expected Undecided, got {other:?}"),
    }
}

#[test]
fn missing_fields_read_as_empty_values() {
    let empty = LedgerMessage {
        message_id: "AAMk-2".into(),
        ..LedgerMessage::default()
    };
    let filter = Filter::compile(
        r#"message.subject == "" && message.from.address == "" && !message.isRead && size(message.toRecipients) == 0 && size(message.categories) == 0 && !has(message.receivedDateTime)"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(filter.verdict(&empty), Verdict::Deliver);
}

#[test]
fn knows_whether_it_reads_categories() {
    let reads = |source: &str| {
        Filter::compile(source)
            .unwrap_or_else(|e| panic!("{source}: {e}"))
            .reads_categories()
    };
    assert!(reads(r#""Finance" in message.categories"#));
    assert!(reads(
        r#"message.isRead || message.categories.exists(c, c == "Finance")"#
    ));
    assert!(!reads(r#"message.subject.contains("categories")"#));
    assert!(!reads("message.hasAttachments"));
}
