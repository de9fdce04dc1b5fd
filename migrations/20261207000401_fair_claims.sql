-- Fair claims: tasks are claimed in the order of a fair time instead of run_at, so a backlog of
-- one owner (a first poll's 100,000 deliveries) cannot hold the queue; and a kind's tasks can be
-- capped per owner (concurrent deliveries per MailboxPoll), cluster-wide.
--
-- fair_at = run_at + fair_delay_us. Enqueue spaces an owner's tasks of one kind behind the ones
-- it already has pending (start-time fair queueing): an owner with nothing waiting gets
-- fair_at = run_at and goes ahead of another owner's backlog; two backlogs alternate. A generated
-- column keeps fair_at in step with every statement that moves run_at (retries, snoozes,
-- forced polls), including an older release's. Adding microseconds to a timestamptz directly is
-- only STABLE (it may depend on the session's time zone), which a generated column refuses; the
-- same sum on the UTC wall-clock time is IMMUTABLE and equal. (An IMMUTABLE SQL function around
-- the STABLE sum was not inlined and tripled the cost of an enqueue.)
ALTER TABLE tasks
    ADD COLUMN fair_delay_us bigint NOT NULL DEFAULT 0 CHECK (fair_delay_us >= 0),
    ADD COLUMN fair_at timestamptz GENERATED ALWAYS AS (
        ((run_at AT TIME ZONE 'UTC') + fair_delay_us * interval '1 microsecond') AT TIME ZONE 'UTC'
    ) STORED,
    -- At most this many tasks of this owner and kind run at once, cluster-wide (NULL: the
    -- claiming pool's default for the kind). A running capped task holds one of the owner's
    -- numbered slots; the unique index below makes two replicas' claims unable to overfill them.
    ADD COLUMN max_running integer CHECK (max_running BETWEEN 1 AND 1000),
    ADD COLUMN owner_slot integer;

-- Claim: due pending tasks of one kind in fair order. A task whose fair_at has passed is due
-- (fair_at >= run_at), so the claim reads this index up to now and stops; due backlogs whose
-- fair time is still ahead are read from the second index, which holds only delayed tasks
-- (scheduled polls, for instance, are not in it).
CREATE INDEX tasks_fair ON tasks (kind, fair_at, id) WHERE state = 'pending';
CREATE INDEX tasks_fair_delayed ON tasks (kind, fair_at, id)
    WHERE state = 'pending' AND fair_delay_us > 0;

-- Enqueue: where an owner's pending tasks of a kind end (its tail in fair order).
CREATE INDEX tasks_owner_fair ON tasks (owner_uid, kind, fair_at) WHERE state = 'pending';

-- Claim: the slots held by an owner's running capped tasks; one task per slot.
CREATE UNIQUE INDEX tasks_owner_slot ON tasks (owner_uid, kind, owner_slot)
    WHERE state = 'running' AND owner_slot IS NOT NULL;
