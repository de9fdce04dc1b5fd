//! Slot budgets per task kind: how many of a pool's slots a kind may hold, and how many are
//! kept for it, so that one kind's backlog (deliveries to a slow receiver, a mailbox's
//! after-actions) cannot take the slots another kind needs (polls).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::queue::KindClaim;

/// The budget of one kind in one pool, counted in slots (tasks held: running or prefetched).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotBudget {
    /// Slots only this kind may use: other kinds are claimed only into the rest, and this many
    /// of the kind's handlers can always run.
    pub reserved: usize,
    /// Most slots this kind may hold; `None`: all the slots not reserved for other kinds.
    pub max: Option<usize>,
}

/// What each kind may claim now, given the slots it holds and `free` slots in hand. A kind's
/// room leaves the unfilled reservations of the other kinds alone and stays within its
/// maximum; its own unfilled reservation is claimed before other kinds' tasks.
pub(super) fn kind_claims(
    kinds: &[String],
    budgets: &HashMap<String, SlotBudget>,
    owner_caps: &HashMap<String, i32>,
    held: impl Fn(&str) -> usize,
    free: usize,
) -> Vec<KindClaim> {
    let budget = |kind: &str| budgets.get(kind).copied().unwrap_or_default();
    let unmet: Vec<usize> = kinds
        .iter()
        .map(|kind| budget(kind).reserved.saturating_sub(held(kind)))
        .collect();
    let all_unmet: usize = unmet.iter().sum();
    kinds
        .iter()
        .zip(&unmet)
        .filter_map(|(kind, &own_unmet)| {
            let others_unmet = all_unmet - own_unmet;
            let mut room = free.saturating_sub(others_unmet);
            if let Some(max) = budget(kind).max {
                room = room.min(max.saturating_sub(held(kind)));
            }
            (room > 0).then(|| KindClaim {
                kind: kind.clone(),
                room,
                reserved: own_unmet.min(room),
                owner_cap: owner_caps.get(kind).copied(),
            })
        })
        .collect()
}

/// Slots held per kind by this pool: counted up when a task is dispatched and down when its
/// slot is given back.
#[derive(Debug, Default)]
pub(super) struct HeldByKind(HashMap<String, Arc<AtomicUsize>>);

impl HeldByKind {
    pub(super) fn new(kinds: &[String]) -> Self {
        Self(
            kinds
                .iter()
                .map(|kind| (kind.clone(), Arc::new(AtomicUsize::new(0))))
                .collect(),
        )
    }

    pub(super) fn get(&self, kind: &str) -> usize {
        self.0
            .get(kind)
            .map_or(0, |count| count.load(Ordering::Relaxed))
    }

    /// Counts a slot of `kind` until the returned guard is dropped.
    pub(super) fn hold(&self, kind: &str) -> HeldSlot {
        let count = self.0.get(kind).cloned();
        if let Some(count) = &count {
            count.fetch_add(1, Ordering::Relaxed);
        }
        HeldSlot(count)
    }
}

/// One counted slot of a kind; see [`HeldByKind::hold`].
pub(super) struct HeldSlot(Option<Arc<AtomicUsize>>);

impl Drop for HeldSlot {
    fn drop(&mut self) {
        if let Some(count) = &self.0 {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Permits to run handlers: a shared set, and a set of its own for each kind with reserved
/// slots, which that kind uses first. A reserved kind's claimed task therefore never waits
/// behind other kinds' prefetched tasks for a handler.
pub(super) struct RunPermits {
    shared: Arc<Semaphore>,
    reserved: HashMap<String, Arc<Semaphore>>,
    total: usize,
}

impl RunPermits {
    /// `concurrency` handlers at once, of which each kind's reservation is kept for it.
    pub(super) fn new(concurrency: usize, budgets: &HashMap<String, SlotBudget>) -> Self {
        let reserved: HashMap<String, Arc<Semaphore>> = budgets
            .iter()
            .filter(|(_, budget)| budget.reserved > 0)
            .map(|(kind, budget)| (kind.clone(), Arc::new(Semaphore::new(budget.reserved))))
            .collect();
        let reserved_total: usize = budgets.values().map(|budget| budget.reserved).sum();
        Self {
            shared: Arc::new(Semaphore::new(concurrency.saturating_sub(reserved_total))),
            reserved,
            total: concurrency.max(reserved_total),
        }
    }

    /// Waits for a permit to run a handler of `kind`; `None` once the permits are closed.
    pub(super) async fn acquire(&self, kind: &str) -> Option<OwnedSemaphorePermit> {
        let shared = self.shared.clone();
        match self.reserved.get(kind).cloned() {
            None => shared.acquire_owned().await.ok(),
            Some(own) => {
                tokio::select! {
                    biased;
                    permit = own.acquire_owned() => permit.ok(),
                    permit = shared.acquire_owned() => permit.ok(),
                }
            }
        }
    }

    /// Handlers running now.
    pub(super) fn in_use(&self) -> usize {
        let available: usize = self.shared.available_permits()
            + self
                .reserved
                .values()
                .map(|semaphore| semaphore.available_permits())
                .sum::<usize>();
        self.total.saturating_sub(available)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds() -> Vec<String> {
        ["actions", "deliver", "poll"].map(String::from).to_vec()
    }

    fn budgets() -> HashMap<String, SlotBudget> {
        HashMap::from([
            (
                "poll".to_owned(),
                SlotBudget {
                    reserved: 4,
                    max: None,
                },
            ),
            (
                "actions".to_owned(),
                SlotBudget {
                    reserved: 0,
                    max: Some(8),
                },
            ),
        ])
    }

    fn rooms(claims: &[KindClaim]) -> Vec<(&str, usize, usize)> {
        claims
            .iter()
            .map(|claim| (claim.kind.as_str(), claim.room, claim.reserved))
            .collect()
    }

    #[test]
    fn other_kinds_leave_the_unfilled_reservation_alone() {
        let held = |kind: &str| if kind == "deliver" { 40 } else { 0 };
        let claims = kind_claims(&kinds(), &budgets(), &HashMap::new(), held, 8);
        assert_eq!(
            rooms(&claims),
            vec![("actions", 4, 0), ("deliver", 4, 0), ("poll", 8, 4)]
        );
    }

    #[test]
    fn a_full_pool_of_deliveries_still_claims_polls() {
        // 44 of 48 slots held by deliveries: the 4 free ones are the polls' reservation.
        let held = |kind: &str| if kind == "deliver" { 44 } else { 0 };
        let claims = kind_claims(&kinds(), &budgets(), &HashMap::new(), held, 4);
        assert_eq!(rooms(&claims), vec![("poll", 4, 4)]);
    }

    #[test]
    fn a_filled_reservation_frees_the_rest_for_everyone() {
        let held = |kind: &str| match kind {
            "poll" => 5,
            "actions" => 8,
            _ => 0,
        };
        let caps = HashMap::from([("deliver".to_owned(), 3)]);
        let claims = kind_claims(&kinds(), &budgets(), &caps, held, 10);
        assert_eq!(rooms(&claims), vec![("deliver", 10, 0), ("poll", 10, 0)]);
        assert_eq!(claims[0].owner_cap, Some(3));
        assert_eq!(claims[1].owner_cap, None);
    }

    #[test]
    fn without_budgets_every_kind_may_take_every_free_slot() {
        let claims = kind_claims(&kinds(), &HashMap::new(), &HashMap::new(), |_| 0, 6);
        assert_eq!(
            rooms(&claims),
            vec![("actions", 6, 0), ("deliver", 6, 0), ("poll", 6, 0)]
        );
    }

    #[test]
    fn held_slots_are_counted_until_given_back() {
        let held = HeldByKind::new(&kinds());
        let first = held.hold("poll");
        let second = held.hold("poll");
        let unknown = held.hold("other");
        assert_eq!((held.get("poll"), held.get("other")), (2, 0));
        drop(first);
        drop(unknown);
        assert_eq!(held.get("poll"), 1);
        drop(second);
        assert_eq!(held.get("poll"), 0);
    }

    #[tokio::test]
    async fn a_reserved_kind_runs_while_other_kinds_hold_every_shared_permit() {
        let permits = RunPermits::new(4, &budgets());
        let mut taken = Vec::new();
        for _ in 0..4 {
            taken.push(permits.acquire("poll").await.expect("permit"));
        }
        assert_eq!(permits.in_use(), 4);
        let blocked = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            permits.acquire("deliver"),
        )
        .await;
        assert!(blocked.is_err(), "all 4 permits are in use");
        drop(taken);
        // Deliveries can take the shared permits (4 - 4 reserved = 0 here) only.
        let permits = RunPermits::new(6, &budgets());
        let deliveries = [
            permits.acquire("deliver").await.expect("permit"),
            permits.acquire("deliver").await.expect("permit"),
        ];
        let poll = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            permits.acquire("poll"),
        )
        .await;
        assert!(
            matches!(poll, Ok(Some(_))),
            "a poll gets its reserved permit"
        );
        assert_eq!(permits.in_use(), 3);
        drop(deliveries);
    }
}
