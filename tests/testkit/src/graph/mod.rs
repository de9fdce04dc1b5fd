//! An emulator of the Microsoft Graph mail API and of Entra's token endpoint, faithful to
//! `graph.md`: delta and list paging, ids that change on move, throttling, mailbox states and
//! injected faults, all switchable while requests run, with counters for assertions.
//!
//! One listener serves both hosts: the authority (`/{tenant}/oauth2/v2.0/token`) and Graph
//! (`/v1.0/...`), plus, when enabled, the admin API under `/_admin/`.

mod admin;
pub mod assertion;
pub mod attachments;
pub mod faults;
pub mod query;
mod routes;
pub mod state;
pub mod subscriptions;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::{Context, anyhow};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;
use tokio::sync::oneshot;

pub use assertion::{FederatedCredential, TOKEN_EXCHANGE_AUDIENCE};
pub use attachments::{AttachmentKind, NewAttachment};
pub use faults::{
    BatchFaults, Budget, CONTROL_CHARS, Counters, EarlyRequest, Faults, HUGE_RETRY_AFTER_SECS,
    MailboxCounters, MalformedKind, RetryAfterFormat, TokenEndpointFaults,
};
pub use state::{
    AppRegistration, EvictionResponse, MailboxState, MessageIds, NewMessage, WELL_KNOWN_FOLDERS,
};

/// Tenant of the app registered by default.
pub const DEFAULT_TENANT: &str = "11111111-2222-3333-4444-555555555555";
/// Client id of the app registered by default.
pub const DEFAULT_CLIENT_ID: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
/// Client secret of the app registered by default.
pub const DEFAULT_CLIENT_SECRET: &str = "emulator~secret.value";

/// The app registered by default: may read and write mail.
pub fn default_app() -> AppRegistration {
    AppRegistration {
        tenant: DEFAULT_TENANT.into(),
        client_id: DEFAULT_CLIENT_ID.into(),
        client_secret: DEFAULT_CLIENT_SECRET.into(),
        roles: vec!["Mail.ReadWrite".into()],
        certificates: vec![crate::credentials::APP_CERT_PEM.into()],
        federated_credentials: Vec::new(),
    }
}

/// How the emulator starts.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Address to listen on; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Seeds ids, tokens, request ids and every injected fault.
    pub seed: u64,
    pub apps: Vec<AppRegistration>,
    /// Mailboxes (UPNs) created at start.
    pub mailboxes: Vec<String>,
    pub faults: Faults,
    /// Serve the admin API under `/_admin/`.
    pub admin_api: bool,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            seed: 1,
            apps: vec![default_app()],
            mailboxes: Vec::new(),
            faults: Faults::default(),
            admin_api: false,
        }
    }
}

/// Request-side state: in-flight counts, budgets, counters and the fault generator.
pub(crate) struct Traffic {
    started: Instant,
    in_flight: HashMap<String, usize>,
    budgets: HashMap<String, (Instant, u32)>,
    /// Per mailbox: the end of the last Retry-After it was given.
    throttled_until: HashMap<String, Instant>,
    counters: Counters,
    rng: StdRng,
}

/// What the handle, the routes and the admin API share.
pub(crate) struct Shared {
    world: Mutex<state::World>,
    faults: Mutex<Faults>,
    traffic: Mutex<Traffic>,
    base_url: String,
    admin_api: bool,
    /// Change-notification subscriptions, their switches and the emulator clock.
    subscriptions: Mutex<subscriptions::Registry>,
    /// Client of the validation calls and notifications the emulator sends.
    http: reqwest::Client,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves consistent-enough test state; keep serving.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn world(&self) -> MutexGuard<'_, state::World> {
        lock(&self.world)
    }
    fn traffic(&self) -> MutexGuard<'_, Traffic> {
        lock(&self.traffic)
    }
    fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }
    fn set_faults(&self, faults: Faults) {
        *lock(&self.faults) = faults;
    }
    /// Consumes one malformed-page order, if any is pending.
    fn take_malformed(&self) -> Option<MalformedKind> {
        let mut faults = lock(&self.faults);
        (faults.malformed_pages > 0).then(|| {
            faults.malformed_pages -= 1;
            faults.malformed_kind
        })
    }

    /// Consumes one "fail the next token request" order, or draws against the ratio.
    fn take_token_failure(&self) -> bool {
        let ratio = {
            let mut faults = lock(&self.faults);
            let token = &mut faults.token_endpoint;
            if token.fail_next > 0 {
                token.fail_next -= 1;
                return true;
            }
            token.fail_ratio
        };
        ratio > 0.0 && self.traffic().rng.random::<f64>() < ratio
    }

    /// Consumes one "throttle the next attachment request" order, if any is pending.
    fn take_attachment_storm(&self) -> bool {
        let mut faults = lock(&self.faults);
        let pending = faults.attachment_storm > 0;
        if pending {
            faults.attachment_storm -= 1;
        }
        pending
    }

    /// Consumes one "refuse the next `$batch` envelope" order, if any is pending.
    fn take_batch_failure(&self) -> bool {
        let mut faults = lock(&self.faults);
        let pending = faults.batch.fail_next > 0;
        if pending {
            faults.batch.fail_next -= 1;
        }
        pending
    }

    fn mailbox(&self, world: &state::World, upn: &str) -> anyhow::Result<usize> {
        world
            .find_mailbox(upn)
            .ok_or_else(|| anyhow!("no mailbox {upn} in the emulator"))
    }

    fn add_messages(
        self: &Arc<Self>,
        upn: &str,
        folder: &str,
        messages: Vec<NewMessage>,
        late_flag: Option<bool>,
    ) -> anyhow::Result<Vec<MessageIds>> {
        let late = late_flag.unwrap_or_else(|| self.faults().late_arrivals);
        let (ids, mailbox_key, folder_id) = {
            let mut world = self.world();
            let mailbox = self.mailbox(&world, upn)?;
            let folder = world
                .find_folder(mailbox, folder)
                .ok_or_else(|| anyhow!("no folder {folder} in {upn}"))?;
            let ids: Vec<MessageIds> = messages
                .into_iter()
                .map(|message| world.add_message(mailbox, folder, message, late))
                .collect();
            (
                ids,
                world.mailbox_key(mailbox),
                world.folder_id(mailbox, folder),
            )
        };
        for message in &ids {
            self.notify_created(&mailbox_key, &folder_id, &message.immutable_id);
        }
        Ok(ids)
    }

    fn move_message(&self, upn: &str, id: &str, folder: &str) -> anyhow::Result<MessageIds> {
        let mut world = self.world();
        let mailbox = self.mailbox(&world, upn)?;
        let message = world
            .find_message(mailbox, id)
            .ok_or_else(|| anyhow!("no message {id} in {upn}"))?;
        let folder = world
            .find_folder(mailbox, folder)
            .ok_or_else(|| anyhow!("no folder {folder} in {upn}"))?;
        Ok(world.move_message(mailbox, message, folder))
    }

    fn set_read(&self, upn: &str, id: &str, is_read: bool) -> anyhow::Result<()> {
        let mut world = self.world();
        let mailbox = self.mailbox(&world, upn)?;
        let message = world
            .find_message(mailbox, id)
            .ok_or_else(|| anyhow!("no message {id} in {upn}"))?;
        world.set_read(mailbox, message, is_read);
        Ok(())
    }

    fn delete_message(&self, upn: &str, id: &str) -> anyhow::Result<()> {
        let mut world = self.world();
        let mailbox = self.mailbox(&world, upn)?;
        let message = world
            .find_message(mailbox, id)
            .ok_or_else(|| anyhow!("no message {id} in {upn}"))?;
        world.delete_message(mailbox, message);
        Ok(())
    }

    fn message(&self, upn: &str, id: &str) -> anyhow::Result<Option<Value>> {
        let world = self.world();
        let mailbox = self.mailbox(&world, upn)?;
        Ok(world
            .find_message(mailbox, id)
            .map(|message| world.render(mailbox, message, None, true)))
    }

    fn set_mailbox_state(&self, upn: &str, state: MailboxState) -> anyhow::Result<()> {
        let mut world = self.world();
        let mailbox = self.mailbox(&world, upn)?;
        world.set_mailbox_state(mailbox, state);
        Ok(())
    }

    fn evict_delta_tokens(&self, upn: &str) -> anyhow::Result<()> {
        let mut world = self.world();
        let mailbox = self.mailbox(&world, upn)?;
        world.evict_delta_tokens(mailbox);
        Ok(())
    }

    fn reset_counters(&self) {
        self.traffic().counters = Counters::default();
    }
}

/// The client that calls notification URLs (plain HTTP to loopback in tests).
fn notification_client() -> anyhow::Result<reqwest::Client> {
    mailpoll::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("building the notification client")
}

/// A running emulator; stops when dropped or shut down.
pub struct GraphEmulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl GraphEmulator {
    /// Binds the listener and serves in the background.
    pub async fn start(config: EmulatorConfig) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding the Graph emulator to {}", config.listen))?;
        let addr = listener.local_addr().context("emulator address")?;
        let mut world = state::World::new(config.seed);
        for app in config.apps {
            world.add_app(app);
        }
        for upn in &config.mailboxes {
            world.add_mailbox(upn);
        }
        let shared = Arc::new(Shared {
            world: Mutex::new(world),
            faults: Mutex::new(config.faults),
            traffic: Mutex::new(Traffic {
                started: Instant::now(),
                in_flight: HashMap::new(),
                budgets: HashMap::new(),
                throttled_until: HashMap::new(),
                counters: Counters::default(),
                rng: StdRng::seed_from_u64(config.seed.wrapping_add(0x9e37_79b9_7f4a_7c15)),
            }),
            base_url: format!("http://{addr}"),
            admin_api: config.admin_api,
            subscriptions: Mutex::new(subscriptions::Registry::default()),
            http: notification_client()?,
        });
        let router = routes::router(shared.clone());
        let (shutdown, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "Graph emulator stopped");
            }
        });
        Ok(Self {
            shared,
            addr,
            shutdown: Some(shutdown),
            server: Some(server),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`: both the authority and the Graph base URL.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    pub fn add_app(&self, app: AppRegistration) {
        self.shared.world().add_app(app);
    }

    /// Adds a mailbox with the well-known folders (no-op if it exists); returns its object id.
    pub fn add_mailbox(&self, upn: &str) -> String {
        self.shared.world().add_mailbox(upn)
    }

    /// Adds one message; it reaches delta late when the `late_arrivals` switch is on.
    pub fn add_message(
        &self,
        upn: &str,
        folder: &str,
        message: NewMessage,
    ) -> anyhow::Result<MessageIds> {
        let mut ids = self.shared.add_messages(upn, folder, vec![message], None)?;
        ids.pop().ok_or_else(|| anyhow!("no message added"))
    }

    /// Adds `count` messages with generated content.
    pub fn add_messages(
        &self,
        upn: &str,
        folder: &str,
        count: usize,
    ) -> anyhow::Result<Vec<MessageIds>> {
        self.shared
            .add_messages(upn, folder, vec![NewMessage::default(); count], None)
    }

    /// Adds a message whose subject, body and sender name carry `text` (e.g. NUL and other
    /// control characters), each after a short prefix.
    pub fn add_message_with_text(
        &self,
        upn: &str,
        folder: &str,
        text: &str,
    ) -> anyhow::Result<MessageIds> {
        self.add_message(
            upn,
            folder,
            NewMessage {
                subject: Some(format!("Subject {text}")),
                from_name: Some(format!("Sender {text}")),
                body: Some(format!("Body {text}")),
                ..NewMessage::default()
            },
        )
    }

    /// Adds a message that delta shows only after the folder's next round has ended.
    pub fn add_late_message(
        &self,
        upn: &str,
        folder: &str,
        message: NewMessage,
    ) -> anyhow::Result<MessageIds> {
        let mut ids = self
            .shared
            .add_messages(upn, folder, vec![message], Some(true))?;
        ids.pop().ok_or_else(|| anyhow!("no message added"))
    }

    /// Moves a message as a user would; returns its ids after the move.
    pub fn move_message(&self, upn: &str, id: &str, folder: &str) -> anyhow::Result<MessageIds> {
        self.shared.move_message(upn, id, folder)
    }

    pub fn delete_message(&self, upn: &str, id: &str) -> anyhow::Result<()> {
        self.shared.delete_message(upn, id)
    }

    /// Marks a message read or unread as a user would (a change delta reports as an update).
    pub fn set_read(&self, upn: &str, id: &str, is_read: bool) -> anyhow::Result<()> {
        self.shared.set_read(upn, id, is_read)
    }

    /// Poisons a message: every list or delta page holding it is malformed, every time.
    pub fn poison_message(&self, id: &str) {
        self.update_faults(|faults| faults.poison_ids.push(id.to_string()));
    }

    /// A live message, rendered whole with its immutable id (`None` once deleted).
    pub fn message(&self, upn: &str, id: &str) -> anyhow::Result<Option<Value>> {
        self.shared.message(upn, id)
    }

    /// The id of a folder given by well-known name.
    pub fn folder_id(&self, upn: &str, folder: &str) -> anyhow::Result<String> {
        let world = self.shared.world();
        let mailbox = self.shared.mailbox(&world, upn)?;
        let index = world
            .find_folder(mailbox, folder)
            .ok_or_else(|| anyhow!("no folder {folder} in {upn}"))?;
        Ok(world.folder_id(mailbox, index))
    }

    /// Live messages in a folder.
    pub fn folder_len(&self, upn: &str, folder: &str) -> anyhow::Result<usize> {
        let world = self.shared.world();
        let mailbox = self.shared.mailbox(&world, upn)?;
        let index = world
            .find_folder(mailbox, folder)
            .ok_or_else(|| anyhow!("no folder {folder} in {upn}"))?;
        Ok(world.folder_len(mailbox, index))
    }

    pub fn set_mailbox_state(&self, upn: &str, state: MailboxState) -> anyhow::Result<()> {
        self.shared.set_mailbox_state(upn, state)
    }

    /// Forgets the mailbox's delta and skip tokens, as Graph's sync-state cache does.
    pub fn evict_delta_tokens(&self, upn: &str) -> anyhow::Result<()> {
        self.shared.evict_delta_tokens(upn)
    }

    /// Trusts `issuer`'s service account tokens (signed with the key whose PKCS#1 public half
    /// is given), as Entra trusts a cluster's OIDC issuer through its discovery document.
    pub fn add_issuer(&self, issuer: &str, public_key: Vec<u8>) {
        self.shared.world().add_issuer(issuer, public_key);
    }

    /// Invalidates every issued access token (the next use answers 401).
    pub fn revoke_tokens(&self) {
        self.shared.world().revoke_tokens();
    }

    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.shared.set_faults(faults);
    }

    /// Changes some switches, keeping the others.
    pub fn update_faults(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut lock(&self.shared.faults));
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        self.shared.traffic().counters.clone()
    }

    pub fn reset_counters(&self) {
        self.shared.reset_counters();
    }

    /// Stops serving. Open keep-alive connections are cut rather than waited for.
    pub async fn shutdown(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }
}

impl Drop for GraphEmulator {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

#[cfg(test)]
mod tests;
