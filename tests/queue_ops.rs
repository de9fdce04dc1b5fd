//! The queue's named operations against a real Postgres: enqueue and dedupe, claims, fencing,
//! the backoff schedule, rescue, release, retention, notifications and depth.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use mailpoll::queue::{
    self, ClaimedTask, Lease, NewTask, QueueError, RetryPolicy, RetryReport, TaskSelection,
    TaskState, Transition,
};
use mailpoll_testkit::pg::TestDatabase;
use mailpoll_testkit::wait_until;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgListener;

fn kinds(names: &[&str]) -> Vec<String> {
    names.iter().map(|k| (*k).to_owned()).collect()
}

async fn claim_one(pool: &PgPool, kind: &str, worker: &str, lease: Duration) -> ClaimedTask {
    let mut claimed = queue::claim(pool, &kinds(&[kind]), 1, worker, lease)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1, "expected one due {kind} task to claim");
    claimed.remove(0)
}

async fn task(pool: &PgPool, id: i64) -> queue::TaskRow {
    queue::get(pool, id)
        .await
        .expect("read task")
        .expect("task exists")
}

/// Makes a task due now, standing in for the passage of time.
async fn make_due(pool: &PgPool, id: i64) {
    sqlx::query("UPDATE tasks SET run_at = now() WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .expect("move run_at");
}

#[tokio::test]
async fn hundred_concurrent_enqueues_with_one_dedupe_key_make_one_task() {
    let db = TestDatabase::create().await.expect("test database");
    let mut joins = Vec::new();
    for i in 0..100 {
        let pool = db.pool.clone();
        joins.push(tokio::spawn(async move {
            let task = NewTask::new("poll", json!({ "caller": i })).dedupe_key("poll:mailbox-1");
            queue::enqueue(&pool, &task).await
        }));
    }
    let mut results = Vec::new();
    for join in joins {
        results.push(join.await.expect("join").expect("enqueue"));
    }
    let ids: HashSet<i64> = results.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 1, "every caller must get the same task: {ids:?}");
    assert_eq!(
        results.iter().filter(|r| r.fresh).count(),
        1,
        "exactly one caller created it"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn a_batch_with_duplicates_resolves_them_instead_of_failing() {
    let db = TestDatabase::create().await.expect("test database");
    let existing = queue::enqueue(
        &db.pool,
        &NewTask::new("poll", json!({})).dedupe_key("poll:a"),
    )
    .await
    .expect("first");
    let batch = vec![
        NewTask::new("deliver", json!({ "n": 1 })),
        NewTask::new("poll", json!({})).dedupe_key("poll:a"),
        NewTask::new("poll", json!({})).dedupe_key("poll:b"),
        NewTask::new("deliver", json!({ "n": 2 })),
        NewTask::new("poll", json!({})).dedupe_key("poll:b"),
        NewTask::new("deliver", json!({ "n": 3 })),
    ];
    let out = queue::enqueue_many(&db.pool, &batch)
        .await
        .expect("batch succeeds");
    assert_eq!(out.len(), batch.len());
    assert_eq!(out[1].id, existing.id);
    assert!(!out[1].fresh);
    assert!(out[2].fresh);
    assert_eq!(out[4].id, out[2].id);
    assert!(!out[4].fresh);
    // Unkeyed tasks answer in input order with their own rows.
    for (index, n) in [(0, 1), (3, 2), (5, 3)] {
        assert!(out[index].fresh);
        let row = task(&db.pool, out[index].id).await;
        assert_eq!(row.payload, json!({ "n": n }));
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(rows, 5);
}

#[tokio::test]
async fn enqueue_commits_or_rolls_back_with_the_callers_transaction() {
    let db = TestDatabase::create().await.expect("test database");
    let mut tx = db.pool.begin().await.expect("begin");
    let kept = queue::enqueue(&mut tx, &NewTask::new("deliver", json!({ "keep": true })))
        .await
        .expect("enqueue in transaction");
    tx.commit().await.expect("commit");
    let mut tx = db.pool.begin().await.expect("begin");
    let dropped = queue::enqueue(&mut *tx, &NewTask::new("deliver", json!({ "keep": false })))
        .await
        .expect("enqueue in transaction");
    tx.rollback().await.expect("rollback");
    assert!(queue::get(&db.pool, kept.id).await.expect("get").is_some());
    assert!(
        queue::get(&db.pool, dropped.id)
            .await
            .expect("get")
            .is_none()
    );
}

#[tokio::test]
async fn invalid_tasks_are_refused_before_the_database() {
    let db = TestDatabase::create().await.expect("test database");
    let bad = [
        NewTask::new("", json!({})),
        NewTask::new("poll", json!({})).max_attempts(0),
        NewTask::new("poll", json!({})).max_attempts(1001),
    ];
    for task in &bad {
        let error = queue::enqueue(&db.pool, task).await.expect_err("refused");
        assert!(matches!(error, QueueError::Invalid(_)), "{error}");
    }
}

#[tokio::test]
async fn a_transaction_of_enqueues_sends_one_notification() {
    let db = TestDatabase::create().await.expect("test database");
    let mut listener = PgListener::connect(&db.url).await.expect("listener");
    listener.listen(queue::WAKE_CHANNEL).await.expect("listen");

    let mut tx = db.pool.begin().await.expect("begin");
    for i in 0..50 {
        queue::enqueue(&mut tx, &NewTask::new("deliver", json!({ "n": i })))
            .await
            .expect("enqueue");
    }
    queue::enqueue_many(
        &mut tx,
        &(0..50)
            .map(|i| NewTask::new("deliver", json!({ "m": i })))
            .collect::<Vec<_>>(),
    )
    .await
    .expect("batch");
    // Tasks for later wake nobody.
    queue::enqueue(
        &mut tx,
        &NewTask::new("deliver", json!({})).run_at(Utc::now() + chrono::Duration::hours(1)),
    )
    .await
    .expect("scheduled");
    tx.commit().await.expect("commit");
    sqlx::query("SELECT pg_notify($1, 'sentinel')")
        .bind(queue::WAKE_CHANNEL)
        .execute(&db.pool)
        .await
        .expect("sentinel");

    let receive = async {
        let first = listener.recv().await.expect("notification");
        let second = listener.recv().await.expect("notification");
        (first.payload().to_owned(), second.payload().to_owned())
    };
    let (first, second) = tokio::time::timeout(Duration::from_secs(10), receive)
        .await
        .expect("notifications arrive within 10 s");
    assert_eq!(first, "", "one wake-up for the transaction");
    assert_eq!(
        second, "sentinel",
        "a second wake-up was sent for the same transaction"
    );

    // A scheduled task alone sends nothing.
    queue::enqueue(
        &db.pool,
        &NewTask::new("deliver", json!({})).run_at(Utc::now() + chrono::Duration::hours(1)),
    )
    .await
    .expect("scheduled");
    sqlx::query("SELECT pg_notify($1, 'sentinel-2')")
        .bind(queue::WAKE_CHANNEL)
        .execute(&db.pool)
        .await
        .expect("sentinel");
    let next = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("notification within 10 s")
        .expect("notification");
    assert_eq!(next.payload(), "sentinel-2");
}

#[tokio::test]
async fn claims_take_due_tasks_of_the_asked_kinds_oldest_first() {
    let db = TestDatabase::create().await.expect("test database");
    let past = Utc::now() - chrono::Duration::minutes(5);
    let later = Utc::now() + chrono::Duration::hours(1);
    let ids = queue::enqueue_many(
        &db.pool,
        &[
            NewTask::new("deliver", json!({ "n": 1 })),
            NewTask::new("poll", json!({ "n": 2 })).run_at(past),
            NewTask::new("deliver", json!({ "n": 3 })).run_at(later),
            NewTask::new("other", json!({ "n": 4 })),
        ],
    )
    .await
    .expect("enqueue");
    let claimed = queue::claim(
        &db.pool,
        &kinds(&["deliver", "poll"]),
        10,
        "w1",
        Duration::from_secs(30),
    )
    .await
    .expect("claim");
    let mut got: Vec<(i64, DateTime<Utc>)> =
        claimed.iter().map(|t| (t.id, t.lease_expires_at)).collect();
    got.sort();
    assert_eq!(
        got.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![ids[0].id, ids[1].id],
        "only due tasks of the asked kinds"
    );
    let tokens: HashSet<_> = claimed.iter().map(|t| t.lock_token).collect();
    assert_eq!(tokens.len(), 2, "every claim gets its own lock token");
    let row = task(&db.pool, ids[1].id).await;
    assert_eq!(row.state, TaskState::Running);
    assert_eq!(row.locked_by.as_deref(), Some("w1"));
    assert!(row.lease_expires_at.expect("lease") > Utc::now());

    // Oldest due first when the limit bites.
    let more = queue::enqueue_many(
        &db.pool,
        &[
            NewTask::new("deliver", json!({})),
            NewTask::new("deliver", json!({})).run_at(past),
        ],
    )
    .await
    .expect("enqueue");
    let first = claim_one(&db.pool, "deliver", "w2", Duration::from_secs(30)).await;
    assert_eq!(first.id, more[1].id);
}

#[tokio::test]
async fn concurrent_claims_never_hand_out_a_task_twice() {
    let db = TestDatabase::create().await.expect("test database");
    let tasks: Vec<NewTask> = (0..500)
        .map(|i| NewTask::new("deliver", json!({ "n": i })))
        .collect();
    queue::enqueue_many(&db.pool, &tasks)
        .await
        .expect("enqueue");
    let mut joins = Vec::new();
    for worker in 0..8 {
        let pool = db.pool.clone();
        joins.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claimed = queue::claim(
                    &pool,
                    &kinds(&["deliver"]),
                    7,
                    &format!("w{worker}"),
                    Duration::from_secs(60),
                )
                .await
                .expect("claim");
                if claimed.is_empty() {
                    return mine;
                }
                mine.extend(claimed.into_iter().map(|t| t.id));
            }
        }));
    }
    let mut all = Vec::new();
    for join in joins {
        all.extend(join.await.expect("join"));
    }
    let unique: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), 500, "every task claimed");
    assert_eq!(unique.len(), 500, "no task claimed twice");
}

#[tokio::test]
async fn failures_follow_the_backoff_schedule_then_die_with_the_error_kept() {
    let db = TestDatabase::create().await.expect("test database");
    let policy = RetryPolicy {
        base: Duration::from_secs(10),
        cap: Duration::from_secs(25),
    };
    let id = queue::enqueue(
        &db.pool,
        &NewTask::new("deliver", json!({})).max_attempts(4),
    )
    .await
    .expect("enqueue")
    .id;
    for failure in 1..=4u32 {
        let claimed = claim_one(&db.pool, "deliver", "w", Duration::from_secs(30)).await;
        assert_eq!(claimed.attempt(), failure as i32);
        let error = format!("webhook answered 503 (attempt {failure})");
        let transition = queue::fail(&db.pool, &claimed, error.clone(), &policy)
            .await
            .expect("fail");
        let row = task(&db.pool, id).await;
        assert_eq!(row.attempts, failure as i32);
        assert_eq!(row.last_error.as_deref(), Some(error.as_str()));
        assert!(row.lease_expires_at.is_none());
        if failure < 4 {
            assert!(matches!(transition, Transition::Retry { .. }));
            assert_eq!(row.state, TaskState::Pending);
            // Both times are the database's clock in the same transaction: the delay stored.
            let delay = (row.run_at - row.updated_at)
                .to_std()
                .expect("run_at is not before the failure");
            assert!(
                delay <= policy.ceiling(failure),
                "failure {failure}: waited {delay:?}, more than {:?}",
                policy.ceiling(failure)
            );
            assert_eq!(
                queue::claim(
                    &db.pool,
                    &kinds(&["deliver"]),
                    1,
                    "w",
                    Duration::from_secs(30)
                )
                .await
                .expect("claim")
                .len(),
                usize::from(delay.is_zero()),
                "a backing-off task is not due before its time"
            );
            if !delay.is_zero() {
                make_due(&db.pool, id).await;
            }
        } else {
            assert_eq!(
                transition,
                Transition::Dead {
                    error: error.clone()
                }
            );
            assert_eq!(row.state, TaskState::Dead);
            assert!(row.finished_at.is_some());
        }
    }
    let retry = |ids: Vec<i64>| {
        let pool = db.pool.clone();
        async move {
            let selection = TaskSelection {
                ids: Some(ids),
                ..TaskSelection::default()
            };
            queue::retry_dead_matching(&pool, &selection)
                .await
                .expect("retry")
        }
    };
    assert_eq!(
        retry(vec![id + 1000]).await,
        RetryReport::default(),
        "an unknown task: nothing"
    );
    assert_eq!(retry(vec![id]).await.revived, [id]);
    let row = task(&db.pool, id).await;
    assert_eq!(
        (row.state, row.attempts),
        (TaskState::Pending, 0),
        "a retried task starts over"
    );
    assert!(row.finished_at.is_none());
    assert_eq!(
        retry(vec![id]).await,
        RetryReport::default(),
        "not dead any more: left alone"
    );
}

#[tokio::test]
async fn backoff_delays_are_jittered_across_tasks() {
    let db = TestDatabase::create().await.expect("test database");
    let policy = RetryPolicy {
        base: Duration::from_secs(60),
        cap: Duration::from_secs(60),
    };
    let tasks: Vec<NewTask> = (0..20)
        .map(|_| NewTask::new("deliver", json!({})))
        .collect();
    queue::enqueue_many(&db.pool, &tasks)
        .await
        .expect("enqueue");
    let claimed = queue::claim(
        &db.pool,
        &kinds(&["deliver"]),
        20,
        "w",
        Duration::from_secs(30),
    )
    .await
    .expect("claim");
    for task in &claimed {
        queue::fail(&db.pool, task, "receiver down", &policy)
            .await
            .expect("fail");
    }
    let delays: HashSet<i64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM run_at - updated_at) * 1e6)::bigint FROM tasks",
    )
    .fetch_all(&db.pool)
    .await
    .expect("delays")
    .into_iter()
    .collect();
    assert!(
        delays.len() > 10,
        "tasks that failed together must not retry together: {delays:?}"
    );
    assert!(delays.iter().all(|d| (0..=60_000_000).contains(d)));
}

#[tokio::test]
async fn permanent_failures_snoozes_and_releases() {
    let db = TestDatabase::create().await.expect("test database");
    let ids: Vec<i64> = queue::enqueue_many(
        &db.pool,
        &(0..3)
            .map(|i| NewTask::new("deliver", json!({ "n": i })))
            .collect::<Vec<_>>(),
    )
    .await
    .expect("enqueue")
    .into_iter()
    .map(|e| e.id)
    .collect();
    let claimed = queue::claim(
        &db.pool,
        &kinds(&["deliver"]),
        3,
        "w",
        Duration::from_secs(30),
    )
    .await
    .expect("claim");
    let lease_of = |id: i64| {
        claimed
            .iter()
            .find(|t| t.id == id)
            .expect("claimed")
            .lease()
    };
    let before = task(&db.pool, ids[2]).await.run_at;
    let outcome = queue::finish(
        &db.pool,
        &[
            (
                lease_of(ids[0]),
                Transition::Dead {
                    error: "payload names no message".into(),
                },
            ),
            (
                lease_of(ids[1]),
                Transition::Snooze {
                    delay: Duration::from_secs(120),
                },
            ),
            (lease_of(ids[2]), Transition::Release),
        ],
    )
    .await
    .expect("finish");
    assert_eq!(outcome.applied.len(), 3);
    assert!(outcome.refused.is_empty());

    let dead = task(&db.pool, ids[0]).await;
    assert_eq!((dead.state, dead.attempts), (TaskState::Dead, 1));
    let snoozed = task(&db.pool, ids[1]).await;
    assert_eq!((snoozed.state, snoozed.attempts), (TaskState::Pending, 0));
    let waited = (snoozed.run_at - snoozed.updated_at).num_seconds();
    assert_eq!(waited, 120, "snoozed for the asked time");
    let released = task(&db.pool, ids[2]).await;
    assert_eq!(
        (released.state, released.attempts, released.run_at),
        (TaskState::Pending, 0, before),
        "a released task keeps its place and counts no attempt"
    );
    assert!(released.lease_expires_at.is_none());
}

#[tokio::test]
async fn a_stale_lease_changes_nothing() {
    let db = TestDatabase::create().await.expect("test database");
    let id = queue::enqueue(&db.pool, &NewTask::new("deliver", json!({})))
        .await
        .expect("enqueue")
        .id;
    let first = claim_one(&db.pool, "deliver", "w1", Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let no_backoff = RetryPolicy {
        base: Duration::ZERO,
        cap: Duration::ZERO,
    };
    let rescued = queue::rescue(&db.pool, 100, &no_backoff)
        .await
        .expect("rescue");
    assert_eq!(rescued.requeued, vec![id]);
    let second = claim_one(&db.pool, "deliver", "w2", Duration::from_secs(30)).await;
    assert_ne!(first.lock_token, second.lock_token);

    let stale = first.lease();
    let policy = RetryPolicy::default();
    for result in [
        queue::complete(&db.pool, stale).await,
        queue::fail(&db.pool, &first, "late", &policy)
            .await
            .map(|_| ()),
        queue::snooze(&db.pool, stale, Duration::from_secs(5)).await,
    ] {
        let error = result.expect_err("stale lease refused");
        assert!(
            matches!(error, QueueError::LeaseLost { id: got } if got == id),
            "{error}"
        );
    }
    let released = queue::release(&db.pool, &[stale]).await.expect("release");
    assert_eq!(released.refused, vec![id]);
    let still_held = queue::heartbeat(&db.pool, &[stale], Duration::from_secs(60))
        .await
        .expect("heartbeat");
    assert!(still_held.is_empty());
    let forged = Lease {
        id,
        token: uuid::Uuid::new_v4(),
    };
    assert!(queue::complete(&db.pool, forged).await.is_err());

    let row = task(&db.pool, id).await;
    assert_eq!(row.state, TaskState::Running);
    assert_eq!(row.locked_by.as_deref(), Some("w2"));
    assert_eq!(row.attempts, 1, "the expired lease counted one attempt");

    queue::complete(&db.pool, second.lease())
        .await
        .expect("current holder completes");
    assert_eq!(task(&db.pool, id).await.state, TaskState::Succeeded);
}

#[tokio::test]
async fn heartbeats_keep_leases_from_expiring() {
    let db = TestDatabase::create().await.expect("test database");
    let tasks = [json!({ "n": 1 }), json!({ "n": 2 })].map(|args| NewTask::new("deliver", args));
    queue::enqueue_many(&db.pool, &tasks)
        .await
        .expect("enqueue");
    // Both get the same short lease and only one a heartbeat: the other one's rescue shows
    // that a lease this short has run out, so the first would have been rescued too.
    let claimed = queue::claim(
        &db.pool,
        &kinds(&["deliver"]),
        2,
        "w",
        Duration::from_millis(1),
    )
    .await
    .expect("claim");
    let [kept, left] = <[ClaimedTask; 2]>::try_from(claimed).expect("two claimed");
    let held = queue::heartbeat(&db.pool, &[kept.lease()], Duration::from_secs(60))
        .await
        .expect("heartbeat");
    assert_eq!(held, vec![kept.id]);
    wait_until(
        "the lease without heartbeats rescued",
        Duration::from_secs(10),
        || async {
            let rescued = queue::rescue(&db.pool, 100, &RetryPolicy::default())
                .await
                .expect("rescue");
            rescued.requeued.contains(&left.id)
        },
    )
    .await;
    let row = task(&db.pool, kept.id).await;
    assert_eq!(
        (row.state, row.attempts),
        (TaskState::Running, 0),
        "an extended lease is not rescued"
    );
    let still_held = queue::heartbeat(&db.pool, &[kept.lease()], Duration::from_secs(60))
        .await
        .expect("heartbeat");
    assert_eq!(still_held, vec![kept.id], "by the same holder");
}

#[tokio::test]
async fn rescue_counts_an_attempt_and_kills_exhausted_tasks() {
    let db = TestDatabase::create().await.expect("test database");
    let ids = queue::enqueue_many(
        &db.pool,
        &[
            NewTask::new("deliver", json!({})).max_attempts(1),
            NewTask::new("deliver", json!({})).max_attempts(5),
        ],
    )
    .await
    .expect("enqueue");
    queue::claim(
        &db.pool,
        &kinds(&["deliver"]),
        2,
        "crashed-worker",
        Duration::from_millis(1),
    )
    .await
    .expect("claim");
    tokio::time::sleep(Duration::from_millis(20)).await;

    // Several replicas rescuing at once take each task once. A rescued task backs off as a
    // failed one does.
    let backoff = RetryPolicy {
        base: Duration::from_secs(60),
        cap: Duration::from_secs(60),
    };
    let before: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&db.pool)
        .await
        .expect("now");
    let (a, b, c) = tokio::join!(
        queue::rescue(&db.pool, 100, &backoff),
        queue::rescue(&db.pool, 100, &backoff),
        queue::rescue(&db.pool, 100, &backoff)
    );
    let reports = [a.expect("rescue"), b.expect("rescue"), c.expect("rescue")];
    let requeued: Vec<i64> = reports.iter().flat_map(|r| r.requeued.clone()).collect();
    let dead: Vec<i64> = reports.iter().flat_map(|r| r.dead.clone()).collect();
    assert_eq!(requeued, vec![ids[1].id]);
    assert_eq!(dead, vec![ids[0].id]);

    let dead_row = task(&db.pool, ids[0].id).await;
    assert_eq!((dead_row.state, dead_row.attempts), (TaskState::Dead, 1));
    let error = dead_row.last_error.expect("error kept");
    assert!(error.contains("crashed-worker"), "{error}");
    let requeued_row = task(&db.pool, ids[1].id).await;
    assert_eq!(
        (requeued_row.state, requeued_row.attempts),
        (TaskState::Pending, 1)
    );
    assert!(
        requeued_row.run_at >= before
            && requeued_row.run_at <= before + chrono::Duration::seconds(61),
        "due within the first backoff ceiling: {} vs {before}",
        requeued_row.run_at
    );
}

#[tokio::test]
async fn prune_deletes_old_finished_tasks_in_bounded_batches() {
    let db = TestDatabase::create().await.expect("test database");
    let tasks: Vec<NewTask> = (0..25)
        .map(|_| NewTask::new("deliver", json!({})))
        .collect();
    queue::enqueue_many(&db.pool, &tasks)
        .await
        .expect("enqueue");
    let claimed = queue::claim(
        &db.pool,
        &kinds(&["deliver"]),
        25,
        "w",
        Duration::from_secs(30),
    )
    .await
    .expect("claim");
    let mut items: Vec<(Lease, Transition)> = claimed
        .iter()
        .take(20)
        .map(|t| (t.lease(), Transition::Succeed))
        .collect();
    items.push((
        claimed[20].lease(),
        Transition::Dead {
            error: "kept for people".into(),
        },
    ));
    queue::finish(&db.pool, &items).await.expect("finish");
    sqlx::query(
        "UPDATE tasks SET finished_at = now() - interval '2 days' WHERE finished_at IS NOT NULL",
    )
    .execute(&db.pool)
    .await
    .expect("age tasks");

    let retention = Duration::from_secs(24 * 3600);
    let first = queue::prune(&db.pool, retention, 8).await.expect("prune");
    assert_eq!(first.deleted, 8, "one bounded batch");
    let mut total = first.deleted;
    loop {
        let round = queue::prune(&db.pool, retention, 8).await.expect("prune");
        total += round.deleted;
        if round.deleted < 8 {
            break;
        }
    }
    assert_eq!(total, 20, "succeeded tasks pruned");
    let left: Vec<String> = sqlx::query_scalar("SELECT state FROM tasks ORDER BY state")
        .fetch_all(&db.pool)
        .await
        .expect("left");
    assert_eq!(left.iter().filter(|s| *s == "dead").count(), 1, "dead kept");
    assert_eq!(left.iter().filter(|s| *s == "running").count(), 4);
    let recent = queue::prune(&db.pool, Duration::from_secs(365 * 24 * 3600), 100)
        .await
        .expect("prune");
    assert_eq!(recent.deleted, 0);
}

#[tokio::test]
async fn depth_reports_states_kinds_and_the_oldest_wait() {
    let db = TestDatabase::create().await.expect("test database");
    let past = Utc::now() - chrono::Duration::minutes(10);
    queue::enqueue_many(
        &db.pool,
        &[
            NewTask::new("deliver", json!({})).run_at(past),
            NewTask::new("deliver", json!({})),
            NewTask::new("poll", json!({})),
            NewTask::new("poll", json!({})).run_at(Utc::now() + chrono::Duration::hours(1)),
        ],
    )
    .await
    .expect("enqueue");
    claim_one(&db.pool, "poll", "w", Duration::from_secs(30)).await;
    let depth = queue::depth(&db.pool).await.expect("depth");
    assert_eq!(depth.count(TaskState::Pending), 3);
    assert_eq!(depth.count(TaskState::Running), 1);
    let oldest = depth.oldest_pending_age().expect("a task is due");
    assert!(
        oldest >= Duration::from_secs(599),
        "oldest due task waited 10 minutes: {oldest:?}"
    );
    let poll_pending = depth
        .rows
        .iter()
        .find(|r| r.kind == "poll" && r.state == TaskState::Pending)
        .expect("pending poll row");
    assert_eq!(poll_pending.tasks, 1);
    assert_eq!(
        poll_pending.oldest_due_age, None,
        "the poll task is not due"
    );
}

#[tokio::test]
async fn cancelling_an_owner_cancels_its_live_tasks() {
    let db = TestDatabase::create().await.expect("test database");
    let owner = uuid::Uuid::new_v4();
    let other = uuid::Uuid::new_v4();
    queue::enqueue_many(
        &db.pool,
        &[
            NewTask::new("poll", json!({})).owner(owner),
            NewTask::new("deliver", json!({})).owner(owner),
            NewTask::new("deliver", json!({})).owner(other),
        ],
    )
    .await
    .expect("enqueue");
    let running = claim_one(&db.pool, "poll", "w", Duration::from_secs(30)).await;
    assert_eq!(
        queue::cancel_owner(&db.pool, owner).await.expect("cancel"),
        2
    );
    let error = queue::complete(&db.pool, running.lease())
        .await
        .expect_err("a cancelled task's worker lost its lease");
    assert!(matches!(error, QueueError::LeaseLost { .. }));
    let states: Vec<(Option<uuid::Uuid>, String)> =
        sqlx::query_as("SELECT owner_uid, state FROM tasks ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .expect("states");
    assert_eq!(
        states,
        vec![
            (Some(owner), "cancelled".into()),
            (Some(owner), "cancelled".into()),
            (Some(other), "pending".into()),
        ]
    );
}

#[tokio::test]
async fn retrying_a_dead_task_whose_key_is_live_again_cancels_it() {
    let db = TestDatabase::create().await.expect("test database");
    let task = NewTask::new("poll", json!({}))
        .dedupe_key("poll:mailbox-9")
        .max_attempts(1);
    let dead = queue::enqueue(&db.pool, &task).await.expect("enqueue").id;
    let claimed = claim_one(&db.pool, "poll", "w", Duration::from_secs(30)).await;
    queue::fail(
        &db.pool,
        &claimed,
        "mailbox not found",
        &RetryPolicy::default(),
    )
    .await
    .expect("fail");
    assert_eq!(self::task(&db.pool, dead).await.state, TaskState::Dead);
    // The key is free once the task is dead: the scheduler enqueues a new poll.
    let live = queue::enqueue(&db.pool, &task)
        .await
        .expect("enqueue again");
    assert!(live.fresh);
    let selection = TaskSelection {
        ids: Some(vec![dead]),
        ..TaskSelection::default()
    };
    let report = queue::retry_dead_matching(&db.pool, &selection)
        .await
        .expect("retry");
    assert_eq!(
        (report.revived, report.superseded),
        (vec![], vec![dead]),
        "never two live tasks with one key: the dead one is cancelled instead"
    );
    assert_eq!(self::task(&db.pool, dead).await.state, TaskState::Cancelled);
    assert_eq!(
        self::task(&db.pool, live.id).await.state,
        TaskState::Pending
    );
}

/// One result whose error text Postgres refuses (a NUL, as a receiver's body can carry) fails
/// only its own task: the batch is split, the others are recorded as they were, and the bad
/// one ends as it should with a safe error text. Also inside a caller's transaction.
#[tokio::test]
async fn a_result_postgres_refuses_fails_only_its_own_task() {
    let db = TestDatabase::create().await.expect("test database");
    for in_transaction in [false, true] {
        let mut ids = Vec::new();
        for i in 0..5 {
            let task = NewTask::new("deliver", json!({ "i": i }));
            ids.push(queue::enqueue(&db.pool, &task).await.expect("enqueue").id);
        }
        let claimed = queue::claim(
            &db.pool,
            &kinds(&["deliver"]),
            5,
            "w",
            Duration::from_secs(30),
        )
        .await
        .expect("claim");
        assert_eq!(claimed.len(), 5);
        let items: Vec<(queue::Lease, Transition)> = claimed
            .iter()
            .map(|t| {
                let transition = if t.id == ids[2] {
                    Transition::Dead {
                        error: "HTTP 400: \u{0}garbage".into(),
                    }
                } else if t.id == ids[3] {
                    Transition::Retry {
                        delay: Duration::from_secs(60),
                        error: "also \u{0} bad".into(),
                    }
                } else {
                    Transition::Succeed
                };
                (t.lease(), transition)
            })
            .collect();
        let outcome = if in_transaction {
            let mut tx = db.pool.begin().await.expect("begin");
            let outcome = queue::finish(&mut *tx, &items).await.expect("finish");
            tx.commit().await.expect("the transaction stays usable");
            outcome
        } else {
            queue::finish(&db.pool, &items).await.expect("finish")
        };
        assert_eq!(outcome.applied.len(), 5, "{outcome:?}");
        assert!(outcome.refused.is_empty());
        for (i, id) in ids.iter().enumerate() {
            let row = task(&db.pool, *id).await;
            match i {
                2 => {
                    assert_eq!(row.state, TaskState::Dead);
                    let error = row.last_error.expect("an error is kept");
                    assert!(error.contains("could not be stored"), "{error}");
                }
                3 => {
                    assert_eq!((row.state, row.attempts), (TaskState::Pending, 1));
                    assert!(row.last_error.expect("error").contains("SQLSTATE"));
                }
                _ => assert_eq!(row.state, TaskState::Succeeded),
            }
        }
    }
}

/// A failure whose text carries control characters is stored readable (handler errors quote
/// receivers' and Graph's bodies).
#[tokio::test]
async fn failure_texts_are_made_storable() {
    let db = TestDatabase::create().await.expect("test database");
    let id = queue::enqueue(&db.pool, &NewTask::new("deliver", json!({})))
        .await
        .expect("enqueue")
        .id;
    let claimed = claim_one(&db.pool, "deliver", "w", Duration::from_secs(30)).await;
    let policy = RetryPolicy {
        base: Duration::from_millis(10),
        cap: Duration::from_millis(10),
    };
    queue::fail(&db.pool, &claimed, "rejected: \u{0}\u{1b}[31m", &policy)
        .await
        .expect("fail");
    let row = task(&db.pool, id).await;
    assert_eq!(
        row.last_error.as_deref(),
        Some("rejected: \u{fffd}\u{fffd}[31m")
    );
}

/// A task that reads whatever work is waiting when it runs: work added while it runs (after it
/// may have looked) asks it to run once more, so that work never waits without a run. A rerun
/// is not a failed attempt, and starts afresh: failures before the success no longer count
/// (nor lengthen its next backoff). With nothing live, the enqueue adds a task as usual.
#[tokio::test]
async fn an_enqueue_meeting_a_live_task_asks_it_to_run_once_more() {
    let db = TestDatabase::create().await.expect("test database");
    let batch = || NewTask::new("actions", json!({"mailbox": "m"})).dedupe_key("actions:m");
    let enqueue_or_rerun = |task: NewTask| {
        let pool = db.pool.clone();
        async move {
            let mut conn = pool.acquire().await.expect("connection");
            queue::enqueue_or_rerun_on(&mut conn, &task)
                .await
                .expect("enqueue or rerun")
        }
    };
    let first = enqueue_or_rerun(batch()).await;
    assert!(first.fresh);
    let failed = claim_one(&db.pool, "actions", "w1", Duration::from_secs(30)).await;
    let at_once = RetryPolicy {
        base: Duration::ZERO,
        cap: Duration::ZERO,
    };
    queue::fail(&db.pool, &failed, "Graph answered 503", &at_once)
        .await
        .expect("fail");
    let running = claim_one(&db.pool, "actions", "w1", Duration::from_secs(30)).await;
    assert_eq!((running.id, running.attempt()), (first.id, 2));

    // Work arrives while it runs: no second task, the running one is asked to rerun.
    let again = enqueue_or_rerun(batch()).await;
    assert_eq!((again.id, again.fresh), (first.id, false));
    queue::complete(&db.pool, running.lease())
        .await
        .expect("complete");
    let row = task(&db.pool, first.id).await;
    assert_eq!(
        (row.state, row.attempts),
        (TaskState::Pending, 0),
        "its success put it back to pending, due now, without counting an attempt"
    );

    // The rerun finishes for good when nothing arrived meanwhile.
    let rerun = claim_one(&db.pool, "actions", "w2", Duration::from_secs(30)).await;
    assert_eq!(rerun.id, first.id);
    queue::complete(&db.pool, rerun.lease())
        .await
        .expect("complete");
    assert_eq!(task(&db.pool, first.id).await.state, TaskState::Succeeded);

    // With no live task, a new one is added.
    let next = enqueue_or_rerun(batch()).await;
    assert!(next.fresh && next.id != first.id);
}
