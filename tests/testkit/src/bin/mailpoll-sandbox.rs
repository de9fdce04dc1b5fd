//! `mailpoll-sandbox`: mailpoll working end to end on one machine, offline, with no Microsoft
//! 365 tenant and no cluster. Started by `scripts/sandbox` (README's main command).
//!
//! It starts a throwaway Postgres, the Kubernetes API emulator, the Graph emulator (the
//! mailboxes the examples name, a few messages each, then a steady trickle of new mail), a
//! webhook receiver that verifies signatures, and two `mailpoll operator` replicas as real
//! processes; applies `examples/`; prints how to use kubectl against it; then shows a progress
//! line per MailboxPoll whenever its figures change, until Ctrl-C.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use mailpoll_testkit::sandbox::{self, MailboxProgress, Sandbox, SandboxOptions};
use rand::RngExt;
use tokio::signal::unix::{Signal, SignalKind, signal};

#[derive(Debug, Parser)]
#[command(name = "mailpoll-sandbox", version)]
struct Cli {
    /// The mailpoll binary the replicas run (default: `mailpoll` beside this program).
    #[arg(long)]
    mailpoll_bin: Option<PathBuf>,
    /// Manifests applied with kubectl once everything runs.
    #[arg(long, default_value = "examples")]
    examples: PathBuf,
    /// Port of the webhook receiver; the examples send to 127.0.0.1:18080.
    #[arg(long, default_value_t = 18080)]
    webhook_port: u16,
    /// Operator replicas (real processes; one leads, all run workers).
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// Messages in each mailbox before the operators start.
    #[arg(long, default_value_t = 5)]
    initial_messages: usize,
    /// Seconds between two new messages (each into a random mailbox); 0 stops the trickle.
    #[arg(long, default_value_t = 3.0)]
    trickle_seconds: f64,
    /// Log level of the replicas (their logs go to files in the sandbox directory).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Put this PgBouncer (1.21 or later) between the replicas and Postgres, in transaction
    /// mode, as a managed pooler would be; the replicas then run with --no-listen.
    #[arg(long)]
    pgbouncer: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    mailpoll::install_crypto_provider();
    let cli = Cli::parse();
    let began = Instant::now();
    // Installed first: Ctrl-C during start-up must still stop Postgres and the replicas.
    let mut stop = StopSignal::install()?;

    let mailpoll_bin = match cli.mailpoll_bin {
        Some(path) => path,
        None => std::env::current_exe()
            .context("locating this program")?
            .with_file_name("mailpoll"),
    };
    let mailboxes = sandbox::mailboxes_in(&cli.examples)?;
    anyhow::ensure!(
        !mailboxes.is_empty(),
        "no MailboxPoll in {}",
        cli.examples.display()
    );

    println!(
        "Starting Postgres, the Kubernetes API and Graph emulators, a webhook receiver and {} operator replicas...",
        cli.replicas
    );
    let mut options = SandboxOptions::new(mailpoll_bin);
    options.replicas = cli.replicas.max(1);
    options.webhook_listen = ([127, 0, 0, 1], cli.webhook_port).into();
    options.mailboxes = mailboxes.clone();
    options.log_level = cli.log_level;
    options.pgbouncer = cli.pgbouncer;
    let starting = async {
        let sandbox = Sandbox::start(options).await?;
        for mailbox in &mailboxes {
            sandbox.add_mail(mailbox, cli.initial_messages)?;
        }
        sandbox.apply_dir(&cli.examples).await?;
        anyhow::Ok(sandbox)
    };
    let sandbox = tokio::select! {
        started = starting => started?,
        _ = stop.recv() => {
            println!("Interrupted while starting; everything started so far is stopped.");
            return Ok(());
        }
    };
    println!("Ready after {:.1} s.", began.elapsed().as_secs_f64());
    print_usage(&sandbox, &cli.examples);

    let result = watch(&sandbox, &mailboxes, cli.trickle_seconds, began, &mut stop).await;
    println!(
        "\nStopping the replicas and removing {}...",
        sandbox.dir().display()
    );
    sandbox.shutdown().await?;
    result
}

fn print_usage(sandbox: &Sandbox, examples: &std::path::Path) {
    let kubeconfig = sandbox.kubeconfig_path().display();
    let logs: Vec<String> = sandbox
        .log_paths()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    println!(
        "\n\
         kubeconfig:   {kubeconfig}\n\
         database:     {db}{pooler}\n\
         webhook:      {hook}\n\
         operator logs: {logs}\n\
         \n\
         Try, in another shell:\n  \
           export KUBECONFIG={kubeconfig}\n  \
           kubectl get mbp -A\n  \
           kubectl describe mbp -n mail support-inbox\n  \
           kubectl annotate mbp -n mail newsletter-inbox mailpoll.dev/poll-requested-at=\"$(date +%s)\" --overwrite\n  \
           kubectl get events -n mail\n  \
           kubectl get lease -n {ns}\n  \
           psql {db} -c 'SELECT subject, delivery_state FROM messages ORDER BY seq DESC LIMIT 5'\n\
         Hazards to try:\n  \
           curl -X POST {graph}/_admin/mailboxes/support@contoso.com/evict-delta   # a resync: ResyncStarted, nothing delivered twice\n  \
           kubectl delete -f {examples}/20-shared-inbox.yaml && kubectl apply -f {examples}/20-shared-inbox.yaml   # same ledger, same keys\n  \
           kubectl patch mbp -n mail support-inbox --type merge -p '{{\"spec\":{{\"filter\":\"mesage.isRead\"}}}}'   # refused by the admission webhook ({admission}), naming spec.filter\n  \
           curl -X PUT {graph}/_admin/faults -H 'content-type: application/json' -d '{{\"throttleRatio\":0.3,\"retryAfterFormat\":\"missing\"}}'\n  \
           curl -X PUT {graph}/_admin/faults -H 'content-type: application/json' -d '{{\"tokenLifetimeSecs\":60,\"tokenEndpoint\":{{\"failRatio\":1.0}}}}'   # the token endpoint down: polls go on with cached tokens until they expire\n  \
           curl -X PUT {graph}/_admin/faults -H 'content-type: application/json' -d '{{\"tokenEndpoint\":{{\"wrongCertificate\":true}}}}'   # at orders-inbox's next token: AuthenticationFailed with a hint\n\
         Credentials: support and billing use a client secret, orders a certificate, invoices workload identity (kubectl describe mbp -n mail orders-inbox).\n\
         Manifests applied from {examples}. Progress below (Ctrl-C stops everything):\n",
        db = sandbox.database_url(),
        pooler = sandbox
            .pooler()
            .map(|pooler| format!(
                " (the replicas go through {pooler}: {})",
                sandbox.replicas_database_url()
            ))
            .unwrap_or_default(),
        hook = sandbox.receiver.url(),
        admission = sandbox.admission_url(),
        logs = logs.join(", "),
        ns = sandbox::OPERATOR_NAMESPACE,
        examples = examples.display(),
        graph = sandbox.graph.base_url(),
    );
}

/// SIGINT (Ctrl-C) or SIGTERM. The handlers live as long as this value, so a signal that
/// arrives while the program is busy elsewhere is kept until the next `recv`.
struct StopSignal {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignal {
    fn install() -> anyhow::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// Adds mail on schedule and prints a line per MailboxPoll when its figures change.
async fn watch(
    sandbox: &Sandbox,
    mailboxes: &[String],
    trickle_seconds: f64,
    began: Instant,
    stop: &mut StopSignal,
) -> anyhow::Result<()> {
    let trickle = (trickle_seconds > 0.0).then(|| Duration::from_secs_f64(trickle_seconds));
    let mut next_mail = trickle.map(|every| tokio::time::Instant::now() + every);
    let mut last_lines: Vec<String> = Vec::new();
    let mut seen_events = std::collections::HashSet::new();
    let mut first_delivery_shown = false;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.recv() => return Ok(()),
            _ = tick.tick() => {}
        }
        if let (Some(at), Some(every)) = (next_mail, trickle)
            && tokio::time::Instant::now() >= at
        {
            let index = rand::rng().random_range(0..mailboxes.len());
            sandbox.add_mail(&mailboxes[index], 1)?;
            next_mail = Some(at + every);
        }
        if !first_delivery_shown && !sandbox.receiver.successes().is_empty() {
            first_delivery_shown = true;
            println!(
                "First webhook delivery {:.1} s after start.",
                began.elapsed().as_secs_f64()
            );
        }
        // Postgres may be briefly away (a restart); the next tick tries again.
        let Ok(progress) = sandbox.progress().await else {
            continue;
        };
        let mut lines = progress_lines(&sandbox.arrived(), &progress);
        // The API server may be briefly away too; conditions and Events show when it answers.
        lines.extend(sandbox.conditions().await.unwrap_or_default());
        for (index, line) in lines.iter().enumerate() {
            if last_lines.get(index) != Some(line) {
                println!("[{:>5.0}s] {line}", began.elapsed().as_secs_f64());
            }
        }
        last_lines = lines;
        for (uid, line) in sandbox.events().await.unwrap_or_default() {
            if seen_events.insert(uid) {
                println!("[{:>5.0}s] {line}", began.elapsed().as_secs_f64());
            }
        }
    }
}

/// One line per mailbox: what arrived in Graph, and where the ledger's messages stand, in
/// columns that add up (recorded = delivered + pending + failed + skipped).
fn progress_lines(
    arrived: &std::collections::BTreeMap<String, u64>,
    progress: &[MailboxProgress],
) -> Vec<String> {
    arrived
        .iter()
        .map(|(mailbox, arrived)| {
            let polls: Vec<&MailboxProgress> =
                progress.iter().filter(|p| &p.mailbox == mailbox).collect();
            if polls.is_empty() {
                return format!("{mailbox:<24} arrived {arrived:>5}   (not polled yet)");
            }
            polls
                .iter()
                .map(|p| {
                    format!(
                        "{mailbox:<24} arrived {arrived:>5}   recorded {:>5} = delivered {:>5} + pending {:>4} + failed {:>3} + skipped {:>3}   actions done {:>5}   ({}/{})",
                        p.recorded, p.delivered, p.pending, p.failed, p.skipped, p.actions_done, p.namespace, p.name
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect()
}
