//! The `graph-emulator` binary: starts with mailboxes and mail, prints its URL, serves the
//! token endpoint, Graph and the admin API.

use std::process::Stdio;

use mailpoll_testkit::graph::{DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn the_binary_serves_graph_and_the_admin_api() {
    mailpoll::install_crypto_provider();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_graph-emulator"))
        .args([
            "--mailbox",
            "ops@contoso.com",
            "--messages",
            "3",
            "--seed",
            "9",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start graph-emulator");
    let stdout = child.stdout.take().expect("stdout");
    let base = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        BufReader::new(stdout).lines().next_line(),
    )
    .await
    .expect("the emulator prints its URL within 30 s")
    .expect("read stdout")
    .expect("a URL line");
    assert!(base.starts_with("http://127.0.0.1:"), "{base}");

    let http = reqwest::Client::new();
    let token: Value = http
        .post(format!("{base}/{DEFAULT_TENANT}/oauth2/v2.0/token"))
        .form(&[
            ("client_id", DEFAULT_CLIENT_ID),
            ("client_secret", DEFAULT_CLIENT_SECRET),
            ("scope", "https://graph.microsoft.com/.default"),
            ("grant_type", "client_credentials"),
        ])
        .send()
        .await
        .expect("token request")
        .json()
        .await
        .expect("token JSON");
    let access_token = token["access_token"].as_str().expect("access token");
    let page: Value = http
        .get(format!(
            "{base}/v1.0/users/ops@contoso.com/mailFolders/inbox/messages/delta"
        ))
        .bearer_auth(access_token)
        .send()
        .await
        .expect("delta request")
        .json()
        .await
        .expect("delta JSON");
    assert_eq!(page["value"].as_array().expect("value").len(), 3);
    let counters: Value = http
        .get(format!("{base}/_admin/counters"))
        .send()
        .await
        .expect("counters")
        .json()
        .await
        .expect("counters JSON");
    assert_eq!(counters["tokenRequests"], 1);
    assert_eq!(counters["mailboxes"]["ops@contoso.com"]["requests"], 1);

    let pid = child.id().expect("pid");
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .expect("send SIGTERM");
    assert!(status.success());
    let exit = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
        .await
        .expect("the emulator exits on SIGTERM")
        .expect("wait");
    assert!(exit.success(), "{exit:?}");
}
