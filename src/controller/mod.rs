//! The MailboxPoll controller (runs on the leader): validates what the schema cannot,
//! schedules polls, handles forced polls and writes status.
//!
//! [`lead`] follows the leader election: while this process leads it reconciles the
//! MailboxPolls of the watched scopes ([`runner`]), turns the workers' "poll finished"
//! notifications into reconciles, and sweeps the state of deleted MailboxPolls; the moment
//! leadership is lost all of that stops.

pub mod backoff;
pub mod conditions;
pub mod deletion;
pub mod fence;
pub mod reconcile;
pub mod runner;
pub mod schedule;
pub mod status;

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::ResourceExt;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::predicates;
use kube::runtime::reflector::{ObjectRef, Store};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::cursor;
use crate::db;
use crate::directory::{KubeDirectory, Scope};
use crate::identity;
use crate::ledger::{self, FailedDelivery};
use crate::pipeline::poll::MAILBOX_CHANGED_CHANNEL;
use crate::pipeline::{DeliverTask, actions};
use crate::queue;
use crate::resource::{MailboxPoll, POLL_REQUESTED_AT_ANNOTATION};
use crate::retention::{self, RetentionSettings};
use crate::telemetry::metrics::ReasonLabels;
use crate::telemetry::metrics::SharedMetrics;
use reconcile::{Context, ReconcileError, ReconcileSettings};

/// Name of the controller in Events.
pub const CONTROLLER_NAME: &str = "mailpoll.dev/controller";

/// Settings of the leader's work.
#[derive(Debug, Clone)]
pub struct LeaderWork {
    pub scope: Scope,
    /// The Lease whose holder does this work; names its terms in Postgres ([`fence`]).
    pub lease: String,
    /// Identity in Events (pod name plus process id).
    pub identity: String,
    pub reconcile: ReconcileSettings,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// How often the state of deleted MailboxPolls is swept.
    pub sweep_interval: Duration,
    /// Cursors and tasks younger than this are never swept: their MailboxPoll may be too new
    /// for the watch cache.
    pub sweep_min_age: Duration,
    /// Retention periods; the leader runs the rounds.
    pub retention: RetentionSettings,
}

impl LeaderWork {
    pub fn new(scope: Scope, identity: impl Into<String>) -> Self {
        Self {
            scope,
            lease: "mailpoll-leader".into(),
            identity: identity.into(),
            reconcile: ReconcileSettings::default(),
            concurrency: 32,
            sweep_interval: Duration::from_secs(60),
            sweep_min_age: Duration::from_secs(120),
            retention: RetentionSettings::default(),
        }
    }
}

/// Runs the leader's work whenever `leading` says so, until `stop`.
pub async fn lead(
    pool: PgPool,
    client: kube::Client,
    directory: Arc<KubeDirectory>,
    metrics: SharedMetrics,
    work: LeaderWork,
    mut leading: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = leading.wait_for(|l| *l) => if changed.is_err() { return },
        }
        let Some(leader_term) = record_term(&pool, &work, &mut leading, &stop).await else {
            continue;
        };
        tracing::info!(identity = %work.identity, term = leader_term.term, "became leader: scheduling starts");
        metrics.leading(true);
        let term = stop.child_token();
        let tasks = start_term(
            &pool,
            &client,
            &directory,
            &metrics,
            &work,
            leader_term,
            term.clone(),
        );
        tokio::select! {
            () = stop.cancelled() => {}
            _ = leading.wait_for(|l| !*l) => {
                tracing::warn!(identity = %work.identity, "leadership lost: scheduling stops");
            }
        }
        // Stop at once: another replica may already be leading.
        term.cancel();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        metrics.leading(false);
        if stop.is_cancelled() {
            return;
        }
    }
}

/// Records a new term in Postgres before any leader-only work starts (retrying while the
/// database is unreachable); `None` when leadership was lost or the operator stops first.
async fn record_term(
    pool: &PgPool,
    work: &LeaderWork,
    leading: &mut watch::Receiver<bool>,
    stop: &CancellationToken,
) -> Option<fence::LeaderTerm> {
    loop {
        match fence::begin_term(pool, &work.lease, &work.identity).await {
            Ok(term) => return Some(term),
            Err(error) => tracing::warn!(%error, "cannot record the leadership term; retrying"),
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            _ = leading.wait_for(|l| !*l) => return None,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn start_term(
    pool: &PgPool,
    client: &kube::Client,
    directory: &Arc<KubeDirectory>,
    metrics: &SharedMetrics,
    work: &LeaderWork,
    leader_term: fence::LeaderTerm,
    term: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: CONTROLLER_NAME.into(),
            instance: Some(work.identity.clone()),
        },
    );
    let ctx = Arc::new(Context::new(
        pool.clone(),
        client.clone(),
        directory.clone(),
        recorder,
        metrics.clone(),
        work.reconcile.clone(),
    ));
    let mut tasks = Vec::new();
    let (announced_tx, announced_rx) = mpsc::channel(1024);
    let mut stores = HashMap::new();
    let mut triggers = vec![received(announced_rx).boxed()];
    // The replica's one watch of MailboxPolls feeds the controller too: its cache, and its
    // changes from now on.
    for (namespace, reader, applied) in directory.polls().subscribe(1024) {
        // Everything cached now is reconciled once at the start of the term; the changes
        // cover what comes after (and a re-list brings every object again).
        let cached = reader.state();
        let changes = spec_or_request_changes(received(applied), &cached)
            .map(|poll| ObjectRef::from_obj(&*poll));
        let cached: Vec<ObjectRef<MailboxPoll>> = cached
            .iter()
            .map(|poll| ObjectRef::from_obj(&**poll))
            .collect();
        triggers.push(futures::stream::iter(cached).chain(changes).boxed());
        stores.insert(namespace, reader);
    }
    tasks.push(tokio::spawn(run_reconciles(
        ctx.clone(),
        stores,
        futures::stream::select_all(triggers),
        work.concurrency,
        term.clone(),
    )));
    tasks.push(tokio::spawn(forward_announcements(
        pool.clone(),
        announced_tx,
        work.reconcile.settle_requeue,
        term.clone(),
    )));
    tasks.push(tokio::spawn(retention::run(
        pool.clone(),
        metrics.clone(),
        work.retention.clone(),
        term.clone(),
    )));
    tasks.push(tokio::spawn(sweep_loop(
        pool.clone(),
        directory.clone(),
        ctx,
        work.clone(),
        leader_term,
        term,
    )));
    tasks
}

/// Runs the reconciles of the term (see [`runner`]): objects are looked up in the cache of
/// the watch of their namespace (or of all namespaces).
async fn run_reconciles(
    ctx: Arc<Context>,
    stores: HashMap<Option<String>, Store<MailboxPoll>>,
    triggers: impl futures::Stream<Item = ObjectRef<MailboxPoll>> + Send,
    concurrency: u16,
    stop: CancellationToken,
) {
    // No wait for the caches to fill: an object triggered before its watch has listed is not
    // found and not reconciled, and the list then brings every object as a change (a scope
    // whose list never comes holds up none of the others).
    let lookup = |object: &ObjectRef<MailboxPoll>| {
        stores
            .get(&object.namespace)
            .or_else(|| stores.get(&None))
            .and_then(|store| store.get(object))
    };
    let reconcile = |poll: Arc<MailboxPoll>| {
        let ctx = ctx.clone();
        async move {
            match reconcile::reconcile(poll.clone(), ctx.clone()).await {
                Ok(action) => action,
                Err(error) => reconcile::error_policy(poll, &error, ctx),
            }
        }
    };
    let limits = runner::Limits {
        routine: usize::from(concurrency),
        urgent: runner::URGENT_LANE,
    };
    runner::run(
        triggers,
        lookup,
        |poll| reconcile::lane(poll),
        reconcile,
        limits,
        stop,
    )
    .await;
}

/// What a channel receives, as a stream.
fn received<T: Send + 'static>(rx: mpsc::Receiver<T>) -> impl futures::Stream<Item = T> + Send {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// The objects whose spec or forced-poll request changed since they were last seen: status
/// writes (which change neither) cause no reconcile.
/// `known` are the objects already reconciled for (their status writes must not count as
/// changes either).
fn spec_or_request_changes(
    applied: impl futures::Stream<Item = Arc<MailboxPoll>> + Send + 'static,
    known: &[Arc<MailboxPoll>],
) -> impl futures::Stream<Item = Arc<MailboxPoll>> + Send + 'static {
    let mut seen: HashMap<ObjectRef<MailboxPoll>, u64> = known
        .iter()
        .filter_map(|poll| Some((ObjectRef::from_obj(&**poll), spec_or_request(poll)?)))
        .collect();
    applied.filter(move |poll| {
        let changed = match spec_or_request(poll) {
            Some(hash) => seen.insert(ObjectRef::from_obj(&**poll), hash) != Some(hash),
            None => true,
        };
        futures::future::ready(changed)
    })
}

/// Hash of what should trigger a reconcile: the object (its uid: one re-created under the
/// same name starts again at generation 1), its spec (its generation) and the forced-poll
/// annotation.
fn spec_or_request(poll: &MailboxPoll) -> Option<u64> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    poll.metadata.uid.hash(&mut hasher);
    predicates::generation(poll).hash(&mut hasher);
    poll.annotations()
        .get(POLL_REQUESTED_AT_ANNOTATION)
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// Turns the workers' announcements (`namespace/name`: a poll finished, a delivery ended)
/// into reconciles, each held back between one and two `settle` periods. A worker announces a
/// poll's end just before its task's completion is committed: a reconcile at once would find
/// the task still running and look again, one more reconcile per poll. Held back, the
/// completion has landed, and the announcements of a poll and of its deliveries that come
/// close together make one reconcile.
async fn forward_announcements(
    pool: PgPool,
    reconciles: mpsc::Sender<ObjectRef<MailboxPoll>>,
    settle: Duration,
    stop: CancellationToken,
) {
    let (heard_tx, mut heard) = mpsc::unbounded_channel();
    let listen = db::listen(
        &pool,
        MAILBOX_CHANGED_CHANNEL,
        "finished polls",
        move |notice| {
            if let Some(object) = announced(notice) {
                let _ = heard_tx.send(object);
            }
        },
        stop,
    );
    let forward = async move {
        let mut held = HeldBack::default();
        let mut periods = tokio::time::interval(settle.max(Duration::from_millis(1)));
        periods.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                object = heard.recv() => match object {
                    Some(object) => held.hear(object),
                    None => return,
                },
                _ = periods.tick() => {
                    for object in held.period_ended() {
                        // A full channel means reconciles are already queued; the requeue
                        // timers catch up with anything dropped here, and with announcements
                        // lost while disconnected.
                        let _ = reconciles.try_send(object);
                    }
                }
            }
        }
    };
    tokio::join!(listen, forward);
}

/// Announcements held back until the end of the period after the one they were heard in;
/// repeats within a period are one.
#[derive(Debug)]
struct HeldBack<T> {
    current: HashSet<T>,
    previous: HashSet<T>,
}

impl<T> Default for HeldBack<T> {
    fn default() -> Self {
        Self {
            current: HashSet::new(),
            previous: HashSet::new(),
        }
    }
}

impl<T: Eq + Hash> HeldBack<T> {
    fn hear(&mut self, announced: T) {
        self.current.insert(announced);
    }

    /// What is due now: heard during the period before the one that just ended.
    fn period_ended(&mut self) -> Vec<T> {
        let due = self.previous.drain().collect();
        std::mem::swap(&mut self.current, &mut self.previous);
        due
    }
}

/// The MailboxPoll an announcement names.
fn announced(heard: db::Heard<'_>) -> Option<ObjectRef<MailboxPoll>> {
    let db::Heard::Notice(payload) = heard else {
        return None;
    };
    let (namespace, name) = payload.split_once('/')?;
    Some(ObjectRef::new(name).within(namespace))
}

async fn sweep_loop(
    pool: PgPool,
    directory: Arc<KubeDirectory>,
    ctx: Arc<Context>,
    work: LeaderWork,
    leader_term: fence::LeaderTerm,
    stop: CancellationToken,
) {
    tokio::select! {
        () = stop.cancelled() => return,
        () = directory.polls().wait_synced() => {}
    }
    loop {
        match guarded_sweep(&pool, &directory, &ctx, &work, &leader_term).await {
            Ok(swept) => {
                for uid in &swept {
                    ctx.forget(*uid);
                    ctx.metrics.forget_mailbox_poll(*uid);
                }
                if !swept.is_empty() {
                    tracing::info!(
                        count = swept.len(),
                        "swept the state of deleted MailboxPolls"
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "sweeping deleted MailboxPolls failed"),
        }
        match fail_abandoned_deliveries(&pool).await {
            Ok(0) => {}
            Ok(count) => tracing::warn!(
                count,
                "messages whose delivery task died without finishing are now marked failed"
            ),
            Err(error) => tracing::warn!(%error, "checking for abandoned deliveries failed"),
        }
        match actions::requeue_stranded(&pool).await {
            Ok(0) => {}
            Ok(count) => tracing::info!(count, "queued after-actions left without a run"),
            Err(error) => tracing::warn!(%error, "checking for stranded after-actions failed"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(work.sweep_interval) => {}
        }
    }
}

/// Marks failed the messages still pending whose deliver task is dead without its handler
/// having said so (its lease ran out on the last attempt: the queue's rescue made it dead).
pub async fn fail_abandoned_deliveries(pool: &PgPool) -> Result<u64, ReconcileError> {
    let failures: Vec<FailedDelivery> = queue::dead_tasks::<DeliverTask>(pool)
        .await?
        .into_iter()
        .map(|(task, error)| FailedDelivery {
            mailbox_uid: task.ledger(),
            message_id: task.message_id,
            error: error.unwrap_or_else(|| "the delivery task is dead".into()),
        })
        .collect();
    Ok(ledger::fail_pending(pool, &failures).await?)
}

/// The sweep, when [`deletion::judge`] trusts the watch cache: the state of deleted
/// MailboxPolls ([`sweep`]), then the ledgers of those whose deletion policy was `Delete`.
/// A refused sweep deletes nothing; why is logged and counted.
pub async fn guarded_sweep(
    pool: &PgPool,
    directory: &KubeDirectory,
    ctx: &Context,
    work: &LeaderWork,
    leader_term: &fence::LeaderTerm,
) -> Result<Vec<Uuid>, ReconcileError> {
    let view = deletion::ask_api(&ctx.client, &work.scope).await;
    let cached = directory.polls().uids().len();
    if let Err(refusal) = deletion::judge(directory.polls().is_synced(), cached, view) {
        tracing::warn!(reason = refusal.as_str(), %refusal, "sweep of deleted MailboxPolls refused");
        ctx.metrics
            .sweep_refusals
            .get_or_create(&ReasonLabels {
                reason: refusal.as_str().to_owned(),
            })
            .inc();
        return Ok(Vec::new());
    }
    let swept = sweep(pool, directory, work, leader_term).await?;
    let namespaces: Option<&[String]> = match &work.scope {
        Scope::All => None,
        Scope::Namespaces(list) => Some(list),
    };
    let doomed = identity::doomed(pool, work.sweep_min_age, namespaces).await?;
    if !doomed.is_empty() {
        let existing = directory.polls().uids().into_iter().collect();
        let settings = &work.retention;
        let purged = deletion::purge(
            pool,
            leader_term,
            &doomed,
            &existing,
            settings.batch,
            settings.max_batches,
        )
        .await?;
        ctx.metrics
            .purged("messages", "deletion_policy", purged.messages);
        ctx.metrics
            .purged("polls", "deletion_policy", purged.history);
        ctx.metrics
            .purged("mailbox_identities", "deletion_policy", purged.identities);
    }
    Ok(swept)
}

/// Cancels the live tasks and deletes the cursors of MailboxPolls that no longer exist. The
/// ledger is kept (its deletion policy decides, see [`guarded_sweep`]). Returns the uids swept.
/// Each MailboxPoll's state goes in one transaction fenced by `leader_term`: once another term
/// began, nothing more is swept.
pub async fn sweep(
    pool: &PgPool,
    directory: &KubeDirectory,
    work: &LeaderWork,
    leader_term: &fence::LeaderTerm,
) -> Result<Vec<Uuid>, ReconcileError> {
    let namespaces: Option<&[String]> = match &work.scope {
        Scope::All => None,
        Scope::Namespaces(list) => Some(list),
    };
    let mut candidates = cursor::owners_older_than(pool, work.sweep_min_age, namespaces).await?;
    // Owners outside the watched namespaces are another operator's business; owners without
    // a cursor are only known to be ours when every namespace is watched.
    if namespaces.is_none() {
        candidates.extend(queue::live_owners_older_than(pool, work.sweep_min_age).await?);
    }
    candidates.sort();
    candidates.dedup();
    let existing: std::collections::HashSet<Uuid> = directory.polls().uids().into_iter().collect();
    let mut swept = Vec::new();
    for uid in candidates {
        if existing.contains(&uid) {
            continue;
        }
        let mut tx = pool.begin().await?;
        leader_term.check(&mut tx).await?;
        queue::cancel_owner(&mut *tx, uid).await?;
        cursor::delete(&mut *tx, uid).await?;
        tx.commit().await?;
        swept.push(uid);
    }
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(name: &str, uid: &str, generation: i64, request: Option<&str>) -> Arc<MailboxPoll> {
        let mut poll = MailboxPoll::new(
            name,
            serde_json::from_value(serde_json::json!({
                "mailbox": "a@contoso.com",
                "credentialsSecretRef": {"name": "s"}
            }))
            .expect("spec"),
        );
        poll.metadata.namespace = Some("mail".into());
        poll.metadata.uid = Some(uid.into());
        poll.metadata.generation = Some(generation);
        if let Some(value) = request {
            poll.annotations_mut()
                .insert(POLL_REQUESTED_AT_ANNOTATION.into(), value.into());
        }
        Arc::new(poll)
    }

    #[test]
    fn announcements_wait_one_full_period_and_repeats_fold() {
        let mut held = HeldBack::default();
        held.hear("a");
        held.hear("a");
        assert!(
            held.period_ended().is_empty(),
            "heard late in a period: it may be just before its end"
        );
        held.hear("b");
        assert_eq!(held.period_ended(), vec!["a"]);
        held.hear("b");
        assert_eq!(held.period_ended(), vec!["b"]);
        assert_eq!(
            held.period_ended(),
            vec!["b"],
            "heard again in the next period"
        );
        assert!(held.period_ended().is_empty());
    }

    #[tokio::test]
    async fn only_spec_request_and_object_changes_pass() {
        let known = [poll("a", "u1", 1, None)];
        let applied = vec![
            // A status write of a known object: same generation, same request.
            poll("a", "u1", 1, None),
            poll("b", "u2", 1, None),
            poll("b", "u2", 1, None),
            poll("a", "u1", 2, None),
            poll("a", "u1", 2, Some("now")),
            poll("a", "u1", 2, Some("now")),
            // Deleted and created again under the same name.
            poll("a", "u3", 1, None),
        ];
        let passed: Vec<(String, i64)> =
            spec_or_request_changes(futures::stream::iter(applied), &known)
                .map(|p| {
                    (
                        p.metadata.uid.clone().unwrap_or_default(),
                        p.metadata.generation.unwrap_or_default(),
                    )
                })
                .collect()
                .await;
        assert_eq!(
            passed,
            [
                ("u2".to_owned(), 1),
                ("u1".to_owned(), 2),
                ("u1".to_owned(), 2),
                ("u3".to_owned(), 1)
            ]
        );
    }
}
