//! Self-tests of attachments and MIME: the listing and `$value` endpoints, the MIME of a
//! message read back with a mail parser, and throttling on those endpoints.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use mail_parser::{MessageParser, MimeHeaders};

use super::*;

/// A PDF-looking file of `len` bytes, every byte value present.
fn pdf(len: usize) -> Vec<u8> {
    let mut bytes = b"%PDF-1.7\n".to_vec();
    bytes.extend((0..len.saturating_sub(9)).map(|i| (i % 251) as u8));
    bytes
}

/// A message with every kind of attachment: a file named in three scripts, an inline image,
/// a forwarded message and a cloud link.
fn message_with_everything() -> NewMessage {
    NewMessage {
        subject: Some("Счёт 4471 🧾".into()),
        body: Some("<p>Invoice attached.</p><img src=\"cid:logo@fabrikam\">".into()),
        body_is_html: true,
        attachments: vec![
            NewAttachment::file("فاتورة-請求書-счёт 📎.pdf", "application/pdf", pdf(3000)),
            NewAttachment::inline_image(
                "logo.png",
                "logo@fabrikam",
                vec![0x89, b'P', b'N', b'G', 0, 1, 2],
            ),
            NewAttachment::item("Fwd: PO 9912", "PO 9912 approved"),
            NewAttachment::reference("Q3 forecast.xlsx"),
        ],
        ..NewMessage::default()
    }
}

fn add(probe: &Probe, message: NewMessage) -> String {
    probe
        .emulator
        .add_message(MAILBOX, "inbox", message)
        .expect("message added")
        .immutable_id
}

#[tokio::test]
async fn listing_without_select_carries_contents_and_with_select_only_metadata() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let id = add(&probe, message_with_everything());

    let (status, _, whole) = probe
        .get(&format!("/users/{MAILBOX}/messages/{id}/attachments"), "")
        .await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let whole = whole["value"].as_array().expect("value").clone();
    assert_eq!(whole.len(), 4);
    assert_eq!(whole[0]["@odata.type"], "#microsoft.graph.fileAttachment");
    assert_eq!(whole[0]["name"], "فاتورة-請求書-счёт 📎.pdf");
    assert_eq!(whole[0]["size"], 3000);
    assert_eq!(whole[0]["isInline"], false);
    assert_eq!(
        STANDARD
            .decode(whole[0]["contentBytes"].as_str().expect("contentBytes"))
            .expect("base64"),
        pdf(3000)
    );
    assert_eq!(whole[1]["isInline"], true);
    assert_eq!(whole[1]["contentId"], "logo@fabrikam");
    assert_eq!(whole[2]["@odata.type"], "#microsoft.graph.itemAttachment");
    assert!(whole[2].get("contentBytes").is_none(), "{}", whole[2]);
    assert_eq!(
        whole[3]["@odata.type"],
        "#microsoft.graph.referenceAttachment"
    );

    let select = "id,name,contentType,size,isInline,microsoft.graph.fileAttachment/contentId";
    let (status, _, lean) = probe
        .get(
            &format!("/users/{MAILBOX}/messages/{id}/attachments?$select={select}"),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{lean}");
    let lean = lean["value"].as_array().expect("value").clone();
    assert_eq!(lean.len(), 4);
    assert!(
        lean.iter().all(|a| a.get("contentBytes").is_none()),
        "{lean:?}"
    );
    assert_eq!(lean[1]["contentId"], "logo@fabrikam");
    assert!(lean[0].get("lastModifiedDateTime").is_none());
    let counters = probe.emulator.counters();
    assert_eq!(counters.endpoint(MAILBOX, "attachments"), 2);
}

#[tokio::test]
async fn has_attachments_leaves_inline_images_out() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let inline_only = add(
        &probe,
        NewMessage {
            attachments: vec![NewAttachment::inline_image("a.png", "a@x", vec![1, 2, 3])],
            ..NewMessage::default()
        },
    );
    let with_file = add(&probe, message_with_everything());
    for (id, expected) in [(inline_only, false), (with_file, true)] {
        let message = probe
            .emulator
            .message(MAILBOX, &id)
            .expect("read")
            .expect("there");
        assert_eq!(message["hasAttachments"], expected, "{message}");
    }
}

#[tokio::test]
async fn value_serves_raw_bytes_item_mime_and_refuses_references() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let id = add(&probe, message_with_everything());
    let (_, _, listing) = probe
        .get(
            &format!("/users/{MAILBOX}/messages/{id}/attachments?$select=id"),
            "",
        )
        .await;
    let ids: Vec<String> = listing["value"]
        .as_array()
        .expect("value")
        .iter()
        .map(|a| a["id"].as_str().expect("id").to_string())
        .collect();

    let raw = |aid: &str| {
        let url = probe.url(&format!(
            "/users/{MAILBOX}/messages/{id}/attachments/{aid}/$value"
        ));
        let request = probe.http.get(url).bearer_auth(&probe.token);
        async move {
            let response = request.send().await.expect("request");
            let status = response.status();
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            (
                status,
                content_type,
                response.bytes().await.expect("body").to_vec(),
            )
        }
    };
    let (status, content_type, bytes) = raw(&ids[0]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/pdf");
    assert_eq!(bytes, pdf(3000), "binary content byte for byte");
    let (status, content_type, bytes) = raw(&ids[2]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "message/rfc822");
    assert!(String::from_utf8_lossy(&bytes).contains("Subject: PO 9912 approved"));
    let (status, _, _) = raw(&ids[3]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = raw("AAMkAGI2AttNoSuchAttachment").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    probe
        .emulator
        .delete_message(MAILBOX, &id)
        .expect("deleted");
    let (status, _, body) = probe
        .get(&format!("/users/{MAILBOX}/messages/{id}/attachments"), "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "ErrorItemNotFound");
}

#[tokio::test]
async fn mime_matches_the_message_and_its_attachments() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let id = add(&probe, message_with_everything());
    let (status, _, text) = probe
        .send_raw(
            reqwest::Method::GET,
            &format!("/users/{MAILBOX}/messages/{id}/$value"),
            "",
            None,
            &probe.token,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let message = MessageParser::default()
        .parse(text.as_bytes())
        .expect("the MIME parses");
    let fields = probe
        .emulator
        .message(MAILBOX, &id)
        .expect("read")
        .expect("there");
    assert_eq!(message.subject(), Some("Счёт 4471 🧾"));
    assert_eq!(
        message
            .from()
            .and_then(|from| from.first())
            .and_then(|a| a.address()),
        fields["from"]["emailAddress"]["address"].as_str()
    );
    assert_eq!(
        message.body_html(0).as_deref(),
        Some("<p>Invoice attached.</p><img src=\"cid:logo@fabrikam\">")
    );
    // The reference attachment has no bytes to carry: three parts.
    let attachments: Vec<_> = message.attachments().collect();
    assert_eq!(attachments.len(), 3, "{text}");
    assert_eq!(attachments[0].attachment_name(), Some("logo.png"));
    assert_eq!(attachments[0].content_id(), Some("logo@fabrikam"));
    assert_eq!(
        attachments[1].attachment_name(),
        Some("فاتورة-請求書-счёт 📎.pdf")
    );
    assert_eq!(attachments[1].contents(), pdf(3000).as_slice());
    assert!(
        attachments[2].is_message(),
        "the item attachment is a message/rfc822 part"
    );
}

#[tokio::test]
async fn attachment_endpoints_meet_the_storm_switch_and_the_mailbox_hold() {
    let probe = Probe::start(EmulatorConfig {
        faults: Faults {
            attachment_storm: 2,
            retry_after_secs: 1,
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let id = add(&probe, message_with_everything());
    let listing = format!("/users/{MAILBOX}/messages/{id}/attachments?$select=id");
    let (status, headers, body) = probe.get(&listing, "").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(headers["retry-after"], "1");
    // The mailbox is held for the whole Retry-After, whatever the endpoint.
    let (status, _, _) = probe
        .get(&format!("/users/{MAILBOX}/messages/{id}/$value"), "")
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, _) = probe.get(&listing, "").await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the second storm order"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, body) = probe.get(&listing, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let counters = probe.emulator.counters();
    assert_eq!(counters.endpoint(MAILBOX, "attachments"), 3);
    assert_eq!(counters.endpoint(MAILBOX, "value"), 1);
    assert_eq!(
        counters.mailbox(MAILBOX).expect("counted").by_status[&429],
        3
    );
}

#[tokio::test]
async fn a_large_attachment_is_served_whole_by_value_and_its_size_listed() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let large = pdf(6 * 1024 * 1024);
    let id = add(
        &probe,
        NewMessage {
            attachments: vec![NewAttachment::file(
                "scan.pdf",
                "application/pdf",
                large.clone(),
            )],
            ..NewMessage::default()
        },
    );
    let (_, _, listing) = probe
        .get(
            &format!("/users/{MAILBOX}/messages/{id}/attachments?$select=id,size"),
            "",
        )
        .await;
    let entry = &listing["value"][0];
    assert_eq!(entry["size"], 6 * 1024 * 1024);
    let aid = entry["id"].as_str().expect("id");
    let response = probe
        .http
        .get(probe.url(&format!(
            "/users/{MAILBOX}/messages/{id}/attachments/{aid}/$value"
        )))
        .bearer_auth(&probe.token)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.bytes().await.expect("body").as_ref(),
        large.as_slice()
    );
}
