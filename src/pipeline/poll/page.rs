//! One page of a round, committed in ONE transaction, in order with the pages around it.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};

use sqlx::{PgConnection, PgPool};
use tokio::sync::oneshot;

use super::RoundError;
use super::rows::split_page;
use crate::cursor::{self, Fence, RoundStart, RunLease};
use crate::directory::MailboxConfig;
use crate::graph::{Message, Page, PageLink};
use crate::ledger::{self, DeliveryState};
use crate::pipeline::tasks::DeliverTask;
use crate::poll_log::{self, Progress};
use crate::queue::{self, NewTask};

/// The commit order of a round's pages: each page is linked to the one handed out before it.
#[derive(Default)]
pub(super) struct PageChain {
    previous: Option<Predecessor>,
}

impl PageChain {
    /// The place of `page` in the round: after the page handed out before it.
    pub(super) fn next_link(&mut self, page: &Page) -> ChainLink {
        let (removed, messages): (Vec<&Message>, Vec<&Message>) =
            page.messages.iter().partition(|m| m.removed.is_some());
        let ids = |items: Vec<&Message>| items.into_iter().map(|m| m.id.clone()).collect();
        let (began, has_begun) = oneshot::channel();
        let (committed, has_committed) = oneshot::channel();
        ChainLink {
            previous: self.previous.replace(Predecessor {
                messages: ids(messages),
                removals: ids(removed),
                began: has_begun,
                committed: has_committed,
            }),
            began,
            committed,
        }
    }
}

/// A page's place in the round's commit order.
pub(super) struct ChainLink {
    previous: Option<Predecessor>,
    /// Told once this page holds its connection.
    began: oneshot::Sender<()>,
    /// Told once this page has committed; dropped unsent when it failed.
    committed: oneshot::Sender<()>,
}

/// The previous page of a round, as the next page sees it.
struct Predecessor {
    /// Ids of the messages on it.
    messages: HashSet<String>,
    /// Ids of the removals on it.
    removals: HashSet<String>,
    began: oneshot::Receiver<()>,
    committed: oneshot::Receiver<()>,
}

impl Predecessor {
    /// Splits the next page's items: those to record at once, and those to record once this
    /// page has committed. Messages this page carries too are dropped: it records them.
    fn split(&self, items: Vec<Message>) -> (Vec<Message>, Vec<Message>) {
        let mut now = Vec::with_capacity(items.len());
        let mut after = Vec::new();
        for item in items {
            let removal = item.removed.is_some();
            if self.removals.contains(&item.id) || (removal && self.messages.contains(&item.id)) {
                after.push(item);
            } else if removal || !self.messages.contains(&item.id) {
                now.push(item);
            }
        }
        (now, after)
    }
}

/// What every page of one round shares.
pub(super) struct PageContext<'a> {
    pub pool: &'a PgPool,
    pub config: &'a MailboxConfig,
    pub lease: RunLease,
    /// The round's delta query (`DeltaOptions::fingerprint`): cursor writes are fenced on it.
    pub query: &'a str,
    /// Why the round starts from a fresh query; `None` when it follows a stored link.
    pub fresh: Option<RoundStart>,
    pub poll_id: i64,
    /// The mailbox run lease, extended with every committed page.
    pub run_lease: Duration,
    /// What the committed pages did; a page adds to it once it has committed.
    pub stats: &'a Mutex<Progress>,
}

impl PageContext<'_> {
    fn fence(&self) -> Fence<'_> {
        Fence {
            lease: self.lease,
            source: &self.config.source,
            query: self.query,
        }
    }

    /// Records one page in ONE transaction: ledger rows, deliver tasks for new messages, the
    /// cursor, the poll's counters. Returns how many messages were new.
    ///
    /// The rows are inserted while the previous page may still be committing (on another
    /// connection); everything else waits until it has committed, so pages commit in order
    /// and a failed page fails every page after it. Messages the previous page also carries
    /// are left to it: the ledger would ignore them once it commits. Any other item whose id
    /// is on the previous page (a removal of its message, a message it saw removed: one that
    /// came back) is recorded only once that page has committed: touching its rows earlier
    /// would make the two transactions wait on each other, one of them in this process where
    /// Postgres cannot see the deadlock.
    pub(super) async fn commit(
        &self,
        page: Page,
        link: ChainLink,
        graph_requests: i32,
    ) -> Result<u64, RoundError> {
        let ChainLink {
            mut previous,
            began,
            committed,
        } = link;
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
        match self.record(&mut tx, page, previous, graph_requests).await {
            Ok((counted, new)) => {
                tx.commit().await?;
                // Counted only once committed: a failed page leaves the stats as they were.
                *self.stats.lock().unwrap_or_else(PoisonError::into_inner) = counted;
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

    /// The statements of [`Self::commit`]; returns the round's stats with this page counted
    /// and how many of its messages were new.
    async fn record(
        &self,
        tx: &mut PgConnection,
        page: Page,
        previous: Option<Predecessor>,
        graph_requests: i32,
    ) -> Result<(Progress, u64), RoundError> {
        let config = self.config;
        let items = i32::try_from(page.messages.len()).unwrap_or(i32::MAX);
        let resynced = page.resynced;
        let link = page.link;
        let (now, after_previous) = match &previous {
            Some(previous) => previous.split(page.messages),
            None => (page.messages, Vec::new()),
        };
        let (mut recorded, mut watermark) = self.record_items(tx, now).await?;
        if let Some(previous) = previous {
            previous
                .committed
                .await
                .map_err(|_| RoundError::PreviousPageFailed)?;
        }
        if !after_previous.is_empty() {
            let (later, later_watermark) = self.record_items(tx, after_previous).await?;
            recorded.absorb(later);
            watermark = watermark.max(later_watermark);
        }
        let mut counted = *self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        self.start_round(tx, &mut counted, resynced).await?;
        if config.has_per_message_work() {
            let tasks = deliver_tasks(config, &recorded.new_ids)?;
            queue::enqueue_many_on(&mut *tx, &tasks).await?;
        }
        self.advance_cursor(tx, &link, watermark).await?;
        counted.graph_requests = graph_requests;
        counted.pages += 1;
        counted.seen += items;
        counted.new += i32::try_from(recorded.new_ids.len()).unwrap_or(i32::MAX);
        poll_log::record_progress(&mut *tx, self.poll_id, counted).await?;
        Ok((counted, recorded.new_ids.len() as u64))
    }

    /// Records items of a page in the ledger; returns what changed and the newest received
    /// time among the messages.
    async fn record_items(
        &self,
        tx: &mut PgConnection,
        items: Vec<Message>,
    ) -> Result<(ledger::Recorded, Option<DateTime<Utc>>), RoundError> {
        let config = self.config;
        let (messages, removals) = split_page(items);
        let watermark = messages.iter().filter_map(|m| m.received_at).max();
        let state_for_new = if config.has_per_message_work() {
            DeliveryState::Pending
        } else {
            DeliveryState::None
        };
        // Received before spec.startFrom: recorded as skipped, so that no later poll or resync
        // records (and delivers) them.
        let (messages, before_start) = config.start.split(messages, |m| m.received_at);
        ledger::record_before_start(
            &mut *tx,
            config.ledger_id,
            &before_start,
            &config.start.skip_reason(),
        )
        .await?;
        let recorded = ledger::record_page(
            &mut *tx,
            config.ledger_id,
            &messages,
            &removals,
            state_for_new,
        )
        .await?;
        Ok((recorded, watermark))
    }

    /// On the first page of a round from a fresh query, and on the first page after Graph
    /// expired the round's link: drops the stored links and records the round's query.
    async fn start_round(
        &self,
        tx: &mut PgConnection,
        counted: &mut Progress,
        resynced: bool,
    ) -> Result<(), RoundError> {
        let start = if resynced && !counted.resynced {
            Some(RoundStart::Resync)
        } else if counted.pages == 0 {
            self.fresh
        } else {
            None
        };
        let Some(start) = start else {
            return Ok(());
        };
        if start == RoundStart::Resync {
            let source = &self.config.source;
            let cause = if resynced {
                "delta cursor expired"
            } else {
                "delta query changed"
            };
            tracing::info!(namespace = %source.namespace, name = %source.name, cause, "re-reading the folder");
        }
        counted.resynced |= start == RoundStart::Resync;
        cursor::start_round(tx, self.fence(), start).await?;
        Ok(())
    }

    /// Moves the cursor past this page: the round's continuation, or its end.
    async fn advance_cursor(
        &self,
        tx: &mut PgConnection,
        link: &PageLink,
        watermark: Option<DateTime<Utc>>,
    ) -> Result<(), RoundError> {
        match link {
            PageLink::Next(next) => {
                cursor::save_progress(tx, self.fence(), Some(next), watermark, self.run_lease)
                    .await?
            }
            PageLink::Delta(delta) => {
                cursor::finish_round(tx, self.fence(), Some(delta), watermark).await?
            }
            PageLink::End => cursor::finish_round(tx, self.fence(), None, watermark).await?,
        }
        Ok(())
    }
}

/// The deliver tasks of newly recorded messages.
fn deliver_tasks(config: &MailboxConfig, new_ids: &[String]) -> Result<Vec<NewTask>, RoundError> {
    new_ids
        .iter()
        .map(|id| {
            let task = NewTask::of(&DeliverTask {
                mailbox_uid: config.source.uid,
                message_id: id.clone(),
                // Left out when it adds nothing (the ledger is keyed by the object's uid).
                ledger_id: (config.ledger_id != config.source.uid).then_some(config.ledger_id),
            })?;
            let task = task.max_attempts(config.max_attempts);
            // Honoured by pools that cap deliveries per MailboxPoll (the operator's do).
            Ok(match config.max_concurrent_deliveries {
                Some(cap) => task.max_running(cap),
                None => task,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_concurrent_deliveries: Option<i32>) -> MailboxConfig {
        let uid = uuid::Uuid::new_v4();
        MailboxConfig {
            ledger_id: uid,
            source: crate::cursor::Source {
                uid,
                namespace: "support".into(),
                name: "inbox".into(),
                mailbox: "support@contoso.com".into(),
                folder: "inbox".into(),
            },
            credentials: crate::graph::Credentials::client_secret("t", "c", "s"),
            webhook: None,
            include_body: false,
            mark_as_read: true,
            move_to_folder: None,
            max_attempts: 5,
            start: Default::default(),
            filter: None,
            max_concurrent_deliveries,
        }
    }

    #[test]
    fn deliveries_carry_the_mailbox_polls_cap_of_running_deliveries() {
        let ids = ["m1".to_owned(), "m2".to_owned()];
        let capped = deliver_tasks(&config(Some(3)), &ids).expect("tasks");
        assert_eq!(
            capped
                .iter()
                .map(|task| task.max_running)
                .collect::<Vec<_>>(),
            vec![Some(3), Some(3)]
        );
        assert!(capped.iter().all(|task| task.max_attempts == 5));
        let by_default = deliver_tasks(&config(None), &ids).expect("tasks");
        assert!(by_default.iter().all(|task| task.max_running.is_none()));
    }

    fn item(id: &str, removed: bool) -> Message {
        let value = if removed {
            serde_json::json!({"id": id, "@removed": {"reason": "changed"}})
        } else {
            serde_json::json!({"id": id, "subject": id})
        };
        Message::from_value(value, 1000).unwrap_or_else(|_| panic!("item {id}"))
    }

    fn ids(items: &[Message]) -> Vec<(&str, bool)> {
        items
            .iter()
            .map(|m| (m.id.as_str(), m.removed.is_some()))
            .collect()
    }

    /// Items touching rows the previous page writes wait for its commit, so two pages in
    /// flight never wait on each other; a message that came back after the previous page saw
    /// it removed is recorded, not dropped.
    #[test]
    fn items_on_the_previous_page_wait_for_it_or_are_left_to_it() {
        let previous = Predecessor {
            messages: ["kept", "left"].map(String::from).into(),
            removals: ["gone", "back"].map(String::from).into(),
            began: oneshot::channel().1,
            committed: oneshot::channel().1,
        };
        let (now, after) = previous.split(vec![
            item("new", false),
            item("kept", false),
            item("left", true),
            item("back", false),
            item("gone", true),
            item("other", true),
        ]);
        assert_eq!(ids(&now), [("new", false), ("other", true)]);
        assert_eq!(
            ids(&after),
            [("left", true), ("back", false), ("gone", true)]
        );
    }
}
