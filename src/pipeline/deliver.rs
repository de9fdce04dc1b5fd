//! The `deliver` task: one message to the webhook, then its after-actions queued.
//!
//! Every step is recorded in the ledger before the next starts, so a retry after a crash
//! resumes where the last run stopped and never posts a delivered message again.

use std::sync::Arc;

use sqlx::PgPool;
use uuid::Uuid;

use super::delivered::DeliveredMarks;
use super::selection;
use super::tasks::{ActionsTask, DeliverTask};
use crate::delivery::egress::GuardedClient;
use crate::delivery::signing::message_key;
use crate::delivery::webhook::{self, MessageView, Payload, Source, WebhookError};
use crate::directory::{Directory, MailboxConfig};
use crate::ledger::{self, DeliveredMark, StoredMessage};
use crate::queue::{self, ClaimedTask, Handler, HandlerError, NewTask, TaskContext};
use crate::telemetry::metrics::SharedMetrics;

pub struct DeliverHandler<D> {
    pool: PgPool,
    directory: Arc<D>,
    webhook: GuardedClient,
    metrics: SharedMetrics,
    marks: DeliveredMarks,
}

impl<D> DeliverHandler<D> {
    /// Must be called within a Tokio runtime: it starts the ledger writer that marks deliveries.
    pub fn new(
        pool: PgPool,
        directory: Arc<D>,
        webhook: GuardedClient,
        metrics: SharedMetrics,
    ) -> Self {
        let marks = DeliveredMarks::start(pool.clone());
        Self {
            pool,
            directory,
            webhook,
            metrics,
            marks,
        }
    }
}

impl<D: Directory> Handler for DeliverHandler<D> {
    async fn handle(&self, task: &ClaimedTask, _ctx: &TaskContext) -> Result<(), HandlerError> {
        let job: DeliverTask = task.args()?;
        let Some(config) = super::lookup(self.directory.as_ref(), job.mailbox_uid).await? else {
            // The MailboxPoll was deleted: nothing to deliver to any more.
            return Ok(());
        };
        let mut conn = self.pool.acquire().await.map_err(HandlerError::retryable)?;
        let ledger_id = job.ledger();
        // A filter may read categories, which only the full row carries.
        let stored = if config.filter.is_some() {
            ledger::get(&mut conn, ledger_id, &job.message_id).await
        } else {
            ledger::get_for_delivery(&mut conn, ledger_id, &job.message_id).await
        };
        let Some(stored) = stored.map_err(HandlerError::retryable)? else {
            return Err(HandlerError::permanent(format!(
                "message {} is not in the ledger",
                job.message_id
            )));
        };
        if stored.delivery_state == "delivered" {
            return Ok(());
        }
        if stored.content_purged_at.is_some() {
            // A failed delivery retried after its content's retention period: posting an
            // empty message would look like a delivery; say what happened instead.
            return Err(HandlerError::permanent(format!(
                "message {} outlived its content retention period; its content was purged",
                job.message_id
            )));
        }
        if selection::filter_out(&mut conn, &config, ledger_id, &stored).await? {
            return Ok(());
        }
        drop(conn);
        let posted = match &config.webhook {
            Some(endpoint) if stored.webhook_delivered_at.is_none() => {
                self.post(task, &config, endpoint, ledger_id, &stored)
                    .await?;
                true
            }
            _ => false,
        };
        if config.has_after_actions() {
            // The webhook step is recorded with the queued after-actions, atomically.
            let mut tx = self.pool.begin().await.map_err(HandlerError::retryable)?;
            if posted {
                ledger::mark_webhook_delivered(&mut tx, ledger_id, &job.message_id)
                    .await
                    .map_err(HandlerError::retryable)?;
            }
            ledger::mark_actions_due(&mut tx, ledger_id, &job.message_id)
                .await
                .map_err(HandlerError::retryable)?;
            let actions = NewTask::of(&ActionsTask {
                mailbox_uid: job.mailbox_uid,
            })
            .map_err(HandlerError::permanent)?
            .max_attempts(config.max_attempts);
            // A run already under way may have read the due list before this commits: it
            // is asked to run once more rather than leave this message without a run.
            queue::enqueue_or_rerun_on(&mut tx, &actions)
                .await
                .map_err(HandlerError::retryable)?;
            tx.commit().await.map_err(HandlerError::retryable)?;
        } else {
            // The hot path: the webhook step and the delivery are recorded together, in a
            // statement shared with the deliveries that finish at about the same time.
            let mark = DeliveredMark {
                mailbox_uid: ledger_id,
                message_id: job.message_id,
                webhook_posted: posted,
            };
            if self
                .marks
                .mark(mark)
                .await
                .map_err(HandlerError::retryable)?
            {
                self.metrics.messages_delivered.inc();
            }
        }
        Ok(())
    }
}

impl<D: Directory> DeliverHandler<D> {
    async fn post(
        &self,
        task: &ClaimedTask,
        config: &MailboxConfig,
        endpoint: &webhook::Endpoint,
        ledger_id: Uuid,
        stored: &StoredMessage,
    ) -> Result<(), HandlerError> {
        let source = &config.source;
        let key = message_key(ledger_id, &stored.message.message_id);
        let payload = Payload {
            event_type: webhook::EVENT_TYPE,
            key: &key,
            mailbox_poll: Source {
                namespace: &source.namespace,
                name: &source.name,
                uid: source.uid,
                mailbox: &source.mailbox,
                folder: &source.folder,
            },
            message: MessageView::new(&stored.message),
        };
        let body = serde_json::to_vec(&payload).map_err(HandlerError::permanent)?;
        let started = std::time::Instant::now();
        let sent = webhook::post_checked(
            &self.webhook,
            &source.namespace,
            endpoint,
            &key,
            task.attempt(),
            body,
        )
        .await;
        let class = webhook::outcome_class(&sent);
        let posted = !matches!(class, "forbidden" | "unsent");
        self.metrics
            .webhook_posted(class, posted.then(|| started.elapsed()));
        match sent {
            Ok(_) => Ok(()),
            Err(error) => {
                let last_attempt = task.attempt() >= task.max_attempts;
                let permanent = error.is_permanent();
                if permanent || last_attempt {
                    self.record_failure(ledger_id, &stored.message.message_id, &error)
                        .await;
                }
                if matches!(error, WebhookError::Forbidden(_)) {
                    // The leader reports the refused destination on the MailboxPoll now
                    // rather than at its next periodic look.
                    announce(&self.pool, config).await;
                }
                tracing::warn!(
                    namespace = %source.namespace,
                    name = %source.name,
                    message_key = %key,
                    attempt = task.attempt(),
                    %error,
                    "webhook delivery failed"
                );
                Err(if permanent {
                    HandlerError::permanent(error)
                } else {
                    HandlerError::retryable(error)
                })
            }
        }
    }

    /// Marks the ledger failed; best effort, since the task's own state already tells.
    async fn record_failure(&self, uid: Uuid, message_id: &str, error: &WebhookError) {
        let result = async {
            let mut conn = self.pool.acquire().await?;
            ledger::mark_failed(&mut conn, uid, message_id, &error.to_string()).await
        }
        .await;
        match result {
            Ok(()) => {
                self.metrics.messages_failed.inc();
            }
            Err(db_error) => {
                tracing::warn!(%db_error, "cannot record a delivery failure in the ledger")
            }
        }
    }
}

/// Asks the leader to look at a MailboxPoll again. Best effort: it also looks periodically.
async fn announce(pool: &PgPool, config: &MailboxConfig) {
    let key = format!("{}/{}", config.source.namespace, config.source.name);
    if let Err(error) = crate::db::notify(pool, super::poll::MAILBOX_CHANGED_CHANNEL, &key).await {
        tracing::debug!(%error, "cannot announce a refused webhook destination");
    }
}
