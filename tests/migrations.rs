//! The schema against a real Postgres: concurrent migrators, ledger dedupe, one live task
//! per dedupe key.

use mailpoll_testkit::pg::TestDatabase;
use sqlx::Row;

#[tokio::test]
async fn concurrent_migrators_apply_the_schema_once() {
    let db = TestDatabase::create_empty().await.expect("test database");
    let config = mailpoll::db::PoolConfig::default();
    let (a, b) = tokio::join!(
        async {
            let pool = mailpoll::db::connect(&db.url, &config).await?;
            mailpoll::db::migrate(&pool).await
        },
        async {
            let pool = mailpoll::db::connect(&db.url, &config).await?;
            mailpoll::db::migrate(&pool).await
        }
    );
    a.expect("first migrator succeeds");
    b.expect("second migrator succeeds");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&db.pool)
        .await
        .expect("migrations table");
    assert_eq!(applied as usize, mailpoll::db::MIGRATOR.iter().count());
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .expect("tables");
    for table in ["mailbox_cursors", "messages", "polls", "tasks"] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing from {tables:?}"
        );
    }
}

#[tokio::test]
async fn concurrent_migrate_commands_succeed() {
    let db = TestDatabase::create_empty().await.expect("test database");
    let binary = env!("CARGO_BIN_EXE_mailpoll");
    let spawn = || {
        tokio::process::Command::new(binary)
            .arg("migrate")
            .env("DATABASE_URL", &db.url)
            .output()
    };
    let (a, b) = tokio::join!(spawn(), spawn());
    for output in [
        a.expect("run mailpoll migrate"),
        b.expect("run mailpoll migrate"),
    ] {
        assert!(
            output.status.success(),
            "mailpoll migrate failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&db.pool)
        .await
        .expect("migrations table");
    assert_eq!(applied as usize, mailpoll::db::MIGRATOR.iter().count());
}

#[tokio::test]
async fn recording_a_message_twice_leaves_one_row() {
    let db = TestDatabase::create().await.expect("test database");
    let uid = uuid::Uuid::new_v4();
    for _ in 0..2 {
        sqlx::query(
            "INSERT INTO messages (mailbox_uid, message_id, subject) VALUES ($1, $2, 'Invoice 4471')
             ON CONFLICT (mailbox_uid, message_id) DO NOTHING",
        )
        .bind(uid)
        .bind("AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0AezVgN1s3n0C9m1KtB0c3RAAAAe-1bAAA")
        .execute(&db.pool)
        .await
        .expect("insert");
    }
    let plain = sqlx::query("INSERT INTO messages (mailbox_uid, message_id) VALUES ($1, $2)")
        .bind(uid)
        .bind("AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0AezVgN1s3n0C9m1KtB0c3RAAAAe-1bAAA")
        .execute(&db.pool)
        .await;
    assert!(
        plain.is_err(),
        "a duplicate (mailbox uid, message id) must violate the key"
    );
    // Immutable ids are case-sensitive: a different case is a different message.
    sqlx::query("INSERT INTO messages (mailbox_uid, message_id) VALUES ($1, $2)")
        .bind(uid)
        .bind("aakalgaaaaaaahyqdeapmec2byacqac-ewg0aezvgn1s3n0c9m1ktb0c3raaaae-1baaa")
        .execute(&db.pool)
        .await
        .expect("case-distinct id is another message");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM messages WHERE mailbox_uid = $1")
        .bind(uid)
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(count, 2);
}

#[tokio::test]
async fn one_live_task_per_dedupe_key() {
    let db = TestDatabase::create().await.expect("test database");
    let insert =
        "INSERT INTO tasks (kind, dedupe_key) VALUES ('poll', 'poll:mailbox-1') RETURNING id";
    let first: i64 = sqlx::query_scalar(insert)
        .fetch_one(&db.pool)
        .await
        .expect("first task");
    let second = sqlx::query_scalar::<_, i64>(insert)
        .fetch_one(&db.pool)
        .await;
    assert!(
        second.is_err(),
        "a second pending task with the same dedupe key must be refused"
    );

    // Running still counts as live.
    sqlx::query(
        "UPDATE tasks SET state = 'running', locked_by = 'w', lock_token = gen_random_uuid(),
                lease_expires_at = now() + interval '1 minute' WHERE id = $1",
    )
    .bind(first)
    .execute(&db.pool)
    .await
    .expect("claim");
    assert!(
        sqlx::query_scalar::<_, i64>(insert)
            .fetch_one(&db.pool)
            .await
            .is_err()
    );

    // Once finished, the key is free again.
    sqlx::query("UPDATE tasks SET state = 'succeeded', finished_at = now() WHERE id = $1")
        .bind(first)
        .execute(&db.pool)
        .await
        .expect("complete");
    let third: i64 = sqlx::query_scalar(insert)
        .fetch_one(&db.pool)
        .await
        .expect("new live task");
    assert_ne!(third, first);
    let row = sqlx::query("SELECT count(*) AS n FROM tasks WHERE dedupe_key = 'poll:mailbox-1'")
        .fetch_one(&db.pool)
        .await
        .expect("count");
    assert_eq!(row.get::<i64, _>("n"), 2);
}

#[tokio::test]
async fn running_tasks_must_hold_a_lease() {
    let db = TestDatabase::create().await.expect("test database");
    let result = sqlx::query("INSERT INTO tasks (kind, state) VALUES ('poll', 'running')")
        .execute(&db.pool)
        .await;
    assert!(
        result.is_err(),
        "a running task without a lease is refused by the schema"
    );
}

/// After `helm rollback`, the older binary meets migrations of the newer one: it starts (and
/// works) instead of refusing the schema.
#[tokio::test]
async fn a_schema_migrated_by_a_newer_release_is_accepted() {
    let db = TestDatabase::create_empty().await.expect("test database");
    let pool = mailpoll::db::connect(&db.url, &mailpoll::db::PoolConfig::default())
        .await
        .expect("pool");
    mailpoll::db::migrate(&pool)
        .await
        .expect("this release's schema");
    // What a newer release would have applied: an added table, recorded as sqlx records it.
    sqlx::query("CREATE TABLE from_a_newer_release (id bigint PRIMARY KEY)")
        .execute(&pool)
        .await
        .expect("newer table");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (29991231000000, 'from a newer release', true, '\\x00', 1)",
    )
    .execute(&pool)
    .await
    .expect("newer migration recorded");

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailpoll"))
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .expect("run mailpoll migrate");
    assert!(
        output.status.success(),
        "the older binary refused the newer schema: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // And the schema it knows still works.
    let task = mailpoll::queue::NewTask::new("poll", serde_json::json!({}));
    mailpoll::queue::enqueue(&pool, &task)
        .await
        .expect("the queue works on the newer schema");
}
