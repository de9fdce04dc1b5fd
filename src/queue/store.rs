//! The queue's operations in SQL. Each state transition of a task lives in exactly one function
//! here; see the table in the module above.
//!
//! Operations that take an executor run one statement and work on a pool, a connection or
//! inside a caller's transaction (`&mut *tx`). Operations that may need several statements take
//! anything that can [`Acquire`] a connection, including `&mut tx`.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::{Acquire, PgExecutor, Postgres, Row};
use uuid::Uuid;

use super::backoff::RetryPolicy;
use super::stats::{DepthRow, QueueDepth};
use super::transition::{self, Transition};
use super::{
    ClaimedTask, Enqueued, FAIR_SPACING, KindClaim, Lease, LiveTask, NewTask, QueueError, TaskArgs,
    TaskRow, TaskState,
};

/// How often enqueue retries a dedupe key whose live task finished between the conflict and
/// the lookup. Each round needs that race to happen again, so a few rounds are plenty.
const DEDUPE_ROUNDS: usize = 5;

const TASK_COLUMNS: &str = "id, kind, state, payload, owner_uid, dedupe_key, run_at, attempts, \
     max_attempts, locked_by, lease_expires_at, last_error, created_at, updated_at, finished_at, \
     waiting_cap";

/// Postgres intervals are whole microseconds; bind durations as a count of them.
fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// Adds one task, or returns the live task with the same dedupe key. Commits with the caller's
/// transaction when given one; idle workers are notified when it commits.
pub async fn enqueue<'c, A>(conn: A, task: &NewTask) -> Result<Enqueued, QueueError>
where
    A: Acquire<'c, Database = Postgres>,
{
    let mut enqueued = enqueue_many(conn, std::slice::from_ref(task)).await?;
    enqueued.pop().ok_or(QueueError::Database {
        operation: "enqueue",
        source: sqlx::Error::RowNotFound,
    })
}

/// Adds `task`, or, when a live task holds its dedupe key, asks that one to run once more
/// after it finishes: for a task that reads whatever work is waiting when it runs, so work
/// added while it runs (after it may have looked) still gets a run. Without a dedupe key it is
/// a plain [`enqueue_many_on`].
pub async fn enqueue_or_rerun_on(
    conn: &mut sqlx::PgConnection,
    task: &NewTask,
) -> Result<Enqueued, QueueError> {
    for _ in 0..DEDUPE_ROUNDS {
        let enqueued = enqueue_many_on(conn, std::slice::from_ref(task))
            .await?
            .pop()
            .ok_or(QueueError::Database {
                operation: "enqueue",
                source: sqlx::Error::RowNotFound,
            })?;
        if enqueued.fresh || request_rerun(conn, enqueued.id).await? {
            return Ok(enqueued);
        }
        // The live task finished in between: its key is free again.
    }
    Err(QueueError::Database {
        operation: "enqueue or rerun (dedupe keys kept changing hands)",
        source: sqlx::Error::RowNotFound,
    })
}

/// Asks live task `id` to run once more after it finishes; `false` when it is no longer live.
/// The row lock this takes also keeps a pending task from being claimed until the caller's
/// transaction ends.
async fn request_rerun(conn: &mut sqlx::PgConnection, id: i64) -> Result<bool, QueueError> {
    let updated = sqlx::query(
        "UPDATE tasks SET rerun_requested = true, updated_at = now()
         WHERE id = $1 AND state IN ('pending', 'running')",
    )
    .bind(id)
    .execute(&mut *conn)
    .await
    .map_err(QueueError::db("requesting a rerun"))?;
    Ok(updated.rows_affected() > 0)
}

/// Adds tasks in one statement, answering in input order. A task whose dedupe key is held by
/// a live task (or by an earlier task of the same batch) resolves to that task instead of
/// failing the batch. At most one notification is sent per transaction.
pub async fn enqueue_many<'c, A>(conn: A, tasks: &[NewTask]) -> Result<Vec<Enqueued>, QueueError>
where
    A: Acquire<'c, Database = Postgres>,
{
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = conn.acquire().await.map_err(QueueError::db("enqueue"))?;
    enqueue_many_on(&mut conn, tasks).await
}

/// [`enqueue_many`] on a connection or transaction the caller holds. Its concrete signature
/// keeps the futures of handlers that enqueue inside their own transaction `Send`.
pub async fn enqueue_many_on(
    conn: &mut sqlx::PgConnection,
    tasks: &[NewTask],
) -> Result<Vec<Enqueued>, QueueError> {
    for task in tasks {
        task.validate()?;
    }
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let mut resolved: Vec<Option<Enqueued>> = vec![None; tasks.len()];
    let mut todo: Vec<usize> = (0..tasks.len()).collect();

    for _ in 0..DEDUPE_ROUNDS {
        let inserted = insert_tasks(conn, tasks, &todo).await?;
        let unresolved_keys = match_inserted(tasks, &todo, &inserted, &mut resolved)?;
        if !unresolved_keys.is_empty() {
            resolve_live(conn, tasks, &todo, &unresolved_keys, &mut resolved).await?;
        }
        todo.retain(|&index| resolved[index].is_none());
        if todo.is_empty() {
            analyze_after_burst(conn, tasks.len()).await?;
            return Ok(resolved.into_iter().flatten().collect());
        }
    }
    Err(QueueError::Database {
        operation: "enqueue (dedupe keys kept changing hands)",
        source: sqlx::Error::RowNotFound,
    })
}

/// Resolves the tasks at `todo` that `inserted` (id, dedupe key) answers; returns the dedupe
/// keys of those it does not (a live task held them).
fn match_inserted(
    tasks: &[NewTask],
    todo: &[usize],
    inserted: &[(i64, Option<String>)],
    resolved: &mut [Option<Enqueued>],
) -> Result<Vec<String>, QueueError> {
    let mut by_key: HashMap<&str, i64> = HashMap::new();
    let mut unkeyed_ids = Vec::new();
    for (id, key) in inserted {
        match key {
            Some(key) => {
                by_key.insert(key.as_str(), *id);
            }
            None => unkeyed_ids.push(*id),
        }
    }
    // Identity values follow the insertion order, which follows the input order.
    unkeyed_ids.sort_unstable();
    let mut unkeyed_ids = unkeyed_ids.into_iter();
    let mut claimed_keys: HashSet<&str> = HashSet::new();
    let mut unresolved_keys: Vec<String> = Vec::new();
    for &index in todo {
        match tasks[index].dedupe_key.as_deref() {
            None => {
                let id = unkeyed_ids.next().ok_or(QueueError::Database {
                    operation: "enqueue (matching inserted rows)",
                    source: sqlx::Error::RowNotFound,
                })?;
                resolved[index] = Some(Enqueued { id, fresh: true });
            }
            Some(key) => match by_key.get(key) {
                Some(&id) => {
                    let fresh = claimed_keys.insert(key);
                    resolved[index] = Some(Enqueued { id, fresh });
                }
                None => unresolved_keys.push(key.to_owned()),
            },
        }
    }
    Ok(unresolved_keys)
}

/// Resolves tasks whose dedupe key a live task holds to that task. One that finished since
/// the conflict stays unresolved and is inserted again in the next round.
async fn resolve_live(
    conn: &mut sqlx::PgConnection,
    tasks: &[NewTask],
    todo: &[usize],
    keys: &[String],
    resolved: &mut [Option<Enqueued>],
) -> Result<(), QueueError> {
    let live: Vec<(i64, String)> = sqlx::query_as(
        "SELECT id, dedupe_key FROM tasks
         WHERE dedupe_key = ANY($1) AND state IN ('pending', 'running')",
    )
    .bind(keys)
    .fetch_all(&mut *conn)
    .await
    .map_err(QueueError::db("enqueue (finding live tasks by dedupe key)"))?;
    let live: HashMap<String, i64> = live.into_iter().map(|(id, k)| (k, id)).collect();
    for &index in todo {
        if resolved[index].is_some() {
            continue;
        }
        if let Some(key) = tasks[index].dedupe_key.as_deref()
            && let Some(&id) = live.get(key)
        {
            resolved[index] = Some(Enqueued { id, fresh: false });
        }
    }
    Ok(())
}

/// Batches at least this large check whether the planner's statistics are out of date.
const BURST: usize = 500;

/// Runs `ANALYZE tasks` when one batch is larger than the table the statistics describe.
///
/// Statements prepared on pooled connections keep a generic plan made from the statistics of
/// the moment. Made while the table was nearly empty, the claim's plan looked up the claimed
/// ids by sequential scan; after a burst of 100,000 enqueued tasks (the first poll of a large
/// mailbox) each claim took 21 ms instead of 1 until autovacuum's next ANALYZE. ANALYZE in
/// the caller's transaction counts its own new rows, and the plans it invalidates are made
/// again from the new statistics once it commits. It runs once or twice per burst: after it,
/// the statistics are no longer smaller than a batch.
async fn analyze_after_burst(
    conn: &mut sqlx::PgConnection,
    batch: usize,
) -> Result<(), QueueError> {
    if batch < BURST {
        return Ok(());
    }
    let believed: f32 =
        sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = 'tasks'::regclass")
            .fetch_one(&mut *conn)
            .await
            .map_err(QueueError::db("enqueue (reading table statistics)"))?;
    // -1 means never analyzed.
    if f64::from(believed) < batch as f64 {
        sqlx::query("ANALYZE tasks")
            .execute(&mut *conn)
            .await
            .map_err(QueueError::db("enqueue (refreshing table statistics)"))?;
    }
    Ok(())
}

/// Inserts the tasks at `indexes`; returns (id, dedupe key) of the rows actually inserted.
async fn insert_tasks(
    conn: &mut sqlx::PgConnection,
    tasks: &[NewTask],
    indexes: &[usize],
) -> Result<Vec<(i64, Option<String>)>, QueueError> {
    let mut kinds = Vec::with_capacity(indexes.len());
    let mut payloads = Vec::with_capacity(indexes.len());
    let mut owners = Vec::with_capacity(indexes.len());
    let mut keys = Vec::with_capacity(indexes.len());
    let mut run_ats = Vec::with_capacity(indexes.len());
    let mut max_attempts = Vec::with_capacity(indexes.len());
    let mut max_running = Vec::with_capacity(indexes.len());
    for &index in indexes {
        let task = &tasks[index];
        kinds.push(task.kind.as_str());
        payloads.push(&task.payload);
        owners.push(task.owner_uid);
        keys.push(task.dedupe_key.as_deref());
        run_ats.push(task.run_at);
        max_attempts.push(task.max_attempts);
        max_running.push(task.max_running);
    }
    // Postgres drops identical notifications within a transaction, so a transaction that
    // enqueues many tasks (in one statement or many) sends one. Tasks scheduled for later
    // wake nobody: the polling fallback finds them when they are due.
    //
    // An owner's tasks of one kind are placed in the fair order one spacing apart, behind the
    // ones it already has pending (its tail, one index probe): see the fair_claims migration.
    // The arrays sit behind scalar subqueries so that the cached generic plan looks as cheap as
    // a plan for the actual values and gets used: planned afresh on every call (the owners'
    // tails made plans for the actual values look cheaper), an enqueue cost three times as
    // much.
    let rows = sqlx::query(
        "WITH input AS (
             SELECT i.kind, i.payload, i.owner_uid, i.dedupe_key, COALESCE(i.run_at, now()) AS run_at,
                    i.max_attempts, i.max_running, i.ord,
                    row_number() OVER (PARTITION BY i.owner_uid, i.kind ORDER BY i.ord) AS owner_rank
             FROM unnest((SELECT $1::text[]), (SELECT $2::jsonb[]), (SELECT $3::uuid[]),
                         (SELECT $4::text[]), (SELECT $5::timestamptz[]), (SELECT $6::int[]),
                         (SELECT $7::int[]))
                 WITH ORDINALITY AS i(kind, payload, owner_uid, dedupe_key, run_at, max_attempts,
                                      max_running, ord)
         ), tails AS (
             SELECT o.owner_uid, o.kind,
                    (SELECT max(t.fair_at) FROM tasks t
                     WHERE t.owner_uid = o.owner_uid AND t.kind = o.kind AND t.state = 'pending') AS tail
             FROM (SELECT DISTINCT owner_uid, kind FROM input WHERE owner_uid IS NOT NULL) o
         ), placed AS (
             SELECT input.*,
                    CASE WHEN input.owner_uid IS NULL THEN input.run_at
                         ELSE GREATEST(
                             input.run_at + (input.owner_rank - 1) * $8 * interval '1 microsecond',
                             tails.tail + input.owner_rank * $8 * interval '1 microsecond')
                    END AS fair_at
             FROM input LEFT JOIN tails USING (owner_uid, kind)
         ), inserted AS (
             INSERT INTO tasks (kind, payload, owner_uid, dedupe_key, run_at, max_attempts,
                                max_running, fair_delay_us)
             SELECT kind, payload, owner_uid, dedupe_key, run_at, max_attempts, max_running,
                    GREATEST(0, round(EXTRACT(EPOCH FROM fair_at - run_at) * 1000000))::bigint
             FROM placed ORDER BY ord
             ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL AND state IN ('pending', 'running')
             DO NOTHING
             RETURNING id, dedupe_key, run_at
         ), wake AS (
             SELECT pg_notify('mailpoll_tasks', '') FROM inserted WHERE run_at <= now() LIMIT 1
         )
         SELECT id, dedupe_key, (SELECT count(*) FROM wake) AS woke FROM inserted",
    )
    .bind(&kinds)
    .bind(&payloads)
    .bind(&owners)
    .bind(&keys)
    .bind(&run_ats)
    .bind(&max_attempts)
    .bind(&max_running)
    .bind(micros(FAIR_SPACING))
    .fetch_all(&mut *conn)
    .await
    .map_err(QueueError::db("enqueue"))?;
    rows.iter()
        .map(|row| Ok((row.try_get("id")?, row.try_get("dedupe_key")?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(QueueError::db("enqueue (reading inserted rows)"))
}

/// Claims up to `limit` due pending tasks of the given kinds in fair order, each kind taking
/// at most its room; see [`claim_kinds`].
pub async fn claim<'e>(
    executor: impl PgExecutor<'e>,
    kinds: &[String],
    limit: usize,
    worker_id: &str,
    lease: Duration,
) -> Result<Vec<ClaimedTask>, QueueError> {
    let kinds: Vec<KindClaim> = kinds
        .iter()
        .map(|kind| KindClaim {
            kind: kind.clone(),
            room: limit,
            reserved: 0,
            owner_cap: None,
        })
        .collect();
    claim_kinds(executor, &kinds, limit, worker_id, lease).await
}

/// The claim: fair order per kind, kinds within their room, reserved places first, owners
/// within their cap. See [`claim_kinds`].
const CLAIM_SQL: &str = "
WITH budget AS (
    -- A kind capped per owner looks at twice its room, so the tasks of owners at their cap
    -- (moved out of the way below) leave room for others in the same claim. Every row looked
    -- at is locked while the statement runs, which costs a WAL record each: uncapped kinds look
    -- at no more than they take, and a task with a cap of its own among them only makes that
    -- claim take fewer.
    SELECT b.*, CASE WHEN b.owner_cap IS NULL THEN b.room ELSE b.room * 2 END AS scan_limit
    FROM unnest((SELECT $1::text[]), (SELECT $2::bigint[]), (SELECT $3::bigint[]),
                (SELECT $4::int[])) AS b(kind, room, reserved, owner_cap)
), due_rows AS MATERIALIZED (
    -- fair_at <= now() implies run_at <= now(): this index range ends at now.
    SELECT c.id, c.kind FROM budget b CROSS JOIN LATERAL (
        SELECT id, kind FROM tasks
        WHERE state = 'pending' AND kind = b.kind AND fair_at <= now() AND waiting_cap IS NULL
        ORDER BY fair_at, id
        LIMIT b.scan_limit
        FOR UPDATE SKIP LOCKED
    ) c
), delayed_rows AS MATERIALIZED (
    -- Then due backlogs whose fair time is still ahead, only when the first range fell short.
    SELECT c.id, c.kind FROM budget b CROSS JOIN LATERAL (
        SELECT id, kind FROM tasks
        WHERE state = 'pending' AND kind = b.kind AND fair_delay_us > 0 AND fair_at > now()
          AND run_at <= now() AND waiting_cap IS NULL
        ORDER BY fair_at, id
        LIMIT GREATEST(0, b.scan_limit - (SELECT count(*) FROM due_rows d WHERE d.kind = b.kind))
        FOR UPDATE SKIP LOCKED
    ) c
), window_rows AS (
    -- Read again by id: the planner then expects a handful of rows, as there are, instead of
    -- a tenth of the table for each unknown LIMIT, which put the plan above the JIT threshold.
    SELECT w.id, w.kind, w.owner_uid, w.run_at, w.fair_at, b.room, b.reserved,
           CASE WHEN w.owner_uid IS NOT NULL AND b.owner_cap IS NOT NULL
                THEN COALESCE(w.max_running, b.owner_cap) END AS cap
    FROM tasks w JOIN budget b ON b.kind = w.kind
    WHERE w.id = ANY(ARRAY(SELECT id FROM due_rows UNION ALL SELECT id FROM delayed_rows))
), ranked AS (
    SELECT w.*, row_number() OVER (
               PARTITION BY w.kind, w.owner_uid ORDER BY w.fair_at, w.id) AS owner_rank
    FROM window_rows w
), used_slots AS MATERIALIZED (
    -- Slots held by running tasks of the capped owners in the window. With the used slots
    -- u_1 < u_2 < ... the r-th free slot is r plus the count of those with u_k - k < r.
    -- Materialized: inlined into `slotted`, it ran once per window row through the owner's
    -- live-task index, reading every pending task of a capped owner each time (8 s a claim
    -- behind a backlog of 100,000); once, it reads the small running-slot index.
    SELECT u.owner_uid, u.kind, u.owner_slot - row_number() OVER (
               PARTITION BY u.owner_uid, u.kind ORDER BY u.owner_slot) AS free_below
    FROM tasks u
    WHERE u.state = 'running' AND u.owner_slot IS NOT NULL
      AND u.owner_uid = ANY(ARRAY(SELECT owner_uid FROM window_rows WHERE cap IS NOT NULL))
), slotted AS (
    SELECT r.*, CASE WHEN r.cap IS NOT NULL THEN r.owner_rank + (
               SELECT count(*) FROM used_slots s
               WHERE s.owner_uid = r.owner_uid AND s.kind = r.kind AND s.free_below < r.owner_rank)
           END AS slot
    FROM ranked r
), eligible AS (
    SELECT s.id, s.kind, s.fair_at, s.room, s.reserved, s.slot,
           row_number() OVER (PARTITION BY s.kind ORDER BY s.fair_at, s.id) AS kind_rank
    FROM slotted s
    WHERE s.cap IS NULL OR s.slot <= s.cap
), picked AS MATERIALIZED (
    SELECT id, slot FROM eligible
    WHERE kind_rank <= room
    ORDER BY kind_rank <= reserved DESC, fair_at, id
    LIMIT (SELECT $5::bigint)
), full_owners AS (
    -- Owners whose every slot is taken once this claim's picks run.
    SELECT o.owner_uid, o.kind, o.cap FROM (
        SELECT DISTINCT owner_uid, kind, cap FROM slotted WHERE slot > cap) o
    WHERE (SELECT count(*) FROM used_slots u WHERE u.owner_uid = o.owner_uid AND u.kind = o.kind)
          + (SELECT count(*) FROM picked p JOIN window_rows w ON w.id = p.id
             WHERE w.owner_uid = o.owner_uid AND w.kind = o.kind) >= o.cap
), waiting AS (
    -- The tasks of a full owner wait for one of its slots, out of both ranges above: left
    -- there, they would fill the head of the fair order while they cannot run, and every
    -- claim would read them again (behind a backlog of 100,000, every claim read and rewrote
    -- its window of them). The finish of one of the owner's tasks releases one
    -- ([`finish_statement`]). A task blocked only because this claim took its fill stays.
    UPDATE tasks d SET waiting_cap = f.cap
    FROM slotted s JOIN full_owners f ON f.owner_uid = s.owner_uid AND f.kind = s.kind
    WHERE s.slot > s.cap AND d.id = s.id
)
UPDATE tasks t
SET state = 'running',
    locked_by = $6,
    lock_token = gen_random_uuid(),
    lease_expires_at = now() + $7 * interval '1 microsecond',
    owner_slot = (SELECT p.slot FROM picked p WHERE p.id = t.id),
    updated_at = now()
WHERE t.id = ANY(ARRAY(SELECT id FROM picked))
RETURNING t.id, t.kind, t.payload, t.owner_uid, t.dedupe_key, t.attempts,
          t.max_attempts, t.lock_token, t.lease_expires_at, t.created_at";

/// The claim when no kind is capped per owner: fair order per kind, kinds within their room,
/// reserved places first. It looks at no more rows than it may take, and costs about what a
/// plain claim in `run_at` order does.
const CLAIM_UNCAPPED_SQL: &str = "
WITH budget AS (
    SELECT * FROM unnest((SELECT $1::text[]), (SELECT $2::bigint[]), (SELECT $3::bigint[]))
        AS b(kind, room, reserved)
), due_rows AS MATERIALIZED (
    -- fair_at <= now() implies run_at <= now(): this index range ends at now.
    SELECT c.id, c.fair_at, b.kind, b.reserved FROM budget b CROSS JOIN LATERAL (
        SELECT id, fair_at FROM tasks
        WHERE state = 'pending' AND kind = b.kind AND fair_at <= now() AND waiting_cap IS NULL
        ORDER BY fair_at, id
        LIMIT b.room
        FOR UPDATE SKIP LOCKED
    ) c
), delayed_rows AS MATERIALIZED (
    -- Then due backlogs whose fair time is still ahead, only when the first range fell short.
    SELECT c.id, c.fair_at, b.kind, b.reserved FROM budget b CROSS JOIN LATERAL (
        SELECT id, fair_at FROM tasks
        WHERE state = 'pending' AND kind = b.kind AND fair_delay_us > 0 AND fair_at > now()
          AND run_at <= now() AND waiting_cap IS NULL
        ORDER BY fair_at, id
        LIMIT GREATEST(0, b.room - (SELECT count(*) FROM due_rows d WHERE d.kind = b.kind))
        FOR UPDATE SKIP LOCKED
    ) c
), picked AS (
    SELECT id FROM (
        SELECT w.*, row_number() OVER (PARTITION BY w.kind ORDER BY w.fair_at, w.id) AS kind_rank
        FROM (SELECT * FROM due_rows UNION ALL SELECT * FROM delayed_rows) w
    ) ranked
    ORDER BY kind_rank <= reserved DESC, fair_at, id
    LIMIT (SELECT $4::bigint)
)
UPDATE tasks t
SET state = 'running',
    locked_by = $5,
    lock_token = gen_random_uuid(),
    lease_expires_at = now() + $6 * interval '1 microsecond',
    owner_slot = NULL,
    updated_at = now()
WHERE t.id = ANY(ARRAY(SELECT id FROM picked))
RETURNING t.id, t.kind, t.payload, t.owner_uid, t.dedupe_key, t.attempts,
          t.max_attempts, t.lock_token, t.lease_expires_at, t.created_at";

/// Claims up to `limit` due pending tasks in one statement. Each gets the state `running`, a
/// lease of `lease` held by `worker_id` and a fresh lock token. Rows locked by a concurrent
/// claim are skipped, never waited for.
///
/// Fairness, all in the statement:
/// - *Fair order*: tasks are taken by `fair_at`, which enqueue sets one [`FAIR_SPACING`] apart
///   per owner behind the owner's pending tasks of the same kind: a MailboxPoll with a 100,000
///   task backlog and one with a single new task alternate instead of queueing in `run_at`
///   order.
/// - *Room and reservations per kind*: a kind takes at most its `room`; places up to a kind's
///   `reserved` count are filled before the rest, which go by fair order across kinds.
/// - *Owner caps*, for kinds with an `owner_cap`: a task whose owner already runs its cap
///   (`max_running` of the task, else the kind's `owner_cap`) of tasks of its kind is left
///   pending and set waiting (`waiting_cap`): out of the claim's ranges, it neither holds the
///   head of the order nor costs later claims a read, until a finish of one of the owner's
///   tasks releases it (one per freed slot; [`release_waiting`] is the safety net). A running
///   capped task holds one of the owner's numbered slots (`owner_slot`); a unique index keeps
///   two claims on two replicas from filling the same slot: the later one fails with
///   [`QueueError::is_slot_conflict`] and is simply retried.
///
/// Each kind looks at a window of its room, twice that when it has an `owner_cap` (the rows
/// are locked while the statement runs). The statement is shaped so that its cached generic plan is a good one and gets
/// used: the claim runs many times a second, and planning it afresh each time cost about a
/// fifth of its time. Postgres uses the generic plan only when it looks no more expensive than
/// the plans made for the actual parameters. Behind scalar subqueries the limit and the kinds
/// are unknown to both kinds of plan alike, and `id = ANY(ARRAY(...))` looks up the rows by
/// primary key whatever their count is guessed to be.
pub async fn claim_kinds<'e>(
    executor: impl PgExecutor<'e>,
    kinds: &[KindClaim],
    limit: usize,
    worker_id: &str,
    lease: Duration,
) -> Result<Vec<ClaimedTask>, QueueError> {
    let kinds: Vec<&KindClaim> = kinds.iter().filter(|kind| kind.room > 0).collect();
    if limit == 0 || kinds.is_empty() {
        return Ok(Vec::new());
    }
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let names: Vec<&str> = kinds.iter().map(|kind| kind.kind.as_str()).collect();
    let rooms: Vec<i64> = kinds.iter().map(|kind| count(kind.room)).collect();
    let reserved: Vec<i64> = kinds.iter().map(|kind| count(kind.reserved)).collect();
    if kinds.iter().all(|kind| kind.owner_cap.is_none()) {
        return sqlx::query_as(CLAIM_UNCAPPED_SQL)
            .bind(&names)
            .bind(&rooms)
            .bind(&reserved)
            .bind(count(limit))
            .bind(worker_id)
            .bind(micros(lease))
            .fetch_all(executor)
            .await
            .map_err(QueueError::db("claim"));
    }
    let caps: Vec<Option<i32>> = kinds.iter().map(|kind| kind.owner_cap).collect();
    sqlx::query_as(CLAIM_SQL)
        .bind(&names)
        .bind(&rooms)
        .bind(&reserved)
        .bind(&caps)
        .bind(count(limit))
        .bind(worker_id)
        .bind(micros(lease))
        .fetch_all(executor)
        .await
        .map_err(QueueError::db("claim"))
}

/// Extends the leases still held to `lease` from now; returns the ids whose lease is still
/// held. A missing id means the lease was taken over and its handler should stop. Finds the
/// tasks the way [`finish`] does, for the same reason.
pub async fn heartbeat<'e>(
    executor: impl PgExecutor<'e>,
    leases: &[Lease],
    lease: Duration,
) -> Result<Vec<i64>, QueueError> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, tokens) = split_leases(leases);
    sqlx::query_scalar(
        "UPDATE tasks t
         SET lease_expires_at = now() + $3 * interval '1 microsecond'
         FROM unnest($1::bigint[], $2::uuid[]) AS l(id, token)
         WHERE t.id = l.id AND t.lock_token = l.token AND (t.state = 'running') IS TRUE
         RETURNING t.id",
    )
    .bind(&ids)
    .bind(&tokens)
    .bind(micros(lease))
    .fetch_all(executor)
    .await
    .map_err(QueueError::db("heartbeat"))
}

/// Which transitions of a [`finish`] batch were applied and which were refused because the
/// lease was no longer held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinishOutcome {
    pub applied: Vec<i64>,
    pub refused: Vec<i64>,
}

impl FinishOutcome {
    fn merge(&mut self, other: FinishOutcome) {
        self.applied.extend(other.applied);
        self.refused.extend(other.refused);
    }
}

/// Applies transitions to held tasks, each fenced by its lease: a transition whose lease was
/// taken over changes nothing and is reported as refused. Runs one statement; when Postgres
/// refuses the data of the batch (an error text it cannot store, say), the batch is split so
/// that only the bad transition is affected, and that one is stored with a safe error text
/// (see [`refused_data`]). It never loops: each split halves the batch.
///
/// Inside a caller's transaction each try runs under a savepoint, so a refused try leaves the
/// transaction usable.
pub async fn finish<'c, A>(
    conn: A,
    items: &[(Lease, Transition)],
) -> Result<FinishOutcome, QueueError>
where
    A: Acquire<'c, Database = Postgres>,
{
    if items.is_empty() {
        return Ok(FinishOutcome::default());
    }
    let mut conn = conn
        .acquire()
        .await
        .map_err(QueueError::db("recording task results"))?;
    finish_on(&mut conn, items).await
}

/// [`finish`] on a connection or transaction the caller holds. Its concrete signature keeps
/// the futures of its callers `Send`.
pub async fn finish_on(
    conn: &mut sqlx::PgConnection,
    items: &[(Lease, Transition)],
) -> Result<FinishOutcome, QueueError> {
    let mut outcome = FinishOutcome::default();
    // Slices still to apply; a refused one comes back as its two halves.
    let mut todo: Vec<&[(Lease, Transition)]> = vec![items];
    while let Some(part) = todo.pop() {
        match try_finish(conn, part).await {
            Ok(done) => outcome.merge(done),
            Err(error) if refused_data(&error).is_some() && part.len() > 1 => {
                let (first, second) = part.split_at(part.len() / 2);
                tracing::warn!(%error, tasks = part.len(), "Postgres refused a batch of task results; splitting it");
                todo.push(second);
                todo.push(first);
            }
            Err(error) => match refused_data(&error) {
                Some(code) => {
                    let done = finish_with_safe_error(conn, &part[0], code, error).await?;
                    outcome.merge(done);
                }
                None => return Err(error),
            },
        }
    }
    Ok(outcome)
}

/// One try of [`finish_statement`], under a savepoint when a transaction is open.
async fn try_finish(
    conn: &mut sqlx::PgConnection,
    items: &[(Lease, Transition)],
) -> Result<FinishOutcome, QueueError> {
    use sqlx::Connection;
    if !conn.is_in_transaction() {
        return finish_statement(&mut *conn, items).await;
    }
    let mut savepoint = sqlx::Connection::begin(&mut *conn)
        .await
        .map_err(QueueError::db("recording task results"))?;
    let result = finish_statement(&mut *savepoint, items).await;
    if result.is_ok() {
        savepoint
            .commit()
            .await
            .map_err(QueueError::db("recording task results"))?;
    }
    // Dropped without a commit, the savepoint is rolled back.
    result
}

/// A single transition whose data Postgres refused: stored again with an error text that
/// cannot be refused (ASCII, short), so the task still ends as it should and people see why.
async fn finish_with_safe_error(
    conn: &mut sqlx::PgConnection,
    item: &(Lease, Transition),
    code: String,
    refusal: QueueError,
) -> Result<FinishOutcome, QueueError> {
    let (lease, transition) = item;
    let safe = format!(
        "the task's error text could not be stored (Postgres refused it with SQLSTATE {code})"
    );
    let replaced = match transition {
        Transition::Retry { delay, .. } => Transition::Retry {
            delay: *delay,
            error: safe,
        },
        Transition::Dead { .. } => Transition::Dead { error: safe },
        // Nothing of these comes from outside: the refusal has another cause.
        Transition::Succeed | Transition::Snooze { .. } | Transition::Release => {
            return Err(refusal);
        }
    };
    tracing::warn!(task = lease.id, %refusal, "Postgres refused a task result; storing it with a safe error text");
    try_finish(conn, &[(*lease, replaced)]).await
}

/// The SQLSTATE of an error that says Postgres refused the data itself (class 22, data
/// exception: a NUL or a bad byte sequence in text, a value out of range; class 54, program
/// limit exceeded: a value too large), as opposed to the connection or the statement.
fn refused_data(error: &QueueError) -> Option<String> {
    let QueueError::Database {
        source: sqlx::Error::Database(db),
        ..
    } = error
    else {
        return None;
    };
    let code = db.code()?;
    (code.starts_with("22") || code.starts_with("54")).then(|| code.into_owned())
}

/// [`finish`]'s statement: all of `items` at once.
///
/// The statement must run as a loop over the input that finds each task by primary key. The
/// state test is written `(t.state = 'running') IS TRUE` so the planner cannot match it to the
/// predicate of the running-lease partial index: with a plain `t.state = 'running'` the cached
/// generic plan scanned that index (statistics say few tasks run) and re-read the whole unnest
/// input for every running task, which is quadratic in the batch (500 results took 215 ms
/// instead of 3 ms).
async fn finish_statement<'e>(
    executor: impl PgExecutor<'e>,
    items: &[(Lease, Transition)],
) -> Result<FinishOutcome, QueueError> {
    if items.is_empty() {
        return Ok(FinishOutcome::default());
    }
    let n = items.len();
    let mut ids = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n);
    let mut counted = Vec::with_capacity(n);
    let mut delays: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut errors: Vec<Option<&str>> = Vec::with_capacity(n);
    for (lease, transition) in items {
        ids.push(lease.id);
        tokens.push(lease.token);
        states.push(transition.state().as_str());
        counted.push(i32::from(transition.counts_attempt()));
        delays.push(transition.delay().map(micros));
        errors.push(transition.error());
    }
    let applied: Vec<i64> = sqlx::query_scalar(
        // Each slot a capped task gives back releases the owner's first waiting task (see
        // the claim's `waiting`).
        //
        // A success of a task asked to rerun puts it back to pending, due now, as a fresh
        // run: the failures before the success say nothing about it (a long-lived task that
        // reruns for hours would otherwise collect every passing failure, and wait ever longer
        // after the next one).
        "WITH finished AS (
         UPDATE tasks t
         SET state = CASE WHEN i.state = 'succeeded' AND t.rerun_requested THEN 'pending'
                          ELSE i.state END,
             attempts = CASE WHEN i.state = 'succeeded' AND t.rerun_requested THEN 0
                             ELSE t.attempts + i.counted END,
             run_at = CASE WHEN i.state = 'succeeded' AND t.rerun_requested THEN now()
                           WHEN i.delay IS NULL THEN t.run_at
                           ELSE now() + i.delay * interval '1 microsecond' END,
             last_error = COALESCE(i.error, t.last_error),
             lock_token = NULL,
             lease_expires_at = NULL,
             finished_at = CASE WHEN i.state = 'dead'
                                  OR (i.state = 'succeeded' AND NOT t.rerun_requested) THEN now() END,
             -- A retry or a rerun is due at its own time: its old place in the fair order
             -- would put a not-yet-due task among the due ones the claim walks through.
             fair_delay_us = CASE WHEN (i.state = 'succeeded' AND t.rerun_requested)
                                       OR i.delay IS NOT NULL THEN 0
                                  ELSE t.fair_delay_us END,
             rerun_requested = false,
             updated_at = now()
         FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::int[], $5::bigint[], $6::text[])
              AS i(id, token, state, counted, delay, error)
         WHERE t.id = i.id AND t.lock_token = i.token AND (t.state = 'running') IS TRUE
         RETURNING t.id, t.owner_uid, t.kind, t.owner_slot
         ), freed AS (
             SELECT owner_uid, kind, count(*) AS slots FROM finished
             WHERE owner_slot IS NOT NULL AND owner_uid IS NOT NULL
             GROUP BY owner_uid, kind
         ), released AS (
             UPDATE tasks w SET waiting_cap = NULL, updated_at = now()
             FROM freed f CROSS JOIN LATERAL (
                 SELECT id FROM tasks n
                 WHERE n.owner_uid = f.owner_uid AND n.kind = f.kind AND n.state = 'pending'
                   AND n.waiting_cap IS NOT NULL
                 ORDER BY n.fair_at, n.id
                 LIMIT f.slots
                 FOR UPDATE SKIP LOCKED
             ) r
             WHERE w.id = r.id
         )
         SELECT id FROM finished",
    )
    .bind(&ids)
    .bind(&tokens)
    .bind(&states)
    .bind(&counted)
    .bind(&delays)
    .bind(&errors)
    .fetch_all(executor)
    .await
    .map_err(QueueError::db("recording task results"))?;
    let applied_set: HashSet<i64> = applied.iter().copied().collect();
    let refused = ids
        .into_iter()
        .filter(|id| !applied_set.contains(id))
        .collect();
    Ok(FinishOutcome { applied, refused })
}

/// Applies one transition; [`QueueError::LeaseLost`] when the lease is no longer held.
async fn finish_one<'c, A>(conn: A, lease: Lease, transition: Transition) -> Result<(), QueueError>
where
    A: Acquire<'c, Database = Postgres>,
{
    let outcome = finish(conn, &[(lease, transition)]).await?;
    if outcome.applied.contains(&lease.id) {
        Ok(())
    } else {
        Err(QueueError::LeaseLost { id: lease.id })
    }
}

/// Marks a held task succeeded.
pub async fn complete<'c, A>(conn: A, lease: Lease) -> Result<(), QueueError>
where
    A: Acquire<'c, Database = Postgres>,
{
    finish_one(conn, lease, Transition::Succeed).await
}

/// Records a failed attempt of a held task: back to pending with backoff while attempts
/// remain, else dead. The error is kept either way. Returns the transition applied.
pub async fn fail<'c, A>(
    conn: A,
    task: &ClaimedTask,
    error: impl Into<String>,
    policy: &RetryPolicy,
) -> Result<Transition, QueueError>
where
    A: Acquire<'c, Database = Postgres>,
{
    let transition = transition::after_failure(
        error.into(),
        task.attempts,
        task.max_attempts,
        policy,
        rand::random::<f64>(),
    );
    finish_one(conn, task.lease(), transition.clone()).await?;
    Ok(transition)
}

/// Puts a held task back to pending until `after` from now without counting an attempt
/// (Graph asked to retry after a while).
pub async fn snooze<'c, A>(conn: A, lease: Lease, after: Duration) -> Result<(), QueueError>
where
    A: Acquire<'c, Database = Postgres>,
{
    finish_one(conn, lease, Transition::Snooze { delay: after }).await
}

/// Hands held tasks back unfinished (graceful shutdown): pending at their old place in line,
/// no attempt counted.
pub async fn release<'c, A>(conn: A, leases: &[Lease]) -> Result<FinishOutcome, QueueError>
where
    A: Acquire<'c, Database = Postgres>,
{
    let items: Vec<(Lease, Transition)> = leases
        .iter()
        .map(|lease| (*lease, Transition::Release))
        .collect();
    finish(conn, &items).await
}

/// What one [`rescue`] round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RescueReport {
    /// Back to pending, an attempt counted.
    pub requeued: Vec<i64>,
    /// Out of attempts: dead.
    pub dead: Vec<i64>,
}

impl RescueReport {
    pub fn total(&self) -> usize {
        self.requeued.len() + self.dead.len()
    }
}

/// A running task whose lease ran out, as [`rescue`] reads it.
#[derive(sqlx::FromRow)]
struct ExpiredLease {
    id: i64,
    lock_token: Uuid,
    attempts: i32,
    max_attempts: i32,
    locked_by: Option<String>,
    lease_expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl ExpiredLease {
    fn lease(&self) -> Lease {
        Lease {
            id: self.id,
            token: self.lock_token,
        }
    }

    /// A lost lease is a failed attempt, decided as a handler failure is.
    fn transition(&self, policy: &RetryPolicy) -> Transition {
        let error = format!(
            "the lease of worker {} expired at {} (worker stopped or lost its database)",
            self.locked_by.as_deref().unwrap_or("?"),
            self.lease_expires_at
                .map(|at| at.to_rfc3339())
                .unwrap_or_default()
        );
        transition::after_failure(
            error,
            self.attempts,
            self.max_attempts,
            policy,
            rand::random::<f64>(),
        )
    }
}

/// Takes back up to `limit` running tasks whose lease ran out (their worker died or lost its
/// database). Each counts as a failed attempt and goes the way a handler failure goes (the
/// same pure rule, [`transition::after_failure`]): pending after a backoff of `policy` while
/// attempts remain, else dead, so a task that kills its worker every time ends dead. Safe to
/// run from several replicas at once: each expired task is taken by one of them.
pub async fn rescue<'c, A>(
    conn: A,
    limit: i64,
    policy: &RetryPolicy,
) -> Result<RescueReport, QueueError>
where
    A: Acquire<'c, Database = Postgres>,
{
    let mut tx = conn
        .begin()
        .await
        .map_err(QueueError::db("rescue of expired leases"))?;
    let expired: Vec<ExpiredLease> = sqlx::query_as(
        "SELECT id, lock_token, attempts, max_attempts, locked_by, lease_expires_at
             FROM tasks
             WHERE state = 'running' AND lease_expires_at < now()
             ORDER BY lease_expires_at
             LIMIT $1
             FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await
    .map_err(QueueError::db("rescue of expired leases"))?;
    let items: Vec<(Lease, Transition)> = expired
        .into_iter()
        .map(|expired| (expired.lease(), expired.transition(policy)))
        .collect();
    let outcome = finish_on(&mut tx, &items).await?;
    tx.commit()
        .await
        .map_err(QueueError::db("rescue of expired leases"))?;
    let mut report = RescueReport::default();
    for (lease, transition) in &items {
        if !outcome.applied.contains(&lease.id) {
            continue;
        }
        if transition.state() == TaskState::Dead {
            report.dead.push(lease.id);
        } else {
            report.requeued.push(lease.id);
        }
    }
    Ok(report)
}

/// Releases the waiting tasks (see [`claim_kinds`]) of owners with free slots: up to the cap
/// they waited for, less the owner's running tasks. A finish releases one waiting task per slot
/// it frees, but a task that began to wait while its owner's last running task finished (two
/// statements at once, neither seeing the other) would otherwise wait for good. Walks the
/// owners with waiting tasks through their index, one probe each. Returns how many were
/// released.
pub async fn release_waiting<'e>(executor: impl PgExecutor<'e>) -> Result<u64, QueueError> {
    let released = sqlx::query(
        "WITH RECURSIVE owners AS (
             (SELECT owner_uid, kind FROM tasks
              WHERE state = 'pending' AND waiting_cap IS NOT NULL
              ORDER BY owner_uid, kind LIMIT 1)
             UNION ALL
             SELECT next.owner_uid, next.kind FROM owners o CROSS JOIN LATERAL (
                 SELECT t.owner_uid, t.kind FROM tasks t
                 WHERE t.state = 'pending' AND t.waiting_cap IS NOT NULL
                   AND (t.owner_uid, t.kind) > (o.owner_uid, o.kind)
                 ORDER BY t.owner_uid, t.kind LIMIT 1) next
         ), room AS (
             SELECT o.owner_uid, o.kind,
                    (SELECT w.waiting_cap FROM tasks w
                     WHERE w.owner_uid = o.owner_uid AND w.kind = o.kind AND w.state = 'pending'
                       AND w.waiting_cap IS NOT NULL
                     ORDER BY w.fair_at, w.id LIMIT 1)
                    - (SELECT count(*) FROM tasks r
                       WHERE r.owner_uid = o.owner_uid AND r.kind = o.kind AND r.state = 'running'
                         AND r.owner_slot IS NOT NULL) AS free
             FROM owners o
         )
         UPDATE tasks t SET waiting_cap = NULL, updated_at = now()
         FROM room CROSS JOIN LATERAL (
             SELECT w.id FROM tasks w
             WHERE w.owner_uid = room.owner_uid AND w.kind = room.kind AND w.state = 'pending'
               AND w.waiting_cap IS NOT NULL
             ORDER BY w.fair_at, w.id
             LIMIT GREATEST(room.free, 0)
             FOR UPDATE SKIP LOCKED
         ) r
         WHERE t.id = r.id",
    )
    .execute(executor)
    .await
    .map_err(QueueError::db("releasing tasks waiting for a slot"))?;
    Ok(released.rows_affected())
}

/// What one [`prune`] round deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub deleted: u64,
}

/// Deletes up to `limit` succeeded or cancelled tasks that finished more than `older_than`
/// ago, oldest first. Dead tasks are kept for people to look at. Small batches keep each
/// transaction short; call again while a round deletes `limit` rows.
pub async fn prune<'e>(
    executor: impl PgExecutor<'e>,
    older_than: Duration,
    limit: i64,
) -> Result<PruneReport, QueueError> {
    let result = sqlx::query(
        "DELETE FROM tasks WHERE id IN (
             SELECT id FROM tasks
             WHERE state IN ('succeeded', 'cancelled')
               AND finished_at < now() - $1 * interval '1 microsecond'
             ORDER BY finished_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         )",
    )
    .bind(micros(older_than))
    .bind(limit)
    .execute(executor)
    .await
    .map_err(QueueError::db("pruning finished tasks"))?;
    Ok(PruneReport {
        deleted: result.rows_affected(),
    })
}

/// Deletes up to `limit` dead tasks that died more than `older_than` ago, oldest first. Dead
/// tasks wait for people (`tasks list --state dead`, `tasks retry`) for their own period,
/// longer than finished tasks'. Returns what was deleted.
pub async fn prune_dead<'e>(
    executor: impl PgExecutor<'e>,
    older_than: Duration,
    limit: i64,
) -> Result<PruneReport, QueueError> {
    let result = sqlx::query(
        "WITH due AS MATERIALIZED (
             SELECT id FROM tasks
             WHERE state = 'dead' AND finished_at < now() - $1 * interval '1 microsecond'
             ORDER BY finished_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         )
         DELETE FROM tasks WHERE id IN (SELECT id FROM due)",
    )
    .bind(micros(older_than))
    .bind(limit)
    .execute(executor)
    .await
    .map_err(QueueError::db("pruning dead tasks"))?;
    Ok(PruneReport {
        deleted: result.rows_affected(),
    })
}

/// Cancels the pending and running tasks of an owner (its MailboxPoll was deleted); a running
/// task's worker loses its lease. Returns how many were cancelled.
pub async fn cancel_owner<'e>(
    executor: impl PgExecutor<'e>,
    owner_uid: Uuid,
) -> Result<u64, QueueError> {
    let result = sqlx::query(
        "UPDATE tasks
         SET state = 'cancelled', lock_token = NULL, lease_expires_at = NULL,
             finished_at = now(), updated_at = now()
         WHERE owner_uid = $1 AND state IN ('pending', 'running')",
    )
    .bind(owner_uid)
    .execute(executor)
    .await
    .map_err(QueueError::db("cancelling an owner's tasks"))?;
    Ok(result.rows_affected())
}

/// Moves the pending task with `dedupe_key` forward to `run_at` when it is due later (a forced
/// poll, or a shorter interval). A running task is left alone. Returns whether a task moved;
/// idle workers are woken when it became due.
pub async fn pull_forward<'e>(
    executor: impl PgExecutor<'e>,
    dedupe_key: &str,
    run_at: chrono::DateTime<chrono::Utc>,
) -> Result<bool, QueueError> {
    let moved: Option<i64> = sqlx::query_scalar(
        "WITH moved AS (
             UPDATE tasks SET run_at = $2, updated_at = now()
             WHERE dedupe_key = $1 AND state = 'pending' AND run_at > $2
             RETURNING id, run_at
         ), wake AS (
             SELECT pg_notify('mailpoll_tasks', '') FROM moved WHERE run_at <= now() LIMIT 1
         )
         SELECT id FROM moved WHERE (SELECT count(*) FROM wake) >= 0",
    )
    .bind(dedupe_key)
    .bind(run_at)
    .fetch_optional(executor)
    .await
    .map_err(QueueError::db("pulling a task forward"))?;
    Ok(moved.is_some())
}

/// Cancels the pending task with `dedupe_key` (a suspended schedule); a running task is left
/// to finish. Returns whether a task was cancelled.
pub async fn cancel_pending<'e>(
    executor: impl PgExecutor<'e>,
    dedupe_key: &str,
) -> Result<bool, QueueError> {
    let result = sqlx::query(
        "UPDATE tasks
         SET state = 'cancelled', finished_at = now(), updated_at = now()
         WHERE dedupe_key = $1 AND state = 'pending'",
    )
    .bind(dedupe_key)
    .execute(executor)
    .await
    .map_err(QueueError::db("cancelling a pending task"))?;
    Ok(result.rows_affected() > 0)
}

/// The live (pending or running) task holding `dedupe_key`, if any.
pub async fn live_task<'e>(
    executor: impl PgExecutor<'e>,
    dedupe_key: &str,
) -> Result<Option<LiveTask>, QueueError> {
    let row: Option<(String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT state, run_at FROM tasks WHERE dedupe_key = $1 AND state IN ('pending', 'running')",
    )
    .bind(dedupe_key)
    .fetch_optional(executor)
    .await
    .map_err(QueueError::db("reading a live task"))?;
    Ok(row.and_then(|(state, run_at)| {
        let state = state.parse().ok()?;
        Some(LiveTask { state, run_at })
    }))
}

/// Owners of live tasks created more than `min_age` ago (candidates of the sweep of deleted
/// MailboxPolls).
pub async fn live_owners_older_than<'e>(
    executor: impl PgExecutor<'e>,
    min_age: Duration,
) -> Result<Vec<Uuid>, QueueError> {
    sqlx::query_scalar(
        "SELECT DISTINCT owner_uid FROM tasks
         WHERE owner_uid IS NOT NULL AND state IN ('pending', 'running')
           AND created_at < now() - $1 * interval '1 microsecond'",
    )
    .bind(micros(min_age))
    .fetch_all(executor)
    .await
    .map_err(QueueError::db("listing owners of live tasks"))
}

/// The arguments and last error of every dead task of kind `A` (payloads that do not parse
/// are left out: nothing can be done with them).
pub async fn dead_tasks<'e, A: TaskArgs>(
    executor: impl PgExecutor<'e>,
) -> Result<Vec<(A, Option<String>)>, QueueError> {
    let rows: Vec<(serde_json::Value, Option<String>)> =
        sqlx::query_as("SELECT payload, last_error FROM tasks WHERE kind = $1 AND state = 'dead'")
            .bind(A::KIND)
            .fetch_all(executor)
            .await
            .map_err(QueueError::db("listing dead tasks"))?;
    Ok(rows
        .into_iter()
        .filter_map(|(payload, error)| Some((serde_json::from_value(payload).ok()?, error)))
        .collect())
}

/// Which tasks [`list`] shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFilter {
    pub state: Option<TaskState>,
    pub kind: Option<String>,
    /// Only tasks of these owners (MailboxPoll uids).
    pub owners: Option<Vec<Uuid>>,
    pub limit: i64,
}

impl Default for TaskFilter {
    fn default() -> Self {
        Self {
            state: None,
            kind: None,
            owners: None,
            limit: 50,
        }
    }
}

/// Tasks matching the filter, newest first.
pub async fn list<'e>(
    executor: impl PgExecutor<'e>,
    filter: &TaskFilter,
) -> Result<Vec<TaskRow>, QueueError> {
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM tasks
         WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR kind = $2)
           AND ($4::uuid[] IS NULL OR owner_uid = ANY($4))
         ORDER BY id DESC
         LIMIT $3"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(filter.state.map(TaskState::as_str))
        .bind(filter.kind.as_deref())
        .bind(filter.limit)
        .bind(filter.owners.as_deref())
        .fetch_all(executor)
        .await
        .map_err(QueueError::db("listing tasks"))
}

/// Which tasks a bulk [`retry_dead_matching`] or [`cancel_matching`] touches; every field
/// that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskSelection {
    pub ids: Option<Vec<i64>>,
    pub kind: Option<String>,
    pub owners: Option<Vec<Uuid>>,
}

/// What a bulk retry did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetryReport {
    /// Dead tasks now pending again, attempts reset.
    pub revived: Vec<i64>,
    /// Dead tasks cancelled instead: another task with the same dedupe key is live (or was
    /// revived by this call), and one live task per key is the rule.
    pub superseded: Vec<i64>,
}

/// Brings every selected dead task back to pending with a full set of attempts. Tasks in
/// other states are left alone. Of several selected dead tasks sharing a dedupe key (a
/// mailbox's after-actions, say) the newest is revived and the others cancelled, as is one
/// whose key a live task already holds: one live task per key.
pub async fn retry_dead_matching<'c, A>(
    conn: A,
    selection: &TaskSelection,
) -> Result<RetryReport, QueueError>
where
    A: Acquire<'c, Database = Postgres>,
{
    let mut tx = conn.begin().await.map_err(QueueError::db("bulk retry"))?;
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "WITH selected AS (
             SELECT id, dedupe_key FROM tasks
             WHERE state = 'dead'
               AND ($1::bigint[] IS NULL OR id = ANY($1))
               AND ($2::text IS NULL OR kind = $2)
               AND ($3::uuid[] IS NULL OR owner_uid = ANY($3))
             FOR UPDATE
         ), revivable AS (
             SELECT id FROM selected WHERE dedupe_key IS NULL
             UNION ALL
             SELECT * FROM (
                 SELECT DISTINCT ON (s.dedupe_key) s.id FROM selected s
                 WHERE s.dedupe_key IS NOT NULL AND NOT EXISTS (
                     SELECT 1 FROM tasks live
                     WHERE live.dedupe_key = s.dedupe_key AND live.state IN ('pending', 'running'))
                 ORDER BY s.dedupe_key, s.id DESC
             ) newest
         )
         UPDATE tasks t
         SET state = CASE WHEN t.id IN (SELECT id FROM revivable) THEN 'pending' ELSE 'cancelled' END,
             attempts = CASE WHEN t.id IN (SELECT id FROM revivable) THEN 0 ELSE t.attempts END,
             run_at = now(),
             finished_at = CASE WHEN t.id IN (SELECT id FROM revivable) THEN NULL ELSE now() END,
             lock_token = NULL, lease_expires_at = NULL, updated_at = now()
         FROM selected
         WHERE t.id = selected.id
         RETURNING t.id, t.state",
    )
    .bind(selection.ids.as_deref())
    .bind(selection.kind.as_deref())
    .bind(selection.owners.as_deref())
    .fetch_all(&mut *tx)
    .await
    .map_err(QueueError::db("bulk retry"))?;
    let mut report = RetryReport::default();
    for (id, state) in rows {
        if state == TaskState::Pending.as_str() {
            report.revived.push(id);
        } else {
            report.superseded.push(id);
        }
    }
    report.revived.sort_unstable();
    report.superseded.sort_unstable();
    if !report.revived.is_empty() {
        sqlx::query("SELECT pg_notify('mailpoll_tasks', '')")
            .execute(&mut *tx)
            .await
            .map_err(QueueError::db("bulk retry (waking workers)"))?;
    }
    tx.commit().await.map_err(QueueError::db("bulk retry"))?;
    Ok(report)
}

/// Cancels every selected pending or dead task (a person gives up on it); returns their
/// ids. A running task is left to finish: its worker holds it.
pub async fn cancel_matching<'e>(
    executor: impl PgExecutor<'e>,
    selection: &TaskSelection,
) -> Result<Vec<i64>, QueueError> {
    sqlx::query_scalar(
        "UPDATE tasks
         SET state = 'cancelled', lock_token = NULL, lease_expires_at = NULL,
             finished_at = now(), updated_at = now()
         WHERE state IN ('pending', 'dead')
           AND ($1::bigint[] IS NULL OR id = ANY($1))
           AND ($2::text IS NULL OR kind = $2)
           AND ($3::uuid[] IS NULL OR owner_uid = ANY($3))
         RETURNING id",
    )
    .bind(selection.ids.as_deref())
    .bind(selection.kind.as_deref())
    .bind(selection.owners.as_deref())
    .fetch_all(executor)
    .await
    .map_err(QueueError::db("cancelling tasks"))
}

/// One task by id.
pub async fn get<'e>(
    executor: impl PgExecutor<'e>,
    id: i64,
) -> Result<Option<TaskRow>, QueueError> {
    let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(executor)
        .await
        .map_err(QueueError::db("reading a task"))
}

/// Queue depth by state and kind (live and dead tasks; finished history is not counted) and
/// how long the oldest due task of each kind has waited.
pub async fn depth<'e>(executor: impl PgExecutor<'e>) -> Result<QueueDepth, QueueError> {
    let rows = sqlx::query(
        "SELECT state, kind, count(*) AS tasks,
                EXTRACT(EPOCH FROM now() - min(run_at) FILTER (WHERE run_at <= now()))::float8
                    AS oldest_due_seconds
         FROM tasks
         WHERE state IN ('pending', 'running', 'dead')
         GROUP BY state, kind
         ORDER BY state, kind",
    )
    .fetch_all(executor)
    .await
    .map_err(QueueError::db("reading queue depth"))?;
    let mut depth = QueueDepth::default();
    for row in rows {
        let read = || -> Result<DepthRow, sqlx::Error> {
            let state: String = row.try_get("state")?;
            let state = state
                .parse()
                .map_err(|e: String| sqlx::Error::Decode(e.into()))?;
            let oldest: Option<f64> = row.try_get("oldest_due_seconds")?;
            Ok(DepthRow {
                state,
                kind: row.try_get("kind")?,
                tasks: row.try_get("tasks")?,
                oldest_due_age: (state == TaskState::Pending)
                    .then_some(oldest)
                    .flatten()
                    .map(|s| Duration::from_secs_f64(s.max(0.0))),
            })
        };
        depth
            .rows
            .push(read().map_err(QueueError::db("reading queue depth"))?);
    }
    Ok(depth)
}

fn split_leases(leases: &[Lease]) -> (Vec<i64>, Vec<Uuid>) {
    leases.iter().map(|lease| (lease.id, lease.token)).unzip()
}
