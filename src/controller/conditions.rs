//! Conditions on a MailboxPoll's status: what is wrong and what to fix, as pure functions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Mail is being picked up: the last poll that says so succeeded.
pub const READY: &str = "Ready";
/// Something passing is wrong (throttling, an outage, parked after-actions); mail still flows.
pub const DEGRADED: &str = "Degraded";
/// Progress stopped until a person fixes something (credentials, permissions, the spec).
pub const STALLED: &str = "Stalled";

/// A condition's status, as Kubernetes API conventions spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    /// Not known yet (a new MailboxPoll before its first poll).
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }

    pub fn is_true(self) -> bool {
        self == Status::True
    }
}

impl From<bool> for Status {
    fn from(status: bool) -> Self {
        if status { Status::True } else { Status::False }
    }
}

/// A condition as the reconciler wants it, before timestamps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub type_: &'static str,
    pub status: Status,
    pub reason: String,
    pub message: String,
}

impl Desired {
    pub fn new(
        type_: &'static str,
        status: impl Into<Status>,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// The new condition list: desired conditions replace those of the same type, keeping
/// `lastTransitionTime` when the status did not change (so a repeated reconcile writes
/// nothing); conditions of other types (another writer's) are kept as they are.
pub fn merge(
    existing: &[Condition],
    desired: &[Desired],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut merged: Vec<Condition> = existing
        .iter()
        .filter(|c| !desired.iter().any(|d| d.type_ == c.type_))
        .cloned()
        .collect();
    for want in desired {
        let previous = existing.iter().find(|c| c.type_ == want.type_);
        let transition = match previous {
            Some(p) if p.status == want.status.as_str() => p.last_transition_time.clone(),
            _ => Time(now),
        };
        merged.push(Condition {
            type_: want.type_.to_owned(),
            status: want.status.as_str().to_owned(),
            reason: want.reason.clone(),
            message: want.message.clone(),
            observed_generation: generation,
            last_transition_time: transition,
        });
    }
    merged.sort_by(|a, b| a.type_.cmp(&b.type_));
    merged
}

/// Whether two condition lists say the same thing, timestamps aside.
pub fn equivalent(a: &[Condition], b: &[Condition]) -> bool {
    let key = |c: &Condition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
            c.observed_generation,
        )
    };
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("valid timestamp")
    }

    #[test]
    fn transition_time_moves_only_when_status_changes() {
        let first = merge(
            &[],
            &[Desired::new(
                READY,
                false,
                "SecretNotFound",
                "secret x missing",
            )],
            Some(1),
            at(100),
        );
        assert_eq!(first[0].last_transition_time, Time(at(100)));
        let same = merge(
            &first,
            &[Desired::new(
                READY,
                false,
                "SecretKeyMissing",
                "key y missing",
            )],
            Some(1),
            at(200),
        );
        assert_eq!(
            same[0].last_transition_time,
            Time(at(100)),
            "status unchanged keeps the time"
        );
        assert_eq!(same[0].reason, "SecretKeyMissing");
        let flipped = merge(
            &same,
            &[Desired::new(READY, true, "Polling", "ok")],
            Some(2),
            at(300),
        );
        assert_eq!(flipped[0].last_transition_time, Time(at(300)));
        assert_eq!(flipped[0].observed_generation, Some(2));
    }

    #[test]
    fn other_writers_conditions_are_kept() {
        let foreign = Condition {
            type_: "Audited".into(),
            status: "True".into(),
            reason: "ByPolicy".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(at(1)),
        };
        let merged = merge(
            std::slice::from_ref(&foreign),
            &[Desired::new(READY, true, "Polling", "ok")],
            None,
            at(2),
        );
        assert_eq!(merged.len(), 2);
        assert!(merged.contains(&foreign));
    }

    #[test]
    fn equivalence_ignores_timestamps_and_order() {
        let a = merge(
            &[],
            &[
                Desired::new(READY, true, "Polling", "ok"),
                Desired::new(DEGRADED, false, "Healthy", ""),
            ],
            Some(1),
            at(1),
        );
        let mut b = merge(
            &[],
            &[
                Desired::new(DEGRADED, false, "Healthy", ""),
                Desired::new(READY, true, "Polling", "ok"),
            ],
            Some(1),
            at(9),
        );
        b.reverse();
        assert!(equivalent(&a, &b));
        let c = merge(
            &[],
            &[Desired::new(READY, false, "Polling", "ok")],
            Some(1),
            at(1),
        );
        assert!(!equivalent(&a, &c));
    }
}
