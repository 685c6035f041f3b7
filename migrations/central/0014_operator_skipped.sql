-- An op an operator had an edge pass over (`POST /v1/ops/{seq}/skip`) is a
-- delivery of its own state, `operator_skipped`: out of sync (the site may
-- differ) until a repair, a resync or a re-drive. SQLite cannot change a
-- CHECK constraint in place: the table is made again with its rows.
CREATE TABLE deliveries_next (
    seq         INTEGER NOT NULL REFERENCES ops (seq),
    edge        TEXT NOT NULL REFERENCES edges (id),
    state       TEXT NOT NULL CHECK (state IN ('pending', 'applied', 'adopted', 'failed', 'timed_out', 'skipped', 'operator_skipped')),
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
