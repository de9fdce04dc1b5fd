//! Fairness of the task queue against a real Postgres: one owner's backlog does not hold up
//! another owner's task, polls are claimed while deliveries fill their budget, and the cap of
//! running deliveries per MailboxPoll holds across two worker pools (replicas).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailpoll::queue::{
    self, ClaimedTask, KindClaim, NewTask, RetryPolicy, SlotBudget, TaskContext, TaskState,
    WorkerId, WorkerPool, WorkerPoolConfig, handler_fn,
};
use mailpoll_testkit::pg::TestDatabase;
use mailpoll_testkit::wait_until;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

fn test_config(name: &str, concurrency: usize) -> WorkerPoolConfig {
    WorkerPoolConfig {
        worker_id: WorkerId::named(name),
        concurrency,
        lease: LEASE,
        heartbeat_interval: Duration::from_secs(5),
        poll_interval: Duration::from_millis(50),
        retry: RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
        },
        shutdown_grace: Duration::from_secs(10),
        ..WorkerPoolConfig::default()
    }
}

fn deliveries(owner: Uuid, count: usize) -> Vec<NewTask> {
    (0..count)
        .map(|n| NewTask::new("deliver", json!({ "n": n })).owner(owner))
        .collect()
}

async fn count_in_state(pool: &PgPool, state: TaskState) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state = $1")
        .bind(state.as_str())
        .fetch_one(pool)
        .await
        .expect("count tasks")
}

fn capped(kind: &str, room: usize, owner_cap: Option<i32>) -> Vec<KindClaim> {
    vec![KindClaim {
        kind: kind.to_owned(),
        room,
        reserved: 0,
        owner_cap,
    }]
}

#[tokio::test]
async fn a_backlog_of_one_owner_does_not_hold_up_another_owners_task() {
    let db = TestDatabase::create().await.expect("test database");
    let (busy, quiet) = (Uuid::new_v4(), Uuid::new_v4());
    // A first poll's worth of deliveries, then one delivery of another MailboxPoll.
    let backlog = queue::enqueue_many(&db.pool, &deliveries(busy, 10_000))
        .await
        .expect("enqueue the backlog");
    let single = queue::enqueue(&db.pool, &deliveries(quiet, 1)[0])
        .await
        .expect("enqueue the single task");

    // In run_at order the single task would come after all 10,000. In fair order the backlog
    // is spaced 100 ms per task behind its head, so the single task, enqueued well within
    // 10 s of the backlog, is in the first claim of 100.
    let claimed = queue::claim(&db.pool, &["deliver".to_owned()], 100, "w", LEASE)
        .await
        .expect("claim");
    let mut ids: Vec<i64> = claimed.iter().map(|task| task.id).collect();
    ids.sort_unstable();
    let mut expected: Vec<i64> = backlog.iter().take(99).map(|task| task.id).collect();
    expected.push(single.id);
    assert_eq!(
        ids, expected,
        "the 99 oldest of the backlog and the single task"
    );

    let rest = queue::claim(&db.pool, &["deliver".to_owned()], 20_000, "w", LEASE)
        .await
        .expect("claim the rest");
    assert_eq!(rest.len(), 9_901, "the rest of the backlog, all due");

    // Two backlogs take turns: of 200 claimed, each owner gets half, give or take the tasks
    // the second enqueue came later (one per 100 ms; it comes within a second).
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    queue::enqueue_many(&db.pool, &deliveries(a, 1_000))
        .await
        .expect("enqueue a");
    queue::enqueue_many(&db.pool, &deliveries(b, 1_000))
        .await
        .expect("enqueue b");
    let claimed = queue::claim(&db.pool, &["deliver".to_owned()], 200, "w", LEASE)
        .await
        .expect("claim from two backlogs");
    assert_eq!(claimed.len(), 200);
    let of_a = claimed
        .iter()
        .filter(|task| task.owner_uid == Some(a))
        .count();
    assert!(
        (100..=110).contains(&of_a),
        "{of_a} of 200 claimed tasks from the first backlog, the rest from the second"
    );
}

#[tokio::test]
async fn an_owner_at_its_cap_does_not_hold_up_other_owners() {
    let db = TestDatabase::create().await.expect("test database");
    let (capped_owner, other) = (Uuid::new_v4(), Uuid::new_v4());
    let tasks: Vec<NewTask> = deliveries(capped_owner, 30)
        .into_iter()
        .map(|task| task.max_running(1))
        .collect();
    let backlog = queue::enqueue_many(&db.pool, &tasks)
        .await
        .expect("enqueue the capped backlog");
    let single = queue::enqueue(&db.pool, &deliveries(other, 1)[0])
        .await
        .expect("enqueue the other owner's task");

    // The kind is capped (at 4 by default); these tasks carry a cap of 1 of their own.
    let kinds = capped("deliver", 5, Some(4));
    let claim = || queue::claim_kinds(&db.pool, &kinds, 5, "w", LEASE);
    let first = claim().await.expect("first claim");
    let mut ids: Vec<i64> = first.iter().map(|task| task.id).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        vec![backlog[0].id, single.id],
        "one task of the capped owner, and the other owner's task"
    );
    let second = claim().await.expect("second claim");
    assert_eq!(
        second.len(),
        0,
        "the capped owner runs its one task already"
    );

    let running = first
        .iter()
        .find(|task| task.id == backlog[0].id)
        .expect("the capped owner's task");
    queue::complete(&db.pool, running.lease())
        .await
        .expect("complete");
    let third = claim().await.expect("third claim");
    assert_eq!(third.len(), 1, "its slot is free again: {third:?}");
    assert_eq!(third[0].owner_uid, Some(capped_owner));
}

/// Tasks of an owner at its cap wait out of the claim's way: once read, a claim neither reads
/// nor rewrites them again (behind a backlog of 100,000, every claim used to read and move a
/// window of them, which made the claim Postgres's largest cost). Each finished task releases
/// one, first in fair order; a task left waiting with a slot free (a claim and a finish at
/// once) is released by [`queue::release_waiting`].
#[tokio::test]
async fn a_capped_backlog_waits_for_its_slots_without_costing_claims() {
    let db = TestDatabase::create().await.expect("test database");
    let (capped_owner, other) = (Uuid::new_v4(), Uuid::new_v4());
    let backlog = queue::enqueue_many(&db.pool, &deliveries(capped_owner, 300))
        .await
        .expect("enqueue the backlog");
    let kinds = capped("deliver", 20, Some(2));
    let claim = || queue::claim_kinds(&db.pool, &kinds, 20, "w", LEASE);
    let first = claim().await.expect("first claim");
    let running: Vec<i64> = first.iter().map(|task| task.id).collect();
    assert_eq!(running, vec![backlog[0].id, backlog[1].id], "the cap of 2");

    // Each claim sets the backlog it reads waiting, until all of it waits.
    let unread = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM tasks WHERE state = 'pending' AND waiting_cap IS NULL",
        )
        .fetch_one(&db.pool)
        .await
        .expect("count")
    };
    let mut claims = 1;
    while unread().await > 0 {
        assert!(
            claim().await.expect("claim").is_empty(),
            "the owner is at its cap"
        );
        claims += 1;
        assert!(claims <= 300 / 38 + 2, "each claim sets its window waiting");
    }
    let versions = || async {
        sqlx::query_as::<_, (i64, String)>(
            "SELECT id, xmin::text FROM tasks WHERE state = 'pending' ORDER BY id",
        )
        .fetch_all(&db.pool)
        .await
        .expect("row versions")
    };
    let before = versions().await;
    assert_eq!(before.len(), 298);
    let single = queue::enqueue(&db.pool, &deliveries(other, 1)[0])
        .await
        .expect("the other owner's task");
    for _ in 0..5 {
        let claimed = claim().await.expect("claim");
        assert!(
            claimed.iter().all(|task| task.id == single.id),
            "{claimed:?}"
        );
    }
    assert_eq!(
        versions()
            .await
            .into_iter()
            .filter(|(id, _)| *id != single.id)
            .collect::<Vec<_>>(),
        before,
        "no claim rewrote a waiting task"
    );

    // A finish releases the first waiting task in fair order, which the next claim takes.
    queue::complete(&db.pool, first[0].lease())
        .await
        .expect("complete");
    let next = claim().await.expect("claim after a finish");
    let ids: Vec<i64> = next.iter().map(|task| task.id).collect();
    assert_eq!(ids, vec![backlog[2].id], "one slot freed, one released");
    assert!(claim().await.expect("claim").is_empty(), "at its cap again");

    // Both running tasks end without releasing anything, as when a claim set tasks waiting
    // while the owner's last tasks finished: the safety net releases as many as fit the cap.
    sqlx::query(
        "UPDATE tasks SET state = 'succeeded', finished_at = now() WHERE state = 'running'",
    )
    .execute(&db.pool)
    .await
    .expect("finish behind the queue's back");
    assert_eq!(queue::release_waiting(&db.pool).await.expect("release"), 2);
    let released = claim().await.expect("claim the released tasks");
    let ids: Vec<i64> = released.iter().map(|task| task.id).collect();
    assert_eq!(ids, vec![backlog[3].id, backlog[4].id]);
    assert_eq!(
        queue::release_waiting(&db.pool).await.expect("release"),
        0,
        "the cap is full again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn polls_are_claimed_while_deliveries_fill_their_budget() {
    let db = TestDatabase::create().await.expect("test database");
    // Deliveries that hang until released, as behind a receiver that does not answer.
    let gate = Arc::new(Semaphore::new(0));
    let delivering = Arc::new(AtomicUsize::new(0));
    let polled = Arc::new(AtomicUsize::new(0));
    let config = WorkerPoolConfig {
        prefetch: 0,
        budgets: HashMap::from([(
            "poll".to_owned(),
            SlotBudget {
                reserved: 1,
                max: None,
            },
        )]),
        ..test_config("budgets", 4)
    };
    let pool = WorkerPool::new(db.pool.clone(), config)
        .register("deliver", {
            let (gate, delivering) = (gate.clone(), delivering.clone());
            handler_fn(move |_task: ClaimedTask, _ctx: TaskContext| {
                let (gate, delivering) = (gate.clone(), delivering.clone());
                async move {
                    delivering.fetch_add(1, Ordering::SeqCst);
                    let _pass = gate.acquire().await;
                    Ok(())
                }
            })
        })
        .register("poll", {
            let polled = polled.clone();
            handler_fn(move |_task: ClaimedTask, _ctx: TaskContext| {
                let polled = polled.clone();
                async move {
                    polled.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
        })
        .start()
        .expect("start pool");

    let owners: Vec<NewTask> = (0..50)
        .flat_map(|_| deliveries(Uuid::new_v4(), 1))
        .collect();
    queue::enqueue_many(&db.pool, &owners)
        .await
        .expect("enqueue deliveries");
    wait_until(
        "deliveries to take every slot they may",
        Duration::from_secs(20),
        || async { delivering.load(Ordering::SeqCst) == 3 },
    )
    .await;
    for round in 0..3 {
        queue::enqueue(
            &db.pool,
            &NewTask::new("poll", json!({ "round": round })).owner(Uuid::new_v4()),
        )
        .await
        .expect("enqueue a poll");
    }
    wait_until(
        "the polls to run beside the hanging deliveries",
        Duration::from_secs(20),
        || async { polled.load(Ordering::SeqCst) == 3 },
    )
    .await;
    assert_eq!(
        delivering.load(Ordering::SeqCst),
        3,
        "deliveries never took the poll's reserved slot"
    );
    // The polls' handlers have returned; their completions are recorded in a moment.
    wait_until(
        "the polls' completions recorded, the three deliveries still running",
        Duration::from_secs(20),
        || async { count_in_state(&db.pool, TaskState::Running).await == 3 },
    )
    .await;

    gate.add_permits(1_000);
    wait_until(
        "every delivery to finish once the receiver answers",
        Duration::from_secs(30),
        || async { count_in_state(&db.pool, TaskState::Succeeded).await == 53 },
    )
    .await;
    assert_eq!(delivering.load(Ordering::SeqCst), 50);
    pool.shutdown().await;
}

/// Running deliveries per owner now, and the most seen at once.
#[derive(Default)]
struct Concurrency {
    now: HashMap<Uuid, usize>,
    peak: HashMap<Uuid, usize>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_delivery_cap_per_owner_holds_across_two_pools() {
    let db = TestDatabase::create().await.expect("test database");
    let (by_default, by_task, uncapped_kind_owner) =
        (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let mut tasks = deliveries(by_default, 40);
    tasks.extend(
        deliveries(by_task, 40)
            .into_iter()
            .map(|task| task.max_running(3)),
    );
    tasks
        .extend((0..8).map(|n| NewTask::new("poll", json!({ "n": n })).owner(uncapped_kind_owner)));
    queue::enqueue_many(&db.pool, &tasks)
        .await
        .expect("enqueue");

    let seen: Arc<Mutex<Concurrency>> = Arc::default();
    let handler = || {
        let seen = seen.clone();
        handler_fn(move |task: ClaimedTask, _ctx: TaskContext| {
            let seen = seen.clone();
            async move {
                let owner = task.owner_uid.unwrap_or_default();
                {
                    let mut seen = seen.lock().expect("lock");
                    let now = seen.now.entry(owner).or_default();
                    *now += 1;
                    let now = *now;
                    let peak = seen.peak.entry(owner).or_default();
                    *peak = (*peak).max(now);
                }
                // A slow receiver: long enough for every free handler to be offered the task.
                tokio::time::sleep(Duration::from_millis(40)).await;
                *seen.lock().expect("lock").now.entry(owner).or_default() -= 1;
                Ok(())
            }
        })
    };
    let mut pools = Vec::new();
    for replica in 0..2 {
        let connections = mailpoll::db::connect(
            &db.url,
            &mailpoll::db::PoolConfig {
                max_connections: 6,
                ..mailpoll::db::PoolConfig::default()
            },
        )
        .await
        .expect("replica connection pool");
        let config = WorkerPoolConfig {
            owner_caps: HashMap::from([("deliver".to_owned(), 2)]),
            ..test_config(&format!("replica-{replica}"), 8)
        };
        pools.push(
            WorkerPool::new(connections, config)
                .register("deliver", handler())
                .register("poll", handler())
                .start()
                .expect("start pool"),
        );
    }
    wait_until("every task to succeed", Duration::from_secs(60), || async {
        count_in_state(&db.pool, TaskState::Succeeded).await == 88
    })
    .await;
    for pool in pools {
        pool.shutdown().await;
    }
    let peak = seen.lock().expect("lock").peak.clone();
    assert_eq!(
        peak.get(&by_default),
        Some(&2),
        "the pools' default cap, across both pools"
    );
    assert_eq!(
        peak.get(&by_task),
        Some(&3),
        "the task's own cap, across both pools"
    );
    let polls_peak = peak.get(&uncapped_kind_owner).copied().unwrap_or(0);
    assert!(
        polls_peak > 3,
        "polls have no cap: {polls_peak} ran at once at most"
    );
    let slots_left: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state = 'running'")
        .fetch_one(&db.pool)
        .await
        .expect("count running");
    assert_eq!(slots_left, 0);
}
