//! Each credential kind against the Graph emulator's token endpoint: it works, a wrong one is
//! explained without a retry storm, a rotated federated token file is read again, and an
//! outage or a slow token endpoint costs no request while the cached token is valid.
//!
//! Time is scaled down: tokens live 20 s instead of 60–90 minutes, and the token endpoint is
//! down for 6 s of that instead of a minute of an hour. What matters is the same at any scale:
//! the outage covers the moment the token is due for refresh and ends before it expires.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mailpoll::graph::{
    Certificate, Credentials, DeltaOptions, DeltaStart, Governor, GovernorConfig, GraphClient,
    GraphConfig, GraphError, MailboxClient, Proof,
};
use mailpoll_testkit::credentials::{
    APP_CERT_PEM, APP_KEY_PEM, OTHER_CERT_PEM, OTHER_KEY_PEM, ServiceAccountIssuer,
    service_account_subject,
};
use mailpoll_testkit::graph::{
    AppRegistration, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT, EmulatorConfig,
    Faults, FederatedCredential, GraphEmulator, TOKEN_EXCHANGE_AUDIENCE, TokenEndpointFaults,
    default_app,
};
use mailpoll_testkit::pg::tempdir::TempDir;

const MAILBOX: &str = "ops@contoso.com";

struct World {
    emulator: GraphEmulator,
    graph: GraphClient,
    issuer: ServiceAccountIssuer,
    subject: String,
    dir: TempDir,
}

impl World {
    async fn start(faults: Faults) -> Self {
        mailpoll::install_crypto_provider();
        let issuer = ServiceAccountIssuer::sandbox().expect("issuer");
        let subject = service_account_subject("mailpoll-system", "mailpoll");
        let emulator = GraphEmulator::start(EmulatorConfig {
            mailboxes: vec![MAILBOX.into()],
            faults,
            apps: vec![AppRegistration {
                federated_credentials: vec![FederatedCredential {
                    issuer: issuer.issuer.clone(),
                    subject: subject.clone(),
                    audience: TOKEN_EXCHANGE_AUDIENCE.into(),
                }],
                ..default_app()
            }],
            ..EmulatorConfig::default()
        })
        .await
        .expect("emulator starts");
        emulator.add_issuer(&issuer.issuer, issuer.public_key());
        emulator
            .add_messages(MAILBOX, "inbox", 3)
            .expect("messages");
        let base = emulator.base_url();
        let config = GraphConfig::with_urls(&base, &base).expect("config");
        let graph = GraphClient::new(
            config,
            Governor::new(GovernorConfig {
                backoff_base: Duration::from_millis(20),
                backoff_cap: Duration::from_millis(200),
                ..GovernorConfig::default()
            }),
        )
        .expect("client");
        let dir = TempDir::new("mailpoll-credentials").expect("temp dir");
        Self {
            emulator,
            graph,
            issuer,
            subject,
            dir,
        }
    }

    fn secret(&self) -> Credentials {
        Credentials::client_secret(DEFAULT_TENANT, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET)
    }

    fn certificate(&self, cert: &str, key: &str) -> Credentials {
        Credentials {
            tenant_id: DEFAULT_TENANT.into(),
            client_id: DEFAULT_CLIENT_ID.into(),
            proof: Proof::Certificate(Arc::new(
                Certificate::from_pem(cert.as_bytes(), key.as_bytes()).expect("pair"),
            )),
        }
    }

    /// Workload identity: a token file the test writes as the kubelet would.
    fn federated(&self) -> Credentials {
        let path = self.dir.path().join("azure-identity-token");
        self.issuer
            .write_token_file(&path, &self.subject, Duration::from_secs(3600))
            .expect("token file");
        Credentials {
            tenant_id: DEFAULT_TENANT.into(),
            client_id: DEFAULT_CLIENT_ID.into(),
            proof: Proof::FederatedTokenFile(path),
        }
    }

    fn mailbox(&self, credentials: Credentials) -> MailboxClient {
        self.graph.mailbox(credentials, MAILBOX)
    }
}

/// One delta round from the start: a Graph request that needs a token.
async fn read(mailbox: &MailboxClient) -> Result<usize, GraphError> {
    let mut round = mailbox.delta_round(DeltaOptions::new(
        "inbox",
        DeltaStart::Initial {
            received_since: None,
        },
    ))?;
    let mut messages = 0;
    while let Some(page) = round.next_page().await? {
        messages += page.messages.len();
    }
    Ok(messages)
}

fn issued_by(world: &World, prefix: &str) -> u64 {
    world
        .emulator
        .counters()
        .tokens_by_credential
        .iter()
        .filter(|(label, _)| label.starts_with(prefix))
        .map(|(_, count)| count)
        .sum()
}

#[tokio::test]
async fn each_credential_kind_reads_mail_with_its_own_proof() {
    let world = World::start(Faults::default()).await;
    for (credentials, label) in [
        (world.secret(), "secret"),
        (world.certificate(APP_CERT_PEM, APP_KEY_PEM), "certificate:"),
        (
            world.federated(),
            "federated:system:serviceaccount:mailpoll-system:mailpoll",
        ),
    ] {
        let mailbox = world.mailbox(credentials);
        assert_eq!(read(&mailbox).await.expect(label), 3);
        assert_eq!(issued_by(&world, label), 1, "{label}");
    }
    let counters = world.emulator.counters();
    assert_eq!(counters.tokens_issued, 3);
    // Two assertions (certificate, federated), each with its own id.
    assert_eq!(counters.assertion_ids.len(), 2);
}

#[tokio::test]
async fn a_certificate_assertion_is_fresh_for_every_token_request() {
    let world = World::start(Faults::default()).await;
    let mailbox = world.mailbox(world.certificate(APP_CERT_PEM, APP_KEY_PEM));
    read(&mailbox).await.expect("first token");
    world.emulator.revoke_tokens();
    read(&mailbox).await.expect("refreshed after a 401");
    let ids = world.emulator.counters().assertion_ids;
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1], "a new jti for each assertion");
}

#[tokio::test]
async fn a_wrong_certificate_fails_authentication_with_a_hint_and_no_retry_storm() {
    let world = World::start(Faults::default()).await;
    let unregistered = world.mailbox(world.certificate(OTHER_CERT_PEM, OTHER_KEY_PEM));
    for _ in 0..5 {
        let error = read(&unregistered).await.expect_err("unregistered");
        assert_eq!(error.reason().as_str(), "AuthenticationFailed");
        let text = error.to_string();
        assert!(text.contains("certificate credentials"), "{text}");
        assert!(text.contains("AADSTS700027"), "{text}");
        assert!(
            text.contains("to fix:") && text.contains("--cert"),
            "{text}"
        );
        assert!(!text.contains("BEGIN"), "{text}");
    }
    assert_eq!(
        world.emulator.counters().token_requests,
        1,
        "a refused credential set is not asked for again during the cool-down"
    );
    // The registered certificate replaced in Entra behind the cluster's back (the switch).
    world
        .emulator
        .update_faults(|faults| faults.token_endpoint.wrong_certificate = true);
    let replaced = world.mailbox(world.certificate(APP_CERT_PEM, APP_KEY_PEM));
    let error = read(&replaced).await.expect_err("replaced");
    assert!(error.to_string().contains("AADSTS700027"), "{error}");
    assert_eq!(world.emulator.counters().requests(MAILBOX), 0);
}

#[tokio::test]
async fn a_federated_token_file_is_read_again_at_each_token_request() {
    let world = World::start(Faults::default()).await;
    let credentials = world.federated();
    let Proof::FederatedTokenFile(path) = &credentials.proof else {
        panic!("a token file");
    };
    let mailbox = world.mailbox(credentials.clone());
    read(&mailbox).await.expect("first token");
    // The kubelet rotates the file; the next token request must send the new token.
    world
        .issuer
        .write_token_file(path, &world.subject, Duration::from_secs(3600))
        .expect("rotated");
    world.emulator.revoke_tokens();
    read(&mailbox).await.expect("token from the rotated file");
    let ids = world.emulator.counters().assertion_ids;
    assert_eq!(ids.len(), 2);
    assert_ne!(
        ids[0], ids[1],
        "the second request carried the rotated token"
    );

    // A token for another service account: the federated credential does not match.
    world
        .issuer
        .write_token_file(
            path,
            &service_account_subject("default", "default"),
            Duration::from_secs(3600),
        )
        .expect("written");
    world.emulator.revoke_tokens();
    let before = world.emulator.counters().token_requests;
    for _ in 0..3 {
        let error = read(&mailbox)
            .await
            .expect_err("no federated credential matches");
        let text = error.to_string();
        assert_eq!(error.reason().as_str(), "AuthenticationFailed");
        assert!(text.contains("AADSTS70021"), "{text}");
        assert!(text.contains("api://AzureADTokenExchange"), "{text}");
    }
    assert_eq!(
        world.emulator.counters().token_requests,
        before + 1,
        "the refusal is answered from memory during the cool-down"
    );
    // A missing file says how to mount one.
    let missing = world.mailbox(Credentials {
        proof: Proof::FederatedTokenFile(world.dir.path().join("absent")),
        ..credentials
    });
    let error = read(&missing).await.expect_err("no file");
    assert!(
        error.to_string().contains("azure.workload.identity/use"),
        "{error}"
    );
}

/// The token endpoint fails from a little before the cached tokens are due for refresh until
/// a little before they expire: every request in between still succeeds, each credential set
/// asks the failing endpoint a bounded number of times, and a fresh token is in place before
/// the old one expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_the_token_endpoint_costs_no_request_while_tokens_are_valid() {
    let lifetime = 20;
    let world = World::start(Faults {
        token_lifetime_secs: lifetime,
        ..Faults::default()
    })
    .await;
    let kinds = [
        world.mailbox(world.secret()),
        world.mailbox(world.certificate(APP_CERT_PEM, APP_KEY_PEM)),
        world.mailbox(world.federated()),
    ];
    for mailbox in &kinds {
        read(mailbox).await.expect("first token");
    }
    let started = Instant::now();
    // Refresh is due at half the lifetime (10 s); tokens stop being offered at 18 s.
    let outage = Duration::from_secs(8)..Duration::from_secs(14);
    let mut down = false;
    let mut reads = 0;
    while started.elapsed() < Duration::from_secs(lifetime - 1) {
        let now = started.elapsed();
        if !down && outage.contains(&now) {
            world.emulator.update_faults(|faults| {
                faults.token_endpoint = TokenEndpointFaults {
                    fail_ratio: 1.0,
                    status: 503,
                    retry_after_secs: None,
                    ..TokenEndpointFaults::default()
                };
            });
            down = true;
        } else if down && now >= outage.end {
            world
                .emulator
                .update_faults(|faults| faults.token_endpoint = TokenEndpointFaults::default());
            down = false;
        }
        for (kind, mailbox) in kinds.iter().enumerate() {
            read(mailbox)
                .await
                .unwrap_or_else(|error| panic!("kind {kind} at {now:?}: {error}"));
            reads += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let counters = world.emulator.counters();
    assert!(reads > 100, "{reads} reads");
    assert_eq!(
        counters.tokens_issued, 6,
        "one token per kind at the start, one each after the outage: {:?}",
        counters.tokens_by_credential
    );
    // Per credential set: a background fetch of at most three tries, then waits of 1, 2, 4 s...
    assert!(
        counters.token_faults <= 3 * 3 * 4,
        "{} failed token requests in a 6 s outage",
        counters.token_faults
    );
    assert!(counters.token_faults >= 3, "the outage was met");
}

/// A token endpoint that takes seconds to answer delays nobody while the cached token is
/// valid: the refresh runs beside the requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_token_endpoint_delays_no_request_while_the_token_is_valid() {
    let world = World::start(Faults {
        token_lifetime_secs: 8,
        ..Faults::default()
    })
    .await;
    let mailbox = world.mailbox(world.certificate(APP_CERT_PEM, APP_KEY_PEM));
    read(&mailbox).await.expect("first token");
    world.emulator.update_faults(|faults| {
        faults.token_endpoint.delay_ms = 2_000;
    });
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    // Refresh due at 4 s, answered 2 s later; the first token is offered until 7.2 s.
    while started.elapsed() < Duration::from_millis(6_800) {
        let call = Instant::now();
        read(&mailbox).await.expect("read");
        slowest = slowest.max(call.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        slowest < Duration::from_millis(1_500),
        "a request waited {slowest:?} for the slow token endpoint"
    );
    assert_eq!(
        world.emulator.counters().tokens_issued,
        2,
        "refreshed once, in the background"
    );
}

/// A mailbox outside the app's Exchange scope: the error says what to check and that a
/// change takes a while to reach Graph.
#[tokio::test]
async fn access_denied_says_how_to_scope_the_app_and_how_long_it_takes() {
    let world = World::start(Faults::default()).await;
    world
        .emulator
        .set_mailbox_state(MAILBOX, mailpoll_testkit::graph::MailboxState::AccessDenied)
        .expect("state");
    let error = read(&world.mailbox(world.certificate(APP_CERT_PEM, APP_KEY_PEM)))
        .await
        .expect_err("denied");
    assert_eq!(error.reason().as_str(), "AccessDenied");
    let text = error.to_string();
    for needle in [
        "ErrorAccessDenied",
        "Mail.Read",
        "Test-ServicePrincipalAuthorization",
        "Test-ApplicationAccessPolicy",
        "an hour",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
}
