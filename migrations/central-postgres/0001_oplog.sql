-- The op log on PostgreSQL, for several central processes on one database.
-- The same ops as on SQLite; seq is taken from one counter row inside the
-- transaction that commits the op, so the row lock orders commits as seqs.

-- The last seq handed out. One row: its lock is held from taking a seq to
-- the commit of the ops that have it.
CREATE TABLE oplog_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL CHECK (seq >= 0)
);
INSERT INTO oplog_head (id, seq) VALUES (1, 0);

CREATE TABLE ops (
    seq             BIGINT PRIMARY KEY,
    op_id           TEXT NOT NULL UNIQUE,
    state           TEXT NOT NULL CHECK (state IN ('committed', 'unknown_outcome')),
    method          TEXT NOT NULL,
    path            TEXT NOT NULL,
    class           TEXT NOT NULL,
    kind            TEXT NOT NULL,
    created_ids     TEXT NOT NULL DEFAULT '[]',
    body            TEXT,
    upstream_status INTEGER,
    request_id      TEXT,
    detail          TEXT,
    created_at      TEXT NOT NULL,
    logged_at       TEXT NOT NULL
);

CREATE INDEX ops_by_kind ON ops (kind, seq);
CREATE INDEX ops_by_state ON ops (state, seq);
