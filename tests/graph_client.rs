//! The Graph client against the Graph emulator: every page read, politely, whatever Graph does.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use mailpoll::graph::{
    Credentials, DeltaOptions, DeltaStart, Governor, GovernorConfig, GraphClient, GraphConfig,
    GraphError, ListOptions, MailboxClient, Message, PageLink, PostAction, Round,
};
use mailpoll_testkit::graph::{
    AppRegistration, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT, EmulatorConfig,
    EvictionResponse, Faults, GraphEmulator, MailboxState, MalformedKind, NewMessage,
    RetryAfterFormat, TokenEndpointFaults, default_app,
};

const MAILBOX: &str = "ops@contoso.com";

fn credentials(secret: &str) -> Credentials {
    Credentials::client_secret(DEFAULT_TENANT, DEFAULT_CLIENT_ID, secret)
}

/// Retries fast so tests stay quick; Retry-After values come from the emulator (1 s).
fn quick_governor() -> GovernorConfig {
    GovernorConfig {
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(200),
        max_retries: 25,
        ..GovernorConfig::default()
    }
}

async fn emulator(faults: Faults) -> GraphEmulator {
    mailpoll::install_crypto_provider();
    GraphEmulator::start(EmulatorConfig {
        mailboxes: vec![MAILBOX.into()],
        faults,
        ..EmulatorConfig::default()
    })
    .await
    .expect("emulator starts")
}

fn client(emulator: &GraphEmulator, governor: GovernorConfig) -> GraphClient {
    let base = emulator.base_url();
    let config = GraphConfig::with_urls(&base, &base).expect("config");
    GraphClient::new(config, Governor::new(governor)).expect("client")
}

fn mailbox(emulator: &GraphEmulator) -> MailboxClient {
    client(emulator, quick_governor()).mailbox(credentials(DEFAULT_CLIENT_SECRET), MAILBOX)
}

fn initial(folder: &str, page_size: u32) -> DeltaOptions {
    DeltaOptions {
        page_size,
        ..DeltaOptions::new(
            folder,
            DeltaStart::Initial {
                received_since: None,
            },
        )
    }
}

/// Reads a round to its end: every message (repeats kept), the final link, the pages.
async fn drain(round: &mut Round) -> Result<(Vec<Message>, PageLink, u32), GraphError> {
    let mut messages = Vec::new();
    let mut last = PageLink::End;
    while let Some(page) = round.next_page().await? {
        messages.extend(page.messages);
        last = page.link;
    }
    Ok((messages, last, round.pages()))
}

fn delta_link(link: PageLink) -> String {
    match link {
        PageLink::Delta(link) => link,
        other => panic!("round ended without a deltaLink: {other:?}"),
    }
}

fn unique_ids(messages: &[Message]) -> HashSet<String> {
    messages.iter().map(|message| message.id.clone()).collect()
}

#[tokio::test]
async fn every_page_is_read_with_one_request_per_page() {
    let count: usize = if std::env::var_os("MAILPOLL_BIG").is_some() {
        100_000
    } else {
        25_000
    };
    let emulator = emulator(Faults::default()).await;
    let added: HashSet<String> = emulator
        .add_messages(MAILBOX, "inbox", count)
        .expect("messages")
        .into_iter()
        .map(|ids| ids.immutable_id)
        .collect();
    let mailbox = mailbox(&emulator);
    let started = std::time::Instant::now();
    let mut round = mailbox.delta_round(initial("inbox", 1000)).expect("round");
    let (messages, last, pages) = drain(&mut round).await.expect("round completes");
    let elapsed = started.elapsed();
    delta_link(last);
    eprintln!(
        "delta round: {count} messages in {pages} pages, {:.2} s, {:.0} messages/s (debug build, emulator in-process)",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(mailbox.requests_sent(), u64::from(pages));

    assert_eq!(messages.len(), count);
    assert_eq!(unique_ids(&messages), added, "immutable ids, every one");
    assert_eq!(pages as usize, count.div_ceil(1000));
    let first = &messages[0];
    assert!(first.subject.is_some() && first.received_date_time.is_some());
    assert!(first.body.is_none(), "no body unless delivery asks for it");
    assert!(first.raw.get("webLink").is_none(), "$select applied");
    let counters = emulator.counters();
    assert_eq!(counters.token_requests, 1);
    assert_eq!(counters.requests(MAILBOX), u64::from(pages));
    assert_eq!(counters.endpoint(MAILBOX, "delta"), u64::from(pages));
}

#[tokio::test]
async fn bodies_are_selected_on_demand_and_rounds_resume_from_links() {
    let emulator = emulator(Faults::default()).await;
    emulator
        .add_messages(MAILBOX, "inbox", 25)
        .expect("messages");
    let mailbox = mailbox(&emulator);
    let mut round = mailbox
        .delta_round(DeltaOptions {
            include_body: true,
            ..initial("inbox", 10)
        })
        .expect("round");
    let page = round.next_page().await.expect("page").expect("first page");
    assert!(
        page.messages[0]
            .body
            .as_ref()
            .is_some_and(|body| body.content.contains("message"))
    );
    let PageLink::Next(next) = page.link else {
        panic!("more pages expected");
    };
    // A poll interrupted after committing the first page resumes from the stored nextLink.
    let mut resumed = mailbox
        .delta_round(DeltaOptions::new("inbox", DeltaStart::Link(next)))
        .expect("round");
    let (rest, last, _) = drain(&mut resumed).await.expect("rest of the round");
    assert_eq!(rest.len(), 15);
    let delta = delta_link(last);

    let new = emulator
        .add_messages(MAILBOX, "inbox", 2)
        .expect("messages");
    let mut next_round = mailbox
        .delta_round(DeltaOptions::new("inbox", DeltaStart::Link(delta)))
        .expect("round");
    let (messages, _, _) = drain(&mut next_round).await.expect("next round");
    let expected: HashSet<String> = new.into_iter().map(|ids| ids.immutable_id).collect();
    assert_eq!(unique_ids(&messages), expected);
}

#[tokio::test]
async fn replays_duplicates_and_removals_are_surfaced() {
    let emulator = emulator(Faults {
        replay_ratio: 0.3,
        ..Faults::default()
    })
    .await;
    let added: Vec<String> = emulator
        .add_messages(MAILBOX, "inbox", 60)
        .expect("messages")
        .into_iter()
        .map(|ids| ids.immutable_id)
        .collect();
    let mailbox = mailbox(&emulator);
    let mut round = mailbox.delta_round(initial("inbox", 8)).expect("round");
    let (messages, last, _) = drain(&mut round).await.expect("round");
    assert!(messages.len() > 60, "replays within the round come through");
    assert_eq!(unique_ids(&messages), added.iter().cloned().collect());

    emulator.delete_message(MAILBOX, &added[3]).expect("delete");
    emulator
        .move_message(MAILBOX, &added[4], "archive")
        .expect("move");
    let mut round = mailbox
        .delta_round(DeltaOptions::new(
            "inbox",
            DeltaStart::Link(delta_link(last)),
        ))
        .expect("round");
    let (messages, _, _) = drain(&mut round).await.expect("round");
    let removed: Vec<(&str, &str)> = messages
        .iter()
        .filter_map(|m| Some((m.id.as_str(), m.removed.as_ref()?.as_str())))
        .collect();
    assert_eq!(
        removed,
        vec![
            (added[3].as_str(), "deleted"),
            (added[4].as_str(), "changed")
        ]
    );
    assert!(
        messages.iter().any(|m| m.removed.is_none()),
        "the previous round's last page is replayed"
    );
}

/// A resync reads the folder as a first round does: no received-time filter, so neither Graph's
/// cap on filtered rounds nor a filter frozen in the new token can hide a message.
#[tokio::test]
async fn an_expired_delta_token_resyncs_the_whole_folder_unfiltered() {
    for eviction in [
        EvictionResponse::Gone,
        EvictionResponse::SyncStateNotFound,
        EvictionResponse::ResyncRequired,
    ] {
        let emulator = emulator(Faults {
            eviction,
            filtered_delta_cap: 10,
            ..Faults::default()
        })
        .await;
        emulator
            .add_messages(MAILBOX, "inbox", 40)
            .expect("messages");
        let mailbox = mailbox(&emulator);
        let mut round = mailbox.delta_round(initial("inbox", 10)).expect("round");
        let (first, last, _) = drain(&mut round).await.expect("first round");
        let new: HashSet<String> = emulator
            .add_messages(MAILBOX, "inbox", 5)
            .expect("messages")
            .into_iter()
            .map(|ids| ids.immutable_id)
            .collect();
        emulator.evict_delta_tokens(MAILBOX).expect("evict");

        let mut round = mailbox
            .delta_round(DeltaOptions {
                page_size: 10,
                ..DeltaOptions::new("inbox", DeltaStart::Link(delta_link(last)))
            })
            .expect("round");
        let page = round.next_page().await.expect("resync page").expect("page");
        assert!(
            page.resynced,
            "{eviction:?}: the caller learns its cursor was dropped"
        );
        let mut messages = page.messages;
        let (rest, last, _) = drain(&mut round).await.expect("resync round");
        messages.extend(rest);
        delta_link(if round.pages() == 1 { page.link } else { last });
        assert!(round.resynced());
        let expected: HashSet<String> = first.iter().map(|m| m.id.clone()).chain(new).collect();
        assert_eq!(expected.len(), 45);
        assert_eq!(unique_ids(&messages), expected, "{eviction:?}");
    }
}

#[tokio::test]
async fn a_stored_link_to_another_host_is_treated_as_an_expired_cursor() {
    let emulator = emulator(Faults::default()).await;
    emulator
        .add_messages(MAILBOX, "inbox", 3)
        .expect("messages");
    let mailbox = mailbox(&emulator);
    let mut round = mailbox
        .delta_round(DeltaOptions::new(
            "inbox",
            DeltaStart::Link("https://graph.example.org/v1.0/users/x/mailFolders/inbox/messages/delta?$deltatoken=abc".into()),
        ))
        .expect("round");
    let (messages, last, _) = drain(&mut round).await.expect("round");
    assert!(round.resynced());
    assert_eq!(messages.len(), 3);
    delta_link(last);
}

#[tokio::test]
async fn a_skip_token_evicted_mid_round_restarts_the_round_once() {
    let emulator = emulator(Faults::default()).await;
    emulator
        .add_messages(MAILBOX, "inbox", 30)
        .expect("messages");
    let mailbox = mailbox(&emulator);
    let mut round = mailbox.delta_round(initial("inbox", 10)).expect("round");
    let first = round.next_page().await.expect("page").expect("page");
    assert!(!first.resynced);
    emulator.evict_delta_tokens(MAILBOX).expect("evict");
    let (messages, last, _) = drain(&mut round).await.expect("round");
    delta_link(last);
    assert!(round.resynced());
    assert_eq!(
        unique_ids(&messages).len(),
        30,
        "the restarted round returns the whole folder"
    );
}

#[tokio::test]
async fn under_30_percent_throttling_rounds_complete_politely() {
    let emulator = emulator(Faults {
        throttle_ratio: 0.3,
        retry_after_secs: 1,
        ..Faults::default()
    })
    .await;
    let inbox = emulator
        .add_messages(MAILBOX, "inbox", 30)
        .expect("messages");
    emulator
        .add_messages(MAILBOX, "archive", 30)
        .expect("messages");
    let mailbox = mailbox(&emulator);

    // One task alone: every request after a 429 was sent after the client read it, so none
    // may arrive before the Retry-After ran out.
    emulator
        .add_messages(MAILBOX, "junkemail", 12)
        .expect("messages");
    let mut round = mailbox.delta_round(initial("junkemail", 1)).expect("round");
    let (messages, last, _) = drain(&mut round).await.expect("round completes");
    assert_eq!(unique_ids(&messages).len(), 12);
    delta_link(last);
    let counters = emulator.counters();
    assert!(!counters.throttles.is_empty(), "the emulator did throttle");
    let early = counters.early_requests(Duration::ZERO);
    assert!(early.is_empty(), "requests inside a Retry-After: {early:?}");
    emulator.reset_counters();

    // Several tasks at once: the pause is shared. Requests already on their way when a 429
    // left cannot have seen it, hence a small allowance right after each 429.
    let rounds = ["inbox", "archive"].map(|folder| {
        let mailbox = mailbox.clone();
        tokio::spawn(async move {
            let mut round = mailbox.delta_round(initial(folder, 10)).expect("round");
            drain(&mut round).await
        })
    });
    let fetches: Vec<_> = inbox
        .iter()
        .take(6)
        .map(|ids| {
            let (mailbox, id) = (mailbox.clone(), ids.immutable_id.clone());
            tokio::spawn(async move { mailbox.get_mime(&id).await })
        })
        .collect();
    let actions: Vec<PostAction> = inbox
        .iter()
        .skip(10)
        .take(5)
        .map(|ids| PostAction::MarkRead {
            message_id: ids.immutable_id.clone(),
        })
        .collect();
    let batch = {
        let mailbox = mailbox.clone();
        tokio::spawn(async move { mailbox.post_actions(&actions).await })
    };

    for round in rounds {
        let (messages, last, _) = round.await.expect("task").expect("round completes");
        assert_eq!(unique_ids(&messages).len(), 30);
        delta_link(last);
    }
    for fetch in fetches {
        let mime = fetch.await.expect("task").expect("MIME");
        assert!(String::from_utf8_lossy(&mime).contains("Message-ID:"));
    }
    for result in batch.await.expect("task").expect("batch") {
        result.expect("mark read");
    }

    let counters = emulator.counters();
    assert!(!counters.throttles.is_empty(), "the emulator did throttle");
    assert!(
        counters.peak_concurrency(MAILBOX) <= 4,
        "peak concurrency {}",
        counters.peak_concurrency(MAILBOX)
    );
    let early = counters.early_requests(Duration::from_millis(100));
    assert!(early.is_empty(), "requests inside a Retry-After: {early:?}");
}

#[tokio::test]
async fn transient_server_errors_are_retried_then_reported() {
    let emulator = emulator(Faults {
        server_error_ratio: 0.3,
        ..Faults::default()
    })
    .await;
    emulator
        .add_messages(MAILBOX, "inbox", 40)
        .expect("messages");
    let mailbox = mailbox(&emulator);
    let mut round = mailbox.delta_round(initial("inbox", 5)).expect("round");
    let (messages, last, _) = drain(&mut round).await.expect("round completes");
    assert_eq!(unique_ids(&messages).len(), 40);
    delta_link(last);

    emulator.update_faults(|faults| faults.server_error_ratio = 1.0);
    let stubborn = client(
        &emulator,
        GovernorConfig {
            max_retries: 2,
            ..quick_governor()
        },
    )
    .mailbox(credentials(DEFAULT_CLIENT_SECRET), MAILBOX);
    let mut round = stubborn.delta_round(initial("inbox", 5)).expect("round");
    let error = round.next_page().await.expect_err("persistent 5xx");
    assert_eq!(error.reason().as_str(), "Transient");
    assert!(error.request_id().is_some());
}

#[tokio::test]
async fn an_unreachable_graph_is_a_transient_error() {
    let emulator = emulator(Faults::default()).await;
    let closed = format!(
        "http://127.0.0.1:{}",
        mailpoll_testkit::pg::free_port().expect("free port")
    );
    let config = GraphConfig::with_urls(&emulator.base_url(), &closed).expect("config");
    let governor = Governor::new(GovernorConfig {
        max_retries: 1,
        ..quick_governor()
    });
    let graph = GraphClient::new(config, governor).expect("client");
    let mailbox = graph.mailbox(credentials(DEFAULT_CLIENT_SECRET), MAILBOX);
    let error = mailbox
        .get_mime("x")
        .await
        .expect_err("nothing listens there");
    assert_eq!(error.reason().as_str(), "Transient");
    assert!(
        error.to_string().to_lowercase().contains("refused"),
        "{error}"
    );
    assert_eq!(mailbox.requests_sent(), 2, "one try and one retry");
}

#[tokio::test]
async fn a_token_refused_mid_round_is_refreshed_once_and_the_round_continues() {
    let emulator = emulator(Faults::default()).await;
    emulator
        .add_messages(MAILBOX, "inbox", 30)
        .expect("messages");
    let mailbox = mailbox(&emulator);
    let mut round = mailbox.delta_round(initial("inbox", 10)).expect("round");
    round.next_page().await.expect("page").expect("first page");
    emulator.revoke_tokens();
    let (messages, last, _) = drain(&mut round).await.expect("round continues");
    delta_link(last);
    assert_eq!(messages.len(), 20);
    let counters = emulator.counters();
    assert_eq!(counters.token_requests, 2);
    assert_eq!(
        counters
            .mailbox(MAILBOX)
            .expect("counters")
            .by_status
            .get(&401),
        Some(&1)
    );
}

#[tokio::test]
async fn short_lived_tokens_are_refreshed_before_they_expire() {
    let emulator = emulator(Faults {
        token_lifetime_secs: 2,
        slow_page_ms: 300,
        ..Faults::default()
    })
    .await;
    emulator
        .add_messages(MAILBOX, "inbox", 12)
        .expect("messages");
    let mailbox = mailbox(&emulator);
    let mut round = mailbox.delta_round(initial("inbox", 1)).expect("round");
    let (messages, _, pages) = drain(&mut round).await.expect("round");
    assert_eq!(messages.len(), 12);
    let counters = emulator.counters();
    assert!(
        counters.token_requests >= 2,
        "pages took longer than a token's half-life"
    );
    assert!(
        counters.token_requests <= u64::from(pages),
        "not a token per request"
    );
    assert_eq!(
        counters
            .mailbox(MAILBOX)
            .expect("counters")
            .by_status
            .get(&401),
        None
    );
}

#[tokio::test]
async fn bad_credentials_fail_authentication_without_a_retry_storm() {
    let emulator = emulator(Faults::default()).await;
    emulator
        .add_messages(MAILBOX, "inbox", 3)
        .expect("messages");
    let graph = client(&emulator, quick_governor());
    let wrong = graph.mailbox(credentials("not-the-secret"), MAILBOX);
    for _ in 0..5 {
        let mut round = wrong.delta_round(initial("inbox", 10)).expect("round");
        let error = round.next_page().await.expect_err("bad secret");
        assert_eq!(error.reason().as_str(), "AuthenticationFailed");
        assert!(error.to_string().contains("AADSTS7000215"), "{error}");
        assert!(
            error
                .to_string()
                .contains("to fix: the client secret is wrong"),
            "{error}"
        );
        assert!(!error.to_string().contains("not-the-secret"));
    }
    let counters = emulator.counters();
    assert_eq!(
        counters.token_requests, 1,
        "a refused credential set is not retried at once"
    );
    assert_eq!(counters.requests(MAILBOX), 0);

    let unknown_tenant = graph.mailbox(
        Credentials {
            tenant_id: "no-such-tenant".into(),
            ..credentials(DEFAULT_CLIENT_SECRET)
        },
        MAILBOX,
    );
    let error = unknown_tenant
        .get_mime("x")
        .await
        .expect_err("unknown tenant");
    assert_eq!(error.reason().as_str(), "AuthenticationFailed");
}

/// The token endpoint answering 429 with a Retry-After: the next token request waits it out;
/// a fetch that gives up (three tries) is a transient error, never AuthenticationFailed, and
/// no caller with the same credentials asks again before the wait has run out.
#[tokio::test]
async fn a_throttled_token_endpoint_is_waited_out_not_hammered() {
    let emulator = emulator(Faults {
        token_endpoint: TokenEndpointFaults {
            fail_next: 1,
            status: 429,
            retry_after_secs: Some(2),
            ..TokenEndpointFaults::default()
        },
        ..Faults::default()
    })
    .await;
    emulator
        .add_messages(MAILBOX, "inbox", 3)
        .expect("messages");
    let started = std::time::Instant::now();
    let mut round = mailbox(&emulator)
        .delta_round(initial("inbox", 10))
        .expect("round");
    let (messages, _, _) = drain(&mut round).await.expect("the round, after the wait");
    assert_eq!(messages.len(), 3);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the Retry-After was waited out: {:?}",
        started.elapsed()
    );
    let counters = emulator.counters();
    assert_eq!((counters.token_requests, counters.token_faults), (2, 1));

    // Throttled every time: a process without a token tries three times, a Retry-After apart.
    emulator.update_faults(|faults| {
        faults.token_endpoint = TokenEndpointFaults {
            fail_ratio: 1.0,
            status: 429,
            retry_after_secs: Some(1),
            ..TokenEndpointFaults::default()
        };
    });
    let graph = client(&emulator, quick_governor());
    let first = graph.mailbox(credentials(DEFAULT_CLIENT_SECRET), MAILBOX);
    let started = std::time::Instant::now();
    let error = first
        .delta_round(initial("inbox", 10))
        .expect("round")
        .next_page()
        .await
        .expect_err("no token");
    assert_eq!(error.reason().as_str(), "Transient", "{error}");
    assert!(error.to_string().contains("429"), "{error}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(emulator.counters().token_requests, 2 + 3);
    // Another mailbox with the same credentials, at once: answered without a request.
    let second = graph.mailbox(credentials(DEFAULT_CLIENT_SECRET), "other@contoso.com");
    let error = second.get_mime("AAk").await.expect_err("still throttled");
    assert_eq!(error.reason().as_str(), "Transient", "{error}");
    assert_eq!(emulator.counters().token_requests, 2 + 3);

    // Once the wait has run out, the endpoint is asked again.
    emulator.update_faults(|faults| faults.token_endpoint = TokenEndpointFaults::default());
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut round = first.delta_round(initial("inbox", 10)).expect("round");
    drain(&mut round).await.expect("a token again");
    let counters = emulator.counters();
    assert_eq!((counters.token_requests, counters.tokens_issued), (6, 2));
    assert_eq!(
        counters.requests(MAILBOX),
        2,
        "one page per successful round"
    );
}

#[tokio::test]
async fn a_malformed_page_is_an_error_and_yields_no_delta_link() {
    for kind in [
        MalformedKind::TruncatedJson,
        MalformedKind::WrongShape,
        MalformedKind::NotJson,
    ] {
        let emulator = emulator(Faults::default()).await;
        emulator
            .add_messages(MAILBOX, "inbox", 30)
            .expect("messages");
        let mailbox = mailbox(&emulator);
        let mut round = mailbox.delta_round(initial("inbox", 10)).expect("round");
        round.next_page().await.expect("page").expect("first page");
        emulator.update_faults(|faults| {
            faults.malformed_pages = 1;
            faults.malformed_kind = kind;
        });
        let error = round.next_page().await.expect_err("malformed page");
        assert!(
            matches!(error, GraphError::MalformedResponse { .. }),
            "{kind:?}: {error}"
        );
        assert_eq!(error.reason().as_str(), "Transient");
        assert!(!round.is_done(), "{kind:?}: no deltaLink for the round");
        // The same request again, now answered properly, finishes the round.
        let (rest, last, _) = drain(&mut round).await.expect("retry");
        assert_eq!(rest.len(), 20);
        delta_link(last);
    }
}

#[tokio::test]
async fn a_response_over_the_size_limit_is_refused() {
    let emulator = emulator(Faults::default()).await;
    emulator
        .add_messages(MAILBOX, "inbox", 200)
        .expect("messages");
    let base = emulator.base_url();
    let config = GraphConfig {
        max_response_bytes: 16 * 1024,
        ..GraphConfig::with_urls(&base, &base).expect("config")
    };
    let graph = GraphClient::new(config, Governor::new(quick_governor())).expect("client");
    let mut round = graph
        .mailbox(credentials(DEFAULT_CLIENT_SECRET), MAILBOX)
        .delta_round(initial("inbox", 200))
        .expect("round");
    let error = round.next_page().await.expect_err("page too big");
    assert!(
        matches!(error, GraphError::MalformedResponse { .. }),
        "{error}"
    );
    assert!(!round.is_done());
    assert!(GraphConfig::with_urls("ftp://login.example", "https://graph.example").is_err());
}

#[tokio::test]
async fn mailbox_states_give_their_typed_errors() {
    let emulator = emulator(Faults::default()).await;
    let ids = emulator
        .add_messages(MAILBOX, "inbox", 1)
        .expect("message")
        .remove(0);
    let mailbox = mailbox(&emulator);

    emulator
        .set_mailbox_state(MAILBOX, MailboxState::NotEnabledForRest)
        .expect("state");
    for _ in 0..2 {
        let mut round = mailbox.delta_round(initial("inbox", 10)).expect("round");
        let error = round.next_page().await.expect_err("not enabled");
        assert_eq!(error.reason().as_str(), "MailboxNotFound", "{error}");
        assert!(error.request_id().is_some());
    }
    emulator
        .set_mailbox_state(MAILBOX, MailboxState::AccessDenied)
        .expect("state");
    let error = mailbox
        .get_mime(&ids.immutable_id)
        .await
        .expect_err("denied");
    assert_eq!(error.reason().as_str(), "AccessDenied");
    assert!(error.to_string().contains("ErrorAccessDenied"));

    let graph = client(&emulator, quick_governor());
    let error = graph
        .mailbox(credentials(DEFAULT_CLIENT_SECRET), "nobody@contoso.com")
        .delta_round(initial("inbox", 10))
        .expect("round")
        .next_page()
        .await
        .expect_err("unknown mailbox");
    assert_eq!(error.reason().as_str(), "MailboxNotFound");

    emulator
        .set_mailbox_state(MAILBOX, MailboxState::Enabled)
        .expect("state");
    let error = mailbox
        .delta_round(initial("no-such-folder", 10))
        .expect("round")
        .next_page()
        .await
        .expect_err("unknown folder");
    assert_eq!(error.reason().as_str(), "MailboxNotFound");
    assert!(error.to_string().contains("no-such-folder"), "{error}");
    emulator.add_app(AppRegistration {
        client_id: "reader".into(),
        roles: vec!["Mail.Read".into()],
        ..default_app()
    });
    let reader = graph.mailbox(
        Credentials {
            client_id: "reader".into(),
            ..credentials(DEFAULT_CLIENT_SECRET)
        },
        MAILBOX,
    );
    assert!(reader.get_mime(&ids.immutable_id).await.is_ok());
    let error = reader
        .mark_read(&ids.immutable_id)
        .await
        .expect_err("read-only app");
    assert_eq!(error.reason().as_str(), "AccessDenied");
}

#[tokio::test]
async fn post_actions_mark_read_move_and_batch() {
    let emulator = emulator(Faults::default()).await;
    let ids = emulator
        .add_messages(MAILBOX, "inbox", 26)
        .expect("messages");
    let mailbox = mailbox(&emulator);

    mailbox
        .mark_read(&ids[0].immutable_id)
        .await
        .expect("mark read");
    let stored = emulator
        .message(MAILBOX, &ids[0].immutable_id)
        .expect("mailbox")
        .expect("message");
    assert_eq!(stored["isRead"], true);

    let moved = mailbox
        .move_message(&ids[1].immutable_id, "archive")
        .await
        .expect("move");
    assert_eq!(moved.id, ids[1].immutable_id, "immutable ids survive moves");
    assert_eq!(
        moved.parent_folder_id.as_deref(),
        Some(
            emulator
                .folder_id(MAILBOX, "archive")
                .expect("folder")
                .as_str()
        )
    );
    let error = mailbox
        .mark_read(&ids[1].rest_id)
        .await
        .expect_err("old default id");
    assert_eq!(error.reason().as_str(), "ItemNotFound");

    let mime = mailbox.get_mime(&ids[2].immutable_id).await.expect("MIME");
    assert!(String::from_utf8_lossy(&mime).starts_with("Message-ID: <"));

    let mut actions: Vec<PostAction> = ids[3..25]
        .iter()
        .map(|ids| PostAction::MarkRead {
            message_id: ids.immutable_id.clone(),
        })
        .collect();
    actions.push(PostAction::Move {
        message_id: ids[25].immutable_id.clone(),
        destination: "archive".into(),
    });
    actions.push(PostAction::MarkRead {
        message_id: "AAkNoSuchMessage".into(),
    });
    emulator.reset_counters();
    let results = mailbox.post_actions(&actions).await.expect("batches");
    assert_eq!(results.len(), 24);
    assert!(results[..23].iter().all(Result::is_ok));
    assert_eq!(
        results[23].as_ref().expect_err("missing").reason().as_str(),
        "ItemNotFound"
    );
    assert_eq!(emulator.folder_len(MAILBOX, "archive").expect("archive"), 2);
    let counters = emulator.counters();
    assert_eq!(counters.batches, 2, "20 per envelope");
    assert_eq!(
        counters.requests(MAILBOX),
        24,
        "inner requests counted one by one"
    );
}

#[tokio::test]
async fn the_received_since_fallback_reads_every_page_in_order() {
    let emulator = emulator(Faults {
        skip_jump: 0,
        ..Faults::default()
    })
    .await;
    emulator
        .add_messages(MAILBOX, "inbox", 30)
        .expect("messages");
    let since_message = emulator
        .add_message(
            MAILBOX,
            "inbox",
            NewMessage {
                subject: Some("watermark".into()),
                ..NewMessage::default()
            },
        )
        .expect("message");
    emulator
        .add_messages(MAILBOX, "inbox", 20)
        .expect("messages");
    let since = emulator
        .message(MAILBOX, &since_message.immutable_id)
        .expect("mailbox")
        .and_then(|m| m["receivedDateTime"].as_str().map(str::to_string))
        .expect("received");
    let since = chrono::DateTime::parse_from_rfc3339(&since)
        .expect("date")
        .to_utc();

    let mailbox = mailbox(&emulator);
    let mut round = mailbox
        .received_since_round(ListOptions {
            folder: "inbox".into(),
            since: Some(since),
            page_size: 7,
            include_body: false,
        })
        .expect("round");
    let (messages, last, pages) = drain(&mut round).await.expect("fallback round");
    assert_eq!(last, PageLink::End);
    assert!(pages >= 3);
    assert!(
        messages.len() >= 21,
        "the watermark's own second is included (ge)"
    );
    assert!(messages.iter().any(|m| m.id == since_message.immutable_id));
    let dates: Vec<_> = messages
        .iter()
        .map(|m| m.received_date_time.expect("date"))
        .collect();
    assert!(dates.windows(2).all(|pair| pair[0] <= pair[1]), "ascending");
    assert!(dates.iter().all(|date| *date >= since));
}

#[tokio::test]
async fn a_retry_after_is_shared_and_reported_to_the_listener() {
    let emulator = emulator(Faults {
        throttle_ratio: 1.0,
        retry_after_secs: 1,
        ..Faults::default()
    })
    .await;
    emulator
        .add_messages(MAILBOX, "inbox", 2)
        .expect("messages");
    let governor = Governor::new(GovernorConfig {
        max_retries: 1,
        ..quick_governor()
    });
    let notices = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = notices.clone();
    governor.on_throttle(move |notice| seen.lock().expect("notices").push(notice.clone()));
    let base = emulator.base_url();
    let graph = GraphClient::new(
        GraphConfig::with_urls(&base, &base).expect("config"),
        governor.clone(),
    )
    .expect("client");
    let mailbox = graph.mailbox(credentials(DEFAULT_CLIENT_SECRET), MAILBOX);
    let error = mailbox
        .delta_round(initial("inbox", 10))
        .expect("round")
        .next_page()
        .await
        .expect_err("throttled throughout");
    assert_eq!(error.reason().as_str(), "Throttled");
    assert_eq!(error.retry_after(), Some(Duration::from_secs(1)));
    let notices = notices.lock().expect("notices").clone();
    assert_eq!(notices.len(), 2, "one notice per 429");
    assert_eq!(notices[0].mailbox, MAILBOX);
    assert!(governor.paused_until(MAILBOX).is_some());

    // A pause learned from elsewhere (another replica) holds requests back too.
    emulator.update_faults(|faults| faults.throttle_ratio = 0.0);
    governor.pause_until(
        "other@contoso.com",
        chrono::Utc::now() + chrono::Duration::minutes(10),
    );
    let error = graph
        .mailbox(credentials(DEFAULT_CLIENT_SECRET), "other@contoso.com")
        .get_mime("x")
        .await
        .expect_err("paused for longer than max_wait");
    assert_eq!(error.reason().as_str(), "Throttled");
    assert_eq!(emulator.counters().requests("other@contoso.com"), 0);
}

/// `Retry-After: 0`, an HTTP-date in the past, or none at all on a 429 never lead to an
/// immediate retry: each retry waits at least the floor (1 s). A huge value neither
/// overflows nor is slept through: the request ends `Throttled` with a wait at the ceiling.
#[tokio::test]
async fn retry_after_that_says_no_wait_still_waits_the_floor() {
    use mailpoll::graph::{RETRY_AFTER_CEILING, RETRY_AFTER_FLOOR};
    let emulator = emulator(Faults {
        throttle_ratio: 1.0,
        retry_after_secs: 1,
        ..Faults::default()
    })
    .await;
    emulator
        .add_messages(MAILBOX, "inbox", 1)
        .expect("messages");
    let retries = 2;
    for format in [
        RetryAfterFormat::Zero,
        RetryAfterFormat::PastHttpDate,
        RetryAfterFormat::Missing,
    ] {
        emulator.update_faults(|faults| faults.retry_after_format = format);
        emulator.reset_counters();
        let mailbox = client(
            &emulator,
            GovernorConfig {
                max_retries: retries,
                ..quick_governor()
            },
        )
        .mailbox(credentials(DEFAULT_CLIENT_SECRET), MAILBOX);
        let started = std::time::Instant::now();
        let error = mailbox
            .delta_round(initial("inbox", 10))
            .expect("round")
            .next_page()
            .await
            .expect_err("throttled throughout");
        let elapsed = started.elapsed();
        assert_eq!(error.reason().as_str(), "Throttled", "{format:?}");
        assert_eq!(
            emulator.counters().requests(MAILBOX),
            u64::from(retries) + 1,
            "{format:?}: one request per try, no storm"
        );
        assert!(
            elapsed >= RETRY_AFTER_FLOOR * retries,
            "{format:?}: {retries} retries took only {elapsed:?}"
        );
    }

    emulator.update_faults(|faults| faults.retry_after_format = RetryAfterFormat::Huge);
    emulator.reset_counters();
    let error = mailbox(&emulator)
        .delta_round(initial("inbox", 10))
        .expect("round")
        .next_page()
        .await
        .expect_err("throttled for longer than the governor waits");
    let wait = error.retry_after().expect("a wait");
    assert!(
        wait <= RETRY_AFTER_CEILING && wait > RETRY_AFTER_CEILING - Duration::from_secs(10),
        "{wait:?}"
    );
    assert_eq!(emulator.counters().requests(MAILBOX), 1, "no retry storm");
}
