//! The switches tests flip at run time, and the counters they read back.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::state::{EvictionResponse, FILTERED_DELTA_CAP};

/// Behaviours of the emulator, all switchable while requests run. The defaults are Graph on a
/// good day: 4 concurrent requests per mailbox, no budget, no injected faults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Faults {
    /// Requests in flight per mailbox before 429 `ApplicationThrottled` (0: no cap).
    pub concurrency_cap: usize,
    /// Requests per mailbox per window before 429 `TooManyRequests`.
    pub budget: Option<Budget>,
    /// Share of requests answered 429 `TooManyRequests` at random.
    pub throttle_ratio: f64,
    /// `Retry-After` (seconds) of 429s from the concurrency cap and from `throttle_ratio`.
    pub retry_after_secs: u64,
    /// Requests to a mailbox arriving before its last Retry-After ran out are refused again
    /// (and still counted), as Graph does.
    pub hold_retry_after: bool,
    /// Share of requests answered 503 or 504 at random.
    pub server_error_ratio: f64,
    /// `Retry-After` on the random 503s, if any.
    pub server_error_retry_after_secs: Option<u64>,
    /// Delay before a list or delta page is answered (the slot stays taken meanwhile).
    pub slow_page_ms: u64,
    /// Delay before a mark-read (PATCH) or a move is answered, inside a `$batch` too (the slot
    /// stays taken meanwhile): a busy mailbox's writes are slow.
    pub slow_change_ms: u64,
    /// The next this many list or delta pages are answered with a malformed body.
    pub malformed_pages: u32,
    pub malformed_kind: MalformedKind,
    /// Share of delta items repeated later in the round; also replays a round's last page at
    /// the start of the next round.
    pub replay_ratio: f64,
    /// New messages reach delta only after the next round of their folder has ended.
    pub late_arrivals: bool,
    /// How an evicted or unknown delta/skip token is answered.
    pub eviction: EvictionResponse,
    /// Added to `$skip` in list nextLinks (Graph's skips can run ahead of the page size).
    pub skip_jump: usize,
    /// A list or delta page above this many items without `$select` times out (504).
    pub unselected_page_limit: Option<usize>,
    /// Lifetime of issued access tokens.
    pub token_lifetime_secs: u64,
    /// Most messages a delta round started with `$filter` returns; the rest of the round is
    /// dropped silently (Graph: 5,000). Rounds from that round's delta token keep the cap
    /// and the filter.
    pub filtered_delta_cap: usize,
    /// List and delta pages holding one of these message ids (immutable or default) are
    /// malformed (as `malformed_kind` says) every time they are served.
    pub poison_ids: Vec<String>,
    /// Mark-read (PATCH) and move requests for these message ids (immutable or default) are
    /// refused every time with 400 `ErrorInvalidRequest`, as Graph refuses an item it cannot
    /// change: an after-action that always fails.
    pub refused_action_ids: Vec<String>,
    /// How `Retry-After` is written on 429s (Graph's, the token endpoint's, `$batch`'s).
    pub retry_after_format: RetryAfterFormat,
    /// Error bodies (Graph's `message`, the token endpoint's `error_description`) end with
    /// NUL and other control characters.
    pub control_chars_in_errors: bool,
    /// Updated messages (not new, not moved in) appear in delta with only `id` and the
    /// properties changed since the round's cursor.
    pub partial_updates: bool,
    /// The next this many requests to attachment endpoints (listing, one attachment, its
    /// `$value`) are answered 429 `TooManyRequests` with `retry_after_secs`: a Retry-After
    /// storm where a client fetches attachments.
    pub attachment_storm: u32,
    pub token_endpoint: TokenEndpointFaults,
    pub batch: BatchFaults,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            concurrency_cap: 4,
            budget: None,
            throttle_ratio: 0.0,
            retry_after_secs: 1,
            hold_retry_after: true,
            server_error_ratio: 0.0,
            server_error_retry_after_secs: None,
            slow_page_ms: 0,
            slow_change_ms: 0,
            malformed_pages: 0,
            malformed_kind: MalformedKind::TruncatedJson,
            replay_ratio: 0.0,
            late_arrivals: false,
            eviction: EvictionResponse::Gone,
            skip_jump: 0,
            unselected_page_limit: None,
            token_lifetime_secs: 3599,
            filtered_delta_cap: FILTERED_DELTA_CAP,
            poison_ids: Vec::new(),
            refused_action_ids: Vec::new(),
            retry_after_format: RetryAfterFormat::Seconds,
            control_chars_in_errors: false,
            partial_updates: false,
            attachment_storm: 0,
            token_endpoint: TokenEndpointFaults::default(),
            batch: BatchFaults::default(),
        }
    }
}

/// Control characters appended to error texts when `control_chars_in_errors` is on: NUL
/// (which Postgres `text` and `jsonb` refuse), SOH, ESC with a terminal colour sequence, DEL.
pub const CONTROL_CHARS: &str = "\u{0}\u{1}\u{1b}[31m\u{7f}\u{0}";

/// `Retry-After` of a response far in the future, for overflow tests (about 31,700 years).
pub const HUGE_RETRY_AFTER_SECS: u64 = 1_000_000_000_000;

/// How `Retry-After` is written on a 429.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RetryAfterFormat {
    /// Whole seconds, as Graph usually writes it.
    #[default]
    Seconds,
    /// `Retry-After: 0`.
    Zero,
    /// An HTTP-date the retry seconds ahead.
    HttpDate,
    /// An HTTP-date an hour ago.
    PastHttpDate,
    /// No `Retry-After` at all.
    Missing,
    /// `HUGE_RETRY_AFTER_SECS` seconds.
    Huge,
}

impl RetryAfterFormat {
    /// The wait, in seconds, a client is told when the emulator means `seconds`.
    pub fn advertised(self, seconds: u64) -> u64 {
        match self {
            Self::Seconds | Self::HttpDate => seconds,
            Self::Zero | Self::PastHttpDate | Self::Missing => 0,
            Self::Huge => HUGE_RETRY_AFTER_SECS,
        }
    }

    /// Whether the emulator holds the mailbox for the wait it advertised (with
    /// `hold_retry_after`). Zero, past and missing waits hold nothing; a huge one would hold
    /// the mailbox for good.
    pub fn holds(self) -> bool {
        matches!(self, Self::Seconds | Self::HttpDate)
    }

    /// The header's value for a wait of `seconds` at `now`; `None` leaves the header out.
    pub fn header(self, seconds: u64, now: DateTime<Utc>) -> Option<String> {
        match self {
            Self::Seconds | Self::Zero | Self::Huge => Some(self.advertised(seconds).to_string()),
            Self::Missing => None,
            // HTTP-dates have whole seconds: round up so the wait is never shorter.
            Self::HttpDate => Some(
                i64::try_from(seconds)
                    .ok()
                    .and_then(|seconds| seconds.checked_add(now.timestamp() + 1))
                    .and_then(|at| DateTime::from_timestamp(at, 0))
                    .map_or_else(|| seconds.to_string(), http_date),
            ),
            Self::PastHttpDate => Some(http_date(now - chrono::Duration::hours(1))),
        }
    }
}

/// An IMF-fixdate (RFC 9110), e.g. `Tue, 04 Mar 2025 10:22:05 GMT`.
pub fn http_date(moment: DateTime<Utc>) -> String {
    moment.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// Faults of the token endpoint. Requests refused by them are counted in `token_requests`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TokenEndpointFaults {
    /// The next this many token requests are answered with `status`.
    pub fail_next: u32,
    /// Share of token requests answered with `status` at random.
    pub fail_ratio: f64,
    /// 429, 500 or 503 (others are served as given).
    pub status: u16,
    /// `Retry-After` seconds on those answers (written per `retry_after_format` on 429).
    pub retry_after_secs: Option<u64>,
    /// Delay before every token answer, good or bad.
    pub delay_ms: u64,
    /// Certificate assertions are refused (AADSTS700027) as if their certificate were not
    /// registered on the app: a certificate replaced in Entra but not in the cluster.
    pub wrong_certificate: bool,
}

impl Default for TokenEndpointFaults {
    fn default() -> Self {
        Self {
            fail_next: 0,
            fail_ratio: 0.0,
            status: 503,
            retry_after_secs: Some(1),
            delay_ms: 0,
            wrong_certificate: false,
        }
    }
}

/// Faults of the `$batch` envelope (inner requests meet the mailbox faults on their own).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BatchFaults {
    /// The next this many envelopes are refused whole with `status`, no inner request run.
    pub fail_next: u32,
    /// 429 (`TooManyRequests`), 503 (`serviceNotAvailable`) or 403 (`Forbidden`, refused by
    /// a tenant policy, without `Retry-After`).
    pub status: u16,
    /// `Retry-After` seconds on refused envelopes.
    pub retry_after_secs: u64,
    /// Answer the inner responses in a shuffled order (Graph promises no order).
    pub shuffle_responses: bool,
}

impl Default for BatchFaults {
    fn default() -> Self {
        Self {
            fail_next: 0,
            status: 429,
            retry_after_secs: 1,
            shuffle_responses: false,
        }
    }
}

/// A per-mailbox request budget: `requests` per `window_secs`, counted also while throttled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    pub requests: u32,
    pub window_secs: u64,
}

/// How a malformed page is broken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MalformedKind {
    /// The JSON stops in the middle.
    #[default]
    TruncatedJson,
    /// Valid JSON, but `value` is not an array.
    WrongShape,
    /// An HTML error page with status 200.
    NotJson,
}

/// What the emulator saw, for assertions.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    /// Calls to the token endpoint, successful or not.
    pub token_requests: u64,
    pub tokens_issued: u64,
    /// Tokens issued, by the credential that proved the client: `secret`,
    /// `certificate:<x5t#S256>`, `federated:<subject>`.
    pub tokens_by_credential: BTreeMap<String, u64>,
    /// The `jti` of every client assertion accepted (certificate or federated), in order.
    pub assertion_ids: Vec<String>,
    /// Graph requests, by the credential behind their token.
    pub requests_by_credential: BTreeMap<String, u64>,
    /// Token requests answered by an injected fault (`token_endpoint`).
    pub token_faults: u64,
    /// `$batch` envelopes, refused ones included (inner requests count per mailbox).
    pub batches: u64,
    /// `$batch` envelopes refused whole by an injected fault (`batch`).
    pub batches_refused: u64,
    /// Per mailbox (lower-case UPN or the id the request used).
    pub mailboxes: BTreeMap<String, MailboxCounters>,
    /// Every 429 and every response carrying `Retry-After`, in order.
    pub throttles: Vec<ThrottleRecord>,
    /// Arrival time of every mailbox request, in order.
    pub arrivals: Vec<Arrival>,
}

/// Requests to one mailbox.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MailboxCounters {
    pub requests: u64,
    /// By endpoint: `list`, `delta`, `get`, `value`, `patch`, `move`, `attachments`,
    /// `attachment`, `attachmentValue`.
    pub by_endpoint: BTreeMap<String, u64>,
    /// By HTTP status of the answer.
    pub by_status: BTreeMap<u16, u64>,
    /// Most requests in flight at once, counting those refused for it.
    pub peak_concurrency: usize,
}

/// A response that told the client to wait.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ThrottleRecord {
    pub mailbox: String,
    /// Since the emulator started.
    pub at: Duration,
    pub status: u16,
    pub retry_after_secs: u64,
}

/// A request's arrival.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Arrival {
    pub mailbox: String,
    pub at: Duration,
}

/// A request that arrived while its mailbox's Retry-After was still running.
#[derive(Clone, Debug, PartialEq)]
pub struct EarlyRequest {
    pub mailbox: String,
    pub throttled_at: Duration,
    pub retry_after: Duration,
    pub arrived_at: Duration,
}

impl Counters {
    /// Total requests to a mailbox (key as given in the URL, lower-cased).
    pub fn requests(&self, mailbox: &str) -> u64 {
        self.mailbox(mailbox)
            .map_or(0, |counters| counters.requests)
    }

    pub fn mailbox(&self, mailbox: &str) -> Option<&MailboxCounters> {
        self.mailboxes.get(&mailbox.to_ascii_lowercase())
    }

    pub fn endpoint(&self, mailbox: &str, endpoint: &str) -> u64 {
        self.mailbox(mailbox)
            .and_then(|counters| counters.by_endpoint.get(endpoint).copied())
            .unwrap_or(0)
    }

    pub fn peak_concurrency(&self, mailbox: &str) -> usize {
        self.mailbox(mailbox)
            .map_or(0, |counters| counters.peak_concurrency)
    }

    /// Requests that arrived after a Retry-After was issued to their mailbox and before it ran
    /// out. Requests already on their way when the 429 left cannot have seen it: those
    /// arriving within `in_flight_grace` of the 429 are not counted.
    pub fn early_requests(&self, in_flight_grace: Duration) -> Vec<EarlyRequest> {
        let mut early = Vec::new();
        for throttle in &self.throttles {
            let retry_after = Duration::from_secs(throttle.retry_after_secs);
            let from = throttle.at + in_flight_grace;
            let until = throttle.at + retry_after;
            early.extend(
                self.arrivals
                    .iter()
                    .filter(|arrival| {
                        // The throttled request itself arrived at `throttle.at`.
                        arrival.mailbox == throttle.mailbox
                            && arrival.at > throttle.at
                            && arrival.at >= from
                            && arrival.at < until
                    })
                    .map(|arrival| EarlyRequest {
                        mailbox: arrival.mailbox.clone(),
                        throttled_at: throttle.at,
                        retry_after,
                        arrived_at: arrival.at,
                    }),
            );
        }
        early
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_requests_are_those_inside_the_retry_after_past_the_grace() {
        let at = |ms| Duration::from_millis(ms);
        let counters = Counters {
            throttles: vec![ThrottleRecord {
                mailbox: "a".into(),
                at: at(1000),
                status: 429,
                retry_after_secs: 1,
            }],
            arrivals: [
                (900, "a"),
                (1010, "a"),
                (1500, "a"),
                (1500, "b"),
                (2000, "a"),
            ]
            .into_iter()
            .map(|(ms, mailbox)| Arrival {
                mailbox: mailbox.into(),
                at: at(ms),
            })
            .collect(),
            ..Counters::default()
        };
        let early = counters.early_requests(at(50));
        assert_eq!(early.len(), 1, "{early:?}");
        assert_eq!(early[0].arrived_at, at(1500));
        let strict = counters.early_requests(Duration::ZERO);
        assert_eq!(strict.len(), 2, "{strict:?}");
    }
}
