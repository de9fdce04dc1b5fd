-- Tasks waiting for a slot of their owner: a capped kind's task whose owner runs its cap of
-- tasks (concurrent deliveries per MailboxPoll) waits out of the claim's ranges until one of
-- the owner's slots frees, instead of being read, locked and moved behind the owner's backlog
-- by every claim that meets it. With a backlog of 100,000 at its cap, that churn made the claim
-- Postgres's largest cost.
--
-- waiting_cap is the cap the claim found full (NULL: not waiting). The finish of a task that
-- held a slot releases the owner's first waiting task in fair order, one per slot it frees;
-- the rescue loop releases, as a safety net, those of owners with free slots (a task that
-- began to wait while the owner's last task finished would otherwise wait for good).
ALTER TABLE tasks ADD COLUMN waiting_cap integer CHECK (waiting_cap BETWEEN 1 AND 1000);

DROP INDEX tasks_fair;
CREATE INDEX tasks_fair ON tasks (kind, fair_at, id)
    WHERE state = 'pending' AND waiting_cap IS NULL;
DROP INDEX tasks_fair_delayed;
CREATE INDEX tasks_fair_delayed ON tasks (kind, fair_at, id)
    WHERE state = 'pending' AND fair_delay_us > 0 AND waiting_cap IS NULL;

-- Release: an owner's waiting tasks in fair order; the safety net walks the owners.
CREATE INDEX tasks_owner_waiting ON tasks (owner_uid, kind, fair_at, id)
    WHERE state = 'pending' AND waiting_cap IS NOT NULL;
