//! The loss hunt: random sequences of mail traffic, Graph hazards, receiver outages and worker
//! crashes against the whole pipeline (Graph emulator, real Postgres, the in-process worker
//! pool, a counting webhook receiver), then a check of the guarantee: no message lost, none
//! delivered twice.
//!
//! Each seed drives one or two mailboxes (one MailboxPoll each, all with a webhook, some with
//! mark-as-read and move-to-archive after-actions) through a random sequence of steps: polls
//! (waited for, or left running), arrivals (single, bursts, late, with an old
//! `receivedDateTime`), deletes, moves out, moves in, moves back (same immutable id), delta
//! token evictions (410 `Gone`, `syncStateNotFound`, `resyncRequired`), Graph faults (429 with
//! every `Retry-After` form but the huge one, 503/504, slow pages, replays), receiver outages
//! and crashes (the worker pool dropped without shutdown, a fresh one started; leases expire
//! and tasks are rescued). Then faults are cleared, polls run until quiescent, and:
//!
//! - every message owed is recorded once and delivered: a message is owed when it was in the
//!   watched folder throughout at least one *clean* poll (a poll the hunt waited for, started
//!   with no round half-done and no poll task alive, whose round succeeded); a message added
//!   late (Graph shows it only after the folder's next round) throughout two. The final polls
//!   are clean, so every message in the folder at the end is owed. Messages that came and went
//!   between clean polls are owed nothing (Graph may never show them);
//! - every ledger row of a message is delivered or skipped (a tombstone), no task is dead, no
//!   after-action is left due; with after-actions, every delivered message nobody touched is
//!   read and moved;
//! - the receiver accepted only ledger keys, and each at most once, except repeats explained by
//!   a crash between a receiver's 2xx and its recording: at most crashes x worker concurrency
//!   in all, each of a ledger key; none without a crash.
//!
//! Modes: by default (CI) 4 seeds of 40 steps; `MAILPOLL_BIG=1` hunts `MAILPOLL_HUNT_SEEDS`
//! seeds (default 50) of 120 steps; every hazard is on in both. `MAILPOLL_HUNT_SEED=N` runs
//! seed N alone, `MAILPOLL_HUNT_HAZARDS=cap,old,moveback` (or `none`) picks the hazards that
//! once found losses (a filtered resync's cap, old-dated mail after a resync, tombstones of
//! messages moved back) one by one, `MAILPOLL_HUNT_VERBOSE=1` prints the step log of passing seeds
//! too. A failing seed prints its violations, the history of each lost message, its whole step
//! log and the command that replays it (the step sequence depends only on the seed, the mode
//! and the hazards; timings do not change it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use mailpoll::cursor::Source;
use mailpoll::delivery::signing::message_key;
use mailpoll::directory::MailboxConfig;
use mailpoll::graph::{Credentials, Governor, GovernorConfig, GraphClient, GraphConfig};
use mailpoll::pipeline::actions::ActionsHandler;
use mailpoll::pipeline::deliver::DeliverHandler;
use mailpoll::pipeline::poll::{PollHandler, PollSettings};
use mailpoll::pipeline::{ACTIONS, DELIVER, POLL};
use mailpoll::pipeline::{PollTask, poll_dedupe_key};
use mailpoll::queue::{
    self, NewTask, RetryPolicy, RunningPool, WorkerId, WorkerPool, WorkerPoolConfig,
};
use mailpoll::telemetry::metrics::Metrics;
use mailpoll_testkit::directory::StaticDirectory;
use mailpoll_testkit::graph::{
    DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, DEFAULT_TENANT, EmulatorConfig, EvictionResponse,
    Faults, GraphEmulator, NewMessage, RetryAfterFormat,
};
use mailpoll_testkit::pg::TestDatabase;
use mailpoll_testkit::webhook_receiver::WebhookReceiver;
use mailpoll_testkit::{wait_for, wait_until};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use uuid::Uuid;

// ------------------------------------------------------------------ the world

const MAILBOXES: [&str; 2] = ["hunt-a@contoso.com", "hunt-b@contoso.com"];
const WATCHED: &str = "inbox";
/// Folders mail is moved out to and in from (`archive` is also the after-action's target).
const OTHER_FOLDERS: [&str; 3] = ["archive", "junkemail", "deleteditems"];
const AFTER_ACTION_FOLDER: &str = "archive";
const SECRET: &str = mailpoll_testkit::webhook_receiver::TEST_SIGNING_SECRET;
/// Worker concurrency: also the most webhook calls one crash can leave unrecorded.
const CONCURRENCY: usize = 4;
const PAGE_SIZE: u32 = 4;
/// The filtered delta cap when that hazard is on.
const SMALL_CAP: usize = 6;
/// Task lease: a crashed pool's tasks are rescued this long after its last heartbeat.
const TASK_LEASE: Duration = Duration::from_secs(3);
const RUN_LEASE: Duration = Duration::from_secs(4);
/// Attempts of every task: outages in the hunt are bounded, so no task should die.
const MAX_ATTEMPTS: i32 = 1000;
const WAIT: Duration = Duration::from_secs(180);

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Which hazards a run switches on.
#[derive(Clone, Copy, Debug)]
struct Hazards {
    small_cap: bool,
    old_mail: bool,
    move_back: bool,
}

/// How much to hunt.
#[derive(Clone, Debug)]
struct Mode {
    big: bool,
    seeds: Vec<u64>,
    steps: usize,
    hazards: Hazards,
}

impl Mode {
    fn from_env() -> Self {
        let big = env_flag("MAILPOLL_BIG");
        // Every hazard is on unless `MAILPOLL_HUNT_HAZARDS=cap,old,moveback` (or `none`)
        // chooses them one by one (to bisect a counter-example).
        let chosen = std::env::var("MAILPOLL_HUNT_HAZARDS").ok();
        let pick = |name: &str| match &chosen {
            Some(list) => list.split(',').any(|item| item.trim() == name),
            None => true,
        };
        let seeds = match env_number("MAILPOLL_HUNT_SEED") {
            Some(seed) => vec![seed],
            None if big => (1..=env_number("MAILPOLL_HUNT_SEEDS").unwrap_or(50)).collect(),
            None => vec![1, 2, 3, 4],
        };
        Self {
            big,
            seeds,
            steps: if big { 120 } else { 40 },
            hazards: Hazards {
                small_cap: pick("cap"),
                old_mail: pick("old"),
                move_back: pick("moveback"),
            },
        }
    }

    fn replay_hint(&self, seed: u64) -> String {
        let mut vars = format!("MAILPOLL_HUNT_SEED={seed}");
        if self.big {
            vars.push_str(" MAILPOLL_BIG=1");
        }
        let Hazards {
            small_cap,
            old_mail,
            move_back,
        } = self.hazards;
        let names: Vec<&str> = [
            (small_cap, "cap"),
            (old_mail, "old"),
            (move_back, "moveback"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        let list = if names.is_empty() {
            "none".to_string()
        } else {
            names.join(",")
        };
        let _ = write!(vars, " MAILPOLL_HUNT_HAZARDS={list}");
        format!("{vars} cargo nextest run --test loss_hunt")
    }
}

/// A message the hunt created, as the hunt knows it.
#[derive(Debug)]
struct Known {
    id: String,
    /// Where the hunt last put it (after-actions move mail without telling the hunt).
    folder: &'static str,
    deleted: bool,
    /// Added late: delta shows it only after a round of its folder has ended.
    late: bool,
    old: bool,
    /// Moved by the hunt at least once (after-action checks leave such mail alone).
    moved: bool,
    /// Moved out of the watched folder by the hunt and not back yet.
    moved_out: bool,
    /// Clean polls (by number) during which it was in the watched folder throughout.
    present_in: Vec<usize>,
    /// Step log lines about this message.
    history: Vec<String>,
}

impl Known {
    fn owed(&self) -> bool {
        self.present_in.len() >= if self.late { 2 } else { 1 }
    }
}

/// One MailboxPoll and the hunt's view of its mailbox.
struct Mailbox {
    upn: &'static str,
    uid: Uuid,
    mark_as_read: bool,
    move_to: Option<&'static str>,
    known: Vec<Known>,
    watched_id: String,
}

#[derive(Default, Debug)]
struct Tally {
    crashes: usize,
    evictions: usize,
    clean_polls: usize,
    unclean_polls: usize,
}

struct Hunt {
    seed: u64,
    rng: StdRng,
    hazards: Hazards,
    db: TestDatabase,
    emulator: GraphEmulator,
    receiver: WebhookReceiver,
    directory: StaticDirectory,
    mailboxes: Vec<Mailbox>,
    pool: Option<RunningPool>,
    pools_started: usize,
    log: Vec<String>,
    step: usize,
    tally: Tally,
    /// Steps left before the receiver recovers from an outage.
    receiver_down_for: Option<usize>,
    old_clock: i64,
}

impl Hunt {
    async fn start(seed: u64, hazards: Hazards) -> Self {
        mailpoll::install_crypto_provider();
        let mut rng = StdRng::seed_from_u64(seed);
        let db = TestDatabase::create().await.expect("test database");
        let faults = Faults {
            filtered_delta_cap: if hazards.small_cap {
                SMALL_CAP
            } else {
                Faults::default().filtered_delta_cap
            },
            ..Faults::default()
        };
        let emulator = GraphEmulator::start(EmulatorConfig {
            mailboxes: MAILBOXES.iter().map(|m| (*m).to_string()).collect(),
            seed,
            faults,
            ..EmulatorConfig::default()
        })
        .await
        .expect("Graph emulator");
        let receiver = WebhookReceiver::start(Some(SECRET))
            .await
            .expect("receiver");
        let directory = StaticDirectory::default();
        let count = if rng.random_bool(0.5) { 2 } else { 1 };
        let mut mailboxes = Vec::new();
        for upn in MAILBOXES.iter().take(count) {
            let (mark_as_read, move_to) = match rng.random_range(0..4u8) {
                0 => (true, None),
                1 => (true, Some(AFTER_ACTION_FOLDER)),
                2 => (false, Some(AFTER_ACTION_FOLDER)),
                _ => (false, None),
            };
            mailboxes.push(Mailbox {
                upn,
                uid: Uuid::new_v4(),
                mark_as_read,
                move_to,
                known: Vec::new(),
                watched_id: emulator.folder_id(upn, WATCHED).expect("watched folder"),
            });
        }
        let mut hunt = Self {
            seed,
            rng,
            hazards,
            db,
            emulator,
            receiver,
            directory,
            mailboxes,
            pool: None,
            pools_started: 0,
            log: Vec::new(),
            step: 0,
            tally: Tally::default(),
            receiver_down_for: None,
            old_clock: 0,
        };
        for index in 0..hunt.mailboxes.len() {
            let config = hunt.config(index);
            hunt.directory.insert(config);
            let mailbox = &hunt.mailboxes[index];
            let line = format!(
                "mailbox {index} {}: markAsRead={} moveToFolder={:?}",
                mailbox.upn, mailbox.mark_as_read, mailbox.move_to
            );
            hunt.note(line);
        }
        hunt.pool = Some(hunt.workers());
        hunt
    }

    fn config(&self, index: usize) -> MailboxConfig {
        let mailbox = &self.mailboxes[index];
        MailboxConfig {
            ledger_id: mailbox.uid,
            source: Source {
                uid: mailbox.uid,
                namespace: "hunt".into(),
                name: format!("mailbox-{index}"),
                mailbox: mailbox.upn.into(),
                folder: WATCHED.into(),
            },
            credentials: Credentials::client_secret(
                DEFAULT_TENANT,
                DEFAULT_CLIENT_ID,
                DEFAULT_CLIENT_SECRET,
            ),
            webhook: Some(self.receiver.endpoint(Some(SECRET)).expect("endpoint")),
            include_body: true,
            mark_as_read: mailbox.mark_as_read,
            move_to_folder: mailbox.move_to.map(str::to_owned),
            max_attempts: MAX_ATTEMPTS,
            start: Default::default(),
            filter: None,
            max_concurrent_deliveries: None,
        }
    }

    fn graph(&self) -> GraphClient {
        let base = self.emulator.base_url();
        GraphClient::new(
            GraphConfig::with_urls(&base, &base).expect("Graph config"),
            Governor::new(GovernorConfig {
                backoff_base: Duration::from_millis(20),
                backoff_cap: Duration::from_millis(200),
                max_retries: 30,
                ..GovernorConfig::default()
            }),
        )
        .expect("Graph client")
    }

    /// A fresh worker pool, as a restarted process would run it (a new worker id).
    fn workers(&mut self) -> RunningPool {
        self.pools_started += 1;
        let metrics = Arc::new(Metrics::new());
        let directory = Arc::new(self.directory.clone());
        let graph = self.graph();
        WorkerPool::new(
            self.db.pool.clone(),
            WorkerPoolConfig {
                worker_id: WorkerId::named(&format!("hunt-{}-{}", self.seed, self.pools_started)),
                concurrency: CONCURRENCY,
                prefetch: CONCURRENCY,
                lease: TASK_LEASE,
                heartbeat_interval: Duration::from_millis(500),
                poll_interval: Duration::from_millis(100),
                rescue_interval: Duration::from_millis(250),
                retry: RetryPolicy {
                    base: Duration::from_millis(20),
                    cap: Duration::from_millis(200),
                },
                ..WorkerPoolConfig::default()
            },
        )
        .register(
            POLL,
            PollHandler {
                pool: self.db.pool.clone(),
                directory: directory.clone(),
                graph: graph.clone(),
                metrics: metrics.clone(),
                settings: PollSettings {
                    page_size: PAGE_SIZE,
                    run_lease: RUN_LEASE,
                    ..PollSettings::default()
                },
            },
        )
        .register(
            DELIVER,
            DeliverHandler::new(
                self.db.pool.clone(),
                directory.clone(),
                mailpoll_testkit::webhook_receiver::loopback_webhook_client(),
                metrics.clone(),
            ),
        )
        .register(
            ACTIONS,
            ActionsHandler {
                pool: self.db.pool.clone(),
                directory,
                graph,
                metrics,
                run_budget: Duration::from_secs(2),
            },
        )
        .start()
        .expect("worker pool")
    }

    fn note(&mut self, line: String) {
        self.log.push(format!("[{:>3}] {line}", self.step));
    }

    fn note_message(&mut self, mailbox: usize, message: usize, line: String) {
        let entry = format!("[{:>3}] {line}", self.step);
        self.mailboxes[mailbox].known[message]
            .history
            .push(entry.clone());
        self.log.push(entry);
    }

    // -------------------------------------------------------------- steps

    async fn run_step(&mut self) {
        self.step += 1;
        if let Some(left) = self.receiver_down_for {
            if left == 0 {
                self.receiver.set_failure_rate(0.0);
                self.receiver_down_for = None;
                self.note("receiver recovers".into());
            } else {
                self.receiver_down_for = Some(left - 1);
            }
        }
        let mailbox = self.rng.random_range(0..self.mailboxes.len());
        let roll = self.rng.random_range(0..100u32);
        match roll {
            0..=21 => {
                self.clean_poll(mailbox).await;
            }
            22..=26 => self.poll_in_background(mailbox).await,
            27..=36 => self.arrive(mailbox, 1, Arrival::Normal),
            37..=42 => {
                let n = self.rng.random_range(2..=SMALL_CAP + 4);
                self.arrive(mailbox, n, Arrival::Normal);
            }
            43..=45 => {
                if self.hazards.old_mail {
                    let n = self.rng.random_range(1..=3);
                    self.arrive(mailbox, n, Arrival::Old);
                } else {
                    self.arrive(mailbox, 1, Arrival::Normal);
                }
            }
            46..=48 => {
                let n = self.rng.random_range(1..=3);
                self.arrive(mailbox, n, Arrival::Late);
            }
            49..=53 => self.delete(mailbox),
            54..=59 => self.move_out(mailbox),
            60..=64 => self.move_in(mailbox),
            65..=69 => {
                if self.hazards.move_back {
                    self.move_back(mailbox);
                } else {
                    self.move_out(mailbox);
                }
            }
            70..=73 => self.evict(mailbox),
            74..=79 => self.graph_faults(),
            80..=82 => self.clear_graph_faults(),
            83..=87 => self.receiver_fault(),
            88..=91 => self.crash(),
            _ => {
                self.clean_poll(mailbox).await;
            }
        }
    }

    /// Mail some folders hold before the first poll.
    fn seed_mail(&mut self) {
        for mailbox in 0..self.mailboxes.len() {
            let inbox = self.rng.random_range(0..=6usize);
            self.arrive(mailbox, inbox, Arrival::Normal);
            for folder in OTHER_FOLDERS {
                let n = self.rng.random_range(1..=3usize);
                self.add(mailbox, folder, n, Arrival::Normal);
            }
            if self.hazards.old_mail {
                let n = self.rng.random_range(1..=2usize);
                self.add(mailbox, "junkemail", n, Arrival::Old);
            }
        }
    }

    fn arrive(&mut self, mailbox: usize, n: usize, kind: Arrival) {
        self.add(mailbox, WATCHED, n, kind);
    }

    fn add(&mut self, mailbox: usize, folder: &'static str, n: usize, kind: Arrival) {
        let upn = self.mailboxes[mailbox].upn;
        for _ in 0..n {
            let message = match kind {
                Arrival::Old => {
                    // Days before the emulator's clock (2025-03-04 08:00): outside any resync
                    // window the operator uses.
                    self.old_clock += 7;
                    NewMessage {
                        received: Utc
                            .with_ymd_and_hms(2025, 2, 20, 6, 0, 0)
                            .single()
                            .map(|at| at + chrono::Duration::seconds(self.old_clock)),
                        ..NewMessage::default()
                    }
                }
                _ => NewMessage::default(),
            };
            let ids = if matches!(kind, Arrival::Late) {
                self.emulator.add_late_message(upn, folder, message)
            } else {
                self.emulator.add_message(upn, folder, message)
            }
            .expect("add message");
            let known = Known {
                id: ids.immutable_id,
                folder,
                deleted: false,
                late: matches!(kind, Arrival::Late),
                old: matches!(kind, Arrival::Old),
                moved: false,
                moved_out: false,
                present_in: Vec::new(),
                history: Vec::new(),
            };
            self.mailboxes[mailbox].known.push(known);
            let index = self.mailboxes[mailbox].known.len() - 1;
            let id = short(&self.mailboxes[mailbox].known[index].id);
            self.note_message(
                mailbox,
                index,
                format!("mb{mailbox} add {id} to {folder} ({kind:?})"),
            );
        }
    }

    /// A random live message that `wanted` accepts.
    fn pick(&mut self, mailbox: usize, wanted: impl Fn(&Known) -> bool) -> Option<usize> {
        let candidates: Vec<usize> = self.mailboxes[mailbox]
            .known
            .iter()
            .enumerate()
            .filter(|(_, known)| !known.deleted && wanted(known))
            .map(|(index, _)| index)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        // Half the time the newest: mail that leaves (or comes back) before a poll saw it is
        // where the ledger's tombstones and Graph's removals meet.
        if self.rng.random_bool(0.5) {
            return candidates.last().copied();
        }
        Some(candidates[self.rng.random_range(0..candidates.len())])
    }

    fn move_to(&mut self, mailbox: usize, message: usize, folder: &'static str, what: &str) {
        let upn = self.mailboxes[mailbox].upn;
        let known = &mut self.mailboxes[mailbox].known[message];
        self.emulator
            .move_message(upn, &known.id, folder)
            .expect("move message");
        let from = known.folder;
        known.folder = folder;
        known.moved = true;
        if from == WATCHED && folder != WATCHED {
            known.moved_out = true;
        } else if folder == WATCHED {
            known.moved_out = false;
        }
        let id = short(&known.id);
        self.note_message(
            mailbox,
            message,
            format!("mb{mailbox} {what} {id}: {from} -> {folder}"),
        );
    }

    fn delete(&mut self, mailbox: usize) {
        let Some(message) = self.pick(mailbox, |_| true) else {
            return self.note(format!("mb{mailbox} delete: nothing to delete"));
        };
        let upn = self.mailboxes[mailbox].upn;
        let known = &mut self.mailboxes[mailbox].known[message];
        self.emulator
            .delete_message(upn, &known.id)
            .expect("delete message");
        known.deleted = true;
        let (id, folder) = (short(&known.id), known.folder);
        self.note_message(
            mailbox,
            message,
            format!("mb{mailbox} delete {id} from {folder}"),
        );
    }

    fn move_out(&mut self, mailbox: usize) {
        let Some(message) = self.pick(mailbox, |known| known.folder == WATCHED) else {
            return self.note(format!("mb{mailbox} move out: inbox empty"));
        };
        let folder = OTHER_FOLDERS[self.rng.random_range(0..OTHER_FOLDERS.len())];
        self.move_to(mailbox, message, folder, "move out");
    }

    fn move_in(&mut self, mailbox: usize) {
        let old_mail = self.hazards.old_mail;
        let Some(message) = self.pick(mailbox, |known| {
            known.folder != WATCHED && !known.moved_out && (old_mail || !known.old)
        }) else {
            return self.note(format!("mb{mailbox} move in: nothing elsewhere"));
        };
        self.move_to(mailbox, message, WATCHED, "move in");
    }

    fn move_back(&mut self, mailbox: usize) {
        let Some(message) = self.pick(mailbox, |known| known.moved_out) else {
            return self.move_out(mailbox);
        };
        self.move_to(mailbox, message, WATCHED, "move back");
    }

    fn evict(&mut self, mailbox: usize) {
        let kind = match self.rng.random_range(0..3u8) {
            0 => EvictionResponse::Gone,
            1 => EvictionResponse::SyncStateNotFound,
            _ => EvictionResponse::ResyncRequired,
        };
        let upn = self.mailboxes[mailbox].upn;
        self.emulator.update_faults(|faults| faults.eviction = kind);
        self.emulator
            .evict_delta_tokens(upn)
            .expect("evict delta tokens");
        self.tally.evictions += 1;
        self.note(format!("mb{mailbox} evict delta tokens ({kind:?})"));
    }

    fn graph_faults(&mut self) {
        let throttle = [0.0, 0.05, 0.15, 0.3][self.rng.random_range(0..4usize)];
        let format = [
            RetryAfterFormat::Seconds,
            RetryAfterFormat::Zero,
            RetryAfterFormat::HttpDate,
            RetryAfterFormat::PastHttpDate,
            RetryAfterFormat::Missing,
        ][self.rng.random_range(0..5usize)];
        let server_errors = [0.0, 0.05, 0.15][self.rng.random_range(0..3usize)];
        let server_retry_after = self.rng.random_bool(0.5).then_some(1);
        let slow = [0, 0, 20, 80][self.rng.random_range(0..4usize)];
        let replay = [0.0, 0.1, 0.3][self.rng.random_range(0..3usize)];
        self.emulator.update_faults(|faults| {
            faults.throttle_ratio = throttle;
            faults.retry_after_format = format;
            faults.server_error_ratio = server_errors;
            faults.server_error_retry_after_secs = server_retry_after;
            faults.slow_page_ms = slow;
            faults.replay_ratio = replay;
        });
        self.note(format!(
            "graph faults: 429 {throttle} ({format:?}), 5xx {server_errors} (Retry-After {server_retry_after:?}), slow {slow} ms, replay {replay}"
        ));
    }

    fn clear_graph_faults(&mut self) {
        self.emulator.update_faults(|faults| {
            faults.throttle_ratio = 0.0;
            faults.server_error_ratio = 0.0;
            faults.slow_page_ms = 0;
            faults.replay_ratio = 0.0;
        });
        self.note("graph faults cleared".into());
    }

    fn receiver_fault(&mut self) {
        if self.rng.random_bool(0.5) {
            let n = self.rng.random_range(1..=8usize);
            self.receiver.fail_next(n);
            self.note(format!("receiver: the next {n} requests answered 503"));
        } else {
            let rate = [0.3, 0.7, 1.0][self.rng.random_range(0..3usize)];
            let steps = self.rng.random_range(1..=4usize);
            self.receiver.set_failure_rate(rate);
            self.receiver_down_for = Some(steps);
            self.note(format!("receiver: 503 at rate {rate} for {steps} steps"));
        }
    }

    /// A killed process: the pool is dropped without shutdown (its handlers stop where they
    /// are, its leases run out), and a fresh process starts.
    fn crash(&mut self) {
        drop(self.pool.take());
        self.tally.crashes += 1;
        self.pool = Some(self.workers());
        self.note(format!(
            "CRASH: worker pool killed, pool #{} started",
            self.pools_started
        ));
    }

    // -------------------------------------------------------------- polls

    fn poll_task(&self, mailbox: usize) -> NewTask {
        let uid = self.mailboxes[mailbox].uid;
        NewTask::new(
            POLL,
            serde_json::to_value(PollTask { mailbox_uid: uid }).expect("payload"),
        )
        .owner(uid)
        .dedupe_key(poll_dedupe_key(uid))
        .max_attempts(MAX_ATTEMPTS)
    }

    async fn poll_in_background(&mut self, mailbox: usize) {
        let task = queue::enqueue(&self.db.pool, &self.poll_task(mailbox))
            .await
            .expect("enqueue poll");
        self.tally.unclean_polls += 1;
        self.note(format!(
            "mb{mailbox} poll (in the background, task {})",
            task.id
        ));
    }

    async fn live_polls(&self, mailbox: usize) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM tasks WHERE owner_uid = $1 AND kind = 'poll' AND state IN ('pending', 'running')",
        )
        .bind(self.mailboxes[mailbox].uid)
        .fetch_one(&self.db.pool)
        .await
        .expect("live polls")
    }

    /// The messages in the watched folder now, as the emulator has them, plus those the
    /// after-action moved out: only the hunt moves mail elsewhere, and the after-action moves
    /// a message only once it has been delivered, so such a message stayed in the folder at
    /// least until the operator had seen it.
    fn in_watched_folder(&self, mailbox: usize) -> HashSet<usize> {
        let mailbox_ref = &self.mailboxes[mailbox];
        let after_action = mailbox_ref.move_to.map(|folder| {
            self.emulator
                .folder_id(mailbox_ref.upn, folder)
                .expect("after-action folder")
        });
        mailbox_ref
            .known
            .iter()
            .enumerate()
            .filter(|(_, known)| !known.deleted)
            .filter(|(_, known)| {
                let Some(message) = self
                    .emulator
                    .message(mailbox_ref.upn, &known.id)
                    .expect("emulator lookup")
                else {
                    return false;
                };
                let folder = &message["parentFolderId"];
                *folder == mailbox_ref.watched_id.as_str()
                    || (known.folder == WATCHED
                        && after_action.as_deref().is_some_and(|id| *folder == id))
            })
            .map(|(index, _)| index)
            .collect()
    }

    /// A poll the hunt waits for. It is clean (it proves which messages it saw) when no poll
    /// was alive and no round half-done before it, and its round succeeded; then every message
    /// in the watched folder before and after it was there throughout its round.
    /// Returns how many messages its rounds recorded new.
    async fn clean_poll(&mut self, mailbox: usize) -> i64 {
        let uid = self.mailboxes[mailbox].uid;
        // A poll left running (or rescued after a crash) finishes first.
        wait_until("earlier polls to finish", WAIT, || async {
            self.live_polls(mailbox).await == 0
        })
        .await;
        let half_done: Option<Option<String>> = sqlx::query_scalar(
            "SELECT round_next_link FROM mailbox_cursors WHERE mailbox_uid = $1",
        )
        .bind(uid)
        .fetch_optional(&self.db.pool)
        .await
        .expect("cursor");
        let half_done = half_done.flatten().is_some();
        let before = self.in_watched_folder(mailbox);
        let task = queue::enqueue(&self.db.pool, &self.poll_task(mailbox))
            .await
            .expect("enqueue poll");
        let state: String = wait_for("the poll to finish", WAIT, || async {
            let state: String = sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
                .bind(task.id)
                .fetch_one(&self.db.pool)
                .await
                .expect("poll task");
            (state == "succeeded" || state == "dead").then_some(state)
        })
        .await;
        let after = self.in_watched_folder(mailbox);
        let (outcome, new): (Option<String>, i64) = sqlx::query_as(
            "SELECT (SELECT outcome FROM polls WHERE task_id = $1 ORDER BY id DESC LIMIT 1),
                    (SELECT COALESCE(sum(messages_new), 0)::bigint FROM polls WHERE task_id = $1)",
        )
        .bind(task.id)
        .fetch_one(&self.db.pool)
        .await
        .expect("poll outcome");
        let clean = !half_done && state == "succeeded" && outcome.as_deref() == Some("succeeded");
        if clean {
            self.tally.clean_polls += 1;
            let number = self.tally.clean_polls;
            let mut present: Vec<usize> = before.intersection(&after).copied().collect();
            present.sort_unstable();
            for index in present {
                self.mailboxes[mailbox].known[index].present_in.push(number);
            }
            self.note(format!(
                "mb{mailbox} poll #{number} (task {}): clean, {new} new, {} in the folder",
                task.id,
                after.len()
            ));
        } else {
            self.tally.unclean_polls += 1;
            self.note(format!(
                "mb{mailbox} poll (task {}): not clean (half-done round before: {half_done}, task {state}, round {outcome:?}), {new} new",
                task.id
            ));
        }
        new
    }

    async fn live_tasks(&self) -> i64 {
        let uids: Vec<Uuid> = self.mailboxes.iter().map(|m| m.uid).collect();
        sqlx::query_scalar(
            "SELECT count(*) FROM tasks WHERE owner_uid = ANY($1) AND state IN ('pending', 'running')",
        )
        .bind(&uids)
        .fetch_one(&self.db.pool)
        .await
        .expect("live tasks")
    }

    /// Faults off (Graph's cap stays: it is Graph, not a fault), then polls until a round of
    /// every mailbox finds nothing new and no task is left: at least two, so late mail shows.
    async fn quiesce(&mut self) {
        self.step += 1;
        self.note("quiesce: faults cleared".into());
        self.emulator.update_faults(|faults| {
            faults.throttle_ratio = 0.0;
            faults.server_error_ratio = 0.0;
            faults.slow_page_ms = 0;
            faults.replay_ratio = 0.0;
            faults.late_arrivals = false;
        });
        self.receiver.clear_faults();
        self.receiver_down_for = None;
        for round in 1..=10 {
            let mut new = 0;
            for mailbox in 0..self.mailboxes.len() {
                new += self.clean_poll(mailbox).await;
            }
            wait_until("no task pending or running", WAIT, || async {
                self.live_tasks().await == 0
            })
            .await;
            // What the leader's periodic sweep does (this world has workers, no leader): an
            // after-action made due while its mailbox's actions run was finishing has no run
            // left, and the sweep queues one.
            let stranded = mailpoll::pipeline::actions::requeue_stranded(&self.db.pool)
                .await
                .expect("the sweep of stranded after-actions");
            if stranded > 0 {
                self.note(format!("sweep: {stranded} stranded actions run(s) queued"));
                wait_until("the swept actions runs", WAIT, || async {
                    self.live_tasks().await == 0
                })
                .await;
                continue;
            }
            if round >= 2 && new == 0 {
                return;
            }
        }
        self.note("quiesce: still finding new mail after 10 rounds".into());
    }

    // -------------------------------------------------------------- the check

    async fn check(&mut self) -> Outcome {
        let mut violations: Vec<String> = Vec::new();
        let successes = self.receiver.successes();
        let mut ledger_keys: HashMap<String, (usize, String)> = HashMap::new();
        let mut messages = 0;
        let mut owed_total = 0;
        for (index, mailbox) in self.mailboxes.iter().enumerate() {
            let rows: Vec<(String, String, bool)> = sqlx::query_as(
                "SELECT message_id, delivery_state, actions_due FROM messages WHERE mailbox_uid = $1",
            )
            .bind(mailbox.uid)
            .fetch_all(&self.db.pool)
            .await
            .expect("ledger");
            let rows: BTreeMap<String, (String, bool)> = rows
                .into_iter()
                .map(|(id, state, due)| (id, (state, due)))
                .collect();
            let known: HashMap<&str, &Known> =
                mailbox.known.iter().map(|k| (k.id.as_str(), k)).collect();
            for (id, (state, due)) in &rows {
                ledger_keys.insert(message_key(mailbox.uid, id), (index, state.clone()));
                if !known.contains_key(id.as_str()) {
                    violations.push(format!(
                        "mb{index}: ledger row {id} of no message the hunt made"
                    ));
                }
                if state != "delivered" && state != "skipped" {
                    violations.push(format!("mb{index}: {} left {state}", short(id)));
                }
                if *due {
                    violations.push(format!(
                        "mb{index}: {} has after-actions still due",
                        short(id)
                    ));
                }
            }
            messages += mailbox.known.len();
            for message in &mailbox.known {
                if !message.owed() {
                    continue;
                }
                owed_total += 1;
                let key = message_key(mailbox.uid, &message.id);
                let state = rows.get(&message.id).map(|(state, _)| state.as_str());
                let received = successes.get(&key).copied().unwrap_or(0);
                if state != Some("delivered") || received == 0 {
                    violations.push(format!(
                        "LOST mb{index} {}: in the folder throughout clean polls {:?}{}{}, ledger {state:?}, receiver accepted it {received} times; its history:\n        {}",
                        short(&message.id),
                        message.present_in,
                        if message.late { " (late)" } else { "" },
                        if message.old { " (old receivedDateTime)" } else { "" },
                        message.history.join("\n        ")
                    ));
                }
            }
            violations.extend(self.check_after_actions(index, &rows));
        }
        let dead: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tasks WHERE owner_uid = ANY($1) AND state = 'dead'",
        )
        .bind(self.mailboxes.iter().map(|m| m.uid).collect::<Vec<_>>())
        .fetch_one(&self.db.pool)
        .await
        .expect("dead tasks");
        if dead > 0 {
            violations.push(format!("{dead} dead tasks"));
        }
        let mut repeats = 0u64;
        let mut deliveries = 0u64;
        for (key, &count) in &successes {
            deliveries += u64::from(count);
            match ledger_keys.get(key) {
                None => violations.push(format!(
                    "receiver accepted key {key}, which is no ledger key"
                )),
                Some((index, state)) if state != "delivered" => violations.push(format!(
                    "mb{index}: receiver accepted key {key} whose ledger row is {state}"
                )),
                Some(_) => {}
            }
            if count > 1 {
                repeats += u64::from(count - 1);
            }
        }
        for (key, (index, state)) in &ledger_keys {
            if state == "delivered" && !successes.contains_key(key) {
                violations.push(format!(
                    "mb{index}: delivered in the ledger, never accepted by the receiver ({key})"
                ));
            }
        }
        let allowed = (self.tally.crashes * CONCURRENCY) as u64;
        if repeats > allowed {
            violations.push(format!(
                "{repeats} repeated deliveries, more than {allowed} ({} crashes x concurrency {CONCURRENCY})",
                self.tally.crashes
            ));
        }
        let counters = self.emulator.counters();
        let throttled: u64 = counters
            .mailboxes
            .values()
            .map(|m| m.by_status.get(&429).copied().unwrap_or(0))
            .sum();
        let server_errors: u64 = counters
            .mailboxes
            .values()
            .map(|m| {
                m.by_status.get(&503).copied().unwrap_or(0)
                    + m.by_status.get(&504).copied().unwrap_or(0)
            })
            .sum();
        Outcome {
            messages,
            owed: owed_total,
            deliveries,
            repeats,
            throttled,
            server_errors,
            violations,
        }
    }

    /// With after-actions, a delivered message the hunt never moved nor deleted is read and
    /// moved.
    fn check_after_actions(
        &self,
        index: usize,
        rows: &BTreeMap<String, (String, bool)>,
    ) -> Vec<String> {
        let mailbox = &self.mailboxes[index];
        if !mailbox.mark_as_read && mailbox.move_to.is_none() {
            return Vec::new();
        }
        let target = mailbox.move_to.map(|folder| {
            self.emulator
                .folder_id(mailbox.upn, folder)
                .expect("folder")
        });
        let mut violations = Vec::new();
        for message in &mailbox.known {
            let delivered = rows
                .get(&message.id)
                .is_some_and(|(state, _)| state == "delivered");
            if !delivered || message.moved || message.deleted {
                continue;
            }
            let Some(now) = self
                .emulator
                .message(mailbox.upn, &message.id)
                .expect("emulator lookup")
            else {
                continue;
            };
            if mailbox.mark_as_read && now["isRead"] != true {
                violations.push(format!(
                    "mb{index}: {} delivered but not marked read",
                    short(&message.id)
                ));
            }
            if let Some(target) = &target
                && now["parentFolderId"] != target.as_str()
            {
                violations.push(format!(
                    "mb{index}: {} delivered but not moved",
                    short(&message.id)
                ));
            }
        }
        violations
    }
}

#[derive(Clone, Copy, Debug)]
enum Arrival {
    Normal,
    Old,
    Late,
}

struct Outcome {
    messages: usize,
    owed: usize,
    deliveries: u64,
    repeats: u64,
    throttled: u64,
    server_errors: u64,
    violations: Vec<String>,
}

fn short(id: &str) -> String {
    // Immutable ids share a long prefix; the tail tells them apart.
    id.get(id.len().saturating_sub(8)..)
        .unwrap_or(id)
        .to_string()
}

/// Runs one seed; `Err` holds the counter-example.
async fn hunt(mode: &Mode, seed: u64) -> Result<String, String> {
    let started = Instant::now();
    let mut hunt = Hunt::start(seed, mode.hazards).await;
    hunt.seed_mail();
    for _ in 0..mode.steps {
        hunt.run_step().await;
    }
    hunt.quiesce().await;
    let outcome = hunt.check().await;
    if let Some(pool) = hunt.pool.take() {
        pool.shutdown().await;
    }
    let summary = format!(
        "seed {seed}: {} mailboxes, {} messages ({} owed), {} deliveries, {} repeats, {} crashes, {} evictions, {} 429s, {} 5xx, {} clean polls, {:.1} s: {}",
        hunt.mailboxes.len(),
        outcome.messages,
        outcome.owed,
        outcome.deliveries,
        outcome.repeats,
        hunt.tally.crashes,
        hunt.tally.evictions,
        outcome.throttled,
        outcome.server_errors,
        hunt.tally.clean_polls,
        started.elapsed().as_secs_f64(),
        if outcome.violations.is_empty() {
            "ok".to_string()
        } else {
            format!("FAILED ({} violations)", outcome.violations.len())
        }
    );
    println!("{summary}");
    if outcome.violations.is_empty() {
        if env_flag("MAILPOLL_HUNT_VERBOSE") {
            println!("  {}", hunt.log.join("\n  "));
        }
        return Ok(summary);
    }
    let mut report = format!(
        "{summary}\nreplay: {}\nviolations:\n",
        mode.replay_hint(seed)
    );
    for violation in &outcome.violations {
        let _ = writeln!(report, "  - {violation}");
    }
    let _ = writeln!(report, "steps:");
    for line in &hunt.log {
        let _ = writeln!(report, "  {line}");
    }
    Err(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_is_lost_or_delivered_twice_whatever_happens() {
    let mode = Mode::from_env();
    println!(
        "loss hunt: {} seeds x {} steps, hazards {:?}",
        mode.seeds.len(),
        mode.steps,
        mode.hazards
    );
    let mut failures = Vec::new();
    for &seed in &mode.seeds {
        if let Err(report) = hunt(&mode, seed).await {
            eprintln!("{report}");
            failures.push(seed);
        }
    }
    assert!(
        failures.is_empty(),
        "the hunt found losses or repeats for seeds {failures:?} (reports above; replay one with MAILPOLL_HUNT_SEED=N)"
    );
}
