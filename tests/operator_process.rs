//! `mailpoll operator` as a real process: it migrates, serves health endpoints and exits
//! cleanly on SIGTERM; two of them elect one leader, and when the leader is killed the other
//! takes over within the lease duration without losing or doubling a scheduled poll.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use mailpoll_testkit::cluster;
use mailpoll_testkit::kube::{FaultEffect, KubeEmulator};
use mailpoll_testkit::pg::{TestDatabase, free_port};
use mailpoll_testkit::wait_for;

/// `mailpoll operator` on `port`, against `db` and the API server of `kubeconfig`; killed
/// when dropped.
fn operator(db: &TestDatabase, kubeconfig: &Path, port: u16) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailpoll"));
    command
        .args(["operator", "--http-addr", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", &db.url)
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::null())
        .kill_on_drop(true);
    command
}

/// A database the operator has not migrated yet, and an API server with the CRD installed.
async fn empty_database_and_cluster() -> (TestDatabase, KubeEmulator) {
    mailpoll::install_crypto_provider();
    let db = TestDatabase::create_empty().await.expect("test database");
    let kube = KubeEmulator::start()
        .await
        .expect("Kubernetes API emulator");
    cluster::install_crd(&kube.client().expect("client"))
        .await
        .expect("CRD installed");
    (db, kube)
}

#[tokio::test]
async fn operator_serves_health_and_stops_on_sigterm() {
    let (db, kube) = empty_database_and_cluster().await;
    let port = free_port().expect("free port");
    let child = operator(&db, kube.kubeconfig_path(), port)
        .env("MAILPOLL_LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mailpoll operator");

    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_for(
        "the operator to be ready",
        Duration::from_secs(10),
        || async {
            let response = http.get(format!("{base}/readyz")).send().await.ok()?;
            response.status().is_success().then_some(())
        },
    )
    .await;
    let health = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert!(health.status().is_success());

    // The schema was applied by the operator itself.
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&db.pool)
        .await
        .expect("operator applied migrations");
    assert!(applied >= 1);

    let pid = child.id().expect("operator pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let output = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("operator exits within 15 s of SIGTERM")
        .expect("operator output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "operator exited with {}: {stderr}",
        output.status
    );
    assert!(
        stderr.contains("SIGTERM received"),
        "shutdown is logged: {stderr}"
    );
    for line in stderr.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
    }
}

#[test]
fn help_describes_every_command() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mailpoll"))
        .arg("--help")
        .output()
        .expect("mailpoll --help");
    let help = String::from_utf8_lossy(&output.stdout);
    for command in ["operator", "crd", "migrate"] {
        assert!(help.contains(command), "--help lists {command}: {help}");
    }
}

#[test]
fn missing_database_url_is_a_clear_error() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mailpoll"))
        .arg("migrate")
        .env_remove("DATABASE_URL")
        .output()
        .expect("mailpoll migrate");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--database-url"), "{stderr}");
}

#[test]
fn crd_command_prints_the_committed_crd() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_mailpoll"))
        .arg("crd")
        .output()
        .expect("mailpoll crd");
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        include_str!("../crds/mailboxpoll.yaml")
    );
}

/// An API server that never answers the first LISTs of MailboxPolls (a stalled connection):
/// the request times out on the operator's side and is retried, so the replica still gets
/// ready, within a minute, instead of waiting for good.
#[tokio::test]
async fn a_list_the_api_server_never_answers_is_retried_and_the_operator_gets_ready() {
    let (db, kube) = empty_database_and_cluster().await;
    // The replica's one watch of MailboxPolls (the directory's, the controller's too) lists
    // first: stall it.
    kube.inject_fault_for(
        "stalled",
        "list",
        "mailboxpolls",
        1,
        FaultEffect::Stall(Duration::from_secs(600)),
    );
    let port = free_port().expect("free port");
    let kubeconfig = kube.kubeconfig_for("stalled").expect("kubeconfig");
    let _child = operator(&db, &kubeconfig, port)
        .env("MAILPOLL_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("start mailpoll operator");

    let http = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let stalled = || {
        kube.unanswered()
            .iter()
            .filter(|u| u.uri.contains("mailboxpolls"))
            .count()
    };
    wait_for(
        "the first LIST to stall",
        Duration::from_secs(20),
        || async { (stalled() > 0).then_some(()) },
    )
    .await;
    wait_for(
        "the operator to give up on the stalled LIST and get ready",
        Duration::from_secs(90),
        || async {
            let response = http.get(&ready).send().await.ok()?;
            response.status().is_success().then_some(())
        },
    )
    .await;
    let lists: Vec<u16> = kube
        .requests()
        .iter()
        .filter(|r| r.verb == "list" && r.resource == "mailboxpolls")
        .map(|r| r.code)
        .collect();
    assert!(
        lists.contains(&200),
        "a retried LIST was answered: {lists:?}"
    );
}
