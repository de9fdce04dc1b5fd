//! The mailbox cursor and run lease against real Postgres.

use std::time::Duration;

use mailpoll::cursor::{self, Acquired, CursorError, Source};
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

    let mut conn = db.pool.acquire().await.expect("connection");
    cursor::save_progress(&mut conn, lease, Some("https://graph/next"), None, ttl)
        .await
        .expect("holder saves progress");
    cursor::finish_round(
        &mut conn,
        lease,
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

    // The first holder's token no longer fences anything.
    let stale = cursor::save_progress(&mut conn, lease, Some("x"), None, ttl).await;
    assert!(matches!(stale, Err(CursorError::LeaseLost)), "{stale:?}");
    let stale = cursor::finish_round(&mut conn, lease, Some("x"), None).await;
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
    let mut conn = db.pool.acquire().await.expect("connection");
    cursor::finish_round(&mut conn, lease, Some("delta-inbox"), None)
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
    cursor::release(&db.pool, lease).await.expect("release");
}
