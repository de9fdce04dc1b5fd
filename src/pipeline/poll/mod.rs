//! The `poll` task: one delta round over a mailbox folder, page by page.
//!
//! Per page, ONE transaction records the messages in the ledger, enqueues a deliver task for
//! each message recorded for the first time, and advances the cursor (the round's nextLink,
//! or the deltaLink at the end). Pages commit in order; while one commits, the next already
//! inserts its rows on a second connection ([`page`]). A crash replays at most the pages whose
//! transactions had not committed (two), and the ledger absorbs the replay; a crash inside a
//! page's transaction changes nothing.

mod page;
mod rows;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::run_lease;
use super::tasks::PollTask;
use crate::cursor::{self, Cursor, CursorError, Fence, PollMoment, RoundStart, RunLease};
use crate::directory::{ConfigError, Directory, MailboxConfig};
use crate::graph::{DeltaOptions, DeltaStart, GraphClient, GraphError, MailboxClient, Page};
use crate::poll_log::{self, Progress};
use crate::queue::{self, ClaimedTask, Handler, HandlerError, TaskContext};
use crate::reason::Reason;
use crate::telemetry::metrics::SharedMetrics;
use page::{PageChain, PageContext};

pub use rows::{split_page, to_ledger};

/// Postgres channel on which a finished poll names its MailboxPoll (`namespace/name`), so the
/// leader refreshes that resource's status at once.
pub const MAILBOX_CHANGED_CHANNEL: &str = "mailpoll_mailbox_changed";

/// Tunables of polling.
#[derive(Debug, Clone)]
pub struct PollSettings {
    /// Items per delta page (`Prefer: odata.maxpagesize`).
    pub page_size: u32,
    /// The mailbox run lease; extended with every committed page.
    pub run_lease: Duration,
    /// Most rounds one task runs for forced polls that arrived while it was running.
    pub max_rounds: u32,
}

impl Default for PollSettings {
    fn default() -> Self {
        Self {
            page_size: 100,
            run_lease: Duration::from_secs(120),
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

impl RoundError {
    fn reason(&self) -> Reason {
        match self {
            RoundError::Graph(graph) => graph.reason(),
            RoundError::ShuttingDown => Reason::ShuttingDown,
            RoundError::Cursor(_)
            | RoundError::Db(_)
            | RoundError::Queue(_)
            | RoundError::TaskLeaseLost
            | RoundError::PreviousPageFailed => Reason::Transient,
        }
    }
}

/// Pages of a round whose transactions may be open at once.
const PAGES_IN_FLIGHT: usize = 2;

/// The mailbox one round reads, and where its rows go.
struct RoundInput<'a> {
    ctx: &'a TaskContext,
    config: &'a MailboxConfig,
    mailbox: &'a MailboxClient,
    lease: RunLease,
    poll_id: i64,
}

impl<D: Directory> Handler for PollHandler<D> {
    async fn handle(&self, task: &ClaimedTask, ctx: &TaskContext) -> Result<(), HandlerError> {
        let job: PollTask = task.args()?;
        let config = match self.directory.lookup(job.mailbox_uid).await {
            Ok(Some(config)) => config,
            // Deleted: nothing to poll.
            Ok(None) => return Ok(()),
            Err(error) if error.is_transient() => return Err(HandlerError::retryable(error)),
            Err(error) => {
                // A configuration problem (missing Secret, say): the poll ran and failed; the
                // condition tells the user, and the next scheduled poll tries again.
                self.record_failed_poll(job.mailbox_uid, task.id, error.reason(), &error)
                    .await
                    .map_err(HandlerError::retryable)?;
                return Ok(());
            }
        };
        let (lease, cursor) = run_lease::take(
            &self.pool,
            &self.graph,
            &config.source,
            self.settings.run_lease,
            Duration::from_secs(5),
        )
        .await?;
        let keep_alive =
            run_lease::KeepAlive::start(self.pool.clone(), lease, self.settings.run_lease);
        let result = keep_alive
            .guard(self.run(task, ctx, &config, lease, cursor))
            .await;
        run_lease::give_back(&self.pool, lease).await;
        self.announce(&config).await;
        result
    }
}

impl<D: Directory> PollHandler<D> {
    /// Runs a round, and one more for each forced poll that arrived during the last one (up
    /// to `max_rounds`).
    async fn run(
        &self,
        task: &ClaimedTask,
        ctx: &TaskContext,
        config: &MailboxConfig,
        lease: RunLease,
        mut cursor: Cursor,
    ) -> Result<(), HandlerError> {
        let uid = config.source.uid;
        let mailbox = self
            .graph
            .mailbox(config.credentials.clone(), config.source.mailbox.clone());
        for round in 1..=self.settings.max_rounds {
            let started = crate::db::now(&self.pool)
                .await
                .map_err(HandlerError::retryable)?;
            let poll_id = start_poll(&self.pool, uid, task.id)
                .await
                .map_err(HandlerError::retryable)?;
            let input = RoundInput {
                ctx,
                config,
                mailbox: &mailbox,
                lease,
                poll_id,
            };
            let round_started = std::time::Instant::now();
            let outcome = self.round(&input, &cursor).await;
            self.metrics
                .poll_duration
                .observe(round_started.elapsed().as_secs_f64());
            match outcome {
                Ok(_) => {
                    finish_poll(&self.pool, poll_id, None)
                        .await
                        .map_err(HandlerError::retryable)?;
                    self.metrics.poll_finished(None);
                    let waiting =
                        poll_log::serve_requests(&self.pool, uid, task.id, poll_id, started)
                            .await
                            .map_err(HandlerError::retryable)?;
                    if !waiting || round == self.settings.max_rounds {
                        return Ok(());
                    }
                    // A forced poll arrived during this round: it gets a round of its own.
                    cursor = cursor::load(&self.pool, uid)
                        .await
                        .map_err(HandlerError::retryable)?;
                }
                Err(error) => {
                    let reason = error.reason();
                    finish_poll(&self.pool, poll_id, Some((reason, &error.to_string())))
                        .await
                        .map_err(HandlerError::retryable)?;
                    self.metrics.poll_finished(Some(reason.as_str()));
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
                Err(run_lease::share_throttle(&self.pool, &source.mailbox, retry_after).await)
            }
            RoundError::Graph(ref busy @ GraphError::MailboxBusy { .. }) => {
                Err(run_lease::busy(busy))
            }
            RoundError::Graph(ref graph) if graph.is_transient() => {
                Err(HandlerError::retryable(error))
            }
            RoundError::Graph(GraphError::ResyncRequired { .. }) => {
                // The round's own resync was refused too: drop the cursor so the next try
                // starts from a fresh query.
                let query = self.query(config).fingerprint();
                let fence = Fence {
                    lease,
                    source,
                    query: &query,
                };
                let mut conn = self.pool.acquire().await.map_err(HandlerError::retryable)?;
                cursor::start_round(&mut conn, fence, RoundStart::Resync)
                    .await
                    .map_err(HandlerError::retryable)?;
                Err(HandlerError::retryable(error))
            }
            RoundError::Graph(_) => {
                // Credentials, access, a missing mailbox or a bad query: retrying soon cannot
                // help. The poll is recorded as failed with its reason (the condition), and
                // the next scheduled poll tries again.
                poll_log::serve_requests(&self.pool, source.uid, task.id, poll_id, started)
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

    /// What a round asks Graph for, starting from scratch: the whole folder, unfiltered (a
    /// received-time filter caps the round at 5,000 messages and stays in its token).
    fn query(&self, config: &MailboxConfig) -> DeltaOptions {
        let mut options = DeltaOptions::new(
            config.source.folder.clone(),
            DeltaStart::Initial {
                received_since: None,
            },
        );
        options.page_size = self.settings.page_size;
        options.include_body = config.include_body;
        options.include_categories = config
            .filter
            .as_ref()
            .is_some_and(|filter| filter.reads_categories());
        options
    }

    /// Where a round starts: the stored link when it belongs to this round's query, else a
    /// fresh query (`Some` says why). Links of another query (the folder or `$select` changed)
    /// are dropped: a resync, which the ledger makes safe.
    fn delta_options(
        &self,
        config: &MailboxConfig,
        cursor: &Cursor,
    ) -> (DeltaOptions, Option<RoundStart>) {
        let mut options = self.query(config);
        let same_query = cursor.query_fingerprint.as_deref() == Some(&*options.fingerprint());
        let link = cursor
            .round_next_link
            .as_ref()
            .or(cursor.delta_link.as_ref());
        let fresh = match link {
            Some(link) if same_query => {
                options.start = DeltaStart::Link(link.clone());
                None
            }
            Some(_) => Some(RoundStart::Resync),
            None => Some(RoundStart::First),
        };
        (options, fresh)
    }

    /// One delta round: pages are read ahead while earlier ones commit, so Graph reading never
    /// waits for Postgres and two pages record their rows on two connections at once.
    async fn round(&self, input: &RoundInput<'_>, cursor: &Cursor) -> Result<Progress, RoundError> {
        let (options, fresh) = self.delta_options(input.config, cursor);
        let query = options.fingerprint();
        let mut round = input.mailbox.delta_round(options)?;
        let requests_before = input.mailbox.requests_sent();
        let requests_so_far =
            || i32::try_from(input.mailbox.requests_sent() - requests_before).unwrap_or(i32::MAX);
        let stats = Mutex::new(Progress::default());
        let (page_tx, pages) = mpsc::channel::<Page>(1);
        let read = async move {
            while let Some(page) = round.next_page().await? {
                if page_tx.send(page).await.is_err() {
                    break; // recording stopped on an error, which it reports
                }
            }
            Ok::<(), RoundError>(())
        };
        let page_context = PageContext {
            pool: &self.pool,
            config: input.config,
            lease: input.lease,
            query: &query,
            fresh,
            poll_id: input.poll_id,
            run_lease: self.settings.run_lease,
            stats: &stats,
        };
        {
            let record = self.record_pages(input.ctx, &page_context, pages, &requests_so_far);
            // Recording decides: once it has stopped, a Graph request still running is dropped.
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
        let mut conn = self.pool.acquire().await?;
        poll_log::record_progress(&mut conn, input.poll_id, stats).await?;
        Ok(stats)
    }

    /// Commits the pages the reader hands over, in order, up to [`PAGES_IN_FLIGHT`] at once.
    ///
    /// A page's transaction is never dropped half-way: after an error, the pages in flight
    /// still run to their end (they fail at once, their predecessor having failed) so each
    /// rolls back on its own connection before that returns to the pool.
    async fn record_pages(
        &self,
        ctx: &TaskContext,
        page_context: &PageContext<'_>,
        mut pages: mpsc::Receiver<Page>,
        requests_so_far: &impl Fn() -> i32,
    ) -> Result<(), RoundError> {
        let mut in_flight = FuturesOrdered::new();
        let mut chain = PageChain::default();
        let mut reading = true;
        let mut outcome = Ok(());
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
                    let link = chain.next_link(&page);
                    in_flight.push_back(page_context.commit(page, link, requests_so_far()));
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
    }

    async fn record_failed_poll(
        &self,
        uid: Uuid,
        task_id: i64,
        reason: Reason,
        error: &ConfigError,
    ) -> Result<(), sqlx::Error> {
        let started = crate::db::now(&self.pool).await?;
        let id = start_poll(&self.pool, uid, task_id).await?;
        finish_poll(&self.pool, id, Some((reason, &error.to_string()))).await?;
        poll_log::serve_requests(&self.pool, uid, task_id, id, started).await?;
        self.metrics.poll_finished(Some(reason.as_str()));
        Ok(())
    }

    /// Tells the leader this MailboxPoll's status changed. Best effort: the leader also
    /// refreshes statuses periodically.
    async fn announce(&self, config: &MailboxConfig) {
        let key = format!("{}/{}", config.source.namespace, config.source.name);
        if let Err(error) = crate::db::notify(&self.pool, MAILBOX_CHANGED_CHANNEL, &key).await {
            tracing::debug!(%error, "cannot announce a finished poll");
        }
    }
}

/// Starts a poll's row and notes it on the cursor, together.
async fn start_poll(pool: &PgPool, uid: Uuid, task_id: i64) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let id = poll_log::start(&mut tx, uid, task_id).await?;
    cursor::note_poll(&mut tx, uid, PollMoment::Started).await?;
    tx.commit().await?;
    Ok(id)
}

/// Ends a poll's row and notes it on the cursor, together.
async fn finish_poll(
    pool: &PgPool,
    poll_id: i64,
    failure: Option<(Reason, &str)>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let uid = poll_log::finish(&mut tx, poll_id, failure).await?;
    cursor::note_poll(&mut tx, uid, PollMoment::Finished).await?;
    tx.commit().await?;
    Ok(())
}
