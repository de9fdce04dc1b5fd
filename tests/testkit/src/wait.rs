//! Waiting for an outcome by polling it: the one way tests (and the sandbox) wait, instead of
//! sleeping for a guessed time.
//!
//! [`try_wait_for`] is the only polling loop; the others are thin wrappers around it:
//!
//! | check returns        | on timeout                            | function          |
//! |----------------------|---------------------------------------|-------------------|
//! | `Option<T>`          | `Err(TimedOut)`                       | [`try_wait_for`]  |
//! | `Option<T>`          | panics                                | [`wait_for`]      |
//! | `bool`               | panics                                | [`wait_until`]    |
//! | `Result<T, E>`       | panics, showing the last `Err`        | [`wait_for_ok`]   |
//!
//! Every check runs at least once, and once more after the limit has passed before giving up.
//! Time is Tokio's, so a test with paused time waits in virtual time.

use std::fmt;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

/// How often the helpers look, unless told otherwise with [`Patience::every`].
pub const DEFAULT_EVERY: Duration = Duration::from_millis(50);

/// How long to wait at most, and how often to look. A plain [`Duration`] converts into a
/// `Patience` that looks every [`DEFAULT_EVERY`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Patience {
    pub limit: Duration,
    pub every: Duration,
}

impl Patience {
    pub const fn new(limit: Duration) -> Self {
        Self {
            limit,
            every: DEFAULT_EVERY,
        }
    }

    /// The same limit, looking every `every`.
    pub const fn every(self, every: Duration) -> Self {
        Self { every, ..self }
    }
}

impl From<Duration> for Patience {
    fn from(limit: Duration) -> Self {
        Self::new(limit)
    }
}

/// A wait that reached its limit: names what was awaited and the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOut {
    pub what: String,
    pub limit: Duration,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:?} waiting for {}",
            self.limit, self.what
        )
    }
}

impl std::error::Error for TimedOut {}

/// Polls `check` until it answers `Some(value)` and returns the value; after the limit,
/// `Err(TimedOut)` naming `what`. For code that reports failures instead of panicking (the
/// sandbox, benchmarks); tests use [`wait_for`].
pub async fn try_wait_for<T, F, Fut>(
    what: impl fmt::Display,
    patience: impl Into<Patience>,
    mut check: F,
) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let Patience { limit, every } = patience.into();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TimedOut {
                what: what.to_string(),
                limit,
            });
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls `check` until it answers `Some(value)` and returns the value; panics naming `what`
/// and the limit when it does not in time.
pub async fn wait_for<T, F, Fut>(
    what: impl fmt::Display,
    patience: impl Into<Patience>,
    check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    try_wait_for(what, patience, check)
        .await
        .unwrap_or_else(|timed_out| panic!("{timed_out}"))
}

/// Polls `check` until it answers `true`; panics naming `what` and the limit when it does not
/// in time.
pub async fn wait_until<F, Fut>(
    what: impl fmt::Display,
    patience: impl Into<Patience>,
    mut check: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, patience, || {
        let done = check();
        async move { done.await.then_some(()) }
    })
    .await
}

/// Polls `check` until it answers `Ok(value)` and returns the value. An `Err` means "not yet"
/// and describes what the check saw; when the limit passes, the panic shows the last one.
pub async fn wait_for_ok<T, E, F, Fut>(
    what: impl fmt::Display,
    patience: impl Into<Patience>,
    mut check: F,
) -> T
where
    E: fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let last_seen = Mutex::new(None::<String>);
    let outcome = try_wait_for(what, patience, || {
        let attempt = check();
        let last_seen = &last_seen;
        async move {
            match attempt.await {
                Ok(value) => Some(value),
                Err(seen) => {
                    *last_seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(seen.to_string());
                    None
                }
            }
        }
    })
    .await;
    match outcome {
        Ok(value) => value,
        Err(timed_out) => {
            let last_seen = last_seen.into_inner().unwrap_or_else(|e| e.into_inner());
            panic!(
                "{timed_out}; last seen: {}",
                last_seen.as_deref().unwrap_or("nothing")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn returns_the_value_once_the_check_answers() {
        let calls = AtomicU32::new(0);
        let value = wait_for("the third call", Duration::from_secs(1), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            (n == 3).then_some(n)
        })
        .await;
        assert_eq!(value, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_naming_what_and_the_limit_after_a_last_look() {
        let calls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let error = try_wait_for(
            "a miracle",
            Patience::new(Duration::from_secs(1)).every(Duration::from_millis(300)),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                None::<()>
            },
        )
        .await
        .expect_err("never answers");
        assert_eq!(
            error.to_string(),
            "timed out after 1s waiting for a miracle"
        );
        // Looks at 0, 300, 600, 900 and 1200 ms: the last one after the limit.
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        assert_eq!(started.elapsed(), Duration::from_millis(1200));
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "timed out after 1s waiting for a flag")]
    async fn wait_until_panics_with_the_message() {
        wait_until("a flag", Duration::from_secs(1), || async { false }).await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "waiting for agreement; last seen: 2 of 3")]
    async fn wait_for_ok_shows_the_last_observation() {
        let calls = AtomicU32::new(0);
        wait_for_ok::<(), _, _, _>("agreement", Duration::from_millis(100), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst).min(2);
            Err(format!("{n} of 3"))
        })
        .await;
    }
}
