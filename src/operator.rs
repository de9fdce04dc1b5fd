//! `mailpoll operator`: the long-running process.
//!
//! Every replica runs the worker pool (poll, deliver and actions tasks), a watch cache of
//! MailboxPolls (the workers' directory; readiness waits for it) and the health endpoints. The
//! replica holding the Lease also runs the controller: scheduling, forced polls, status, Events
//! and the sweep of deleted MailboxPolls.
//!
//! Shutdown (SIGTERM): the controller stops, the Lease is released, the workers drain within
//! the grace period, the HTTP server stops, the database pool closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::controller::{self, LeaderWork};
use crate::delivery::egress::{EgressGuard, GuardedClient};
use crate::directory::{DirectorySettings, KubeDirectory, MailboxPolls, Scope};
use crate::graph::{Governor, GovernorConfig, GraphClient, GraphConfig, GraphError};
use crate::leader::{self, LeaderConfig};
use crate::mailbox_slots::MailboxSlots;
use crate::notifications::{self, NotificationSettings};
use crate::pipeline::actions::ActionsHandler;
use crate::pipeline::deliver::DeliverHandler;
use crate::pipeline::poll::{PollHandler, PollSettings};
use crate::pipeline::{ACTIONS, DELIVER, POLL, run_lease};
use crate::queue::{self, QueueError, WorkerPool, WorkerPoolConfig};
use crate::telemetry::metrics::{KindLabels, Metrics, QueueLabels, SharedMetrics};
use crate::{db, http};

/// Where the Kubernetes client comes from.
#[derive(Clone)]
pub enum KubeSource {
    /// In-cluster configuration, else `KUBECONFIG` / `~/.kube/config`.
    Infer,
    Config(Box<kube::Config>),
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Infer => f.write_str("Infer"),
            Self::Config(config) => write!(f, "Config({})", config.cluster_url),
        }
    }
}

/// Settings of one operator process.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    pub database_url: String,
    pub http_addr: SocketAddr,
    pub pool: db::PoolConfig,
    pub kube: KubeSource,
    /// Namespaces whose MailboxPolls this operator handles.
    pub scope: Scope,
    /// Worker pool settings; `worker_id` is this process's identity in the queue and the Lease.
    pub workers: WorkerPoolConfig,
    pub lease_name: String,
    pub lease_namespace: String,
    pub lease_duration: Duration,
    pub lease_renew_deadline: Duration,
    pub lease_retry_period: Duration,
    pub graph_authority_url: String,
    pub graph_url: String,
    pub governor: GovernorConfig,
    pub poll: PollSettings,
    pub directory: DirectorySettings,
    pub leader_work: LeaderWork,
    /// How often queue depth gauges are refreshed.
    pub metrics_interval: Duration,
    /// Where webhooks may go: enforced by the webhook client, reported by the reconciler.
    pub webhook_egress: EgressGuard,
    /// The validating admission webhook's TLS listener; None serves none.
    pub admission: Option<crate::admission::AdmissionConfig>,
    /// Longest wait for an answer (or the next bytes of one) from the Kubernetes API: a silent
    /// API server (a LIST never answered, a watch that stopped sending) is given up on after
    /// this and the request retried. Longer than the emulator's and the API server's bookmark
    /// interval, so a quiet healthy watch is not cut.
    pub kube_read_timeout: Duration,
    /// Graph change notifications: the public URL and how subscriptions are kept.
    pub notifications: NotificationSettings,
}

impl OperatorConfig {
    /// Production defaults around the given database, address and Kubernetes client.
    pub fn new(database_url: impl Into<String>, http_addr: SocketAddr, kube: KubeSource) -> Self {
        let workers = WorkerPoolConfig {
            // Scheduled polls become due without a notification; an idle pool finds them at
            // its next look, so this bounds the schedule lag.
            poll_interval: Duration::from_millis(500),
            ..WorkerPoolConfig::default()
        };
        let identity = workers.worker_id.to_string();
        Self {
            database_url: database_url.into(),
            http_addr,
            pool: db::PoolConfig::default(),
            kube,
            scope: Scope::All,
            workers,
            lease_name: "mailpoll-leader".into(),
            lease_namespace: "default".into(),
            lease_duration: Duration::from_secs(15),
            lease_renew_deadline: Duration::from_secs(10),
            lease_retry_period: Duration::from_secs(2),
            graph_authority_url: crate::graph::DEFAULT_AUTHORITY.into(),
            graph_url: crate::graph::DEFAULT_GRAPH.into(),
            governor: GovernorConfig::default(),
            poll: PollSettings::default(),
            directory: DirectorySettings::default(),
            leader_work: LeaderWork::new(Scope::All, identity),
            metrics_interval: Duration::from_secs(10),
            webhook_egress: EgressGuard::default(),
            admission: None,
            kube_read_timeout: KUBE_READ_TIMEOUT,
            notifications: NotificationSettings::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("no Kubernetes client configuration (in-cluster or KUBECONFIG): {0}")]
    KubeConfig(#[source] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client: {0}")]
    Kube(#[source] kube::Error),
    #[error("Graph client: {0}")]
    Graph(#[from] GraphError),
    #[error("worker pool: {0}")]
    Workers(#[from] QueueError),
    #[error("admission webhook: {0}")]
    Admission(#[from] crate::admission::tls::TlsError),
}

/// Default of [`OperatorConfig::kube_read_timeout`].
pub const KUBE_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How the operator introduces itself to the Kubernetes API and to webhooks.
pub const USER_AGENT: &str = concat!("mailpoll/", env!("CARGO_PKG_VERSION"));

/// Runs until `shutdown` resolves, then shuts down gracefully and returns.
pub async fn run(
    config: OperatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), OperatorError> {
    let pool = db::connect(&config.database_url, &config.pool).await?;
    db::migrate(&pool).await?;
    tracing::info!("database schema is up to date");
    let client = kube_client(&config).await?;
    let metrics: SharedMetrics = Arc::new(Metrics::new());
    let graph = graph_client(&config, &pool, &metrics)?;

    let stop = CancellationToken::new();
    let sharing = run_lease::share_retry_afters(
        &pool,
        &graph,
        &metrics,
        config.workers.listen,
        stop.child_token(),
    );
    let (directory, watch_synced) = start_directory(&config, &client, &pool, stop.child_token());
    let (notification_routes, notification_processor) = notifications::endpoint::router(
        pool.clone(),
        config.notifications.coalesce,
        stop.child_token(),
    );
    let mut server = Server::start(
        config.http_addr,
        &pool,
        &metrics,
        watch_synced,
        notification_routes,
    )
    .await?;
    if let Some(admission) = &config.admission {
        // Serves until `stop`; it needs neither Postgres nor the API server.
        crate::admission::start(admission, stop.child_token()).await?;
    }
    let workers = start_workers(&config, &pool, &directory, &graph, &metrics)?;
    let leadership = Leadership::start(&config, &pool, &client, &directory, &graph, &metrics);
    let gauges = tokio::spawn(refresh_queue_gauges(
        pool.clone(),
        metrics.clone(),
        config.metrics_interval,
        stop.child_token(),
    ));

    let server_failed = tokio::select! {
        () = shutdown => None,
        result = &mut server.task => Some(result),
    };

    // Scheduling stops first so nothing new is planned while the workers drain.
    leadership.stop().await;
    let report = workers.shutdown().await;
    tracing::info!(
        stopped = report.stopped,
        released = report.released,
        abandoned = report.abandoned,
        "workers drained"
    );
    stop.cancel();
    let _ = gauges.await;
    let _ = notification_processor.await;
    for task in sharing {
        let _ = task.await;
    }
    let served = server.stop(server_failed).await;
    pool.close().await;
    tracing::info!("stopped");
    served
}

/// The Kubernetes client, named in the API server's audit logs.
async fn kube_client(config: &OperatorConfig) -> Result<kube::Client, OperatorError> {
    let mut kube_config = match &config.kube {
        KubeSource::Infer => kube::Config::infer()
            .await
            .map_err(OperatorError::KubeConfig)?,
        KubeSource::Config(kube_config) => (**kube_config).clone(),
    };
    // A request the API server never answers (a stalled initial LIST once kept a replica
    // unready for good) fails after this and is retried; watches end sooner on the server's
    // side (WATCH_TIMEOUT_SECONDS), so a quiet watch is never cut by it.
    kube_config.read_timeout = Some(config.kube_read_timeout);
    kube_config.reset_reader_on_write = true;
    // Names the operator in API server audit logs (and in the emulator's request record).
    kube_config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_static(USER_AGENT),
    ));
    kube::Client::try_from(kube_config).map_err(OperatorError::Kube)
}

/// The workers' directory of MailboxPolls, and the readiness flag it keeps: raised once its
/// watch cache has listed every MailboxPoll, lowered while a watch is stalled (it keeps failing,
/// nothing heard: the API server stopped answering) and raised again when it recovers.
fn start_directory(
    config: &OperatorConfig,
    client: &kube::Client,
    pool: &sqlx::PgPool,
    stop: CancellationToken,
) -> (Arc<KubeDirectory>, Arc<AtomicBool>) {
    let polls = MailboxPolls::start(client, &config.scope, stop.clone());
    let watch_synced = Arc::new(AtomicBool::new(false));
    tokio::spawn(follow_watch_health(
        polls.clone(),
        watch_synced.clone(),
        config.kube_read_timeout * 2,
        stop,
    ));
    let directory = Arc::new(KubeDirectory::new(
        client.clone(),
        pool.clone(),
        polls,
        config.directory.clone(),
    ));
    (directory, watch_synced)
}

/// Keeps `ready` in step with the watch cache: synced, and not stalled over `window`.
async fn follow_watch_health(
    polls: MailboxPolls,
    ready: Arc<AtomicBool>,
    window: Duration,
    stop: CancellationToken,
) {
    tokio::select! {
        () = stop.cancelled() => return,
        () = polls.wait_synced() => {}
    }
    tracing::info!(
        mailbox_polls = polls.len(),
        "MailboxPoll watch cache synced"
    );
    loop {
        let healthy = !polls.is_stalled(window);
        if ready.swap(healthy, Ordering::AcqRel) != healthy {
            if healthy {
                tracing::info!("the MailboxPoll watch answers: ready");
            } else {
                tracing::warn!("the MailboxPoll watch keeps failing without an answer: not ready");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// The HTTP server of `/healthz`, `/readyz`, `/metrics` and the notification endpoint.
struct Server {
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    stop: CancellationToken,
}

impl Server {
    async fn start(
        addr: SocketAddr,
        pool: &sqlx::PgPool,
        metrics: &SharedMetrics,
        watch_synced: Arc<AtomicBool>,
        notification_routes: axum::Router,
    ) -> Result<Self, OperatorError> {
        let listener = http::bind(addr)
            .await
            .map_err(|source| OperatorError::Bind { addr, source })?;
        let local = listener.local_addr().map_err(OperatorError::Serve)?;
        let stop = CancellationToken::new();
        let state = http::HttpState::new(pool.clone(), metrics.clone(), watch_synced);
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                axum::serve(listener, http::router(state).merge(notification_routes))
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
            }
        });
        tracing::info!(
            addr = %local,
            "serving /healthz, /readyz, /metrics and /notifications"
        );
        Ok(Self { task, stop })
    }

    /// Stops serving; `failed` is the server's own end when it ended first.
    async fn stop(
        self,
        failed: Option<Result<std::io::Result<()>, tokio::task::JoinError>>,
    ) -> Result<(), OperatorError> {
        self.stop.cancel();
        let served = match failed {
            Some(result) => result,
            None => self.task.await,
        };
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(OperatorError::Serve(error)),
            Err(join) => Err(OperatorError::Serve(std::io::Error::other(
                join.to_string(),
            ))),
        }
    }
}

/// The leader election and the work only the leader does.
struct Leadership {
    elector: tokio::task::JoinHandle<()>,
    elector_stop: CancellationToken,
    controller: tokio::task::JoinHandle<()>,
    controller_stop: CancellationToken,
    subscriptions: tokio::task::JoinHandle<()>,
}

impl Leadership {
    fn start(
        config: &OperatorConfig,
        pool: &sqlx::PgPool,
        client: &kube::Client,
        directory: &Arc<KubeDirectory>,
        graph: &GraphClient,
        metrics: &SharedMetrics,
    ) -> Self {
        let elector_stop = CancellationToken::new();
        let (leading, elector) = leader::spawn(
            client.clone(),
            LeaderConfig {
                lease_name: config.lease_name.clone(),
                namespace: config.lease_namespace.clone(),
                identity: config.workers.worker_id.to_string(),
                lease_duration: config.lease_duration,
                renew_deadline: config.lease_renew_deadline,
                retry_period: config.lease_retry_period,
            },
            elector_stop.clone(),
        );
        let mut leader_work = config.leader_work.clone();
        leader_work.scope = config.scope.clone();
        leader_work.lease = config.lease_name.clone();
        leader_work.reconcile.egress = config.webhook_egress.clone();
        leader_work.identity = config.workers.worker_id.to_string();
        let controller_stop = CancellationToken::new();
        let subscriptions = tokio::spawn(
            notifications::manager::Manager::new(
                pool.clone(),
                directory.clone(),
                graph.clone(),
                config.notifications.clone(),
            )
            .run(leading.clone(), controller_stop.clone()),
        );
        let controller = tokio::spawn(controller::lead(
            pool.clone(),
            client.clone(),
            directory.clone(),
            metrics.clone(),
            leader_work,
            leading,
            controller_stop.clone(),
        ));
        Self {
            elector,
            elector_stop,
            controller,
            controller_stop,
            subscriptions,
        }
    }

    /// Stops the controller, then releases the Lease.
    async fn stop(self) {
        self.controller_stop.cancel();
        let _ = self.controller.await;
        let _ = self.subscriptions.await;
        self.elector_stop.cancel();
        let _ = self.elector.await;
        tracing::info!("leadership released");
    }
}

/// The Graph client, with its response statuses counted.
fn graph_client(
    config: &OperatorConfig,
    pool: &sqlx::PgPool,
    metrics: &SharedMetrics,
) -> Result<GraphClient, OperatorError> {
    let governor = Governor::new(config.governor.clone());
    // Graph's per-mailbox concurrency cap counts every replica's requests.
    governor.share_slots(Arc::new(MailboxSlots::new(pool.clone())));
    let graph = GraphClient::new(
        GraphConfig::with_urls(&config.graph_authority_url, &config.graph_url)?,
        governor,
    )?;
    {
        let metrics = metrics.clone();
        graph.on_response(move |status, took| metrics.graph_response(status, took));
    }
    Ok(graph)
}

fn start_workers(
    config: &OperatorConfig,
    pool: &sqlx::PgPool,
    directory: &Arc<KubeDirectory>,
    graph: &GraphClient,
    metrics: &SharedMetrics,
) -> Result<queue::RunningPool, OperatorError> {
    let webhook = GuardedClient::new(config.webhook_egress.clone(), USER_AGENT).map_err(|e| {
        OperatorError::Graph(GraphError::Config(format!("webhook HTTP client: {e}")))
    })?;
    Ok(WorkerPool::new(pool.clone(), config.workers.clone())
        .register(
            POLL,
            PollHandler {
                pool: pool.clone(),
                directory: directory.clone(),
                graph: graph.clone(),
                metrics: metrics.clone(),
                settings: config.poll.clone(),
            },
        )
        .register(
            DELIVER,
            DeliverHandler::new(pool.clone(), directory.clone(), webhook, metrics.clone())
                .with_graph(graph.clone()),
        )
        .register(
            ACTIONS,
            ActionsHandler {
                pool: pool.clone(),
                directory: directory.clone(),
                graph: graph.clone(),
                metrics: metrics.clone(),
                run_budget: Duration::from_secs(30),
            },
        )
        .start()?)
}

/// Keeps the queue gauges current on the leader, the one replica that exports them (they
/// describe the shared queue, so a `sum` over replicas must count them once).
async fn refresh_queue_gauges(
    pool: sqlx::PgPool,
    metrics: SharedMetrics,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        // Only the leader reads the depth: the statement counts every live task, about 150 ms
        // with 150,000 of them, too much to spend on figures nobody exports.
        let depth = if metrics.leader.get() == 1 {
            Some(queue::depth(&pool).await)
        } else {
            metrics.queue_tasks.clear();
            metrics.queue_oldest_pending_seconds.clear();
            None
        };
        match depth {
            None => {}
            Some(Ok(depth)) => {
                metrics.queue_tasks.clear();
                metrics.queue_oldest_pending_seconds.clear();
                for row in &depth.rows {
                    metrics
                        .queue_tasks
                        .get_or_create(&QueueLabels {
                            kind: row.kind.clone(),
                            state: row.state.to_string(),
                        })
                        .set(row.tasks);
                    if let Some(age) = row.oldest_due_age {
                        metrics
                            .queue_oldest_pending_seconds
                            .get_or_create(&KindLabels {
                                kind: row.kind.clone(),
                            })
                            .set(age.as_secs_f64());
                    }
                }
            }
            Some(Err(error)) => tracing::debug!(%error, "cannot read the queue depth"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Resolves on SIGTERM (Kubernetes' stop signal) or Ctrl-C.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    // The handlers are installed now, not when the future is first polled: a SIGTERM that
    // arrives while the operator is still starting must not kill it uncleanly.
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            let (mut terminate, mut interrupt) = match (terminate, interrupt) {
                (Ok(terminate), Ok(interrupt)) => (terminate, interrupt),
                (Err(error), _) | (_, Err(error)) => {
                    tracing::error!(%error, "cannot listen for SIGTERM or Ctrl-C");
                    return std::future::pending().await;
                }
            };
            tokio::select! {
                _ = interrupt.recv() => tracing::info!("Ctrl-C received, shutting down"),
                _ = terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("Ctrl-C received, shutting down");
        } else {
            std::future::pending::<()>().await;
        }
    }
}
