//! Worker pools ride out a Postgres restart (connections cut, as in a failover): they
//! reconnect, every task finishes, nothing is lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailpoll::queue::{
    self, ClaimedTask, NewTask, RetryPolicy, TaskContext, WorkerId, WorkerPool, WorkerPoolConfig,
    handler_fn,
};
use mailpoll_testkit::pg::{PgServer, TestDatabase};
use mailpoll_testkit::{Patience, wait_for_ok, wait_until};
use serde_json::json;
use sqlx::PgPool;

fn config(name: &str) -> WorkerPoolConfig {
    WorkerPoolConfig {
        worker_id: WorkerId::named(name),
        concurrency: 4,
        // Claims whose answer was lost in the restart are rescued once this runs out.
        lease: Duration::from_secs(3),
        heartbeat_interval: Duration::from_secs(1),
        poll_interval: Duration::from_millis(200),
        retry: RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
        },
        rescue_interval: Duration::from_millis(500),
        shutdown_grace: Duration::from_secs(10),
        ..WorkerPoolConfig::default()
    }
}

/// Tasks per state; `None` while the database is unreachable.
async fn states(pool: &PgPool) -> Option<HashMap<String, i64>> {
    sqlx::query_as::<_, (String, i64)>("SELECT state, count(*) FROM tasks GROUP BY state")
        .fetch_all(pool)
        .await
        .ok()
        .map(|rows| rows.into_iter().collect())
}

async fn enqueue_batch(pool: &PgPool, from: usize, to: usize) -> Vec<i64> {
    let tasks: Vec<NewTask> = (from..to)
        .map(|n| NewTask::new("deliver", json!({ "n": n })))
        .collect();
    // Right after a restart the first statements may meet cut connections.
    for _ in 0..50 {
        match queue::enqueue_many(pool, &tasks).await {
            Ok(enqueued) => return enqueued.into_iter().map(|e| e.id).collect(),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    panic!("cannot enqueue after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_reconnect_after_a_postgres_restart_and_lose_nothing() {
    let server = PgServer::start().expect("private Postgres server");
    let db = TestDatabase::create_on(&server.url())
        .await
        .expect("test database");
    mailpoll::db::migrate(&db.pool).await.expect("migrate");

    let handled: Arc<Mutex<HashMap<i64, u32>>> = Arc::default();
    let mut pools = Vec::new();
    for replica in 0..2 {
        let handled = handled.clone();
        let db_pool = mailpoll::db::connect(
            &db.url,
            &mailpoll::db::PoolConfig {
                max_connections: 4,
                acquire_timeout: Duration::from_secs(2),
                ..mailpoll::db::PoolConfig::default()
            },
        )
        .await
        .expect("replica pool");
        let pool = WorkerPool::new(db_pool, config(&format!("replica-{replica}")))
            .register(
                "deliver",
                handler_fn(move |task: ClaimedTask, _ctx: TaskContext| {
                    let handled = handled.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        *handled
                            .lock()
                            .expect("handled lock")
                            .entry(task.id)
                            .or_insert(0) += 1;
                        Ok(())
                    }
                }),
            )
            .start()
            .expect("start pool");
        pools.push(pool);
    }

    // A pool that only a notification can wake (its polling interval is an hour): after the
    // restart it must be listening again.
    let (pinged_tx, mut pinged_rx) = tokio::sync::mpsc::unbounded_channel::<i64>();
    let mut listener_config = config("listener");
    listener_config.poll_interval = Duration::from_secs(3600);
    let listener_pool = WorkerPool::new(db.pool.clone(), listener_config)
        .register(
            "ping",
            handler_fn(move |task: ClaimedTask, _ctx: TaskContext| {
                let pinged = pinged_tx.clone();
                async move {
                    let _ = pinged.send(task.id);
                    Ok(())
                }
            }),
        )
        .start()
        .expect("start listener pool");

    let mut ids = enqueue_batch(&db.pool, 0, 2000).await;
    // Look often: the restart must come while most of the work is left.
    wait_until(
        "the workers to start (200 tasks handled)",
        Patience::new(Duration::from_secs(60)).every(Duration::from_millis(20)),
        || async { handled.lock().expect("handled lock").len() >= 200 },
    )
    .await;

    let server = tokio::task::spawn_blocking(move || {
        server.restart().expect("restart Postgres");
        server
    })
    .await
    .expect("restart task");
    let before_restart_done = handled.lock().expect("handled lock").len();
    assert!(
        before_restart_done < ids.len(),
        "the restart must happen while work is left"
    );

    // New work after the restart reaches the reconnected workers too.
    ids.extend(enqueue_batch(&db.pool, 2000, 2500).await);

    wait_for_ok(
        "every task to succeed after the restart",
        Patience::new(Duration::from_secs(120)).every(Duration::from_millis(100)),
        || async {
            let states = states(&db.pool).await;
            match &states {
                Some(states) if states.get("succeeded").copied() == Some(ids.len() as i64) => {
                    Ok(())
                }
                _ => Err(format!("{states:?}")),
            }
        },
    )
    .await;
    for pool in pools {
        pool.shutdown().await;
    }
    let ping = queue::enqueue(&db.pool, &NewTask::new("ping", json!({})))
        .await
        .expect("enqueue ping")
        .id;
    let pinged = tokio::time::timeout(Duration::from_secs(30), pinged_rx.recv())
        .await
        .expect("the listening pool wakes within 30 s after the restart")
        .expect("ping handled");
    assert_eq!(pinged, ping);
    listener_pool.shutdown().await;

    let missing: Vec<i64> = {
        let handled = handled.lock().expect("handled lock");
        ids.iter()
            .copied()
            .filter(|id| !handled.contains_key(id))
            .collect()
    };
    assert!(missing.is_empty(), "tasks never handled: {missing:?}");
    let states = states(&db.pool).await.expect("database reachable");
    assert_eq!(states.len(), 1, "only succeeded tasks are left: {states:?}");
    drop(server);
}
