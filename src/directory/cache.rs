//! The watch cache of MailboxPolls, one per replica, shared by the workers' lookups and the
//! leader's controller: one watch per watched scope, its objects indexed by uid, and its changes
//! handed to whoever subscribed (the controller, while this replica leads).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::kube::Scope;
use crate::resource::MailboxPoll;

/// Seconds after which the API server ends a watch (it is then resumed from its last
/// resourceVersion): shorter than the client's read timeout, so a quiet watch ends cleanly
/// rather than by a timeout.
pub const WATCH_TIMEOUT_SECONDS: u32 = 25;

/// The settings of every MailboxPoll watch.
pub fn watch_config() -> watcher::Config {
    watcher::Config::default().timeout(WATCH_TIMEOUT_SECONDS)
}

/// Uid to object reference of one watch's objects, kept in step with its events: a re-list
/// builds a new index that replaces the old one when the list is complete, as the store does.
#[derive(Debug, Default)]
pub struct UidIndex {
    current: HashMap<Uuid, ObjectRef<MailboxPoll>>,
    /// The index being built by a re-list.
    listing: Option<HashMap<Uuid, ObjectRef<MailboxPoll>>>,
}

fn uid_of(poll: &MailboxPoll) -> Option<Uuid> {
    poll.metadata
        .uid
        .as_deref()
        .and_then(|u| Uuid::parse_str(u).ok())
}

impl UidIndex {
    pub fn apply(&mut self, event: &watcher::Event<MailboxPoll>) {
        match event {
            watcher::Event::Apply(poll) => {
                if let Some(uid) = uid_of(poll) {
                    self.current.insert(uid, ObjectRef::from_obj(poll));
                }
            }
            watcher::Event::Delete(poll) => {
                if let Some(uid) = uid_of(poll) {
                    self.current.remove(&uid);
                }
            }
            watcher::Event::Init => self.listing = Some(HashMap::new()),
            watcher::Event::InitApply(poll) => {
                if let (Some(listing), Some(uid)) = (self.listing.as_mut(), uid_of(poll)) {
                    listing.insert(uid, ObjectRef::from_obj(poll));
                }
            }
            watcher::Event::InitDone => {
                if let Some(listed) = self.listing.take() {
                    self.current = listed;
                }
            }
        }
    }

    pub fn get(&self, uid: Uuid) -> Option<&ObjectRef<MailboxPoll>> {
        self.current.get(&uid)
    }

    pub fn uids(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.current.keys().copied()
    }
}

/// One watched scope as a subscriber sees it: its namespace (`None`: all), its cache, and the
/// objects its watch applies from the moment of subscribing.
pub type Subscription = (
    Option<String>,
    Store<MailboxPoll>,
    mpsc::Receiver<Arc<MailboxPoll>>,
);

/// How a watch has fared since it last delivered an event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchHealth {
    failures_since_event: u32,
    last_failure: Option<Instant>,
}

impl WatchHealth {
    pub fn event(&mut self) {
        self.failures_since_event = 0;
    }

    pub fn failure(&mut self, at: Instant) {
        self.failures_since_event = self.failures_since_event.saturating_add(1);
        self.last_failure = Some(at);
    }

    /// Stalled: it failed again and again with nothing heard in between, the latest failure
    /// within `window`. One failure is a watch the API server ended badly and the watcher
    /// resumed; a quiet watch that works again is healthy once `window` has passed.
    pub fn stalled(&self, now: Instant, window: Duration) -> bool {
        self.failures_since_event >= 2
            && self
                .last_failure
                .is_some_and(|at| now.saturating_duration_since(at) < window)
    }
}

/// Where changed MailboxPolls of one watch go (the controller's subscriptions).
type Subscribers = Arc<Mutex<Vec<mpsc::Sender<Arc<MailboxPoll>>>>>;

/// One watched scope: its cache, uid index, first-list flag and subscribers.
#[derive(Clone)]
struct Watched {
    namespace: Option<String>,
    store: Store<MailboxPoll>,
    index: Arc<RwLock<UidIndex>>,
    /// Whether its watch has listed every object once. Kept apart from
    /// `Store::wait_until_ready`, whose waiters share one wake-up slot: with two waiting at
    /// once (readiness and a worker's lookup), one of them was never woken and the replica
    /// stayed unready for good.
    synced: watch::Receiver<bool>,
    health: Arc<Mutex<WatchHealth>>,
    subscribers: Subscribers,
    /// Counts the objects created, changed or deleted in any scope (shared by all scopes).
    changes: Arc<watch::Sender<u64>>,
}

/// Watch caches of MailboxPolls, one per watched scope.
#[derive(Clone)]
pub struct MailboxPolls {
    watched: Vec<Watched>,
    changes: Arc<watch::Sender<u64>>,
}

impl MailboxPolls {
    /// Starts the watches; they run until `stop`.
    pub fn start(client: &kube::Client, scope: &Scope, stop: CancellationToken) -> Self {
        let changes = Arc::new(watch::channel(0u64).0);
        let watched = scope
            .apis::<MailboxPoll>(client)
            .into_iter()
            .map(|(namespace, api)| {
                let (store, writer) = reflector::store();
                let (listed, synced) = watch::channel(false);
                let watched = Watched {
                    namespace,
                    store,
                    index: Arc::default(),
                    synced,
                    health: Arc::default(),
                    subscribers: Arc::default(),
                    changes: changes.clone(),
                };
                let events = watcher(api, watch_config()).default_backoff();
                tokio::spawn(follow(
                    events,
                    writer,
                    watched.clone(),
                    listed,
                    stop.clone(),
                ));
                watched
            })
            .collect();
        Self { watched, changes }
    }

    /// A receiver that sees a new value whenever a MailboxPoll is created, changed or deleted
    /// (status writes included): for work that wants to react soon without a subscription of
    /// its own to every object.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Whether every watch has listed its objects once.
    pub async fn wait_synced(&self) {
        for watched in &self.watched {
            // An error means the watch task ended (shutdown); nothing left to wait for.
            let _ = watched.synced.clone().wait_for(|listed| *listed).await;
        }
    }

    /// Whether every watch has listed its objects once (without waiting).
    pub fn is_synced(&self) -> bool {
        self.watched.iter().all(|w| *w.synced.borrow())
    }

    /// Whether a watch keeps failing without delivering anything (an API server that stopped
    /// answering): see [`WatchHealth::stalled`].
    pub fn is_stalled(&self, window: Duration) -> bool {
        let now = Instant::now();
        self.watched
            .iter()
            .any(|watched| lock(&watched.health).stalled(now, window))
    }

    /// The MailboxPoll with this uid, through the uid index.
    pub fn find(&self, uid: Uuid) -> Option<Arc<MailboxPoll>> {
        self.watched.iter().find_map(|watched| {
            let key = read(&watched.index).get(uid).cloned()?;
            watched.store.get(&key)
        })
    }

    /// Uids of every MailboxPoll in the caches.
    pub fn uids(&self) -> Vec<Uuid> {
        self.watched
            .iter()
            .flat_map(|watched| read(&watched.index).uids().collect::<Vec<_>>())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.watched.iter().map(|w| w.store.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Per watched scope (`None`: all namespaces): its cache, and from now on every object
    /// its watch applies (changed, created, or listed again), until the receiver is dropped.
    /// A subscriber that falls `capacity` objects behind holds the watch up: it must keep
    /// reading.
    pub fn subscribe(&self, capacity: usize) -> Vec<Subscription> {
        self.watched
            .iter()
            .map(|watched| {
                let (tx, rx) = mpsc::channel(capacity);
                lock(&watched.subscribers).push(tx);
                (watched.namespace.clone(), watched.store.clone(), rx)
            })
            .collect()
    }
}

fn read(index: &RwLock<UidIndex>) -> std::sync::RwLockReadGuard<'_, UidIndex> {
    index
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs one watch until `stop`: the store, the uid index and the subscribers follow its events.
async fn follow(
    events: impl futures::Stream<Item = Result<watcher::Event<MailboxPoll>, watcher::Error>>,
    writer: reflector::store::Writer<MailboxPoll>,
    watched: Watched,
    listed: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let scope = watched.namespace.as_deref().unwrap_or("*").to_owned();
    // managedFields (each manager's field set, the status writes' included) are the largest
    // part of a stored MailboxPoll and nothing here reads them: kept, they cost a replica
    // tens of MiB at 10,000 MailboxPolls.
    let events = events
        .modify(|poll| poll.metadata.managed_fields = None)
        .reflect(writer)
        .take_until(stop.cancelled_owned());
    let mut events = std::pin::pin!(events);
    // The objects of a re-list, handed to the subscribers once it is complete: until then the
    // store still holds the previous list, and a subscriber that looked an object up there
    // (the controller does, before it reconciles) would not find one created meanwhile.
    let mut listing: Option<Vec<Arc<MailboxPoll>>> = None;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                lock(&watched.health).failure(Instant::now());
                tracing::warn!(namespace = %scope, %error, "MailboxPoll watch error; retrying");
                continue;
            }
        };
        lock(&watched.health).event();
        watched
            .index
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .apply(&event);
        match event {
            watcher::Event::Init => listing = Some(Vec::new()),
            watcher::Event::InitApply(poll) => listing.get_or_insert_default().push(Arc::new(poll)),
            watcher::Event::InitDone => {
                listed.send_replace(true);
                for poll in listing.take().unwrap_or_default() {
                    publish(&watched.subscribers, poll).await;
                }
                watched.changes.send_modify(|n| *n = n.wrapping_add(1));
            }
            watcher::Event::Apply(poll) => {
                publish(&watched.subscribers, Arc::new(poll)).await;
                watched.changes.send_modify(|n| *n = n.wrapping_add(1));
            }
            watcher::Event::Delete(_) => {
                watched.changes.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }
}

/// Hands a changed object to every subscriber still listening.
async fn publish(subscribers: &Subscribers, poll: Arc<MailboxPoll>) {
    let listening: Vec<_> = lock(subscribers).clone();
    if listening.is_empty() {
        return;
    }
    let mut gone = false;
    for subscriber in &listening {
        gone |= subscriber.send(poll.clone()).await.is_err();
    }
    if gone {
        lock(subscribers).retain(|subscriber| !subscriber.is_closed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(name: &str, uid: Uuid) -> MailboxPoll {
        let mut poll = MailboxPoll::new(
            name,
            serde_json::from_value(serde_json::json!({
                "mailbox": "a@contoso.com",
                "credentialsSecretRef": {"name": "s"}
            }))
            .expect("spec"),
        );
        poll.metadata.namespace = Some("mail".into());
        poll.metadata.uid = Some(uid.to_string());
        poll
    }

    /// A re-list's objects reach the subscribers once the list is complete and the store
    /// holds them: the controller looks each one up in the store before reconciling it, and
    /// one heard of earlier was dropped as not found (and, its spec seen, never reconciled).
    #[tokio::test]
    async fn a_relisted_object_reaches_subscribers_once_the_store_holds_it() {
        let (store, writer) = reflector::store();
        let (listed, synced) = watch::channel(false);
        let watched = Watched {
            namespace: None,
            store: store.clone(),
            index: Arc::default(),
            synced,
            health: Arc::default(),
            subscribers: Arc::default(),
            changes: Arc::new(watch::channel(0).0),
        };
        let (tx, mut heard) = mpsc::channel(8);
        lock(&watched.subscribers).push(tx);
        let (complete, list_done) = tokio::sync::oneshot::channel::<()>();
        let a = poll("a", Uuid::new_v4());
        let listing = futures::stream::iter([
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(a.clone())),
        ]);
        let done = futures::stream::once(async move {
            let _ = list_done.await;
            Ok(watcher::Event::InitDone)
        });
        let events = listing.chain(done).chain(futures::stream::pending());
        let stop = CancellationToken::new();
        tokio::spawn(follow(events, writer, watched, listed, stop.clone()));
        let early = tokio::time::timeout(Duration::from_millis(200), heard.recv()).await;
        assert!(
            early.is_err(),
            "nothing is handed over before the list is complete"
        );
        let _ = complete.send(());
        let object = heard.recv().await.expect("handed over");
        assert!(
            store.get(&ObjectRef::from_obj(&*object)).is_some(),
            "the store holds it when the subscriber hears of it"
        );
        stop.cancel();
    }

    #[test]
    fn a_watch_is_stalled_after_failures_in_a_row_until_an_event_or_the_window_passes() {
        let window = Duration::from_secs(60);
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let mut health = WatchHealth::default();
        assert!(!health.stalled(at(0), window));
        health.failure(at(30));
        assert!(
            !health.stalled(at(31), window),
            "one failure is not a stall"
        );
        health.failure(at(61));
        assert!(health.stalled(at(62), window));
        assert!(health.stalled(at(120), window));
        assert!(
            !health.stalled(at(121), window),
            "a quiet watch that stopped failing is healthy again"
        );
        health.failure(at(130));
        assert!(health.stalled(at(131), window));
        health.event();
        assert!(!health.stalled(at(132), window), "an event ends the stall");
    }

    #[test]
    fn the_index_follows_applies_deletes_and_relists() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let mut index = UidIndex::default();
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(poll("a", a)));
        index.apply(&watcher::Event::InitApply(poll("b", b)));
        assert!(index.get(a).is_none(), "a list counts once it is complete");
        index.apply(&watcher::Event::InitDone);
        assert_eq!(index.get(a).map(|r| r.name.as_str()), Some("a"));
        index.apply(&watcher::Event::Apply(poll("c", c)));
        index.apply(&watcher::Event::Delete(poll("a", a)));
        let mut uids: Vec<Uuid> = index.uids().collect();
        uids.sort();
        let mut expected = vec![b, c];
        expected.sort();
        assert_eq!(uids, expected);
        // A re-list replaces the index: what it does not list is gone.
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(poll("c", c)));
        assert!(
            index.get(b).is_some(),
            "the old index serves until the list is done"
        );
        index.apply(&watcher::Event::InitDone);
        assert!(index.get(b).is_none());
        assert_eq!(index.uids().collect::<Vec<_>>(), vec![c]);
    }
}
