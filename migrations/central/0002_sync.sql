-- Sync state at central: what central knows of entities (for natural keys),
-- the edges, and each op's delivery state at each edge.

ALTER TABLE intents ADD COLUMN refs TEXT NOT NULL DEFAULT '[]';
ALTER TABLE ops ADD COLUMN refs TEXT NOT NULL DEFAULT '[]';

-- Entities central has seen in responses or looked up: ID -> natural key.
CREATE TABLE entities (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    domain_id   TEXT,
    updated_at  TEXT NOT NULL
);

CREATE TABLE edges (
    id            TEXT PRIMARY KEY,
    declared      INTEGER NOT NULL DEFAULT 0,
    cursor        INTEGER NOT NULL DEFAULT 0,
    version       TEXT,
    error         TEXT,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER
);

CREATE TABLE deliveries (
    seq         INTEGER NOT NULL REFERENCES ops (seq),
    edge        TEXT NOT NULL REFERENCES edges (id),
    state       TEXT NOT NULL CHECK (state IN ('pending', 'applied', 'adopted', 'failed', 'timed_out', 'skipped')),
    status      INTEGER,
    detail      TEXT,
    since_ms    INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    PRIMARY KEY (seq, edge)
);

CREATE INDEX deliveries_by_state ON deliveries (state, edge, seq);

CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  INTEGER NOT NULL
);
