-- Per-site scope. An op outside an edge's scope reaches it as a marker the
-- edge acknowledges `out_of_scope`: a delivery state of its own, never out of
-- sync. Each edge's scope as central last served it (NULL: everything), so a
-- change made while central was down is seen at its next start. SQLite
-- cannot change a CHECK constraint in place: the table is made again with
-- its rows.
CREATE TABLE deliveries_next (
    seq         INTEGER NOT NULL REFERENCES ops (seq),
    edge        TEXT NOT NULL REFERENCES edges (id),
    state       TEXT NOT NULL CHECK (state IN ('pending', 'applied', 'adopted', 'failed', 'timed_out', 'skipped', 'operator_skipped', 'out_of_scope')),
    status      INTEGER,
    detail      TEXT,
    since_ms    INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    PRIMARY KEY (seq, edge)
);
INSERT INTO deliveries_next (seq, edge, state, status, detail, since_ms, updated_ms)
    SELECT seq, edge, state, status, detail, since_ms, updated_ms FROM deliveries;
DROP TABLE deliveries;
ALTER TABLE deliveries_next RENAME TO deliveries;
CREATE INDEX deliveries_by_state ON deliveries (state, edge, seq);

ALTER TABLE edges ADD COLUMN scope TEXT;
