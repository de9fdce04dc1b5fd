//! The throttling governor, shared by every task of the process: Graph counts requests per app
//! and mailbox, not per task, so every request to a mailbox passes through the same gate.
//!
//! - at most `per_mailbox_concurrency` requests in flight per mailbox (and optionally a global
//!   cap across mailboxes);
//! - a `Retry-After` seen by any request pauses every request to that mailbox until it passes;
//! - a per-mailbox request budget over a sliding window keeps the process under Graph's quota;
//! - full-jitter exponential backoff for retries.
//!
//! The in-process gate alone caps one process. Graph's 4 are per application and mailbox,
//! whoever sends: with [`Governor::share_slots`] every request also holds one of the mailbox's
//! [`SharedSlots`] (kept in Postgres by the operator), so the cap holds across replicas and
//! across the MailboxPolls of one mailbox.
//!
//! Pauses longer than `max_wait` are not slept through: `acquire` returns
//! [`GraphError::Throttled`] so the caller can reschedule its task rather than hold a worker.
//! Other replicas' pauses come in through [`Governor::pause_until`]; pauses this process sees
//! go out through the listener set with [`Governor::on_throttle`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use rand::RngExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use uuid::Uuid;

use super::error::GraphError;

/// A request budget per mailbox: at most `requests` per `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestBudget {
    pub requests: u32,
    pub window: Duration,
}

/// Limits and backoff of the governor.
#[derive(Clone, Debug)]
pub struct GovernorConfig {
    /// Requests in flight per mailbox (Graph allows 4 per app and mailbox).
    pub per_mailbox_concurrency: usize,
    /// Requests in flight across all mailboxes (some documentation reads the 4 as per app).
    pub global_concurrency: Option<usize>,
    /// Per-mailbox budget; Graph's own limit is 10,000 requests per 10 minutes.
    pub mailbox_budget: Option<RequestBudget>,
    /// First backoff step; step n is drawn uniformly from [0, min(cap, base * 2^n)].
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Retries of one request on 429/503/504/network errors before giving up.
    pub max_retries: u32,
    /// Longest pause `acquire` waits out; longer ones return `Throttled` at once.
    pub max_wait: Duration,
    /// How long a shared slot (see [`SharedSlots`]) stays held past its holder's last
    /// renewal: while a request runs its slots are renewed every quarter of this, so a holder
    /// that died (a killed replica) loses them within this long. Short, because until then
    /// the mailbox runs with fewer slots, and a `$batch` that needs all of them not at all.
    pub slot_hold: Duration,
}

impl Default for GovernorConfig {
    fn default() -> Self {
        Self {
            per_mailbox_concurrency: 4,
            global_concurrency: None,
            // A margin under Graph's 10,000 per 10 minutes, for other clients of the same app.
            mailbox_budget: Some(RequestBudget {
                requests: 9_000,
                window: Duration::from_secs(600),
            }),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(60),
            max_retries: 6,
            max_wait: Duration::from_secs(60),
            // Renewed every 5 s: a Postgres restart or a busy moment may miss a renewal or two.
            slot_hold: Duration::from_secs(20),
        }
    }
}

/// A pause the process learned from Graph, for sharing with other replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThrottleNotice {
    /// Mailbox key as the client addresses it, lower-cased.
    pub mailbox: String,
    pub retry_after: Duration,
    /// When requests to the mailbox may resume.
    pub until: DateTime<Utc>,
}

type Listener = Arc<dyn Fn(&ThrottleNotice) + Send + Sync>;

/// Whose requests a shared slot counts: Graph limits each application per mailbox.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SlotKey {
    /// `<tenant id>/<client id>`, lower-cased.
    pub app: String,
    /// Lower-cased.
    pub mailbox: String,
}

impl SlotKey {
    pub fn new(tenant_id: &str, client_id: &str, mailbox: &str) -> Self {
        Self {
            app: format!("{tenant_id}/{client_id}").to_lowercase(),
            mailbox: mailbox.to_lowercase(),
        }
    }
}

/// One ask for shared slots; repeated with the same `waiter` until it is granted.
#[derive(Clone, Copy, Debug)]
pub struct SlotAsk<'a> {
    pub key: &'a SlotKey,
    /// Slots of the key (Graph: 4).
    pub cap: u32,
    /// Slots wanted, all or none (a `$batch` wants up to `cap`).
    pub count: u32,
    /// Longest the slots stay held if never given back (their holder died).
    pub hold: Duration,
    /// The same for every ask of one request, so the store can tell a request that has been
    /// waiting.
    pub waiter: Uuid,
    /// Whether this request asked before and was refused.
    pub waited: bool,
}

/// Concurrency slots per [`SlotKey`] shared with every other process that talks to Graph for
/// the same application (the operator keeps them in Postgres). Requests for one slot go
/// before `$batch`es: while one waits, a batch gets none, so a mailbox's polls never wait
/// behind a backlog of batched after-actions for longer than one batch.
pub trait SharedSlots: Send + Sync + 'static {
    /// Takes the asked slots, all or none. `Ok(None)`: not enough are free now (or a batch
    /// gives way to a waiting single request).
    fn try_take<'a>(&'a self, ask: SlotAsk<'a>) -> BoxFuture<'a, Result<Option<Uuid>, String>>;

    /// Holds what `holder` took for `hold` from now. `Ok(false)`: it no longer holds them
    /// (its hold ran out and someone else took them).
    fn renew<'a>(
        &'a self,
        key: &'a SlotKey,
        holder: Uuid,
        hold: Duration,
    ) -> BoxFuture<'a, Result<bool, String>>;

    /// Gives back what `holder` took. Called from `Drop`: must not block (spawn the write).
    fn give_back(&self, key: &SlotKey, holder: Uuid);
}

/// Slots of a [`SharedSlots`] held by one permit, renewed while it lives and given back when
/// it is dropped.
struct HeldSlots {
    slots: Arc<dyn SharedSlots>,
    key: SlotKey,
    holder: Uuid,
    renewal: tokio::task::AbortHandle,
}

impl HeldSlots {
    /// Starts renewing the slots `holder` took every quarter of `hold`. A request is usually
    /// answered long before the first renewal, which then never runs.
    fn keep(slots: Arc<dyn SharedSlots>, key: SlotKey, holder: Uuid, hold: Duration) -> Self {
        let renewal = tokio::spawn({
            let (slots, key) = (slots.clone(), key.clone());
            async move {
                let every = hold / 4;
                loop {
                    tokio::time::sleep(every).await;
                    match slots.renew(&key, holder, hold).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(mailbox = %key.mailbox, "a shared Graph slot ran out while its request was still running");
                            return;
                        }
                        // The next renewal may succeed (Postgres restarting); the hold leaves
                        // room for a few misses.
                        Err(error) => {
                            tracing::warn!(%error, mailbox = %key.mailbox, "cannot renew a shared Graph slot");
                        }
                    }
                }
            }
        })
        .abort_handle();
        Self {
            slots,
            key,
            holder,
            renewal,
        }
    }
}

impl Drop for HeldSlots {
    fn drop(&mut self) {
        self.renewal.abort();
        self.slots.give_back(&self.key, self.holder);
    }
}

impl std::fmt::Debug for HeldSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldSlots")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

struct Gate {
    slots: Arc<Semaphore>,
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    paused_until: Option<Instant>,
    /// Send times within the budget window, oldest first.
    sent: VecDeque<Instant>,
}

/// Permission to send; hold it until the response is read.
#[derive(Debug)]
pub struct Permit {
    _mailbox: OwnedSemaphorePermit,
    _global: Option<OwnedSemaphorePermit>,
    _shared: Option<HeldSlots>,
}

/// See the module documentation.
pub struct Governor {
    config: GovernorConfig,
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    global: Option<Arc<Semaphore>>,
    listener: Mutex<Option<Listener>>,
    shared: Mutex<Option<Arc<dyn SharedSlots>>>,
}

impl std::fmt::Debug for Governor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Governor")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded state stays consistent between statements; a panic elsewhere must not
    // stop every later request.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Shortest wait after a 429 or a `Retry-After`. Graph writes whole seconds and keeps counting
/// requests while it throttles, so `Retry-After: 0`, an HTTP-date already past, or a 429
/// without the header must not turn into an immediate retry: a storm of retries is what
/// prolongs the throttling.
pub const RETRY_AFTER_FLOOR: Duration = Duration::from_secs(1);

/// Longest wait a `Retry-After` can impose. Graph's request budget is counted over 10
/// minutes, so a longer wait asks for nothing Graph needs; a far-off date or a huge number
/// (seen: 10^12 seconds) would otherwise overflow time arithmetic or park a mailbox for good.
pub const RETRY_AFTER_CEILING: Duration = Duration::from_secs(600);

/// A `Retry-After` brought into [`RETRY_AFTER_FLOOR`, `RETRY_AFTER_CEILING`].
pub fn clamp_retry_after(wait: Duration) -> Duration {
    wait.clamp(RETRY_AFTER_FLOOR, RETRY_AFTER_CEILING)
}

/// Full-jitter exponential backoff above a floor: uniform in
/// [floor, max(floor, min(cap, base * 2^attempt))].
pub fn full_jitter_from(floor: Duration, base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .checked_mul(2u32.saturating_pow(attempt.min(30)))
        .unwrap_or(cap)
        .min(cap)
        .max(floor);
    let low = u64::try_from(floor.as_millis()).unwrap_or(u64::MAX);
    let high = u64::try_from(ceiling.as_millis())
        .unwrap_or(u64::MAX)
        .max(low);
    Duration::from_millis(rand::rng().random_range(low..=high))
}

/// Pause before asking for a free shared slot again: quick at first (a slot is usually free
/// again within one Graph round trip), jittered so waiting replicas do not ask in step.
fn slot_retry_pause(attempt: u32) -> Duration {
    full_jitter_from(
        Duration::from_millis(5),
        Duration::from_millis(20),
        Duration::from_millis(250),
        attempt,
    )
}

/// Full-jitter exponential backoff: uniform in [0, min(cap, base * 2^attempt)].
pub fn full_jitter(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .checked_mul(2u32.saturating_pow(attempt.min(30)))
        .unwrap_or(cap)
        .min(cap);
    let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::rng().random_range(0..=millis))
}

impl Governor {
    pub fn new(config: GovernorConfig) -> Arc<Self> {
        let global = config
            .global_concurrency
            .map(|cap| Arc::new(Semaphore::new(cap.max(1))));
        Arc::new(Self {
            config,
            gates: Mutex::new(HashMap::new()),
            global,
            listener: Mutex::new(None),
            shared: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &GovernorConfig {
        &self.config
    }

    fn gate(&self, mailbox: &str) -> Arc<Gate> {
        let key = mailbox.to_ascii_lowercase();
        lock(&self.gates)
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Gate {
                    slots: Arc::new(Semaphore::new(self.config.per_mailbox_concurrency.max(1))),
                    state: Mutex::new(GateState::default()),
                })
            })
            .clone()
    }

    /// Waits for permission to send `requests` Graph requests to `mailbox` (more than one for
    /// a `$batch`, whose inner requests Graph counts one by one).
    pub async fn acquire(&self, mailbox: &str, requests: u32) -> Result<Permit, GraphError> {
        let gate = self.gate(mailbox);
        let requests = requests.max(1);
        let slots = u32::try_from(self.config.per_mailbox_concurrency.max(1))
            .unwrap_or(u32::MAX)
            .min(requests);
        loop {
            if let Some(wait) = self.pause_left(&gate) {
                self.wait(wait).await?;
                continue;
            }
            let permit = gate
                .slots
                .clone()
                .acquire_many_owned(slots)
                .await
                .map_err(|_| GraphError::Config("governor closed".into()))?;
            // A Retry-After may have come in while this request queued for a slot.
            if let Some(wait) = self.pause_left(&gate) {
                drop(permit);
                self.wait(wait).await?;
                continue;
            }
            if let Some(wait) = self.take_budget(&gate, requests) {
                drop(permit);
                self.wait(wait).await?;
                continue;
            }
            let global = match &self.global {
                Some(global) => Some(
                    global
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(|_| GraphError::Config("governor closed".into()))?,
                ),
                None => None,
            };
            return Ok(Permit {
                _mailbox: permit,
                _global: global,
                _shared: None,
            });
        }
    }

    /// Makes every [`Governor::acquire_for`] also hold slots of `slots`, so that the
    /// per-mailbox cap holds for all processes sharing them.
    pub fn share_slots(&self, slots: Arc<dyn SharedSlots>) {
        *lock(&self.shared) = Some(slots);
    }

    /// [`Governor::acquire`], plus as many of the key's shared slots (see
    /// [`Governor::share_slots`]) as the request stands for, up to the cap. Waits for shared
    /// slots up to `max_wait`, then gives up with [`GraphError::MailboxBusy`]; a failure to
    /// reach the shared store is [`GraphError::Transient`].
    pub async fn acquire_for(&self, key: &SlotKey, requests: u32) -> Result<Permit, GraphError> {
        let shared = lock(&self.shared).clone();
        let Some(shared) = shared else {
            return self.acquire(&key.mailbox, requests).await;
        };
        let cap = u32::try_from(self.config.per_mailbox_concurrency.max(1)).unwrap_or(u32::MAX);
        let count = requests.clamp(1, cap);
        let started = Instant::now();
        let waiter = Uuid::new_v4();
        let mut attempt = 0u32;
        loop {
            let mut permit = self.acquire(&key.mailbox, requests).await?;
            let ask = SlotAsk {
                key,
                cap,
                count,
                hold: self.config.slot_hold,
                waiter,
                waited: attempt > 0,
            };
            let holder = shared
                .try_take(ask)
                .await
                .map_err(|message| GraphError::Transient {
                    status: None,
                    message: format!("cannot take a shared Graph slot of the mailbox: {message}"),
                    request_id: None,
                })?;
            if let Some(holder) = holder {
                let held = HeldSlots::keep(shared, key.clone(), holder, self.config.slot_hold);
                permit._shared = Some(held);
                return Ok(permit);
            }
            // The local slots go back while waiting: the next try starts from `acquire`
            // again, which also waits out a Retry-After that came in meanwhile.
            drop(permit);
            let waited = started.elapsed();
            if waited >= self.config.max_wait {
                return Err(GraphError::MailboxBusy { cap, waited });
            }
            tokio::time::sleep(slot_retry_pause(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }

    async fn wait(&self, wait: Duration) -> Result<(), GraphError> {
        if wait > self.config.max_wait {
            return Err(GraphError::Throttled {
                retry_after: Some(wait),
                request_id: None,
            });
        }
        tokio::time::sleep(wait).await;
        Ok(())
    }

    fn pause_left(&self, gate: &Gate) -> Option<Duration> {
        let state = lock(&gate.state);
        let now = Instant::now();
        state
            .paused_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Records `requests` sends, or says how long until the budget has room for them.
    fn take_budget(&self, gate: &Gate, requests: u32) -> Option<Duration> {
        let budget = self.config.mailbox_budget?;
        let mut state = lock(&gate.state);
        let now = Instant::now();
        while state
            .sent
            .front()
            .is_some_and(|sent| now.duration_since(*sent) >= budget.window)
        {
            state.sent.pop_front();
        }
        let wanted = usize::try_from(requests).unwrap_or(usize::MAX);
        let limit = usize::try_from(budget.requests.max(1)).unwrap_or(usize::MAX);
        if state.sent.len() + wanted > limit && !state.sent.is_empty() {
            // Room appears when enough of the oldest sends leave the window.
            let must_leave = (state.sent.len() + wanted - limit).min(state.sent.len());
            let oldest_needed = state.sent[must_leave - 1];
            return Some((oldest_needed + budget.window).saturating_duration_since(now));
        }
        state.sent.extend(std::iter::repeat_n(now, wanted));
        None
    }

    /// Pauses every request to `mailbox` for `retry_after`, kept within the floor and the
    /// ceiling (never shortens a longer pause), and tells the listener.
    pub fn report_retry_after(&self, mailbox: &str, retry_after: Duration) {
        let retry_after = clamp_retry_after(retry_after);
        let until = Instant::now() + retry_after;
        self.extend_pause(mailbox, until);
        let listener = lock(&self.listener).clone();
        if let Some(listener) = listener {
            let until = Utc::now()
                + chrono::Duration::from_std(retry_after).unwrap_or(chrono::Duration::MAX);
            listener(&ThrottleNotice {
                mailbox: mailbox.to_ascii_lowercase(),
                retry_after,
                until,
            });
        }
    }

    fn extend_pause(&self, mailbox: &str, until: Instant) {
        let gate = self.gate(mailbox);
        let mut state = lock(&gate.state);
        if state.paused_until.is_none_or(|current| current < until) {
            state.paused_until = Some(until);
        }
    }

    /// Feeds a pause learned elsewhere (e.g. another replica, through Postgres).
    pub fn pause_until(&self, mailbox: &str, until: DateTime<Utc>) {
        if let Ok(left) = (until - Utc::now()).to_std() {
            self.pause_for(mailbox, left);
        }
    }

    /// Feeds a pause of `left` from now learned elsewhere (another replica's Retry-After, as
    /// the database measured it).
    pub fn pause_for(&self, mailbox: &str, left: Duration) {
        self.extend_pause(mailbox, Instant::now() + left.min(RETRY_AFTER_CEILING));
    }

    /// When requests to `mailbox` may resume, if it is paused now.
    pub fn paused_until(&self, mailbox: &str) -> Option<DateTime<Utc>> {
        let left = self.pause_left(&self.gate(mailbox))?;
        Some(Utc::now() + chrono::Duration::from_std(left).unwrap_or(chrono::Duration::MAX))
    }

    /// Sets the function told of every pause this process learns from Graph. It runs on the
    /// request's task: keep it quick (e.g. send on a channel).
    pub fn on_throttle(&self, listener: impl Fn(&ThrottleNotice) + Send + Sync + 'static) {
        *lock(&self.listener) = Some(Arc::new(listener));
    }

    /// Backoff before retry number `attempt` (0-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        full_jitter(self.config.backoff_base, self.config.backoff_cap, attempt)
    }

    /// The mailbox's pause after a 429 that named no wait: full jitter above
    /// [`RETRY_AFTER_FLOOR`], growing with `attempt`, never past the ceiling.
    pub fn throttle_backoff(&self, attempt: u32) -> Duration {
        full_jitter_from(
            RETRY_AFTER_FLOOR,
            self.config.backoff_base.max(RETRY_AFTER_FLOOR),
            self.config
                .backoff_cap
                .clamp(RETRY_AFTER_FLOOR, RETRY_AFTER_CEILING),
            attempt,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn config() -> GovernorConfig {
        GovernorConfig {
            mailbox_budget: None,
            ..GovernorConfig::default()
        }
    }

    #[test]
    fn retry_after_is_kept_between_floor_and_ceiling() {
        assert_eq!(clamp_retry_after(Duration::ZERO), RETRY_AFTER_FLOOR);
        assert_eq!(
            clamp_retry_after(Duration::from_secs(12)),
            Duration::from_secs(12)
        );
        assert_eq!(
            clamp_retry_after(Duration::from_secs(1_000_000_000_000)),
            RETRY_AFTER_CEILING
        );
    }

    #[test]
    fn throttle_backoff_never_goes_below_the_floor() {
        let governor = Governor::new(GovernorConfig {
            backoff_base: Duration::from_millis(1),
            backoff_cap: Duration::from_millis(5),
            ..config()
        });
        for attempt in 0..40 {
            let wait = governor.throttle_backoff(attempt);
            assert!(wait >= RETRY_AFTER_FLOOR, "{wait:?} at {attempt}");
            assert!(wait <= RETRY_AFTER_CEILING, "{wait:?} at {attempt}");
        }
        let grown = full_jitter_from(
            Duration::from_secs(1),
            Duration::from_secs(1),
            Duration::from_secs(60),
            5,
        );
        assert!((Duration::from_secs(1)..=Duration::from_secs(32)).contains(&grown));
    }

    #[tokio::test]
    async fn a_huge_retry_after_neither_overflows_nor_parks_the_mailbox_for_good() {
        let governor = Governor::new(config());
        governor.report_retry_after("ops@x", Duration::from_secs(u64::MAX));
        governor.pause_until("other@x", DateTime::<Utc>::MAX_UTC);
        for mailbox in ["ops@x", "other@x"] {
            let until = governor.paused_until(mailbox).expect("paused");
            assert!(
                until <= Utc::now() + chrono::Duration::seconds(601),
                "{until}"
            );
        }
    }

    #[test]
    fn full_jitter_stays_under_the_cap() {
        for attempt in 0..40 {
            let delay = full_jitter(Duration::from_millis(100), Duration::from_secs(2), attempt);
            assert!(delay <= Duration::from_secs(2), "{delay:?} at {attempt}");
        }
        assert!(
            full_jitter(Duration::from_millis(100), Duration::from_secs(2), 0)
                <= Duration::from_millis(100)
        );
    }

    #[tokio::test]
    async fn at_most_the_configured_requests_run_per_mailbox() {
        let governor = Governor::new(config());
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (governor, running, peak) = (governor.clone(), running.clone(), peak.clone());
                tokio::spawn(async move {
                    let _permit = governor.acquire("A@x", 1).await.expect("permit");
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(peak.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_retry_after_pauses_every_request_to_the_mailbox_and_is_reported() {
        let governor = Governor::new(config());
        let notices = Arc::new(Mutex::new(Vec::new()));
        let seen = notices.clone();
        governor.on_throttle(move |notice| lock(&seen).push(notice.clone()));
        governor.report_retry_after("Ops@x", Duration::from_millis(300));
        let started = Instant::now();
        let _permit = governor.acquire("ops@x", 1).await.expect("permit");
        assert!(started.elapsed() >= Duration::from_millis(290));
        let _other = governor
            .acquire("other@x", 1)
            .await
            .expect("other mailbox not paused");
        assert_eq!(lock(&notices).len(), 1);
        assert_eq!(lock(&notices)[0].mailbox, "ops@x");
    }

    #[tokio::test]
    async fn the_global_cap_holds_across_mailboxes() {
        let governor = Governor::new(GovernorConfig {
            global_concurrency: Some(2),
            ..config()
        });
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..12)
            .map(|n| {
                let (governor, running, peak) = (governor.clone(), running.clone(), peak.clone());
                tokio::spawn(async move {
                    let _permit = governor
                        .acquire(&format!("m{}@x", n % 4), 1)
                        .await
                        .expect("permit");
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn long_pauses_are_returned_not_slept() {
        let governor = Governor::new(config());
        governor.pause_until("a@x", Utc::now() + chrono::Duration::seconds(600));
        assert!(governor.paused_until("a@x").is_some());
        let error = governor
            .acquire("a@x", 1)
            .await
            .expect_err("too long to wait");
        assert_eq!(error.reason().as_str(), "Throttled");
        assert!(
            error
                .retry_after()
                .is_some_and(|wait| wait > Duration::from_secs(500))
        );
    }

    #[tokio::test]
    async fn the_budget_spreads_requests_over_the_window() {
        let governor = Governor::new(GovernorConfig {
            mailbox_budget: Some(RequestBudget {
                requests: 3,
                window: Duration::from_millis(400),
            }),
            ..config()
        });
        let started = Instant::now();
        for _ in 0..3 {
            drop(governor.acquire("a@x", 1).await.expect("within budget"));
        }
        drop(governor.acquire("a@x", 1).await.expect("after the window"));
        // The fourth request waited for the first to leave the window.
        assert!(started.elapsed() >= Duration::from_millis(390));
    }
}
