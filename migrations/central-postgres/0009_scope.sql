-- Per-site scope. An op outside an edge's scope reaches it as a marker the
-- edge acknowledges `out_of_scope`: a delivery state of its own, never out of
-- sync. Each edge's scope as central last served it (NULL: everything), so a
-- change made while central was down is seen at its next start.
ALTER TABLE deliveries DROP CONSTRAINT deliveries_state_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_state_check
    CHECK (state IN ('pending', 'applied', 'adopted', 'failed', 'timed_out', 'skipped', 'operator_skipped', 'out_of_scope'));

ALTER TABLE edges ADD COLUMN scope TEXT;
