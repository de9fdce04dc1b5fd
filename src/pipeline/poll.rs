//! The `poll` task: one delta round over a mailbox folder, page by page.
//!
//! Per page, ONE transaction records the messages in the ledger, enqueues a deliver task for
//! each message recorded for the first time, and advances the cursor (the round's nextLink,
//! or the deltaLink at the end). Pages commit in order; while one commits, the next already
//! inserts its rows on a second connection. A crash replays at most the pages whose
//! transactions had not committed (two), and the ledger absorbs the replay; a crash inside a
//! page's transaction changes nothing.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::cursor::{self, Acquired, Cursor, CursorError, RunLease};
use super::deliver::DeliverTask;
use super::{DELIVER, Directory, MailboxConfig};
use crate::graph::{
    DeltaOptions, DeltaStart, EmailAddress, GraphClient, GraphError, Message, Page, PageLink,
};
use crate::ledger::{self, DeliveryState, LedgerMessage, Removal};
use crate::queue::{self, ClaimedTask, Handler, HandlerError, NewTask, TaskContext};
use crate::telemetry::metrics::SharedMetrics;

/// Postgres channel on which a finished poll names its MailboxPoll (`namespace/name`), so the
/// leader refreshes that resource's status at once.
pub const MAILBOX_CHANGED_CHANNEL: &str = "mailpoll_mailbox_changed";

/// Payload of a `poll` task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollTask {
    pub mailbox_uid: Uuid,
}

/// The dedupe key of a mailbox's poll task: at most one pending or running poll each.
pub fn poll_dedupe_key(uid: Uuid) -> String {
    format!("{}:{uid}", super::POLL)
}

/// Tunables of polling.
#[derive(Debug, Clone)]
pub struct PollSettings {
    /// Items per delta page (`Prefer: odata.maxpagesize`).
    pub page_size: u32,
    /// The mailbox run lease; extended with every committed page.
    pub run_lease: Duration,
    /// A resync re-reads mail received this long before the high-water mark.
    pub resync_window: Duration,
    /// Most rounds one task runs for forced polls that arrived while it was running.
    pub max_rounds: u32,
}

impl Default for PollSettings {
    fn default() -> Self {
        Self {
            page_size: 100,
            run_lease: Duration::from_secs(120),
            resync_window: Duration::from_secs(24 * 3600),
            max_rounds: 3,
        }
    }
}

pub struct PollHandler<D> {
    pub pool: PgPool,
    pub directory: Arc<D>,
    pub graph: GraphClient,
    pub metrics: SharedMetrics,
    pub settings: PollSettings,
}

/// Why a round stopped early.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Cursor(#[from] CursorError),
    #[error("database error while recording a page: {0}")]
    Db(#[from] sqlx::Error),
    #[error("cannot enqueue deliver tasks: {0}")]
    Queue(#[from] queue::QueueError),
    #[error("the worker is shutting down")]
    ShuttingDown,
    #[error("the poll task's lease was taken over")]
    TaskLeaseLost,
    #[error("the previous page of the round was not recorded")]
    PreviousPageFailed,
}

/// Pages of a round whose transactions may be open at once.
const PAGES_IN_FLIGHT: usize = 2;

/// A page's place in the round's commit order.
struct PageChain {
    previous: Option<Predecessor>,
    /// Told once this page holds its connection.
    began: oneshot::Sender<()>,
    /// Told once this page has committed; dropped unsent when it failed.
    committed: oneshot::Sender<()>,
}

/// The previous page of a round, as the next page sees it.
struct Predecessor {
    /// Ids of every item on it.
    ids: HashSet<String>,
    began: oneshot::Receiver<()>,
    committed: oneshot::Receiver<()>,
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy)]
struct RoundStats {
    pages: i32,
    /// Graph calls of the round, retries included (tokens are counted by the token cache).
    graph_requests: i32,
    seen: i32,
    new: i32,
    resynced: bool,
}

impl<D: Directory> Handler for PollHandler<D> {
    async fn handle(&self, task: &ClaimedTask, ctx: &TaskContext) -> Result<(), HandlerError> {
        let job: PollTask = super::payload(task)?;
        let config = match self.directory.lookup(job.mailbox_uid).await {
            Ok(Some(config)) => config,
            // Deleted: nothing to poll.
            Ok(None) => return Ok(()),
            Err(error @ super::ConfigError::Unavailable(_)) => {
                return Err(HandlerError::retryable(error));
            }
            Err(error) => {
                // A configuration problem (missing Secret, say): the poll ran and failed; the
                // condition tells the user, and the next scheduled poll tries again.
                self.record_failed_poll(
                    job.mailbox_uid,
                    task.id,
                    error.reason(),
                    &error.to_string(),
                )
                .await
                .map_err(HandlerError::retryable)?;
                return Ok(());
            }
        };
        let (lease, cursor) =
            match cursor::acquire(&self.pool, &config.source, self.settings.run_lease)
                .await
                .map_err(HandlerError::retryable)?
            {
                Acquired::Held(lease, cursor) => (lease, cursor),
                Acquired::Busy { until } => {
                    return Err(HandlerError::snooze(
                        wait_until(until).min(Duration::from_secs(5)),
                    ));
                }
            };
        let result = self.run(task, ctx, &config, lease, cursor).await;
        if let Err(error) = cursor::release(&self.pool, lease).await {
            tracing::warn!(%error, "cannot release the mailbox run lease; it expires on its own");
        }
        self.announce(&config).await;
        result
    }
}

/// How long until `until`, at least a short pause so a snooze never spins.
fn wait_until(until: DateTime<Utc>) -> Duration {
    (until - Utc::now())
        .to_std()
        .unwrap_or_default()
        .max(Duration::from_millis(200))
}

impl<D: Directory> PollHandler<D> {
    async fn run(
        &self,
        task: &ClaimedTask,
        ctx: &TaskContext,
        config: &MailboxConfig,
        lease: RunLease,
        mut cursor: Cursor,
    ) -> Result<(), HandlerError> {
        let uid = config.source.uid;
        if let Some(until) = cursor.throttled_until.filter(|t| *t > Utc::now()) {
            self.graph
                .governor()
                .pause_until(&config.source.mailbox, until);
            return Err(HandlerError::snooze(wait_until(until)));
        }
        let mailbox = self
            .graph
            .mailbox(config.credentials.clone(), config.source.mailbox.clone());
        for round in 1..=self.settings.max_rounds {
            let started = db_now(&self.pool).await.map_err(HandlerError::retryable)?;
            let poll_id = start_poll(&self.pool, uid, task.id)
                .await
                .map_err(HandlerError::retryable)?;
            let outcome = self
                .round(ctx, config, &mailbox, lease, &cursor, poll_id)
                .await;
            match outcome {
                Ok(stats) => {
                    finish_poll(&self.pool, poll_id, Ok(stats))
                        .await
                        .map_err(HandlerError::retryable)?;
                    self.metrics.poll_finished(None);
                    let waiting = serve_requests(&self.pool, uid, task.id, poll_id, started)
                        .await
                        .map_err(HandlerError::retryable)?;
                    if !waiting || round == self.settings.max_rounds {
                        return Ok(());
                    }
                    // A forced poll arrived during this round: it gets a round of its own.
                    cursor = reload(&self.pool, uid)
                        .await
                        .map_err(HandlerError::retryable)?;
                }
                Err(error) => {
                    let reason = reason_of(&error);
                    finish_poll(&self.pool, poll_id, Err((reason, error.to_string())))
                        .await
                        .map_err(HandlerError::retryable)?;
                    self.metrics.poll_finished(Some(reason));
                    return self
                        .after_failure(task, config, error, poll_id, started, lease)
                        .await;
                }
            }
        }
        Ok(())
    }

    /// What a failed round means for the task.
    async fn after_failure(
        &self,
        task: &ClaimedTask,
        config: &MailboxConfig,
        error: RoundError,
        poll_id: i64,
        started: DateTime<Utc>,
        lease: RunLease,
    ) -> Result<(), HandlerError> {
        let source = &config.source;
        tracing::warn!(namespace = %source.namespace, name = %source.name, %error, "poll failed");
        match error {
            RoundError::Graph(GraphError::Throttled { retry_after, .. }) => {
                let wait = retry_after.unwrap_or(Duration::from_secs(30));
                let until = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
                cursor::set_throttled_until(&self.pool, &source.mailbox, until)
                    .await
                    .map_err(HandlerError::retryable)?;
                // Graph's Retry-After is a snooze, not a failed attempt.
                Err(HandlerError::snooze(wait))
            }
            RoundError::Graph(ref graph) if graph.is_transient() => {
                Err(HandlerError::retryable(error))
            }
            RoundError::Graph(GraphError::ResyncRequired { .. }) => {
                // The round's own bounded resync was refused too: drop the cursor so the next
                // try starts from a fresh bounded query.
                let mut conn = self.pool.acquire().await.map_err(HandlerError::retryable)?;
                cursor::start_resync(&mut conn, lease)
                    .await
                    .map_err(HandlerError::retryable)?;
                Err(HandlerError::retryable(error))
            }
            RoundError::Graph(_) => {
                // Credentials, access, a missing mailbox or a bad query: retrying soon cannot
                // help. The poll is recorded as failed with its reason (the condition), and
                // the next scheduled poll tries again.
                serve_requests(&self.pool, source.uid, task.id, poll_id, started)
                    .await
                    .map_err(HandlerError::retryable)?;
                Ok(())
            }
            RoundError::ShuttingDown => Err(HandlerError::snooze(Duration::ZERO)),
            RoundError::Cursor(CursorError::LeaseLost) | RoundError::TaskLeaseLost => {
                Err(HandlerError::snooze(Duration::from_secs(1)))
            }
            RoundError::Cursor(_)
            | RoundError::Db(_)
            | RoundError::Queue(_)
            | RoundError::PreviousPageFailed => Err(HandlerError::retryable(error)),
        }
    }

    async fn round(
        &self,
        ctx: &TaskContext,
        config: &MailboxConfig,
        mailbox: &crate::graph::MailboxClient,
        lease: RunLease,
        cursor: &Cursor,
        poll_id: i64,
    ) -> Result<RoundStats, RoundError> {
        let start = match (&cursor.round_next_link, &cursor.delta_link) {
            (Some(next), _) => DeltaStart::Link(next.clone()),
            (None, Some(delta)) => DeltaStart::Link(delta.clone()),
            (None, None) => DeltaStart::Initial {
                received_since: None,
            },
        };
        let mut options = DeltaOptions::new(config.source.folder.clone(), start);
        options.page_size = self.settings.page_size;
        options.include_body = config.include_body;
        options.resync_since = cursor.watermark.map(|mark| {
            mark - chrono::Duration::from_std(self.settings.resync_window).unwrap_or_default()
        });
        let mut round = mailbox.delta_round(options)?;
        let requests_before = mailbox.requests_sent();
        let requests_so_far =
            || i32::try_from(mailbox.requests_sent() - requests_before).unwrap_or(i32::MAX);
        let stats = Mutex::new(RoundStats::default());
        // Pages are read ahead while earlier ones commit: Graph reading never waits for
        // Postgres, and two pages record their rows on two connections at once.
        let (page_tx, mut pages) = mpsc::channel::<Page>(1);
        let read = async move {
            while let Some(page) = round.next_page().await? {
                if page_tx.send(page).await.is_err() {
                    break; // recording stopped on an error, which it reports
                }
            }
            Ok::<(), RoundError>(())
        };
        let record = async {
            let mut in_flight = FuturesOrdered::new();
            let mut previous: Option<Predecessor> = None;
            let mut reading = true;
            let mut outcome = Ok(());
            // A page's transaction is never dropped half-way: after an error, the pages in
            // flight still run to their end (they fail at once, their predecessor having
            // failed) so each rolls back on its own connection before that returns to the pool.
            while (reading && outcome.is_ok()) || !in_flight.is_empty() {
                tokio::select! {
                    page = pages.recv(), if reading && outcome.is_ok() && in_flight.len() < PAGES_IN_FLIGHT => {
                        let Some(page) = page else {
                            reading = false;
                            continue;
                        };
                        if ctx.is_shutting_down() {
                            outcome = Err(RoundError::ShuttingDown);
                            continue;
                        }
                        if ctx.is_lease_lost() {
                            outcome = Err(RoundError::TaskLeaseLost);
                            continue;
                        }
                        let ids = page.messages.iter().map(|m| m.id.clone()).collect();
                        let (began, has_begun) = oneshot::channel();
                        let (committed, has_committed) = oneshot::channel();
                        let chain = PageChain {
                            previous: previous.replace(Predecessor {
                                ids,
                                began: has_begun,
                                committed: has_committed,
                            }),
                            began,
                            committed,
                        };
                        in_flight.push_back(self.commit_page(
                            config,
                            lease,
                            poll_id,
                            page,
                            chain,
                            &stats,
                            requests_so_far(),
                        ));
                    }
                    Some(committed) = in_flight.next(), if !in_flight.is_empty() => match committed {
                        Ok(new) => {
                            self.metrics.messages_recorded.inc_by(new);
                        }
                        // Pages fail in order: the first error is the cause.
                        Err(error) => {
                            if outcome.is_ok() {
                                outcome = Err(error);
                            }
                        }
                    },
                    else => break,
                }
            }
            pages.close();
            outcome
        };
        // Recording decides: once it has stopped, a Graph request still running is dropped.
        {
            tokio::pin!(read);
            tokio::pin!(record);
            let mut read_outcome = None;
            let recorded = loop {
                tokio::select! {
                    done = &mut read, if read_outcome.is_none() => read_outcome = Some(done),
                    done = &mut record => break done,
                }
            };
            recorded?;
            match read_outcome {
                Some(done) => done?,
                // Recording ended because the reader closed the channel: it is done, or about
                // to be.
                None => read.await?,
            }
        }
        let mut stats = stats.into_inner().unwrap_or_else(PoisonError::into_inner);
        // The last page's commit saw every request of the round but the ones after it.
        stats.graph_requests = requests_so_far();
        record_progress_on(&self.pool, poll_id, stats).await?;
        Ok(stats)
    }

    /// Records one page in ONE transaction: ledger rows, deliver tasks for new messages, the
    /// cursor, the poll's counters. Returns how many messages were new.
    ///
    /// The rows are inserted while the previous page may still be committing (on another
    /// connection); everything else waits until it has committed, so pages commit in order
    /// and a failed page fails every page after it. Messages the previous page also carries
    /// are left to it: the ledger would ignore them once it commits, and inserting them here
    /// first would make the two transactions wait on each other.
    #[allow(clippy::too_many_arguments)]
    async fn commit_page(
        &self,
        config: &MailboxConfig,
        lease: RunLease,
        poll_id: i64,
        page: Page,
        chain: PageChain,
        stats: &Mutex<RoundStats>,
        graph_requests: i32,
    ) -> Result<u64, RoundError> {
        let PageChain {
            mut previous,
            began,
            committed,
        } = chain;
        if let Some(previous) = &mut previous {
            // A page takes a connection only once the page before it holds one. A page that
            // waits for its predecessor's commit while holding a connection is then never
            // what keeps that predecessor from getting one, however small the pool.
            (&mut previous.began)
                .await
                .map_err(|_| RoundError::PreviousPageFailed)?;
        }
        let mut tx = self.pool.begin().await?;
        let _ = began.send(());
        match self
            .record_page_in(
                &mut tx,
                config,
                lease,
                poll_id,
                page,
                previous,
                stats,
                graph_requests,
            )
            .await
        {
            Ok((counted, new)) => {
                tx.commit().await?;
                // Counted only once committed: a failed page leaves the stats as they were.
                *stats.lock().unwrap_or_else(PoisonError::into_inner) = counted;
                let _ = committed.send(());
                Ok(new)
            }
            Err(error) => {
                // At once rather than when the connection is next used: the next page may be
                // waiting in Postgres for a row this transaction holds.
                if let Err(rollback) = tx.rollback().await {
                    tracing::debug!(%rollback, "cannot roll back a failed page");
                }
                Err(error)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn record_page_in(
        &self,
        tx: &mut PgConnection,
        config: &MailboxConfig,
        lease: RunLease,
        poll_id: i64,
        page: Page,
        previous: Option<Predecessor>,
        stats: &Mutex<RoundStats>,
        graph_requests: i32,
    ) -> Result<(RoundStats, u64), RoundError> {
        let state_for_new = if config.has_per_message_work() {
            DeliveryState::Pending
        } else {
            DeliveryState::None
        };
        let items = i32::try_from(page.messages.len()).unwrap_or(i32::MAX);
        let resynced = page.resynced;
        let link = page.link;
        let mut items_to_record = page.messages;
        if let Some(previous) = &previous {
            // Removals stay: one of a message the previous page recorded waits for that row.
            items_to_record.retain(|m| m.removed.is_some() || !previous.ids.contains(&m.id));
        }
        let (messages, removals) = split_page(items_to_record);
        let watermark = messages.iter().filter_map(|m| m.received_at).max();
        let recorded = ledger::record_page(
            &mut *tx,
            config.source.uid,
            &messages,
            &removals,
            state_for_new,
        )
        .await?;
        drop(messages);
        if let Some(previous) = previous {
            previous
                .committed
                .await
                .map_err(|_| RoundError::PreviousPageFailed)?;
        }
        let mut counted = *stats.lock().unwrap_or_else(PoisonError::into_inner);
        if resynced && !counted.resynced {
            counted.resynced = true;
            cursor::start_resync(&mut *tx, lease).await?;
            tracing::info!(namespace = %config.source.namespace, name = %config.source.name, "delta cursor expired: resyncing");
        }
        if config.has_per_message_work() {
            let tasks: Vec<NewTask> = recorded
                .new_ids
                .iter()
                .map(|id| deliver_task(config, id))
                .collect::<Result<_, _>>()
                .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            queue::enqueue_many_on(&mut *tx, &tasks).await?;
        }
        match &link {
            PageLink::Next(next) => {
                cursor::save_progress(
                    &mut *tx,
                    lease,
                    Some(next),
                    watermark,
                    self.settings.run_lease,
                )
                .await?
            }
            PageLink::Delta(delta) => {
                cursor::finish_round(&mut *tx, lease, Some(delta), watermark).await?
            }
            PageLink::End => cursor::finish_round(&mut *tx, lease, None, watermark).await?,
        }
        counted.graph_requests = graph_requests;
        counted.pages += 1;
        counted.seen += items;
        counted.new += i32::try_from(recorded.new_ids.len()).unwrap_or(i32::MAX);
        record_progress(&mut *tx, poll_id, counted).await?;
        Ok((counted, recorded.new_ids.len() as u64))
    }

    async fn record_failed_poll(
        &self,
        uid: Uuid,
        task_id: i64,
        reason: &str,
        message: &str,
    ) -> Result<(), sqlx::Error> {
        let started = db_now(&self.pool).await?;
        let id = start_poll(&self.pool, uid, task_id).await?;
        finish_poll(&self.pool, id, Err((reason, message.to_owned()))).await?;
        serve_requests(&self.pool, uid, task_id, id, started).await?;
        self.metrics.poll_finished(Some(reason));
        Ok(())
    }

    /// Tells the leader this MailboxPoll's status changed. Best effort: the leader also
    /// refreshes statuses periodically.
    async fn announce(&self, config: &MailboxConfig) {
        let key = format!("{}/{}", config.source.namespace, config.source.name);
        if let Err(error) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(MAILBOX_CHANGED_CHANNEL)
            .bind(&key)
            .execute(&self.pool)
            .await
        {
            tracing::debug!(%error, "cannot announce a finished poll");
        }
    }
}

fn reason_of(error: &RoundError) -> &'static str {
    match error {
        RoundError::Graph(graph) => graph.reason(),
        RoundError::ShuttingDown => "ShuttingDown",
        RoundError::Cursor(_)
        | RoundError::Db(_)
        | RoundError::Queue(_)
        | RoundError::TaskLeaseLost
        | RoundError::PreviousPageFailed => "Transient",
    }
}

fn deliver_task(config: &MailboxConfig, message_id: &str) -> Result<NewTask, serde_json::Error> {
    let payload = serde_json::to_value(DeliverTask {
        mailbox_uid: config.source.uid,
        message_id: message_id.to_owned(),
    })?;
    Ok(NewTask::new(DELIVER, payload)
        .owner(config.source.uid)
        .max_attempts(config.max_attempts))
}

/// The ledger's view of a page: messages, and the removals Graph reported. Takes the page's
/// items by value: bodies and raw objects move into the rows instead of being copied.
pub fn split_page(page: Vec<Message>) -> (Vec<LedgerMessage>, Vec<Removal>) {
    let mut messages = Vec::with_capacity(page.len());
    let mut removals = Vec::new();
    for item in page {
        match &item.removed {
            Some(reason) => removals.push(Removal {
                message_id: item.id,
                reason: reason.as_str().to_owned(),
            }),
            None => messages.push(to_ledger(item)),
        }
    }
    (messages, removals)
}

fn recipients(list: &[EmailAddress]) -> serde_json::Value {
    serde_json::Value::Array(
        list.iter()
            .map(|a| json!({ "name": a.name, "address": a.address }))
            .collect(),
    )
}

/// A Graph message as a ledger row.
pub fn to_ledger(message: Message) -> LedgerMessage {
    let (from_address, from_name) = address_parts(message.from);
    let (sender_address, sender_name) = address_parts(message.sender);
    let (body_content_type, body, body_truncated) = match message.body {
        Some(body) => (Some(body.content_type), Some(body.content), body.truncated),
        None => (None, None, false),
    };
    LedgerMessage {
        message_id: message.id,
        internet_message_id: message.internet_message_id,
        subject: message.subject,
        from_address,
        from_name,
        sender_address,
        sender_name,
        to_recipients: recipients(&message.to_recipients),
        cc_recipients: recipients(&message.cc_recipients),
        reply_to: recipients(&message.reply_to),
        received_at: message.received_date_time,
        sent_at: message.sent_date_time,
        is_read: message.is_read,
        has_attachments: message.has_attachments,
        importance: message.importance,
        conversation_id: message.conversation_id,
        parent_folder_id: message.parent_folder_id,
        body_preview: message.body_preview,
        body_content_type,
        body,
        body_truncated,
        raw: message.raw,
    }
}

fn address_parts(address: Option<EmailAddress>) -> (Option<String>, Option<String>) {
    match address {
        Some(EmailAddress { name, address }) => (address, name),
        None => (None, None),
    }
}

async fn db_now(pool: &PgPool) -> Result<DateTime<Utc>, sqlx::Error> {
    sqlx::query_scalar("SELECT now()").fetch_one(pool).await
}

async fn reload(pool: &PgPool, uid: Uuid) -> Result<Cursor, sqlx::Error> {
    sqlx::query_as(
        "SELECT delta_link, round_next_link, watermark, throttled_until FROM mailbox_cursors WHERE mailbox_uid = $1",
    )
    .bind(uid)
    .fetch_one(pool)
    .await
}

async fn start_poll(pool: &PgPool, uid: Uuid, task_id: i64) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let id =
        sqlx::query_scalar("INSERT INTO polls (mailbox_uid, task_id) VALUES ($1, $2) RETURNING id")
            .bind(uid)
            .bind(task_id)
            .fetch_one(&mut *tx)
            .await?;
    sqlx::query("UPDATE mailbox_cursors SET last_poll_started_at = now() WHERE mailbox_uid = $1")
        .bind(uid)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(id)
}

async fn record_progress_on(
    pool: &PgPool,
    poll_id: i64,
    stats: RoundStats,
) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    record_progress(&mut conn, poll_id, stats).await
}

async fn record_progress(
    conn: &mut PgConnection,
    poll_id: i64,
    stats: RoundStats,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE polls SET pages = $2, graph_requests = $6, messages_seen = $3, messages_new = $4, resynced = $5
         WHERE id = $1",
    )
    .bind(poll_id)
    .bind(stats.pages)
    .bind(stats.seen)
    .bind(stats.new)
    .bind(stats.resynced)
    .bind(stats.graph_requests)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn finish_poll(
    pool: &PgPool,
    poll_id: i64,
    outcome: Result<RoundStats, (&str, String)>,
) -> Result<(), sqlx::Error> {
    let (state, reason, message) = match &outcome {
        Ok(_) => ("succeeded", None, None),
        Err((reason, message)) => ("failed", Some(*reason), Some(message.as_str())),
    };
    let mut tx = pool.begin().await?;
    let uid: Uuid = sqlx::query_scalar(
        "UPDATE polls SET finished_at = now(), outcome = $2, error_reason = $3, error_message = $4
         WHERE id = $1 RETURNING mailbox_uid",
    )
    .bind(poll_id)
    .bind(state)
    .bind(reason)
    .bind(message)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("UPDATE mailbox_cursors SET last_poll_finished_at = now() WHERE mailbox_uid = $1")
        .bind(uid)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Marks forced-poll requests made before `round_started` as served by this task, and names
/// the newest of them on the round's `polls` row. Returns whether requests made since are
/// still waiting (they need a round of their own).
async fn serve_requests(
    pool: &PgPool,
    uid: Uuid,
    task_id: i64,
    poll_id: i64,
    round_started: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    sqlx::query(
        "WITH served AS (
             UPDATE poll_requests SET served_at = now(), task_id = $2
             WHERE mailbox_uid = $1 AND served_at IS NULL AND requested_at <= $3
             RETURNING value, requested_at
         )
         UPDATE polls
            SET poll_request = (SELECT value FROM served ORDER BY requested_at DESC LIMIT 1)
          WHERE id = $4 AND EXISTS (SELECT 1 FROM served)",
    )
    .bind(uid)
    .bind(task_id)
    .bind(round_started)
    .bind(poll_id)
    .execute(pool)
    .await?;
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM poll_requests WHERE mailbox_uid = $1 AND served_at IS NULL)",
    )
    .bind(uid)
    .fetch_one(pool)
    .await
}
