//! Group commit of delivery marks.
//!
//! A finished delivery is marked in the ledger before its task completes. One `UPDATE` per
//! delivery was the largest Postgres cost of delivering (about 0.14 ms of execution each, plus
//! a round trip and a commit). Here one statement marks every delivery that finished while the
//! previous statement ran: a fraction of the cost per message under load, and no added wait
//! when deliveries are rare, since a lone mark is written at once.

use std::collections::HashSet;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::ledger::{self, DeliveredMark};

/// Most marks in one statement.
const MAX_BATCH: usize = 500;
/// Tries of one statement before its deliveries fail (and their tasks retry): a short
/// connection loss should not cost a webhook a repeated POST.
const ATTEMPTS: u32 = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkError {
    #[error("cannot mark the message delivered in the ledger: {0}")]
    Db(String),
    #[error("the ledger's delivery writer has stopped")]
    Stopped,
}

struct Request {
    mark: DeliveredMark,
    reply: oneshot::Sender<Result<bool, MarkError>>,
}

/// Handle of the writer that marks messages delivered in batches. Clones share the writer.
#[derive(Clone)]
pub struct DeliveredMarks {
    requests: mpsc::Sender<Request>,
}

impl DeliveredMarks {
    /// Starts the writer on the current Tokio runtime. It stops once every handle is dropped,
    /// after writing what it was sent.
    pub fn start(pool: PgPool) -> Self {
        let (requests, received) = mpsc::channel(MAX_BATCH * 2);
        tokio::spawn(writer(pool, received));
        Self { requests }
    }

    /// Marks one message delivered; returns once the statement that includes it committed.
    /// `Ok(false)`: it already was delivered.
    pub async fn mark(&self, mark: DeliveredMark) -> Result<bool, MarkError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { mark, reply })
            .await
            .map_err(|_| MarkError::Stopped)?;
        answer.await.map_err(|_| MarkError::Stopped)?
    }
}

async fn writer(pool: PgPool, mut received: mpsc::Receiver<Request>) {
    let mut batch = Vec::new();
    while let Some(first) = received.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match received.try_recv() {
                Ok(request) => batch.push(request),
                Err(_) => break,
            }
        }
        write(&pool, &mut batch).await;
    }
}

async fn write(pool: &PgPool, batch: &mut Vec<Request>) {
    // One order for every writer, so two replicas that ever mark the same rows lock them in
    // the same order.
    batch.sort_by(|a, b| {
        (a.mark.mailbox_uid, &a.mark.message_id).cmp(&(b.mark.mailbox_uid, &b.mark.message_id))
    });
    let (marks, replies): (Vec<DeliveredMark>, Vec<_>) = batch
        .drain(..)
        .map(|request| (request.mark, request.reply))
        .unzip();
    match write_with_retries(pool, &marks).await {
        Ok(changed) => {
            let mut changed: HashSet<(Uuid, String)> = changed.into_iter().collect();
            for (mark, reply) in marks.into_iter().zip(replies) {
                // A message marked twice in one batch changed once: only one caller hears so.
                let _ = reply.send(Ok(changed.remove(&(mark.mailbox_uid, mark.message_id))));
            }
        }
        Err(sqlx::Error::Database(error)) if marks.len() > 1 => {
            // The statement itself failed (a row it touched was refused), not the connection:
            // each mark on its own, so one bad row fails only its own delivery.
            tracing::warn!(%error, marks = marks.len(), "a batch of delivery marks failed; marking one by one");
            for (mark, reply) in marks.into_iter().zip(replies) {
                let result = write_with_retries(pool, std::slice::from_ref(&mark)).await;
                let _ = reply.send(result.map(|changed| !changed.is_empty()).map_err(failed));
            }
        }
        Err(error) => {
            let error = failed(error);
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

fn failed(error: sqlx::Error) -> MarkError {
    MarkError::Db(error.to_string())
}

/// One statement, tried again after a lost connection or an unreachable database; a
/// statement that Postgres refused is not tried again.
async fn write_with_retries(
    pool: &PgPool,
    marks: &[DeliveredMark],
) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    let mut pause = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        let result = async {
            let mut conn = pool.acquire().await?;
            ledger::mark_delivered(&mut conn, marks).await
        }
        .await;
        match result {
            Err(error) if attempt < ATTEMPTS && !matches!(error, sqlx::Error::Database(_)) => {
                tracing::warn!(%error, marks = marks.len(), retry_in = ?pause, "marking deliveries failed");
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            result => return result,
        }
    }
}
