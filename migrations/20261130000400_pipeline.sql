-- The poll and delivery pipeline.

-- One Graph-talking run per mailbox at a time, cluster-wide: a poll or an after-actions run
-- takes this lease first. The token fences cursor writes: a run whose lease was taken over
-- cannot move the cursor.
ALTER TABLE mailbox_cursors
    ADD COLUMN run_token      uuid,
    ADD COLUMN run_lease_until timestamptz,
    ADD COLUMN last_poll_started_at timestamptz,
    ADD COLUMN last_poll_finished_at timestamptz,
    ADD COLUMN last_success_at timestamptz;

-- Every poll-requested-at value ever accepted, so each causes exactly one poll, across leader
-- changes and restarts. task_id is the poll task that served it (NULL while waiting for the
-- mailbox's running poll to finish its round).
CREATE TABLE poll_requests (
    mailbox_uid  uuid        NOT NULL,
    value        text        NOT NULL,
    task_id      bigint,
    requested_at timestamptz NOT NULL DEFAULT now(),
    served_at    timestamptz,
    PRIMARY KEY (mailbox_uid, value)
);
CREATE INDEX poll_requests_waiting ON poll_requests (mailbox_uid) WHERE served_at IS NULL;

-- Delivery steps of a message: the webhook, then the after-actions (mark read, move), done in
-- batches per mailbox; delivery_state becomes 'delivered' when both are done.
ALTER TABLE messages
    ADD COLUMN webhook_delivered_at timestamptz,
    ADD COLUMN actions_due          boolean NOT NULL DEFAULT false,
    ADD COLUMN actions_done_at      timestamptz;
CREATE INDEX messages_actions_due ON messages (mailbox_uid, seq) WHERE actions_due;
