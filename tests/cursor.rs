//! The mailbox cursor and run lease against real Postgres.

use std::time::Duration;

use mailpoll::cursor::{self, Acquired, CursorError, Fence, RoundStart, RunLease, Source};
use mailpoll_testkit::pg::TestDatabase;
use uuid::Uuid;

fn source(uid: Uuid, folder: &str) -> Source {
    Source {
        uid,
        namespace: "support".into(),
        name: "support-inbox".into(),
        mailbox: "support@contoso.com".into(),
        folder: folder.into(),
    }
}

const QUERY: &str = "delta/v1 folder=inbox $select=id";

/// The fence of a round over `source` with the test's query.
fn fence(lease: RunLease, source: &Source) -> Fence<'_> {
    Fence {
        lease,
        source,
        query: QUERY,
    }
}

/// Starts a first round: records the round's query, which later writes are fenced on.
async fn start(conn: &mut sqlx::PgConnection, lease: RunLease, source: &Source) {
    cursor::start_round(conn, fence(lease, source), RoundStart::First)
        .await
        .expect("start a round");
}

#[tokio::test]
async fn one_run_per_mailbox_and_fenced_cursor_writes() {
    let db = TestDatabase::create().await.expect("test database");
    let uid = Uuid::new_v4();
    let ttl = Duration::from_secs(30);
    let Acquired::Held(lease, cursor) = cursor::acquire(&db.pool, &source(uid, "inbox"), ttl)
        .await
        .expect("acquire")
    else {
        panic!("a fresh mailbox is free");
    };
    assert_eq!(cursor, cursor::Cursor::default());
    assert!(matches!(
        cursor::acquire(&db.pool, &source(uid, "inbox"), ttl)
            .await
            .expect("acquire"),
        Acquired::Busy { .. }
    ));

    let inbox = source(uid, "inbox");
    let mut conn = db.pool.acquire().await.expect("connection");
    let unstarted = cursor::save_progress(&mut conn, fence(lease, &inbox), None, None, ttl).await;
    assert!(
        matches!(unstarted, Err(CursorError::LeaseLost)),
        "writes need the round's query recorded first: {unstarted:?}"
    );
    start(&mut conn, lease, &inbox).await;
    let other_query = Fence {
        query: "delta/v1 folder=inbox $select=id,body",
        ..fence(lease, &inbox)
    };
    let refused = cursor::save_progress(&mut conn, other_query, Some("x"), None, ttl).await;
    assert!(
        matches!(refused, Err(CursorError::LeaseLost)),
        "a link of another query is refused: {refused:?}"
    );
    cursor::save_progress(
        &mut conn,
        fence(lease, &inbox),
        Some("https://graph/next"),
        None,
        ttl,
    )
    .await
    .expect("holder saves progress");
    cursor::finish_round(
        &mut conn,
        fence(lease, &inbox),
        Some("https://graph/delta?$deltatoken=1"),
        None,
    )
    .await
    .expect("holder finishes");
    cursor::release(&db.pool, lease).await.expect("release");

    let Acquired::Held(second, cursor) = cursor::acquire(&db.pool, &source(uid, "inbox"), ttl)
        .await
        .expect("acquire")
    else {
        panic!("released mailbox is free");
    };
    assert_eq!(
        cursor.delta_link.as_deref(),
        Some("https://graph/delta?$deltatoken=1")
    );
    assert_eq!(cursor.round_next_link, None);
    assert_eq!(cursor.query_fingerprint.as_deref(), Some(QUERY));

    // The first holder's token no longer fences anything.
    let stale = cursor::save_progress(&mut conn, fence(lease, &inbox), Some("x"), None, ttl).await;
    assert!(matches!(stale, Err(CursorError::LeaseLost)), "{stale:?}");
    let stale = cursor::finish_round(&mut conn, fence(lease, &inbox), Some("x"), None).await;
    assert!(matches!(stale, Err(CursorError::LeaseLost)), "{stale:?}");
    let stale = cursor::start_round(&mut conn, fence(lease, &inbox), RoundStart::Resync).await;
    assert!(matches!(stale, Err(CursorError::LeaseLost)), "{stale:?}");
    cursor::release(&db.pool, lease)
        .await
        .expect("stale release is a no-op");
    assert!(matches!(
        cursor::acquire(&db.pool, &source(uid, "inbox"), ttl)
            .await
            .expect("acquire"),
        Acquired::Busy { .. }
    ));
    cursor::release(&db.pool, second).await.expect("release");
}

#[tokio::test]
async fn an_expired_run_lease_is_taken_over() {
    let db = TestDatabase::create().await.expect("test database");
    let uid = Uuid::new_v4();
    let Acquired::Held(first, _) =
        cursor::acquire(&db.pool, &source(uid, "inbox"), Duration::from_millis(50))
            .await
            .expect("acquire")
    else {
        panic!("free");
    };
    tokio::time::sleep(Duration::from_millis(120)).await;
    let Acquired::Held(second, _) =
        cursor::acquire(&db.pool, &source(uid, "inbox"), Duration::from_secs(30))
            .await
            .expect("acquire")
    else {
        panic!("an expired lease is free");
    };
    assert_ne!(first.token, second.token);
    assert!(matches!(
        cursor::extend(&db.pool, first, Duration::from_secs(30)).await,
        Err(CursorError::LeaseLost)
    ));
    cursor::extend(&db.pool, second, Duration::from_secs(30))
        .await
        .expect("holder extends");
}

#[tokio::test]
async fn changing_the_folder_resets_the_cursor() {
    let db = TestDatabase::create().await.expect("test database");
    let uid = Uuid::new_v4();
    let ttl = Duration::from_secs(30);
    let Acquired::Held(lease, _) = cursor::acquire(&db.pool, &source(uid, "inbox"), ttl)
        .await
        .expect("acquire")
    else {
        panic!("free");
    };
    let inbox = source(uid, "inbox");
    let mut conn = db.pool.acquire().await.expect("connection");
    start(&mut conn, lease, &inbox).await;
    cursor::finish_round(&mut conn, fence(lease, &inbox), Some("delta-inbox"), None)
        .await
        .expect("finish");
    cursor::release(&db.pool, lease).await.expect("release");

    let Acquired::Held(lease, same) = cursor::acquire(&db.pool, &source(uid, "inbox"), ttl)
        .await
        .expect("acquire")
    else {
        panic!("free");
    };
    assert_eq!(same.delta_link.as_deref(), Some("delta-inbox"));
    cursor::release(&db.pool, lease).await.expect("release");

    let Acquired::Held(lease, moved) = cursor::acquire(&db.pool, &source(uid, "archive"), ttl)
        .await
        .expect("acquire")
    else {
        panic!("free");
    };
    assert_eq!(moved.delta_link, None, "a new folder starts from scratch");
    assert_eq!(moved.query_fingerprint, None);
    cursor::release(&db.pool, lease).await.expect("release");
}

/// A run holding the lease for one folder keeps its cursor while a run for another folder is
/// refused; the folder change resets the cursor only once the new run holds the lease, and a
/// write of the old run after that is refused.
#[tokio::test]
async fn a_folder_change_waits_for_the_lease_and_stale_writes_are_refused() {
    let db = TestDatabase::create().await.expect("test database");
    let uid = Uuid::new_v4();
    let ttl = Duration::from_secs(30);
    let Acquired::Held(a, _) = cursor::acquire(&db.pool, &source(uid, "inbox"), ttl)
        .await
        .expect("acquire")
    else {
        panic!("free");
    };
    let inbox = source(uid, "inbox");
    let mut conn = db.pool.acquire().await.expect("connection");
    start(&mut conn, a, &inbox).await;
    cursor::finish_round(&mut conn, fence(a, &inbox), Some("delta-inbox-1"), None)
        .await
        .expect("A finishes a round");

    let busy = cursor::acquire(&db.pool, &source(uid, "archive"), ttl)
        .await
        .expect("acquire");
    assert!(matches!(busy, Acquired::Busy { .. }), "{busy:?}");
    let row: (String, Option<String>) =
        sqlx::query_as("SELECT folder, delta_link FROM mailbox_cursors WHERE mailbox_uid = $1")
            .bind(uid)
            .fetch_one(&db.pool)
            .await
            .expect("cursor row");
    assert_eq!(
        row,
        ("inbox".to_owned(), Some("delta-inbox-1".to_owned())),
        "a refused acquire changes nothing"
    );
    cursor::save_progress(&mut conn, fence(a, &inbox), Some("next-inbox"), None, ttl)
        .await
        .expect("A still writes its own folder's cursor");
    cursor::finish_round(&mut conn, fence(a, &inbox), Some("delta-inbox-2"), None)
        .await
        .expect("A still finishes its round");
    cursor::release(&db.pool, a).await.expect("release");

    let Acquired::Held(b, moved) = cursor::acquire(&db.pool, &source(uid, "archive"), ttl)
        .await
        .expect("acquire")
    else {
        panic!("released");
    };
    assert_eq!(moved.delta_link, None, "the new folder starts from scratch");
    assert_eq!(moved.round_next_link, None);
    let stale =
        cursor::finish_round(&mut conn, fence(a, &inbox), Some("delta-inbox-3"), None).await;
    assert!(matches!(stale, Err(CursorError::LeaseLost)), "{stale:?}");
    // Even under B's own token, a write for the old folder matches nothing.
    let wrong_folder =
        cursor::finish_round(&mut conn, fence(b, &inbox), Some("delta-inbox-3"), None).await;
    assert!(
        matches!(wrong_folder, Err(CursorError::LeaseLost)),
        "{wrong_folder:?}"
    );
    let row: (String, Option<String>) =
        sqlx::query_as("SELECT folder, delta_link FROM mailbox_cursors WHERE mailbox_uid = $1")
            .bind(uid)
            .fetch_one(&db.pool)
            .await
            .expect("cursor row");
    assert_eq!(row, ("archive".to_owned(), None));
    cursor::release(&db.pool, b).await.expect("release");
}

/// A recorded Retry-After holds every MailboxPoll of the mailbox, whatever the case of its
/// address, measured by the database's clock, and is announced with the mailbox and the wait.
#[tokio::test]
async fn a_retry_after_is_recorded_for_the_whole_mailbox_and_announced() {
    let db = TestDatabase::create().await.expect("test database");
    let (inbox, archive) = (
        source(Uuid::new_v4(), "inbox"),
        source(Uuid::new_v4(), "archive"),
    );
    for source in [&inbox, &archive] {
        let Acquired::Held(lease, _) = cursor::acquire(&db.pool, source, Duration::from_secs(10))
            .await
            .expect("acquire")
        else {
            panic!("a new cursor is free");
        };
        cursor::release(&db.pool, lease).await.expect("release");
    }
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .expect("listener");
    listener
        .listen(cursor::THROTTLED_CHANNEL)
        .await
        .expect("listen");
    let wait = Duration::from_secs(90);
    cursor::set_throttled_for(&db.pool, "Support@Contoso.com", wait)
        .await
        .expect("record");

    let notification = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .expect("announced within 10 s")
        .expect("notification");
    let announced =
        cursor::ThrottleAnnouncement::parse(notification.payload()).expect("an announcement");
    assert_eq!(announced.mailbox, "support@contoso.com");
    assert_eq!(
        announced.wait(),
        Some(wait),
        "payload {}",
        notification.payload()
    );
    // A shorter wait recorded later does not shorten the recorded one.
    cursor::set_throttled_for(&db.pool, "support@contoso.com", Duration::from_secs(1))
        .await
        .expect("record");
    for source in [&inbox, &archive] {
        let Acquired::Held(_, cursor) = cursor::acquire(&db.pool, source, Duration::from_secs(10))
            .await
            .expect("acquire")
        else {
            panic!("the cursor is free");
        };
        // Measured by the database's clock from when it was recorded: a replica whose clock
        // is off still waits the same.
        let left = cursor.throttle_left().expect("throttled");
        assert!(
            left > Duration::from_secs(80) && left <= wait,
            "{}: {left:?} left of a {wait:?} Retry-After",
            source.folder
        );
    }
    let left = cursor::throttle_left(&db.pool, "SUPPORT@contoso.com")
        .await
        .expect("throttle left")
        .expect("throttled");
    assert!(left > Duration::from_secs(80) && left <= wait, "{left:?}");
    assert_eq!(
        cursor::throttle_left(&db.pool, "other@contoso.com")
            .await
            .expect("throttle left"),
        None
    );
    assert_eq!(cursor::ThrottleAnnouncement::parse("not json"), None);
}
