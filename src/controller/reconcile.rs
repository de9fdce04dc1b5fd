//! One reconciliation of a MailboxPoll (leader only): check what the schema cannot, record a
//! forced-poll request, make the live poll task match the schedule, write the status when it
//! changed, publish Events on transitions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use sqlx::PgPool;
use uuid::Uuid;

use super::backoff::{BackoffPolicy, ErrorBackoff};
use super::fence::FenceError;
use super::runner::{Action, Lane};
use super::schedule::{self, LiveTask, Schedule};
use super::status::{self, Facts, Seen};
use crate::delivery::egress::EgressGuard;
use crate::directory::{ConfigError, KubeDirectory};
use crate::identity::DeletionPolicy;
use crate::ledger;
use crate::pipeline::ActionsTask;
use crate::poll_log;
use crate::queue::{self, NewTask, QueueError};
use crate::resource::{MailboxPoll, MailboxPollStatus, POLL_REQUESTED_AT_ANNOTATION};
use crate::telemetry::metrics::{MailboxPollSample, SharedMetrics};

/// Field manager of the status writes.
pub const FIELD_MANAGER: &str = "mailpoll-controller";

/// Timing of reconciles.
#[derive(Debug, Clone)]
pub struct ReconcileSettings {
    /// Longest time between two reconciles of an unchanged MailboxPoll.
    pub max_requeue: Duration,
    /// Requeue while messages wait for delivery, so the counts move.
    pub pending_requeue: Duration,
    /// Requeue while the configuration is broken (a Secret may appear at any time).
    pub config_requeue: Duration,
    /// Requeue after an error: per MailboxPoll, growing with its consecutive failures.
    pub error_backoff: BackoffPolicy,
    /// Requeue while a poll task is finishing (its round done, its completion being recorded);
    /// also how long the workers' announcements are held back before they are reconciled.
    pub settle_requeue: Duration,
    /// Requeue while a poll task runs (its end is announced; this is the fallback).
    pub running_requeue: Duration,
    /// How long a finished poll's status write waits for the deliveries it started: they
    /// usually end within a second, and one write then shows the poll and its deliveries
    /// (one write per poll, not a second one for the counts).
    pub delivery_hold: Duration,
    /// Requeue while the status write waits for deliveries.
    pub delivery_hold_requeue: Duration,
    /// A due poll task not claimed for this long no longer defers status writes (the status
    /// then shows the overdue nextPollTime); the look after a poll's due time waits this
    /// long (see `next_look`).
    pub overdue: Duration,
    /// Longest wait between two looks at a MailboxPoll whose poll is overdue (the workers are
    /// saturated): the wait grows with the lateness up to this, and the poll's end, which the
    /// worker announces, brings a reconcile anyway.
    pub overdue_requeue_max: Duration,
    /// The webhook egress policy, checked on each MailboxPoll's webhook URL so a refused
    /// destination is reported before (and whether or not) a delivery meets it.
    pub egress: EgressGuard,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        Self {
            max_requeue: Duration::from_secs(300),
            pending_requeue: Duration::from_secs(10),
            config_requeue: Duration::from_secs(5),
            error_backoff: BackoffPolicy::default(),
            settle_requeue: Duration::from_millis(300),
            running_requeue: Duration::from_secs(10),
            delivery_hold: Duration::from_secs(3),
            delivery_hold_requeue: Duration::from_millis(500),
            overdue: Duration::from_secs(10),
            overdue_requeue_max: Duration::from_secs(60),
            egress: EgressGuard::default(),
        }
    }
}

/// What the leader remembers per MailboxPoll: the basis of its Events and its last write.
#[derive(Debug, Clone)]
struct Memory {
    seen: Seen,
    written: Option<MailboxPollStatus>,
}

/// Shared by every reconcile of one leadership term.
pub struct Context {
    pub pool: PgPool,
    pub client: kube::Client,
    pub directory: Arc<KubeDirectory>,
    pub recorder: Recorder,
    pub metrics: SharedMetrics,
    pub settings: ReconcileSettings,
    memory: Mutex<HashMap<Uuid, Memory>>,
    /// The deletion policy recorded this term per MailboxPoll, with the ledger identity it
    /// was recorded on (a new identity, after a mailbox change, is recorded again).
    policies: Mutex<HashMap<Uuid, (Uuid, DeletionPolicy)>>,
    /// Consecutive reconcile failures per object.
    backoff: ErrorBackoff<ObjectRef<MailboxPoll>>,
}

impl Context {
    pub fn new(
        pool: PgPool,
        client: kube::Client,
        directory: Arc<KubeDirectory>,
        recorder: Recorder,
        metrics: SharedMetrics,
        settings: ReconcileSettings,
    ) -> Self {
        Self {
            pool,
            client,
            directory,
            recorder,
            metrics,
            memory: Mutex::new(HashMap::new()),
            policies: Mutex::new(HashMap::new()),
            backoff: ErrorBackoff::new(settings.error_backoff),
            settings,
        }
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Memory>> {
        self.memory
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn policies(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (Uuid, DeletionPolicy)>> {
        self.policies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets MailboxPolls that no longer exist.
    pub fn forget(&self, uid: Uuid) {
        self.memory().remove(&uid);
        self.policies().remove(&uid);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Config(ConfigError),
    #[error("cannot encode the status: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Fence(#[from] FenceError),
}

impl ReconcileError {
    /// Label of the reconcile error metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Db(_) | Self::Queue(_) => "Database",
            Self::Kube(_) => "KubernetesApi",
            Self::Config(error) => error.reason().as_str(),
            Self::Encode(_) => "Encode",
            Self::Fence(FenceError::Deposed { .. }) => "Deposed",
            Self::Fence(FenceError::Db(_)) => "Database",
        }
    }
}

pub async fn reconcile(
    poll: Arc<MailboxPoll>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let started = std::time::Instant::now();
    let result = reconcile_inner(&poll, &ctx).await;
    if result.is_ok() {
        ctx.backoff.succeeded(&ObjectRef::from_obj(&*poll));
    }
    ctx.metrics.reconciled(
        started.elapsed(),
        result.as_ref().err().map(ReconcileError::reason),
    );
    result
}

/// The urgent lane for what a user waits for: a spec the status has not observed (a new
/// object, an edit: `kubectl wait`, GitOps health checks) and a forced-poll request the
/// status has not shown handled (`kubectl annotate`).
pub fn lane(poll: &MailboxPoll) -> Lane {
    let requested = poll
        .annotations()
        .get(POLL_REQUESTED_AT_ANNOTATION)
        .map(|value| value.trim())
        .filter(|value| !value.is_empty());
    let handled = poll
        .status
        .as_ref()
        .and_then(|status| status.last_handled_poll_request.as_deref());
    if !generation_observed(poll) || requested.is_some_and(|value| Some(value) != handled) {
        Lane::Urgent
    } else {
        Lane::Routine
    }
}

pub fn error_policy(poll: Arc<MailboxPoll>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff.failed(ObjectRef::from_obj(&*poll));
    tracing::warn!(namespace = poll.namespace().as_deref().unwrap_or(""), name = %poll.name_any(), %error, retry_in_ms = delay.as_millis(), "reconcile failed");
    Action::requeue(delay)
}

async fn reconcile_inner(poll: &MailboxPoll, ctx: &Context) -> Result<Action, ReconcileError> {
    let Some(uid) = poll
        .metadata
        .uid
        .as_deref()
        .and_then(|u| Uuid::parse_str(u).ok())
    else {
        return Ok(Action::await_change());
    };
    let config_error = check_config(poll, ctx).await?;
    remember_deletion_policy(poll, ctx, uid).await?;
    let poll_requested = record_poll_request(poll, ctx, uid).await?;
    retry_parked_actions(poll, ctx, uid, poll_requested).await?;
    // A running poll's status is written when it has finished (the worker announces that):
    // one write per poll. A new generation (a new object, a spec change) is written at once,
    // even while a poll runs, so `kubectl wait` and GitOps health checks see it observed
    // (a new object: Ready=Unknown until its first poll says more).
    let running_wait = schedule(poll, ctx, uid, config_error.as_ref()).await?;
    if let Some(wait) = running_wait
        && generation_observed(poll)
    {
        return Ok(Action::requeue(wait));
    }
    let mut facts = status::load(&ctx.pool, uid, ledger_id(poll, ctx).await?).await?;
    facts.suspended = poll.spec.suspend;
    let now = Utc::now();
    if generation_observed(poll)
        && let Some(next) = facts.next_poll
        && next <= now + chrono::Duration::seconds(1)
        && next >= now - chrono::Duration::from_std(ctx.settings.overdue).unwrap_or_default()
    {
        return Ok(Action::requeue(ctx.settings.running_requeue));
    }
    if generation_observed(poll)
        && let Some(left) = hold_for_deliveries(&facts, now, ctx.settings.delivery_hold)
    {
        return Ok(Action::requeue(
            left.min(ctx.settings.delivery_hold_requeue),
        ));
    }
    let remembered = ctx.memory().get(&uid).cloned();
    let view = View {
        poll,
        facts: &facts,
        config_error: config_error.as_ref(),
        remembered: remembered.as_ref(),
    };
    let desired = status::desired_status(
        poll.status.as_ref(),
        poll.metadata.generation,
        view.config_error,
        &facts,
        now,
    );
    ctx.metrics
        .observe_mailbox_poll(uid, &metrics_sample(poll, &desired));
    let written = write_status(ctx, &view, desired).await?;
    let seen = publish_events(ctx, &view).await;
    let written = written.or_else(|| remembered.and_then(|m| m.written));
    ctx.memory().insert(uid, Memory { seen, written });
    let look = next_look(&ctx.settings, &facts, config_error.is_some(), now);
    Ok(Action::requeue(
        running_wait.map_or(look, |wait| wait.min(look)),
    ))
}

/// Whether the status already describes the current spec.
fn generation_observed(poll: &MailboxPoll) -> bool {
    let observed = poll.status.as_ref().and_then(|s| s.observed_generation);
    observed.is_some() && observed == poll.metadata.generation
}

/// Keeps the MailboxPoll's deletion policy in Postgres, where the sweep finds it once the
/// object is gone. Its identity must exist first; without one (a source the directory cannot
/// resolve) there is no ledger to delete yet, and the next reconcile tries again.
async fn remember_deletion_policy(
    poll: &MailboxPoll,
    ctx: &Context,
    uid: Uuid,
) -> Result<(), ReconcileError> {
    let Ok(ledger) = ctx.directory.ledger_id_of(poll).await else {
        return Ok(());
    };
    let recorded = (ledger, poll.spec.deletion_policy);
    if ctx.policies().get(&uid) == Some(&recorded) {
        return Ok(());
    }
    crate::identity::set_deletion_policy(&ctx.pool, uid, poll.spec.deletion_policy).await?;
    ctx.policies().insert(uid, recorded);
    Ok(())
}

/// The MailboxPoll's ledger identity (its status counts come from that ledger).
async fn ledger_id(poll: &MailboxPoll, ctx: &Context) -> Result<Uuid, ReconcileError> {
    ctx.directory
        .ledger_id_of(poll)
        .await
        .map_err(ReconcileError::Config)
}

/// What the schema cannot check (the Secrets, the webhook's destination); `Ok(None)` when the
/// configuration is usable.
async fn check_config(
    poll: &MailboxPoll,
    ctx: &Context,
) -> Result<Option<ConfigError>, ReconcileError> {
    let config = match ctx.directory.resolve(poll).await {
        Ok(config) => config,
        Err(error) if error.is_transient() => return Err(ReconcileError::Config(error)),
        Err(error) => return Ok(Some(error)),
    };
    let Some(endpoint) = &config.webhook else {
        return Ok(None);
    };
    // Deliveries check the same rules when they connect; this reports a refused destination
    // as a condition, and pauses scheduled polls whose every message would be refused.
    match ctx
        .settings
        .egress
        .check_destination(endpoint.url.as_url().as_str(), &config.source.namespace)
        .await
    {
        Ok(()) => Ok(None),
        Err(refusal) => Ok(Some(ConfigError::WebhookForbidden(refusal.to_string()))),
    }
}

/// A forced poll: each annotation value is accepted once, ever. Returns whether this
/// reconcile accepted a new one.
async fn record_poll_request(
    poll: &MailboxPoll,
    ctx: &Context,
    uid: Uuid,
) -> Result<bool, ReconcileError> {
    if let Some(value) = poll
        .annotations()
        .get(POLL_REQUESTED_AT_ANNOTATION)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        && poll_log::request(&ctx.pool, uid, value).await?
    {
        tracing::info!(namespace = poll.namespace().as_deref().unwrap_or(""), name = %poll.name_any(), value, "poll requested");
        return Ok(true);
    }
    Ok(false)
}

/// After-actions parked for good (a move destination that does not exist, permissions Graph
/// refused, actions that kept failing) are tried again once the spec changes or a poll is
/// forced: either may follow the fix (a spec edit; a permission granted in Entra, then a
/// forced poll). The spec changed when its generation is not the one the status last
/// observed.
async fn retry_parked_actions(
    poll: &MailboxPoll,
    ctx: &Context,
    uid: Uuid,
    poll_requested: bool,
) -> Result<(), ReconcileError> {
    let observed = poll.status.as_ref().and_then(|s| s.observed_generation);
    let spec_changed = observed.is_some() && observed != poll.metadata.generation;
    if !spec_changed && !poll_requested {
        return Ok(());
    }
    let unparked = ledger::unpark_actions(&ctx.pool, ledger_id(poll, ctx).await?).await?;
    if unparked > 0 {
        let task =
            NewTask::of(&ActionsTask { mailbox_uid: uid })?.max_attempts(poll.spec.max_attempts);
        queue::enqueue(&ctx.pool, &task).await?;
        tracing::info!(namespace = poll.namespace().as_deref().unwrap_or(""), name = %poll.name_any(), unparked, spec_changed, poll_requested, "parked after-actions are tried again");
    }
    Ok(())
}

/// Makes the live poll task match the schedule. A broken configuration stops scheduled polls
/// (each would fail the same way); forced polls still run and report what is wrong. Returns
/// when to look again if a poll is running: its status is written once it has finished (the
/// worker announces that), so one poll costs one status write.
async fn schedule(
    poll: &MailboxPoll,
    ctx: &Context,
    uid: Uuid,
    config_error: Option<&ConfigError>,
) -> Result<Option<Duration>, ReconcileError> {
    let interval = poll.spec.interval().unwrap_or(Duration::from_secs(300));
    let state = schedule::load(&ctx.pool, uid).await?;
    let plan = Schedule {
        active: !poll.spec.suspend && config_error.is_none(),
        interval,
    };
    let step = schedule::plan(&state, plan, Utc::now());
    schedule::apply(&ctx.pool, uid, poll.spec.max_attempts, step).await?;
    if state.live != Some(LiveTask::Running) {
        return Ok(None);
    }
    let facts = status::load(&ctx.pool, uid, ledger_id(poll, ctx).await?).await?;
    let after = if facts.settling {
        ctx.settings.settle_requeue
    } else {
        ctx.settings.running_requeue
    };
    Ok(Some(after))
}

/// What a reconcile knows of a MailboxPoll when it writes status and Events.
struct View<'a> {
    poll: &'a MailboxPoll,
    facts: &'a Facts,
    config_error: Option<&'a ConfigError>,
    /// What the leader wrote and published for it last.
    remembered: Option<&'a Memory>,
}

/// What the metrics show of a MailboxPoll: the status it is about to have.
fn metrics_sample(poll: &MailboxPoll, status: &MailboxPollStatus) -> MailboxPollSample {
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
    MailboxPollSample {
        namespace: poll.namespace().unwrap_or_default(),
        name: poll.name_any(),
        ready: ready.is_some_and(|c| c.status == "True"),
        reason: ready.map(|c| c.reason.clone()).unwrap_or_default(),
        suspended: poll.spec.suspend,
        interval: poll.spec.interval().unwrap_or_default(),
        last_success: status.last_successful_poll_time.as_ref().map(time_of),
        last_poll: status.last_poll_time.as_ref().map(time_of),
        delivered: status.messages_delivered.unwrap_or_default(),
        pending: status.messages_pending.unwrap_or_default(),
        failed: status.messages_failed.unwrap_or_default(),
    }
}

fn time_of(time: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> chrono::DateTime<Utc> {
    chrono::DateTime::from_timestamp_micros(time.0.as_microsecond()).unwrap_or_default()
}

/// Writes the status when it changed (a no-op write is not sent); returns what was written
/// (`None`: nothing was sent).
async fn write_status(
    ctx: &Context,
    view: &View<'_>,
    desired: MailboxPollStatus,
) -> Result<Option<MailboxPollStatus>, ReconcileError> {
    let poll = view.poll;
    let unchanged = poll
        .status
        .as_ref()
        .is_some_and(|current| status::same(current, &desired))
        || view
            .remembered
            .and_then(|m| m.written.as_ref())
            .is_some_and(|written| status::same(written, &desired));
    if unchanged {
        return Ok(None);
    }
    if tracing::enabled!(tracing::Level::DEBUG) {
        tracing::debug!(namespace = poll.namespace().as_deref().unwrap_or(""), name = %poll.name_any(), changed = ?status::changed_fields(poll.status.as_ref(), &desired), "writing the status");
    }
    let api: Api<MailboxPoll> =
        Api::namespaced(ctx.client.clone(), &poll.namespace().unwrap_or_default());
    // Server-side apply, forced as controllers do: the status is the controller's to write,
    // and a field written by an older release's merge patch moves over to this manager.
    let name = poll.name_any();
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(status::apply_body(&name, &desired)?),
    )
    .await?;
    Ok(Some(desired))
}

/// Publishes the Events of transitions since what was seen last; returns the new basis.
async fn publish_events(ctx: &Context, view: &View<'_>) -> Seen {
    let (poll, facts) = (view.poll, view.facts);
    let seen = view
        .remembered
        .map(|m| m.seen.clone())
        .unwrap_or_else(|| Seen::from_status(poll.status.as_ref(), facts));
    let ready = &status::desired_conditions(view.config_error, facts)[0];
    let (notices, seen) = status::transitions(&seen, ready, facts, view.config_error);
    for notice in notices {
        let event = Event {
            type_: if notice.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: notice.reason.into(),
            note: Some(notice.note),
            action: notice.action.into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &poll.object_ref(&())).await {
            tracing::warn!(name = %poll.name_any(), reason = notice.reason, %error, "cannot publish an Event");
        }
    }
    seen
}

/// When to look again: `overdue` after the next poll is due, sooner while messages wait or
/// the configuration is broken, at least once per `max_requeue`. A poll normally has started
/// and finished by then, and its end is announced and reconciled at once; this look is the
/// fallback for an announcement lost (or not listened for) and the first sign of an overdue
/// poll. A look at the due time itself would cost a reconcile per poll to see it running.
fn next_look(
    settings: &ReconcileSettings,
    facts: &Facts,
    config_broken: bool,
    now: chrono::DateTime<Utc>,
) -> Duration {
    let mut after = settings.max_requeue;
    if let Some(next) = facts.next_poll {
        after = after.min(match (next - now).to_std() {
            Ok(until) => until + settings.overdue,
            Err(_) => overdue_look(
                (now - next).to_std().unwrap_or_default(),
                settings.overdue_requeue_max,
            ),
        });
    }
    // A poll that started between the schedule's read and this one: its end is announced,
    // but an announcement can be dropped (a full trigger queue under load), and its successor
    // is planned only by a reconcile after it.
    if facts.running {
        after = after.min(settings.running_requeue);
    }
    if facts.counts.pending > 0 {
        after = after.min(settings.pending_requeue);
    }
    if config_broken {
        after = after.min(settings.config_requeue);
    }
    after.max(Duration::from_secs(1))
}

/// How much longer the status write waits for the deliveries of the poll that finished last
/// (`None`: write now). It waits while messages are pending and the poll finished less than
/// `hold` ago; messages pending for longer (a receiver that is down) are written as pending.
fn hold_for_deliveries(
    facts: &Facts,
    now: chrono::DateTime<Utc>,
    hold: Duration,
) -> Option<Duration> {
    if facts.counts.pending == 0 {
        return None;
    }
    let finished = facts.last.as_ref()?.finished_at;
    let until = finished + chrono::Duration::from_std(hold).ok()?;
    (until - now).to_std().ok().filter(|left| !left.is_zero())
}

/// When to look again at a poll overdue by `late`: as late again, at least a second, at most
/// `max`. Looking every second while the workers are saturated would only add load where
/// there is too much already.
fn overdue_look(late: Duration, max: Duration) -> Duration {
    late.clamp(Duration::from_secs(1), max.max(Duration::from_secs(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> chrono::DateTime<Utc> {
        chrono::DateTime::from_timestamp(1_800_000_000 + seconds, 0).expect("valid time")
    }

    fn next_poll_at(seconds: i64) -> Facts {
        Facts {
            next_poll: Some(at(seconds)),
            ..Facts::default()
        }
    }

    #[test]
    fn a_future_poll_is_looked_at_once_it_should_have_finished() {
        let settings = ReconcileSettings::default();
        let after = next_look(&settings, &next_poll_at(30), false, at(0));
        assert_eq!(after, Duration::from_secs(30) + settings.overdue);
        let far = next_look(&settings, &next_poll_at(3600), false, at(0));
        assert_eq!(far, settings.max_requeue);
    }

    #[test]
    fn an_overdue_poll_is_looked_at_less_often_the_later_it_is() {
        let settings = ReconcileSettings::default();
        let looks: Vec<u64> = [0, 1, 2, 5, 20, 45, 60, 600]
            .into_iter()
            .map(|late| next_look(&settings, &next_poll_at(-late), false, at(0)).as_secs())
            .collect();
        // Due just now: once it should have finished; late: as late again, up to a minute.
        assert_eq!(looks, vec![10, 1, 2, 5, 20, 45, 60, 60]);
    }

    #[test]
    fn pending_messages_and_broken_configurations_shorten_the_wait() {
        let settings = ReconcileSettings::default();
        let mut facts = next_poll_at(-600);
        facts.counts.pending = 3;
        assert_eq!(
            next_look(&settings, &facts, false, at(0)),
            settings.pending_requeue
        );
        assert_eq!(
            next_look(&settings, &next_poll_at(-600), true, at(0)),
            settings.config_requeue
        );
    }

    #[test]
    fn a_poll_found_running_is_looked_at_again_soon() {
        // The schedule read saw no running task, the status read a moment later did: no
        // pending task (next_poll) to time the next look by.
        let settings = ReconcileSettings::default();
        let running = Facts {
            running: true,
            ..Facts::default()
        };
        assert_eq!(
            next_look(&settings, &running, false, at(0)),
            settings.running_requeue
        );
        assert_eq!(
            next_look(&settings, &Facts::default(), false, at(0)),
            settings.max_requeue
        );
    }

    fn observed_poll(generation: i64, observed: Option<i64>) -> MailboxPoll {
        let mut poll = MailboxPoll::new(
            "p",
            serde_json::from_value(serde_json::json!({
                "mailbox": "a@contoso.com",
                "credentialsSecretRef": {"name": "s"}
            }))
            .expect("spec"),
        );
        poll.metadata.generation = Some(generation);
        poll.status = observed.map(|generation| MailboxPollStatus {
            observed_generation: Some(generation),
            ..MailboxPollStatus::default()
        });
        poll
    }

    #[test]
    fn what_a_user_waits_for_takes_the_urgent_lane() {
        assert_eq!(lane(&observed_poll(1, None)), Lane::Urgent, "a new object");
        assert_eq!(lane(&observed_poll(2, Some(1))), Lane::Urgent, "an edit");
        let mut steady = observed_poll(2, Some(2));
        assert_eq!(lane(&steady), Lane::Routine);
        steady
            .annotations_mut()
            .insert(POLL_REQUESTED_AT_ANNOTATION.into(), " now ".into());
        assert_eq!(lane(&steady), Lane::Urgent, "a forced poll not handled yet");
        if let Some(status) = steady.status.as_mut() {
            status.last_handled_poll_request = Some("now".into());
        }
        assert_eq!(lane(&steady), Lane::Routine, "handled");
    }

    fn finished_at(seconds: i64, pending: i64) -> Facts {
        let mut facts = Facts {
            last: Some(crate::poll_log::FinishedPoll {
                id: 1,
                finished_at: at(seconds),
                succeeded: true,
                messages_new: 4,
                resynced: false,
                error_reason: None,
                error_message: None,
            }),
            ..Facts::default()
        };
        facts.counts.pending = pending;
        facts
    }

    #[test]
    fn a_finished_polls_status_waits_a_little_for_its_deliveries() {
        let hold = Duration::from_secs(3);
        assert_eq!(
            hold_for_deliveries(&finished_at(0, 4), at(1), hold),
            Some(Duration::from_secs(2)),
            "finished a second ago, four messages pending"
        );
        assert_eq!(
            hold_for_deliveries(&finished_at(0, 0), at(1), hold),
            None,
            "delivered: write now"
        );
        assert_eq!(
            hold_for_deliveries(&finished_at(0, 4), at(3), hold),
            None,
            "the hold is over: written as pending"
        );
        assert_eq!(
            hold_for_deliveries(&finished_at(0, 4), at(60), hold),
            None,
            "pending since long ago (a receiver that is down)"
        );
        let mut no_poll = finished_at(0, 4);
        no_poll.last = None;
        assert_eq!(hold_for_deliveries(&no_poll, at(1), hold), None);
    }
}
