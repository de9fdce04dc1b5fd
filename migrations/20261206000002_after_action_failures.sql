-- After-actions that keep failing are parked instead of blocking the mailbox's line.
--
-- actions_failures counts failed after-action attempts of a message. After a few (see
-- pipeline::actions::MAX_ACTION_FAILURES), or at once for a configuration error such as a
-- move destination that does not exist, the message is parked: actions_parked_at is set and
-- actions_error says why. Parked messages are skipped by the actions run and by the leader's
-- sweep, so they neither hold up the others nor bring dead actions tasks back every minute.
ALTER TABLE messages
    ADD COLUMN actions_failures  integer NOT NULL DEFAULT 0,
    ADD COLUMN actions_parked_at timestamptz,
    ADD COLUMN actions_error     text;

DROP INDEX messages_actions_due;
CREATE INDEX messages_actions_due ON messages (mailbox_uid, seq)
    WHERE actions_due AND actions_parked_at IS NULL;
CREATE INDEX messages_actions_parked ON messages (mailbox_uid)
    WHERE actions_parked_at IS NOT NULL;
