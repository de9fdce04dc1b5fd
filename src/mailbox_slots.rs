//! Graph's concurrency slots per application and mailbox (`mailbox_slots`; every statement
//! on it is here), shared by every replica.
//!
//! Graph allows 4 requests in flight per application and mailbox. Each replica's governor
//! caps its own requests, but two replicas, or two MailboxPolls of one mailbox (two folders)
//! on two replicas, would each send their 4. Every Graph request therefore also holds one row
//! of this table (a `$batch` up to four), taken all or none and given back when the answer is
//! read. A holder renews its slots while its request runs (every quarter of the governor's
//! `slot_hold`, 20 s), so one that dies without giving them back loses them when `held_until`
//! passes, within 20 s.
//!
//! A `$batch` holds up to all four slots for its whole run, and a backlog of after-actions
//! sends one after another. A request for one slot that finds none free is recorded as
//! waiting (`mailbox_slot_waiters`), and while one waits, batches take nothing: a poll waits
//! for at most the batches already under way.
//!
//! Mailboxes are keyed by the address the MailboxPolls give, lower-cased: a mailbox named by
//! its address in one MailboxPoll and by its object id in another counts as two.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use sqlx::PgPool;
use uuid::Uuid;

use crate::graph::{SharedSlots, SlotAsk, SlotKey};

/// A waiter not heard from for this long (it got its slot elsewhere, gave up, or died) no
/// longer holds batches back. Waiters ask again at least every quarter second.
const WAITER_FRESH_MS: f64 = 2_000.0;

/// The slots of every (application, mailbox), in Postgres.
#[derive(Clone)]
pub struct MailboxSlots {
    pool: PgPool,
    /// Keys whose rows this process has made sure of, with the cap they were made for.
    ensured: Arc<Mutex<HashSet<(SlotKey, u32)>>>,
}

impl MailboxSlots {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            ensured: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// Creates the key's rows `0..cap` once per process (a no-op when they exist).
    async fn ensure(&self, key: &SlotKey, cap: u32) -> Result<(), sqlx::Error> {
        let entry = (key.clone(), cap);
        if self.ensured().contains(&entry) {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO mailbox_slots (app, mailbox, slot)
             SELECT $1, $2, s FROM generate_series(0, $3 - 1) AS s
             ON CONFLICT DO NOTHING",
        )
        .bind(&key.app)
        .bind(&key.mailbox)
        .bind(i32::try_from(cap).unwrap_or(i32::MAX))
        .execute(&self.pool)
        .await?;
        self.ensured().insert(entry);
        Ok(())
    }

    fn ensured(&self) -> std::sync::MutexGuard<'_, HashSet<(SlotKey, u32)>> {
        self.ensured
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes `ask.count` free slots among the first `ask.cap`, all or none: a `$batch` that
    /// got only some of its slots would hold them while waiting for the rest, and two such
    /// batches could wait on each other. A batch takes none while a single request waits.
    pub async fn take(&self, ask: SlotAsk<'_>) -> Result<Option<Uuid>, sqlx::Error> {
        let SlotAsk {
            key, cap, count, ..
        } = ask;
        self.ensure(key, cap).await?;
        let holder = Uuid::new_v4();
        let taken = sqlx::query(
            "WITH free AS MATERIALIZED (
                 SELECT slot FROM mailbox_slots
                 WHERE app = $1 AND mailbox = $2 AND slot < $3
                   AND (held_until IS NULL OR held_until < now())
                   AND ($4 = 1 OR NOT EXISTS (
                       SELECT 1 FROM mailbox_slot_waiters w
                       WHERE w.app = $1 AND w.mailbox = $2
                         AND w.seen_at > now() - $7 * interval '1 millisecond'))
                 ORDER BY slot
                 LIMIT $4
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE mailbox_slots m
             SET holder = $5, held_until = now() + $6 * interval '1 millisecond'
             FROM free
             WHERE m.app = $1 AND m.mailbox = $2 AND m.slot = free.slot
               AND (SELECT count(*) FROM free) = $4",
        )
        .bind(&key.app)
        .bind(&key.mailbox)
        .bind(i32::try_from(cap).unwrap_or(i32::MAX))
        .bind(i64::from(count))
        .bind(holder)
        .bind(ask.hold.as_secs_f64() * 1000.0)
        .bind(WAITER_FRESH_MS)
        .execute(&self.pool)
        .await?;
        let granted = taken.rows_affected() == u64::from(count);
        if count == 1 {
            self.note_waiter(ask, granted).await?;
        }
        Ok(granted.then_some(holder))
    }

    /// Records a refused single request as waiting, and forgets it once granted (with any
    /// waiter long gone, so the table stays small).
    async fn note_waiter(&self, ask: SlotAsk<'_>, granted: bool) -> Result<(), sqlx::Error> {
        if granted && !ask.waited {
            return Ok(());
        }
        let statement = if granted {
            "DELETE FROM mailbox_slot_waiters
             WHERE app = $1 AND mailbox = $2
               AND (waiter = $3 OR seen_at < now() - interval '1 minute')"
        } else {
            "INSERT INTO mailbox_slot_waiters (app, mailbox, waiter) VALUES ($1, $2, $3)
             ON CONFLICT (app, mailbox, waiter) DO UPDATE SET seen_at = now()"
        };
        sqlx::query(statement)
            .bind(&ask.key.app)
            .bind(&ask.key.mailbox)
            .bind(ask.waiter)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Gives back the slots `holder` took.
    pub async fn give_back_now(&self, key: &SlotKey, holder: Uuid) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE mailbox_slots SET holder = NULL, held_until = NULL
             WHERE app = $1 AND mailbox = $2 AND holder = $3",
        )
        .bind(&key.app)
        .bind(&key.mailbox)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Holds the slots `holder` took for `hold` from now; false when it holds none any more.
    pub async fn renew_now(
        &self,
        key: &SlotKey,
        holder: Uuid,
        hold: Duration,
    ) -> Result<bool, sqlx::Error> {
        let renewed = sqlx::query(
            "UPDATE mailbox_slots SET held_until = now() + $4 * interval '1 millisecond'
             WHERE app = $1 AND mailbox = $2 AND holder = $3",
        )
        .bind(&key.app)
        .bind(&key.mailbox)
        .bind(holder)
        .bind(hold.as_secs_f64() * 1000.0)
        .execute(&self.pool)
        .await?;
        Ok(renewed.rows_affected() > 0)
    }

    /// Slots of `key` held now (for tests and diagnostics).
    pub async fn held(&self, key: &SlotKey) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT count(*) FROM mailbox_slots
             WHERE app = $1 AND mailbox = $2 AND held_until >= now()",
        )
        .bind(&key.app)
        .bind(&key.mailbox)
        .fetch_one(&self.pool)
        .await
    }
}

impl SharedSlots for MailboxSlots {
    fn try_take<'a>(&'a self, ask: SlotAsk<'a>) -> BoxFuture<'a, Result<Option<Uuid>, String>> {
        async move { self.take(ask).await.map_err(|error| error.to_string()) }.boxed()
    }

    fn renew<'a>(
        &'a self,
        key: &'a SlotKey,
        holder: Uuid,
        hold: Duration,
    ) -> BoxFuture<'a, Result<bool, String>> {
        async move {
            self.renew_now(key, holder, hold)
                .await
                .map_err(|error| error.to_string())
        }
        .boxed()
    }

    fn give_back(&self, key: &SlotKey, holder: Uuid) {
        // Without a runtime (the process is ending) the slots run out on their own.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (slots, key) = (self.clone(), key.clone());
        runtime.spawn(async move {
            if let Err(error) = slots.give_back_now(&key, holder).await {
                tracing::warn!(%error, "cannot give back a shared Graph slot; it runs out on its own");
            }
        });
    }
}
