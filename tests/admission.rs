//! The apply-time check of a MailboxPoll: the operator's admission webhook (its TLS listener
//! with the test certificate) registered in the Kubernetes API emulator as the chart
//! registers it, and the real kubectl applying manifests. An invalid filter is refused with a
//! message naming spec.filter and nothing is stored; with the operator down, `failurePolicy:
//! Ignore` lets the apply through and the reconcile-time condition reports the filter.

use std::path::Path;
use std::time::Duration;

use kube::Client;
use kube::api::Api;
use mailpoll::admission::{AdmissionConfig, VALIDATE_PATH};
use mailpoll::operator::{self, KubeSource, OperatorConfig, OperatorError};
use mailpoll::queue::WorkerId;
use mailpoll::resource::MailboxPoll;
use mailpoll_testkit::admission::{register, webhook_configuration, write_test_cert};
use mailpoll_testkit::cluster;
use mailpoll_testkit::graph::{EmulatorConfig, GraphEmulator};
use mailpoll_testkit::kube::KubeEmulator;
use mailpoll_testkit::pg::tempdir::TempDir;
use mailpoll_testkit::pg::{TestDatabase, free_port};
use mailpoll_testkit::wait_for;
use uuid::Uuid;

const MAILBOX: &str = "support@contoso.com";
const SECRET: &str = "graph-credentials";
const PATIENCE: Duration = Duration::from_secs(30);

struct World {
    db: TestDatabase,
    kube: KubeEmulator,
    graph: GraphEmulator,
    client: Client,
    namespace: String,
    dir: TempDir,
    admission: AdmissionConfig,
    operator: Option<RunningOperator>,
}

/// The operator's task, and the sender whose drop would stop it gracefully.
struct RunningOperator {
    _stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), OperatorError>>,
}

impl World {
    /// Postgres, both emulators, the CRD, a namespace with credentials and the webhook
    /// configuration (failurePolicy Ignore, as the chart installs it); no operator yet.
    async fn new() -> Self {
        mailpoll::install_crypto_provider();
        let db = TestDatabase::create().await.expect("test database");
        let kube = KubeEmulator::start()
            .await
            .expect("Kubernetes API emulator");
        let client = kube.client().expect("client");
        cluster::install_crd(&client).await.expect("CRD");
        let namespace = format!("adm-{}", &Uuid::new_v4().simple().to_string()[..8]);
        cluster::create_namespace(&client, &namespace)
            .await
            .expect("namespace");
        cluster::create_credentials(&client, &namespace, SECRET, cluster::valid_client_secret())
            .await
            .expect("credentials");
        let graph = GraphEmulator::start(EmulatorConfig {
            mailboxes: vec![MAILBOX.into()],
            ..EmulatorConfig::default()
        })
        .await
        .expect("Graph emulator");
        let dir = TempDir::new("admission").expect("temporary directory");
        let (cert, key) = write_test_cert(dir.path()).expect("test certificate");
        let port = free_port().expect("free port");
        let admission = AdmissionConfig {
            addr: format!("127.0.0.1:{port}").parse().expect("address"),
            cert,
            key,
        };
        let url = format!("https://localhost:{port}{VALIDATE_PATH}");
        register(
            &client,
            &webhook_configuration("mailpoll", &url, "Ignore", 5),
        )
        .await
        .expect("webhook configuration");
        Self {
            db,
            kube,
            graph,
            client,
            namespace,
            dir,
            admission,
            operator: None,
        }
    }

    /// Runs the operator, its admission listener included, and waits until it is ready.
    async fn start_operator(&mut self) {
        let http_port = free_port().expect("free port");
        let mut config = OperatorConfig::new(
            self.db.url.clone(),
            format!("127.0.0.1:{http_port}").parse().expect("address"),
            KubeSource::Config(Box::new(self.kube.config().expect("emulator config"))),
        );
        config.admission = Some(self.admission.clone());
        config.pool.max_connections = 8;
        config.workers.worker_id = WorkerId::named("admission-test");
        config.workers.poll_interval = Duration::from_millis(200);
        config.workers.concurrency = 2;
        config.workers.shutdown_grace = Duration::from_secs(2);
        config.lease_namespace = self.namespace.clone();
        config.lease_duration = Duration::from_secs(3);
        config.lease_renew_deadline = Duration::from_secs(2);
        config.lease_retry_period = Duration::from_millis(500);
        config.graph_authority_url = self.graph.base_url();
        config.graph_url = self.graph.base_url();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(operator::run(config, async move {
            let _ = stopped.await;
        }));
        self.operator = Some(RunningOperator { _stop: stop, task });
        let url = format!("http://127.0.0.1:{http_port}/readyz");
        let http = reqwest::Client::new();
        wait_for("the operator to be ready", PATIENCE, || async {
            let response = http.get(&url).send().await.ok()?;
            response.status().is_success().then_some(())
        })
        .await;
    }

    fn api(&self) -> Api<MailboxPoll> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// `kubectl apply -f` of a MailboxPoll with `filter`: success and kubectl's output.
    async fn apply(&self, name: &str, filter: &str) -> (bool, String) {
        let manifest = self.dir.path().join(format!("{name}.yaml"));
        let text = format!(
            "apiVersion: mailpoll.dev/v1alpha1
kind: MailboxPoll
metadata:
  name: {name}
  namespace: {namespace}
spec:
  mailbox: {MAILBOX}
  interval: 1h
  credentialsSecretRef:
    name: {SECRET}
  filter: {filter:?}
",
            namespace = self.namespace
        );
        std::fs::write(&manifest, text).expect("manifest written");
        let manifest = manifest.to_string_lossy();
        self.kubectl(&["apply", "-f", &manifest]).await
    }

    async fn kubectl(&self, args: &[&str]) -> (bool, String) {
        kubectl(self.kube.kubeconfig_path(), self.dir.path(), args).await
    }

    async fn stored_filter(&self, name: &str) -> Option<String> {
        self.api()
            .get_opt(name)
            .await
            .expect("get")
            .and_then(|p| p.spec.filter)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(operator) = self.operator.take() {
            operator.task.abort();
        }
    }
}

async fn kubectl(kubeconfig: &Path, cache: &Path, args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache.join("kubectl-cache"))
        .arg("--request-timeout=20s")
        .args(args)
        .output()
        .await
        .expect("kubectl runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_of_an_invalid_filter_is_refused_naming_the_field() {
    let mut world = World::new().await;
    world.start_operator().await;

    let (applied, output) = world.apply("typo", "mesage.isRead == false").await;
    assert!(!applied, "an invalid filter is refused: {output}");
    // kubectl prints the cause the webhook names, as for the API server's own validation.
    let denied = "The MailboxPoll \"typo\" is invalid: spec.filter: ";
    assert!(output.contains(denied), "{output}");
    assert!(output.contains("mesage"), "{output}");
    assert_eq!(world.stored_filter("typo").await, None, "nothing stored");

    let (applied, output) = world.apply("invoices", "message.hasAttachments").await;
    assert!(applied, "a valid filter is accepted: {output}");
    assert_eq!(
        world.stored_filter("invoices").await.as_deref(),
        Some("message.hasAttachments")
    );

    let (applied, output) = world.apply("invoices", "message.subject + 1 == 2").await;
    assert!(
        !applied,
        "an update to a mistyped filter is refused: {output}"
    );
    assert!(
        output.contains("The MailboxPoll \"invoices\" is invalid: spec.filter: "),
        "{output}"
    );
    assert_eq!(
        world.stored_filter("invoices").await.as_deref(),
        Some("message.hasAttachments"),
        "the valid filter stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_operator_down_the_apply_passes_and_the_condition_reports_the_filter() {
    let mut world = World::new().await;

    let (applied, output) = world.apply("typo", "mesage.isRead == false").await;
    assert!(
        applied,
        "failurePolicy Ignore lets the apply through: {output}"
    );

    world.start_operator().await;
    let api = world.api();
    let message = wait_for("Ready=False InvalidFilter", PATIENCE, || async {
        let status = api.get("typo").await.ok()?.status?;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready")?;
        (ready.status == "False" && ready.reason == "InvalidFilter").then(|| ready.message.clone())
    })
    .await;
    assert!(message.starts_with("spec.filter: "), "{message}");

    // The stored filter does not block edits that leave it as it is.
    let namespace = world.namespace.clone();
    let (labelled, output) = world
        .kubectl(&["label", "mbp", "-n", &namespace, "typo", "team=billing"])
        .await;
    assert!(labelled, "an unrelated edit goes through: {output}");
    let (applied, output) = world.apply("typo", "mesage.isRead").await;
    assert!(
        !applied,
        "a changed, still invalid filter is refused: {output}"
    );
    assert!(
        output.contains("The MailboxPoll \"typo\" is invalid: spec.filter: "),
        "{output}"
    );
}

/// A review of a CREATE of MailboxPoll `mail/inbox` with `filter`.
fn review(filter: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "e911857d-c318-11e8-bbad-025000000001",
            "kind": {"group": "mailpoll.dev", "version": "v1alpha1", "kind": "MailboxPoll"},
            "resource": {"group": "mailpoll.dev", "version": "v1alpha1", "resource": "mailboxpolls"},
            "name": "inbox",
            "namespace": "mail",
            "operation": "CREATE",
            "userInfo": {"username": "admin"},
            "object": {
                "apiVersion": "mailpoll.dev/v1alpha1",
                "kind": "MailboxPoll",
                "metadata": {"name": "inbox", "namespace": "mail"},
                "spec": {"mailbox": MAILBOX, "filter": filter}
            }
        }
    })
}

/// The listener alone, as the API server reaches it: over TLS, a huge body, a malformed one, a
/// client that never finishes its handshake and one that speaks plain HTTP are each refused on
/// their own, and the next review is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_refuses_hostile_requests_one_by_one() {
    mailpoll::install_crypto_provider();
    let dir = TempDir::new("admission-listener").expect("temporary directory");
    let (cert, key) = write_test_cert(dir.path()).expect("test certificate");
    let port = free_port().expect("free port");
    let config = AdmissionConfig {
        addr: format!("127.0.0.1:{port}").parse().expect("address"),
        cert,
        key,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let (addr, _task) = mailpoll::admission::start(&config, stop.clone())
        .await
        .expect("the listener starts");
    let url = format!("https://localhost:{}{VALIDATE_PATH}", addr.port());
    let ca = reqwest::Certificate::from_pem(mailpoll_testkit::admission::TEST_CA_PEM.as_bytes())
        .expect("test CA");
    let http = reqwest::Client::builder()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");

    // Opened and left silent: its handshake never completes.
    let _stalled = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let plain = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}{VALIDATE_PATH}", addr.port()))
        .body("{}")
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP gets no answer: {plain:?}");

    let huge = http
        .post(&url)
        .header("content-type", "application/json")
        .body(vec![b' '; mailpoll::admission::MAX_REVIEW_BYTES + 1])
        .send()
        .await
        .expect("an answer");
    assert_eq!(huge.status(), 413);

    let malformed = http
        .post(&url)
        .header("content-type", "application/json")
        .body("{\"request\": ")
        .send()
        .await
        .expect("an answer");
    assert_eq!(malformed.status(), 400);
    let answer: serde_json::Value = malformed.json().await.expect("an AdmissionReview");
    assert_eq!(answer["response"]["allowed"], false);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("the body is not an AdmissionReview")),
        "{answer}"
    );

    let denied: serde_json::Value = http
        .post(&url)
        .json(&review("message.subject > 3"))
        .send()
        .await
        .expect("an answer")
        .json()
        .await
        .expect("an AdmissionReview");
    let response = &denied["response"];
    assert_eq!(response["uid"], "e911857d-c318-11e8-bbad-025000000001");
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 422);
    assert_eq!(
        response["status"]["details"]["causes"][0]["field"],
        "spec.filter"
    );

    let allowed: serde_json::Value = http
        .post(&url)
        .json(&review("message.importance == 'high'"))
        .send()
        .await
        .expect("an answer")
        .json()
        .await
        .expect("an AdmissionReview");
    assert_eq!(allowed["response"]["allowed"], true, "{allowed}");
    stop.cancel();
}
