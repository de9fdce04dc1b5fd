//! Graph's per-mailbox concurrency slots, shared by every replica, against real Postgres.

use std::sync::Arc;
use std::time::Duration;

use mailpoll::graph::{Governor, GovernorConfig, GraphError, SlotAsk, SlotKey};
use mailpoll::mailbox_slots::MailboxSlots;
use mailpoll_testkit::pg::TestDatabase;
use uuid::Uuid;

const HOLD: Duration = Duration::from_secs(60);

fn key() -> SlotKey {
    SlotKey::new("Tenant-1", "App-1", "Support@Contoso.com")
}

fn ask(key: &SlotKey, count: u32, hold: Duration) -> SlotAsk<'_> {
    SlotAsk {
        key,
        cap: 4,
        count,
        hold,
        waiter: Uuid::new_v4(),
        waited: false,
    }
}

/// Whether `count` slots of `key` could be taken now (held for `hold` if so).
async fn takes(slots: &MailboxSlots, key: &SlotKey, count: u32, hold: Duration) -> bool {
    slots
        .take(ask(key, count, hold))
        .await
        .expect("take")
        .is_some()
}

/// Four slots per (application, mailbox), whatever case the address is written in; a batch
/// gets all it asks for or nothing; another application or mailbox has slots of its own.
#[tokio::test]
async fn four_slots_per_application_and_mailbox_taken_all_or_none() {
    let db = TestDatabase::create().await.expect("test database");
    let slots = MailboxSlots::new(db.pool.clone());
    let key = key();
    let batch = slots.take(ask(&key, 3, HOLD)).await.expect("take");
    assert!(batch.is_some(), "three of four free slots");
    let same_mailbox = SlotKey::new("tenant-1", "app-1", "support@contoso.com");
    assert!(
        !takes(&slots, &same_mailbox, 2, HOLD).await,
        "two asked, one free: none taken"
    );
    let single = slots.take(ask(&same_mailbox, 1, HOLD)).await.expect("take");
    assert!(single.is_some(), "the fourth slot");
    assert_eq!(slots.held(&key).await.expect("held"), 4);
    assert!(!takes(&slots, &key, 2, HOLD).await);
    for other in [
        SlotKey::new("tenant-1", "app-2", "support@contoso.com"),
        SlotKey::new("tenant-1", "app-1", "sales@contoso.com"),
    ] {
        assert!(
            takes(&slots, &other, 4, HOLD).await,
            "{other:?} has slots of its own"
        );
    }
    slots
        .give_back_now(&key, batch.expect("held"))
        .await
        .expect("give back");
    assert_eq!(slots.held(&key).await.expect("held"), 1);
    assert!(
        takes(&slots, &key, 3, HOLD).await,
        "three given back, three free"
    );
}

/// A holder that dies without giving its slots back loses them when its hold runs out.
#[tokio::test]
async fn slots_of_a_holder_that_died_free_themselves_when_the_hold_runs_out() {
    let db = TestDatabase::create().await.expect("test database");
    let slots = MailboxSlots::new(db.pool.clone());
    let key = key();
    let short = Duration::from_millis(300);
    assert!(takes(&slots, &key, 4, short).await);
    assert!(!takes(&slots, &key, 2, HOLD).await);
    tokio::time::sleep(short + Duration::from_millis(200)).await;
    assert!(
        takes(&slots, &key, 4, HOLD).await,
        "the dead holder's slots are free again"
    );
}

/// While a request for one slot waits, a batch takes none, even with slots free: a mailbox's
/// polls never queue behind a stream of batched after-actions. A waiter that stopped asking
/// no longer holds batches back.
#[tokio::test]
async fn a_waiting_single_request_goes_before_batches() {
    let db = TestDatabase::create().await.expect("test database");
    let slots = MailboxSlots::new(db.pool.clone());
    let key = key();
    let running = slots
        .take(ask(&key, 4, HOLD))
        .await
        .expect("take")
        .expect("a batch runs");
    let poll = ask(&key, 1, HOLD);
    assert!(slots.take(poll).await.expect("take").is_none(), "all taken");
    slots.give_back_now(&key, running).await.expect("give back");
    assert!(
        !takes(&slots, &key, 2, HOLD).await,
        "a batch waits while the single request does"
    );
    let granted = slots
        .take(SlotAsk {
            waited: true,
            ..poll
        })
        .await
        .expect("take");
    assert!(granted.is_some(), "the waiting request's turn");
    assert!(
        takes(&slots, &key, 2, HOLD).await,
        "nobody waits: batches go on"
    );

    let gone = ask(&key, 1, HOLD);
    let full = slots.take(ask(&key, 1, HOLD)).await.expect("take");
    assert!(full.is_some(), "the fourth slot");
    assert!(slots.take(gone).await.expect("take").is_none());
    slots
        .give_back_now(&key, full.expect("held"))
        .await
        .expect("give back");
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    assert!(
        takes(&slots, &key, 1, HOLD).await,
        "a waiter not heard from for 2 s no longer counts"
    );
}

/// Two governors (two replicas) sharing the slots: requests beyond four wait for a slot; a
/// wait longer than the governor's patience ends in `MailboxBusy`, with nothing sent.
#[tokio::test]
async fn governors_sharing_slots_wait_for_each_other_and_give_up_busy() {
    let db = TestDatabase::create().await.expect("test database");
    let governor = |max_wait: Duration| {
        let governor = Governor::new(GovernorConfig {
            max_wait,
            ..GovernorConfig::default()
        });
        governor.share_slots(Arc::new(MailboxSlots::new(db.pool.clone())));
        governor
    };
    let (a, b) = (
        governor(Duration::from_secs(30)),
        governor(Duration::from_millis(300)),
    );
    let key = key();
    let held = a.acquire_for(&key, 20).await.expect("a batch on replica a");
    match b.acquire_for(&key, 1).await {
        Err(GraphError::MailboxBusy { cap: 4, .. }) => {}
        other => panic!("expected MailboxBusy, got {other:?}"),
    }
    let waiting = tokio::spawn({
        let (a, key) = (a.clone(), key.clone());
        async move {
            a.acquire_for(&key, 1)
                .await
                .map(|_permit| std::time::Instant::now())
        }
    });
    let released = std::time::Instant::now();
    drop(held);
    let granted = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("a slot within 10 s of the batch's end")
        .expect("task")
        .expect("permit");
    assert!(
        granted >= released,
        "a slot was granted while all were held"
    );
}

/// A request that outlasts the hold keeps its slots (they are renewed while it runs); a
/// replica killed in the middle of a request loses them within one hold, not after the longest
/// request could take: until then the mailbox has fewer slots, and its after-action batches,
/// which want all four, none.
#[tokio::test]
async fn slots_are_renewed_while_held_and_a_killed_holder_loses_them_within_the_hold() {
    let db = TestDatabase::create().await.expect("test database");
    let hold = Duration::from_millis(600);
    let config = GovernorConfig {
        max_wait: Duration::from_millis(100),
        slot_hold: hold,
        ..GovernorConfig::default()
    };
    let governor = |config: GovernorConfig| {
        let governor = Governor::new(config);
        governor.share_slots(Arc::new(MailboxSlots::new(db.pool.clone())));
        governor
    };
    let key = key();
    let slots = MailboxSlots::new(db.pool.clone());

    let slow = governor(config.clone())
        .acquire_for(&key, 20)
        .await
        .expect("a batch");
    tokio::time::sleep(hold * 3).await;
    assert_eq!(
        slots.held(&key).await.expect("held"),
        4,
        "a running request's slots outlive their first hold"
    );
    let other = governor(config.clone());
    assert!(
        matches!(
            other.acquire_for(&key, 1).await,
            Err(GraphError::MailboxBusy { .. })
        ),
        "nothing free while the batch runs"
    );
    drop(slow);
    wait_until_held(&slots, &key, 0).await;

    // A replica killed while its poll runs: its runtime and its connections stop, nothing
    // is given back.
    let (url, replica_key, replica_config) = (db.url.clone(), key.clone(), config.clone());
    std::thread::spawn(move || {
        let replica = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let permit = replica.block_on(async {
            let pool = sqlx::PgPool::connect(&url).await.expect("connect");
            let killed = Governor::new(replica_config);
            killed.share_slots(Arc::new(MailboxSlots::new(pool)));
            killed.acquire_for(&replica_key, 1).await.expect("a poll")
        });
        replica.shutdown_background();
        // Dropped with no runtime left to give the slot back or renew it.
        drop(permit);
    })
    .join()
    .expect("the killed replica's thread");
    assert_eq!(slots.held(&key).await.expect("held"), 1);
    // Waits up to 10 s: far beyond the hold, far below the longest request.
    let patient = governor(GovernorConfig {
        max_wait: Duration::from_secs(10),
        ..config
    });
    let permit = patient
        .acquire_for(&key, 20)
        .await
        .expect("all four slots once the killed holder's hold ran out");
    drop(permit);
}

/// Waits (at most 5 s) until `count` slots of `key` are held.
async fn wait_until_held(slots: &MailboxSlots, key: &SlotKey, count: i64) {
    for _ in 0..100 {
        if slots.held(key).await.expect("held") == count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{count} slots were never held within 5 s");
}
