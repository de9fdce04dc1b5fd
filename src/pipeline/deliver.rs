//! The `deliver` task: one message to the webhook, then its after-actions queued.
//!
//! Every step is recorded in the ledger before the next starts, so a retry after a crash
//! resumes where the last run stopped and never posts a delivered message again.

use std::sync::Arc;

use sqlx::PgPool;
use uuid::Uuid;

use super::delivered::DeliveredMarks;
use super::run_lease;
use super::selection;
use super::tasks::{ActionsTask, DeliverTask};
use crate::delivery::content::{self, ContentOptions, Format};
use crate::delivery::egress::GuardedClient;
use crate::delivery::fetch::{self, FetchedAttachments, MimeError};
use crate::delivery::format::{EventContext, Outgoing};
use crate::delivery::signing::message_key;
use crate::delivery::webhook::{self, MessageView, Payload, Source, WebhookError};
use crate::directory::{Directory, MailboxConfig};
use crate::graph::{GraphClient, GraphError, MailboxClient};
use crate::ledger::{self, DeliveredMark, StoredMessage};
use crate::queue::{self, ClaimedTask, Handler, HandlerError, NewTask, TaskContext};
use crate::telemetry::metrics::SharedMetrics;

pub struct DeliverHandler<D> {
    pool: PgPool,
    directory: Arc<D>,
    webhook: GuardedClient,
    metrics: SharedMetrics,
    marks: DeliveredMarks,
    /// Fetches attachments and raw MIME when a webhook asks for them.
    graph: Option<GraphClient>,
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
            graph: None,
        }
    }

    /// Lets deliveries read from Graph (attachments, raw MIME), through the process's client
    /// and so its governor.
    pub fn with_graph(mut self, graph: GraphClient) -> Self {
        self.graph = Some(graph);
        self
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
        let delivery = Delivery {
            task,
            config,
            ledger_id,
            stored,
        };
        let outgoing = self.outgoing(&delivery, endpoint, &key).await?;
        let started = std::time::Instant::now();
        let sent = webhook::send_checked(
            &self.webhook,
            &source.namespace,
            endpoint,
            &key,
            task.attempt(),
            outgoing,
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
                    self.record_failure(ledger_id, &stored.message.message_id, &error.to_string())
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

    /// The request's body and format headers: the JSON payload (with the attachments the
    /// webhook asks for) as JSON or as a CloudEvent, or the raw MIME.
    async fn outgoing(
        &self,
        delivery: &Delivery<'_>,
        endpoint: &webhook::Endpoint,
        key: &str,
    ) -> Result<Outgoing, HandlerError> {
        let source = &delivery.config.source;
        let message = &delivery.stored.message;
        let event = EventContext {
            key,
            namespace: &source.namespace,
            name: &source.name,
            message_id: &message.message_id,
            received: message.received_at,
        };
        let options = &endpoint.content;
        if options.format == Format::Mime {
            let raw = self.raw_mime(delivery, options).await?;
            return Ok(Outgoing::mime(raw, &event));
        }
        let mut view = MessageView::new(message);
        if options.lists_attachments() {
            let fetched = self.attachments(delivery, options).await?;
            view.attachments = Some(fetched.views);
            view.attachments_unavailable = fetched.unavailable;
        }
        let payload = Payload {
            event_type: webhook::EVENT_TYPE,
            key,
            mailbox_poll: Source {
                namespace: &source.namespace,
                name: &source.name,
                uid: source.uid,
                mailbox: &source.mailbox,
                folder: &source.folder,
            },
            message: view,
        };
        let body = serde_json::to_vec(&payload).map_err(HandlerError::permanent)?;
        Ok(match options.format {
            Format::Cloudevents => Outgoing::cloudevent(body, &event),
            Format::Json | Format::Mime => Outgoing::json(body),
        })
    }

    /// The message's attachments as the webhook asks for them; none listed when Graph says
    /// there are none (and the body references no inline image).
    async fn attachments(
        &self,
        delivery: &Delivery<'_>,
        options: &ContentOptions,
    ) -> Result<FetchedAttachments, HandlerError> {
        let message = &delivery.stored.message;
        if !content::worth_listing(message.has_attachments, message.body.as_deref()) {
            return Ok(FetchedAttachments::default());
        }
        let mailbox = self.mailbox(delivery.config)?;
        match fetch::attachments(&mailbox, &message.message_id, options).await {
            Ok(fetched) => Ok(fetched),
            Err(error) => Err(self.graph_failure(delivery, error).await),
        }
    }

    async fn raw_mime(
        &self,
        delivery: &Delivery<'_>,
        options: &ContentOptions,
    ) -> Result<Vec<u8>, HandlerError> {
        let mailbox = self.mailbox(delivery.config)?;
        let message_id = &delivery.stored.message.message_id;
        match fetch::raw_mime(&mailbox, message_id, options.max_message_bytes).await {
            Ok(raw) => Ok(raw),
            Err(MimeError::Graph(error)) => Err(self.graph_failure(delivery, error).await),
            Err(error) => Err(self.content_failure(delivery, &error.to_string()).await),
        }
    }

    /// The Graph client of the MailboxPoll's mailbox.
    fn mailbox(&self, config: &MailboxConfig) -> Result<MailboxClient, HandlerError> {
        let graph = self.graph.as_ref().ok_or_else(|| {
            HandlerError::permanent(
                "this worker has no Graph client to fetch attachments or MIME with",
            )
        })?;
        Ok(graph.mailbox(config.credentials.clone(), config.source.mailbox.clone()))
    }

    /// A Graph request of the delivery failed. A throttled mailbox snoozes the task (every
    /// replica leaves the mailbox alone until the wait is over; not a failed attempt), and so
    /// does a mailbox whose shared slots others held too long; any other error is a failed
    /// attempt, and on the last one the ledger says why.
    async fn graph_failure(&self, delivery: &Delivery<'_>, error: GraphError) -> HandlerError {
        let (task, config) = (delivery.task, delivery.config);
        match &error {
            GraphError::Throttled { retry_after, .. } => {
                return run_lease::share_throttle(&self.pool, &config.source.mailbox, *retry_after)
                    .await;
            }
            GraphError::MailboxBusy { .. } => return run_lease::busy(&error),
            _ => {}
        }
        let text = format!(
            "{}: cannot read the message's content from Microsoft Graph: {error}",
            error.reason()
        );
        tracing::warn!(namespace = %config.source.namespace, name = %config.source.name, attempt = task.attempt(), %error, "delivery content unavailable");
        if task.attempt() >= task.max_attempts {
            self.record_failure(
                delivery.ledger_id,
                &delivery.stored.message.message_id,
                &text,
            )
            .await;
        }
        HandlerError::retryable(text)
    }

    /// The content cannot be delivered as the webhook asks and retrying will not change that
    /// (the raw MIME over the limit, the message gone): the delivery fails for good, saying why.
    async fn content_failure(&self, delivery: &Delivery<'_>, text: &str) -> HandlerError {
        let source = &delivery.config.source;
        tracing::warn!(namespace = %source.namespace, name = %source.name, error = text, "delivery impossible");
        self.record_failure(
            delivery.ledger_id,
            &delivery.stored.message.message_id,
            text,
        )
        .await;
        HandlerError::permanent(text.to_string())
    }

    /// Marks the ledger failed; best effort, since the task's own state already tells.
    async fn record_failure(&self, uid: Uuid, message_id: &str, error: &str) {
        let result = async {
            let mut conn = self.pool.acquire().await?;
            ledger::mark_failed(&mut conn, uid, message_id, error).await
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

/// The delivery under way: its task, its MailboxPoll, and the message from the ledger.
struct Delivery<'a> {
    task: &'a ClaimedTask,
    config: &'a MailboxConfig,
    ledger_id: Uuid,
    stored: &'a StoredMessage,
}

/// Asks the leader to look at a MailboxPoll again. Best effort: it also looks periodically.
async fn announce(pool: &PgPool, config: &MailboxConfig) {
    let key = format!("{}/{}", config.source.namespace, config.source.name);
    if let Err(error) = crate::db::notify(pool, super::poll::MAILBOX_CHANGED_CHANNEL, &key).await {
        tracing::debug!(%error, "cannot announce a refused webhook destination");
    }
}
