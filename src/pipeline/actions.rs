//! The `actions` task: after-delivery actions (mark read, move) of one mailbox, batched.
//!
//! Post-actions cost one Graph request per message, so they are sent through `$batch`. They
//! run as their own task (one live per MailboxPoll, its task lease making the run exclusive)
//! so that a throttled mailbox never holds up the recording of new mail, and without the
//! cursor's run lease, so that a backlog of them never holds up the mailbox's polls: Graph's
//! per-mailbox limit is kept by the shared slots every request holds
//! ([`crate::mailbox_slots`]), and a `Retry-After` of the mailbox is waited out first.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::time::Instant;
use uuid::Uuid;

use super::run_lease;
use super::tasks::ActionsTask;
use crate::directory::{Directory, MailboxConfig};
use crate::graph::{GraphClient, GraphError, MailboxClient, PostAction};
use crate::identity;
use crate::ledger;
use crate::queue::{self, ClaimedTask, Handler, HandlerError, NewTask, QueueError, TaskContext};
use crate::reason::Reason;
use crate::telemetry::metrics::SharedMetrics;

/// Messages handled per `$batch` round trip (Graph takes 20 requests per batch; a message
/// may need two).
const MESSAGES_PER_BATCH: i64 = 10;

/// Failed attempts at a message's after-actions before it is parked (skipped, counted as
/// failed, shown on the status), so one message whose action always fails cannot stay first
/// in line and hold up the mailbox's other actions.
pub const MAX_ACTION_FAILURES: i32 = 5;

pub struct ActionsHandler<D> {
    pub pool: PgPool,
    pub directory: Arc<D>,
    pub graph: GraphClient,
    pub metrics: SharedMetrics,
    /// Longest one run keeps the mailbox before giving other work a turn.
    pub run_budget: Duration,
}

impl<D: Directory> Handler for ActionsHandler<D> {
    async fn handle(&self, task: &ClaimedTask, ctx: &TaskContext) -> Result<(), HandlerError> {
        let job: ActionsTask = task.args()?;
        let Some(config) = super::lookup(self.directory.as_ref(), job.mailbox_uid).await? else {
            return Ok(());
        };
        run_lease::check_throttle(&self.pool, &self.graph, &config.source.mailbox).await?;
        self.run(task, ctx, &config).await
    }
}

impl<D: Directory> ActionsHandler<D> {
    async fn run(
        &self,
        task: &ClaimedTask,
        ctx: &TaskContext,
        config: &MailboxConfig,
    ) -> Result<(), HandlerError> {
        let uid = config.ledger_id;
        let mailbox = self
            .graph
            .mailbox(config.credentials.clone(), config.source.mailbox.clone());
        let started = Instant::now();
        loop {
            let due = ledger::actions_due(&self.pool, uid, MESSAGES_PER_BATCH)
                .await
                .map_err(HandlerError::retryable)?;
            if due.is_empty() {
                return Ok(());
            }
            if !config.has_after_actions() {
                // The spec dropped its after-actions since: nothing is left to do.
                self.mark_done(uid, &due).await?;
                continue;
            }
            self.batch(task, config, &mailbox, &due).await?;
            if ctx.is_shutting_down() || ctx.is_lease_lost() || started.elapsed() >= self.run_budget
            {
                // More is due: run again at once, without counting an attempt, after others
                // had their turn at the mailbox.
                return Err(HandlerError::snooze(Duration::ZERO));
            }
        }
    }

    async fn batch(
        &self,
        task: &ClaimedTask,
        config: &MailboxConfig,
        mailbox: &MailboxClient,
        due: &[String],
    ) -> Result<(), HandlerError> {
        let (actions, owners) = plan(config, due);
        let results = match mailbox.post_actions(&actions).await {
            Ok(results) => results,
            Err(error) => return self.failure(task, config, due, error).await,
        };
        let mut failed: Vec<Option<GraphError>> = vec![None; due.len()];
        let mut move_not_found = None;
        for ((&owner, action), result) in owners.iter().zip(&actions).zip(results) {
            match result {
                Ok(()) => {}
                // The message, or the move's destination, is not there (see below).
                Err(GraphError::ItemNotFound { .. })
                    if matches!(action, PostAction::Move { .. }) =>
                {
                    move_not_found.get_or_insert(owner);
                }
                // Already read, or gone after a move: the effect is there.
                Err(GraphError::ItemNotFound { .. }) => {}
                Err(error) => failed[owner] = Some(error),
            }
        }
        if let Some(owner) = move_not_found {
            match mailbox.message_exists(&due[owner]).await {
                // The message is there but could not be moved: the destination is missing.
                Ok(true) => return self.destination_missing(config).await,
                Ok(false) => {}
                Err(error) => failed[owner] = Some(error),
            }
        }
        let (done, remaining): (Vec<String>, Vec<String>) = {
            let (done, remaining): (Vec<_>, Vec<_>) =
                due.iter().zip(&failed).partition(|(_, f)| f.is_none());
            let ids =
                |pairs: Vec<(&String, _)>| pairs.into_iter().map(|(id, _)| id.clone()).collect();
            (ids(done), ids(remaining))
        };
        self.mark_done(config.ledger_id, &done).await?;
        let Some(error) = failed.iter().flatten().next().cloned() else {
            return Ok(());
        };
        self.failure(task, config, &remaining, error).await
    }

    /// Marks messages delivered: every configured step is done.
    async fn mark_done(&self, uid: Uuid, ids: &[String]) -> Result<(), HandlerError> {
        if ids.is_empty() {
            return Ok(());
        }
        let done = ledger::mark_actions_done(&self.pool, uid, ids)
            .await
            .map_err(HandlerError::retryable)?;
        self.metrics.messages_delivered.inc_by(done);
        Ok(())
    }

    /// The move destination does not exist: a configuration error that every due message
    /// would meet, so all of them are parked with the reason at once (the status shows it),
    /// rather than each failing its way to the limit. The run ends; fixing the spec and
    /// unparking ([`ledger::unpark_actions`]) brings them back.
    async fn destination_missing(&self, config: &MailboxConfig) -> Result<(), HandlerError> {
        let error = format!(
            "{}: the move destination folder {:?} (spec.afterDelivery.moveToFolder) does not exist in mailbox {}",
            Reason::MoveDestinationNotFound,
            config.move_to_folder.as_deref().unwrap_or_default(),
            config.source.mailbox,
        );
        tracing::warn!(namespace = %config.source.namespace, name = %config.source.name, %error, "after-delivery actions parked");
        let parked = ledger::park_all_due_actions(&self.pool, config.ledger_id, &error)
            .await
            .map_err(HandlerError::retryable)?;
        self.metrics.messages_failed.inc_by(parked);
        Ok(())
    }

    /// Graph refused the actions for a reason every due message would meet and only a person
    /// can fix (an app without Mail.ReadWrite: 403 `AccessDenied`, a `$batch` refused by
    /// policy, credentials that stopped working): all due messages are parked at once with
    /// Graph's reason, which the status and an Event show, instead of each failing its way to
    /// the limit with a request per try. A spec change or a forced poll brings them back.
    async fn refused(
        &self,
        config: &MailboxConfig,
        reason: Reason,
        error: &GraphError,
    ) -> Result<(), HandlerError> {
        let text = format!("{reason}: after-delivery actions refused by Microsoft Graph: {error}");
        let parked = ledger::park_all_due_actions(&self.pool, config.ledger_id, &text)
            .await
            .map_err(HandlerError::retryable)?;
        self.metrics.messages_failed.inc_by(parked);
        Ok(())
    }

    /// After a Graph error for `ids`: a throttled mailbox snoozes the task; any other error
    /// counts one failure for each message, parking those that reached the limit (all of
    /// them on the task's last attempt, so a dead task leaves nothing for the sweep to bring
    /// back). When every failing message is parked the run goes on with the others.
    async fn failure(
        &self,
        task: &ClaimedTask,
        config: &MailboxConfig,
        ids: &[String],
        error: GraphError,
    ) -> Result<(), HandlerError> {
        match &error {
            GraphError::Throttled { retry_after, .. } => {
                return Err(run_lease::share_throttle(
                    &self.pool,
                    &config.source.mailbox,
                    *retry_after,
                )
                .await);
            }
            // Others had the mailbox's slots all along: not the messages' fault.
            GraphError::MailboxBusy { .. } => return Err(run_lease::busy(&error)),
            _ => {}
        }
        tracing::warn!(namespace = %config.source.namespace, name = %config.source.name, %error, "after-delivery actions failed");
        let reason = error.reason();
        // About the app or the mailbox, not the message: every other message meets it too.
        if matches!(
            reason,
            Reason::AccessDenied | Reason::AuthenticationFailed | Reason::MailboxNotFound
        ) {
            return self.refused(config, reason, &error).await;
        }
        let park_after = if task.attempt() >= task.max_attempts {
            1
        } else {
            MAX_ACTION_FAILURES
        };
        let text = format!("{reason}: after-delivery actions failed: {error}");
        let parked =
            ledger::record_action_failures(&self.pool, config.ledger_id, ids, &text, park_after)
                .await
                .map_err(HandlerError::retryable)?;
        self.metrics.messages_failed.inc_by(parked.len() as u64);
        if parked.len() == ids.len() {
            return Ok(());
        }
        Err(HandlerError::retryable(text))
    }
}

/// The Graph actions for `due` messages, and for each the index of its message.
fn plan(config: &MailboxConfig, due: &[String]) -> (Vec<PostAction>, Vec<usize>) {
    let mut actions = Vec::with_capacity(due.len() * 2);
    let mut owners = Vec::with_capacity(due.len() * 2);
    for (index, id) in due.iter().enumerate() {
        if config.mark_as_read {
            actions.push(PostAction::MarkRead {
                message_id: id.clone(),
            });
            owners.push(index);
        }
        if let Some(destination) = &config.move_to_folder {
            actions.push(PostAction::Move {
                message_id: id.clone(),
                destination: destination.clone(),
            });
            owners.push(index);
        }
    }
    (actions, owners)
}

/// Queues an actions run for every mailbox that has after-actions due and no live actions task.
/// Returns how many runs were queued.
///
/// A deliver task marks its message due and queues the mailbox's run in one transaction; a
/// live run is asked to run once more instead ([`queue::enqueue_or_rerun_on`]), so a message
/// made due while a run finishes is not left behind. This is the safety net for whatever
/// still is (a run that went dead, say): the leader's periodic sweep calls it.
pub async fn requeue_stranded(pool: &PgPool) -> Result<u64, QueueError> {
    let ledgers = ledger::owners_with_actions_due(pool)
        .await
        .map_err(QueueError::db("finding mailboxes with after-actions due"))?;
    let objects = identity::objects_for(pool, &ledgers)
        .await
        .map_err(QueueError::db("finding the MailboxPolls of ledgers"))?;
    let tasks: Vec<NewTask> = objects
        .into_iter()
        .map(|mailbox_uid| NewTask::of(&ActionsTask { mailbox_uid }))
        .collect::<Result<_, _>>()?;
    let queued = queue::enqueue_many(pool, &tasks).await?;
    Ok(queued.iter().filter(|task| task.fresh).count() as u64)
}
