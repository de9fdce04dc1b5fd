//! Leader election against the Kubernetes API emulator, with two electors told apart by their
//! credentials: whatever happens to the Lease renewals of the leader (refused, or never
//! answered), it stops leading before the other can take over, so two never lead at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use mailpoll::leader::{self, LeaderConfig};
use mailpoll_testkit::cluster;
use mailpoll_testkit::kube::{ApiError, FaultEffect, KubeEmulator};
use mailpoll_testkit::wait_for;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const LEASE: &str = "leader-test";
const PATIENCE: Duration = Duration::from_secs(30);
const LEASE_DURATION: Duration = Duration::from_millis(2000);

/// An elector's name, whether it leads from now on, and when that was seen.
type Change = (&'static str, bool, Instant);

/// Every leadership change of every elector, in order.
#[derive(Clone, Default)]
struct Transitions(Arc<Mutex<Vec<Change>>>);

impl Transitions {
    fn follow(&self, name: &'static str, mut leading: watch::Receiver<bool>) {
        let log = self.0.clone();
        tokio::spawn(async move {
            while leading.changed().await.is_ok() {
                let value = *leading.borrow_and_update();
                log.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((name, value, Instant::now()));
            }
        });
    }

    fn all(&self) -> Vec<Change> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Asserts that at no moment two electors led, replaying the changes in order.
    fn assert_never_two_leaders(&self) {
        let mut leaders: Vec<&str> = Vec::new();
        for (name, value, _) in self.all() {
            if value {
                assert!(
                    leaders.is_empty(),
                    "{name} became leader while {leaders:?} still led: {:?}",
                    self.names()
                );
                leaders.push(name);
            } else {
                leaders.retain(|leader| *leader != name);
            }
        }
    }

    fn names(&self) -> Vec<(&'static str, bool)> {
        self.all().into_iter().map(|(n, v, _)| (n, v)).collect()
    }
}

struct Election {
    emulator: KubeEmulator,
    namespace: String,
    transitions: Transitions,
    stop: CancellationToken,
}

impl Election {
    async fn start() -> Self {
        mailpoll::install_crypto_provider();
        let emulator = KubeEmulator::start()
            .await
            .expect("Kubernetes API emulator");
        let namespace = format!("lead-{}", &Uuid::new_v4().simple().to_string()[..8]);
        cluster::create_namespace(&emulator.client().expect("client"), &namespace)
            .await
            .expect("namespace");
        Self {
            emulator,
            namespace,
            transitions: Transitions::default(),
            stop: CancellationToken::new(),
        }
    }

    /// Starts an elector whose requests carry `name` as their credentials. The renew deadline
    /// plus a retry period is longer than the lease: only a deadline counted from the last
    /// renewal (not from the try that hangs) steps down in time.
    fn elector(&self, name: &'static str) -> watch::Receiver<bool> {
        let client = self.emulator.client_as(name).expect("client");
        let config = LeaderConfig {
            lease_duration: LEASE_DURATION,
            renew_deadline: Duration::from_millis(1500),
            retry_period: Duration::from_millis(750),
            ..LeaderConfig::new(LEASE, &self.namespace, name)
        };
        let (leading, _task) = leader::spawn(client, config, self.stop.clone());
        self.transitions.follow(name, leading.clone());
        leading
    }

    async fn holder(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(self.emulator.client().ok()?, &self.namespace);
        leases.get(LEASE).await.ok()?.spec?.holder_identity
    }

    /// `a` leads, then `b` watches the Lease for a while, then `effect` hits every Lease update
    /// of `a` until `b` has taken over.
    async fn take_over_after(&self, effect: FaultEffect) {
        let mut a = self.elector("a");
        a.wait_for(|l| *l).await.expect("a leads");
        let mut b = self.elector("b");
        wait_for("b to see a's renewals", PATIENCE, || async {
            let updates = self
                .emulator
                .requests()
                .iter()
                .filter(|r| r.user.as_deref() == Some("a") && r.verb == "update" && r.code == 200)
                .count();
            (updates >= 3).then_some(())
        })
        .await;
        assert!(!*b.borrow(), "b follows while a renews");
        self.emulator
            .inject_fault_for("a", "update", "leases", 10_000, effect);
        tokio::time::timeout(PATIENCE, b.wait_for(|l| *l))
            .await
            .expect("b takes over within 30 s")
            .expect("b's elector runs");
        assert!(!*a.borrow(), "a no longer leads");
        assert_eq!(self.holder().await.as_deref(), Some("b"));
        self.transitions.assert_never_two_leaders();
        let changes = self.transitions.names();
        assert_eq!(
            changes,
            [("a", true), ("a", false), ("b", true)],
            "a stepped down before b took over"
        );
        self.assert_stepped_down_within_the_lease("a");
        self.stop.cancel();
    }

    /// The safety property itself, whatever the other elector's timing: `name` stopped leading
    /// before its last answered renewal could have expired for anyone watching the Lease.
    fn assert_stepped_down_within_the_lease(&self, name: &str) {
        let renewed = self
            .emulator
            .requests()
            .iter()
            .filter(|r| {
                r.user.as_deref() == Some(name)
                    && r.resource == "leases"
                    && r.verb == "update"
                    && r.code == 200
            })
            .map(|r| r.answered_at)
            .max()
            .expect("renewals of the leader");
        let stepped_down = self
            .transitions
            .all()
            .into_iter()
            .find(|(n, value, _)| *n == name && !*value)
            .map(|(_, _, at)| at.into_std())
            .expect("the leader stepped down");
        let led_on = stepped_down.saturating_duration_since(renewed);
        assert!(
            led_on < LEASE_DURATION,
            "{name} led on for {led_on:?} after its last answered renewal; the Lease lasts {LEASE_DURATION:?}"
        );
    }
}

#[tokio::test]
async fn a_leader_whose_renewals_fail_steps_down_before_another_takes_over() {
    let election = Election::start().await;
    election
        .take_over_after(FaultEffect::Fail(ApiError::with_code(500, "injected")))
        .await;
}

#[tokio::test]
async fn a_leader_whose_renewals_never_answer_steps_down_before_another_takes_over() {
    let election = Election::start().await;
    election
        .take_over_after(FaultEffect::Stall(Duration::from_secs(60)))
        .await;
}

/// A renewal that took effect but whose answer came too late still counts as failed: the
/// leader steps down, and leads again once a renewal is answered in time.
#[tokio::test]
async fn a_renewal_answered_too_late_steps_down_and_the_next_answered_one_leads_again() {
    let election = Election::start().await;
    let mut a = election.elector("a");
    a.wait_for(|l| *l).await.expect("a leads");
    election.emulator.inject_fault_for(
        "a",
        "update",
        "leases",
        1,
        FaultEffect::Hold(Duration::from_secs(5)),
    );
    tokio::time::timeout(PATIENCE, a.wait_for(|l| !*l))
        .await
        .expect("a steps down while its renewal is unanswered")
        .expect("a's elector runs");
    tokio::time::timeout(PATIENCE, a.wait_for(|l| *l))
        .await
        .expect("a leads again once answered in time")
        .expect("a's elector runs");
    assert_eq!(election.holder().await.as_deref(), Some("a"));
    election.stop.cancel();
}
