-- Flags of the edge's own: `initial_sync_done` once a resync from central's
-- state has completed here (an edge started with --initial-sync asks for one
-- until then).
CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  INTEGER NOT NULL
) WITHOUT ROWID;
