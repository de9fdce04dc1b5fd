//! A Kubernetes API server emulator, faithful enough for kube-runtime controllers, Lease leader
//! election and plain kubectl: discovery, CRDs, server-set metadata, selectors, paging,
//! watches with resume/410/bookmarks/streaming lists, merge/JSON/apply patches with managed
//! fields, validation against the CRD schema and CEL rules, Table output, and a record of every
//! request. Plain HTTP on loopback.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let emulator = mailpoll_testkit::kube::KubeEmulator::start().await?;
//! let client = emulator.client()?;
//! // kubectl --kubeconfig <emulator.kubeconfig_path()> get ns
//! # Ok(()) }
//! ```

pub mod admission;
pub mod builtin;
pub mod crd;
pub mod discovery;
pub mod patch;
pub mod record;
pub mod resource;
pub mod select;
pub mod server;
pub mod status;
pub mod store;
pub mod table;
pub mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

pub use record::RequestRecord;
use server::Shared;
pub use server::{Fault, FaultEffect, Options, Unanswered};
pub use status::ApiError;

/// A running emulator; stops when dropped.
pub struct KubeEmulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    dir: PathBuf,
    kubeconfig: PathBuf,
}

/// A kubeconfig naming the emulator at `url` as its only cluster and current context.
pub fn kubeconfig_yaml(url: &str) -> String {
    kubeconfig_yaml_for(url, None)
}

/// A kubeconfig for the emulator at `url` whose user sends `token` as its bearer token.
pub fn kubeconfig_yaml_for(url: &str, token: Option<&str>) -> String {
    let user = token.map_or_else(|| "{}".to_owned(), |token| format!("{{token: {token}}}"));
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kube-emulator
  cluster:
    server: {url}
users:
- name: kube-emulator
  user: {user}
contexts:
- name: kube-emulator
  context:
    cluster: kube-emulator
    user: kube-emulator
    namespace: default
current-context: kube-emulator
"
    )
}

/// Serves the emulator on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    options: Options,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr().context("listener address")?;
    let shared = Arc::new(Shared::new(options, addr.to_string()));
    let stop = shared.clone();
    axum::serve(listener, server::router(shared))
        .with_graceful_shutdown(async move {
            shutdown.await;
            stop.shutdown.send_replace(true);
        })
        .await
        .context("serving the Kubernetes API emulator")
}

impl KubeEmulator {
    /// Starts on 127.0.0.1 on a free port with default options.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the Kubernetes API emulator to 127.0.0.1")?;
        let addr = listener.local_addr().context("listener address")?;
        let shared = Arc::new(Shared::new(options, addr.to_string()));
        let app = server::router(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "the Kubernetes API emulator stopped");
            }
        });
        let dir =
            std::env::temp_dir().join(format!("kube-emulator-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(&format!("http://{addr}")))
            .with_context(|| format!("writing {}", kubeconfig.display()))?;
        Ok(Self {
            shared,
            addr,
            task,
            dir,
            kubeconfig,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client configuration for the emulator, default namespace `default`.
    pub fn config(&self) -> anyhow::Result<kube::Config> {
        let url = self.url().parse().context("emulator URL")?;
        Ok(kube::Config::new(url))
    }

    /// A client for the emulator. Install the crypto provider first
    /// (`mailpoll::install_crypto_provider()`).
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        kube::Client::try_from(self.config()?).context("building a client for the emulator")
    }

    /// A kubeconfig file for kubectl and other clients; removed when the emulator drops.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig whose requests carry `user` as their bearer token, so the request record
    /// and injected faults can tell clients apart (every user may do everything).
    pub fn kubeconfig_for(&self, user: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("kubeconfig-{user}"));
        std::fs::write(&path, kubeconfig_yaml_for(&self.url(), Some(user)))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// A client whose requests carry `user` as their bearer token.
    pub fn client_as(&self, user: &str) -> anyhow::Result<kube::Client> {
        let mut config = self.config()?;
        config.auth_info.token = Some(user.to_owned().into());
        kube::Client::try_from(config).context("building a client for the emulator")
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.records()
    }

    /// Requests received and not answered yet (a watch counts as answered once its stream
    /// started), oldest first.
    pub fn unanswered(&self) -> Vec<Unanswered> {
        self.shared.unanswered()
    }

    /// A few lines on what `user` asked for lately and what it still waits for, for the
    /// failure message of a client that seems stuck.
    pub fn describe_user(&self, user: &str) -> String {
        let now = std::time::Instant::now();
        let mut lines: Vec<String> = self
            .requests()
            .iter()
            .filter(|r| r.user.as_deref() == Some(user))
            .rev()
            .take(8)
            .map(|r| {
                format!(
                    "  answered {:.1} s ago: {} {} {}",
                    now.duration_since(r.answered_at).as_secs_f64(),
                    r.verb,
                    r.path,
                    r.code
                )
            })
            .collect();
        lines.reverse();
        lines.extend(
            self.unanswered()
                .into_iter()
                .filter(|u| u.user.as_deref() == Some(user))
                .map(|u| {
                    format!(
                        "  unanswered for {:.1} s: {} {}",
                        now.duration_since(u.arrived_at).as_secs_f64(),
                        u.method,
                        u.uri
                    )
                }),
        );
        if lines.is_empty() {
            return format!("the Kubernetes API emulator has no request from {user}");
        }
        format!(
            "{user}'s latest Kubernetes API requests:\n{}",
            lines.join("\n")
        )
    }

    pub fn clear_requests(&self) {
        self.shared.clear_records();
    }

    /// Registers a CustomResourceDefinition directly (as `kubectl apply -f crd.yaml` would),
    /// so its resources are served at once; e.g. `install_crd(&MailboxPoll::crd())`.
    pub fn install_crd(
        &self,
        crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    ) -> anyhow::Result<()> {
        let mut object = serde_json::to_value(crd).context("serializing the CRD")?;
        object["apiVersion"] = serde_json::json!("apiextensions.k8s.io/v1");
        object["kind"] = serde_json::json!("CustomResourceDefinition");
        {
            let mut store = self.shared.lock_store();
            let rt = store
                .lookup("apiextensions.k8s.io", "v1", "customresourcedefinitions")
                .context("CRDs are built in")?;
            let ctx = store::WriteContext {
                manager: "kube-emulator".into(),
                field_validation: store::FieldValidation::Strict,
                dry_run: false,
            };
            store
                .create(&rt, "", object, &ctx)
                .map_err(|e| anyhow::anyhow!("installing the CRD: {e}"))?;
        }
        self.shared.notify_changed();
        Ok(())
    }

    /// Makes the next `times` requests with this RBAC verb (`update`, `patch`, `watch`, ...; None
    /// for any) on this resource (`leases`; None for any) fail with `code` and a Status body.
    pub fn inject_failure(
        &self,
        verb: Option<&str>,
        resource: Option<&str>,
        times: usize,
        code: u16,
    ) {
        self.shared.add_fault(Fault {
            verb: verb.map(str::to_owned),
            resource: resource.map(str::to_owned),
            user: None,
            times,
            effect: FaultEffect::Fail(ApiError::with_code(
                code,
                format!("injected failure ({code})"),
            )),
        });
    }

    /// Injects a fault on the requests of one user only (see [`Self::kubeconfig_for`]), e.g.
    /// the Lease renewals of one replica.
    pub fn inject_fault_for(
        &self,
        user: &str,
        verb: &str,
        resource: &str,
        times: usize,
        effect: FaultEffect,
    ) {
        self.shared.add_fault(Fault {
            verb: Some(verb.to_owned()),
            resource: Some(resource.to_owned()),
            user: Some(user.to_owned()),
            times,
            effect,
        });
    }

    /// Makes the next `times` requests with this RBAC verb (None for any) on this resource
    /// (None for any) meet `effect`, whoever sends them; e.g. a LIST that is never answered:
    /// `FaultEffect::Stall` with a long hold.
    pub fn inject_fault(
        &self,
        verb: Option<&str>,
        resource: Option<&str>,
        times: usize,
        effect: FaultEffect,
    ) {
        self.shared.add_fault(Fault {
            verb: verb.map(str::to_owned),
            resource: resource.map(str::to_owned),
            user: None,
            times,
            effect,
        });
    }

    /// Silences every watch, open and new (`true`) or lets new ones work again (`false`): a
    /// silenced watch keeps its connection open and sends nothing, no event and no bookmark,
    /// and does not end at its timeout; only its client can end it. An API server that stopped
    /// sending, as a partition or an overloaded server looks to a client.
    pub fn silence_watches(&self, silent: bool) {
        self.shared.silent.send_replace(silent);
    }

    /// Watches open now (their streams started and not ended).
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches()
    }

    /// Removes every injected fault not yet spent.
    pub fn clear_faults(&self) {
        self.shared.clear_faults();
    }

    /// Forgets the change history: a watch or continue token from an older resourceVersion
    /// gets 410 Expired, as after an etcd compaction.
    pub fn compact_history(&self) {
        self.shared.lock_store().compact();
    }

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock_store().resource_version()
    }
}

impl Drop for KubeEmulator {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
