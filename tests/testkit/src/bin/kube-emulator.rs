//! Runs the Kubernetes API emulator for a local sandbox:
//!
//! ```text
//! kube-emulator --listen 127.0.0.1:6443 --kubeconfig /tmp/emulator.kubeconfig
//! kubectl --kubeconfig /tmp/emulator.kubeconfig apply -f crds/mailboxpoll.yaml
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mailpoll_testkit::kube::{Options, kubeconfig_yaml, serve};

/// A Kubernetes API server emulator on plain HTTP.
#[derive(Parser)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: String,
    /// Where to write a kubeconfig pointing at the emulator.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Changes kept for watches to resume from.
    #[arg(long, default_value_t = 10_000)]
    history: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 10)]
    bookmark_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Admission webhooks are called over https.
    mailpoll::install_crypto_provider();
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("listener address")?;
    let url = format!("http://{addr}");
    if let Some(path) = &args.kubeconfig {
        std::fs::write(path, kubeconfig_yaml(&url))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("kube-emulator listening on {url}");
    let options = Options {
        history_limit: args.history,
        bookmark_interval: Duration::from_secs(args.bookmark_seconds.max(1)),
        ..Options::default()
    };
    serve(listener, options, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}
