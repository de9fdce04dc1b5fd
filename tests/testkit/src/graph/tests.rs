//! Self-tests of the emulator over HTTP: each behaviour of graph.md on its own.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::*;

const MAILBOX: &str = "ops@contoso.com";

struct Probe {
    emulator: GraphEmulator,
    http: reqwest::Client,
    token: String,
}

async fn token_for(http: &reqwest::Client, base: &str, app: &AppRegistration) -> reqwest::Response {
    http.post(format!("{base}/{}/oauth2/v2.0/token", app.tenant))
        .form(&[
            ("client_id", app.client_id.as_str()),
            ("client_secret", app.client_secret.as_str()),
            ("scope", "https://graph.microsoft.com/.default"),
            ("grant_type", "client_credentials"),
        ])
        .send()
        .await
        .expect("token request")
}

impl Probe {
    async fn start(config: EmulatorConfig) -> Self {
        mailpoll::install_crypto_provider();
        let emulator = GraphEmulator::start(EmulatorConfig {
            mailboxes: vec![MAILBOX.into()],
            ..config
        })
        .await
        .expect("emulator starts");
        let http = reqwest::Client::new();
        let token = Self::token_of(&http, &emulator, &default_app()).await;
        Self {
            emulator,
            http,
            token,
        }
    }

    async fn token_of(
        http: &reqwest::Client,
        emulator: &GraphEmulator,
        app: &AppRegistration,
    ) -> String {
        let response = token_for(http, &emulator.base_url(), app).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.expect("token JSON");
        body["access_token"]
            .as_str()
            .expect("access_token")
            .to_string()
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}/v1.0{path}", self.emulator.base_url())
        }
    }

    /// A request whose body comes back as text, unparsed.
    async fn send_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        prefer: &str,
        body: Option<Value>,
        token: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, String) {
        let mut request = self
            .http
            .request(method, self.url(path))
            .bearer_auth(token)
            .header("Prefer", prefer);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let headers = response.headers().clone();
        (status, headers, response.text().await.expect("body"))
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        prefer: &str,
        body: Option<Value>,
        token: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let (status, headers, text) = self.send_raw(method, path, prefer, body, token).await;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, value)
    }

    async fn get(
        &self,
        path: &str,
        prefer: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        self.send(reqwest::Method::GET, path, prefer, None, &self.token)
            .await
    }

    /// Follows a delta round to its end; returns the items and the deltaLink.
    async fn delta_round(&self, first: &str, page_size: usize) -> (Vec<Value>, String, usize) {
        let prefer = format!("IdType=\"ImmutableId\", odata.maxpagesize={page_size}");
        let mut link = first.to_string();
        let mut items = Vec::new();
        let mut pages = 0;
        loop {
            let (status, _, body) = self.get(&link, &prefer).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            pages += 1;
            let page = body["value"].as_array().expect("value array");
            assert!(page.len() <= page_size);
            items.extend(page.iter().cloned());
            if let Some(next) = body["@odata.nextLink"].as_str() {
                link = next.to_string();
            } else {
                let delta = body["@odata.deltaLink"]
                    .as_str()
                    .expect("deltaLink at the end");
                return (items, delta.to_string(), pages);
            }
        }
    }
}

fn delta_path() -> String {
    format!("/users/{MAILBOX}/mailFolders/inbox/messages/delta?$select=id,subject,receivedDateTime")
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|item| item["id"].as_str().expect("id").to_string())
        .collect()
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn token_endpoint_checks_the_secret_tenant_and_app() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let base = probe.emulator.base_url();
    let bad_secret = AppRegistration {
        client_secret: "wrong".into(),
        ..default_app()
    };
    let response = token_for(&probe.http, &base, &bad_secret).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(body["error_codes"], json!([7000215]));
    assert!(
        body["error_description"]
            .as_str()
            .expect("description")
            .starts_with("AADSTS7000215")
    );

    let unknown_app = AppRegistration {
        client_id: "nobody".into(),
        ..default_app()
    };
    let body: Value = token_for(&probe.http, &base, &unknown_app)
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(body["error"], "unauthorized_client");
    let unknown_tenant = AppRegistration {
        tenant: "elsewhere".into(),
        ..default_app()
    };
    let body: Value = token_for(&probe.http, &base, &unknown_tenant)
        .await
        .json()
        .await
        .expect("JSON");
    assert_eq!(body["error"], "invalid_request");
    assert_eq!(probe.emulator.counters().token_requests, 4);
    assert_eq!(probe.emulator.counters().tokens_issued, 1);
}

#[tokio::test]
async fn tokens_expire_and_can_be_revoked() {
    let probe = Probe::start(EmulatorConfig {
        faults: Faults {
            token_lifetime_secs: 1,
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let path = format!("/users/{MAILBOX}/mailFolders/inbox/messages");
    assert_eq!(probe.get(&path, "").await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, body) = probe.get(&path, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&body), "InvalidAuthenticationToken");

    probe
        .emulator
        .update_faults(|faults| faults.token_lifetime_secs = 3600);
    let token = Probe::token_of(&probe.http, &probe.emulator, &default_app()).await;
    let (status, ..) = probe
        .send(reqwest::Method::GET, &path, "", None, &token)
        .await;
    assert_eq!(status, StatusCode::OK);
    probe.emulator.revoke_tokens();
    let (status, ..) = probe
        .send(reqwest::Method::GET, &path, "", None, &token)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn errors_have_graphs_shape_and_request_ids() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let (status, headers, body) = probe
        .get(&format!("/users/{MAILBOX}/messages/AAkNoSuchId"), "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "ErrorItemNotFound");
    let header_id = headers["request-id"].to_str().expect("request-id header");
    assert_eq!(body["error"]["innerError"]["request-id"], header_id);
    assert!(body["error"]["innerError"]["date"].is_string());
    assert!(body["error"]["message"].is_string());
}

#[tokio::test]
async fn list_applies_top_select_filter_and_the_orderby_rule() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    probe
        .emulator
        .add_messages(MAILBOX, "inbox", 12)
        .expect("messages");
    let base = format!("/users/{MAILBOX}/mailFolders/inbox/messages");

    let (status, _, body) = probe
        .get(&format!("{base}?$select=subject&$top=5"), "")
        .await;
    assert_eq!(status, StatusCode::OK);
    let page = body["value"].as_array().expect("value");
    assert_eq!(page.len(), 5);
    assert!(page[0].get("subject").is_some() && page[0].get("isRead").is_none());
    let next = body["@odata.nextLink"].as_str().expect("nextLink");
    assert!(
        next.contains("%24skip=5") || next.contains("$skip=5"),
        "{next}"
    );
    // Default order: newest first.
    let (_, _, all) = probe
        .get(&format!("{base}?$top=12&$select=receivedDateTime"), "")
        .await;
    let dates: Vec<&str> = all["value"]
        .as_array()
        .expect("value")
        .iter()
        .map(|m| m["receivedDateTime"].as_str().expect("date"))
        .collect();
    assert!(dates.windows(2).all(|pair| pair[0] >= pair[1]));

    let since = dates[5];
    let (status, _, body) = probe
        .get(
            &format!(
                "{base}?$filter=receivedDateTime ge {since}&$orderby=receivedDateTime asc&$top=100"
            ),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let got = body["value"].as_array().expect("value");
    assert!(got.len() >= 6);
    assert!(
        got.iter()
            .all(|m| m["receivedDateTime"].as_str().expect("date") >= since)
    );

    let (status, _, body) = probe
        .get(&format!("{base}?$filter=isRead eq false and receivedDateTime ge {since}&$orderby=receivedDateTime desc"), "")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "InefficientFilter");

    let (status, _, body) = probe.get(&format!("{base}?$top=1001"), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "ErrorInvalidUrlQuery");
    let (status, ..) = probe.get(&format!("{base}?$select=nonsense"), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn list_skips_can_jump_past_the_page_size() {
    let probe = Probe::start(EmulatorConfig {
        faults: Faults {
            skip_jump: 3,
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    probe
        .emulator
        .add_messages(MAILBOX, "inbox", 20)
        .expect("messages");
    let (_, _, body) = probe
        .get(
            &format!("/users/{MAILBOX}/mailFolders/inbox/messages?$top=5"),
            "",
        )
        .await;
    let next = body["@odata.nextLink"].as_str().expect("nextLink");
    assert!(next.contains("skip=8"), "{next}");
    let (_, _, body) = probe.get(next, "").await;
    assert_eq!(body["value"].as_array().expect("value").len(), 5);
}

#[tokio::test]
async fn delta_pages_by_maxpagesize_and_resumes_from_the_delta_link() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let first: Vec<String> = probe
        .emulator
        .add_messages(MAILBOX, "inbox", 25)
        .expect("messages")
        .into_iter()
        .map(|ids| ids.immutable_id)
        .collect();
    let (items, delta, pages) = probe.delta_round(&delta_path(), 10).await;
    assert_eq!(pages, 3);
    assert_eq!(ids(&items), first);
    assert!(
        items
            .iter()
            .all(|item| item["@odata.type"] == "#microsoft.graph.message")
    );
    assert!(
        items[0].get("isRead").is_none(),
        "$select applies to every page"
    );

    // Nothing new: an empty last page with a new deltaLink.
    let (items, delta, pages) = probe.delta_round(&delta, 10).await;
    assert!(items.is_empty());
    assert_eq!(pages, 1);

    // New, changed, moved and deleted messages.
    let new = probe
        .emulator
        .add_messages(MAILBOX, "inbox", 2)
        .expect("messages");
    probe
        .emulator
        .move_message(MAILBOX, &first[0], "archive")
        .expect("move");
    probe
        .emulator
        .delete_message(MAILBOX, &first[1])
        .expect("delete");
    let (items, _, _) = probe.delta_round(&delta, 10).await;
    let removed: Vec<(&str, &str)> = items
        .iter()
        .filter_map(|item| Some((item["id"].as_str()?, item["@removed"]["reason"].as_str()?)))
        .collect();
    assert_eq!(
        removed,
        vec![
            (first[0].as_str(), "changed"),
            (first[1].as_str(), "deleted")
        ]
    );
    let added: Vec<String> = items
        .iter()
        .filter(|item| item.get("@removed").is_none())
        .map(|item| item["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(
        added,
        vec![new[0].immutable_id.clone(), new[1].immutable_id.clone()]
    );
}

#[tokio::test]
async fn delta_filter_bounds_the_round_and_rejects_other_filters() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    probe
        .emulator
        .add_messages(MAILBOX, "inbox", 30)
        .expect("messages");
    let (items, _, _) = probe.delta_round(&delta_path(), 100).await;
    let since = items[20]["receivedDateTime"]
        .as_str()
        .expect("date")
        .to_string();
    let (bounded, _, _) = probe
        .delta_round(
            &format!("{}&$filter=receivedDateTime ge {since}", delta_path()),
            100,
        )
        .await;
    assert!(
        bounded.len() >= 10 && bounded.len() < 30,
        "{}",
        bounded.len()
    );
    let (status, _, body) = probe
        .get(&format!("{}&$filter=isRead eq false", delta_path()), "")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "ErrorInvalidUrlQuery");
}

#[tokio::test]
async fn delta_replays_items_within_and_across_rounds() {
    let probe = Probe::start(EmulatorConfig {
        faults: Faults {
            replay_ratio: 0.3,
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    probe
        .emulator
        .add_messages(MAILBOX, "inbox", 40)
        .expect("messages");
    let (items, delta, _) = probe.delta_round(&delta_path(), 7).await;
    let all = ids(&items);
    let mut unique = all.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 40);
    assert!(all.len() > 40, "some items came twice");
    let (again, _, _) = probe.delta_round(&delta, 7).await;
    assert!(
        !again.is_empty(),
        "the last page of the previous round is replayed"
    );
    assert!(ids(&again).iter().all(|id| unique.contains(id)));
}

#[tokio::test]
async fn late_arrivals_show_up_one_round_later() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    probe
        .emulator
        .add_messages(MAILBOX, "inbox", 3)
        .expect("messages");
    let late = probe
        .emulator
        .add_late_message(MAILBOX, "inbox", NewMessage::default())
        .expect("late message");
    let (items, delta, _) = probe.delta_round(&delta_path(), 10).await;
    assert_eq!(items.len(), 3);
    let (items, _, _) = probe.delta_round(&delta, 10).await;
    assert_eq!(ids(&items), vec![late.immutable_id]);
}

#[tokio::test]
async fn evicted_delta_tokens_answer_410_with_location_or_sync_state_not_found() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    probe
        .emulator
        .add_messages(MAILBOX, "inbox", 5)
        .expect("messages");
    let (_, delta, _) = probe.delta_round(&delta_path(), 2).await;
    probe.emulator.evict_delta_tokens(MAILBOX).expect("evict");
    let (status, headers, body) = probe.get(&delta, "").await;
    assert_eq!(status, StatusCode::GONE);
    let location = headers["location"].to_str().expect("Location");
    assert!(location.ends_with("/messages/delta"), "{location}");
    assert!(!error_code(&body).is_empty());

    // A skip token evicted mid-round, answered the other way.
    probe
        .emulator
        .update_faults(|faults| faults.eviction = EvictionResponse::SyncStateNotFound);
    let (_, _, body) = probe.get(&delta_path(), "odata.maxpagesize=2").await;
    let next = body["@odata.nextLink"]
        .as_str()
        .expect("nextLink")
        .to_string();
    probe.emulator.evict_delta_tokens(MAILBOX).expect("evict");
    let (status, _, body) = probe.get(&next, "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&body), "syncStateNotFound");
}

#[tokio::test]
async fn default_ids_change_on_move_and_immutable_ids_do_not() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let ids = probe
        .emulator
        .add_messages(MAILBOX, "inbox", 1)
        .expect("message")
        .remove(0);
    let (_, _, body) = probe
        .get(&format!("/users/{MAILBOX}/messages/{}", ids.rest_id), "")
        .await;
    assert_eq!(
        body["id"], ids.rest_id,
        "default ids without the Prefer header"
    );
    let (_, _, body) = probe
        .get(
            &format!("/users/{MAILBOX}/messages/{}", ids.rest_id),
            "IdType=\"ImmutableId\"",
        )
        .await;
    assert_eq!(body["id"], ids.immutable_id);

    let (status, _, moved) = probe
        .send(
            reqwest::Method::POST,
            &format!("/users/{MAILBOX}/messages/{}/move", ids.rest_id),
            "",
            Some(json!({"destinationId": "archive"})),
            &probe.token,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let new_rest = moved["id"].as_str().expect("id");
    assert_ne!(new_rest, ids.rest_id);
    let (status, _, body) = probe
        .get(&format!("/users/{MAILBOX}/messages/{}", ids.rest_id), "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "ErrorItemNotFound");
    let (status, _, body) = probe
        .get(
            &format!("/users/{MAILBOX}/messages/{}", ids.immutable_id),
            "IdType=\"ImmutableId\"",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], ids.immutable_id);
    assert_eq!(
        body["parentFolderId"],
        probe
            .emulator
            .folder_id(MAILBOX, "archive")
            .expect("folder")
    );
}

#[tokio::test]
async fn mime_mark_read_and_move_need_the_right_roles() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let reader = AppRegistration {
        client_id: "reader".into(),
        roles: vec!["Mail.Read".into()],
        ..default_app()
    };
    probe.emulator.add_app(reader.clone());
    let read_only = Probe::token_of(&probe.http, &probe.emulator, &reader).await;
    let ids = probe
        .emulator
        .add_messages(MAILBOX, "inbox", 1)
        .expect("message")
        .remove(0);
    let id = &ids.immutable_id;

    let (status, headers, mime) = probe
        .send(
            reqwest::Method::GET,
            &format!("/users/{MAILBOX}/messages/{id}/$value"),
            "",
            None,
            &read_only,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .expect("type")
            .starts_with("text/plain")
    );
    assert!(mime.as_str().expect("text").contains("Message-ID: <"));

    let patch = |token: String| {
        let probe = &probe;
        async move {
            probe
                .send(
                    reqwest::Method::PATCH,
                    &format!("/users/{MAILBOX}/messages/{id}"),
                    "",
                    Some(json!({"isRead": true})),
                    &token,
                )
                .await
        }
    };
    let (status, _, body) = patch(read_only.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&body), "ErrorAccessDenied");
    let (status, ..) = probe
        .send(
            reqwest::Method::POST,
            &format!("/users/{MAILBOX}/messages/{id}/move"),
            "",
            Some(json!({"destinationId": "archive"})),
            &read_only,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, body) = patch(probe.token.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["isRead"], true);
    let stored = probe
        .emulator
        .message(MAILBOX, id)
        .expect("mailbox")
        .expect("message");
    assert_eq!(stored["isRead"], true);
}

#[tokio::test]
async fn more_than_four_concurrent_requests_to_a_mailbox_get_429() {
    let probe = Probe::start(EmulatorConfig {
        faults: Faults {
            slow_page_ms: 300,
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let path = format!("/users/{MAILBOX}/mailFolders/inbox/messages");
    let results = futures::future::join_all((0..6).map(|_| probe.get(&path, ""))).await;
    let throttled: Vec<_> = results
        .iter()
        .filter(|(status, ..)| *status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert!(!throttled.is_empty());
    for (_, headers, body) in &throttled {
        assert_eq!(error_code(body), "ApplicationThrottled");
        assert_eq!(headers["retry-after"], "1");
    }
    let counters = probe.emulator.counters();
    assert!(counters.peak_concurrency(MAILBOX) > 4);
    assert_eq!(counters.requests(MAILBOX), 6);
    assert_eq!(counters.throttles.len(), throttled.len());
}

#[tokio::test]
async fn the_request_budget_answers_429_with_retry_after() {
    let probe = Probe::start(EmulatorConfig {
        faults: Faults {
            budget: Some(Budget {
                requests: 3,
                window_secs: 60,
            }),
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let path = format!("/users/{MAILBOX}/mailFolders/inbox/messages");
    for _ in 0..3 {
        assert_eq!(probe.get(&path, "").await.0, StatusCode::OK);
    }
    let (status, headers, body) = probe.get(&path, "").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_code(&body), "TooManyRequests");
    let retry_after: u64 = headers["retry-after"]
        .to_str()
        .expect("header")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry_after));
    assert_eq!(probe.emulator.counters().endpoint(MAILBOX, "list"), 4);
}

#[tokio::test]
async fn random_throttling_and_server_errors_follow_the_switches() {
    let probe = Probe::start(EmulatorConfig {
        faults: Faults {
            server_error_ratio: 1.0,
            server_error_retry_after_secs: Some(2),
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let path = format!("/users/{MAILBOX}/mailFolders/inbox/messages");
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(probe.get(&path, "").await.0.as_u16());
    }
    assert!(
        statuses
            .iter()
            .all(|status| *status == 503 || *status == 504)
    );
    assert!(statuses.contains(&503) && statuses.contains(&504));
    probe.emulator.update_faults(|faults| {
        faults.server_error_ratio = 0.0;
        faults.throttle_ratio = 1.0;
    });
    let (status, headers, body) = probe.get(&path, "").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_code(&body), "TooManyRequests");
    assert!(headers.contains_key("retry-after"));
}

#[tokio::test]
async fn a_mailbox_stays_throttled_until_its_retry_after_passes() {
    let probe = Probe::start(EmulatorConfig {
        faults: Faults {
            throttle_ratio: 1.0,
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let path = format!("/users/{MAILBOX}/mailFolders/inbox/messages");
    assert_eq!(probe.get(&path, "").await.0, StatusCode::TOO_MANY_REQUESTS);
    probe
        .emulator
        .update_faults(|faults| faults.throttle_ratio = 0.0);
    let (status, headers, _) = probe.get(&path, "").await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "too early: refused again"
    );
    assert_eq!(headers["retry-after"], "1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(probe.get(&path, "").await.0, StatusCode::OK);
    assert_eq!(
        probe.emulator.counters().requests(MAILBOX),
        3,
        "refused requests count too"
    );

    probe.emulator.update_faults(|faults| {
        faults.hold_retry_after = false;
        faults.throttle_ratio = 1.0;
    });
    assert_eq!(probe.get(&path, "").await.0, StatusCode::TOO_MANY_REQUESTS);
    probe
        .emulator
        .update_faults(|faults| faults.throttle_ratio = 0.0);
    assert_eq!(probe.get(&path, "").await.0, StatusCode::OK, "switched off");
}

#[tokio::test]
async fn malformed_and_unselected_pages() {
    let probe = Probe::start(EmulatorConfig {
        faults: Faults {
            malformed_pages: 1,
            unselected_page_limit: Some(50),
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    probe
        .emulator
        .add_messages(MAILBOX, "inbox", 3)
        .expect("messages");
    let (status, _, body) = probe.get(&delta_path(), "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_string(), "truncated JSON does not parse: {body}");
    let (status, _, body) = probe.get(&delta_path(), "").await;
    assert!(
        body["value"].is_array(),
        "one malformed page only ({status})"
    );
    let (status, ..) = probe
        .get(
            &format!("/users/{MAILBOX}/mailFolders/inbox/messages/delta"),
            "odata.maxpagesize=200",
        )
        .await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn mailbox_states_answer_their_errors() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let path = format!("/users/{MAILBOX}/mailFolders/inbox/messages");
    probe
        .emulator
        .set_mailbox_state(MAILBOX, MailboxState::NotEnabledForRest)
        .expect("state");
    let mut codes = Vec::new();
    for _ in 0..2 {
        let (status, _, body) = probe.get(&path, "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        codes.push(error_code(&body).to_string());
    }
    codes.sort();
    assert_eq!(
        codes,
        vec!["MailboxNotEnabledForRESTAPI", "ResourceNotFound"]
    );
    probe
        .emulator
        .set_mailbox_state(MAILBOX, MailboxState::AccessDenied)
        .expect("state");
    let (status, _, body) = probe.get(&path, "").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error_code(&body), "ErrorAccessDenied");
    assert_eq!(body["error"]["message"], "Access to OData is disabled.");
    let (status, _, body) = probe
        .get("/users/nobody@contoso.com/mailFolders/inbox/messages", "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&body), "ResourceNotFound");
}

#[tokio::test]
async fn batch_runs_inner_requests_counted_one_by_one() {
    let probe = Probe::start(EmulatorConfig::default()).await;
    let ids = probe
        .emulator
        .add_messages(MAILBOX, "inbox", 3)
        .expect("messages");
    let requests: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(n, ids)| json!({"id": n.to_string(), "method": "PATCH", "url": format!("/users/{MAILBOX}/messages/{}", ids.immutable_id), "headers": {"Content-Type": "application/json"}, "body": {"isRead": true}}))
        .chain([json!({"id": "gone", "method": "GET", "url": format!("/users/{MAILBOX}/messages/nope")})])
        .collect();
    let (status, _, body) = probe
        .send(
            reqwest::Method::POST,
            "/$batch",
            "",
            Some(json!({"requests": requests})),
            &probe.token,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let responses = body["responses"].as_array().expect("responses");
    assert_eq!(responses.len(), 4);
    assert!(responses.iter().filter(|r| r["status"] == 200).count() == 3);
    let gone = responses.iter().find(|r| r["id"] == "gone").expect("gone");
    assert_eq!(gone["status"], 404);
    assert_eq!(error_code(&gone["body"]), "ErrorItemNotFound");
    let counters = probe.emulator.counters();
    assert_eq!(counters.batches, 1);
    assert_eq!(counters.endpoint(MAILBOX, "patch"), 3);
    assert_eq!(counters.requests(MAILBOX), 4);

    let too_many: Vec<Value> = (0..21).map(|n| json!({"id": n.to_string(), "method": "GET", "url": format!("/users/{MAILBOX}/messages/x")})).collect();
    let (status, ..) = probe
        .send(
            reqwest::Method::POST,
            "/$batch",
            "",
            Some(json!({"requests": too_many})),
            &probe.token,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_same_seed_gives_the_same_world() {
    let ids = |seed| async move {
        let emulator = GraphEmulator::start(EmulatorConfig {
            seed,
            mailboxes: vec![MAILBOX.into()],
            ..EmulatorConfig::default()
        })
        .await
        .expect("emulator");
        emulator
            .add_messages(MAILBOX, "inbox", 5)
            .expect("messages")
    };
    assert_eq!(ids(7).await, ids(7).await);
    assert_ne!(ids(7).await, ids(8).await);
}

#[tokio::test]
async fn the_admin_api_drives_mail_faults_and_counters() {
    mailpoll::install_crypto_provider();
    let emulator = GraphEmulator::start(EmulatorConfig {
        admin_api: true,
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator");
    let http = reqwest::Client::new();
    let admin = format!("{}/_admin", emulator.base_url());
    let response = http
        .post(format!("{admin}/mailboxes"))
        .json(&json!({"upn": MAILBOX}))
        .send()
        .await
        .expect("add mailbox");
    assert_eq!(response.status(), StatusCode::OK);
    let added: Vec<MessageIds> = http
        .post(format!(
            "{admin}/mailboxes/{MAILBOX}/folders/inbox/messages"
        ))
        .json(&json!({"count": 2, "messages": [{"subject": "Invoice 4471"}]}))
        .send()
        .await
        .expect("add mail")
        .json()
        .await
        .expect("ids");
    assert_eq!(added.len(), 3);
    let message: Value = http
        .get(format!(
            "{admin}/mailboxes/{MAILBOX}/messages/{}",
            added[0].immutable_id
        ))
        .send()
        .await
        .expect("get message")
        .json()
        .await
        .expect("message");
    assert_eq!(message["subject"], "Invoice 4471");
    let response = http
        .put(format!("{admin}/faults"))
        .json(&json!({"throttleRatio": 0.5, "retryAfterSecs": 3}))
        .send()
        .await
        .expect("faults");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(emulator.faults().retry_after_secs, 3);
    assert_eq!(
        emulator.faults().concurrency_cap,
        4,
        "unset switches keep defaults"
    );
    let counters: Counters = http
        .get(format!("{admin}/counters"))
        .send()
        .await
        .expect("counters")
        .json()
        .await
        .expect("JSON");
    assert_eq!(counters.token_requests, 0);
    assert_eq!(emulator.folder_len(MAILBOX, "inbox").expect("inbox"), 3);
}

mod attachments;
mod credentials;
mod hazards;
mod notifications;
