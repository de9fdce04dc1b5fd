//! The ledger against real Postgres: idempotent recording, tombstones, delivery marks.

use chrono::{TimeZone, Utc};
use mailpoll::ledger::{self, DeliveredMark, DeliveryState, LedgerMessage, Removal};
use mailpoll::pipeline::delivered::DeliveredMarks;
use mailpoll_testkit::pg::TestDatabase;
use serde_json::json;
use uuid::Uuid;

fn message(id: &str) -> LedgerMessage {
    LedgerMessage {
        message_id: id.into(),
        internet_message_id: Some(format!("<{id}@contoso.com>")),
        subject: Some(format!("Subject {id}")),
        from_address: Some("billing@fabrikam.com".into()),
        from_name: Some("Fabrikam".into()),
        to_recipients: json!([{"name": "Ops", "address": "ops@contoso.com"}]),
        received_at: Utc.with_ymd_and_hms(2025, 3, 4, 10, 15, 2).single(),
        is_read: Some(false),
        body: Some("hello".into()),
        body_content_type: Some("text".into()),
        raw: json!({"id": id, "subject": format!("Subject {id}")}),
        ..Default::default()
    }
}

#[tokio::test]
async fn recording_is_idempotent_and_reports_only_new_messages() {
    let db = TestDatabase::create().await.expect("test database");
    let uid = Uuid::new_v4();
    let mut conn = db.pool.acquire().await.expect("connection");

    let page = vec![message("a"), message("b"), message("a")];
    let first = ledger::record_page(&mut conn, uid, &page, &[], DeliveryState::Pending)
        .await
        .expect("record");
    assert_eq!(first.new_ids, ["a", "b"]);
    assert_eq!(first.already_known, 0);

    let replay = vec![message("b"), message("c")];
    let second = ledger::record_page(&mut conn, uid, &replay, &[], DeliveryState::Pending)
        .await
        .expect("record replay");
    assert_eq!(second.new_ids, ["c"]);
    assert_eq!(second.already_known, 1);

    // Another MailboxPoll may see the same Graph id: it is its own message.
    let other = ledger::record_page(
        &mut conn,
        Uuid::new_v4(),
        &[message("a")],
        &[],
        DeliveryState::None,
    )
    .await
    .expect("record other mailbox");
    assert_eq!(other.new_ids, ["a"]);

    let stored = ledger::get(&mut conn, uid, "a")
        .await
        .expect("get")
        .expect("message a exists");
    assert_eq!(stored.delivery_state, "pending");
    assert_eq!(stored.webhook_delivered_at, None);
    let stored = stored.message;
    assert_eq!(stored.subject.as_deref(), Some("Subject a"));
    assert_eq!(stored.to_recipients[0]["address"], "ops@contoso.com");
    assert_eq!(
        stored.received_at,
        Utc.with_ymd_and_hms(2025, 3, 4, 10, 15, 2).single()
    );
}

#[tokio::test]
async fn removals_mark_known_messages_and_leave_tombstones() {
    let db = TestDatabase::create().await.expect("test database");
    let uid = Uuid::new_v4();
    let mut conn = db.pool.acquire().await.expect("connection");
    ledger::record_page(
        &mut conn,
        uid,
        &[message("kept")],
        &[],
        DeliveryState::Pending,
    )
    .await
    .expect("record");
    let removals = vec![
        Removal {
            message_id: "kept".into(),
            reason: "deleted".into(),
        },
        Removal {
            message_id: "never-seen".into(),
            reason: "changed".into(),
        },
        Removal {
            message_id: "never-seen".into(),
            reason: "changed".into(),
        },
    ];
    let recorded = ledger::record_page(&mut conn, uid, &[], &removals, DeliveryState::Pending)
        .await
        .expect("record removals");
    assert_eq!(recorded.removals, 2);

    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT message_id, delivery_state, removed_reason FROM messages WHERE mailbox_uid = $1 ORDER BY message_id",
    )
    .bind(uid)
    .fetch_all(&mut *conn)
    .await
    .expect("rows");
    assert_eq!(
        rows,
        [
            ("kept".into(), "pending".into(), Some("deleted".into())),
            (
                "never-seen".into(),
                "skipped".into(),
                Some("changed".into())
            ),
        ]
    );
    // The message behind a tombstone comes back (moved back into the folder): it is new, with
    // its content, a new place in the ledger's order and the state of a new message. A message
    // recorded before that comes back is not new; it is just no longer marked removed.
    let seq_of = |id: &'static str| {
        sqlx::query_scalar::<_, i64>(
            "SELECT seq FROM messages WHERE mailbox_uid = $1 AND message_id = $2",
        )
        .bind(uid)
        .bind(id)
    };
    let tombstone_seq = seq_of("never-seen")
        .fetch_one(&mut *conn)
        .await
        .expect("seq");
    let back = ledger::record_page(
        &mut conn,
        uid,
        &[message("kept"), message("never-seen"), message("fresh")],
        &[],
        DeliveryState::Pending,
    )
    .await
    .expect("record returning messages");
    assert_eq!(back.new_ids, ["fresh", "never-seen"], "in ledger order");
    assert_eq!(back.already_known, 1);
    let revived = ledger::get(&mut conn, uid, "never-seen")
        .await
        .expect("get")
        .expect("revived");
    assert_eq!(revived.delivery_state, "pending");
    assert_eq!(revived.removed_at, None);
    assert_eq!(
        revived.message.subject.as_deref(),
        Some("Subject never-seen")
    );
    let revived_seq = seq_of("never-seen")
        .fetch_one(&mut *conn)
        .await
        .expect("seq");
    assert!(revived_seq > tombstone_seq, "a reader by seq sees it");
    let kept = ledger::get(&mut conn, uid, "kept")
        .await
        .expect("get")
        .expect("kept");
    assert_eq!(
        (kept.delivery_state.as_str(), kept.removed_at),
        ("pending", None)
    );
    let again = ledger::record_page(
        &mut conn,
        uid,
        &[message("never-seen"), message("kept")],
        &[],
        DeliveryState::Pending,
    )
    .await
    .expect("record replay");
    assert!(again.new_ids.is_empty(), "{again:?}");
}

#[tokio::test]
async fn delivery_marks_and_counts() {
    let db = TestDatabase::create().await.expect("test database");
    let uid = Uuid::new_v4();
    let mut conn = db.pool.acquire().await.expect("connection");
    let page: Vec<_> = ["a", "b", "c"].into_iter().map(message).collect();
    ledger::record_page(&mut conn, uid, &page, &[], DeliveryState::Pending)
        .await
        .expect("record");
    let mark = |id: &str, webhook_posted| DeliveredMark {
        mailbox_uid: uid,
        message_id: id.to_owned(),
        webhook_posted,
    };
    let changed = ledger::mark_delivered(&mut conn, &[mark("a", true)])
        .await
        .expect("mark");
    assert_eq!(changed, vec![(uid, "a".to_owned())]);
    let changed = ledger::mark_delivered(&mut conn, &[mark("a", true), mark("zz", true)])
        .await
        .expect("mark again");
    assert!(
        changed.is_empty(),
        "a second mark and an unknown message change nothing: {changed:?}"
    );
    let webhook_at: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT webhook_delivered_at FROM messages WHERE mailbox_uid = $1 AND message_id = 'a'",
    )
    .bind(uid)
    .fetch_one(&mut *conn)
    .await
    .expect("webhook step");
    assert!(
        webhook_at.is_some(),
        "the webhook step is recorded with the mark"
    );
    ledger::mark_failed(
        &mut conn,
        uid,
        "b",
        "webhook rejected the message with HTTP 400",
    )
    .await
    .expect("fail");
    ledger::mark_failed(&mut conn, uid, "a", "late failure")
        .await
        .expect("fail delivered");
    let counts = ledger::counts(&mut conn, uid).await.expect("counts");
    assert_eq!((counts.delivered, counts.pending, counts.failed), (1, 1, 1));
}

#[tokio::test]
async fn concurrent_delivery_marks_share_statements_and_count_each_message_once() {
    let db = TestDatabase::create().await.expect("test database");
    let uid = Uuid::new_v4();
    let ids: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    let page: Vec<_> = ids.iter().map(|id| message(id)).collect();
    let mut conn = db.pool.acquire().await.expect("connection");
    ledger::record_page(&mut conn, uid, &page, &[], DeliveryState::Pending)
        .await
        .expect("record");
    drop(conn);
    let marks = DeliveredMarks::start(db.pool.clone());
    // Every message twice, all at once: each must come back changed exactly once.
    let calls = ids.iter().chain(ids.iter()).map(|id| {
        let marks = marks.clone();
        let mark = DeliveredMark {
            mailbox_uid: uid,
            message_id: id.clone(),
            webhook_posted: true,
        };
        tokio::spawn(async move { marks.mark(mark).await })
    });
    let mut changed = 0;
    for call in futures::future::join_all(calls).await {
        if call.expect("mark task").expect("mark") {
            changed += 1;
        }
    }
    assert_eq!(changed, ids.len(), "each message is reported changed once");
    let mut conn = db.pool.acquire().await.expect("connection");
    let counts = ledger::counts(&mut conn, uid).await.expect("counts");
    assert_eq!((counts.delivered, counts.pending), (300, 0));
}
