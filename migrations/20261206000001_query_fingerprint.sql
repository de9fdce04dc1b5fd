-- The delta query a cursor's links belong to: what a delta token freezes of the round's first
-- request (folder, `$select`, filter), as the poll writes it (`DeltaOptions::fingerprint`).
-- A poll whose query differs does not follow the stored links (their pages would come back
-- with the old selection): it re-reads the folder from a fresh unfiltered round, and the
-- ledger absorbs what it had already recorded. Cursors written before this column existed
-- have no fingerprint and re-read their folder once.
ALTER TABLE mailbox_cursors ADD COLUMN query_fingerprint text;
