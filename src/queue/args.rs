//! Typed task arguments, in the spirit of River's `JobArgs`: a task kind is a Rust type that
//! says what its payload is, which dedupe key and owner it has and how many attempts it gets.
//! Every enqueue ([`NewTask::of`]) and every payload parse ([`ClaimedTask::args`]) goes
//! through it, so a kind, its payload and its dedupe key cannot drift apart.

use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use super::transition::HandlerError;
use super::{ClaimedTask, DEFAULT_MAX_ATTEMPTS, NewTask, QueueError};

/// The arguments of one kind of task (its payload).
pub trait TaskArgs: Serialize + DeserializeOwned {
    /// The kind workers claim it by (`tasks.kind`).
    const KIND: &'static str;

    /// The MailboxPoll the task works for: its tasks are cancelled when it is deleted.
    fn owner(&self) -> Option<Uuid> {
        None
    }

    /// While a pending or running task has this key, enqueueing another returns that one.
    fn dedupe_key(&self) -> Option<String> {
        None
    }

    /// Attempts before the task is kept as dead, unless the enqueuer says otherwise.
    fn default_max_attempts() -> i32 {
        DEFAULT_MAX_ATTEMPTS
    }
}

impl NewTask {
    /// A task carrying `args`, with the kind's owner, dedupe key and attempts.
    pub fn of<A: TaskArgs>(args: &A) -> Result<Self, QueueError> {
        let payload = serde_json::to_value(args)
            .map_err(|e| QueueError::Invalid(format!("{} task payload: {e}", A::KIND)))?;
        let mut task = NewTask::new(A::KIND, payload).max_attempts(A::default_max_attempts());
        task.owner_uid = args.owner();
        task.dedupe_key = args.dedupe_key();
        Ok(task)
    }
}

impl ClaimedTask {
    /// The task's arguments. A payload that does not parse (or a task of another kind) can
    /// never succeed, so its task is dead at once.
    pub fn args<A: TaskArgs>(&self) -> Result<A, HandlerError> {
        if self.kind != A::KIND {
            return Err(HandlerError::permanent(format!(
                "a {} task was handed to the {} handler",
                self.kind,
                A::KIND
            )));
        }
        A::deserialize(&self.payload).map_err(|e| {
            HandlerError::permanent(format!("malformed {} task payload: {e}", A::KIND))
        })
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Probe {
        uid: Uuid,
    }

    impl TaskArgs for Probe {
        const KIND: &'static str = "probe";
        fn owner(&self) -> Option<Uuid> {
            Some(self.uid)
        }
        fn dedupe_key(&self) -> Option<String> {
            Some(format!("probe:{}", self.uid))
        }
        fn default_max_attempts() -> i32 {
            3
        }
    }

    fn claimed(kind: &str, payload: serde_json::Value) -> ClaimedTask {
        ClaimedTask {
            id: 1,
            kind: kind.into(),
            payload,
            owner_uid: None,
            dedupe_key: None,
            attempts: 0,
            max_attempts: 3,
            lock_token: Uuid::nil(),
            lease_expires_at: chrono::DateTime::UNIX_EPOCH,
            created_at: chrono::DateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_task_carries_what_its_args_say() {
        let uid = Uuid::new_v4();
        let task = NewTask::of(&Probe { uid }).expect("task");
        assert_eq!(task.kind, "probe");
        assert_eq!(task.owner_uid, Some(uid));
        assert_eq!(task.dedupe_key, Some(format!("probe:{uid}")));
        assert_eq!(task.max_attempts, 3);
        let back: Probe = claimed("probe", task.payload).args().expect("args");
        assert_eq!(back, Probe { uid });
    }

    #[test]
    fn malformed_payloads_and_other_kinds_are_permanent_failures() {
        let bad = claimed("probe", serde_json::json!({"uid": "not a uuid"}));
        assert!(matches!(
            bad.args::<Probe>(),
            Err(HandlerError::Permanent(_))
        ));
        let other = claimed("other", serde_json::json!({"uid": Uuid::nil()}));
        assert!(matches!(
            other.args::<Probe>(),
            Err(HandlerError::Permanent(_))
        ));
    }
}
