//! Fencing of the leader's writes: a deposed leader whose sweep of deleted MailboxPolls (or
//! purge of their ledgers) runs after a successor recorded its term changes nothing; the
//! successor's sweep does the work. Real Postgres, the Kubernetes API emulator (with no
//! MailboxPolls: every owner in the database is a deleted one).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use mailpoll::controller::fence::{self, FenceError};
use mailpoll::controller::reconcile::ReconcileError;
use mailpoll::controller::{self, LeaderWork, deletion, schedule};
use mailpoll::cursor::{self, Source};
use mailpoll::directory::{DirectorySettings, KubeDirectory, MailboxPolls, Scope};
use mailpoll::identity::{self, DeletionPolicy, Owner};
use mailpoll::queue;
use mailpoll_testkit::cluster;
use mailpoll_testkit::kube::KubeEmulator;
use mailpoll_testkit::pg::TestDatabase;
use mailpoll_testkit::wait_until;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const LEASE: &str = "mailpoll-leader";

/// A deleted MailboxPoll's state: a cursor, a pending poll task and a ledger identity whose
/// deletion policy is `Delete`.
async fn deleted_mailbox_poll(pool: &PgPool) -> Uuid {
    let uid = Uuid::new_v4();
    let source = Source {
        uid,
        namespace: "mail".into(),
        name: "gone".into(),
        mailbox: "gone@contoso.com".into(),
        folder: "inbox".into(),
    };
    cursor::acquire(pool, &source, Duration::from_secs(60))
        .await
        .expect("cursor");
    let task = schedule::poll_task(uid, 3, Utc::now()).expect("poll task");
    queue::enqueue(pool, &task).await.expect("poll task queued");
    let owner = Owner {
        namespace: "mail",
        name: "gone",
        mailbox: "gone@contoso.com",
        folder: "inbox",
    };
    identity::resolve(pool, &owner, uid)
        .await
        .expect("identity");
    identity::set_deletion_policy(pool, uid, DeletionPolicy::Delete)
        .await
        .expect("deletion policy");
    uid
}

/// `[cursors, live tasks, identities]` of `uid`.
async fn state_of(pool: &PgPool, uid: Uuid) -> [i64; 3] {
    let (cursors, live, identities): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM mailbox_cursors WHERE mailbox_uid = $1),
                (SELECT count(*) FROM tasks WHERE owner_uid = $1
                   AND state IN ('pending', 'running')),
                (SELECT count(*) FROM mailbox_identities WHERE uid = $1)",
    )
    .bind(uid)
    .fetch_one(pool)
    .await
    .expect("state");
    [cursors, live, identities]
}

fn assert_deposed(result: Result<impl std::fmt::Debug, ReconcileError>) {
    match result {
        Err(ReconcileError::Fence(FenceError::Deposed { ours, current, .. })) => {
            assert_eq!(ours, 1);
            assert_eq!(current, Some(("replica-b".to_owned(), 2)));
        }
        other => panic!("expected a refusal of the deposed leader, got {other:?}"),
    }
}

#[tokio::test]
async fn a_deposed_leaders_late_sweep_and_purge_change_nothing() {
    mailpoll::install_crypto_provider();
    let db = TestDatabase::create().await.expect("test database");
    let kube = KubeEmulator::start()
        .await
        .expect("Kubernetes API emulator");
    let client = kube.client().expect("client");
    cluster::install_crd(&client).await.expect("CRD installed");
    let stop = CancellationToken::new();
    let polls = MailboxPolls::start(&client, &Scope::All, stop.clone());
    tokio::time::timeout(Duration::from_secs(30), polls.wait_synced())
        .await
        .expect("the watch cache lists within 30 s");
    let directory = Arc::new(KubeDirectory::new(
        client,
        db.pool.clone(),
        polls,
        DirectorySettings::default(),
    ));
    let uid = deleted_mailbox_poll(&db.pool).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut work = LeaderWork::new(Scope::All, "replica-a");
    work.sweep_min_age = Duration::ZERO;

    // Replica a leads, then replica b takes over before a's sweep reaches Postgres.
    let deposed = fence::begin_term(&db.pool, LEASE, "replica-a")
        .await
        .expect("a's term");
    let successor = fence::begin_term(&db.pool, LEASE, "replica-b")
        .await
        .expect("b's term");
    assert_eq!((deposed.term, successor.term), (1, 2));

    assert_deposed(controller::sweep(&db.pool, &directory, &work, &deposed).await);
    let doomed = identity::doomed(&db.pool, Duration::ZERO, None)
        .await
        .expect("doomed");
    assert_eq!(doomed.len(), 1);
    assert_deposed(
        deletion::purge(&db.pool, &deposed, &doomed, &HashSet::new(), 10, 10)
            .await
            .map_err(ReconcileError::from),
    );
    assert_eq!(
        state_of(&db.pool, uid).await,
        [1, 1, 1],
        "the deposed leader changed nothing"
    );

    let swept = controller::sweep(&db.pool, &directory, &work, &successor)
        .await
        .expect("the successor sweeps");
    assert_eq!(swept, vec![uid]);
    let purged = deletion::purge(&db.pool, &successor, &doomed, &HashSet::new(), 10, 10)
        .await
        .expect("the successor purges");
    assert_eq!(purged.identities, 1);
    assert_eq!(state_of(&db.pool, uid).await, [0, 0, 0]);
    stop.cancel();
}

/// A term in the middle of a fenced write keeps it: a successor's term waits for the write's
/// transaction to end, so the write cannot land after the successor's first one.
#[tokio::test]
async fn a_new_term_waits_for_a_fenced_write_in_flight() {
    let db = TestDatabase::create().await.expect("test database");
    let first = fence::begin_term(&db.pool, LEASE, "replica-a")
        .await
        .expect("a's term");
    let mut tx = db.pool.begin().await.expect("transaction");
    first.check(&mut tx).await.expect("a still leads");
    let pool = db.pool.clone();
    let successor = tokio::spawn(async move { fence::begin_term(&pool, LEASE, "replica-b").await });
    // Postgres says when the successor's statement is blocked on the fenced transaction's lock.
    wait_until(
        "the successor's term to wait on the fenced transaction",
        Duration::from_secs(30),
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                                 WHERE datname = current_database() AND wait_event_type = 'Lock')",
            )
            .fetch_one(&db.pool)
            .await
            .expect("pg_stat_activity")
        },
    )
    .await;
    assert!(
        !successor.is_finished(),
        "the successor's term waits for the fenced transaction"
    );
    tx.commit().await.expect("commit");
    let successor = successor
        .await
        .expect("task")
        .expect("the successor's term");
    assert_eq!(successor.term, 2);
    let mut tx = db.pool.begin().await.expect("transaction");
    assert!(matches!(
        first.check(&mut tx).await,
        Err(FenceError::Deposed { .. })
    ));
}
