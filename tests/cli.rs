//! The incident commands against a real Postgres, run as the binary is run in a pod
//! (`kubectl exec deploy/mailpoll -- mailpoll …`): tasks listed with their MailboxPoll, one task
//! in full, bulk retry and cancel by filter, a MailboxPoll's failed messages.

use mailpoll::identity::{self, Owner};
use mailpoll::queue::{self, NewTask};
use mailpoll_testkit::pg::TestDatabase;
use serde_json::json;
use uuid::Uuid;

/// Runs `mailpoll <args>` against the test database; returns (success, stdout, stderr).
async fn mailpoll(db: &TestDatabase, args: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_mailpoll"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .expect("run mailpoll");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A MailboxPoll the database knows: its object uid and its ledger identity.
async fn mailbox_poll(db: &TestDatabase, namespace: &str, name: &str) -> (Uuid, Uuid) {
    let uid = Uuid::new_v4();
    let owner = Owner {
        namespace,
        name,
        mailbox: "support@contoso.com",
        folder: "inbox",
    };
    let ledger = identity::resolve(&db.pool, &owner, uid)
        .await
        .expect("identity");
    (uid, ledger)
}

/// A dead task of `kind` for `owner`, with an error; returns its id.
async fn dead_task(db: &TestDatabase, kind: &str, owner: Uuid, key: Option<&str>) -> i64 {
    let mut task = NewTask::new(kind, json!({"mailbox_uid": owner, "message_id": "AAk="}))
        .owner(owner)
        .max_attempts(3);
    if let Some(key) = key {
        task = task.dedupe_key(key);
    }
    let id = queue::enqueue(&db.pool, &task).await.expect("enqueue").id;
    sqlx::query(
        "UPDATE tasks SET state = 'dead', attempts = 3, finished_at = now(),
                last_error = 'webhook rejected the message with HTTP 422: unknown customer'
         WHERE id = $1",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .expect("dead");
    id
}

async fn state_of(db: &TestDatabase, id: i64) -> String {
    sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .expect("state")
}

#[tokio::test]
async fn tasks_are_listed_shown_retried_and_cancelled_by_mailbox_poll() {
    let db = TestDatabase::create().await.expect("test database");
    let (support, _) = mailbox_poll(&db, "support", "support-inbox").await;
    let (billing, _) = mailbox_poll(&db, "billing", "billing-inbox").await;
    let support_dead = [
        dead_task(&db, "deliver", support, None).await,
        dead_task(&db, "deliver", support, None).await,
    ];
    let billing_dead = dead_task(&db, "deliver", billing, None).await;
    // Two dead after-actions runs of one mailbox: one key, so only one may come back.
    let actions = [
        dead_task(&db, "actions", support, Some("actions:support")).await,
        dead_task(&db, "actions", support, Some("actions:support")).await,
    ];

    let (ok, out, err) = mailpoll(
        &db,
        &[
            "tasks",
            "list",
            "--state",
            "dead",
            "--mailboxpoll",
            "support/support-inbox",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        5,
        "a header and support's four dead tasks: {out}"
    );
    assert!(lines[0].contains("MAILBOXPOLL"), "{out}");
    assert!(
        lines[1..]
            .iter()
            .all(|l| l.contains("support/support-inbox") && l.contains("HTTP 422")),
        "{out}"
    );

    let (ok, out, err) = mailpoll(&db, &["tasks", "show", &billing_dead.to_string()]).await;
    assert!(ok, "{err}");
    for expected in [
        "MailboxPoll:   billing/billing-inbox",
        "Attempts:      3/3",
        "HTTP 422: unknown customer",
        "\"message_id\": \"AAk=\"",
    ] {
        assert!(out.contains(expected), "{expected:?} in\n{out}");
    }

    // A bare bulk command touches nothing.
    let (ok, _, err) = mailpoll(&db, &["tasks", "retry"]).await;
    assert!(!ok);
    assert!(err.contains("--all"), "{err}");

    let (ok, out, err) = mailpoll(
        &db,
        &["tasks", "retry", "--mailboxpoll", "support/support-inbox"],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.starts_with("3 dead task(s) pending again; 1 cancelled instead"),
        "{out}"
    );
    for id in support_dead {
        assert_eq!(state_of(&db, id).await, "pending");
    }
    assert_eq!(
        state_of(&db, actions[1]).await,
        "pending",
        "the newest of one key"
    );
    assert_eq!(state_of(&db, actions[0]).await, "cancelled");
    assert_eq!(
        state_of(&db, billing_dead).await,
        "dead",
        "another MailboxPoll's stays"
    );

    let (ok, out, err) = mailpoll(
        &db,
        &[
            "tasks",
            "cancel",
            &billing_dead.to_string(),
            &support_dead[0].to_string(),
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "2 task(s) cancelled");
    assert_eq!(state_of(&db, billing_dead).await, "cancelled");

    let (ok, out, _) = mailpoll(
        &db,
        &["tasks", "list", "--output", "json", "--kind", "actions"],
    )
    .await;
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(2));

    let (ok, _, err) = mailpoll(&db, &["tasks", "list", "--mailboxpoll", "nobody/none"]).await;
    assert!(!ok);
    assert!(err.contains("no MailboxPoll nobody/none"), "{err}");
}

#[tokio::test]
async fn a_mailbox_polls_failed_messages_are_listed_with_why() {
    let db = TestDatabase::create().await.expect("test database");
    let (_, ledger) = mailbox_poll(&db, "support", "support-inbox").await;
    let (_, other) = mailbox_poll(&db, "billing", "billing-inbox").await;
    for (mailbox, id, state, error) in [
        (ledger, "AAk=1", "delivered", None),
        (
            ledger,
            "AAk=2",
            "failed",
            Some("webhook rejected the message with HTTP 422: bad"),
        ),
        (ledger, "AAk=3", "pending", None),
        (other, "AAk=4", "failed", Some("elsewhere")),
    ] {
        sqlx::query(
            "INSERT INTO messages (mailbox_uid, message_id, subject, from_address, delivery_state, delivery_error)
             VALUES ($1, $2, 'Invoice 4471', 'billing@fabrikam.com', $3, $4)",
        )
        .bind(mailbox)
        .bind(id)
        .bind(state)
        .bind(error)
        .execute(&db.pool)
        .await
        .expect("message");
    }
    let (ok, out, err) = mailpoll(
        &db,
        &[
            "messages",
            "list",
            "--mailboxpoll",
            "support/support-inbox",
            "--state",
            "failed",
        ],
    )
    .await;
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[1].contains("AAk=2") && lines[1].ends_with("HTTP 422: bad"),
        "{out}"
    );
    let (ok, out, _) = mailpoll(
        &db,
        &[
            "messages",
            "list",
            "--mailboxpoll",
            "support/support-inbox",
            "--output",
            "json",
        ],
    )
    .await;
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(3));
    assert_eq!(listed[0]["messageId"], "AAk=3", "newest first");
}
