-- Retention, deletion policy and per-ledger counters.
--
-- Everything here is additive: binaries that predate it keep working against it (the
-- counters are kept by triggers, whoever writes the ledger), and nothing they read changes.

-- ---------------------------------------------------------------------------------------------
-- Content retention: a message's personal data (subject, addresses, body, raw object, ...) is
-- cleared after a period; the row keeps what dedupe and delivery state need.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE messages ADD COLUMN content_purged_at timestamptz;
-- Rows whose content is still there, oldest first: a purge round reads only candidates, and a
-- purged row leaves the index.
CREATE INDEX messages_content_kept ON messages (recorded_at) WHERE content_purged_at IS NULL;

-- ---------------------------------------------------------------------------------------------
-- Identity retention: the ledger rows themselves are deleted once old enough, oldest received
-- first. Before a row goes, its received time is folded into the ledger's horizon (in the same
-- transaction): a message received at or before the horizon that the ledger does not hold is
-- never recorded again, so a resync that replays the folder delivers nothing twice.
-- ---------------------------------------------------------------------------------------------
CREATE TABLE ledger_horizons (
    ledger_id       uuid        PRIMARY KEY,
    purged_through  timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------------------------
-- Counters: per-ledger message counts by delivery state, for status, without counting rows.
-- Statement-level triggers append one delta row per ledger and statement (never update a
-- shared row, so concurrent writers neither wait on nor deadlock over a counter); reading
-- the counts folds the deltas into ledger_counts (see ledger::counts).
-- ---------------------------------------------------------------------------------------------
CREATE TABLE ledger_counts (
    ledger_id       uuid   PRIMARY KEY,
    delivered       bigint NOT NULL DEFAULT 0,
    pending         bigint NOT NULL DEFAULT 0,
    failed          bigint NOT NULL DEFAULT 0,
    recorded_only   bigint NOT NULL DEFAULT 0,
    skipped         bigint NOT NULL DEFAULT 0,
    actions_parked  bigint NOT NULL DEFAULT 0
);

CREATE TABLE ledger_count_deltas (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ledger_id       uuid   NOT NULL,
    delivered       bigint NOT NULL,
    pending         bigint NOT NULL,
    failed          bigint NOT NULL,
    recorded_only   bigint NOT NULL,
    skipped         bigint NOT NULL,
    actions_parked  bigint NOT NULL
);
CREATE INDEX ledger_count_deltas_by_ledger ON ledger_count_deltas (ledger_id, id);
-- Short-lived rows, inserted and deleted all the time.
ALTER TABLE ledger_count_deltas SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.02
);

-- The signed change of every counter of each ledger a statement touched.
CREATE FUNCTION ledger_count_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO ledger_count_deltas
            (ledger_id, delivered, pending, failed, recorded_only, skipped, actions_parked)
        SELECT mailbox_uid,
               count(*) FILTER (WHERE delivery_state = 'delivered'),
               count(*) FILTER (WHERE delivery_state = 'pending'),
               count(*) FILTER (WHERE delivery_state = 'failed'),
               count(*) FILTER (WHERE delivery_state = 'none'),
               count(*) FILTER (WHERE delivery_state = 'skipped'),
               count(*) FILTER (WHERE actions_parked_at IS NOT NULL)
        FROM new_rows GROUP BY mailbox_uid;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO ledger_count_deltas
            (ledger_id, delivered, pending, failed, recorded_only, skipped, actions_parked)
        SELECT mailbox_uid,
               -count(*) FILTER (WHERE delivery_state = 'delivered'),
               -count(*) FILTER (WHERE delivery_state = 'pending'),
               -count(*) FILTER (WHERE delivery_state = 'failed'),
               -count(*) FILTER (WHERE delivery_state = 'none'),
               -count(*) FILTER (WHERE delivery_state = 'skipped'),
               -count(*) FILTER (WHERE actions_parked_at IS NOT NULL)
        FROM old_rows GROUP BY mailbox_uid;
    ELSE
        INSERT INTO ledger_count_deltas
            (ledger_id, delivered, pending, failed, recorded_only, skipped, actions_parked)
        SELECT ledger_id, sum(delivered), sum(pending), sum(failed), sum(recorded_only),
               sum(skipped), sum(actions_parked)
        FROM (
            SELECT mailbox_uid AS ledger_id, (delivery_state = 'delivered')::int AS delivered,
                   (delivery_state = 'pending')::int AS pending,
                   (delivery_state = 'failed')::int AS failed,
                   (delivery_state = 'none')::int AS recorded_only,
                   (delivery_state = 'skipped')::int AS skipped,
                   (actions_parked_at IS NOT NULL)::int AS actions_parked
            FROM new_rows
            UNION ALL
            SELECT mailbox_uid, -(delivery_state = 'delivered')::int,
                   -(delivery_state = 'pending')::int, -(delivery_state = 'failed')::int,
                   -(delivery_state = 'none')::int, -(delivery_state = 'skipped')::int,
                   -(actions_parked_at IS NOT NULL)::int
            FROM old_rows
        ) AS change
        GROUP BY ledger_id
        -- Most updates (webhook step recorded, content purged) change no counter.
        HAVING sum(delivered) <> 0 OR sum(pending) <> 0 OR sum(failed) <> 0
            OR sum(recorded_only) <> 0 OR sum(skipped) <> 0 OR sum(actions_parked) <> 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_count_insert AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_count_changes();
CREATE TRIGGER messages_count_update AFTER UPDATE ON messages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_count_changes();
CREATE TRIGGER messages_count_delete AFTER DELETE ON messages
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_count_changes();

-- Backfill. The triggers above hold a lock on messages until this migration commits, so no
-- write falls between the count and the triggers.
INSERT INTO ledger_counts
    (ledger_id, delivered, pending, failed, recorded_only, skipped, actions_parked)
SELECT mailbox_uid,
       count(*) FILTER (WHERE delivery_state = 'delivered'),
       count(*) FILTER (WHERE delivery_state = 'pending'),
       count(*) FILTER (WHERE delivery_state = 'failed'),
       count(*) FILTER (WHERE delivery_state = 'none'),
       count(*) FILTER (WHERE delivery_state = 'skipped'),
       count(*) FILTER (WHERE actions_parked_at IS NOT NULL)
FROM messages GROUP BY mailbox_uid;

-- ---------------------------------------------------------------------------------------------
-- Poll history: the latest rows status reads come from indexes, whatever the history's length.
-- ---------------------------------------------------------------------------------------------
CREATE INDEX polls_latest ON polls (mailbox_uid, started_at DESC, id DESC);
CREATE INDEX polls_succeeded ON polls (mailbox_uid, started_at DESC, id DESC)
    WHERE outcome = 'succeeded';
CREATE INDEX polls_resynced ON polls (mailbox_uid, id) WHERE resynced;
CREATE INDEX poll_requests_served ON poll_requests (mailbox_uid, served_at DESC, requested_at DESC)
    WHERE served_at IS NOT NULL;

-- Dead tasks are pruned after their own period, oldest first.
CREATE INDEX tasks_dead_by_age ON tasks (finished_at) WHERE state = 'dead';

-- ---------------------------------------------------------------------------------------------
-- Deletion policy, remembered while the MailboxPoll exists (no finalizer): what the leader's
-- sweep does with the ledger of an object that is gone. 'retain' keeps it for a re-created
-- MailboxPoll with the same namespace, name, mailbox and folder.
-- ---------------------------------------------------------------------------------------------
ALTER TABLE mailbox_identities
    ADD COLUMN deletion_policy text NOT NULL DEFAULT 'retain'
        CHECK (deletion_policy IN ('retain', 'delete'));
