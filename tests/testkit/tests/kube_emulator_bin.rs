//! The `kube-emulator` binary: listens where it is told, writes a kubeconfig that clients can
//! use as is, and stops on SIGINT.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use k8s_openapi::api::core::v1::Namespace;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

#[tokio::test]
async fn the_binary_serves_and_writes_a_working_kubeconfig() {
    mailpoll::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!(
        "kube-emulator-bin-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let kubeconfig = dir.join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kube-emulator"))
        .args(["--listen", "127.0.0.1:0", "--kubeconfig"])
        .arg(&kubeconfig)
        .stdout(Stdio::piped())
        .spawn()
        .expect("kube-emulator starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .expect("reader task")
    .expect("the binary announces its address");
    assert!(
        line.starts_with("kube-emulator listening on http://127.0.0.1:"),
        "{line}"
    );

    let loaded = Kubeconfig::read_from(&kubeconfig).expect("the kubeconfig parses");
    let config = Config::from_custom_kubeconfig(loaded, &KubeConfigOptions::default())
        .await
        .expect("the kubeconfig is usable");
    let client = Client::try_from(config).expect("client");
    let namespaces: Api<Namespace> = Api::all(client);
    let default = namespaces
        .get("default")
        .await
        .expect("the default namespace exists");
    assert_eq!(
        default.status.and_then(|s| s.phase).as_deref(),
        Some("Active")
    );

    let pid = child.id().to_string();
    let signalled = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill runs");
    assert!(signalled.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("waiter task")
        .expect("the binary exits");
    assert!(status.success(), "a clean exit on SIGINT: {status}");
    let _ = std::fs::remove_dir_all(&dir);
}
