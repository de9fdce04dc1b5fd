//! `graph-emulator`: the Microsoft Graph mail emulator as a process, for local runs and for
//! tests that drive the operator binary. Faults, mail and counters go through `/_admin/`.

use std::net::SocketAddr;

use clap::Parser;
use mailpoll_testkit::graph::{
    AppRegistration, EmulatorConfig, Faults, GraphEmulator, default_app,
};

/// Emulates Microsoft Graph mail and Entra's token endpoint on one listener.
#[derive(Debug, Parser)]
#[command(name = "graph-emulator", version)]
struct Cli {
    /// Address to listen on (port 0 picks a free port; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Seed of ids, tokens and injected faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Mailbox (UPN) to create; repeatable.
    #[arg(long = "mailbox")]
    mailboxes: Vec<String>,
    /// Messages to put in the inbox of each created mailbox.
    #[arg(long, default_value_t = 0)]
    messages: usize,
    /// App registration as TENANT:CLIENT_ID:SECRET[:ROLE,ROLE]; repeatable. Without one, the
    /// default app (see the library's DEFAULT_* constants) is registered.
    #[arg(long = "app")]
    apps: Vec<String>,
    /// Access token lifetime in seconds.
    #[arg(long, default_value_t = 3599)]
    token_lifetime: u64,
    /// Serve the admin API under /_admin/.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    admin: bool,
}

fn parse_app(text: &str) -> anyhow::Result<AppRegistration> {
    let mut parts = text.splitn(4, ':');
    let (Some(tenant), Some(client_id), Some(secret)) = (parts.next(), parts.next(), parts.next())
    else {
        anyhow::bail!("--app wants TENANT:CLIENT_ID:SECRET[:ROLES], got {text:?}");
    };
    let roles = parts
        .next()
        .map(|roles| roles.split(',').map(str::to_string).collect())
        .unwrap_or_else(|| vec!["Mail.ReadWrite".to_string()]);
    Ok(AppRegistration {
        tenant: tenant.into(),
        client_id: client_id.into(),
        client_secret: secret.into(),
        roles,
        certificates: Vec::new(),
        federated_credentials: Vec::new(),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go to stderr: stdout carries only the URL, for scripts to read.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let apps = if cli.apps.is_empty() {
        vec![default_app()]
    } else {
        cli.apps
            .iter()
            .map(|app| parse_app(app))
            .collect::<anyhow::Result<_>>()?
    };
    let emulator = GraphEmulator::start(EmulatorConfig {
        listen: cli.listen,
        seed: cli.seed,
        apps,
        mailboxes: cli.mailboxes.clone(),
        faults: Faults {
            token_lifetime_secs: cli.token_lifetime,
            ..Faults::default()
        },
        admin_api: cli.admin,
    })
    .await?;
    for upn in &cli.mailboxes {
        emulator.add_messages(upn, "inbox", cli.messages)?;
    }
    println!("{}", emulator.base_url());
    shutdown_signal().await?;
    emulator.shutdown().await;
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted?,
        _ = terminate.recv() => {}
    }
    Ok(())
}
