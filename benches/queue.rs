//! Task queue benchmark: enqueue throughput, end-to-end throughput of no-op tasks at several
//! concurrencies, and pickup latency on an idle queue. Prints the server's settings, then a
//! Markdown table; fails if any run leaves a task in another state than the one it should.
//!
//!   cargo bench --bench queue
//!
//! Uses the Postgres of `DATABASE_URL` when set (a fresh database per measurement), else starts
//! a private throwaway server. `MAILPOLL_BENCH_TASKS` sets the tasks per end-to-end run
//! (default 50,000). For investigations: `MAILPOLL_BENCH_ONLY=16` runs only the end-to-end
//! measurement at that concurrency (and the baseline beside it), `MAILPOLL_BENCH_TRACE=1` prints
//! the pool's counters while it drains, and `MAILPOLL_LOG=sqlx=debug` logs every statement with
//! its duration.
//!
//! Beside the worker pool, a raw-SQL baseline drains the same tasks on the same server at the
//! same concurrency: each loop claims 100 with `FOR UPDATE SKIP LOCKED` and completes them, with
//! nothing else (no leases kept, no handlers, no fairness). The ratio says what the pool costs.
//!
//! `MAILPOLL_BENCH_DURABLE=1` sets `synchronous_commit = on` on every benchmark database (as
//! production runs; `ALTER DATABASE ... SET`, so no session option is needed). A commit then
//! waits for its WAL flush, which costs a disk sync only when the server runs with fsync on:
//! the settings printed first say which.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailpoll::queue::{
    self, ClaimedTask, NewTask, QueueCounters, TaskContext, WorkerId, WorkerPool, WorkerPoolConfig,
    handler_fn,
};
use mailpoll_testkit::bench::BenchPostgres;
use mailpoll_testkit::pg::TestDatabase;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::mpsc;

// The operator binary's allocator, so the figures are the shipped code's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Bench {
    server: BenchPostgres,
    /// `synchronous_commit = on` for the benchmark's databases.
    durable: bool,
}

impl Bench {
    /// A fresh migrated database and a pool like an operator replica's.
    async fn database(&self, connections: u32) -> BenchResult<(TestDatabase, PgPool)> {
        let db = TestDatabase::create_on(self.server.admin_url()).await?;
        mailpoll::db::migrate(&db.pool).await?;
        if self.durable {
            // Per database, so the pool below needs no session option; its connections are
            // opened after this.
            let name: String = sqlx::query_scalar("SELECT current_database()")
                .fetch_one(&db.pool)
                .await?;
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE \"{name}\" SET synchronous_commit = on"
            )))
            .execute(&db.pool)
            .await?;
        }
        let pool = mailpoll::db::connect(
            &db.url,
            &mailpoll::db::PoolConfig {
                max_connections: connections,
                ..mailpoll::db::PoolConfig::default()
            },
        )
        .await?;
        Ok((db, pool))
    }
}

/// Fails unless the tasks table holds exactly `expected` tasks, every one in `state`: a run
/// that lost, duplicated or failed tasks has not measured what its figure claims.
async fn expect_all_in_state(
    pool: &PgPool,
    state: &str,
    expected: usize,
    run: &str,
) -> BenchResult<()> {
    let found: BTreeMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT state, count(*) FROM tasks GROUP BY state")
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    let wanted = BTreeMap::from([(state.to_owned(), expected as i64)]);
    if found != wanted {
        let held: Vec<String> = found.iter().map(|(s, n)| format!("{n} {s}")).collect();
        let held = if held.is_empty() {
            "no task".to_owned()
        } else {
            held.join(", ")
        };
        return Err(format!(
            "{run}: expected {expected} tasks, all {state}; the tasks table holds {held}"
        )
        .into());
    }
    Ok(())
}

fn config(concurrency: usize) -> WorkerPoolConfig {
    WorkerPoolConfig {
        worker_id: WorkerId::named("bench"),
        concurrency,
        ..WorkerPoolConfig::default()
    }
}

fn noop_task(n: usize) -> NewTask {
    NewTask::new("noop", json!({ "n": n }))
}

async fn enqueue_single(bench: &Bench, clients: usize, total: usize) -> BenchResult<f64> {
    let (db, pool) = bench.database(clients as u32).await?;
    let started = Instant::now();
    let mut joins = Vec::new();
    for client in 0..clients {
        let pool = pool.clone();
        joins.push(tokio::spawn(async move {
            for n in (client..total).step_by(clients) {
                queue::enqueue(&pool, &noop_task(n)).await?;
            }
            Ok::<_, queue::QueueError>(())
        }));
    }
    for join in joins {
        join.await??;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    expect_all_in_state(&db.pool, "pending", total, "enqueue").await?;
    Ok(rate)
}

async fn enqueue_batches(bench: &Bench, batch: usize, total: usize) -> BenchResult<f64> {
    let (db, pool) = bench.database(2).await?;
    let started = Instant::now();
    for chunk in (0..total).collect::<Vec<_>>().chunks(batch) {
        let tasks: Vec<NewTask> = chunk.iter().map(|n| noop_task(*n)).collect();
        queue::enqueue_many(&pool, &tasks).await?;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    expect_all_in_state(&db.pool, "pending", total, "enqueue_many").await?;
    Ok(rate)
}

/// Drains `total` preloaded no-op tasks with one pool; tasks per second from the pool's start
/// until the last result is recorded, then checks that every task succeeded.
///
/// Only the drain is timed: the preload and the database's creation come before the clock.
/// No `VACUUM` runs in between: an operator drains a burst that was just enqueued, with the
/// statistics `enqueue_many` refreshes after a burst, not a vacuumed table whose hint bits
/// and visibility map are already set; vacuuming first would move that work out of the clock.
async fn end_to_end(bench: &Bench, concurrency: usize, total: usize) -> BenchResult<f64> {
    let (db, pool) = bench.database(8).await?;
    for chunk in (0..total).collect::<Vec<_>>().chunks(5_000) {
        let tasks: Vec<NewTask> = chunk.iter().map(|n| noop_task(*n)).collect();
        queue::enqueue_many(&db.pool, &tasks).await?;
    }
    let started = Instant::now();
    let workers = WorkerPool::new(pool, config(concurrency))
        .register(
            "noop",
            handler_fn(|_task: ClaimedTask, _ctx: TaskContext| async { Ok(()) }),
        )
        .start()?;
    wait_until_drained(&workers.counters(), total, started).await;
    let elapsed = started.elapsed();
    workers.shutdown().await;
    let run = format!("end to end, concurrency {concurrency}");
    expect_all_in_state(&db.pool, "succeeded", total, &run).await?;
    Ok(total as f64 / elapsed.as_secs_f64())
}

/// The raw-SQL baseline: `concurrency` loops, each claiming 100 due tasks with `FOR UPDATE
/// SKIP LOCKED` and completing them, until the queue is empty; tasks per second.
async fn raw_sql_baseline(bench: &Bench, concurrency: usize, total: usize) -> BenchResult<f64> {
    let (db, pool) = bench.database(concurrency as u32).await?;
    for chunk in (0..total).collect::<Vec<_>>().chunks(5_000) {
        let tasks: Vec<NewTask> = chunk.iter().map(|n| noop_task(*n)).collect();
        queue::enqueue_many(&db.pool, &tasks).await?;
    }
    let started = Instant::now();
    let mut joins = Vec::new();
    for _ in 0..concurrency {
        let pool = pool.clone();
        joins.push(tokio::spawn(async move {
            loop {
                let ids: Vec<i64> = sqlx::query_scalar(
                    "WITH claimed AS (
                         SELECT id FROM tasks
                         WHERE state = 'pending' AND run_at <= now()
                         ORDER BY run_at, id
                         LIMIT 100
                         FOR UPDATE SKIP LOCKED
                     )
                     UPDATE tasks t
                     SET state = 'running', locked_by = 'baseline', lock_token = gen_random_uuid(),
                         lease_expires_at = now() + interval '1 minute', updated_at = now()
                     FROM claimed WHERE t.id = claimed.id
                     RETURNING t.id",
                )
                .fetch_all(&pool)
                .await?;
                if ids.is_empty() {
                    return Ok::<_, sqlx::Error>(());
                }
                sqlx::query(
                    "UPDATE tasks
                     SET state = 'succeeded', lock_token = NULL, lease_expires_at = NULL,
                         finished_at = now(), updated_at = now()
                     WHERE id = ANY($1)",
                )
                .bind(&ids)
                .execute(&pool)
                .await?;
            }
        }));
    }
    for join in joins {
        join.await??;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let run = format!("raw-SQL baseline, concurrency {concurrency}");
    expect_all_in_state(&db.pool, "succeeded", total, &run).await?;
    Ok(rate)
}

/// Returns once `total` results are recorded (successes or deaths), or when nothing has been
/// recorded for `STALL`: the check after the run then says what is missing, where waiting on
/// the successes alone would hang on the first task that never succeeds.
async fn wait_until_drained(counters: &QueueCounters, total: usize, started: Instant) {
    const STALL: Duration = Duration::from_secs(30);
    let trace = std::env::var_os("MAILPOLL_BENCH_TRACE").is_some();
    let (mut last_report, mut last_progress, mut recorded) = (started, Instant::now(), 0);
    loop {
        let snapshot = counters.snapshot();
        if snapshot.completed + snapshot.dead > recorded {
            (recorded, last_progress) = (snapshot.completed + snapshot.dead, Instant::now());
        }
        if recorded >= total as u64 || last_progress.elapsed() > STALL {
            return;
        }
        if trace && last_report.elapsed() > Duration::from_millis(250) {
            eprintln!("{:?} {snapshot:?}", started.elapsed());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Time from just before an enqueue until its handler starts, on an idle queue.
async fn pickup_latency(bench: &Bench, samples: usize) -> BenchResult<Vec<Duration>> {
    let (db, pool) = bench.database(8).await?;
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<Instant>();
    let started_tx = Arc::new(started_tx);
    let workers = WorkerPool::new(pool, config(16))
        .register(
            "noop",
            handler_fn(move |_task: ClaimedTask, _ctx: TaskContext| {
                let now = Instant::now();
                let started = started_tx.clone();
                async move {
                    let _ = started.send(now);
                    Ok(())
                }
            }),
        )
        .start()?;
    let mut latencies = Vec::with_capacity(samples);
    for n in 0..samples + 20 {
        // Idle between tasks, so each one is picked up by a wake-up, not a busy claim loop.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let before = Instant::now();
        queue::enqueue(&db.pool, &noop_task(n)).await?;
        let started = tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
            .await?
            .ok_or("handler channel closed")?;
        // The first runs warm up connections and prepared statements.
        if n >= 20 {
            latencies.push(started.duration_since(before));
        }
    }
    workers.shutdown().await;
    expect_all_in_state(&db.pool, "succeeded", samples + 20, "pickup latency").await?;
    latencies.sort();
    Ok(latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> BenchResult<()> {
    let total: usize = std::env::var("MAILPOLL_BENCH_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    if let Ok(filter) = std::env::var("MAILPOLL_LOG") {
        mailpoll::telemetry::init(mailpoll::telemetry::LogFormat::Text, &filter)?;
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let durable = std::env::var_os("MAILPOLL_BENCH_DURABLE").is_some();
        let bench = Bench {
            server: BenchPostgres::start().await?,
            durable,
        };
        println!(
            "benchmark databases: synchronous_commit = {}",
            if durable {
                "on (MAILPOLL_BENCH_DURABLE)"
            } else {
                "the server's"
            }
        );
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |what: String, figure: String| {
            eprintln!("{what}: {figure}");
            rows.push((what, figure));
        };

        if let Ok(c) = std::env::var("MAILPOLL_BENCH_ONLY") {
            let c: usize = c.parse()?;
            let rate = end_to_end(&bench, c, total).await?;
            let baseline = raw_sql_baseline(&bench, c, total).await?;
            eprintln!(
                "c={c}: {rate:.0}/s, raw-SQL baseline {baseline:.0}/s, ratio {:.2}",
                rate / baseline
            );
            return Ok(());
        }
        let single = enqueue_single(&bench, 1, 5_000).await?;
        row(
            "enqueue, one task per transaction, 1 client".into(),
            format!("{single:.0} tasks/s"),
        );
        let single16 = enqueue_single(&bench, 16, 20_000).await?;
        row(
            "enqueue, one task per transaction, 16 clients".into(),
            format!("{single16:.0} tasks/s"),
        );
        let batched = enqueue_batches(&bench, 1_000, 200_000).await?;
        row(
            "enqueue_many, 1,000 tasks per transaction".into(),
            format!("{batched:.0} tasks/s"),
        );
        let mut at_16 = None;
        for concurrency in [1, 8, 16, 64] {
            let n = if concurrency == 1 { total / 5 } else { total };
            let rate = end_to_end(&bench, concurrency, n).await?;
            if concurrency == 16 {
                at_16 = Some(rate);
            }
            row(
                format!("end to end, no-op tasks, concurrency {concurrency} ({n} tasks)"),
                format!("{rate:.0} tasks/s"),
            );
        }
        let baseline = raw_sql_baseline(&bench, 16, total).await?;
        row(
            format!("raw-SQL baseline (claim 100, complete them), concurrency 16 ({total} tasks)"),
            format!("{baseline:.0} tasks/s"),
        );
        if let Some(rate) = at_16 {
            row(
                "end to end / raw-SQL baseline, concurrency 16".into(),
                format!("{:.2}", rate / baseline),
            );
        }
        let latencies = pickup_latency(&bench, 500).await?;
        row(
            "pickup latency on an idle queue (500 tasks): p50 / p99 / max".into(),
            format!(
                "{} / {} / {}",
                ms(percentile(&latencies, 0.50)),
                ms(percentile(&latencies, 0.99)),
                ms(percentile(&latencies, 1.0))
            ),
        );

        println!("| measurement | result |\n|---|---|");
        for (what, figure) in &rows {
            println!("| {what} | {figure} |");
        }
        Ok(())
    })
}
