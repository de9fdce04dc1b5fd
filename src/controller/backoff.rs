//! Per-MailboxPoll error backoff of the reconciler: a failing object is retried after a delay
//! that doubles with each consecutive failure, up to a ceiling, and starts again from the
//! floor once a reconcile succeeds. One broken object cannot keep the controller busy, and a
//! passing error (an API hiccup) is retried soon.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

/// Floor and ceiling of the delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub first: Duration,
    pub max: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(5),
            max: Duration::from_secs(300),
        }
    }
}

impl BackoffPolicy {
    /// The delay after the `failures`-th consecutive failure (1 for the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.first
            .checked_mul(1 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// Consecutive failures per object.
#[derive(Debug)]
pub struct ErrorBackoff<K> {
    policy: BackoffPolicy,
    failures: Mutex<HashMap<K, u32>>,
}

impl<K: Eq + Hash> ErrorBackoff<K> {
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<K, u32>> {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one more failure of `key`; returns how long to wait before trying it again.
    pub fn failed(&self, key: K) -> Duration {
        let mut failures = self.failures();
        let count = failures.entry(key).or_insert(0);
        *count = count.saturating_add(1);
        self.policy.delay(*count)
    }

    /// A success: the next failure of `key` waits the shortest delay again.
    pub fn succeeded(&self, key: &K) {
        self.failures().remove(key);
    }

    /// Consecutive failures of `key` so far.
    pub fn failures_of(&self, key: &K) -> u32 {
        self.failures().get(key).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn delays_double_from_five_seconds_up_to_five_minutes() {
        let policy = BackoffPolicy::default();
        let delays: Vec<u64> = (1..=9).map(|n| policy.delay(n).as_secs()).collect();
        assert_eq!(delays, vec![5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(policy.delay(u32::MAX), 300 * SECOND);
        assert_eq!(policy.delay(0), 5 * SECOND);
    }

    #[test]
    fn each_object_has_its_own_count_and_a_success_resets_it() {
        let backoff = ErrorBackoff::new(BackoffPolicy::default());
        assert_eq!(backoff.failed("a"), 5 * SECOND);
        assert_eq!(backoff.failed("a"), 10 * SECOND);
        assert_eq!(backoff.failed("a"), 20 * SECOND);
        // Another object is not slowed by the first one's failures.
        assert_eq!(backoff.failed("b"), 5 * SECOND);
        assert_eq!(backoff.failures_of(&"a"), 3);
        backoff.succeeded(&"a");
        assert_eq!(backoff.failures_of(&"a"), 0);
        assert_eq!(backoff.failed("a"), 5 * SECOND);
        assert_eq!(backoff.failures_of(&"b"), 1);
    }

    #[test]
    fn a_short_policy_is_honoured() {
        let policy = BackoffPolicy {
            first: Duration::from_millis(100),
            max: Duration::from_millis(350),
        };
        let delays: Vec<u128> = (1..=4).map(|n| policy.delay(n).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 350, 350]);
    }
}
