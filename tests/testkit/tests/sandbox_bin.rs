//! The `mailpoll-sandbox` binary (README's main command): from start to the first webhook
//! delivery within 30 s, progress lines, and on Ctrl-C (SIGINT) a clean exit that removes
//! its files and leaves no process behind.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

/// The workspace builds `mailpoll` beside this package's binaries.
fn mailpoll_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mailpoll-sandbox")).with_file_name("mailpoll")
}

#[tokio::test]
async fn the_sandbox_delivers_within_30_seconds_and_cleans_up_on_ctrl_c() {
    let mailpoll = mailpoll_bin();
    assert!(
        mailpoll.is_file(),
        "{} is missing: run the workspace's tests (`cargo nextest run --workspace`)",
        mailpoll.display()
    );
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailpoll-sandbox"))
        .arg("--mailpoll-bin")
        .arg(&mailpoll)
        .arg("--examples")
        .arg(&examples)
        .args(["--webhook-port", "0", "--trickle-seconds", "0.5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start mailpoll-sandbox");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let mut sandbox_dir = None;
    let mut kubeconfig = None;
    let mut progress_lines = 0;
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some(logs) = line.strip_prefix("operator logs: ") {
                let first = logs.split(", ").next().unwrap_or_default();
                sandbox_dir = PathBuf::from(first).parent().map(PathBuf::from);
            }
            if let Some(path) = line.strip_prefix("kubeconfig:") {
                kubeconfig = Some(PathBuf::from(path.trim()));
            }
            if line.contains("support@contoso.com") && line.contains("delivered") {
                progress_lines += 1;
            }
            let done = progress_lines > 0
                && seen
                    .iter()
                    .any(|l: &String| l.starts_with("First webhook delivery"));
            seen.push(line);
            if done {
                return;
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "no delivery and progress line within 30 s of start; output so far:\n{}",
        seen.join("\n")
    );
    let text = seen.join("\n");
    for expected in ["kubeconfig:", "kubectl get mbp -A", "kubectl annotate mbp"] {
        assert!(
            text.contains(expected),
            "the sandbox prints {expected:?}:\n{text}"
        );
    }
    let sandbox_dir = sandbox_dir.expect("the sandbox names its log directory");
    assert!(sandbox_dir.is_dir());
    let kubeconfig = kubeconfig.expect("the sandbox prints its kubeconfig path");
    assert!(kubeconfig.is_file());

    let pid = child.id().expect("pid").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill -INT");
    assert!(sent.success());
    let drain = async {
        while let Ok(Some(_)) = lines.next_line().await {}
        child.wait().await
    };
    let status = tokio::time::timeout(Duration::from_secs(60), drain)
        .await
        .expect("the sandbox stops within 60 s of Ctrl-C")
        .expect("exit status");
    assert!(status.success(), "the sandbox exited with {status}");
    assert!(
        !sandbox_dir.exists(),
        "{} is left behind",
        sandbox_dir.display()
    );
    assert!(
        !kubeconfig.exists(),
        "{} is left behind",
        kubeconfig.display()
    );
    // The sandbox's replicas are the only processes with its kubeconfig in their environment.
    let needle = format!("KUBECONFIG={}", kubeconfig.display());
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&environ).contains(&needle),
            "process {} of the sandbox is still running",
            entry.file_name().to_string_lossy()
        );
    }
}
