//! The whole system on one machine, with real processes where it matters: a throwaway
//! Postgres, the Kubernetes API emulator, the Graph emulator, a webhook receiver, and
//! `mailpoll operator` replicas started from the real binary. Used by the `mailpoll-sandbox`
//! binary (README's main command) and by the end-to-end tests, which also kill replicas,
//! restart Postgres and inject Graph faults through it.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::admission;
use crate::cluster;
use crate::credentials::{ServiceAccountIssuer, service_account_subject};
use crate::graph::{
    AppRegistration, DEFAULT_CLIENT_ID, DEFAULT_TENANT, EmulatorConfig, Faults,
    FederatedCredential, GraphEmulator, NewAttachment, NewMessage, TOKEN_EXCHANGE_AUDIENCE,
    default_app,
};
use crate::kube::KubeEmulator;
use crate::pg::tempdir::TempDir;
use crate::pg::{PgServer, free_port};
use crate::pgbouncer::{self, PgBouncer, PoolMode};
use crate::wait::{Patience, try_wait_for};
use crate::webhook_receiver::WebhookReceiver;
use mailpoll::resource::MailboxPoll;

/// The webhook address the files in `examples/` name; the sandbox listens there by default
/// and rewrites it to the receiver's real address when it applies them elsewhere.
pub const EXAMPLES_WEBHOOK_BASE: &str = "http://127.0.0.1:18080";

/// The signing key of the `webhook-signing` Secret in `examples/`: the receiver checks every
/// request's signature with it.
pub const EXAMPLES_SIGNING_SECRET: &str = "whsec_c2FuZGJveC1zaWduaW5nLWtleS1jaGFuZ2UtbWUhIQ==";
/// The Authorization header support-inbox sends, from the `support-webhook-headers` Secret.
pub const EXAMPLES_AUTHORIZATION: &str = "Bearer sandbox-token-change-me";
/// The credential in billing-inbox's webhook URL, from the `billing-webhook` Secret.
pub const EXAMPLES_URL_CREDENTIAL: &str = "sig=sandbox-sig-change-me";

/// Namespace of the leader-election Lease, as a Helm install would have it.
pub const OPERATOR_NAMESPACE: &str = "mailpoll-system";

/// The operator's service account, as the chart names it in a release called `mailpoll`:
/// the subject the emulated app's federated credential trusts.
pub const OPERATOR_SERVICE_ACCOUNT: &str = "mailpoll";

/// What to start.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// The `mailpoll` binary the replicas run.
    pub mailpoll_bin: PathBuf,
    pub replicas: usize,
    /// Where the webhook receiver listens (port 0: a free one).
    pub webhook_listen: SocketAddr,
    /// Mailboxes created in the Graph emulator.
    pub mailboxes: Vec<String>,
    /// Faults the Graph emulator starts with.
    pub graph_faults: Faults,
    /// `MAILPOLL_LOG` of the replicas.
    pub log_level: String,
    /// `MAILPOLL_LOG_FORMAT` of the replicas.
    pub log_format: String,
    /// Leader Lease duration; renew deadline and retry period follow from it.
    pub lease_seconds: f64,
    /// How long a killed replica's tasks stay claimed before another replica takes them.
    pub task_lease_seconds: f64,
    pub worker_concurrency: usize,
    /// How often the replicas' federated token file is replaced, as the kubelet rotates a
    /// projected service account token.
    pub federated_token_rotation: Duration,
    /// A PgBouncer binary (1.21 or later): the replicas then reach Postgres through it in
    /// transaction mode, with `--no-listen`, as behind a managed pooler.
    pub pgbouncer: Option<PathBuf>,
}

impl SandboxOptions {
    pub fn new(mailpoll_bin: impl Into<PathBuf>) -> Self {
        Self {
            mailpoll_bin: mailpoll_bin.into(),
            replicas: 2,
            webhook_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            mailboxes: Vec::new(),
            graph_faults: Faults::default(),
            log_level: "info".into(),
            log_format: "text".into(),
            lease_seconds: 15.0,
            task_lease_seconds: 60.0,
            worker_concurrency: 16,
            federated_token_rotation: Duration::from_secs(60),
            pgbouncer: None,
        }
    }
}

/// One `mailpoll operator` process; its stderr is appended to `log` across restarts.
struct Replica {
    name: String,
    port: u16,
    /// Its admission webhook's TLS listener.
    admission_port: u16,
    log: PathBuf,
    child: Option<Child>,
}

/// Ledger figures of one MailboxPoll.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MailboxProgress {
    pub namespace: String,
    pub name: String,
    pub mailbox: String,
    /// Messages in the ledger, also those moved out of the folder since:
    /// `delivered + pending + failed + skipped`.
    pub recorded: i64,
    /// Every configured step done (the webhook, and the after-actions when there are any).
    pub delivered: i64,
    pub pending: i64,
    pub failed: i64,
    /// Never to be delivered: removed from the folder before delivery, or nothing to do.
    pub skipped: i64,
    /// Of the delivered, those whose after-actions (mark read, move) ran.
    pub actions_done: i64,
}

/// A running sandbox. Dropping it kills the replicas and removes every temporary file;
/// [`Sandbox::shutdown`] stops the replicas gracefully first.
pub struct Sandbox {
    options: SandboxOptions,
    replicas: Vec<Replica>,
    pub receiver: WebhookReceiver,
    pub graph: GraphEmulator,
    pub kube: KubeEmulator,
    pub postgres: PgServer,
    /// The pooler between the replicas and Postgres, when asked for.
    bouncer: Option<PgBouncer>,
    pool: PgPool,
    /// Messages put into each mailbox's inbox through [`Sandbox::add_mail`].
    arrived: Mutex<BTreeMap<String, u64>>,
    /// The workload identity the replicas get, like pods with the webhook's label.
    federated: FederatedIdentity,
    dir: TempDir,
}

/// The replicas' Azure workload identity: a projected service account token file, replaced
/// on a schedule by a task, and every token it held (for the tests' log checks).
struct FederatedIdentity {
    token_file: PathBuf,
    tokens: std::sync::Arc<Mutex<Vec<String>>>,
    rotation: tokio::task::JoinHandle<()>,
}

impl FederatedIdentity {
    /// Trusts the sandbox issuer in the Graph emulator, gives the default app a federated
    /// credential for the operator's service account, writes the first token and starts the
    /// rotation.
    fn start(graph: &GraphEmulator, dir: &Path, every: Duration) -> anyhow::Result<Self> {
        let issuer = ServiceAccountIssuer::sandbox()?;
        let subject = service_account_subject(OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT);
        graph.add_issuer(&issuer.issuer, issuer.public_key());
        graph.add_app(AppRegistration {
            federated_credentials: vec![FederatedCredential {
                issuer: issuer.issuer.clone(),
                subject: subject.clone(),
                audience: TOKEN_EXCHANGE_AUDIENCE.into(),
            }],
            ..default_app()
        });
        let token_file = dir.join("azure-identity-token");
        let lifetime = Duration::from_secs(3600);
        let first = issuer.write_token_file(&token_file, &subject, lifetime)?;
        let tokens = std::sync::Arc::new(Mutex::new(vec![first]));
        let rotation = tokio::spawn({
            let tokens = tokens.clone();
            let path = token_file.clone();
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    match issuer.write_token_file(&path, &subject, lifetime) {
                        Ok(token) => tokens
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(token),
                        Err(error) => tracing::warn!("rotating the token file: {error:#}"),
                    }
                }
            }
        });
        Ok(Self {
            token_file,
            tokens,
            rotation,
        })
    }
}

impl Drop for FederatedIdentity {
    fn drop(&mut self) {
        self.rotation.abort();
    }
}

impl Sandbox {
    /// Starts Postgres, both emulators, the receiver and the replicas, installs the CRD and
    /// waits until every replica is ready.
    pub async fn start(options: SandboxOptions) -> anyhow::Result<Self> {
        if !options.mailpoll_bin.is_file() {
            bail!(
                "the mailpoll binary {} does not exist (build it with `cargo build --bin mailpoll`)",
                options.mailpoll_bin.display()
            );
        }
        let dir = TempDir::new("mailpoll-sandbox").context("creating the sandbox directory")?;
        let postgres = tokio::task::spawn_blocking(PgServer::start)
            .await
            .context("starting Postgres")?
            .context("starting a throwaway Postgres (initdb, pg_ctl)")?;
        let bouncer = match &options.pgbouncer {
            Some(binary) => Some(start_pgbouncer(binary, &postgres)?),
            None => None,
        };
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect_lazy(&postgres.url())
            .context("Postgres URL")?;
        let kube = KubeEmulator::start().await?;
        let client = kube.client()?;
        cluster::install_crd(&client).await?;
        cluster::create_namespace(&client, OPERATOR_NAMESPACE).await?;
        let graph = GraphEmulator::start(EmulatorConfig {
            mailboxes: options.mailboxes.clone(),
            faults: options.graph_faults.clone(),
            ..EmulatorConfig::default()
        })
        .await?;
        let receiver =
            WebhookReceiver::start_on(options.webhook_listen, Some(EXAMPLES_SIGNING_SECRET))
                .await?;
        let arrived = options.mailboxes.iter().map(|m| (m.clone(), 0)).collect();
        let federated =
            FederatedIdentity::start(&graph, dir.path(), options.federated_token_rotation)?;
        let mut sandbox = Self {
            federated,
            replicas: Vec::new(),
            receiver,
            graph,
            kube,
            postgres,
            bouncer,
            pool,
            arrived: Mutex::new(arrived),
            dir,
            options,
        };
        for index in 0..sandbox.options.replicas {
            let name = format!("mailpoll-{}", char::from(b'a' + (index % 26) as u8));
            let log = sandbox.dir.path().join(format!("{name}.log"));
            sandbox.replicas.push(Replica {
                name,
                port: free_port()?,
                admission_port: free_port()?,
                log,
                child: None,
            });
            sandbox.start_replica(index)?;
        }
        for index in 0..sandbox.replicas.len() {
            sandbox.wait_ready(index, Duration::from_secs(60)).await?;
        }
        sandbox.register_admission_webhook().await?;
        Ok(sandbox)
    }

    /// Registers the first replica's admission webhook as the chart registers the Service's
    /// (failurePolicy Ignore), so `kubectl apply` of an invalid spec.filter is refused here too.
    async fn register_admission_webhook(&self) -> anyhow::Result<()> {
        let url = self.admission_url();
        let configuration = admission::webhook_configuration("mailpoll", &url, "Ignore", 5);
        admission::register(&self.kube.client()?, &configuration).await
    }

    /// The admission webhook the API emulator calls: the first replica's.
    pub fn admission_url(&self) -> String {
        format!(
            "https://localhost:{}{}",
            self.replicas[0].admission_port,
            mailpoll::admission::VALIDATE_PATH
        )
    }

    /// The test certificate the replicas' admission listeners serve, written once.
    fn admission_cert(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        admission::write_test_cert(&self.dir.path().join("admission-tls"))
    }

    /// The directory of logs and other temporary files (removed when the sandbox goes).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn kubeconfig_path(&self) -> &Path {
        self.kube.kubeconfig_path()
    }

    /// The sandbox's database, reached directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The sandbox's database, reached directly (for psql).
    pub fn database_url(&self) -> String {
        self.postgres.url()
    }

    /// The replicas' `DATABASE_URL`: through PgBouncer when the sandbox has one.
    pub fn replicas_database_url(&self) -> String {
        match &self.bouncer {
            Some(bouncer) => bouncer.url("postgres", "postgres"),
            None => self.postgres.url(),
        }
    }

    /// The PgBouncer between the replicas and Postgres, as "PgBouncer 1.24 on port N".
    pub fn pooler(&self) -> Option<String> {
        let bouncer = self.bouncer.as_ref()?;
        let binary = self.options.pgbouncer.as_ref()?;
        let (major, minor) = pgbouncer::version(binary).ok()?;
        Some(format!(
            "PgBouncer {major}.{minor} on 127.0.0.1:{}, transaction pooling, replicas with --no-listen",
            bouncer.port()
        ))
    }

    pub fn replica_count(&self) -> usize {
        self.replicas.len()
    }

    pub fn replica_name(&self, index: usize) -> &str {
        &self.replicas[index].name
    }

    /// Every replica's log file.
    pub fn log_paths(&self) -> Vec<PathBuf> {
        self.replicas.iter().map(|r| r.log.clone()).collect()
    }

    /// Starts (or restarts) replica `index` from the mailpoll binary.
    pub fn start_replica(&mut self, index: usize) -> anyhow::Result<()> {
        let (admission_cert, admission_key) = self.admission_cert()?;
        let options = &self.options;
        let notification_port = self.replicas.first().map_or(0, |first| first.port);
        let database_url = self.replicas_database_url();
        let no_listen: &[&str] = if self.bouncer.is_some() {
            &["--no-listen"]
        } else {
            &[]
        };
        let replica = &mut self.replicas[index];
        if replica.child.is_some() {
            bail!("replica {} is already running", replica.name);
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&replica.log)
            .with_context(|| format!("opening {}", replica.log.display()))?;
        let lease = options.lease_seconds;
        // Credentials of its own, so the API emulator's record tells replicas apart.
        let kubeconfig = self.kube.kubeconfig_for(&replica.name)?;
        let child = Command::new(&options.mailpoll_bin)
            .args([
                "operator",
                "--http-addr",
                &format!("127.0.0.1:{}", replica.port),
                "--admission-addr",
                &format!("127.0.0.1:{}", replica.admission_port),
            ])
            .arg("--admission-tls-cert")
            .arg(&admission_cert)
            .arg("--admission-tls-key")
            .arg(&admission_key)
            // Notifications do not pass a pooler in transaction mode.
            .args(no_listen)
            .env("DATABASE_URL", database_url)
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", &replica.name)
            .env("POD_NAMESPACE", OPERATOR_NAMESPACE)
            .env("MAILPOLL_LEASE_DURATION_SECONDS", lease.to_string())
            .env(
                "MAILPOLL_LEASE_RENEW_DEADLINE_SECONDS",
                (lease * 2.0 / 3.0).to_string(),
            )
            .env(
                "MAILPOLL_LEASE_RETRY_PERIOD_SECONDS",
                (lease / 6.0).to_string(),
            )
            .env(
                "MAILPOLL_TASK_LEASE_SECONDS",
                options.task_lease_seconds.to_string(),
            )
            .env(
                "MAILPOLL_WORKER_CONCURRENCY",
                options.worker_concurrency.to_string(),
            )
            .env("MAILPOLL_GRAPH_AUTHORITY_URL", self.graph.base_url())
            .env("MAILPOLL_GRAPH_URL", self.graph.base_url())
            // The sandbox's webhook receiver listens on loopback.
            .env("MAILPOLL_WEBHOOK_ALLOW_LOOPBACK", "true")
            // Graph's change notifications (spec.notifications.enabled) reach the first
            // replica, standing in for the Service every replica is behind.
            .env(
                "MAILPOLL_NOTIFICATION_URL",
                format!("http://127.0.0.1:{notification_port}/notifications"),
            )
            // What the workload identity webhook injects into a labelled pod.
            .env("AZURE_FEDERATED_TOKEN_FILE", &self.federated.token_file)
            .env("AZURE_CLIENT_ID", DEFAULT_CLIENT_ID)
            .env("AZURE_TENANT_ID", DEFAULT_TENANT)
            .env("AZURE_AUTHORITY_HOST", self.graph.base_url())
            .env("MAILPOLL_LOG", &options.log_level)
            .env("MAILPOLL_LOG_FORMAT", &options.log_format)
            .env("MAILPOLL_SHUTDOWN_GRACE_SECONDS", "5")
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                log.try_clone().context("duplicating the log handle")?,
            ))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", options.mailpoll_bin.display()))?;
        replica.child = Some(child);
        Ok(())
    }

    /// Waits until replica `index` answers `/readyz` with 200; fails at once if it exits.
    pub async fn wait_ready(&mut self, index: usize, limit: Duration) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/readyz", self.replicas[index].port);
        let http = reqwest::Client::new();
        let replica = &mut self.replicas[index];
        let what = format!(
            "replica {} to be ready; see {}",
            replica.name,
            replica.log.display()
        );
        let patience = Patience::new(limit).every(Duration::from_millis(100));
        // `Some(Err)` ends the wait early: the replica is gone.
        let waited = try_wait_for(what, patience, || {
            let exited = match replica.child.as_mut().map(|child| child.try_wait()) {
                Some(Ok(Some(status))) => Some(anyhow!(
                    "replica {} exited with {status} before it was ready; see {}",
                    replica.name,
                    replica.log.display()
                )),
                Some(Err(error)) => Some(anyhow::Error::from(error)),
                Some(Ok(None)) | None => None,
            };
            let probe = http.get(&url).send();
            async move {
                if let Ok(response) = probe.await
                    && response.status().is_success()
                {
                    return Some(Ok(()));
                }
                exited.map(Err)
            }
        })
        .await;
        // A replica that never got ready: what it asked the API server, and still waits for.
        let name = self.replicas[index].name.clone();
        waited.map_err(|error| anyhow!("{error:#}\n{}", self.kube.describe_user(&name)))?
    }

    /// `kill -9`: no shutdown code runs, leases and claimed tasks are left behind.
    pub async fn kill_replica(&mut self, index: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.replicas[index].child.take() {
            child.start_kill().context("SIGKILL")?;
            child.wait().await.context("reaping a killed replica")?;
        }
        Ok(())
    }

    /// SIGTERM and wait: the graceful shutdown path.
    pub async fn stop_replica(&mut self, index: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.replicas[index].child.take() {
            if let Some(pid) = child.id() {
                let sent = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .context("sending SIGTERM")?;
                if !sent.success() {
                    bail!("kill -TERM {pid} failed");
                }
            }
            match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
                Ok(status) => {
                    status.context("waiting for a stopped replica")?;
                }
                Err(_) => {
                    child
                        .start_kill()
                        .context("SIGKILL after the grace period")?;
                    child.wait().await.context("reaping a replica")?;
                }
            }
        }
        Ok(())
    }

    /// Restarts Postgres with a fast shutdown: every open connection is cut.
    pub async fn restart_postgres(&self) -> anyhow::Result<()> {
        // PgServer's commands block; the emulators and receiver run on this runtime.
        tokio::task::block_in_place(|| self.postgres.restart())
    }

    /// Puts `count` new messages into `mailbox`'s inbox and counts them as arrived. Every third
    /// one carries a PDF invoice (named in two scripts) and an inline logo, for MailboxPolls
    /// that deliver attachments.
    pub fn add_mail(&self, mailbox: &str, count: usize) -> anyhow::Result<()> {
        for number in 0..count {
            let attachments = if number % 3 == 0 {
                vec![
                    NewAttachment::file(
                        &format!("Rechnung-счёт-{number}.pdf"),
                        "application/pdf",
                        format!("%PDF-1.7\ninvoice {number}\n%%EOF\n").into_bytes(),
                    ),
                    NewAttachment::inline_image(
                        "logo.png",
                        "logo@fabrikam",
                        vec![0x89, b'P', b'N', b'G'],
                    ),
                ]
            } else {
                Vec::new()
            };
            self.graph.add_message(
                mailbox,
                "inbox",
                NewMessage {
                    attachments,
                    ..NewMessage::default()
                },
            )?;
        }
        let mut arrived = self.arrived.lock().unwrap_or_else(|p| p.into_inner());
        *arrived.entry(mailbox.to_owned()).or_default() += count as u64;
        Ok(())
    }

    /// Messages added per mailbox so far.
    pub fn arrived(&self) -> BTreeMap<String, u64> {
        self.arrived
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs kubectl against the emulator.
    pub async fn kubectl(&self, args: &[&str]) -> anyhow::Result<KubectlOutput> {
        self.kubectl_with_input(args, None).await
    }

    /// Runs kubectl with `input` on its stdin (for `apply -f -`).
    pub async fn kubectl_with_input(
        &self,
        args: &[&str],
        input: Option<&str>,
    ) -> anyhow::Result<KubectlOutput> {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", self.kubeconfig_path())
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl (is it installed?)")?;
        if let Some(input) = input
            && let Some(mut stdin) = child.stdin.take()
        {
            stdin.write_all(input.as_bytes()).await?;
            drop(stdin);
        }
        let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .with_context(|| format!("kubectl {} took over a minute", args.join(" ")))??;
        Ok(KubectlOutput {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// The receiver's base URL, to put in place of [`EXAMPLES_WEBHOOK_BASE`].
    pub fn webhook_base(&self) -> String {
        self.receiver
            .url()
            .trim_end_matches("/hook")
            .trim_end_matches('/')
            .to_owned()
    }

    /// `kubectl apply` of every YAML file in `dir` (in name order), with the examples'
    /// webhook address pointed at this sandbox's receiver.
    pub async fn apply_dir(&self, dir: &Path) -> anyhow::Result<()> {
        for file in yaml_files(dir)? {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            self.apply(&text)
                .await
                .with_context(|| format!("applying {}", file.display()))?;
        }
        Ok(())
    }

    /// `kubectl apply -f -` of `manifest`, webhook address rewritten; fails with kubectl's
    /// message when it refuses.
    pub async fn apply(&self, manifest: &str) -> anyhow::Result<String> {
        let manifest = manifest.replace(EXAMPLES_WEBHOOK_BASE, &self.webhook_base());
        let output = self
            .kubectl_with_input(&["apply", "-f", "-"], Some(&manifest))
            .await?;
        if !output.success {
            bail!("kubectl apply failed: {}", output.stderr.trim());
        }
        Ok(output.stdout)
    }

    /// Ledger figures per MailboxPoll that has polled at least once.
    pub async fn progress(&self) -> anyhow::Result<Vec<MailboxProgress>> {
        sqlx::query_as(
            "SELECT c.namespace, c.name, c.mailbox,
                    count(m.message_id) AS recorded,
                    count(m.message_id) FILTER (WHERE m.delivery_state = 'delivered') AS delivered,
                    count(m.message_id) FILTER (WHERE m.delivery_state = 'pending') AS pending,
                    count(m.message_id) FILTER (WHERE m.delivery_state = 'failed') AS failed,
                    count(m.message_id) FILTER (WHERE m.delivery_state IN ('skipped', 'none'))
                        AS skipped,
                    count(m.message_id) FILTER (WHERE m.actions_done_at IS NOT NULL) AS actions_done
               FROM mailbox_cursors c
               LEFT JOIN mailbox_identities i
                      ON i.uid = c.mailbox_uid AND i.mailbox = lower(c.mailbox) AND i.folder = c.folder
               LEFT JOIN messages m ON m.mailbox_uid = COALESCE(i.identity, c.mailbox_uid)
              GROUP BY c.namespace, c.name, c.mailbox
              ORDER BY c.namespace, c.name",
        )
        .fetch_all(&self.pool)
        .await
        .context("reading ledger figures")
    }

    /// One line per MailboxPoll with its conditions (`Ready=True Polling` …), as the leader
    /// wrote them.
    pub async fn conditions(&self) -> anyhow::Result<Vec<String>> {
        let api: kube::Api<MailboxPoll> = kube::Api::all(self.kube.client()?);
        let polls = api.list(&Default::default()).await?;
        Ok(polls
            .items
            .iter()
            .map(|poll| {
                let conditions: Vec<String> = poll
                    .status
                    .iter()
                    .flat_map(|status| &status.conditions)
                    .map(|c| format!("{}={} {}", c.type_, c.status, c.reason))
                    .collect();
                format!(
                    "{}/{}: {}",
                    poll.metadata.namespace.as_deref().unwrap_or_default(),
                    poll.metadata.name.as_deref().unwrap_or_default(),
                    if conditions.is_empty() {
                        "no status yet".to_owned()
                    } else {
                        conditions.join(", ")
                    }
                )
            })
            .collect())
    }

    /// Events of MailboxPolls, oldest first, as `uid: line` (the uid tells them apart).
    pub async fn events(&self) -> anyhow::Result<Vec<(String, String)>> {
        let api: kube::Api<k8s_openapi::api::events::v1::Event> =
            kube::Api::all(self.kube.client()?);
        let mut events = api.list(&Default::default()).await?.items;
        events.sort_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0));
        Ok(events
            .into_iter()
            .map(|event| {
                let object = event
                    .regarding
                    .as_ref()
                    .map(|r| {
                        format!(
                            "{}/{}",
                            r.namespace.as_deref().unwrap_or_default(),
                            r.name.as_deref().unwrap_or_default()
                        )
                    })
                    .unwrap_or_default();
                let line = format!(
                    "Event {} {} {object} ({}): {}",
                    event.type_.as_deref().unwrap_or_default(),
                    event.reason.as_deref().unwrap_or_default(),
                    event.action.as_deref().unwrap_or_default(),
                    event.note.as_deref().unwrap_or_default()
                );
                (event.metadata.uid.unwrap_or_default(), line)
            })
            .collect())
    }

    /// Stops the replicas gracefully; everything else stops when the sandbox is dropped.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for index in 0..self.replicas.len() {
            self.stop_replica(index).await?;
        }
        self.pool.close().await;
        Ok(())
    }

    /// Every service account token the replicas' token file has held so far.
    pub fn federated_tokens(&self) -> Vec<String> {
        self.federated
            .tokens
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Every line the replicas logged so far.
    pub fn logs(&self) -> anyhow::Result<String> {
        let mut all = String::new();
        for path in self.log_paths() {
            if path.exists() {
                all.push_str(
                    &std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?,
                );
            }
        }
        Ok(all)
    }
}

impl Drop for Sandbox {
    /// A failing test keeps the replicas' logs: they are copied out of the directory that is
    /// about to be removed, and the copy's path is printed.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let kept = std::env::temp_dir().join(format!(
            "mailpoll-sandbox-logs-{}",
            uuid::Uuid::new_v4().simple()
        ));
        if std::fs::create_dir_all(&kept).is_err() {
            return;
        }
        for log in self.log_paths() {
            if let Some(name) = log.file_name() {
                let _ = std::fs::copy(&log, kept.join(name));
            }
        }
        eprintln!("the replicas' logs are kept in {}", kept.display());
    }
}

/// What a kubectl run printed.
#[derive(Debug, Clone)]
pub struct KubectlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// The `spec.mailbox` of every MailboxPoll in the YAML files of `dir`: the mailboxes the
/// Graph emulator must have for those manifests to work.
/// PgBouncer in transaction mode in front of `postgres`, refusing a version without prepared
/// statements in transaction pooling (the replicas would fail at their first query).
fn start_pgbouncer(binary: &Path, postgres: &PgServer) -> anyhow::Result<PgBouncer> {
    let version = pgbouncer::version(binary)?;
    if version < pgbouncer::PREPARED_STATEMENTS_SINCE {
        bail!(
            "{} is PgBouncer {}.{}: transaction pooling needs 1.21 or later (scripts/test builds one into target/pgbouncer-*/bin)",
            binary.display(),
            version.0,
            version.1
        );
    }
    PgBouncer::start(
        binary,
        postgres.port(),
        PoolMode::Transaction,
        &["postgres"],
    )
    .context("starting PgBouncer")
}

pub fn mailboxes_in(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut mailboxes = Vec::new();
    for path in yaml_files(dir)? {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        for document in text.split("\n---") {
            if document.trim().is_empty() {
                continue;
            }
            let value: serde_json::Value = serde_saphyr::from_str(document)
                .with_context(|| format!("parsing {}", path.display()))?;
            if value["kind"] == "MailboxPoll"
                && let Some(mailbox) = value["spec"]["mailbox"].as_str()
                && !mailboxes.iter().any(|m| m == mailbox)
            {
                mailboxes.push(mailbox.to_owned());
            }
        }
    }
    Ok(mailboxes)
}

/// The YAML files directly in `dir`, in name order (the order `kubectl apply -f dir` uses).
fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
        })
        .collect();
    files.sort();
    Ok(files)
}
