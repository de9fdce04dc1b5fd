//! The `mailpoll` command line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use mailpoll::cli::commands::{self, MessagesCommand, TasksCommand};
use mailpoll::delivery::egress::{self, EgressGuard, EgressPolicy};
use mailpoll::directory::{Scope, WorkloadIdentityEnv};
use mailpoll::queue::SlotBudget;
use mailpoll::telemetry::{self, LogFormat};
use mailpoll::{db, identity, operator, resource};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mailpoll: every email that arrives in a Microsoft 365 mailbox, recorded once and delivered
/// once, as a Kubernetes operator with Postgres as its only state.
#[derive(Debug, Parser)]
#[command(name = "mailpoll", version, propagate_version = true)]
struct Cli {
    /// Log line format.
    #[arg(long, env = "MAILPOLL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter in RUST_LOG syntax, e.g. `info,mailpoll=debug`.
    #[arg(long, env = "MAILPOLL_LOG", default_value = "info", global = true)]
    log_filter: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the operator: apply migrations, then serve until SIGTERM.
    Operator(Box<OperatorArgs>),
    /// Print the MailboxPoll CustomResourceDefinition as YAML.
    Crd,
    /// Apply the database migrations and exit (safe to run from several places at once).
    Migrate(DatabaseArgs),
    /// Look at the task queue: list, show, retry and cancel tasks.
    Tasks(TasksArgs),
    /// Look at a MailboxPoll's ledger.
    Messages(MessagesArgs),
    /// Manage MailboxPolls' ledgers.
    #[command(subcommand)]
    Ledger(LedgerCommand),
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Start a MailboxPoll's ledger over: its next poll records (and delivers) every message of
    /// its folder again, under new idempotency keys. Without it, a MailboxPoll deleted and
    /// created again with the same namespace, name, mailbox and folder continues its ledger.
    Forget(ForgetArgs),
}

#[derive(Debug, Args)]
struct ForgetArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[arg(long)]
    namespace: String,
    /// The MailboxPoll's name.
    #[arg(long)]
    name: String,
}

#[derive(Debug, Args)]
struct TasksArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(subcommand)]
    command: TasksCommand,
}

#[derive(Debug, Args)]
struct MessagesArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(subcommand)]
    command: MessagesCommand,
}

#[derive(Debug, Args)]
struct DatabaseArgs {
    /// Postgres URL, e.g. postgres://mailpoll:secret@db:5432/mailpoll?sslmode=require
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Maximum connections in the pool (operator default: worker concurrency + 4, so every
    /// running task can hold one while the queue, the controller and heartbeats still get one).
    #[arg(long, env = "MAILPOLL_DB_MAX_CONNECTIONS")]
    db_max_connections: Option<u32>,
}

#[derive(Debug, Args)]
struct OperatorArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    /// Address of the /healthz, /readyz and /metrics endpoints.
    #[arg(long, env = "MAILPOLL_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Tasks (polls, deliveries, after-actions) this replica runs at once.
    #[arg(long, env = "MAILPOLL_WORKER_CONCURRENCY", default_value_t = 16)]
    worker_concurrency: usize,
    /// Seconds an idle worker pool waits before looking for due tasks again (scheduled
    /// polls are found at the next look; enqueued work wakes it at once).
    #[arg(
        long,
        env = "MAILPOLL_WORKER_POLL_INTERVAL_SECONDS",
        default_value_t = 0.5
    )]
    worker_poll_interval_seconds: f64,
    /// Worker slots only polls may use, so a backlog of deliveries or after-actions never
    /// delays a poll (default: a quarter of the worker concurrency, at least 1).
    #[arg(long, env = "MAILPOLL_RESERVED_POLL_SLOTS")]
    reserved_poll_slots: Option<usize>,
    /// Deliveries of one MailboxPoll running at once across all replicas, unless its
    /// spec.delivery.maxConcurrent says otherwise: a slow receiver holds at most this many
    /// worker slots.
    #[arg(long, env = "MAILPOLL_MAX_CONCURRENT_DELIVERIES", default_value_t = 8,
          value_parser = clap::value_parser!(i32).range(1..=1000))]
    max_concurrent_deliveries: i32,
    /// Never LISTEN: workers and every other listener poll instead. For Postgres behind a
    /// pooler in transaction mode (PgBouncer), which does not deliver notifications.
    #[arg(long, env = "MAILPOLL_NO_LISTEN")]
    no_listen: bool,
    /// Seconds a claimed task stays with a replica that stops heartbeating (a killed pod)
    /// before another replica takes it over. A mailbox's poll run lease is twice this.
    #[arg(long, env = "MAILPOLL_TASK_LEASE_SECONDS", default_value_t = 60.0)]
    task_lease_seconds: f64,
    /// Name of the leader-election Lease.
    #[arg(long, env = "MAILPOLL_LEASE_NAME", default_value = "mailpoll-leader")]
    lease_name: String,
    /// Namespace of the Lease; defaults to POD_NAMESPACE, else `default`.
    #[arg(long, env = "MAILPOLL_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Seconds a Lease nobody renews stays with its holder.
    #[arg(long, env = "MAILPOLL_LEASE_DURATION_SECONDS", default_value_t = 15.0)]
    lease_duration_seconds: f64,
    /// Seconds the leader keeps acting without a successful renewal.
    #[arg(
        long,
        env = "MAILPOLL_LEASE_RENEW_DEADLINE_SECONDS",
        default_value_t = 10.0
    )]
    lease_renew_deadline_seconds: f64,
    /// Seconds between tries to take or renew the Lease.
    #[arg(
        long,
        env = "MAILPOLL_LEASE_RETRY_PERIOD_SECONDS",
        default_value_t = 2.0
    )]
    lease_retry_period_seconds: f64,
    /// Namespaces to watch, comma-separated; empty means all namespaces.
    #[arg(long, env = "MAILPOLL_WATCH_NAMESPACES", default_value = "")]
    watch_namespaces: String,
    /// Seconds running tasks get to finish at shutdown before they are released.
    #[arg(long, env = "MAILPOLL_SHUTDOWN_GRACE_SECONDS", default_value_t = 20.0)]
    shutdown_grace_seconds: f64,
    /// Entra authority (national clouds: https://login.microsoftonline.us, ...); default
    /// AZURE_AUTHORITY_HOST (set by the workload identity webhook), else the public cloud.
    #[arg(long, env = "MAILPOLL_GRAPH_AUTHORITY_URL")]
    graph_authority_url: Option<String>,
    /// Microsoft Graph root (national clouds: https://graph.microsoft.us, ...).
    #[arg(long, env = "MAILPOLL_GRAPH_URL", default_value = mailpoll::graph::DEFAULT_GRAPH)]
    graph_url: String,
    /// Projected service account token for Azure workload identity (set by the workload
    /// identity webhook, or by the chart without it).
    #[arg(long, env = "AZURE_FEDERATED_TOKEN_FILE")]
    workload_identity_token_file: Option<PathBuf>,
    /// Client id for MailboxPolls with spec.workloadIdentity that name none.
    #[arg(long, env = "AZURE_CLIENT_ID")]
    workload_identity_client_id: Option<String>,
    /// Tenant id for MailboxPolls with spec.workloadIdentity that name none.
    #[arg(long, env = "AZURE_TENANT_ID")]
    workload_identity_tenant_id: Option<String>,
    /// Namespaces whose MailboxPolls may use the workload identity, comma-separated; empty
    /// means every watched namespace.
    #[arg(
        long,
        env = "MAILPOLL_WORKLOAD_IDENTITY_NAMESPACES",
        default_value = ""
    )]
    workload_identity_namespaces: String,
    /// Days a message's content (subject, addresses, body, raw object) is kept after it was
    /// recorded; messages still waiting for delivery keep it until they are done.
    #[arg(long, env = "MAILPOLL_CONTENT_RETENTION_DAYS", default_value_t = 30.0)]
    content_retention_days: f64,
    /// Days a ledger row (what keeps a message from being delivered twice) is kept after the
    /// message was received. Older messages the ledger no longer holds are never delivered
    /// again, nor delivered at all if first seen after that (README, "Data retention").
    #[arg(
        long,
        env = "MAILPOLL_IDENTITY_RETENTION_DAYS",
        default_value_t = 180.0
    )]
    identity_retention_days: f64,
    /// Days polls and forced-poll requests are kept (the latest ones status needs stay).
    #[arg(
        long,
        env = "MAILPOLL_POLL_HISTORY_RETENTION_DAYS",
        default_value_t = 30.0
    )]
    poll_history_retention_days: f64,
    /// Days succeeded and cancelled tasks are kept.
    #[arg(
        long,
        env = "MAILPOLL_FINISHED_TASK_RETENTION_DAYS",
        default_value_t = 7.0
    )]
    finished_task_retention_days: f64,
    /// Days dead tasks are kept for `tasks list --state dead` and `tasks retry`.
    #[arg(
        long,
        env = "MAILPOLL_DEAD_TASK_RETENTION_DAYS",
        default_value_t = 30.0
    )]
    dead_task_retention_days: f64,
    /// Seconds between retention rounds (run by the leader).
    #[arg(
        long,
        env = "MAILPOLL_RETENTION_INTERVAL_SECONDS",
        default_value_t = 300.0
    )]
    retention_interval_seconds: f64,
    /// Let webhooks reach loopback addresses (127.0.0.0/8, ::1, and 0.0.0.0/::, which reach
    /// the host too). Off: a MailboxPoll must not make the operator call its own pod.
    #[arg(long, env = "MAILPOLL_WEBHOOK_ALLOW_LOOPBACK")]
    webhook_allow_loopback: bool,
    /// Let webhooks reach link-local addresses (169.254.0.0/16 with the cloud metadata
    /// service, fe80::/10).
    #[arg(long, env = "MAILPOLL_WEBHOOK_ALLOW_LINK_LOCAL")]
    webhook_allow_link_local: bool,
    /// Let a MailboxPoll's webhook reach cluster services of every namespace, not only its own.
    #[arg(long, env = "MAILPOLL_WEBHOOK_ALLOW_OTHER_NAMESPACES")]
    webhook_allow_other_namespaces: bool,
    /// Webhook hosts allowed whatever their namespace or denied range, comma-separated:
    /// `hooks.example.com`, `*.example.com`, `hooks.shared.svc.cluster.local`.
    #[arg(long, env = "MAILPOLL_WEBHOOK_ALLOWED_HOSTS", default_value = "")]
    webhook_allowed_hosts: String,
    /// Address ranges webhooks may always reach, loopback and link-local included,
    /// comma-separated: `10.0.5.0/24,fd00:5::/64`.
    #[arg(long, env = "MAILPOLL_WEBHOOK_ALLOWED_CIDRS", default_value = "")]
    webhook_allowed_cidrs: String,
    /// Address ranges webhooks may not reach, except through an allowed host or a service
    /// name of the MailboxPoll's own namespace, comma-separated (for example the cluster's
    /// pod and service ranges: `10.244.0.0/16,10.96.0.0/12`).
    #[arg(long, env = "MAILPOLL_WEBHOOK_DENIED_CIDRS", default_value = "")]
    webhook_denied_cidrs: String,
    /// The cluster's DNS domain, which tells service names (`<service>.<namespace>.svc.<domain>`)
    /// apart from other names.
    #[arg(long, env = "MAILPOLL_CLUSTER_DOMAIN", default_value = egress::DEFAULT_CLUSTER_DOMAIN)]
    cluster_domain: String,
    /// Address of the validating admission webhook's TLS listener (`POST /validate-mailboxpoll`,
    /// which checks spec.filter and spec.startFrom at apply time); unset serves none.
    #[arg(long, env = "MAILPOLL_ADMISSION_ADDR", requires_all = ["admission_tls_cert", "admission_tls_key"])]
    admission_addr: Option<SocketAddr>,
    /// PEM certificate chain of the admission listener; read again when the file changes.
    #[arg(long, env = "MAILPOLL_ADMISSION_TLS_CERT")]
    admission_tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of the admission listener; read again when the file changes.
    #[arg(long, env = "MAILPOLL_ADMISSION_TLS_KEY")]
    admission_tls_key: Option<std::path::PathBuf>,
    /// Public HTTPS URL at which Microsoft Graph reaches this operator's notification
    /// endpoint (`https://mailpoll.example.com/notifications`, served on --http-addr under
    /// /notifications). Without it, MailboxPolls asking for notifications are polled only.
    #[arg(long, env = "MAILPOLL_NOTIFICATION_URL")]
    notification_url: Option<String>,
    /// Lifetime asked for each Graph subscription, in minutes (Graph's maximum for Outlook
    /// messages is 10080); renewed once half of it has passed.
    #[arg(
        long,
        env = "MAILPOLL_SUBSCRIPTION_LIFETIME_MINUTES",
        default_value_t = 10_000.0
    )]
    subscription_lifetime_minutes: f64,
}

/// A duration flag in days; rejects what a Duration cannot hold.
fn days(name: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value * 86_400.0)
        .map_err(|_| anyhow::anyhow!("--{name} must be a non-negative number of days, not {value}"))
}

/// A duration flag in seconds; rejects what a Duration cannot hold.
/// Polls' reserved slots: a quarter of the handlers unless given (none with a single handler);
/// at least one other slot stays for deliveries and after-actions.
fn worker_budgets(
    concurrency: usize,
    reserved_poll_slots: Option<usize>,
) -> anyhow::Result<HashMap<String, SlotBudget>> {
    let quarter = (concurrency / 4).max(1);
    let default = if quarter < concurrency { quarter } else { 0 };
    let reserved = reserved_poll_slots.unwrap_or(default);
    if reserved >= concurrency {
        anyhow::bail!(
            "--reserved-poll-slots ({reserved}) must be less than --worker-concurrency ({concurrency}): deliveries and after-actions need a slot too"
        );
    }
    Ok(HashMap::from([(
        mailpoll::pipeline::POLL.to_owned(),
        SlotBudget {
            reserved,
            max: None,
        },
    )]))
}

fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        anyhow::anyhow!("--{name} must be a non-negative number of seconds, not {value}")
    })
}

impl OperatorArgs {
    /// The public notification URL: absolute, http(s), no credentials.
    fn notification_url(&self) -> anyhow::Result<Option<reqwest::Url>> {
        let Some(text) = self.notification_url.as_deref().filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        let url = reqwest::Url::parse(text)
            .map_err(|e| anyhow::anyhow!("--notification-url is not a URL: {e}"))?;
        if !matches!(url.scheme(), "https" | "http") || !url.username().is_empty() {
            anyhow::bail!("--notification-url must be an https:// URL without credentials");
        }
        Ok(Some(url))
    }

    fn config(self) -> anyhow::Result<operator::OperatorConfig> {
        let mut config = operator::OperatorConfig::new(
            self.database.database_url.clone(),
            self.http_addr,
            operator::KubeSource::Infer,
        );
        let worker_connections = u32::try_from(self.worker_concurrency).unwrap_or(u32::MAX);
        config.pool = self
            .database
            .pool_config(worker_connections.saturating_add(4));
        config.scope = Scope::parse(&self.watch_namespaces);
        config.webhook_egress = EgressGuard::new(self.egress_policy()?);
        config.admission = self.admission_config();
        config.notifications.public_url = self.notification_url()?;
        let lifetime = seconds(
            "subscription-lifetime-minutes",
            self.subscription_lifetime_minutes * 60.0,
        )?;
        if !(Duration::from_secs(60)..=Duration::from_secs(10_080 * 60)).contains(&lifetime) {
            anyhow::bail!("--subscription-lifetime-minutes must be between 1 and 10080");
        }
        config.notifications.lifetime = lifetime;
        config.workers.concurrency = self.worker_concurrency.max(1);
        config.workers.budgets =
            worker_budgets(config.workers.concurrency, self.reserved_poll_slots)?;
        config.workers.owner_caps = HashMap::from([(
            mailpoll::pipeline::DELIVER.to_owned(),
            self.max_concurrent_deliveries,
        )]);
        if self.no_listen {
            db::disable_listening();
            config.workers.listen = false;
        }
        config.workers.poll_interval = seconds(
            "worker-poll-interval-seconds",
            self.worker_poll_interval_seconds,
        )?
        .max(Duration::from_millis(10));
        let task_lease = seconds("task-lease-seconds", self.task_lease_seconds)?;
        if task_lease < Duration::from_secs(2) {
            anyhow::bail!("--task-lease-seconds must be at least 2, not {task_lease:?}");
        }
        config.workers.lease = task_lease;
        // Three heartbeats per lease: one lost heartbeat never costs a running task.
        config.workers.heartbeat_interval = task_lease / 3;
        config.workers.rescue_interval = config.workers.rescue_interval.min(task_lease / 2);
        config.poll.run_lease = task_lease * 2;
        config.workers.shutdown_grace =
            seconds("shutdown-grace-seconds", self.shutdown_grace_seconds)?;
        let retention = &mut config.leader_work.retention;
        retention.content = days("content-retention-days", self.content_retention_days)?;
        retention.identity = days("identity-retention-days", self.identity_retention_days)?;
        retention.poll_history = days(
            "poll-history-retention-days",
            self.poll_history_retention_days,
        )?;
        retention.dead_tasks = days("dead-task-retention-days", self.dead_task_retention_days)?;
        retention.interval = seconds(
            "retention-interval-seconds",
            self.retention_interval_seconds,
        )?
        .max(Duration::from_secs(1));
        config.workers.retention = days(
            "finished-task-retention-days",
            self.finished_task_retention_days,
        )?;
        config.lease_name = self.lease_name;
        config.lease_namespace = self
            .lease_namespace
            .filter(|ns| !ns.is_empty())
            .or_else(|| {
                std::env::var("POD_NAMESPACE")
                    .ok()
                    .filter(|ns| !ns.is_empty())
            })
            .unwrap_or_else(|| "default".into());
        config.lease_duration = seconds("lease-duration-seconds", self.lease_duration_seconds)?;
        config.lease_renew_deadline = seconds(
            "lease-renew-deadline-seconds",
            self.lease_renew_deadline_seconds,
        )?;
        config.lease_retry_period = seconds(
            "lease-retry-period-seconds",
            self.lease_retry_period_seconds,
        )?;
        if config.lease_renew_deadline >= config.lease_duration
            || config.lease_retry_period >= config.lease_renew_deadline
        {
            anyhow::bail!(
                "lease settings must satisfy retry period < renew deadline < lease duration"
            );
        }
        config.graph_authority_url = self
            .graph_authority_url
            .or_else(|| std::env::var("AZURE_AUTHORITY_HOST").ok())
            .filter(|url| !url.trim().is_empty())
            .unwrap_or_else(|| mailpoll::graph::DEFAULT_AUTHORITY.into());
        config.graph_url = self.graph_url;
        let non_empty = |value: Option<String>| value.filter(|v| !v.trim().is_empty());
        config.directory.workload_identity = WorkloadIdentityEnv {
            token_file: self
                .workload_identity_token_file
                .filter(|path| !path.as_os_str().is_empty()),
            client_id: non_empty(self.workload_identity_client_id),
            tenant_id: non_empty(self.workload_identity_tenant_id),
            namespaces: Scope::parse(&self.workload_identity_namespaces),
        };
        Ok(config)
    }

    fn admission_config(&self) -> Option<mailpoll::admission::AdmissionConfig> {
        Some(mailpoll::admission::AdmissionConfig {
            addr: self.admission_addr?,
            cert: self.admission_tls_cert.clone()?,
            key: self.admission_tls_key.clone()?,
        })
    }

    fn egress_policy(&self) -> anyhow::Result<EgressPolicy> {
        let cluster_domain = self
            .cluster_domain
            .trim()
            .trim_matches('.')
            .to_ascii_lowercase();
        if cluster_domain.is_empty() {
            anyhow::bail!("--cluster-domain must not be empty");
        }
        Ok(EgressPolicy {
            allow_loopback: self.webhook_allow_loopback,
            allow_link_local: self.webhook_allow_link_local,
            allow_other_namespaces: self.webhook_allow_other_namespaces,
            allowed_hosts: egress::parse_list(&self.webhook_allowed_hosts)
                .map_err(|e| anyhow::anyhow!("--webhook-allowed-hosts: {e}"))?,
            allowed_cidrs: egress::parse_list(&self.webhook_allowed_cidrs)
                .map_err(|e| anyhow::anyhow!("--webhook-allowed-cidrs: {e}"))?,
            denied_cidrs: egress::parse_list(&self.webhook_denied_cidrs)
                .map_err(|e| anyhow::anyhow!("--webhook-denied-cidrs: {e}"))?,
            cluster_domain,
        })
    }
}

impl DatabaseArgs {
    fn pool_config(&self, default_size: u32) -> db::PoolConfig {
        db::PoolConfig {
            max_connections: self.db_max_connections.unwrap_or(default_size).max(1),
            ..db::PoolConfig::default()
        }
    }
}

/// One-shot commands need a connection, not a pool sized for the operator.
fn cli_pool_config() -> db::PoolConfig {
    db::PoolConfig {
        max_connections: 1,
        application_name: "mailpoll-cli".into(),
        ..db::PoolConfig::default()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = telemetry::init(cli.log_format, &cli.log_filter) {
        eprintln!("error: {error}");
        return ExitCode::from(2);
    }
    mailpoll::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "mailpoll failed");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Crd => {
            print!("{}", resource::crd_yaml()?);
            Ok(())
        }
        Command::Migrate(args) => {
            let pool = db::connect(&args.database_url, &args.pool_config(2)).await?;
            db::migrate(&pool).await?;
            tracing::info!("migrations applied");
            pool.close().await;
            Ok(())
        }
        Command::Tasks(args) => {
            let pool = db::connect(&args.database.database_url, &cli_pool_config()).await?;
            let result = commands::tasks(&pool, args.command).await;
            pool.close().await;
            print!("{}", result?);
            Ok(())
        }
        Command::Messages(args) => {
            let pool = db::connect(&args.database.database_url, &cli_pool_config()).await?;
            let result = commands::messages(&pool, args.command).await;
            pool.close().await;
            print!("{}", result?);
            Ok(())
        }
        Command::Ledger(LedgerCommand::Forget(args)) => {
            let pool = db::connect(&args.database.database_url, &cli_pool_config()).await?;
            let forgotten = identity::forget(&pool, &args.namespace, &args.name).await?;
            println!(
                "{}/{}: {forgotten} ledger identit{} forgotten; its next poll starts a new ledger \
                 (running operators notice within a minute)",
                args.namespace,
                args.name,
                if forgotten == 1 { "y" } else { "ies" }
            );
            pool.close().await;
            Ok(())
        }
        Command::Operator(args) => {
            let config = (*args).config()?;
            operator::run(config, operator::shutdown_signal()).await?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn polls_keep_a_quarter_of_the_slots_unless_told_otherwise() {
        let reserved = |concurrency, given| {
            worker_budgets(concurrency, given)
                .map(|budgets| budgets[mailpoll::pipeline::POLL].reserved)
                .map_err(|error| error.to_string())
        };
        assert_eq!(reserved(16, None), Ok(4));
        assert_eq!(reserved(2, None), Ok(1));
        assert_eq!(
            reserved(1, None),
            Ok(0),
            "a single handler reserves nothing"
        );
        assert_eq!(reserved(16, Some(0)), Ok(0));
        assert_eq!(reserved(16, Some(15)), Ok(15));
        let refused = reserved(16, Some(16)).expect_err("no slot left for deliveries");
        assert!(refused.contains("--reserved-poll-slots (16) must be less than"));
    }

    #[test]
    fn the_command_line_is_consistent() {
        // clap's own checks (conflicting names, a global argument that is required, ...),
        // which otherwise only fire when someone runs the command.
        Cli::command().debug_assert();
    }

    fn operator_args(extra: &[&str]) -> OperatorArgs {
        let mut argv = vec![
            "mailpoll",
            "operator",
            "--database-url",
            "postgres://db/mailpoll",
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).map(|cli| cli.command) {
            Ok(Command::Operator(args)) => *args,
            other => panic!("expected operator arguments, got {other:?}"),
        }
    }

    #[test]
    fn webhook_egress_flags_make_the_policy() {
        let strict = operator_args(&[]).egress_policy().expect("default policy");
        assert_eq!(strict, EgressPolicy::default());
        let open = operator_args(&[
            "--webhook-allow-loopback",
            "--webhook-allowed-hosts",
            "hooks.example.com, *.tools.svc",
            "--webhook-allowed-cidrs",
            "10.0.5.0/24",
            "--webhook-denied-cidrs",
            "10.96.0.0/12,10.244.0.0/16",
            "--cluster-domain",
            "Corp.Internal.",
        ])
        .egress_policy()
        .expect("policy");
        assert!(open.allow_loopback && !open.allow_link_local && !open.allow_other_namespaces);
        assert_eq!(open.allowed_hosts.len(), 2);
        assert_eq!(open.allowed_cidrs.len(), 1);
        assert_eq!(open.denied_cidrs.len(), 2);
        assert_eq!(open.cluster_domain, "corp.internal");
        let bad = operator_args(&["--webhook-denied-cidrs", "pods"]).egress_policy();
        assert_eq!(
            bad.map_err(|e| e.to_string()).expect_err("not a range"),
            "--webhook-denied-cidrs: \"pods\" is not an address range such as 10.0.0.0/8 or fd00::/8"
        );
    }
}
