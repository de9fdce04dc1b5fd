//! Worker pools against a real Postgres: exactly-once handling under concurrency, rescue of a
//! vanished worker, retries to dead and back through the CLI, graceful shutdown, wake-ups.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailpoll::queue::{
    self, ClaimedTask, HandlerError, Lease, NewTask, QueueError, RetryPolicy, TaskContext,
    TaskState, WorkerId, WorkerPool, WorkerPoolConfig, handler_fn,
};
use mailpoll_testkit::pg::TestDatabase;
use mailpoll_testkit::wait_until;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::mpsc;

/// Times short enough for tests; production defaults are in `WorkerPoolConfig::default()`.
fn test_config(name: &str, concurrency: usize) -> WorkerPoolConfig {
    WorkerPoolConfig {
        worker_id: WorkerId::named(name),
        concurrency,
        lease: Duration::from_secs(30),
        heartbeat_interval: Duration::from_secs(5),
        poll_interval: Duration::from_millis(200),
        retry: RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
        },
        rescue_interval: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(10),
        ..WorkerPoolConfig::default()
    }
}

/// A pool of its own per worker pool, as each replica has.
async fn replica_pool(db: &TestDatabase, connections: u32) -> PgPool {
    mailpoll::db::connect(
        &db.url,
        &mailpoll::db::PoolConfig {
            max_connections: connections,
            ..mailpoll::db::PoolConfig::default()
        },
    )
    .await
    .expect("replica connection pool")
}

async fn count_in_state(pool: &PgPool, state: TaskState) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state = $1")
        .bind(state.as_str())
        .fetch_one(pool)
        .await
        .expect("count tasks")
}

async fn task(pool: &PgPool, id: i64) -> queue::TaskRow {
    queue::get(pool, id)
        .await
        .expect("read task")
        .expect("task exists")
}

type Counts = Arc<Mutex<HashMap<i64, u32>>>;

fn counting_handler(counts: Counts) -> impl mailpoll::queue::Handler {
    handler_fn(move |task: ClaimedTask, _ctx: TaskContext| {
        let counts = counts.clone();
        async move {
            *counts
                .lock()
                .expect("counts lock")
                .entry(task.id)
                .or_insert(0) += 1;
            Ok(())
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_task_is_handled_exactly_once_by_many_workers_in_several_pools() {
    // MAILPOLL_BIG=1 runs ten times as many.
    let total: usize = if std::env::var_os("MAILPOLL_BIG").is_some() {
        200_000
    } else {
        20_000
    };
    let db = TestDatabase::create().await.expect("test database");
    for chunk in (0..total).collect::<Vec<_>>().chunks(5_000) {
        let tasks: Vec<NewTask> = chunk
            .iter()
            .map(|n| NewTask::new("deliver", json!({ "n": n })))
            .collect();
        queue::enqueue_many(&db.pool, &tasks)
            .await
            .expect("enqueue");
    }
    sqlx::query("ANALYZE tasks")
        .execute(&db.pool)
        .await
        .expect("analyze");

    // 16 workers: four pools (replicas) with four handlers each.
    let counts: Counts = Arc::default();
    let mut pools = Vec::new();
    for replica in 0..4 {
        let pool = WorkerPool::new(
            replica_pool(&db, 4).await,
            test_config(&format!("replica-{replica}"), 4),
        )
        .register("deliver", counting_handler(counts.clone()))
        .start()
        .expect("start pool");
        pools.push(pool);
    }
    wait_until(
        "every task to succeed",
        Duration::from_secs(300),
        || async { count_in_state(&db.pool, TaskState::Succeeded).await == total as i64 },
    )
    .await;
    let mut completed = 0;
    for pool in pools {
        let stats = pool.stats();
        assert!(stats.claimed > 0, "every pool took part: {stats:?}");
        completed += stats.completed;
        let report = pool.shutdown().await;
        assert_eq!(report.released, 0);
    }
    assert_eq!(completed, total as u64);
    {
        let counts = counts.lock().expect("counts lock");
        assert_eq!(counts.len(), total, "every task handled");
        let repeated: Vec<(&i64, &u32)> = counts.iter().filter(|(_, n)| **n != 1).collect();
        assert!(
            repeated.is_empty(),
            "tasks handled more than once: {repeated:?}"
        );
    }
    let attempts: i64 = sqlx::query_scalar("SELECT coalesce(sum(attempts), 0) FROM tasks")
        .fetch_one(&db.pool)
        .await
        .expect("attempts");
    assert_eq!(attempts, 0, "no failed attempt");
}

#[tokio::test]
async fn a_vanished_worker_is_rescued_and_its_late_result_refused() {
    let db = TestDatabase::create().await.expect("test database");
    let (leases_tx, mut leases_rx) = mpsc::unbounded_channel::<Lease>();
    let mut doomed_config = test_config("doomed", 1);
    doomed_config.lease = Duration::from_secs(1);
    doomed_config.heartbeat_interval = Duration::from_millis(300);
    let doomed = WorkerPool::new(db.pool.clone(), doomed_config)
        .register(
            "deliver",
            handler_fn(move |task: ClaimedTask, _ctx: TaskContext| {
                let leases = leases_tx.clone();
                async move {
                    let _ = leases.send(task.lease());
                    // Stuck until the process "dies".
                    std::future::pending::<()>().await;
                    Ok(())
                }
            }),
        )
        .start()
        .expect("start doomed pool");
    let id = queue::enqueue(&db.pool, &NewTask::new("deliver", json!({})))
        .await
        .expect("enqueue")
        .id;
    let stale = tokio::time::timeout(Duration::from_secs(10), leases_rx.recv())
        .await
        .expect("the first worker claims within 10 s")
        .expect("lease");
    assert_eq!(stale.id, id);
    // The worker stops mid-task: its futures are dropped, nothing is released.
    drop(doomed);

    let counts: Counts = Arc::default();
    let rescuer = WorkerPool::new(db.pool.clone(), test_config("rescuer", 2))
        .register("deliver", counting_handler(counts.clone()))
        .start()
        .expect("start rescuer pool");
    wait_until(
        "the rescued task to succeed",
        Duration::from_secs(30),
        || async { task(&db.pool, id).await.state == TaskState::Succeeded },
    )
    .await;
    let stats = rescuer.stats();
    rescuer.shutdown().await;
    assert_eq!(stats.rescued, 1);
    assert_eq!(counts.lock().expect("counts lock").get(&id), Some(&1));
    let row = task(&db.pool, id).await;
    assert_eq!(row.attempts, 1, "the lost lease counted as an attempt");
    assert!(
        row.locked_by
            .as_deref()
            .is_some_and(|w| w.starts_with("rescuer/")),
        "finished by the second worker: {:?}",
        row.locked_by
    );

    let late = queue::complete(&db.pool, stale).await;
    assert!(
        matches!(late, Err(QueueError::LeaseLost { id: got }) if got == id),
        "the first worker's late completion must be refused: {late:?}"
    );
    assert_eq!(task(&db.pool, id).await.state, TaskState::Succeeded);
}

async fn run_mailpoll(db: &TestDatabase, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_mailpoll"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("MAILPOLL_LOG", "warn")
        .output()
        .await
        .expect("run the mailpoll binary")
}

#[tokio::test]
async fn failing_tasks_retry_until_dead_and_the_cli_brings_them_back() {
    let db = TestDatabase::create().await.expect("test database");
    let calls = Arc::new(AtomicUsize::new(0));
    let fail_until = Arc::new(AtomicUsize::new(usize::MAX));
    let handler = {
        let calls = calls.clone();
        let fail_until = fail_until.clone();
        handler_fn(move |task: ClaimedTask, _ctx: TaskContext| {
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            let fail_until = fail_until.load(Ordering::SeqCst);
            async move {
                if call <= fail_until {
                    Err(HandlerError::retryable(format!(
                        "receiver answered 503 on attempt {}",
                        task.attempt()
                    )))
                } else {
                    Ok(())
                }
            }
        })
    };
    let mut config = test_config("retrier", 2);
    config.poll_interval = Duration::from_millis(50);
    let pool = WorkerPool::new(db.pool.clone(), config)
        .register("deliver", handler)
        .start()
        .expect("start pool");
    let id = queue::enqueue(
        &db.pool,
        &NewTask::new("deliver", json!({})).max_attempts(3),
    )
    .await
    .expect("enqueue")
    .id;
    wait_until("the task to end dead", Duration::from_secs(30), || async {
        task(&db.pool, id).await.state == TaskState::Dead
    })
    .await;
    let row = task(&db.pool, id).await;
    assert_eq!(row.attempts, 3);
    assert_eq!(calls.load(Ordering::SeqCst), 3, "one run per attempt");
    assert_eq!(
        row.last_error.as_deref(),
        Some("receiver answered 503 on attempt 3"),
        "the last error is kept"
    );
    let stats = pool.stats();
    assert_eq!((stats.retried, stats.dead), (2, 1));

    // People find it and bring it back.
    let listed = run_mailpoll(
        &db,
        &["tasks", "list", "--state", "dead", "--kind", "deliver"],
    )
    .await;
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let table = String::from_utf8_lossy(&listed.stdout);
    let line = table
        .lines()
        .find(|line| line.starts_with(&format!("{id} ")))
        .unwrap_or_else(|| panic!("task {id} missing from:\n{table}"));
    assert!(
        line.contains("dead") && line.contains("3/3") && line.contains("attempt 3"),
        "{line}"
    );
    let other_kind = run_mailpoll(&db, &["tasks", "list", "--kind", "poll"]).await;
    assert_eq!(
        String::from_utf8_lossy(&other_kind.stdout).lines().count(),
        1
    );

    fail_until.store(0, Ordering::SeqCst);
    let retried = run_mailpoll(&db, &["tasks", "retry", &id.to_string()]).await;
    assert!(
        retried.status.success(),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
    wait_until(
        "the retried task to succeed",
        Duration::from_secs(30),
        || async { task(&db.pool, id).await.state == TaskState::Succeeded },
    )
    .await;
    pool.shutdown().await;

    let again = run_mailpoll(&db, &["tasks", "retry", &id.to_string()]).await;
    assert!(
        !again.status.success(),
        "retrying a succeeded task must fail"
    );
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("only dead tasks can be retried"),
        "{stderr}"
    );

    let json = run_mailpoll(&db, &["tasks", "list", "--output", "json"]).await;
    let tasks: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON list");
    assert_eq!(tasks[0]["state"], "succeeded");
    assert_eq!(tasks[0]["last_error"], "receiver answered 503 on attempt 3");
}

#[tokio::test]
async fn handler_outcomes_become_transitions() {
    let db = TestDatabase::create().await.expect("test database");
    let pool = WorkerPool::new(db.pool.clone(), test_config("outcomes", 4))
        .register(
            "permanent",
            handler_fn(|_task: ClaimedTask, _ctx: TaskContext| async {
                Err(HandlerError::permanent("the message no longer exists"))
            }),
        )
        .register(
            "throttled",
            handler_fn(|_task: ClaimedTask, _ctx: TaskContext| async {
                Err(HandlerError::snooze(Duration::from_secs(3600)))
            }),
        )
        .register(
            "panics",
            handler_fn(|task: ClaimedTask, _ctx: TaskContext| async move {
                if task.attempt() < 10 {
                    panic!("bug in the handler");
                }
                Ok(())
            }),
        )
        .start()
        .expect("start pool");
    let ids = queue::enqueue_many(
        &db.pool,
        &[
            NewTask::new("permanent", json!({})),
            NewTask::new("throttled", json!({})),
            NewTask::new("panics", json!({})).max_attempts(1),
            NewTask::new("unhandled", json!({})),
        ],
    )
    .await
    .expect("enqueue");
    wait_until(
        "every handled task to settle",
        Duration::from_secs(30),
        || async {
            let states = [
                task(&db.pool, ids[0].id).await.state,
                task(&db.pool, ids[1].id).await.state,
                task(&db.pool, ids[2].id).await.state,
            ];
            states == [TaskState::Dead, TaskState::Pending, TaskState::Dead]
                && task(&db.pool, ids[1].id).await.locked_by.is_some()
        },
    )
    .await;
    pool.shutdown().await;

    let permanent = task(&db.pool, ids[0].id).await;
    assert_eq!(permanent.attempts, 1, "dead at once, without retries");
    assert_eq!(
        permanent.last_error.as_deref(),
        Some("the message no longer exists")
    );
    let throttled = task(&db.pool, ids[1].id).await;
    assert_eq!(throttled.attempts, 0, "a snooze is not an attempt");
    assert!(throttled.run_at > chrono::Utc::now() + chrono::Duration::minutes(59));
    let panicked = task(&db.pool, ids[2].id).await;
    let error = panicked.last_error.expect("panic recorded");
    assert!(error.contains("bug in the handler"), "{error}");
    let unhandled = task(&db.pool, ids[3].id).await;
    assert_eq!(
        unhandled.state,
        TaskState::Pending,
        "kinds without a handler are left to pools that have one"
    );
}

#[tokio::test]
async fn graceful_shutdown_releases_unfinished_tasks_without_counting_an_attempt() {
    let db = TestDatabase::create().await.expect("test database");
    let mut config = test_config("stopping", 3);
    config.prefetch = 2;
    config.shutdown_grace = Duration::from_millis(500);
    let pool = WorkerPool::new(db.pool.clone(), config)
        .register(
            "stuck",
            handler_fn(|_task: ClaimedTask, _ctx: TaskContext| async {
                std::future::pending::<()>().await;
                Ok(())
            }),
        )
        .register(
            "polite",
            handler_fn(|_task: ClaimedTask, ctx: TaskContext| async move {
                ctx.shutting_down().await;
                Ok(())
            }),
        )
        .start()
        .expect("start pool");
    // One statement: equal run_at, so the three first ids start first; the other two are
    // prefetched and wait for a free handler.
    let ids: Vec<i64> = queue::enqueue_many(
        &db.pool,
        &[
            NewTask::new("stuck", json!({})),
            NewTask::new("stuck", json!({})),
            NewTask::new("polite", json!({})),
            NewTask::new("stuck", json!({})),
            NewTask::new("polite", json!({})),
        ],
    )
    .await
    .expect("enqueue")
    .into_iter()
    .map(|e| e.id)
    .collect();
    wait_until(
        "three running handlers",
        Duration::from_secs(10),
        || async {
            pool.in_flight() == 3 && count_in_state(&db.pool, TaskState::Running).await == 5
        },
    )
    .await;
    let before: HashMap<i64, chrono::DateTime<chrono::Utc>> = {
        let mut map = HashMap::new();
        for id in &ids {
            map.insert(*id, task(&db.pool, *id).await.run_at);
        }
        map
    };

    let report = pool.shutdown().await;
    assert_eq!(report.stopped, 2, "the stuck handlers were stopped");
    assert_eq!(report.released, 4, "stuck and prefetched tasks released");
    assert_eq!(report.abandoned, 0);

    assert_eq!(task(&db.pool, ids[2]).await.state, TaskState::Succeeded);
    for id in [ids[0], ids[1], ids[3], ids[4]] {
        let row = task(&db.pool, id).await;
        assert_eq!(row.state, TaskState::Pending, "task {id}");
        assert_eq!(row.attempts, 0, "task {id}: no attempt counted");
        assert!(row.lease_expires_at.is_none(), "task {id}: lease dropped");
        assert_eq!(row.run_at, before[&id], "task {id}: keeps its place");
    }
}

#[tokio::test]
async fn an_idle_pool_wakes_on_notification_without_polling() {
    let db = TestDatabase::create().await.expect("test database");
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<i64>();
    let mut config = test_config("listener", 2);
    // Polling alone would take an hour: only a notification can start the task in time.
    config.poll_interval = Duration::from_secs(3600);
    let pool = WorkerPool::new(db.pool.clone(), config)
        .register(
            "deliver",
            handler_fn(move |task: ClaimedTask, _ctx: TaskContext| {
                let done = done_tx.clone();
                async move {
                    let _ = done.send(task.id);
                    Ok(())
                }
            }),
        )
        .start()
        .expect("start pool");
    for round in 0..3 {
        // Let the pool go idle between tasks.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let id = queue::enqueue(
            &db.pool,
            &NewTask::new("deliver", json!({ "round": round })),
        )
        .await
        .expect("enqueue")
        .id;
        let handled = tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("round {round}: task not started within 10 s"))
            .expect("handler result");
        assert_eq!(handled, id);
    }
    pool.shutdown().await;
}
