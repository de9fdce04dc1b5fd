//! Runs the reconciles: each object at most once at a time, due objects waiting their turn
//! first come first served, and no more reconciles in existence than may run.
//!
//! kube-runtime's runner does neither well at fleet scale. With its concurrency limit it
//! parks due objects in a hash set while every slot is busy and, when a slot frees, takes
//! whichever comes first in that set's iteration order: an object requeued often and early
//! in that order is taken again and again, one late in it waits for as long as the backlog
//! lasts (at 10,000 MailboxPolls on a saturated leader, about 1 in 100 new MailboxPolls was
//! never reconciled). Without the limit every due object's reconcile is spawned at once, and
//! the runner polls every unfinished one each time any of them makes progress: with
//! thousands waiting for a turn, a saturated leader spent a fifth of its CPU polling them,
//! so the further behind it fell the more each reconcile cost. Here a due object waiting for
//! its turn is an entry in a queue, and a reconcile starts only when it may run.
//!
//! kube-runtime's scheduler still times the requeues (one entry per object, the earliest
//! wins), and the reconcile and its error policy are the caller's.
//!
//! What a user waits for (a new object or spec to be observed, a forced poll to start) has a
//! lane of its own, so it is not queued behind a backlog of routine looks.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use kube::runtime::scheduler::{ScheduleRequest, scheduler};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Reconciles of the urgent lane running at once, beside the routine ones.
pub const URGENT_LANE: usize = 4;

/// How long a reconcile that panicked waits before its object is looked at again.
const AFTER_PANIC: Duration = Duration::from_secs(30);

/// What a reconcile asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    requeue_after: Option<Duration>,
}

impl Action {
    /// Look at the object again after `after` (sooner if it changes).
    pub fn requeue(after: Duration) -> Self {
        Self {
            requeue_after: Some(after),
        }
    }

    /// Look at the object again only when it changes or is announced.
    pub fn await_change() -> Self {
        Self {
            requeue_after: None,
        }
    }

    pub fn requeue_after(&self) -> Option<Duration> {
        self.requeue_after
    }
}

/// Which queue a due object waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Someone waits for it: a spec not observed yet, a forced poll not handled yet.
    Urgent,
    /// Everything else: the looks that follow the schedule and the workers' announcements.
    Routine,
}

/// Which limit a running reconcile counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Routine,
    Urgent,
}

/// The bookkeeping of turns: who waits, in which order, who runs. Pure; the loop in [`run`]
/// carries it out.
#[derive(Debug)]
struct Turns<T> {
    /// Routine reconciles at once (at least one).
    routine_limit: usize,
    /// Urgent reconciles at once beside the routine ones.
    urgent_limit: usize,
    /// Waiting objects with the number of their arrival, per lane.
    routine: VecDeque<(u64, T)>,
    urgent: VecDeque<(u64, T)>,
    waiting: HashSet<T>,
    running: HashMap<T, Slot>,
    /// Running objects that became due again meanwhile: they queue once they finish.
    due_again: HashSet<T>,
    arrivals: u64,
}

impl<T: Eq + Hash + Clone> Turns<T> {
    fn new(routine_limit: usize, urgent_limit: usize) -> Self {
        Self {
            routine_limit: routine_limit.max(1),
            urgent_limit,
            routine: VecDeque::new(),
            urgent: VecDeque::new(),
            waiting: HashSet::new(),
            running: HashMap::new(),
            due_again: HashSet::new(),
            arrivals: 0,
        }
    }

    /// `item` is due: it queues at the back of its lane, unless it is already waiting, or
    /// running (then it queues again once it has finished).
    fn due(&mut self, item: T, lane: Lane) {
        if self.running.contains_key(&item) {
            self.due_again.insert(item);
            return;
        }
        if !self.waiting.insert(item.clone()) {
            return;
        }
        self.arrivals += 1;
        match lane {
            Lane::Urgent => self.urgent.push_back((self.arrivals, item)),
            Lane::Routine => self.routine.push_back((self.arrivals, item)),
        }
    }

    fn running_in(&self, slot: Slot) -> usize {
        self.running.values().filter(|s| **s == slot).count()
    }

    /// The next object to run, and the slot it takes: an urgent one takes an urgent slot
    /// when one is free; a free routine slot goes to whichever object has waited longest,
    /// urgent or routine.
    fn next_turn(&mut self) -> Option<(T, Slot)> {
        let urgent_free = self.running_in(Slot::Urgent) < self.urgent_limit;
        let routine_free = self.running_in(Slot::Routine) < self.routine_limit;
        let (lane, slot) = if urgent_free && !self.urgent.is_empty() {
            (Lane::Urgent, Slot::Urgent)
        } else if routine_free {
            match (self.urgent.front(), self.routine.front()) {
                (Some((urgent, _)), Some((routine, _))) if urgent < routine => {
                    (Lane::Urgent, Slot::Routine)
                }
                (Some(_), None) => (Lane::Urgent, Slot::Routine),
                (_, Some(_)) => (Lane::Routine, Slot::Routine),
                (None, None) => return None,
            }
        } else {
            return None;
        };
        let (_, item) = match lane {
            Lane::Urgent => self.urgent.pop_front()?,
            Lane::Routine => self.routine.pop_front()?,
        };
        self.waiting.remove(&item);
        self.running.insert(item.clone(), slot);
        Some((item, slot))
    }

    /// `item`'s reconcile has finished; returns whether it became due again meanwhile.
    fn finished(&mut self, item: &T) -> bool {
        self.running.remove(item);
        self.due_again.remove(item)
    }

    fn running(&self) -> usize {
        self.running.len()
    }
}

/// How many reconciles run at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub routine: usize,
    pub urgent: usize,
}

/// Runs reconciles until `stop`, then lets the running ones finish. `triggers` make an
/// object due at once; `lookup` finds its current copy (an object it cannot find is not
/// reconciled: it was deleted); `lane_of` says which queue it waits in; `reconcile` returns
/// when to look again.
pub async fn run<T, O, Fut>(
    triggers: impl Stream<Item = T> + Send,
    lookup: impl Fn(&T) -> Option<O>,
    lane_of: impl Fn(&O) -> Lane,
    reconcile: impl Fn(O) -> Fut,
    limits: Limits,
    stop: CancellationToken,
) where
    T: Eq + Hash + Clone + Send + std::fmt::Debug + 'static,
    Fut: Future<Output = Action> + Send + 'static,
{
    let (requeue_tx, requeue_rx) = mpsc::unbounded_channel::<ScheduleRequest<T>>();
    let now = triggers.map(|message| ScheduleRequest {
        message,
        run_at: Instant::now(),
    });
    let requeues = futures::stream::unfold(requeue_rx, |mut rx| async move {
        rx.recv().await.map(|request| (request, rx))
    });
    let mut due = std::pin::pin!(scheduler(futures::stream::select(now, requeues)));
    let mut turns = Turns::new(limits.routine, limits.urgent);
    let mut reconciles: JoinSet<(T, Action)> = JoinSet::new();
    let queue = |turns: &mut Turns<T>, item: T| {
        if let Some(object) = lookup(&item) {
            turns.due(item, lane_of(&object));
        }
    };
    loop {
        while let Some((item, _slot)) = turns.next_turn() {
            let Some(object) = lookup(&item) else {
                turns.finished(&item);
                continue;
            };
            let reconcile = AssertUnwindSafe(reconcile(object)).catch_unwind();
            reconciles.spawn(async move {
                let action = reconcile.await.unwrap_or_else(|_| {
                    tracing::error!(object = ?item, "a reconcile panicked");
                    Action::requeue(AFTER_PANIC)
                });
                (item, action)
            });
        }
        tokio::select! {
            () = stop.cancelled() => break,
            Some(item) = due.next() => queue(&mut turns, item),
            Some(done) = reconciles.join_next(), if turns.running() > 0 => {
                // A reconcile's task ends only with its result: panics are caught above,
                // and nothing aborts the tasks while this loop runs.
                let Ok((item, action)) = done else { continue };
                if turns.finished(&item) {
                    queue(&mut turns, item.clone());
                }
                // A requeue beyond what an Instant can hold is no requeue.
                if let Some(run_at) = action
                    .requeue_after()
                    .and_then(|after| Instant::now().checked_add(after))
                {
                    let _ = requeue_tx.send(ScheduleRequest {
                        message: item,
                        run_at,
                    });
                }
            }
        }
    }
    while reconciles.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    fn turns() -> Turns<&'static str> {
        Turns::new(1, 1)
    }

    #[test]
    fn due_objects_run_first_come_first_served_one_turn_each() {
        let mut turns = Turns::new(1, 0);
        for item in ["a", "b", "a", "c"] {
            turns.due(item, Lane::Routine);
        }
        let mut order = Vec::new();
        while let Some((item, _)) = turns.next_turn() {
            order.push(item);
            assert_eq!(turns.next_turn(), None, "one routine slot");
            assert!(!turns.finished(&item));
        }
        assert_eq!(order, ["a", "b", "c"]);
    }

    #[test]
    fn an_object_due_while_it_runs_queues_again_once_it_has_finished() {
        let mut turns = turns();
        turns.due("a", Lane::Routine);
        let (item, _) = turns.next_turn().expect("a runs");
        turns.due("a", Lane::Routine);
        assert_eq!(turns.next_turn(), None, "never twice at once");
        assert!(turns.finished(&item), "due again");
        assert!(!turns.finished(&item), "once");
    }

    #[test]
    fn urgent_objects_have_their_own_slots_and_share_the_routine_ones_in_arrival_order() {
        let mut turns = Turns::new(1, 1);
        turns.due("routine-1", Lane::Routine);
        turns.due("urgent-1", Lane::Urgent);
        turns.due("urgent-2", Lane::Urgent);
        turns.due("routine-2", Lane::Routine);
        // The urgent slot goes to the first urgent object, the routine slot to whichever
        // waited longest.
        assert_eq!(turns.next_turn(), Some(("urgent-1", Slot::Urgent)));
        assert_eq!(turns.next_turn(), Some(("routine-1", Slot::Routine)));
        assert_eq!(turns.next_turn(), None);
        turns.finished(&"routine-1");
        assert_eq!(turns.next_turn(), Some(("urgent-2", Slot::Routine)));
        turns.finished(&"urgent-1");
        assert_eq!(
            turns.next_turn(),
            None,
            "a routine object never takes an urgent slot"
        );
        turns.finished(&"urgent-2");
        assert_eq!(turns.next_turn(), Some(("routine-2", Slot::Routine)));
    }

    /// Reconciles per object, and the most that existed at once, while `objects` objects
    /// are due at once and each asks to be looked at again at once (a saturated controller).
    async fn saturated(objects: usize, limits: Limits, run_for: Duration) -> (Vec<usize>, usize) {
        let counts = Arc::new(Mutex::new(vec![0usize; objects]));
        let alive = Arc::new(AtomicUsize::new(0));
        let most_alive = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let triggers = futures::stream::iter(0..objects).chain(futures::stream::pending());
        let reconcile = |item: usize| {
            let (counts, alive, most_alive) = (counts.clone(), alive.clone(), most_alive.clone());
            // Counted from the moment the reconcile exists, not from when it first runs.
            let now = alive.fetch_add(1, Ordering::SeqCst) + 1;
            most_alive.fetch_max(now, Ordering::SeqCst);
            async move {
                tokio::task::yield_now().await;
                counts.lock().expect("counts")[item] += 1;
                alive.fetch_sub(1, Ordering::SeqCst);
                Action::requeue(Duration::ZERO)
            }
        };
        let runner = run(
            triggers,
            |item: &usize| Some(*item),
            |_| Lane::Routine,
            reconcile,
            limits,
            stop.clone(),
        );
        let _ = tokio::time::timeout(run_for, runner).await;
        let counts = counts.lock().expect("counts").clone();
        (counts, most_alive.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn under_saturation_every_object_gets_its_turn_and_only_the_running_exist() {
        let limits = Limits {
            routine: 2,
            urgent: URGENT_LANE,
        };
        let (counts, most_alive) = saturated(40, limits, Duration::from_millis(1500)).await;
        assert!(
            counts.iter().all(|count| *count >= 2),
            "every object is reconciled again and again in turn: {counts:?}"
        );
        assert!(
            most_alive <= 2,
            "{most_alive} reconciles existed at once: waiting objects must not be futures"
        );
    }

    #[tokio::test]
    async fn thousands_due_at_once_wait_as_queue_entries() {
        let limits = Limits {
            routine: 8,
            urgent: URGENT_LANE,
        };
        let (counts, most_alive) = saturated(5_000, limits, Duration::from_secs(5)).await;
        assert!(most_alive <= 8, "{most_alive} reconciles existed at once");
        assert!(
            counts.iter().all(|count| *count >= 1),
            "every one of 5,000 objects had a turn: {} did not",
            counts.iter().filter(|count| **count == 0).count()
        );
    }

    /// Waits (10 s at most) until `count` reaches `at_least`.
    async fn reached(count: &AtomicUsize, at_least: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while count.load(Ordering::SeqCst) < at_least {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Runs `items` through a runner with one routine slot whose reconcile of "fine" counts
    /// and asks to run again at once, and of anything else calls `other`; returns once "fine"
    /// has run five times (every other item had its turn by then: turns are first come, first
    /// served, and the others were due first).
    async fn five_turns_of_fine(items: [&'static str; 2], other: fn(&'static str)) -> bool {
        let fine = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let count = fine.clone();
        let runner = tokio::spawn(run(
            futures::stream::iter(items).chain(futures::stream::pending()),
            |item: &&'static str| (*item != "deleted").then_some(*item),
            |_| Lane::Routine,
            move |item: &'static str| {
                let count = count.clone();
                async move {
                    if item != "fine" {
                        other(item);
                        return Action::await_change();
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    Action::requeue(Duration::ZERO)
                }
            },
            Limits {
                routine: 1,
                urgent: 0,
            },
            stop.clone(),
        ));
        let ran = reached(&fine, 5).await;
        stop.cancel();
        let _ = runner.await;
        ran
    }

    #[tokio::test]
    async fn an_object_the_lookup_cannot_find_is_not_reconciled() {
        // Counted, not panicked on: the runner catches a reconcile's panic.
        static OTHERS: AtomicUsize = AtomicUsize::new(0);
        let ran = five_turns_of_fine(["deleted", "fine"], |_| {
            OTHERS.fetch_add(1, Ordering::SeqCst);
        })
        .await;
        assert!(ran, "the object found is reconciled again and again");
        assert_eq!(OTHERS.load(Ordering::SeqCst), 0, "the deleted one never");
    }

    #[tokio::test]
    async fn a_panicking_reconcile_does_not_stop_the_others() {
        static PANICKED: AtomicUsize = AtomicUsize::new(0);
        let ran = five_turns_of_fine(["panics", "fine"], |item| {
            PANICKED.fetch_add(1, Ordering::SeqCst);
            panic!("{item}: a reconcile that panics")
        })
        .await;
        assert_eq!(PANICKED.load(Ordering::SeqCst), 1, "it had its turn");
        assert!(ran, "the runner went on with the others");
    }

    /// Why this runner exists: kube-runtime's own limit leaves objects waiting for as long as
    /// the saturation lasts. (Should this start failing, kube-runtime admits fairly now.)
    #[tokio::test]
    async fn kube_runtimes_own_limit_starves_objects_under_saturation() {
        use k8s_openapi::api::core::v1::ConfigMap;
        use kube::runtime::controller::{Action as KubeAction, Config, Controller};
        use kube::runtime::reflector::{self, Store};
        use kube::runtime::watcher;

        const OBJECTS: usize = 40;
        let (store, mut writer): (Store<ConfigMap>, _) = reflector::store();
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
        let counts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let triggers = futures::stream::iter(objects.into_iter().map(Arc::new))
            .chain(futures::stream::pending());
        #[derive(thiserror::Error, Debug)]
        #[error("never")]
        struct Never;
        let controller = Controller::for_shared_stream(triggers, store)
            .with_config(Config::default().concurrency(1))
            .run(
                |object: Arc<ConfigMap>, counts: Arc<Mutex<HashMap<String, usize>>>| async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let name = object.metadata.name.clone().unwrap_or_default();
                    *counts.lock().expect("counts").entry(name).or_default() += 1;
                    Ok::<_, Never>(KubeAction::requeue(Duration::ZERO))
                },
                |_, _: &Never, _| KubeAction::await_change(),
                counts.clone(),
            )
            .for_each(|_| async {});
        let _ = tokio::time::timeout(Duration::from_millis(1500), controller).await;
        let counts = counts.lock().expect("counts").clone();
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
