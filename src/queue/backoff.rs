//! Retry delays: exponential backoff with full jitter.
//!
//! After the n-th failure a task waits a uniformly random time between zero and
//! `min(cap, base * 2^(n-1))`. The randomness spreads the retries of tasks that failed
//! together (a receiver that was down for everyone) instead of sending them back in a wave.

use std::time::Duration;

/// The backoff schedule of failed tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The ceiling of the first retry's delay.
    pub base: Duration,
    /// No retry waits longer than this.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    /// 5 s, 10 s, 20 s, ... up to one hour: eight attempts span about 10 minutes of ceilings
    /// (21 minutes in total), enough to ride out a receiver's restart or a short outage.
    fn default() -> Self {
        Self {
            base: Duration::from_secs(5),
            cap: Duration::from_secs(3600),
        }
    }
}

impl RetryPolicy {
    /// The longest wait after the `failures`-th failure (counted from 1).
    pub fn ceiling(&self, failures: u32) -> Duration {
        let mut ceiling = self.base;
        for _ in 1..failures {
            if ceiling >= self.cap || ceiling.is_zero() {
                break;
            }
            ceiling = ceiling.saturating_mul(2);
        }
        ceiling.min(self.cap)
    }

    /// The wait after the `failures`-th failure, for a jitter sample in `[0, 1)`
    /// (values outside are clamped). Whole microseconds, as Postgres intervals store them.
    pub fn delay(&self, failures: u32, jitter: f64) -> Duration {
        let jitter = if jitter.is_nan() {
            0.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        let ceiling = self.ceiling(failures).as_micros() as f64;
        Duration::from_micros((ceiling * jitter).floor() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_secs(2),
            cap: Duration::from_secs(60),
        }
    }

    #[test]
    fn ceilings_double_from_the_base_up_to_the_cap() {
        let p = policy();
        let ceilings: Vec<u64> = (1..=7).map(|n| p.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, vec![2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn a_zero_base_retries_at_once() {
        let p = RetryPolicy {
            base: Duration::ZERO,
            cap: Duration::MAX,
        };
        assert_eq!(p.ceiling(u32::MAX), Duration::ZERO);
    }

    #[test]
    fn zero_failures_uses_the_base() {
        assert_eq!(policy().ceiling(0), Duration::from_secs(2));
    }

    #[test]
    fn huge_failure_counts_saturate_at_the_cap() {
        let p = policy();
        assert_eq!(p.ceiling(64), p.cap);
        assert_eq!(p.ceiling(u32::MAX), p.cap);
        let wide = RetryPolicy {
            base: Duration::from_secs(u64::MAX / 4),
            cap: Duration::MAX,
        };
        assert!(wide.ceiling(40) >= wide.base);
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let p = policy();
        assert_eq!(p.delay(3, 0.0), Duration::ZERO);
        assert_eq!(p.delay(3, 0.5), Duration::from_secs(4));
        let almost = p.delay(3, 0.999_999);
        assert!(almost < p.ceiling(3) && almost > Duration::from_millis(7990));
    }

    #[test]
    fn delays_never_exceed_the_ceiling_for_any_sample() {
        let p = policy();
        for failures in 1..12 {
            for step in 0..=100 {
                let jitter = f64::from(step) / 100.0;
                let delay = p.delay(failures, jitter);
                assert!(
                    delay <= p.ceiling(failures),
                    "failure {failures}, jitter {jitter}: {delay:?} above {:?}",
                    p.ceiling(failures)
                );
            }
        }
    }

    #[test]
    fn out_of_range_samples_are_clamped() {
        let p = policy();
        assert_eq!(p.delay(1, -3.0), Duration::ZERO);
        assert_eq!(p.delay(1, f64::NAN), Duration::ZERO);
        assert_eq!(p.delay(1, 7.0), p.ceiling(1));
    }

    #[test]
    fn delays_are_whole_microseconds() {
        let p = RetryPolicy {
            base: Duration::from_nanos(1_500_001),
            cap: Duration::from_secs(1),
        };
        assert_eq!(p.delay(2, 0.333).subsec_nanos() % 1000, 0);
    }
}
