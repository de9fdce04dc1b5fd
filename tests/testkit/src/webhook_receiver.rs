//! A webhook receiver that counts successful deliveries per idempotency key, verifies
//! signatures, and fails on demand: the witness that no message is lost or delivered twice.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use mailpoll::delivery::signing::{
    self, IDEMPOTENCY_KEY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER,
};
use serde_json::Value;
use tokio::sync::oneshot;

/// How the receiver answers.
#[derive(Default)]
struct Faults {
    /// Keys answered 400 until cleared (permanent rejection).
    rejected: HashSet<String>,
    /// The next N requests answered 503, whatever their key.
    fail_next: usize,
    /// Every request answered 503 with this probability, from a seeded generator.
    failure_rate: f64,
    /// Requests that succeed but whose answer is delayed (to provoke client timeouts).
    delay: Option<Duration>,
    rng: u64,
}

#[derive(Default)]
struct Ledger {
    successes: HashMap<String, u32>,
    /// Raw bodies, parsed only when a test asks: keeping a parsed tree per delivery made
    /// the receiver a noticeable cost in delivery benchmarks.
    payloads: HashMap<String, Bytes>,
    failed_attempts: u64,
    bad_signatures: u64,
    requests: u64,
}

struct Shared {
    signing_secret: Option<Vec<u8>>,
    faults: Mutex<Faults>,
    ledger: Mutex<Ledger>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not hide the counts from the others.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running receiver; stops when dropped.
pub struct WebhookReceiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: oneshot::Sender<()>,
}

impl WebhookReceiver {
    /// Starts on 127.0.0.1 with a free port. With a secret, unsigned or badly signed
    /// requests are answered 401 and counted.
    pub async fn start(signing_secret: Option<&[u8]>) -> anyhow::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), signing_secret).await
    }

    /// Starts on `listen` (port 0 picks a free one); deliveries go to `/hook`.
    pub async fn start_on(
        listen: SocketAddr,
        signing_secret: Option<&[u8]>,
    ) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            signing_secret: signing_secret.map(<[u8]>::to_vec),
            faults: Mutex::new(Faults {
                rng: 0x9E37_79B9_7F4A_7C15,
                ..Faults::default()
            }),
            ledger: Mutex::new(Ledger::default()),
        });
        let app = axum::Router::new()
            .route("/hook", post(receive))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("webhook receiver cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self {
            addr,
            shared,
            _stop: stop,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Successful deliveries per idempotency key.
    pub fn successes(&self) -> HashMap<String, u32> {
        lock(&self.shared.ledger).successes.clone()
    }

    /// The last successfully delivered payload of each key.
    pub fn payloads(&self) -> HashMap<String, Value> {
        let raw = lock(&self.shared.ledger).payloads.clone();
        raw.into_iter()
            .filter_map(|(key, body)| Some((key, serde_json::from_slice(&body).ok()?)))
            .collect()
    }

    /// Requests answered with an error status (fault injection or rejection).
    pub fn failed_attempts(&self) -> u64 {
        lock(&self.shared.ledger).failed_attempts
    }

    pub fn bad_signatures(&self) -> u64 {
        lock(&self.shared.ledger).bad_signatures
    }

    pub fn requests(&self) -> u64 {
        lock(&self.shared.ledger).requests
    }

    /// Answer 400 to this key until `clear_faults`.
    pub fn reject(&self, key: &str) {
        lock(&self.shared.faults).rejected.insert(key.to_owned());
    }

    /// Answer 503 to the next `n` requests.
    pub fn fail_next(&self, n: usize) {
        lock(&self.shared.faults).fail_next = n;
    }

    /// Answer 503 to this share of requests (0.0 to 1.0), deterministically.
    pub fn set_failure_rate(&self, rate: f64) {
        lock(&self.shared.faults).failure_rate = rate.clamp(0.0, 1.0);
    }

    /// Delay every successful answer (to make a client time out).
    pub fn set_delay(&self, delay: Option<Duration>) {
        lock(&self.shared.faults).delay = delay;
    }

    pub fn clear_faults(&self) {
        let mut faults = lock(&self.shared.faults);
        faults.rejected.clear();
        faults.fail_next = 0;
        faults.failure_rate = 0.0;
        faults.delay = None;
    }
}

/// xorshift64*: deterministic, good enough to spread injected failures.
fn next_unit(state: &mut u64) -> f64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    lock(&shared.ledger).requests += 1;
    let Some(key) = header(IDEMPOTENCY_KEY_HEADER) else {
        lock(&shared.ledger).failed_attempts += 1;
        return (StatusCode::BAD_REQUEST, "missing Idempotency-Key");
    };
    if let Some(secret) = &shared.signing_secret {
        let timestamp = header(TIMESTAMP_HEADER).and_then(|t| t.parse::<i64>().ok());
        let signature = header(SIGNATURE_HEADER);
        let valid = matches!((timestamp, signature), (Some(t), Some(s)) if signing::verify(secret, t, &body, &s));
        if !valid {
            let mut ledger = lock(&shared.ledger);
            ledger.bad_signatures += 1;
            ledger.failed_attempts += 1;
            return (StatusCode::UNAUTHORIZED, "bad signature");
        }
    }
    // Validated without building a tree; `payloads` parses on demand.
    if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() {
        lock(&shared.ledger).failed_attempts += 1;
        return (StatusCode::BAD_REQUEST, "body is not JSON");
    }
    let (verdict, delay) = {
        let mut faults = lock(&shared.faults);
        let verdict = if faults.rejected.contains(&key) {
            Some((StatusCode::BAD_REQUEST, "message refused by the receiver"))
        } else if faults.fail_next > 0 {
            faults.fail_next -= 1;
            Some((StatusCode::SERVICE_UNAVAILABLE, "temporarily unavailable"))
        } else if faults.failure_rate > 0.0 && next_unit(&mut faults.rng) < faults.failure_rate {
            Some((StatusCode::SERVICE_UNAVAILABLE, "temporarily unavailable"))
        } else {
            None
        };
        (verdict, faults.delay)
    };
    if let Some(failure) = verdict {
        lock(&shared.ledger).failed_attempts += 1;
        return failure;
    }
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let mut ledger = lock(&shared.ledger);
    *ledger.successes.entry(key.clone()).or_default() += 1;
    ledger.payloads.insert(key, body);
    (StatusCode::NO_CONTENT, "")
}
