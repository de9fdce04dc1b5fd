//! How many reconciles run at once, admitted in the order they became due.
//!
//! kube-runtime's own limit (`controller::Config::concurrency`) is unfair under saturation:
//! while every slot is busy, the runner parks each due object in a hash set and, when a slot
//! frees, takes whichever comes first in that set's iteration order. An object requeued
//! often and early in that order is taken again and again; one late in it waits for as long
//! as the backlog lasts. At 10,000 MailboxPolls on a saturated leader, about 1 in 100 new
//! MailboxPolls was never reconciled (no status, never polled) while the rest ran on
//! schedule. So the controller runs unbounded (every due object starts at once) and each
//! reconcile first waits here, in a first-come first-served queue.
//!
//! What a user waits for (a new object or spec to be observed, a forced poll to start) has a
//! lane of its own, so it is not queued behind a backlog of routine looks.

use std::sync::Arc;

use tokio::sync::{Semaphore, SemaphorePermit};

/// Reconciles of the urgent lane running at once, beside the routine ones.
pub const URGENT_LANE: usize = 4;

/// Which lane a reconcile waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Someone waits for it: a spec not observed yet, a forced poll not handled yet.
    Urgent,
    /// Everything else: the looks that follow the schedule and the workers' announcements.
    Routine,
}

/// A first-come first-served limit on reconciles running at once, per lane.
#[derive(Debug, Clone)]
pub struct ReconcileGate {
    routine: Arc<Semaphore>,
    urgent: Arc<Semaphore>,
}

impl ReconcileGate {
    /// At most `concurrency` routine reconciles at once (at least one), and
    /// [`URGENT_LANE`] urgent ones beside them.
    pub fn new(concurrency: u16) -> Self {
        Self {
            routine: Arc::new(Semaphore::new(usize::from(concurrency.max(1)))),
            urgent: Arc::new(Semaphore::new(URGENT_LANE)),
        }
    }

    /// Waits for a turn: turns are given in the order they were asked for. An urgent
    /// reconcile takes a turn in either lane, whichever comes first (10,000 new objects at
    /// once are all urgent, and all lanes serve them).
    pub async fn admit(&self, lane: Lane) -> SemaphorePermit<'_> {
        match lane {
            Lane::Routine => acquire(&self.routine).await,
            Lane::Urgent => tokio::select! {
                permit = acquire(&self.urgent) => permit,
                permit = acquire(&self.routine) => permit,
            },
        }
    }
}

async fn acquire(permits: &Semaphore) -> SemaphorePermit<'_> {
    // Closed never: nothing here closes the semaphores.
    match permits.acquire().await {
        Ok(permit) => permit,
        Err(_) => unreachable!("the reconcile gate is never closed"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Duration;

    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::controller::{Action, Config, Controller};
    use kube::runtime::reflector::{self, Store};
    use kube::runtime::watcher;

    use super::*;

    const OBJECTS: usize = 40;

    fn objects() -> (Store<ConfigMap>, Vec<Arc<ConfigMap>>) {
        let (store, mut writer) = reflector::store();
        let objects: Vec<ConfigMap> = (0..OBJECTS)
            .map(|i| {
                let mut object = ConfigMap::default();
                object.metadata.name = Some(format!("object-{i}"));
                object.metadata.namespace = Some("ns".into());
                object
            })
            .collect();
        writer.apply_watcher_event(&watcher::Event::Init);
        for object in &objects {
            writer.apply_watcher_event(&watcher::Event::InitApply(object.clone()));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        (store, objects.into_iter().map(Arc::new).collect())
    }

    #[derive(thiserror::Error, Debug)]
    #[error("never")]
    struct Never;

    /// Reconciles per object name.
    type Counts = Arc<Mutex<HashMap<String, usize>>>;

    /// Reconciles per object while every object asks to be reconciled again at once and each
    /// reconcile takes a while (a saturated controller), for `run`.
    async fn reconciles_under_saturation(
        config: Config,
        gate: Option<ReconcileGate>,
        run: Duration,
    ) -> HashMap<String, usize> {
        let (store, objects) = objects();
        let counts: Counts = Arc::default();
        let context = Arc::new((counts.clone(), gate));
        let triggers = futures::stream::iter(objects).chain(futures::stream::pending());
        let controller = Controller::for_shared_stream(triggers, store)
            .with_config(config)
            .run(
                |object: Arc<ConfigMap>, context: Arc<(Counts, Option<ReconcileGate>)>| async move {
                    let _turn = match &context.1 {
                        Some(gate) => Some(gate.admit(Lane::Routine).await),
                        None => None,
                    };
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let name = object.metadata.name.clone().unwrap_or_default();
                    *context.0.lock().expect("counts").entry(name).or_default() += 1;
                    Ok::<_, Never>(Action::requeue(Duration::ZERO))
                },
                |_, _: &Never, _| Action::await_change(),
                context,
            )
            .for_each(|_| async {});
        let _ = tokio::time::timeout(run, controller).await;
        counts.lock().expect("counts").clone()
    }

    #[tokio::test]
    async fn under_saturation_every_object_gets_its_turn() {
        let counts = reconciles_under_saturation(
            Config::default(),
            Some(ReconcileGate::new(1)),
            Duration::from_millis(1500),
        )
        .await;
        let fewest = (0..OBJECTS)
            .map(|i| counts.get(&format!("object-{i}")).copied().unwrap_or(0))
            .min();
        assert!(
            fewest >= Some(2),
            "every object is reconciled again and again in turn: {counts:?}"
        );
    }

    #[tokio::test]
    async fn the_urgent_lane_does_not_wait_behind_routine_work() {
        let gate = ReconcileGate::new(1);
        let _busy = gate.admit(Lane::Routine).await;
        let routine = tokio::time::timeout(Duration::from_millis(50), gate.admit(Lane::Routine));
        assert!(routine.await.is_err(), "the routine lane is full");
        let urgent = tokio::time::timeout(Duration::from_millis(50), gate.admit(Lane::Urgent));
        assert!(urgent.await.is_ok(), "an urgent reconcile runs beside it");
    }

    /// Why the gate exists: kube-runtime's own limit leaves objects waiting for as long as
    /// the saturation lasts. (Should this start failing, kube-runtime admits fairly now and
    /// the gate could go.)
    #[tokio::test]
    async fn kube_runtimes_own_limit_starves_objects_under_saturation() {
        let counts = reconciles_under_saturation(
            Config::default().concurrency(1),
            None,
            Duration::from_millis(1500),
        )
        .await;
        let total: usize = counts.values().sum();
        let never = (0..OBJECTS)
            .filter(|i| !counts.contains_key(&format!("object-{i}")))
            .count();
        assert!(total > 4 * OBJECTS, "saturated: {total} reconciles");
        assert!(
            never > 0,
            "some objects never get a turn while others run {total} times: {counts:?}"
        );
    }
}
