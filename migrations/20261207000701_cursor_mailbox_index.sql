-- Graph throttles per mailbox, so a run lease reads the Retry-After of every cursor of its
-- mailbox (`lower(mailbox) = lower(...)`), and a Retry-After is recorded on all of them. Without
-- an index each of those scanned every cursor: 3.3 ms of Postgres time per poll at 1,000
-- MailboxPolls, growing with the fleet. The run lease's other updates leave `mailbox` as it was,
-- so they stay HOT updates.
CREATE INDEX IF NOT EXISTS mailbox_cursors_mailbox_idx ON mailbox_cursors (lower(mailbox));
