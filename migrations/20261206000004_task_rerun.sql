-- A task asked to run once more: set on a live task when work it must see arrived after it
-- may have looked (an after-actions run and a message made due meanwhile). Recording its
-- success puts it back to pending instead, so that work is never left without a run.
ALTER TABLE tasks ADD COLUMN rerun_requested boolean NOT NULL DEFAULT false;
