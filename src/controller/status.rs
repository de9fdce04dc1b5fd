//! A MailboxPoll's status, computed from what Postgres knows, and the Events its changes call
//! for. Pure functions; [`load`] reads the facts.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use sqlx::PgPool;
use uuid::Uuid;

use super::conditions::{self, DEGRADED, Desired, READY, STALLED, Status};
use super::reconcile::ReconcileError;
use crate::directory::ConfigError;
use crate::ledger;
use crate::notifications;
use crate::pipeline::poll_dedupe_key;
use crate::poll_log::{self, FinishedPoll};
use crate::queue::{self, TaskState};
use crate::reason::Reason;
use crate::resource::{MailboxPoll, MailboxPollStatus, NotificationsStatus};

/// Reason of `Ready=Unknown` from the first reconcile until the first poll finished.
pub const RECONCILING: &str = "Reconciling";
/// Reason of `Ready=Unknown` for a suspended MailboxPoll that has never polled.
pub const SUSPENDED: &str = "Suspended";
/// Reason of `Ready=True`.
pub const POLLING: &str = "Polling";
/// Reason of `Degraded=False`.
pub const HEALTHY: &str = "Healthy";
/// Reason of `Stalled=False`.
pub const PROGRESSING: &str = "Progressing";

/// Longest condition message kept; Graph messages can be long.
const MAX_MESSAGE_CHARS: usize = 1024;

/// Everything Postgres knows that the status shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The latest finished poll.
    pub last: Option<FinishedPoll>,
    /// The latest finished poll whose outcome says whether the MailboxPoll works: succeeded,
    /// or failed for a reason that needs someone to act (not throttling, not a config error).
    pub decisive: Option<FinishedPoll>,
    pub last_success: Option<DateTime<Utc>>,
    /// Run time of the pending poll task.
    pub next_poll: Option<DateTime<Utc>>,
    /// Whether the poll task is running (claimed by a worker).
    pub running: bool,
    /// Whether the poll task is running and its latest round has finished: it is about to
    /// complete, and its successor is planned right after.
    pub settling: bool,
    pub counts: ledger::Counts,
    pub last_handled_request: Option<String>,
    /// Highest poll id that was a resync.
    pub last_resync_poll: Option<i64>,
    /// Highest poll id.
    pub last_poll_id: Option<i64>,
    /// Why after-actions were parked most recently, when some are.
    pub parked_error: Option<String>,
    /// The spec suspends scheduled polls (from the object, not the database).
    pub suspended: bool,
    /// The change-notification subscription, when notifications are on.
    pub notifications: Option<notifications::store::SubscriptionRow>,
}

/// Reads the facts of one MailboxPoll: `uid` is the object's, `ledger_id` its ledger's.
pub async fn load(pool: &PgPool, uid: Uuid, ledger_id: Uuid) -> Result<Facts, ReconcileError> {
    let mut conn = pool.acquire().await?;
    let last = poll_log::latest_finished(&mut conn, uid).await?;
    let decisive = match &last {
        Some(poll) if poll.is_decisive() => Some(poll.clone()),
        _ => poll_log::latest_decisive(&mut conn, uid).await?,
    };
    let summary = poll_log::summary(&mut conn, uid).await?;
    let live = queue::live_task(&mut *conn, &poll_dedupe_key(uid)).await?;
    let last_handled_request = poll_log::last_handled_request(&mut conn, uid).await?;
    let counts = ledger::counts(&mut conn, ledger_id).await?;
    let parked_error = if counts.actions_parked > 0 {
        ledger::latest_parked_error(&mut conn, ledger_id).await?
    } else {
        None
    };
    let running = live.is_some_and(|live| live.state == TaskState::Running);
    let subscription = notifications::store::of_mailbox(&mut *conn, uid).await?;
    Ok(Facts {
        last,
        decisive,
        last_success: summary.last_success,
        next_poll: live
            .filter(|live| live.state == TaskState::Pending)
            .map(|live| live.run_at),
        running,
        settling: running && summary.latest_open == Some(false),
        counts,
        last_handled_request,
        last_resync_poll: summary.last_resync_poll,
        last_poll_id: summary.last_poll_id,
        parked_error,
        suspended: false,
        notifications: subscription,
    })
}

/// Kubernetes times carry whole seconds; comparing finer times would see a change in every
/// status read back from the API server.
pub fn to_time(at: DateTime<Utc>) -> Option<Time> {
    Timestamp::from_second(at.timestamp()).ok().map(Time)
}

fn short(message: &str) -> String {
    message.chars().take(MAX_MESSAGE_CHARS).collect()
}

/// The Ready, Degraded and Stalled conditions.
pub fn desired_conditions(config_error: Option<&ConfigError>, facts: &Facts) -> [Desired; 3] {
    let ready = match (config_error, &facts.decisive) {
        (Some(error), _) => Desired::new(
            READY,
            false,
            error.reason().as_str(),
            short(&error.to_string()),
        ),
        (None, None) if facts.suspended => Desired::new(
            READY,
            Status::Unknown,
            SUSPENDED,
            "scheduled polls are suspended and none has run yet; a forced poll still runs",
        ),
        (None, None) => Desired::new(
            READY,
            Status::Unknown,
            RECONCILING,
            "waiting for the first poll to finish",
        ),
        (None, Some(poll)) if poll.succeeded => {
            Desired::new(READY, true, POLLING, "the last poll succeeded")
        }
        (None, Some(poll)) => Desired::new(
            READY,
            false,
            poll.error_reason.as_deref().unwrap_or("PollFailed"),
            short(
                poll.error_message
                    .as_deref()
                    .unwrap_or("the last poll failed"),
            ),
        ),
    };
    let degraded = match &facts.last {
        Some(poll) if !poll.succeeded && config_error.is_none() => {
            let reason = poll.reason().unwrap_or(Reason::PollFailed);
            if reason.passes_by_itself() {
                Desired::new(
                    DEGRADED,
                    true,
                    reason.as_str(),
                    short(
                        poll.error_message
                            .as_deref()
                            .unwrap_or("the last poll failed"),
                    ),
                )
            } else {
                healthy_or_parked(facts)
            }
        }
        _ => healthy_or_parked(facts),
    };
    let stalled = stalled(&ready, &degraded);
    [ready, degraded, stalled]
}

/// Stalled when what is wrong waits for a person (credentials, permissions, the mailbox, the
/// spec), whether it stops polling (Ready) or only the after-actions (Degraded): passing
/// trouble (throttling, outages) is never a stall.
fn stalled(ready: &Desired, degraded: &Desired) -> Desired {
    let needs_person = |condition: &Desired, failing: Status| {
        condition.status == failing && Reason::parse(&condition.reason).needs_person()
    };
    let stuck = [(ready, Status::False), (degraded, Status::True)]
        .into_iter()
        .find(|(condition, failing)| needs_person(condition, *failing));
    match stuck {
        Some((condition, _)) => Desired::new(
            STALLED,
            true,
            condition.reason.clone(),
            condition.message.clone(),
        ),
        None => Desired::new(STALLED, false, PROGRESSING, "nothing waits for a person"),
    }
}

/// Degraded for parked after-actions (mail is recorded and delivered, but some messages'
/// mark-read or move keeps failing), else healthy. The reason is Graph's when the parking
/// error names one (`AccessDenied` for an app without Mail.ReadWrite), else
/// `AfterActionsFailed`.
fn healthy_or_parked(facts: &Facts) -> Desired {
    let parked = facts.counts.actions_parked;
    if parked == 0 {
        return Desired::new(DEGRADED, false, HEALTHY, "no passing trouble");
    }
    Desired::new(
        DEGRADED,
        true,
        parked_reason(facts.parked_error.as_deref()).as_str(),
        short(&parked_note(parked, facts.parked_error.as_deref())),
    )
}

/// The reason a parking error starts with (`AccessDenied: …`), if it is a known one.
fn parked_reason(error: Option<&str>) -> Reason {
    error
        .and_then(|error| error.split_once(':'))
        .map(|(reason, _)| Reason::parse(reason.trim()))
        .filter(|reason| *reason != Reason::PollFailed)
        .unwrap_or(Reason::AfterActionsFailed)
}

fn parked_note(parked: i64, latest: Option<&str>) -> String {
    format!(
        "after-delivery actions of {parked} message(s) are parked (tried again when the spec changes or a poll is forced); latest: {}",
        latest.unwrap_or("unknown")
    )
}

/// The whole status the reconciler wants, keeping transition times of unchanged conditions.
pub fn desired_status(
    existing: Option<&MailboxPollStatus>,
    generation: Option<i64>,
    config_error: Option<&ConfigError>,
    facts: &Facts,
    now: DateTime<Utc>,
) -> MailboxPollStatus {
    let existing_conditions = existing.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let now = Timestamp::from_second(now.timestamp()).unwrap_or(Timestamp::UNIX_EPOCH);
    let mut desired = desired_conditions(config_error, facts).to_vec();
    desired.extend(notifications_condition(facts));
    let mut conditions = conditions::merge(existing_conditions, &desired, generation, now);
    if facts.notifications.is_none() {
        conditions.retain(|c| c.type_ != notifications::NOTIFICATIONS_READY);
    }
    MailboxPollStatus {
        observed_generation: generation,
        conditions,
        last_poll_time: facts.last.as_ref().and_then(|p| to_time(p.finished_at)),
        last_successful_poll_time: facts.last_success.and_then(to_time),
        next_poll_time: facts.next_poll.and_then(to_time),
        last_poll_messages: facts.last.as_ref().map(|p| i64::from(p.messages_new)),
        messages_delivered: Some(facts.counts.delivered + facts.counts.recorded_only),
        messages_pending: Some(facts.counts.pending),
        messages_failed: Some(facts.counts.failed),
        // Absent while zero: MailboxPolls without startFrom or filter show nothing new.
        messages_filtered: (facts.counts.filtered > 0).then_some(facts.counts.filtered),
        messages_skipped: (facts.counts.before_start > 0).then_some(facts.counts.before_start),
        last_handled_poll_request: facts.last_handled_request.clone(),
        notifications: facts.notifications.as_ref().map(notifications_status),
    }
}

/// `NotificationsReady`, while notifications are on.
fn notifications_condition(facts: &Facts) -> Option<Desired> {
    let row = facts.notifications.as_ref()?;
    let (status, reason, message) = notifications::condition(row);
    let status = status.map_or(Status::Unknown, Status::from);
    Some(Desired::new(
        notifications::NOTIFICATIONS_READY,
        status,
        reason,
        short(&message),
    ))
}

fn notifications_status(row: &notifications::store::SubscriptionRow) -> NotificationsStatus {
    NotificationsStatus {
        subscription_id: row.subscription_id.clone(),
        expiration_time: row.expires_at.and_then(to_time),
        last_notification_time: row.last_notification_at.and_then(to_time),
    }
}

/// Whether two statuses say the same thing (condition timestamps aside): no patch is sent
/// when they do.
pub fn same(a: &MailboxPollStatus, b: &MailboxPollStatus) -> bool {
    conditions::equivalent(&a.conditions, &b.conditions)
        && MailboxPollStatus {
            conditions: Vec::new(),
            ..a.clone()
        } == MailboxPollStatus {
            conditions: Vec::new(),
            ..b.clone()
        }
}

/// The fields of `desired` that differ from `current` (conditions by what they say, not their
/// timestamps), for the debug log of status writes.
pub fn changed_fields(
    current: Option<&MailboxPollStatus>,
    desired: &MailboxPollStatus,
) -> Vec<String> {
    let Some(current) = current else {
        return vec!["(no status yet)".into()];
    };
    let fields = |status: &MailboxPollStatus| match serde_json::to_value(MailboxPollStatus {
        conditions: Vec::new(),
        ..status.clone()
    }) {
        Ok(serde_json::Value::Object(fields)) => fields,
        _ => serde_json::Map::new(),
    };
    let (before, after) = (fields(current), fields(desired));
    let mut changed: Vec<String> = after
        .iter()
        .filter(|(key, value)| before.get(*key) != Some(value))
        .map(|(key, _)| key.clone())
        .chain(
            before
                .keys()
                .filter(|key| !after.contains_key(*key))
                .cloned(),
        )
        .collect();
    if !conditions::equivalent(&current.conditions, &desired.conditions) {
        changed.push("conditions".into());
    }
    changed
}

/// The server-side apply body that makes the status `status`: the fields it leaves empty are
/// left out, so the apply removes them (they were the controller's own), and the conditions
/// merge by type with other managers' (the schema marks them a map keyed by type).
pub fn apply_body(
    name: &str,
    status: &MailboxPollStatus,
) -> Result<serde_json::Value, serde_json::Error> {
    use kube::Resource;
    Ok(serde_json::json!({
        "apiVersion": MailboxPoll::api_version(&()),
        "kind": MailboxPoll::kind(&()),
        "metadata": {"name": name},
        "status": serde_json::to_value(status)?,
    }))
}

/// What the Events of one MailboxPoll were last based on; kept by the leader so an Event is
/// published on a transition only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Ready status and reason.
    pub ready: Option<(bool, String)>,
    pub last_poll_id: Option<i64>,
    pub messages_failed: i64,
    /// Messages with parked after-actions.
    pub actions_parked: i64,
}

impl Seen {
    /// What the stored status already reports (a new leader must not repeat Events its
    /// predecessor published), and polls up to now.
    pub fn from_status(status: Option<&MailboxPollStatus>, facts: &Facts) -> Self {
        let ready = status
            .and_then(|s| conditions::find(&s.conditions, READY))
            .map(|c| (c.status == "True", c.reason.clone()));
        // The status has no count of parked messages: a Degraded condition for them says
        // they were reported already.
        let parked_reported = status
            .and_then(|s| conditions::find(&s.conditions, DEGRADED))
            .is_some_and(|c| c.status == "True" && !Reason::parse(&c.reason).passes_by_itself());
        Self {
            ready,
            last_poll_id: facts.last_poll_id,
            messages_failed: status.and_then(|s| s.messages_failed).unwrap_or(0),
            actions_parked: if parked_reported {
                facts.counts.actions_parked
            } else {
                0
            },
        }
    }
}

/// An Event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    /// What mailpoll was doing (the Event's action).
    pub action: &'static str,
    pub note: String,
}

/// The Events a change from `seen` to the new status calls for, and the new `Seen`.
pub fn transitions(
    seen: &Seen,
    ready: &Desired,
    facts: &Facts,
    config_error: Option<&ConfigError>,
) -> (Vec<Notice>, Seen) {
    let now_ready = (ready.status.is_true(), ready.reason.clone());
    let was_failing = seen
        .ready
        .as_ref()
        .is_some_and(|(status, reason)| !status && reason != RECONCILING && reason != SUSPENDED);
    let mut notices = Vec::new();
    if seen.ready.as_ref() != Some(&now_ready) {
        notices.extend(readiness_notice(ready, was_failing, config_error));
    }
    notices.extend(ledger_notices(seen, facts));
    // Waiting for the first poll after a failure is not a recovery yet: keep the failure,
    // so the success that follows reports one.
    let awaiting = ready.status == Status::Unknown;
    let next = Seen {
        ready: if awaiting && was_failing {
            seen.ready.clone()
        } else {
            Some(now_ready)
        },
        last_poll_id: facts.last_poll_id.or(seen.last_poll_id),
        messages_failed: facts.counts.failed,
        actions_parked: facts.counts.actions_parked,
    };
    (notices, next)
}

/// The Event of a change of readiness: a recovery after a failure, or a new failure.
fn readiness_notice(
    ready: &Desired,
    was_failing: bool,
    config_error: Option<&ConfigError>,
) -> Option<Notice> {
    if ready.status.is_true() {
        return was_failing.then(|| Notice {
            action: "Poll",
            warning: false,
            reason: "Recovered",
            note: "polling works again".into(),
        });
    }
    (ready.status == Status::False).then(|| Notice {
        action: "Poll",
        warning: true,
        reason: match config_error {
            Some(error) => error.reason().as_str(),
            None => Reason::parse(&ready.reason).as_str(),
        },
        note: format!("{}: {}", ready.reason, ready.message),
    })
}

/// Events for what the polls and the ledger report since `seen`: a resync, deliveries that
/// failed for good, after-actions parked.
fn ledger_notices(seen: &Seen, facts: &Facts) -> Vec<Notice> {
    let mut notices = Vec::new();
    if let Some(resync) = facts.last_resync_poll
        && seen.last_poll_id.is_none_or(|seen| resync > seen)
    {
        notices.push(Notice {
            action: "Poll",
            warning: false,
            reason: "ResyncStarted",
            note: "the delta cursor expired or its query changed: re-reading the whole folder \
                   (messages already recorded are not delivered again)"
                .into(),
        });
    }
    if facts.counts.failed > seen.messages_failed {
        notices.push(Notice {
            action: "Deliver",
            warning: true,
            reason: "DeliveryFailed",
            note: format!(
                "{} message(s) could not be delivered after all attempts; `mailpoll tasks list --state dead` shows them",
                facts.counts.failed - seen.messages_failed
            ),
        });
    }
    if facts.counts.actions_parked > seen.actions_parked {
        notices.push(Notice {
            action: "AfterDelivery",
            warning: true,
            reason: parked_reason(facts.parked_error.as_deref()).as_str(),
            note: parked_note(
                facts.counts.actions_parked - seen.actions_parked,
                facts.parked_error.as_deref(),
            ),
        });
    }
    notices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_fields_name_what_a_write_changes() {
        let current = MailboxPollStatus {
            messages_pending: Some(0),
            messages_delivered: Some(3),
            ..Default::default()
        };
        let desired = MailboxPollStatus {
            messages_pending: Some(1),
            messages_delivered: Some(3),
            last_poll_messages: Some(1),
            ..Default::default()
        };
        assert_eq!(
            changed_fields(Some(&current), &desired),
            ["lastPollMessages", "messagesPending"]
        );
        assert!(changed_fields(Some(&current), &current).is_empty());
        assert_eq!(changed_fields(None, &current), ["(no status yet)"]);
    }

    fn poll(id: i64, succeeded: bool, reason: Option<&str>) -> FinishedPoll {
        FinishedPoll {
            id,
            finished_at: DateTime::from_timestamp(1_800_000_000 + id, 500).expect("time"),
            succeeded,
            messages_new: 3,
            resynced: false,
            error_reason: reason.map(str::to_owned),
            error_message: reason.map(|r| format!("{r} happened")),
        }
    }

    fn facts(last: FinishedPoll, decisive: Option<FinishedPoll>) -> Facts {
        Facts {
            last_poll_id: Some(last.id),
            last: Some(last),
            decisive,
            ..Facts::default()
        }
    }

    fn missing_secret() -> ConfigError {
        ConfigError::SecretNotFound {
            namespace: "ns".into(),
            name: "graph".into(),
        }
    }

    #[test]
    fn config_errors_win_over_poll_outcomes() {
        let ok = poll(1, true, None);
        let f = facts(ok.clone(), Some(ok));
        let [ready, degraded, stalled] = desired_conditions(Some(&missing_secret()), &f);
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (Status::False, "SecretNotFound")
        );
        assert_eq!(degraded.status, Status::False);
        assert_eq!(
            (stalled.status, stalled.reason.as_str()),
            (Status::True, "SecretNotFound"),
            "a missing Secret waits for a person"
        );
    }

    #[test]
    fn filtered_and_skipped_counts_show_once_there_are_any() {
        let mut f = facts(poll(1, true, None), None);
        let status = desired_status(None, Some(1), None, &f, Utc::now());
        assert_eq!(
            (status.messages_filtered, status.messages_skipped),
            (None, None)
        );
        f.counts.filtered = 9;
        f.counts.before_start = 5;
        f.counts.delivered = 6;
        let status = desired_status(None, Some(1), None, &f, Utc::now());
        assert_eq!(
            (
                status.messages_delivered,
                status.messages_filtered,
                status.messages_skipped
            ),
            (Some(6), Some(9), Some(5))
        );
    }

    #[test]
    fn an_invalid_filter_stalls_naming_the_field() {
        let error = ConfigError::InvalidFilter {
            detail: "spec.filter: unknown variable \"msg\"".into(),
        };
        let [ready, _, stalled] = desired_conditions(Some(&error), &Facts::default());
        assert_eq!(
            (ready.status, ready.reason.as_str(), ready.message.as_str()),
            (
                Status::False,
                "InvalidFilter",
                "spec.filter: unknown variable \"msg\""
            )
        );
        assert_eq!(
            (stalled.status, stalled.reason.as_str()),
            (Status::True, "InvalidFilter")
        );
    }

    #[test]
    fn throttling_degrades_without_unreadying() {
        let ok = poll(1, true, None);
        let f = facts(poll(2, false, Some("Throttled")), Some(ok));
        let [ready, degraded, stalled] = desired_conditions(None, &f);
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (Status::True, POLLING)
        );
        assert_eq!(
            (degraded.status, degraded.reason.as_str()),
            (Status::True, "Throttled")
        );
        assert_eq!(
            (stalled.status, stalled.reason.as_str()),
            (Status::False, PROGRESSING),
            "throttling passes by itself"
        );
    }

    #[test]
    fn graph_errors_that_need_a_person_unready() {
        let bad = poll(2, false, Some("AuthenticationFailed"));
        let f = facts(bad.clone(), Some(bad));
        let [ready, degraded, stalled] = desired_conditions(None, &f);
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (Status::False, "AuthenticationFailed")
        );
        assert_eq!(ready.message, "AuthenticationFailed happened");
        assert_eq!(degraded.status, Status::False);
        assert_eq!(
            (stalled.status, stalled.message.as_str()),
            (Status::True, "AuthenticationFailed happened")
        );
    }

    #[test]
    fn notifications_show_while_on_and_their_condition_goes_when_off() {
        let row = notifications::store::SubscriptionRow {
            mailbox_uid: Uuid::nil(),
            namespace: "ns".into(),
            name: "support".into(),
            subscription_id: None,
            client_state: "never shown".into(),
            folder: "inbox".into(),
            expires_at: None,
            renew_requested: false,
            last_notification_at: None,
            last_error: Some("ValidationError: the URL did not answer".into()),
        };
        let now = Utc::now();
        let failing = Facts {
            notifications: Some(row.clone()),
            ..Facts::default()
        };
        let status = desired_status(None, Some(1), None, &failing, now);
        let condition = conditions::find(&status.conditions, notifications::NOTIFICATIONS_READY)
            .expect("NotificationsReady");
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", "SubscriptionFailed")
        );
        assert!(condition.message.contains("polling every interval"));
        let text = serde_json::to_string(&status).expect("JSON");
        assert!(!text.contains("never shown"), "no clientState in status");

        let subscribed = Facts {
            notifications: Some(notifications::store::SubscriptionRow {
                subscription_id: Some("sub-1".into()),
                last_error: None,
                ..row
            }),
            ..Facts::default()
        };
        let status = desired_status(Some(&status), Some(1), None, &subscribed, now);
        let shown = status.notifications.clone().expect("notifications status");
        assert_eq!(shown.subscription_id.as_deref(), Some("sub-1"));
        assert_eq!(
            conditions::find(&status.conditions, notifications::NOTIFICATIONS_READY)
                .map(|c| c.reason.as_str()),
            Some("Subscribed")
        );

        let off = desired_status(Some(&status), Some(2), None, &Facts::default(), now);
        assert!(off.notifications.is_none());
        assert!(conditions::find(&off.conditions, notifications::NOTIFICATIONS_READY).is_none());
        let body = apply_body("orders", &off).expect("apply body");
        assert!(
            body["status"].get("notifications").is_none(),
            "left out of the apply, so it is removed"
        );
    }

    #[test]
    fn nothing_decisive_yet_is_unknown_while_reconciling() {
        let [ready, _, stalled] = desired_conditions(None, &Facts::default());
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (Status::Unknown, RECONCILING)
        );
        assert_eq!(stalled.status, Status::False);
        let suspended = Facts {
            suspended: true,
            ..Facts::default()
        };
        let [ready, ..] = desired_conditions(None, &suspended);
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (Status::Unknown, SUSPENDED)
        );
    }

    #[test]
    fn status_times_are_whole_seconds_and_equal_statuses_are_the_same() {
        let ok = poll(1, true, None);
        let f = facts(ok.clone(), Some(ok));
        let now = DateTime::from_timestamp(1_800_000_100, 0).expect("time");
        let a = desired_status(None, Some(1), None, &f, now);
        assert_eq!(
            a.last_poll_time,
            Some(Time(Timestamp::from_second(1_800_000_001).expect("ts")))
        );
        let later = now + chrono::Duration::seconds(30);
        let b = desired_status(Some(&a), Some(1), None, &f, later);
        assert!(same(&a, &b), "a repeated reconcile changes nothing");
        let c = desired_status(Some(&a), Some(2), None, &f, later);
        assert!(!same(&a, &c), "a new generation is a change");
    }

    #[test]
    fn the_apply_body_names_the_object_and_leaves_empty_fields_out() {
        let status = MailboxPollStatus {
            observed_generation: Some(3),
            messages_pending: Some(0),
            ..MailboxPollStatus::default()
        };
        let body = apply_body("orders", &status).expect("body");
        assert_eq!(body["apiVersion"], "mailpoll.dev/v1alpha1");
        assert_eq!(body["kind"], "MailboxPoll");
        assert_eq!(body["metadata"], serde_json::json!({"name": "orders"}));
        assert_eq!(
            body["status"],
            serde_json::json!({"observedGeneration": 3, "messagesPending": 0})
        );
    }

    #[test]
    fn events_fire_on_transitions_only() {
        let error = missing_secret();
        let f = Facts::default();
        let [ready, ..] = desired_conditions(Some(&error), &f);
        let fresh = Seen::from_status(None, &f);
        let (notices, seen) = transitions(&fresh, &ready, &f, Some(&error));
        assert_eq!(notices.len(), 1);
        assert_eq!(notices[0].reason, "SecretNotFound");
        assert!(notices[0].warning);
        let (again, seen) = transitions(&seen, &ready, &f, Some(&error));
        assert!(again.is_empty(), "the same state publishes nothing");

        // The Secret appears: the first poll is awaited, then succeeds.
        let empty = Facts::default();
        let [awaiting, ..] = desired_conditions(None, &empty);
        let (notices, seen) = transitions(&seen, &awaiting, &empty, None);
        assert!(notices.is_empty());
        let ok = poll(1, true, None);
        let f = facts(ok.clone(), Some(ok));
        let [ready, ..] = desired_conditions(None, &f);
        let (notices, seen) = transitions(&seen, &ready, &f, None);
        assert_eq!(
            notices.iter().map(|n| n.reason).collect::<Vec<_>>(),
            ["Recovered"]
        );
        let (notices, _) = transitions(&seen, &ready, &f, None);
        assert!(notices.is_empty());
    }

    #[test]
    fn parked_after_actions_degrade_and_publish_one_warning() {
        let ok = poll(1, true, None);
        let mut f = facts(ok.clone(), Some(ok));
        f.counts.failed = 2;
        f.counts.actions_parked = 2;
        f.parked_error = Some("MoveDestinationNotFound: the move destination folder".into());
        let [ready, degraded, stalled] = desired_conditions(None, &f);
        assert!(ready.status.is_true(), "mail is still polled and delivered");
        assert_eq!(
            (degraded.status, degraded.reason.as_str()),
            (Status::True, "MoveDestinationNotFound"),
            "the reason the actions were parked for"
        );
        assert!(degraded.message.contains("the move destination folder"));
        assert_eq!(
            (stalled.status, stalled.reason.as_str()),
            (Status::True, "MoveDestinationNotFound"),
            "a missing folder waits for a person"
        );
        let seen = Seen::from_status(None, &f);
        let (notices, seen) = transitions(&seen, &ready, &f, None);
        assert!(
            notices.iter().any(|n| n.warning
                && n.reason == "MoveDestinationNotFound"
                && n.action == "AfterDelivery"),
            "{notices:?}"
        );
        let (again, _) = transitions(&seen, &ready, &f, None);
        assert!(again.is_empty(), "reported once");
        // Graph's own reason, when the actions were refused.
        f.parked_error = Some("AccessDenied: after-delivery actions refused".into());
        let [_, degraded, _] = desired_conditions(None, &f);
        assert_eq!(degraded.reason, "AccessDenied");
        f.parked_error = Some("something unforeseen".into());
        let [_, degraded, _] = desired_conditions(None, &f);
        assert_eq!(degraded.reason, "AfterActionsFailed");
    }

    #[test]
    fn first_success_is_not_a_recovery_and_resyncs_and_failures_are_reported() {
        let mut ok = poll(4, true, None);
        ok.resynced = true;
        let mut f = facts(ok.clone(), Some(ok));
        f.last_resync_poll = Some(4);
        f.counts.failed = 2;
        let [ready, ..] = desired_conditions(None, &f);
        let seen = Seen {
            ready: Some((false, RECONCILING.into())),
            last_poll_id: Some(3),
            messages_failed: 1,
            actions_parked: 0,
        };
        let (notices, seen) = transitions(&seen, &ready, &f, None);
        assert_eq!(
            notices
                .iter()
                .map(|n| (n.reason, n.action))
                .collect::<Vec<_>>(),
            [("ResyncStarted", "Poll"), ("DeliveryFailed", "Deliver")]
        );
        let (notices, _) = transitions(&seen, &ready, &f, None);
        assert!(notices.is_empty());
    }

    #[test]
    fn a_failed_poll_publishes_its_own_reason() {
        let bad = poll(2, false, Some("AccessDenied"));
        let f = facts(bad.clone(), Some(bad));
        let [ready, ..] = desired_conditions(None, &f);
        let seen = Seen {
            ready: Some((true, POLLING.into())),
            last_poll_id: Some(2),
            messages_failed: 0,
            actions_parked: 0,
        };
        let (notices, _) = transitions(&seen, &ready, &f, None);
        assert_eq!(
            notices
                .iter()
                .map(|n| (n.reason, n.action, n.warning))
                .collect::<Vec<_>>(),
            [("AccessDenied", "Poll", true)]
        );
    }
}
