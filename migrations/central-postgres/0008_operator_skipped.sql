-- An op an operator had an edge pass over (`POST /v1/ops/{seq}/skip`) is a
-- delivery of its own state, `operator_skipped`: out of sync (the site may
-- differ) until a repair, a resync or a re-drive.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_state_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_state_check
    CHECK (state IN ('pending', 'applied', 'adopted', 'failed', 'timed_out', 'skipped', 'operator_skipped'));
