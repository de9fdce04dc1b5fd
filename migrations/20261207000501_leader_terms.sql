-- Leadership terms: the leader of a Lease records its term here when it takes over, and every
-- leader-only write (the sweep of deleted MailboxPolls, the purge of their ledgers) first checks,
-- in its own transaction, that the term is still the recorded one. A deposed leader whose late
-- write runs after a successor recorded its term is refused and changes nothing.
CREATE TABLE leader_terms (
    lease text PRIMARY KEY,
    -- The holder identity written into the Lease (pod name plus a per-process id).
    holder text NOT NULL,
    -- Grows by one with every term taken, whoever takes it.
    term bigint NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now()
);
