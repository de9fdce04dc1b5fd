-- spec.startFrom and spec.filter: messages recorded but not delivered, with the reason.
--
-- Additive: binaries that predate it keep working (they never write the new state or
-- columns, and the counters they read are unchanged).

-- 'filtered': spec.filter rejected the message before delivery; never delivered or acted on.
-- 'skipped' with a skip_reason: received before spec.startFrom; never delivered. A 'skipped'
-- row without a skip_reason is still a tombstone (or removed before delivery).
ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_delivery_state_check;
-- NOT VALID: every existing row passed the narrower check, and a large ledger is not scanned
-- under an exclusive lock at start.
ALTER TABLE messages ADD CONSTRAINT messages_delivery_state_check
    CHECK (delivery_state IN ('none', 'pending', 'delivered', 'failed', 'skipped', 'filtered'))
    NOT VALID;
ALTER TABLE messages ADD COLUMN skip_reason text;

-- The instant `startFrom: now` stands for, fixed the first time the operator resolves the
-- MailboxPoll with that value, so later polls and resyncs use the same one.
ALTER TABLE mailbox_identities ADD COLUMN start_now_at timestamptz;

-- Counters for status (messagesFiltered, messagesSkipped), kept like the others.
ALTER TABLE ledger_counts ADD COLUMN filtered bigint NOT NULL DEFAULT 0;
ALTER TABLE ledger_counts ADD COLUMN before_start bigint NOT NULL DEFAULT 0;
ALTER TABLE ledger_count_deltas ADD COLUMN filtered bigint NOT NULL DEFAULT 0;
ALTER TABLE ledger_count_deltas ADD COLUMN before_start bigint NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION ledger_count_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO ledger_count_deltas
            (ledger_id, delivered, pending, failed, recorded_only, skipped, actions_parked,
             filtered, before_start)
        SELECT mailbox_uid,
               count(*) FILTER (WHERE delivery_state = 'delivered'),
               count(*) FILTER (WHERE delivery_state = 'pending'),
               count(*) FILTER (WHERE delivery_state = 'failed'),
               count(*) FILTER (WHERE delivery_state = 'none'),
               count(*) FILTER (WHERE delivery_state = 'skipped'),
               count(*) FILTER (WHERE actions_parked_at IS NOT NULL),
               count(*) FILTER (WHERE delivery_state = 'filtered'),
               count(*) FILTER (WHERE delivery_state = 'skipped' AND skip_reason IS NOT NULL)
        FROM new_rows GROUP BY mailbox_uid;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO ledger_count_deltas
            (ledger_id, delivered, pending, failed, recorded_only, skipped, actions_parked,
             filtered, before_start)
        SELECT mailbox_uid,
               -count(*) FILTER (WHERE delivery_state = 'delivered'),
               -count(*) FILTER (WHERE delivery_state = 'pending'),
               -count(*) FILTER (WHERE delivery_state = 'failed'),
               -count(*) FILTER (WHERE delivery_state = 'none'),
               -count(*) FILTER (WHERE delivery_state = 'skipped'),
               -count(*) FILTER (WHERE actions_parked_at IS NOT NULL),
               -count(*) FILTER (WHERE delivery_state = 'filtered'),
               -count(*) FILTER (WHERE delivery_state = 'skipped' AND skip_reason IS NOT NULL)
        FROM old_rows GROUP BY mailbox_uid;
    ELSE
        INSERT INTO ledger_count_deltas
            (ledger_id, delivered, pending, failed, recorded_only, skipped, actions_parked,
             filtered, before_start)
        SELECT ledger_id, sum(delivered), sum(pending), sum(failed), sum(recorded_only),
               sum(skipped), sum(actions_parked), sum(filtered), sum(before_start)
        FROM (
            SELECT mailbox_uid AS ledger_id, (delivery_state = 'delivered')::int AS delivered,
                   (delivery_state = 'pending')::int AS pending,
                   (delivery_state = 'failed')::int AS failed,
                   (delivery_state = 'none')::int AS recorded_only,
                   (delivery_state = 'skipped')::int AS skipped,
                   (actions_parked_at IS NOT NULL)::int AS actions_parked,
                   (delivery_state = 'filtered')::int AS filtered,
                   (delivery_state = 'skipped' AND skip_reason IS NOT NULL)::int AS before_start
            FROM new_rows
            UNION ALL
            SELECT mailbox_uid, -(delivery_state = 'delivered')::int,
                   -(delivery_state = 'pending')::int, -(delivery_state = 'failed')::int,
                   -(delivery_state = 'none')::int, -(delivery_state = 'skipped')::int,
                   -(actions_parked_at IS NOT NULL)::int,
                   -(delivery_state = 'filtered')::int,
                   -(delivery_state = 'skipped' AND skip_reason IS NOT NULL)::int
            FROM old_rows
        ) AS change
        GROUP BY ledger_id
        -- Most updates (webhook step recorded, content purged) change no counter.
        HAVING sum(delivered) <> 0 OR sum(pending) <> 0 OR sum(failed) <> 0
            OR sum(recorded_only) <> 0 OR sum(skipped) <> 0 OR sum(actions_parked) <> 0
            OR sum(filtered) <> 0 OR sum(before_start) <> 0;
    END IF;
    RETURN NULL;
END
$$;
