//! Self-tests of the hazard switches (graph.md, "Hazards"): each one over HTTP, on its own.

use std::time::Instant;

use chrono::{DateTime, TimeZone, Utc};

use super::*;

fn received(minute: u32) -> Option<DateTime<Utc>> {
    Utc.with_ymd_and_hms(2025, 3, 4, 9, minute, 0).single()
}

fn message_at(minute: u32) -> NewMessage {
    NewMessage {
        received: received(minute),
        ..NewMessage::default()
    }
}

fn with_faults(faults: Faults) -> EmulatorConfig {
    EmulatorConfig {
        faults,
        ..EmulatorConfig::default()
    }
}

fn removed_reason(item: &Value) -> Option<&str> {
    item["@removed"]["reason"].as_str()
}

async fn batch(
    probe: &Probe,
    requests: Vec<Value>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    probe
        .send(
            reqwest::Method::POST,
            "/$batch",
            "",
            Some(json!({"requests": requests})),
            &probe.token,
        )
        .await
}

fn get_step(id: &str, url: String) -> Value {
    json!({"id": id, "method": "GET", "url": url})
}

#[test]
fn new_switches_are_off_by_default_and_read_from_camel_case_json() {
    let empty: Faults = serde_json::from_value(json!({})).expect("defaults");
    assert_eq!(empty, Faults::default());
    assert_eq!(empty.filtered_delta_cap, 5000);
    assert!(empty.poison_ids.is_empty() && !empty.partial_updates);
    assert!(!empty.control_chars_in_errors);
    assert_eq!(empty.retry_after_format, RetryAfterFormat::Seconds);
    assert_eq!(empty.token_endpoint.fail_next, 0);
    assert_eq!(empty.batch.fail_next, 0);
    assert!(!empty.batch.shuffle_responses);

    let set: Faults = serde_json::from_value(json!({
        "filteredDeltaCap": 3,
        "poisonIds": ["AAk"],
        "retryAfterFormat": "httpDate",
        "controlCharsInErrors": true,
        "partialUpdates": true,
        "tokenEndpoint": {"failNext": 2, "delayMs": 10},
        "batch": {"failNext": 1, "shuffleResponses": true},
    }))
    .expect("switches");
    assert_eq!(set.filtered_delta_cap, 3);
    assert_eq!(set.poison_ids, vec!["AAk".to_string()]);
    assert_eq!(set.retry_after_format, RetryAfterFormat::HttpDate);
    assert_eq!(set.token_endpoint.fail_next, 2);
    assert_eq!(set.token_endpoint.status, 503, "unset fields keep defaults");
    assert_eq!(set.batch.status, 429);
    assert!(set.batch.shuffle_responses && set.partial_updates);
}

// ------------------------------------------------------------------ filtered delta cap

#[tokio::test]
async fn filtered_delta_rounds_are_capped_and_keep_their_filter() {
    let probe = Probe::start(with_faults(Faults {
        filtered_delta_cap: 5,
        ..Faults::default()
    }))
    .await;
    let added: Vec<String> = (10..22)
        .map(|minute| {
            probe
                .emulator
                .add_message(MAILBOX, "inbox", message_at(minute))
                .expect("message")
                .immutable_id
        })
        .collect();
    let filter = "$filter=receivedDateTime ge 2025-03-04T09:05:00Z";
    let (items, delta, pages) = probe
        .delta_round(&format!("{}&{filter}", delta_path()), 2)
        .await;
    assert_eq!(pages, 3);
    let mut got = ids(&items);
    got.sort();
    let mut newest: Vec<String> = added[7..].to_vec();
    newest.sort();
    assert_eq!(
        got, newest,
        "the 5 newest; the other 7 are dropped silently"
    );
    let (all, _, _) = probe.delta_round(&delta_path(), 100).await;
    assert_eq!(all.len(), 12, "an unfiltered round has no cap");

    // Later rounds keep the token's filter, whatever the request says.
    let new = probe
        .emulator
        .add_message(MAILBOX, "inbox", message_at(30))
        .expect("new");
    probe
        .emulator
        .add_message(MAILBOX, "inbox", message_at(1))
        .expect("too old for the filter");
    let old = probe
        .emulator
        .add_message(MAILBOX, "archive", message_at(2))
        .expect("old, elsewhere");
    probe
        .emulator
        .move_message(MAILBOX, &old.immutable_id, "inbox")
        .expect("moved in");
    let (items, delta, _) = probe
        .delta_round(
            &format!("{delta}&$filter=receivedDateTime ge 2020-01-01T00:00:00Z"),
            10,
        )
        .await;
    assert_eq!(ids(&items), vec![new.immutable_id]);
    let (items, _, _) = probe.delta_round(&delta, 10).await;
    assert!(
        items.is_empty(),
        "the dropped messages never come: {items:?}"
    );
}

// ------------------------------------------------------------------ move out and back

async fn move_to(probe: &Probe, id: &str, destination: &str) -> Value {
    let (status, _, body) = probe
        .send(
            reqwest::Method::POST,
            &format!("/users/{MAILBOX}/messages/{id}/move"),
            "IdType=\"ImmutableId\"",
            Some(json!({"destinationId": destination})),
            &probe.token,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

#[tokio::test]
async fn a_message_moved_out_and_back_is_removed_then_returns_with_its_id() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let first = probe
        .emulator
        .add_messages(MAILBOX, "inbox", 3)
        .expect("messages")
        .remove(0)
        .immutable_id;
    let (_, delta, _) = probe.delta_round(&delta_path(), 10).await;

    let moved = move_to(&probe, &first, "archive").await;
    assert_eq!(
        moved["id"],
        first.as_str(),
        "immutable ids survive the move"
    );
    let (items, delta, _) = probe.delta_round(&delta, 10).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["id"], first.as_str());
    assert_eq!(removed_reason(&items[0]), Some("changed"));

    move_to(&probe, &first, "inbox").await;
    let (items, delta, _) = probe.delta_round(&delta, 10).await;
    assert_eq!(ids(&items), vec![first.clone()], "back, with the same id");
    assert!(items[0].get("@removed").is_none() && items[0]["subject"].is_string());

    // Out and back between two rounds: the message comes, no removal contradicts it.
    move_to(&probe, &first, "junkemail").await;
    move_to(&probe, &first, "inbox").await;
    let (items, _, _) = probe.delta_round(&delta, 10).await;
    assert_eq!(ids(&items), vec![first]);
    assert!(items.iter().all(|item| item.get("@removed").is_none()));
}

// ------------------------------------------------------------------ control characters

const CONTROL: &str = "\u{0}\u{1}\u{1b}[0m\u{7f}";

#[tokio::test]
async fn control_characters_in_messages_come_out_json_escaped() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    probe
        .emulator
        .add_message_with_text(MAILBOX, "inbox", CONTROL)
        .expect("message");
    let path =
        format!("/users/{MAILBOX}/mailFolders/inbox/messages/delta?$select=subject,body,from");
    let (status, _, text) = probe
        .send_raw(reqwest::Method::GET, &path, "", None, &probe.token)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(!text.contains('\u{0}'), "no raw NUL on the wire");
    for escaped in ["\\u0000", "\\u0001", "\\u001b"] {
        assert!(text.contains(escaped), "{escaped} in {text}");
    }
    let page: Value = serde_json::from_str(&text).expect("valid JSON");
    let item = &page["value"][0];
    assert_eq!(item["subject"], format!("Subject {CONTROL}"));
    assert_eq!(item["body"]["content"], format!("Body {CONTROL}"));
    assert_eq!(
        item["from"]["emailAddress"]["name"],
        format!("Sender {CONTROL}")
    );
}

#[tokio::test]
async fn error_bodies_can_carry_control_characters() {
    let probe = Probe::start(with_faults(Faults {
        control_chars_in_errors: true,
        ..Faults::default()
    }))
    .await;
    let (status, _, text) = probe
        .send_raw(
            reqwest::Method::GET,
            &format!("/users/{MAILBOX}/messages/AAkNoSuchId"),
            "",
            None,
            &probe.token,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        text.contains("\\u0000") && text.contains("\\u001b"),
        "{text}"
    );
    let body: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(error_code(&body), "ErrorItemNotFound");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.ends_with(CONTROL_CHARS), "{message:?}");

    let bad_secret = AppRegistration {
        client_secret: "wrong".into(),
        ..default_app()
    };
    let body: Value = token_for(&probe.http, &probe.emulator.base_url(), &bad_secret)
        .await
        .json()
        .await
        .expect("JSON");
    let description = body["error_description"].as_str().expect("description");
    assert!(description.ends_with(CONTROL_CHARS), "{description:?}");
}

// ------------------------------------------------------------------ poisoned pages

#[tokio::test]
async fn poisoned_messages_break_every_page_that_holds_them() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let added = probe
        .emulator
        .add_messages(MAILBOX, "inbox", 4)
        .expect("messages");
    probe.emulator.poison_message(&added[2].immutable_id);

    // Default ids on the wire: the poison holds in both id forms.
    let (status, _, first) = probe.get(&delta_path(), "odata.maxpagesize=2").await;
    assert_eq!(status, StatusCode::OK);
    let next = first["@odata.nextLink"]
        .as_str()
        .expect("first page is fine");
    for _ in 0..3 {
        let (status, _, body) = probe.get(next, "odata.maxpagesize=2").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.is_string(), "malformed every time: {body}");
    }
    let list = format!("/users/{MAILBOX}/mailFolders/inbox/messages?$select=subject");
    for _ in 0..2 {
        assert!(
            probe
                .get(&list, "IdType=\"ImmutableId\"")
                .await
                .2
                .is_string()
        );
    }
    assert_eq!(probe.emulator.faults().malformed_pages, 0);

    probe.emulator.update_faults(|faults| {
        faults.poison_ids.clear();
        faults.malformed_kind = MalformedKind::NotJson;
    });
    assert!(probe.get(next, "").await.2["value"].is_array(), "cured");
    probe
        .emulator
        .update_faults(|faults| faults.poison_ids = vec![added[0].rest_id.clone()]);
    let (_, _, body) = probe.get(&list, "IdType=\"ImmutableId\"").await;
    assert!(body.as_str().is_some_and(|html| html.starts_with("<html>")));
}

// ------------------------------------------------------------------ Retry-After variants

#[tokio::test]
async fn retry_after_is_written_as_the_switch_says() {
    let probe = Probe::start(with_faults(Faults {
        throttle_ratio: 1.0,
        retry_after_secs: 7,
        ..Faults::default()
    }))
    .await;
    let path = format!("/users/{MAILBOX}/mailFolders/inbox/messages");
    let retry_after = |format| {
        let probe = &probe;
        let path = &path;
        async move {
            probe
                .emulator
                .update_faults(|faults| faults.retry_after_format = format);
            let (status, headers, _) = probe.get(path, "").await;
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            headers
                .get("retry-after")
                .map(|value| value.to_str().expect("ASCII").to_string())
        }
    };
    // Zero, past and missing waits do not hold the mailbox, so each request meets the switch.
    assert_eq!(
        retry_after(RetryAfterFormat::Zero).await.as_deref(),
        Some("0")
    );
    let past = retry_after(RetryAfterFormat::PastHttpDate)
        .await
        .expect("date");
    let past = DateTime::parse_from_rfc2822(&past).expect("HTTP-date");
    assert!(past < Utc::now());
    assert_eq!(retry_after(RetryAfterFormat::Missing).await, None);
    assert_eq!(
        retry_after(RetryAfterFormat::Huge).await.as_deref(),
        Some("1000000000000")
    );
    let future = retry_after(RetryAfterFormat::HttpDate).await.expect("date");
    let wait = DateTime::parse_from_rfc2822(&future)
        .expect("HTTP-date")
        .with_timezone(&Utc)
        - Utc::now();
    assert!((6..=9).contains(&wait.num_seconds()), "{future}: {wait}");
    probe.emulator.update_faults(|faults| {
        faults.hold_retry_after = false;
        faults.retry_after_format = RetryAfterFormat::Seconds;
    });
    assert_eq!(probe.get(&path, "").await.1["retry-after"], "7");

    let advertised: Vec<u64> = probe
        .emulator
        .counters()
        .throttles
        .iter()
        .map(|throttle| throttle.retry_after_secs)
        .collect();
    assert_eq!(advertised, vec![0, 0, 0, HUGE_RETRY_AFTER_SECS, 7, 7]);
}

// ------------------------------------------------------------------ token endpoint

#[tokio::test]
async fn the_token_endpoint_fails_on_demand_and_can_be_slow() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let base = probe.emulator.base_url();
    probe.emulator.update_faults(|faults| {
        faults.token_endpoint = TokenEndpointFaults {
            fail_next: 2,
            status: 429,
            retry_after_secs: Some(3),
            ..TokenEndpointFaults::default()
        };
    });
    for _ in 0..2 {
        let response = token_for(&probe.http, &base, &default_app()).await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "3");
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["error"], "temporarily_unavailable");
    }
    let response = token_for(&probe.http, &base, &default_app()).await;
    assert_eq!(response.status(), StatusCode::OK);

    probe.emulator.update_faults(|faults| {
        faults.token_endpoint = TokenEndpointFaults {
            fail_ratio: 1.0,
            status: 500,
            retry_after_secs: None,
            ..TokenEndpointFaults::default()
        };
    });
    let response = token_for(&probe.http, &base, &default_app()).await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!response.headers().contains_key("retry-after"));
    probe.emulator.update_faults(|faults| {
        faults.token_endpoint.status = 503;
        faults.token_endpoint.retry_after_secs = Some(2);
    });
    let response = token_for(&probe.http, &base, &default_app()).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "2");

    probe.emulator.update_faults(|faults| {
        faults.token_endpoint = TokenEndpointFaults {
            delay_ms: 300,
            ..TokenEndpointFaults::default()
        };
    });
    let started = Instant::now();
    let response = token_for(&probe.http, &base, &default_app()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let counters = probe.emulator.counters();
    assert_eq!(counters.token_faults, 4);
    assert_eq!(counters.token_requests, 7, "the probe's own token included");
    assert_eq!(counters.tokens_issued, 3);
}

// ------------------------------------------------------------------ $batch

#[tokio::test]
async fn batch_envelopes_can_be_refused_with_429_or_503() {
    let probe = Probe::start(with_faults(Faults {
        batch: BatchFaults {
            fail_next: 1,
            retry_after_secs: 2,
            ..BatchFaults::default()
        },
        ..Faults::default()
    }))
    .await;
    let steps = || {
        vec![get_step(
            "1",
            format!("/users/{MAILBOX}/mailFolders/inbox/messages"),
        )]
    };
    let (status, headers, body) = batch(&probe, steps()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "2");
    assert_eq!(error_code(&body), "TooManyRequests");
    assert_eq!(
        probe.emulator.counters().requests(MAILBOX),
        0,
        "nothing ran"
    );

    probe.emulator.update_faults(|faults| {
        faults.batch.fail_next = 1;
        faults.batch.status = 503;
    });
    let (status, headers, body) = batch(&probe, steps()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "2");
    assert_eq!(error_code(&body), "serviceNotAvailable");

    let (status, _, body) = batch(&probe, steps()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let counters = probe.emulator.counters();
    assert_eq!((counters.batches, counters.batches_refused), (3, 2));
    assert_eq!(counters.requests(MAILBOX), 1);
    let waits: Vec<(&str, u16, u64)> = counters
        .throttles
        .iter()
        .map(|t| (t.mailbox.as_str(), t.status, t.retry_after_secs))
        .collect();
    assert_eq!(
        waits,
        [(MAILBOX, 429, 2), (MAILBOX, 503, 2)],
        "refused envelopes count as waits of the mailbox they address"
    );
}

#[tokio::test]
async fn batch_steps_after_a_failed_dependency_answer_424() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let id = probe
        .emulator
        .add_messages(MAILBOX, "inbox", 1)
        .expect("message")
        .remove(0)
        .immutable_id;
    let message = format!("/users/{MAILBOX}/messages/{id}");
    let requests = vec![
        get_step("a", format!("/users/{MAILBOX}/messages/AAkGone")),
        json!({"id": "b", "method": "PATCH", "url": message, "dependsOn": ["a"],
               "headers": {"Content-Type": "application/json"}, "body": {"isRead": true}}),
        json!({"id": "c", "method": "GET", "url": message, "dependsOn": ["b"]}),
        get_step("d", message.clone()),
        json!({"id": "e", "method": "GET", "url": message, "dependsOn": ["d"]}),
    ];
    let (status, _, body) = batch(&probe, requests).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let status_of = |id: &str| {
        body["responses"]
            .as_array()
            .expect("responses")
            .iter()
            .find(|response| response["id"] == id)
            .map(|response| response["status"].clone())
    };
    assert_eq!(status_of("a"), Some(json!(404)));
    assert_eq!(status_of("b"), Some(json!(424)));
    assert_eq!(status_of("c"), Some(json!(424)), "failures cascade");
    assert_eq!(status_of("d"), Some(json!(200)));
    assert_eq!(status_of("e"), Some(json!(200)));
    assert_eq!(
        probe.emulator.counters().requests(MAILBOX),
        3,
        "424s never ran"
    );
    let stored = probe
        .emulator
        .message(MAILBOX, &id)
        .expect("mailbox")
        .expect("message");
    assert_eq!(stored["isRead"], false);

    for broken in [
        vec![json!({"id": "x", "method": "GET", "url": message, "dependsOn": ["nope"]})],
        vec![
            json!({"id": "x", "method": "GET", "url": message, "dependsOn": ["y"]}),
            json!({"id": "y", "method": "GET", "url": message, "dependsOn": ["x"]}),
        ],
        vec![
            get_step("x", message.clone()),
            get_step("x", message.clone()),
        ],
    ] {
        let (status, _, body) = batch(&probe, broken).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }
}

#[tokio::test]
async fn batch_inner_requests_run_four_at_a_time_and_can_come_back_shuffled() {
    let probe = Probe::start(with_faults(Faults {
        slow_page_ms: 30,
        batch: BatchFaults {
            shuffle_responses: true,
            ..BatchFaults::default()
        },
        ..Faults::default()
    }))
    .await;
    let list = format!("/users/{MAILBOX}/mailFolders/inbox/messages");
    let sent: Vec<String> = (0..20).map(|n| n.to_string()).collect();
    let requests = sent.iter().map(|id| get_step(id, list.clone())).collect();
    let (status, _, body) = batch(&probe, requests).await;
    assert_eq!(status, StatusCode::OK);
    let responses = body["responses"].as_array().expect("responses");
    assert!(responses.iter().all(|response| response["status"] == 200));
    let answered: Vec<String> = responses
        .iter()
        .map(|response| response["id"].as_str().expect("id").to_string())
        .collect();
    assert_ne!(answered, sent, "out of request order");
    let mut sorted = answered.clone();
    sorted.sort_by_key(|id| id.parse::<u32>().unwrap_or(u32::MAX));
    assert_eq!(sorted, sent);
    let counters = probe.emulator.counters();
    assert_eq!(
        counters.endpoint(MAILBOX, "list"),
        20,
        "each inner request counts"
    );
    assert_eq!(counters.peak_concurrency(MAILBOX), 4);

    let two = vec![get_step("a", list.clone()), get_step("b", list.clone())];
    let (_, _, body) = batch(&probe, two).await;
    assert_eq!(body["responses"][0]["id"], "b", "two are always swapped");
}

// ------------------------------------------------------------------ partial updates

#[tokio::test]
async fn updated_messages_can_carry_only_their_changed_properties() {
    let probe = Probe::start(EmulatorConfig {
        admin_api: true,
        faults: Faults {
            partial_updates: true,
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let added = probe
        .emulator
        .add_messages(MAILBOX, "inbox", 3)
        .expect("messages");
    let path =
        format!("/users/{MAILBOX}/mailFolders/inbox/messages/delta?$select=id,subject,isRead");
    let (_, delta, _) = probe.delta_round(&path, 10).await;

    let (status, ..) = probe
        .send(
            reqwest::Method::PATCH,
            &format!("/users/{MAILBOX}/messages/{}", added[0].immutable_id),
            "",
            Some(json!({"isRead": true})),
            &probe.token,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let admin = format!(
        "{}/_admin/mailboxes/{MAILBOX}/messages/{}/read",
        probe.emulator.base_url(),
        added[1].immutable_id
    );
    let response = probe
        .http
        .put(admin)
        .json(&json!({"isRead": true}))
        .send()
        .await
        .expect("admin");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let new = probe
        .emulator
        .add_messages(MAILBOX, "inbox", 1)
        .expect("new")
        .remove(0);

    let (items, delta, _) = probe.delta_round(&delta, 10).await;
    assert_eq!(items.len(), 3, "{items:?}");
    for (item, ids) in items.iter().zip(&added[..2]) {
        assert_eq!(
            item,
            &json!({"@odata.type": "#microsoft.graph.message", "id": ids.immutable_id, "isRead": true})
        );
    }
    assert_eq!(items[2]["id"], new.immutable_id.as_str());
    assert!(items[2]["subject"].is_string(), "new messages come whole");

    // Moved in again: whole. Switched off: whole.
    probe
        .emulator
        .move_message(MAILBOX, &added[2].immutable_id, "archive")
        .expect("out");
    probe
        .emulator
        .set_read(MAILBOX, &added[2].immutable_id, true)
        .expect("read");
    probe
        .emulator
        .move_message(MAILBOX, &added[2].immutable_id, "inbox")
        .expect("back");
    let (items, delta, _) = probe.delta_round(&delta, 10).await;
    assert_eq!(ids(&items), vec![added[2].immutable_id.clone()]);
    assert!(items[0]["subject"].is_string());
    probe
        .emulator
        .update_faults(|faults| faults.partial_updates = false);
    probe
        .emulator
        .set_read(MAILBOX, &added[0].immutable_id, false)
        .expect("unread");
    let (items, _, _) = probe.delta_round(&delta, 10).await;
    assert_eq!(items.len(), 1);
    assert!(items[0]["subject"].is_string() && items[0]["isRead"] == false);
}
