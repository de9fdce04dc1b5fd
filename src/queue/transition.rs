//! What happens to a task after a run: the pure decision, apart from the SQL that applies it
//! ([`super::store::finish`]).

use std::fmt;
use std::time::Duration;

use super::TaskState;
use super::backoff::RetryPolicy;

/// Longest error text kept on a task; a handler error can embed a whole response body.
pub const MAX_ERROR_BYTES: usize = 4096;

/// How a handler run ended badly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerError {
    /// Try again later (with backoff) while attempts remain.
    Retryable(String),
    /// Retrying cannot help (bad payload, resource gone): the task is dead at once.
    Permanent(String),
    /// Not a failure: run again after this long without counting an attempt (a `Retry-After`
    /// from Microsoft Graph, say).
    Snooze(Duration),
}

impl HandlerError {
    pub fn retryable(error: impl fmt::Display) -> Self {
        HandlerError::Retryable(error.to_string())
    }

    pub fn permanent(error: impl fmt::Display) -> Self {
        HandlerError::Permanent(error.to_string())
    }

    pub fn snooze(after: Duration) -> Self {
        HandlerError::Snooze(after)
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerError::Retryable(error) => write!(f, "{error}"),
            HandlerError::Permanent(error) => write!(f, "permanent: {error}"),
            HandlerError::Snooze(after) => write!(f, "snoozed for {after:?}"),
        }
    }
}

/// Any error a handler propagates with `?` is retryable; its whole chain is kept.
impl From<anyhow::Error> for HandlerError {
    fn from(error: anyhow::Error) -> Self {
        HandlerError::Retryable(format!("{error:#}"))
    }
}

/// The state change of a held task. Applied by [`super::store::finish`], fenced by the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Done: `succeeded`.
    Succeed,
    /// Failed with attempts left: back to `pending` after `delay`, one attempt counted.
    Retry { delay: Duration, error: String },
    /// Failed for good (permanent error or last attempt): `dead`, one attempt counted.
    Dead { error: String },
    /// Back to `pending` after `delay`, no attempt counted.
    Snooze { delay: Duration },
    /// Handed back unfinished (shutdown): `pending` at its old place, no attempt counted.
    Release,
}

impl Transition {
    /// The state the task ends in.
    pub fn state(&self) -> TaskState {
        match self {
            Transition::Succeed => TaskState::Succeeded,
            Transition::Dead { .. } => TaskState::Dead,
            Transition::Retry { .. } | Transition::Snooze { .. } | Transition::Release => {
                TaskState::Pending
            }
        }
    }

    /// Whether the run counts as an attempt that ended badly.
    pub fn counts_attempt(&self) -> bool {
        matches!(self, Transition::Retry { .. } | Transition::Dead { .. })
    }

    /// The wait before the task is due again, when it goes back to pending at a new time.
    pub fn delay(&self) -> Option<Duration> {
        match self {
            Transition::Retry { delay, .. } | Transition::Snooze { delay } => Some(*delay),
            Transition::Succeed | Transition::Dead { .. } | Transition::Release => None,
        }
    }

    /// The error to keep on the task.
    pub fn error(&self) -> Option<&str> {
        match self {
            Transition::Retry { error, .. } | Transition::Dead { error } => Some(error),
            Transition::Succeed | Transition::Snooze { .. } | Transition::Release => None,
        }
    }
}

/// The transition after a handler run of a task that had `attempts` bad attempts before it.
/// `jitter` is a uniform sample in `[0, 1)` for the backoff.
pub fn after_run(
    result: Result<(), HandlerError>,
    attempts: i32,
    max_attempts: i32,
    policy: &RetryPolicy,
    jitter: f64,
) -> Transition {
    match result {
        Ok(()) => Transition::Succeed,
        Err(HandlerError::Retryable(error)) => {
            after_failure(error, attempts, max_attempts, policy, jitter)
        }
        Err(HandlerError::Permanent(error)) => Transition::Dead {
            error: truncate_error(error),
        },
        Err(HandlerError::Snooze(delay)) => Transition::Snooze { delay },
    }
}

/// A failed attempt: retried with backoff while attempts remain, dead after the last one.
pub fn after_failure(
    error: String,
    attempts: i32,
    max_attempts: i32,
    policy: &RetryPolicy,
    jitter: f64,
) -> Transition {
    let failures = attempts.saturating_add(1);
    let error = truncate_error(error);
    if failures >= max_attempts {
        Transition::Dead { error }
    } else {
        let failures = u32::try_from(failures).unwrap_or(1);
        Transition::Retry {
            delay: policy.delay(failures, jitter),
            error,
        }
    }
}

/// Makes an error storable: NUL and other control characters replaced (a handler error can
/// quote a receiver's or Graph's body, and Postgres refuses NUL) and cut to
/// [`MAX_ERROR_BYTES`] on a character boundary, saying that it did.
pub fn truncate_error(error: String) -> String {
    crate::storable::owned(error, MAX_ERROR_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(30),
        }
    }

    #[test]
    fn success_completes() {
        let t = after_run(Ok(()), 0, 3, &policy(), 0.5);
        assert_eq!(t, Transition::Succeed);
        assert_eq!(t.state(), TaskState::Succeeded);
        assert!(!t.counts_attempt());
    }

    #[test]
    fn retryable_failures_back_off_until_the_last_attempt() {
        let p = policy();
        let first = after_run(Err(HandlerError::retryable("503")), 0, 3, &p, 0.5);
        assert_eq!(
            first,
            Transition::Retry {
                delay: Duration::from_millis(500),
                error: "503".into()
            }
        );
        assert!(first.counts_attempt());
        assert_eq!(first.state(), TaskState::Pending);

        let second = after_run(Err(HandlerError::retryable("503")), 1, 3, &p, 0.5);
        assert_eq!(second.delay(), Some(Duration::from_secs(1)));

        let last = after_run(Err(HandlerError::retryable("still 503")), 2, 3, &p, 0.5);
        assert_eq!(
            last,
            Transition::Dead {
                error: "still 503".into()
            }
        );
        assert!(last.counts_attempt());
    }

    #[test]
    fn one_attempt_tasks_die_on_the_first_failure() {
        let t = after_run(Err(HandlerError::retryable("no")), 0, 1, &policy(), 0.1);
        assert_eq!(t.state(), TaskState::Dead);
    }

    #[test]
    fn permanent_errors_are_dead_at_once() {
        let t = after_run(
            Err(HandlerError::permanent("bad payload")),
            0,
            8,
            &policy(),
            0.5,
        );
        assert_eq!(
            t,
            Transition::Dead {
                error: "bad payload".into()
            }
        );
    }

    #[test]
    fn snoozing_counts_no_attempt() {
        let t = after_run(
            Err(HandlerError::snooze(Duration::from_secs(7))),
            7,
            8,
            &policy(),
            0.5,
        );
        assert_eq!(
            t,
            Transition::Snooze {
                delay: Duration::from_secs(7)
            }
        );
        assert!(!t.counts_attempt());
        assert_eq!(t.error(), None);
        assert_eq!(t.state(), TaskState::Pending);
    }

    #[test]
    fn release_keeps_the_place_and_counts_nothing() {
        let t = Transition::Release;
        assert_eq!(t.state(), TaskState::Pending);
        assert_eq!(t.delay(), None);
        assert!(!t.counts_attempt());
    }

    #[test]
    fn anyhow_errors_keep_their_chain() {
        let error = anyhow::anyhow!("connection refused").context("webhook POST failed");
        assert_eq!(
            HandlerError::from(error),
            HandlerError::Retryable("webhook POST failed: connection refused".into())
        );
    }

    #[test]
    fn long_errors_are_truncated_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = truncate_error(long);
        assert!(cut.len() <= MAX_ERROR_BYTES);
        assert!(cut.ends_with(" [truncated]"));
        assert_eq!(truncate_error("short".into()), "short");
        assert_eq!(truncate_error("a\0b".into()), "a\u{fffd}b");
    }
}
