//! Retention, the `Delete` deletion policy and the ledger counters against real Postgres:
//! bounded purges, a horizon that keeps purged messages from coming back, counters equal to a
//! count under concurrent writers, and status reads whose cost does not grow with history.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use mailpoll::controller::{deletion, fence};
use mailpoll::identity::{self, DeletionPolicy, Owner};
use mailpoll::ledger::{self, DeliveredMark, DeliveryState, LedgerMessage};
use mailpoll::poll_log;
use mailpoll_testkit::pg::TestDatabase;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn message(id: &str, received: DateTime<Utc>) -> LedgerMessage {
    LedgerMessage {
        message_id: id.into(),
        internet_message_id: Some(format!("<{id}@contoso.com>")),
        subject: Some(format!("Subject {id}")),
        from_address: Some("billing@fabrikam.com".into()),
        from_name: Some("Fabrikam".into()),
        to_recipients: json!([{"name": "Ops", "address": "ops@contoso.com"}]),
        received_at: Some(received),
        body_preview: Some("hello".into()),
        body: Some("hello".into()),
        raw: json!({"id": id}),
        ..Default::default()
    }
}

fn days_ago(days: i64) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::days(days)
}

async fn record(pool: &PgPool, ledger_id: Uuid, messages: &[LedgerMessage]) -> Vec<String> {
    let mut tx = pool.begin().await.expect("transaction");
    let recorded = ledger::record_page(&mut tx, ledger_id, messages, &[], DeliveryState::Pending)
        .await
        .expect("record");
    // As if recorded when received: identity retention counts both.
    sqlx::query(
        "UPDATE messages SET recorded_at = LEAST(recorded_at, received_at)
         WHERE mailbox_uid = $1 AND message_id = ANY($2)",
    )
    .bind(ledger_id)
    .bind(&recorded.new_ids)
    .execute(&mut *tx)
    .await
    .expect("recording times");
    tx.commit().await.expect("commit");
    recorded.new_ids
}

async fn deliver(pool: &PgPool, ledger_id: Uuid, ids: &[&str]) {
    let marks: Vec<DeliveredMark> = ids
        .iter()
        .map(|id| DeliveredMark {
            mailbox_uid: ledger_id,
            message_id: (*id).into(),
            webhook_posted: true,
        })
        .collect();
    let mut conn = pool.acquire().await.expect("connection");
    ledger::mark_delivered(&mut conn, &marks)
        .await
        .expect("mark delivered");
}

async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn backdate_recording(pool: &PgPool, days: i32) {
    sqlx::query("UPDATE messages SET recorded_at = now() - make_interval(days => $1)")
        .bind(days)
        .execute(pool)
        .await
        .expect("backdate");
}

#[tokio::test]
async fn content_is_cleared_in_bounded_batches_and_pending_messages_keep_theirs() {
    let db = TestDatabase::create().await.expect("test database");
    let ledger_id = Uuid::new_v4();
    let page: Vec<LedgerMessage> = (0..5)
        .map(|n| message(&format!("m{n}"), days_ago(40)))
        .collect();
    record(&db.pool, ledger_id, &page).await;
    deliver(&db.pool, ledger_id, &["m0", "m1", "m2", "m3"]).await;
    backdate_recording(&db.pool, 31).await;

    let first = ledger::purge_content(&db.pool, 30 * DAY, 3)
        .await
        .expect("purge");
    assert_eq!(first, 3, "one batch, no more");
    let second = ledger::purge_content(&db.pool, 30 * DAY, 3)
        .await
        .expect("purge");
    assert_eq!(second, 1, "the pending message keeps its content");
    assert_eq!(
        ledger::purge_content(&db.pool, 30 * DAY, 3)
            .await
            .expect("purge"),
        0
    );

    let mut conn = db.pool.acquire().await.expect("connection");
    let purged = ledger::get(&mut conn, ledger_id, "m0")
        .await
        .expect("get")
        .expect("the row stays");
    assert!(purged.content_purged_at.is_some());
    assert_eq!(purged.delivery_state, "delivered");
    let m = purged.message;
    assert_eq!(
        (
            m.subject,
            m.from_address,
            m.body,
            m.body_preview,
            m.internet_message_id
        ),
        (None, None, None, None, None)
    );
    assert_eq!((m.to_recipients, m.raw), (json!([]), json!({})));
    assert_eq!(
        m.received_at.map(|r| r.date_naive()),
        Some(days_ago(40).date_naive())
    );
    let pending = ledger::get(&mut conn, ledger_id, "m4")
        .await
        .expect("get")
        .expect("pending row");
    assert_eq!(pending.message.subject.as_deref(), Some("Subject m4"));
}

#[tokio::test]
async fn purged_identities_never_come_back_and_newer_mail_still_does() {
    let db = TestDatabase::create().await.expect("test database");
    let ledger_id = Uuid::new_v4();
    let old: Vec<LedgerMessage> = (0..4)
        .map(|n| {
            message(
                &format!("old{n}"),
                days_ago(200) + chrono::Duration::minutes(n),
            )
        })
        .collect();
    record(&db.pool, ledger_id, &old).await;
    record(&db.pool, ledger_id, &[message("recent", days_ago(1))]).await;
    // old3 is still waiting for delivery: it stays whatever its age.
    deliver(&db.pool, ledger_id, &["old0", "old1", "old2", "recent"]).await;

    let purge = ledger::purge_identities(&db.pool, ledger_id, 180 * DAY, 1000)
        .await
        .expect("purge");
    assert_eq!((purge.deleted, purge.busy), (3, false));
    let horizon: DateTime<Utc> =
        sqlx::query_scalar("SELECT purged_through FROM ledger_horizons WHERE ledger_id = $1")
            .bind(ledger_id)
            .fetch_one(&db.pool)
            .await
            .expect("horizon");
    assert_eq!(
        horizon.timestamp_micros(),
        old[2].received_at.expect("received").timestamp_micros(),
        "the newest received time purged"
    );

    // A resync replays everything: nothing purged is recorded (so delivered) again; a message
    // never seen but received after the horizon is new.
    let mut replay = old.clone();
    replay.push(message("recent", days_ago(1)));
    replay.push(message("late-arrival", days_ago(150)));
    let new_ids = record(&db.pool, ledger_id, &replay).await;
    assert_eq!(new_ids, ["late-arrival"]);
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM messages").await,
        3,
        "old3 (pending), recent, late-arrival"
    );
}

#[tokio::test]
async fn a_purge_never_waits_for_a_page_being_recorded() {
    let db = TestDatabase::create().await.expect("test database");
    let ledger_id = Uuid::new_v4();
    record(&db.pool, ledger_id, &[message("old", days_ago(200))]).await;
    deliver(&db.pool, ledger_id, &["old"]).await;
    let mut page = db.pool.begin().await.expect("page transaction");
    ledger::record_page(
        &mut page,
        ledger_id,
        &[message("new", days_ago(0))],
        &[],
        DeliveryState::Pending,
    )
    .await
    .expect("record");
    let purge = ledger::purge_identities(&db.pool, ledger_id, 180 * DAY, 1000)
        .await
        .expect("purge");
    assert_eq!((purge.deleted, purge.busy), (0, true));
    page.commit().await.expect("commit");
    let purge = ledger::purge_identities(&db.pool, ledger_id, 180 * DAY, 1000)
        .await
        .expect("purge");
    assert_eq!((purge.deleted, purge.busy), (1, false));
}

async fn exact_counts(pool: &PgPool, ledger_id: Uuid) -> (i64, i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE delivery_state = 'delivered'),
                count(*) FILTER (WHERE delivery_state = 'pending'),
                count(*) FILTER (WHERE delivery_state = 'failed'),
                count(*) FILTER (WHERE delivery_state = 'none'),
                count(*) FILTER (WHERE actions_parked_at IS NOT NULL)
         FROM messages WHERE mailbox_uid = $1",
    )
    .bind(ledger_id)
    .fetch_one(pool)
    .await
    .expect("count")
}

async fn counters(pool: &PgPool, ledger_id: Uuid) -> (i64, i64, i64, i64, i64) {
    let mut conn = pool.acquire().await.expect("connection");
    let c = ledger::counts(&mut conn, ledger_id).await.expect("counts");
    (
        c.delivered,
        c.pending,
        c.failed,
        c.recorded_only,
        c.actions_parked,
    )
}

/// Writers of every kind at once on two ledgers, with status reads folding the counters in
/// between: the counters end equal to a count of the rows.
#[tokio::test]
async fn counters_equal_a_count_after_concurrent_record_deliver_fail_and_purge() {
    let db = TestDatabase::create().await.expect("test database");
    let ledgers = [Uuid::new_v4(), Uuid::new_v4()];
    let mut writers = Vec::new();
    for (w, ledger_id) in ledgers.iter().cycle().take(8).enumerate() {
        let pool = db.pool.clone();
        let ledger_id = *ledger_id;
        writers.push(tokio::spawn(async move {
            for round in 0..15 {
                let ids: Vec<String> = (0..6).map(|n| format!("w{w}-r{round}-{n}")).collect();
                let page: Vec<LedgerMessage> = ids
                    .iter()
                    .enumerate()
                    .map(|(n, id)| message(id, days_ago(if n < 2 { 300 } else { 0 })))
                    .collect();
                // Replays of the previous round's page as well.
                record(&pool, ledger_id, &page).await;
                record(&pool, ledger_id, &page[..3]).await;
                let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                deliver(&pool, ledger_id, &refs[..3]).await;
                let mut conn = pool.acquire().await.expect("connection");
                ledger::mark_failed(&mut conn, ledger_id, refs[3], "receiver said no")
                    .await
                    .expect("fail");
                drop(conn);
                ledger::purge_identities(&pool, ledger_id, 200 * DAY, 3)
                    .await
                    .expect("purge");
                if round % 4 == 0 {
                    counters(&pool, ledger_id).await;
                }
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    for ledger_id in ledgers {
        let expected = exact_counts(&db.pool, ledger_id).await;
        assert!(expected.0 > 0 && expected.1 > 0 && expected.2 > 0);
        assert_eq!(counters(&db.pool, ledger_id).await, expected);
    }
}

/// Blocks the status reads of one MailboxPoll touched (heap and index pages, read or hit),
/// measured in the reading transaction: `(ledger, poll history)`. On a connection of its own:
/// a backend's "transaction" counters also hold what its earlier transactions did until its
/// statistics are flushed (at most once a second), so a pooled connection that loaded the
/// history would count the load too.
async fn status_read_blocks(url: &str, ledger_id: Uuid) -> (i64, i64) {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url)
        .await
        .expect("a fresh connection");
    let mut tx = sqlx::Connection::begin(&mut conn)
        .await
        .expect("transaction");
    ledger::counts(&mut tx, ledger_id).await.expect("counts");
    ledger::latest_parked_error(&mut tx, ledger_id)
        .await
        .expect("parked");
    poll_log::latest_finished(&mut tx, ledger_id)
        .await
        .expect("latest");
    poll_log::latest_decisive(&mut tx, ledger_id)
        .await
        .expect("decisive");
    poll_log::summary(&mut tx, ledger_id)
        .await
        .expect("summary");
    poll_log::last_handled_request(&mut tx, ledger_id)
        .await
        .expect("request");
    let blocks = |tables: &'static [&'static str]| {
        sqlx::query_scalar::<_, i64>(
            "SELECT COALESCE(sum(pg_stat_get_xact_blocks_fetched(c.oid)), 0)::bigint
             FROM pg_class c
             WHERE c.relname = ANY($1)
                OR c.oid IN (SELECT indexrelid FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
                             WHERE t.relname = ANY($1))",
        )
        .bind(tables)
    };
    let ledger = blocks(&["messages"])
        .fetch_one(&mut *tx)
        .await
        .expect("ledger blocks");
    let history = blocks(&["polls", "poll_requests"])
        .fetch_one(&mut *tx)
        .await
        .expect("history blocks");
    tx.rollback().await.expect("rollback");
    (ledger, history)
}

async fn load_history(pool: &PgPool, ledger_id: Uuid, rows: i64) {
    sqlx::query(
        "INSERT INTO messages (mailbox_uid, message_id, received_at, delivery_state)
         SELECT $1, 'g' || g || '-' || $2, now() - g * interval '1 second',
                CASE WHEN g % 10 = 0 THEN 'pending' ELSE 'delivered' END
         FROM generate_series(1, $2) g",
    )
    .bind(ledger_id)
    .bind(rows)
    .execute(pool)
    .await
    .expect("ledger rows");
    let polls = rows / 10;
    sqlx::query(
        "INSERT INTO polls (mailbox_uid, started_at, finished_at, outcome, error_reason, resynced)
         SELECT $1, now() - g * interval '1 minute', now() - g * interval '1 minute',
                CASE WHEN g % 3 = 0 THEN 'succeeded' ELSE 'failed' END,
                CASE WHEN g % 3 = 0 THEN NULL ELSE 'Throttled' END, g % 50 = 0
         FROM generate_series(1, $2) g",
    )
    .bind(ledger_id)
    .bind(polls)
    .execute(pool)
    .await
    .expect("polls");
    sqlx::query(
        "INSERT INTO poll_requests (mailbox_uid, value, requested_at, served_at)
         SELECT $1, 'v' || g || '-' || $2, now() - g * interval '1 minute',
                now() - g * interval '1 minute'
         FROM generate_series(1, $2) g",
    )
    .bind(ledger_id)
    .bind(polls)
    .execute(pool)
    .await
    .expect("requests");
    sqlx::query("ANALYZE messages, polls, poll_requests")
        .execute(pool)
        .await
        .expect("analyze");
}

/// The status reads of a MailboxPoll touch as many pages with 1,000 ledger rows as with
/// 1,000,000 (and a hundred times the poll history): they read counters and the latest rows
/// through indexes, never the history.
#[tokio::test]
async fn status_reads_cost_the_same_whatever_the_history() {
    let db = TestDatabase::create().await.expect("test database");
    let small = Uuid::new_v4();
    let large = Uuid::new_v4();
    load_history(&db.pool, small, 1_000).await;
    load_history(&db.pool, large, 1_000_000).await;
    // The first read folds the load's counter delta; measure the steady state after it.
    for ledger_id in [small, large] {
        status_read_blocks(&db.url, ledger_id).await;
        let (delivered, pending, ..) = counters(&db.pool, ledger_id).await;
        let expected = exact_counts(&db.pool, ledger_id).await;
        assert_eq!((delivered, pending), (expected.0, expected.1));
    }
    let small_blocks = status_read_blocks(&db.url, small).await;
    let large_blocks = status_read_blocks(&db.url, large).await;
    eprintln!(
        "status read blocks (ledger, poll history): 1k rows {small_blocks:?}, 1M rows {large_blocks:?}"
    );
    // Each lookup descends a B-tree: a thousand times the rows may add a level to an index
    // (a page per lookup), never pages in proportion to the rows.
    assert!(
        large_blocks.0 <= small_blocks.0 + 2,
        "ledger pages read by status grew with the ledger: {small_blocks:?} at 1k rows, {large_blocks:?} at 1M"
    );
    assert!(
        large_blocks.1 <= small_blocks.1 + 20,
        "status reads grew with history: {small_blocks:?} at 1k rows, {large_blocks:?} at 1M"
    );
}

#[tokio::test]
async fn poll_history_is_pruned_but_the_rows_status_reads_stay() {
    let db = TestDatabase::create().await.expect("test database");
    let uid = Uuid::new_v4();
    // Oldest first: a success, a resync, a decisive failure, then throttled failures.
    sqlx::query(
        "INSERT INTO polls (mailbox_uid, started_at, finished_at, outcome, error_reason, resynced)
         SELECT $1, now() - (100 - g) * interval '1 day', now() - (100 - g) * interval '1 day',
                CASE WHEN g = 1 THEN 'succeeded' ELSE 'failed' END,
                CASE g WHEN 1 THEN NULL WHEN 3 THEN 'AuthenticationFailed' ELSE 'Throttled' END,
                g = 2
         FROM generate_series(1, 60) g",
    )
    .bind(uid)
    .execute(&db.pool)
    .await
    .expect("polls");
    sqlx::query(
        "INSERT INTO poll_requests (mailbox_uid, value, requested_at, served_at)
         SELECT $1, 'v' || g, now() - (100 - g) * interval '1 day', now() - (100 - g) * interval '1 day'
         FROM generate_series(1, 5) g",
    )
    .bind(uid)
    .execute(&db.pool)
    .await
    .expect("requests");
    let mut conn = db.pool.acquire().await.expect("connection");
    let before = poll_log::summary(&mut conn, uid).await.expect("summary");
    let decisive_before = poll_log::latest_decisive(&mut conn, uid)
        .await
        .expect("decisive");

    let mut pruned = 0;
    loop {
        let batch = poll_log::prune_polls(&db.pool, 30 * DAY, 7)
            .await
            .expect("prune");
        assert!(batch <= 7);
        pruned += batch;
        if batch < 7 {
            break;
        }
    }
    // 60 polls, all older than 30 days but the newest... none: all are 40+ days old. Kept:
    // the latest, the latest success, the latest resync, the latest decisive.
    assert_eq!(pruned, 56);
    assert_eq!(
        poll_log::summary(&mut conn, uid).await.expect("summary"),
        before
    );
    assert_eq!(
        poll_log::latest_decisive(&mut conn, uid)
            .await
            .expect("decisive"),
        decisive_before
    );
    assert_eq!(
        poll_log::prune_requests(&db.pool, 30 * DAY, 100)
            .await
            .expect("prune requests"),
        4
    );
    assert_eq!(
        poll_log::last_handled_request(&mut conn, uid)
            .await
            .expect("request")
            .as_deref(),
        Some("v5")
    );
    // The kept value still counts as seen: the annotation carrying it causes no new poll.
    assert!(
        !poll_log::request(&db.pool, uid, "v5")
            .await
            .expect("request")
    );
}

#[tokio::test]
async fn notification_wake_ups_are_pruned_and_never_displace_the_annotation_value() {
    let db = TestDatabase::create().await.expect("test database");
    let uid = Uuid::new_v4();
    // The annotation's value, then three served wake-ups after it, all older than 30 days.
    sqlx::query(
        "INSERT INTO poll_requests (mailbox_uid, value, requested_at, served_at)
         VALUES ($1, 'v1', now() - interval '50 days', now() - interval '50 days'),
                ($1, 'notification:a', now() - interval '45 days', now() - interval '45 days'),
                ($1, 'notification:b', now() - interval '44 days', now() - interval '44 days'),
                ($1, 'notification:c', now() - interval '43 days', now() - interval '43 days')",
    )
    .bind(uid)
    .execute(&db.pool)
    .await
    .expect("requests");
    poll_log::request_wakeup(&db.pool, uid)
        .await
        .expect("a fresh wake-up");
    assert_eq!(
        poll_log::prune_requests(&db.pool, 30 * DAY, 100)
            .await
            .expect("prune requests"),
        3,
        "the old wake-ups go; the annotation value and the fresh wake-up stay"
    );
    let mut conn = db.pool.acquire().await.expect("connection");
    assert_eq!(
        poll_log::last_handled_request(&mut conn, uid)
            .await
            .expect("request")
            .as_deref(),
        Some("v1"),
        "wake-ups never show as the last handled annotation value"
    );
    assert!(
        !poll_log::request(&db.pool, uid, "v1")
            .await
            .expect("request"),
        "the annotation value still counts as seen"
    );
}

#[tokio::test]
async fn dead_tasks_are_pruned_after_their_own_period() {
    let db = TestDatabase::create().await.expect("test database");
    sqlx::query(
        "INSERT INTO tasks (kind, state, finished_at)
         SELECT 'deliver', CASE WHEN g <= 3 THEN 'dead' ELSE 'succeeded' END,
                now() - CASE WHEN g % 2 = 0 THEN interval '40 days' ELSE interval '1 day' END
         FROM generate_series(1, 6) g",
    )
    .execute(&db.pool)
    .await
    .expect("tasks");
    let report = mailpoll::queue::prune_dead(&db.pool, 30 * DAY, 100)
        .await
        .expect("prune dead");
    assert_eq!(report.deleted, 1, "only the dead task older than 30 days");
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM tasks WHERE state = 'dead'").await,
        2
    );
    assert_eq!(scalar(&db.pool, "SELECT count(*) FROM tasks").await, 5);
}

struct Object {
    uid: Uuid,
    ledger_id: Uuid,
}

async fn mailbox_poll(pool: &PgPool, name: &str, policy: DeletionPolicy, messages: i64) -> Object {
    let uid = Uuid::new_v4();
    let owner = Owner {
        namespace: "sales",
        name,
        mailbox: "orders@contoso.com",
        folder: "inbox",
    };
    let ledger_id = identity::resolve(pool, &owner, uid)
        .await
        .expect("identity");
    identity::set_deletion_policy(pool, uid, policy)
        .await
        .expect("policy");
    let page: Vec<LedgerMessage> = (0..messages)
        .map(|n| message(&format!("{name}-{n}"), days_ago(300)))
        .collect();
    record(pool, ledger_id, &page).await;
    let ids: Vec<String> = page.iter().map(|m| m.message_id.clone()).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    deliver(pool, ledger_id, &refs).await;
    ledger::purge_identities(pool, ledger_id, 400 * DAY, 1)
        .await
        .expect("no-op purge");
    for n in 0..messages {
        poll_log::request(pool, uid, &format!("{n}"))
            .await
            .expect("request");
        sqlx::query("INSERT INTO polls (mailbox_uid) VALUES ($1)")
            .bind(uid)
            .execute(pool)
            .await
            .expect("poll");
    }
    let mut conn = pool.acquire().await.expect("connection");
    ledger::counts(&mut conn, ledger_id).await.expect("counts");
    // Old enough for the sweep.
    sqlx::query("UPDATE mailbox_identities SET updated_at = now() - interval '1 hour'")
        .execute(pool)
        .await
        .expect("age");
    Object { uid, ledger_id }
}

async fn rows(pool: &PgPool, object: &Object) -> [i64; 5] {
    let one = |sql: &'static str, id: Uuid| async move {
        sqlx::query_scalar::<_, i64>(sql)
            .bind(id)
            .fetch_one(pool)
            .await
            .expect("count")
    };
    [
        one(
            "SELECT count(*) FROM messages WHERE mailbox_uid = $1",
            object.ledger_id,
        )
        .await,
        one(
            "SELECT count(*) FROM polls WHERE mailbox_uid = $1",
            object.uid,
        )
        .await,
        one(
            "SELECT count(*) FROM poll_requests WHERE mailbox_uid = $1",
            object.uid,
        )
        .await,
        one(
            "SELECT count(*) FROM mailbox_identities WHERE identity = $1",
            object.ledger_id,
        )
        .await,
        one(
            "SELECT count(*) FROM ledger_counts WHERE ledger_id = $1",
            object.ledger_id,
        )
        .await,
    ]
}

/// The purge is the leader's: it runs in a recorded leadership term.
async fn leader_term(pool: &PgPool) -> fence::LeaderTerm {
    fence::begin_term(pool, "mailpoll-leader", "retention-test")
        .await
        .expect("leadership term")
}

/// `Delete` purges exactly the gone object's ledger, history and identity, batch by batch;
/// `Retain` keeps everything; an object that still exists is left alone.
#[tokio::test]
async fn the_delete_policy_purges_exactly_the_gone_mailbox_polls_rows() {
    let db = TestDatabase::create().await.expect("test database");
    let doomed = mailbox_poll(&db.pool, "doomed", DeletionPolicy::Delete, 25).await;
    let kept = mailbox_poll(&db.pool, "kept", DeletionPolicy::Retain, 7).await;
    let alive = mailbox_poll(&db.pool, "alive", DeletionPolicy::Delete, 5).await;
    assert_eq!(rows(&db.pool, &doomed).await, [25, 25, 25, 1, 1]);

    let candidates = identity::doomed(&db.pool, Duration::from_secs(60), None)
        .await
        .expect("doomed");
    assert_eq!(candidates.len(), 2, "the two Delete identities");
    let existing: HashSet<Uuid> = [kept.uid, alive.uid].into();
    let term = leader_term(&db.pool).await;
    // A budget of two batches of 10 leaves some for the next sweep.
    let first = deletion::purge(&db.pool, &term, &candidates, &existing, 10, 2)
        .await
        .expect("purge");
    assert_eq!((first.messages, first.identities), (20, 0));
    assert_eq!(rows(&db.pool, &doomed).await, [5, 5, 5, 1, 1]);
    let second = deletion::purge(&db.pool, &term, &candidates, &existing, 10, 2)
        .await
        .expect("purge");
    assert_eq!((second.messages, second.identities), (5, 1));
    assert_eq!(rows(&db.pool, &doomed).await, [0, 0, 0, 0, 0]);
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM ledger_horizons").await,
        0,
        "no horizon was ever needed"
    );
    assert_eq!(rows(&db.pool, &kept).await, [7, 7, 7, 1, 1]);
    assert_eq!(rows(&db.pool, &alive).await, [5, 5, 5, 1, 1]);
}

/// A MailboxPoll re-created with the same source before the purge takes its identity back
/// (a new uid): the purge leaves its ledger alone.
#[tokio::test]
async fn a_re_created_mailbox_poll_stops_the_delete_purge() {
    let db = TestDatabase::create().await.expect("test database");
    let gone = mailbox_poll(&db.pool, "orders", DeletionPolicy::Delete, 3).await;
    let candidates = identity::doomed(&db.pool, Duration::from_secs(60), None)
        .await
        .expect("doomed");
    let new_uid = Uuid::new_v4();
    let owner = Owner {
        namespace: "sales",
        name: "orders",
        mailbox: "orders@contoso.com",
        folder: "inbox",
    };
    let ledger_id = identity::resolve(&db.pool, &owner, new_uid)
        .await
        .expect("identity");
    assert_eq!(ledger_id, gone.ledger_id, "the ledger continues");
    let term = leader_term(&db.pool).await;
    let purged = deletion::purge(&db.pool, &term, &candidates, &HashSet::new(), 10, 10)
        .await
        .expect("purge");
    assert_eq!(purged, deletion::Purged::default());
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM messages").await,
        3,
        "nothing deleted"
    );
}

/// The counters migration counts the rows written before it, and the triggers it adds keep
/// counting from there.
#[tokio::test]
async fn the_migration_backfills_counters_for_existing_rows() {
    const COUNTERS: i64 = 20261206000005;
    let db = TestDatabase::create_empty().await.expect("test database");
    let apply = |before: bool| {
        let pool = db.pool.clone();
        async move {
            // The rows go in before the counters' migration; the code that records afterwards
            // needs every later migration too.
            for migration in mailpoll::db::MIGRATOR
                .iter()
                .filter(|m| (m.version < COUNTERS) == before)
            {
                sqlx::raw_sql(migration.sql.clone())
                    .execute(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("migration {}: {e}", migration.version));
            }
        }
    };
    apply(true).await;
    let ledger_id = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO messages (mailbox_uid, message_id, delivery_state, actions_parked_at)
         SELECT $1, 'm' || g, (ARRAY['delivered', 'pending', 'failed', 'none'])[g % 4 + 1],
                CASE WHEN g % 4 = 2 AND g < 20 THEN now() END
         FROM generate_series(1, 103) g",
    )
    .bind(ledger_id)
    .execute(&db.pool)
    .await
    .expect("rows before the migration");
    apply(false).await;
    record(&db.pool, ledger_id, &[message("after", days_ago(1))]).await;
    let expected = exact_counts(&db.pool, ledger_id).await;
    assert_eq!(expected, (25, 27, 26, 26, 5));
    assert_eq!(counters(&db.pool, ledger_id).await, expected);
}

/// One retention round, as the leader runs it: every table purged by its own period, in
/// batches, each counted in `mailpoll_retention_purged_rows_total`.
#[tokio::test]
async fn a_retention_round_purges_every_table_and_counts_it() {
    let db = TestDatabase::create().await.expect("test database");
    let ledger_id = Uuid::new_v4();
    let page: Vec<LedgerMessage> = (0..5)
        .map(|n| message(&format!("m{n}"), days_ago(if n < 2 { 200 } else { 40 })))
        .collect();
    record(&db.pool, ledger_id, &page).await;
    deliver(&db.pool, ledger_id, &["m0", "m1", "m2", "m3", "m4"]).await;
    // Recorded 40 days ago, or when received if earlier (the two 200-day-old ones).
    sqlx::query("UPDATE messages SET recorded_at = LEAST(received_at, now() - interval '40 days')")
        .execute(&db.pool)
        .await
        .expect("recording times");
    sqlx::query(
        "INSERT INTO tasks (kind, state, finished_at) VALUES ('deliver', 'dead', now() - interval '40 days')",
    )
    .execute(&db.pool)
    .await
    .expect("dead task");
    let metrics = std::sync::Arc::new(mailpoll::telemetry::metrics::Metrics::new());
    let settings = mailpoll::retention::RetentionSettings {
        batch: 2,
        ..Default::default()
    };
    let stop = tokio_util::sync::CancellationToken::new();
    mailpoll::retention::round(&db.pool, &metrics, &settings, &stop).await;

    let text = metrics.encode().expect("metrics");
    for expected in [
        "mailpoll_retention_purged_rows_total{table=\"messages\",kind=\"content\"} 5",
        "mailpoll_retention_purged_rows_total{table=\"messages\",kind=\"identity\"} 2",
        "mailpoll_retention_purged_rows_total{table=\"tasks\",kind=\"dead\"} 1",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    assert_eq!(
        scalar(
            &db.pool,
            "SELECT count(*) FROM messages WHERE content_purged_at IS NOT NULL"
        )
        .await,
        3
    );
    assert_eq!(counters(&db.pool, ledger_id).await, (3, 0, 0, 0, 0));
}

/// Old mail recorded today (the first poll of a years-old inbox, or old mail moved into the
/// folder before the horizon covers it) keeps its rows for the whole period: identity
/// retention counts from recording as well as from receipt. Purging such rows at once would
/// move the horizon past mail still arriving with old dates.
#[tokio::test]
async fn old_mail_recorded_lately_keeps_its_identity_for_the_period() {
    let db = TestDatabase::create().await.expect("test database");
    let ledger_id = Uuid::new_v4();
    let old: Vec<LedgerMessage> = (0..3)
        .map(|n| message(&format!("old{n}"), days_ago(400 + n)))
        .collect();
    let mut tx = db.pool.begin().await.expect("transaction");
    ledger::record_page(&mut tx, ledger_id, &old, &[], DeliveryState::Pending)
        .await
        .expect("record");
    tx.commit().await.expect("commit");
    deliver(&db.pool, ledger_id, &["old0", "old1", "old2"]).await;

    let purge = ledger::purge_identities(&db.pool, ledger_id, 180 * DAY, 1000)
        .await
        .expect("purge");
    assert_eq!(purge.deleted, 0, "recorded today: kept");
    assert_eq!(
        scalar(&db.pool, "SELECT count(*) FROM ledger_horizons").await,
        0,
        "no horizon, so older mail still arriving is recorded"
    );
}
