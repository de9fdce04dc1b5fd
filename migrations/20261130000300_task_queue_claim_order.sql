-- Claims take due pending tasks of several kinds at once in run_at order. The per-kind index
-- (tasks_claimable) cannot return that order across kinds without sorting every due task, so
-- this index serves the multi-kind claim; tasks_claimable still serves single-kind claims.
CREATE INDEX tasks_due ON tasks (run_at, id) WHERE state = 'pending';
