//! Validating admission webhooks in the Kubernetes API emulator: the webhook a
//! ValidatingWebhookConfiguration names is called over https for the creates and updates its
//! rules match, and its answer, its silence or its slowness decide the write as in
//! kube-apiserver (denial Status, failurePolicy, timeoutSeconds).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use mailpoll::admission::tls::{ReloadingCert, TlsListener, server_config};
use mailpoll::resource::MailboxPoll;
use mailpoll_testkit::admission::{register, webhook_configuration, write_test_cert};
use mailpoll_testkit::cluster;
use mailpoll_testkit::kube::KubeEmulator;
use mailpoll_testkit::pg::free_port;
use mailpoll_testkit::pg::tempdir::TempDir;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const NAMESPACE: &str = "mail";

/// What the scripted webhook answers.
#[derive(Clone)]
enum Script {
    Allow,
    Deny {
        code: u16,
        message: &'static str,
    },
    /// Answers (allowing) only after this long.
    Slow(Duration),
}

/// A webhook over TLS with the test certificate, recording every review it receives.
struct ScriptedWebhook {
    url: String,
    reviews: Arc<Mutex<Vec<Value>>>,
    stop: CancellationToken,
    _dir: TempDir,
}

impl Drop for ScriptedWebhook {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

type Shared = (Script, Arc<Mutex<Vec<Value>>>);

async fn answer(State((script, reviews)): State<Shared>, Json(review): Json<Value>) -> Json<Value> {
    let uid = review["request"]["uid"].clone();
    reviews
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(review);
    let response = match script {
        Script::Allow => json!({"uid": uid, "allowed": true}),
        Script::Deny { code, message } => json!({
            "uid": uid,
            "allowed": false,
            "status": {"code": code, "message": message}
        }),
        Script::Slow(delay) => {
            tokio::time::sleep(delay).await;
            json!({"uid": uid, "allowed": true})
        }
    };
    Json(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response
    }))
}

impl ScriptedWebhook {
    async fn start(script: Script) -> Self {
        let dir = TempDir::new("scripted-webhook").expect("temporary directory");
        let (cert, key) = write_test_cert(dir.path()).expect("test certificate written");
        let resolver = ReloadingCert::load(cert, key).expect("test certificate loads");
        let stop = CancellationToken::new();
        let listener = TlsListener::bind(
            "127.0.0.1:0".parse().expect("address"),
            server_config(resolver).expect("TLS configuration"),
            stop.clone(),
        )
        .await
        .expect("webhook listener");
        let port = axum::serve::Listener::local_addr(&listener)
            .expect("local address")
            .port();
        let reviews = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/validate", axum::routing::post(answer))
            .with_state((script, reviews.clone()));
        tokio::spawn({
            let stop = stop.clone();
            async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
            }
        });
        Self {
            url: format!("https://localhost:{port}/validate"),
            reviews,
            stop,
            _dir: dir,
        }
    }

    fn reviews(&self) -> Vec<Value> {
        self.reviews
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// The emulator with the CRD, namespace [`NAMESPACE`] and a webhook configuration for `url`.
async fn cluster_with_webhook(url: &str, policy: &str, timeout: u32) -> (KubeEmulator, Client) {
    mailpoll::install_crypto_provider();
    let emulator = KubeEmulator::start().await.expect("emulator");
    let client = emulator.client().expect("client");
    cluster::install_crd(&client).await.expect("CRD");
    cluster::create_namespace(&client, NAMESPACE)
        .await
        .expect("namespace");
    register(
        &client,
        &webhook_configuration("mailpoll", url, policy, timeout),
    )
    .await
    .expect("webhook configuration registered");
    (emulator, client)
}

fn poll(name: &str) -> MailboxPoll {
    cluster::mailbox_poll(name, "support@contoso.com", "1h", "graph-credentials")
}

fn api_error(error: kube::Error) -> kube::core::Status {
    match error {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn a_denial_is_the_request_error_with_the_webhook_code_and_nothing_is_stored() {
    let hook = ScriptedWebhook::start(Script::Deny {
        code: 0,
        message: "no mail on Sundays",
    })
    .await;
    let (_emulator, client) = cluster_with_webhook(&hook.url, "Fail", 5).await;
    let api: Api<MailboxPoll> = Api::namespaced(client, NAMESPACE);
    let status = api_error(
        api.create(&PostParams::default(), &poll("inbox"))
            .await
            .expect_err("the webhook denies"),
    );
    assert_eq!(status.code, 403, "no code from the webhook means 403");
    assert_eq!(status.reason, "Forbidden");
    assert_eq!(
        status.message,
        "mailboxpolls.mailpoll.dev \"inbox\" is forbidden: admission webhook \
         \"mailboxpolls.mailpoll.dev\" denied the request: no mail on Sundays"
    );
    assert!(api.get_opt("inbox").await.expect("get").is_none());
    let reviews = hook.reviews();
    assert_eq!(reviews.len(), 1);
    let request = &reviews[0]["request"];
    assert_eq!(request["operation"], "CREATE");
    assert_eq!(request["namespace"], NAMESPACE);
    assert_eq!(request["name"], "inbox");
    assert_eq!(request["resource"]["resource"], "mailboxpolls");
    assert_eq!(request["object"]["spec"]["mailbox"], "support@contoso.com");
    assert!(request["oldObject"].is_null());
}

#[tokio::test]
async fn a_denial_keeps_the_code_the_webhook_gives() {
    let hook = ScriptedWebhook::start(Script::Deny {
        code: 422,
        message: "spec.filter: bad",
    })
    .await;
    let (_emulator, client) = cluster_with_webhook(&hook.url, "Fail", 5).await;
    let api: Api<MailboxPoll> = Api::namespaced(client, NAMESPACE);
    let status = api_error(
        api.create(&PostParams::default(), &poll("inbox"))
            .await
            .expect_err("the webhook denies"),
    );
    assert_eq!(status.code, 422);
    assert_eq!(status.reason, "Invalid");
    assert!(
        status
            .message
            .ends_with("denied the request: spec.filter: bad"),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn allowed_writes_are_stored_and_status_writes_are_never_reviewed() {
    let hook = ScriptedWebhook::start(Script::Allow).await;
    let (_emulator, client) = cluster_with_webhook(&hook.url, "Fail", 5).await;
    let api: Api<MailboxPoll> = Api::namespaced(client, NAMESPACE);
    api.create(&PostParams::default(), &poll("inbox"))
        .await
        .expect("allowed create");
    api.patch(
        "inbox",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"interval": "2h"}})),
    )
    .await
    .expect("allowed update");
    api.patch_status(
        "inbox",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"observedGeneration": 2}})),
    )
    .await
    .expect("status write");
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    api.create(&dry_run, &poll("trial"))
        .await
        .expect("allowed dry run");
    assert!(api.get_opt("trial").await.expect("get").is_none());
    let reviews = hook.reviews();
    let operations: Vec<(&str, bool)> = reviews
        .iter()
        .map(|r| {
            (
                r["request"]["operation"].as_str().unwrap_or_default(),
                r["request"]["dryRun"].as_bool().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        operations,
        [("CREATE", false), ("UPDATE", false), ("CREATE", true)]
    );
    let update = &reviews[1]["request"];
    assert_eq!(update["object"]["spec"]["interval"], "2h");
    assert_eq!(update["oldObject"]["spec"]["interval"], "1h");
    let stored = api.get("inbox").await.expect("stored");
    assert_eq!(stored.spec.interval, "2h");
}

#[tokio::test]
async fn an_unreachable_webhook_fails_the_write_or_is_ignored_by_its_failure_policy() {
    let port = free_port().expect("a port nothing listens on");
    let url = format!("https://localhost:{port}/validate");
    let (_emulator, client) = cluster_with_webhook(&url, "Fail", 2).await;
    let api: Api<MailboxPoll> = Api::namespaced(client, NAMESPACE);
    let status = api_error(
        api.create(&PostParams::default(), &poll("inbox"))
            .await
            .expect_err("Fail refuses"),
    );
    assert_eq!(status.code, 500);
    assert!(
        status
            .message
            .contains("failed calling webhook \"mailboxpolls.mailpoll.dev\""),
        "{}",
        status.message
    );
    assert!(api.get_opt("inbox").await.expect("get").is_none());

    let (_emulator, client) = cluster_with_webhook(&url, "Ignore", 2).await;
    let api: Api<MailboxPoll> = Api::namespaced(client, NAMESPACE);
    api.create(&PostParams::default(), &poll("inbox"))
        .await
        .expect("Ignore lets the write through");
}

#[tokio::test]
async fn a_webhook_slower_than_its_timeout_counts_as_unreachable() {
    let hook = ScriptedWebhook::start(Script::Slow(Duration::from_secs(3))).await;
    let (_emulator, client) = cluster_with_webhook(&hook.url, "Fail", 1).await;
    let api: Api<MailboxPoll> = Api::namespaced(client, NAMESPACE);
    let status = api_error(
        api.create(&PostParams::default(), &poll("inbox"))
            .await
            .expect_err("timed out"),
    );
    assert_eq!(status.code, 500, "{}", status.message);
    assert!(api.get_opt("inbox").await.expect("get").is_none());

    let (_emulator, client) = cluster_with_webhook(&hook.url, "Ignore", 1).await;
    let api: Api<MailboxPoll> = Api::namespaced(client, NAMESPACE);
    api.create(&PostParams::default(), &poll("inbox"))
        .await
        .expect("Ignore lets the write through");
    assert_eq!(hook.reviews().len(), 2, "each write asked once");
}
