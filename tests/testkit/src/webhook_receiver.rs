//! A webhook receiver that counts successful deliveries per idempotency key, verifies
//! Standard Webhooks signatures with the specification's reference crate, and fails on
//! demand: the witness that no message is lost or delivered twice.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use mailpoll::delivery::egress::{EgressGuard, EgressPolicy, GuardedClient, Lookup, LookupFuture};
use mailpoll::delivery::endpoint::{Endpoint, WebhookUrl};
use mailpoll::delivery::signing::SigningSecret;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

// The contract as README states it, written out: this receiver witnesses what mailpoll sends,
// so it takes nothing from mailpoll's own signing code, or a change there would go unseen.
// Signatures are checked by `standardwebhooks`, as a receiver in Rust would check them.
const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

// The parsers tests read deliveries back with, as receivers in Rust would.
pub use cloudevents;
pub use mail_parser;
const WEBHOOK_ID_HEADER: &str = "webhook-id";

/// A Standard Webhooks signing secret for tests (32 random bytes), as a Secret holds it.
pub const TEST_SIGNING_SECRET: &str = "whsec_nCmA4jGJgpMJobbmyIx9Qp/gJ3I58QXwccLNzcBbq9o=";

/// The body of a "garbage" rejection: NUL bytes, control characters, a terminal escape
/// sequence and bytes that are not UTF-8, though labelled UTF-8 text. A client that stores
/// or logs a receiver's answer as is meets everything Postgres `text` and `jsonb` refuse.
pub const GARBAGE_BODY: &[u8] =
    b"refused\x00 by\x01 the\x07 receiver\x1b[31m red\x7f \xff\xfe\xc3\x28 \xed\xa0\x80 end\x00";

/// A webhook client whose egress policy allows loopback, where test receivers listen;
/// otherwise the operator's default policy.
pub fn loopback_webhook_client() -> GuardedClient {
    mailpoll::install_crypto_provider();
    GuardedClient::new(
        EgressGuard::new(EgressPolicy::allowing_loopback()),
        "mailpoll-test",
    )
    .unwrap_or_else(|error| panic!("cannot build the webhook client: {error}"))
}

/// Name lookups answered from a table instead of DNS, as a hostile DNS server could answer
/// them: the egress policy's resolver sees what it would see in a cluster.
pub struct FixedLookup(HashMap<String, Vec<IpAddr>>);

impl FixedLookup {
    /// `names` are absolute names (with their trailing dot) and the address each resolves to.
    pub fn new(names: &[(&str, &str)]) -> anyhow::Result<Self> {
        let mut table = HashMap::new();
        for (name, address) in names {
            let address: IpAddr = address
                .parse()
                .with_context(|| format!("{address} is not an IP address"))?;
            table.insert((*name).to_owned(), vec![address]);
        }
        Ok(Self(table))
    }

    /// A guard with `policy` whose lookups answer from `names`.
    pub fn guard(policy: EgressPolicy, names: &[(&str, &str)]) -> anyhow::Result<EgressGuard> {
        Ok(EgressGuard::with_lookup(
            policy,
            Arc::new(Self::new(names)?),
        ))
    }
}

impl Lookup for FixedLookup {
    fn lookup(&self, name: &str) -> LookupFuture {
        let found = self.0.get(name).cloned();
        let name = name.to_owned();
        Box::pin(async move {
            found.ok_or_else(|| std::io::Error::other(format!("{name} is not in the table")))
        })
    }
}

/// How the receiver answers.
#[derive(Default)]
struct Faults {
    /// Keys answered 400 until cleared (permanent rejection).
    rejected: HashSet<String>,
    /// Keys answered 400 with `GARBAGE_BODY` until cleared.
    garbage_rejected: HashSet<String>,
    /// The next N requests answered 503, whatever their key.
    fail_next: usize,
    /// The next N requests answered 400 with `GARBAGE_BODY`, whatever their key.
    garbage_next: usize,
    /// Every request answered 503 with this probability, from a seeded generator.
    failure_rate: f64,
    /// Requests that succeed but whose answer is delayed (to provoke client timeouts).
    delay: Option<Duration>,
    /// A misbehaving answer for every connection accepted while set.
    hostile: Option<Hostile>,
    /// Bodies over this many bytes answered 413, as most receivers do (the framework
    /// default is 2 MB); `None` takes up to [`MAX_BODY_BYTES`].
    body_limit: Option<usize>,
    rng: u64,
}

/// A receiver that misbehaves below HTTP's rules or at their edges. While one is set, every
/// new connection gets it instead of the regular receiver: the request is read (and counted
/// in `requests` and `hostile_requests`), then answered as described, then the connection
/// is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hostile {
    /// Answer `status` with a body of `bytes` bytes (a `Content-Length` that large), written
    /// as fast as the client reads; `hostile_body_bytes` counts what was written.
    HugeBody { status: u16, bytes: u64 },
    /// Write a whole `204` answer one byte every `every`, status line and headers included.
    TrickleHead { every: Duration },
    /// Write the status line and headers of `status` at once, then its 1,000-byte body one
    /// byte every `every`.
    TrickleBody { status: u16, every: Duration },
    /// Answer `status` with this `Location`.
    Redirect { status: u16, location: String },
    /// Write the first `after` bytes of a `status` answer with a 1,000-byte body, then reset
    /// the connection (TCP RST).
    ResetMidResponse { status: u16, after: usize },
    /// Answer `status` with NUL, BEL and a terminal escape sequence in the reason phrase, and
    /// [`GARBAGE_BODY`] as the body.
    GarbageStatusLine { status: u16 },
}

/// Largest request body taken (mailpoll's own limits stop at 50 MiB of content, which base64
/// makes about 67 MiB).
const MAX_BODY_BYTES: usize = 96 * 1024 * 1024;

/// The body of a hostile answer's first bytes: easy to find in an error's excerpt.
pub const HOSTILE_BODY_FILL: &[u8] = b"hostile receiver body ";

/// Longest time a hostile answer keeps writing (a client that never hangs up).
const HOSTILE_WRITE_LIMIT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Ledger {
    successes: HashMap<String, u32>,
    /// Raw bodies, parsed only when a test asks: keeping a parsed tree per delivery made
    /// the receiver a noticeable cost in delivery benchmarks.
    payloads: HashMap<String, Bytes>,
    /// Request headers and query of the last successful delivery of each key.
    headers: HashMap<String, (HeaderMap, Option<String>)>,
    failed_attempts: u64,
    bad_signatures: u64,
    requests: u64,
    /// TCP connections accepted, whatever was sent on them.
    connections: u64,
    hostile_requests: u64,
    hostile_body_bytes: u64,
    /// Hostile answers that ended (written out, or cut off by the client or the time limit).
    hostile_ended: u64,
}

struct Shared {
    verifier: Option<standardwebhooks::Webhook>,
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
    /// Starts on 127.0.0.1 with a free port. With a secret (`whsec_…`, as the Secret holds
    /// it), unsigned or badly signed requests are answered 401 and counted.
    pub async fn start(signing_secret: Option<&str>) -> anyhow::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), signing_secret).await
    }

    /// Starts on `listen` (port 0 picks a free one); deliveries go to `/hook`.
    pub async fn start_on(
        listen: SocketAddr,
        signing_secret: Option<&str>,
    ) -> anyhow::Result<Self> {
        let verifier = signing_secret
            .map(standardwebhooks::Webhook::new)
            .transpose()
            .context("the receiver's signing secret is not a Standard Webhooks secret")?;
        let shared = Arc::new(Shared {
            verifier,
            faults: Mutex::new(Faults {
                rng: 0x9E37_79B9_7F4A_7C15,
                ..Faults::default()
            }),
            ledger: Mutex::new(Ledger::default()),
        });
        let app = axum::Router::new()
            .route("/hook", post(receive))
            // Payloads with inline attachments run to tens of megabytes.
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("webhook receiver cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let listener = SwitchingListener {
            inner: listener,
            shared: shared.clone(),
        };
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

    /// The port it listens on (for URLs with other host names that resolve to it).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// An endpoint for this receiver, signed with `signing_secret` when given.
    pub fn endpoint(&self, signing_secret: Option<&str>) -> anyhow::Result<Endpoint> {
        let mut endpoint = Endpoint::new(WebhookUrl::parse(&self.url())?);
        if let Some(secret) = signing_secret {
            endpoint.signing_secret = Some(SigningSecret::parse(secret.as_bytes())?);
        }
        Ok(endpoint)
    }

    /// The request headers of the last successful delivery of `key`.
    pub fn headers_of(&self, key: &str) -> Option<HeaderMap> {
        lock(&self.shared.ledger)
            .headers
            .get(key)
            .map(|(headers, _)| headers.clone())
    }

    /// The query string of the last successful delivery of `key`.
    pub fn query_of(&self, key: &str) -> Option<String> {
        lock(&self.shared.ledger)
            .headers
            .get(key)
            .and_then(|(_, query)| query.clone())
    }

    /// Successful deliveries per idempotency key.
    pub fn successes(&self) -> HashMap<String, u32> {
        lock(&self.shared.ledger).successes.clone()
    }

    /// The raw body of the last successful delivery of `key`, whatever its format.
    pub fn body_of(&self, key: &str) -> Option<Bytes> {
        lock(&self.shared.ledger).payloads.get(key).cloned()
    }

    /// The last successful delivery of `key` read as a CloudEvent by the CloudEvents SDK's
    /// HTTP binding, as Knative or Dapr would read it; `Err` says why it is not one.
    pub fn cloudevent_of(&self, key: &str) -> Option<Result<cloudevents::Event, String>> {
        let (headers, body) = {
            let ledger = lock(&self.shared.ledger);
            let (headers, _) = ledger.headers.get(key)?;
            (headers.clone(), ledger.payloads.get(key)?.to_vec())
        };
        Some(cloudevents::binding::http::to_event(&headers, body).map_err(|e| e.to_string()))
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

    /// TCP connections accepted: zero means nothing reached the receiver at all.
    pub fn connections(&self) -> u64 {
        lock(&self.shared.ledger).connections
    }

    /// Requests answered by a hostile behaviour.
    pub fn hostile_requests(&self) -> u64 {
        lock(&self.shared.ledger).hostile_requests
    }

    /// Body bytes a [`Hostile::HugeBody`] answer managed to write (the client's reading and
    /// the socket buffers bound it).
    pub fn hostile_body_bytes(&self) -> u64 {
        lock(&self.shared.ledger).hostile_body_bytes
    }

    /// Hostile answers that have ended: written out, or cut off because the client closed the
    /// connection (or after a minute). After it, `hostile_body_bytes` no longer moves.
    pub fn hostile_answers_ended(&self) -> u64 {
        lock(&self.shared.ledger).hostile_ended
    }

    /// Answer every new connection this way until `clear_faults` (or `None`).
    pub fn set_hostile(&self, hostile: Option<Hostile>) {
        lock(&self.shared.faults).hostile = hostile;
    }

    /// Answer 400 to this key until `clear_faults`.
    pub fn reject(&self, key: &str) {
        lock(&self.shared.faults).rejected.insert(key.to_owned());
    }

    /// Answer 400 with `GARBAGE_BODY` to this key until `clear_faults`.
    pub fn reject_with_garbage(&self, key: &str) {
        lock(&self.shared.faults)
            .garbage_rejected
            .insert(key.to_owned());
    }

    /// Answer 400 with `GARBAGE_BODY` to the next `n` requests.
    pub fn garbage_next(&self, n: usize) {
        lock(&self.shared.faults).garbage_next = n;
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
    /// Answers bodies over `bytes` with 413 (`None`: up to the receiver's own maximum).
    pub fn limit_bodies(&self, bytes: Option<usize>) {
        lock(&self.shared.faults).body_limit = bytes;
    }

    pub fn set_delay(&self, delay: Option<Duration>) {
        lock(&self.shared.faults).delay = delay;
    }

    pub fn clear_faults(&self) {
        let mut faults = lock(&self.shared.faults);
        faults.rejected.clear();
        faults.garbage_rejected.clear();
        faults.fail_next = 0;
        faults.garbage_next = 0;
        faults.failure_rate = 0.0;
        faults.delay = None;
        faults.hostile = None;
        faults.body_limit = None;
    }
}

/// The receiver's listener: hands connections to the HTTP server, or to the hostile
/// behaviour set when they arrive.
struct SwitchingListener {
    inner: tokio::net::TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for SwitchingListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let (stream, peer) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(_) => {
                    // Out of file descriptors and the like: pass, as axum's own listener does.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            lock(&self.shared.ledger).connections += 1;
            let hostile = lock(&self.shared.faults).hostile.clone();
            match hostile {
                None => return (stream, peer),
                Some(hostile) => {
                    let shared = self.shared.clone();
                    tokio::spawn(async move {
                        let answer = answer_hostile(stream, hostile, shared.clone());
                        let _ = tokio::time::timeout(HOSTILE_WRITE_LIMIT, answer).await;
                        lock(&shared.ledger).hostile_ended += 1;
                    });
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// Reads one request (head and `Content-Length` body) and answers it the hostile way.
async fn answer_hostile(
    mut stream: TcpStream,
    hostile: Hostile,
    shared: Arc<Shared>,
) -> std::io::Result<()> {
    read_request(&mut stream).await?;
    {
        let mut ledger = lock(&shared.ledger);
        ledger.requests += 1;
        ledger.hostile_requests += 1;
    }
    match hostile {
        Hostile::HugeBody { status, bytes } => {
            let head = format!(
                "HTTP/1.1 {status} Hostile\r\ncontent-type: text/plain\r\ncontent-length: {bytes}\r\nconnection: close\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await?;
            let chunk = HOSTILE_BODY_FILL.repeat(64 * 1024 / HOSTILE_BODY_FILL.len());
            let mut left = bytes;
            while left > 0 {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
                stream.write_all(&chunk[..n]).await?;
                lock(&shared.ledger).hostile_body_bytes += n as u64;
                left -= n as u64;
            }
            stream.flush().await
        }
        Hostile::TrickleHead { every } => {
            let answer = b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n";
            trickle(&mut stream, answer, every).await
        }
        Hostile::TrickleBody { status, every } => {
            let (head, body) = answer_with_body(status);
            stream.write_all(&head).await?;
            trickle(&mut stream, &body, every).await
        }
        Hostile::Redirect { status, location } => {
            let head = format!(
                "HTTP/1.1 {status} Redirect\r\nlocation: {location}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
            stream.write_all(head.as_bytes()).await?;
            stream.flush().await
        }
        Hostile::ResetMidResponse { status, after } => {
            let (mut answer, body) = answer_with_body(status);
            answer.extend_from_slice(&body);
            stream.write_all(&answer[..after.min(answer.len())]).await?;
            stream.flush().await?;
            // Give the client the bytes before the reset discards what it has not read.
            tokio::time::sleep(Duration::from_millis(50)).await;
            stream.set_zero_linger()?;
            drop(stream);
            Ok(())
        }
        Hostile::GarbageStatusLine { status } => {
            let mut answer = format!(
                "HTTP/1.1 {status} Bad\x1b[2J\x00Request\x07\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                GARBAGE_BODY.len()
            )
            .into_bytes();
            answer.extend_from_slice(GARBAGE_BODY);
            stream.write_all(&answer).await?;
            stream.flush().await
        }
    }
}

/// The head of a `status` answer with a 1,000-byte body, and the body.
fn answer_with_body(status: u16) -> (Vec<u8>, Vec<u8>) {
    let body: Vec<u8> = HOSTILE_BODY_FILL
        .iter()
        .copied()
        .cycle()
        .take(1000)
        .collect();
    let head = format!(
        "HTTP/1.1 {status} Hostile\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    (head.into_bytes(), body)
}

async fn trickle(stream: &mut TcpStream, bytes: &[u8], every: Duration) -> std::io::Result<()> {
    for byte in bytes {
        stream.write_all(std::slice::from_ref(byte)).await?;
        stream.flush().await?;
        tokio::time::sleep(every).await;
    }
    Ok(())
}

/// Longest request a hostile answer reads (a webhook payload with a 10 MB subject fits).
const MAX_HOSTILE_REQUEST: usize = 64 * 1024 * 1024;

/// Reads a request's head and its `Content-Length` body.
async fn read_request(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buffer.len() > 64 * 1024 {
            return Err(std::io::Error::other("request head too long"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_HOSTILE_REQUEST);
    let mut have = buffer.len() - head_end;
    while have < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
    }
    Ok(())
}

/// xorshift64*: deterministic, good enough to spread injected failures.
fn next_unit(state: &mut u64) -> f64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
}

/// An injected failure: a status and a body.
struct Failure(StatusCode, &'static [u8]);

impl Failure {
    const REFUSED: Self = Self(StatusCode::BAD_REQUEST, b"message refused by the receiver");
    const GARBAGE: Self = Self(StatusCode::BAD_REQUEST, GARBAGE_BODY);
    const UNAVAILABLE: Self = Self(StatusCode::SERVICE_UNAVAILABLE, b"temporarily unavailable");
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let content_type = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
        (self.0, content_type, Bytes::from_static(self.1)).into_response()
    }
}

/// The injected failure this request gets, if any; consumes "next N" orders.
fn injected_failure(faults: &mut Faults, key: &str) -> Option<Failure> {
    if faults.rejected.contains(key) {
        Some(Failure::REFUSED)
    } else if faults.garbage_rejected.contains(key) {
        Some(Failure::GARBAGE)
    } else if faults.fail_next > 0 {
        faults.fail_next -= 1;
        Some(Failure::UNAVAILABLE)
    } else if faults.garbage_next > 0 {
        faults.garbage_next -= 1;
        Some(Failure::GARBAGE)
    } else if faults.failure_rate > 0.0 && next_unit(&mut faults.rng) < faults.failure_rate {
        Some(Failure::UNAVAILABLE)
    } else {
        None
    }
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    lock(&shared.ledger).requests += 1;
    if lock(&shared.faults)
        .body_limit
        .is_some_and(|limit| body.len() > limit)
    {
        lock(&shared.ledger).failed_attempts += 1;
        return (StatusCode::PAYLOAD_TOO_LARGE, "payload too large").into_response();
    }
    let Some(key) = header(WEBHOOK_ID_HEADER) else {
        lock(&shared.ledger).failed_attempts += 1;
        return (StatusCode::BAD_REQUEST, "missing webhook-id").into_response();
    };
    if header(IDEMPOTENCY_KEY_HEADER).as_deref() != Some(key.as_str()) {
        lock(&shared.ledger).failed_attempts += 1;
        return (
            StatusCode::BAD_REQUEST,
            "Idempotency-Key differs from webhook-id",
        )
            .into_response();
    }
    if let Some(verifier) = &shared.verifier
        && verifier.verify(&body, &headers).is_err()
    {
        let mut ledger = lock(&shared.ledger);
        ledger.bad_signatures += 1;
        ledger.failed_attempts += 1;
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    if let Err(refusal) = check_body(&headers, &body) {
        lock(&shared.ledger).failed_attempts += 1;
        return (StatusCode::BAD_REQUEST, refusal).into_response();
    }
    let (verdict, delay) = {
        let mut faults = lock(&shared.faults);
        (injected_failure(&mut faults, &key), faults.delay)
    };
    if let Some(failure) = verdict {
        lock(&shared.ledger).failed_attempts += 1;
        return failure.into_response();
    }
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let mut ledger = lock(&shared.ledger);
    *ledger.successes.entry(key.clone()).or_default() += 1;
    ledger
        .headers
        .insert(key.clone(), (headers, uri.query().map(str::to_owned)));
    ledger.payloads.insert(key, body);
    StatusCode::NO_CONTENT.into_response()
}

/// A body is what its content type says: a mail for `message/rfc822` (parsed as a mail
/// receiver would), JSON otherwise (validated without building a tree; `payloads` parses on
/// demand).
fn check_body(headers: &HeaderMap, body: &[u8]) -> Result<(), &'static str> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if content_type.starts_with("message/rfc822") {
        return match mail_parser::MessageParser::default().parse(body) {
            Some(_) => Ok(()),
            None => Err("body is not a mail message"),
        };
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
        .map(|_| ())
        .map_err(|_| "body is not JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn deliver(receiver: &WebhookReceiver, key: &str) -> (StatusCode, Bytes) {
        let response = reqwest::Client::new()
            .post(receiver.url())
            .header(WEBHOOK_ID_HEADER, key)
            .header(IDEMPOTENCY_KEY_HEADER, key)
            .header("content-type", "application/json")
            .body(r#"{"subject":"Invoice 4471"}"#)
            .send()
            .await
            .expect("delivery");
        let status = StatusCode::from_u16(response.status().as_u16()).expect("status");
        (status, response.bytes().await.expect("body"))
    }

    async fn deliver_signed(
        receiver: &WebhookReceiver,
        id: &str,
        timestamp: i64,
        signature: &str,
        body: &str,
    ) -> StatusCode {
        let response = reqwest::Client::new()
            .post(receiver.url())
            .header(WEBHOOK_ID_HEADER, id)
            .header(IDEMPOTENCY_KEY_HEADER, id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body.to_owned())
            .send()
            .await
            .expect("delivery");
        StatusCode::from_u16(response.status().as_u16()).expect("status")
    }

    /// HMAC-SHA256 of "id.timestamp.body", base64: the specification written out, so this
    /// test does not lean on the crate it checks the receiver with.
    fn standard_signature(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
        use base64::Engine;
        use hmac::{Hmac, KeyInit, Mac};
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.trim_start_matches("whsec_"))
            .expect("test secret");
        let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key).expect("key");
        mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
        let tag = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        format!("v1,{tag}")
    }

    #[tokio::test]
    async fn signatures_are_checked_as_the_standard_defines_them() {
        mailpoll::install_crypto_provider();
        let receiver = WebhookReceiver::start(Some(TEST_SIGNING_SECRET))
            .await
            .expect("receiver");
        let body = r#"{"type":"mailpoll.message.received.v1","key":"k"}"#;
        let now = chrono::Utc::now().timestamp();
        let signature = standard_signature(TEST_SIGNING_SECRET, "k", now, body);
        let status = deliver_signed(&receiver, "k", now, &signature, body).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        // Several signatures, one of them right (a key rotation), verify too.
        let rotated = format!("v1,bm90IHRoZSByaWdodCBvbmU= {signature}");
        assert_eq!(
            deliver_signed(&receiver, "k", now, &rotated, body).await,
            StatusCode::NO_CONTENT
        );
        let other_body = r#"{"type":"mailpoll.message.received.v1","key":"K"}"#;
        let stale = now - 600;
        let stale_signature = standard_signature(TEST_SIGNING_SECRET, "k", stale, body);
        let other_version = signature.replacen("v1,", "v2,", 1);
        for (id, timestamp, signature, body) in [
            ("k", now + 1, signature.as_str(), body),
            ("k", now, signature.as_str(), other_body),
            ("k2", now, signature.as_str(), body),
            ("k", now, other_version.as_str(), body),
            ("k", now, &signature[..signature.len() - 2], body),
            ("k", stale, stale_signature.as_str(), body),
        ] {
            let status = deliver_signed(&receiver, id, timestamp, signature, body).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{id} {timestamp} {signature} {body}"
            );
        }
        assert_eq!(receiver.bad_signatures(), 6);
        assert_eq!(receiver.successes().get("k"), Some(&2));
    }

    fn is_garbage(body: &[u8]) -> bool {
        body == GARBAGE_BODY
            && body.contains(&0)
            && body.contains(&0x1b)
            && std::str::from_utf8(body).is_err()
    }

    #[tokio::test]
    async fn garbage_rejections_carry_nul_control_characters_and_invalid_utf8() {
        mailpoll::install_crypto_provider();
        let receiver = WebhookReceiver::start(None).await.expect("receiver");

        receiver.garbage_next(2);
        for key in ["a", "b"] {
            let (status, body) = deliver(&receiver, key).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(is_garbage(&body), "{body:?}");
        }
        assert_eq!(deliver(&receiver, "a").await.0, StatusCode::NO_CONTENT);

        receiver.reject_with_garbage("c");
        for _ in 0..2 {
            let (status, body) = deliver(&receiver, "c").await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "every time");
            assert!(is_garbage(&body), "{body:?}");
        }
        assert_eq!(deliver(&receiver, "d").await.0, StatusCode::NO_CONTENT);
        assert_eq!(receiver.failed_attempts(), 4);
        receiver.clear_faults();
        assert_eq!(deliver(&receiver, "c").await.0, StatusCode::NO_CONTENT);
        assert_eq!(receiver.successes().get("c"), Some(&1));
    }
}
