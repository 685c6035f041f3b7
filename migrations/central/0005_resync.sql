-- Initial sync and drift audit.
--
-- resyncs: the latest resync (or repair) of each edge, its phase and counts;
-- one left unfinished by a stop is started again.
CREATE TABLE resyncs (
    edge         TEXT PRIMARY KEY REFERENCES edges (id),
    kind         TEXT NOT NULL CHECK (kind IN ('resync', 'repair')),
    phase        TEXT NOT NULL,
    prune        INTEGER NOT NULL DEFAULT 0,
    fence        INTEGER,
    done         INTEGER NOT NULL DEFAULT 0,
    total        INTEGER NOT NULL DEFAULT 0,
    result       TEXT,
    error        TEXT,
    started_ms   INTEGER NOT NULL,
    updated_ms   INTEGER NOT NULL,
    finished_ms  INTEGER
);

-- drift_runs: the latest drift audit of each edge; drift: what it found.
CREATE TABLE drift_runs (
    edge         TEXT PRIMARY KEY REFERENCES edges (id),
    state        TEXT NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    fence        INTEGER,
    excluded     INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    started_ms   INTEGER NOT NULL,
    finished_ms  INTEGER
);

CREATE TABLE drift (
    edge        TEXT NOT NULL REFERENCES edges (id),
    kind        TEXT NOT NULL,
    key         TEXT NOT NULL,
    category    TEXT NOT NULL CHECK (category IN ('missing_at_edge', 'only_at_edge', 'differs')),
    fields      TEXT NOT NULL DEFAULT '[]',
    central_id  TEXT,
    edge_id     TEXT,
    PRIMARY KEY (edge, kind, key)
) WITHOUT ROWID;

-- Users a resync created at an edge without a password (Keystone's API never
-- returns one); a password set through the gateway after `since_seq` and
-- applied there clears the row.
CREATE TABLE needs_password (
    edge       TEXT NOT NULL REFERENCES edges (id),
    user_id    TEXT NOT NULL,
    user_key   TEXT NOT NULL,
    since_seq  INTEGER NOT NULL,
    PRIMARY KEY (edge, user_id)
) WITHOUT ROWID;
