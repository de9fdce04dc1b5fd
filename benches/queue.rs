//! Task queue benchmark: enqueue throughput, end-to-end throughput of no-op tasks at several
//! concurrencies, and pickup latency on an idle queue. Prints a Markdown table.
//!
//!   cargo bench --bench queue
//!
//! Uses the Postgres of `DATABASE_URL` when set (a fresh database per measurement), else starts
//! a private throwaway server. `MAILPOLL_BENCH_TASKS` sets the tasks per end-to-end run
//! (default 50,000). For investigations: `MAILPOLL_BENCH_ONLY=16` runs only the end-to-end
//! measurement at that concurrency, `MAILPOLL_BENCH_TRACE=1` prints the pool's counters while it
//! drains, and `MAILPOLL_LOG=sqlx=debug` logs every statement with its duration.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mailpoll::queue::{
    self, ClaimedTask, NewTask, TaskContext, WorkerId, WorkerPool, WorkerPoolConfig, handler_fn,
};
use mailpoll_testkit::pg::{PgServer, TestDatabase};
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::mpsc;

// The operator binary's allocator, so the figures are the shipped code's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Bench {
    admin_url: String,
    _server: Option<PgServer>,
}

impl Bench {
    fn new() -> BenchResult<Self> {
        match std::env::var("DATABASE_URL") {
            Ok(url) => Ok(Self {
                admin_url: url,
                _server: None,
            }),
            Err(_) => {
                let server = PgServer::start()?;
                Ok(Self {
                    admin_url: server.url(),
                    _server: Some(server),
                })
            }
        }
    }

    /// A fresh migrated database and a pool like an operator replica's.
    async fn database(&self, connections: u32) -> BenchResult<(TestDatabase, PgPool)> {
        let db = TestDatabase::create_on(&self.admin_url).await?;
        mailpoll::db::migrate(&db.pool).await?;
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
    let (_db, pool) = bench.database(clients as u32).await?;
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
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn enqueue_batches(bench: &Bench, batch: usize, total: usize) -> BenchResult<f64> {
    let (_db, pool) = bench.database(2).await?;
    let started = Instant::now();
    for chunk in (0..total).collect::<Vec<_>>().chunks(batch) {
        let tasks: Vec<NewTask> = chunk.iter().map(|n| noop_task(*n)).collect();
        queue::enqueue_many(&pool, &tasks).await?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Drains `total` preloaded no-op tasks with one pool; tasks per second from the pool's start
/// until the last result is recorded.
async fn end_to_end(bench: &Bench, concurrency: usize, total: usize) -> BenchResult<f64> {
    let (db, pool) = bench.database(8).await?;
    for chunk in (0..total).collect::<Vec<_>>().chunks(5_000) {
        let tasks: Vec<NewTask> = chunk.iter().map(|n| noop_task(*n)).collect();
        queue::enqueue_many(&db.pool, &tasks).await?;
    }
    sqlx::query("VACUUM ANALYZE tasks")
        .execute(&db.pool)
        .await?;
    let started = Instant::now();
    let workers = WorkerPool::new(pool, config(concurrency))
        .register(
            "noop",
            handler_fn(|_task: ClaimedTask, _ctx: TaskContext| async { Ok(()) }),
        )
        .start()?;
    let counters = workers.counters();
    let mut last_report = Instant::now();
    while counters.snapshot().completed < total as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
        if std::env::var_os("MAILPOLL_BENCH_TRACE").is_some()
            && last_report.elapsed() > Duration::from_millis(250)
        {
            eprintln!("{:?} {:?}", started.elapsed(), counters.snapshot());
            last_report = Instant::now();
        }
    }
    let elapsed = started.elapsed();
    workers.shutdown().await;
    Ok(total as f64 / elapsed.as_secs_f64())
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
        let bench = Bench::new()?;
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |what: String, figure: String| {
            eprintln!("{what}: {figure}");
            rows.push((what, figure));
        };

        if let Ok(c) = std::env::var("MAILPOLL_BENCH_ONLY") {
            let c: usize = c.parse()?;
            let rate = end_to_end(&bench, c, total).await?;
            eprintln!("c={c}: {rate:.0}/s");
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
        for concurrency in [1, 8, 16, 64] {
            let n = if concurrency == 1 { total / 5 } else { total };
            let rate = end_to_end(&bench, concurrency, n).await?;
            row(
                format!("end to end, no-op tasks, concurrency {concurrency} ({n} tasks)"),
                format!("{rate:.0} tasks/s"),
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
