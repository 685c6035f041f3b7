-- The central op log: intents (writes forwarded but not yet answered) and ops
-- (writes the upstream accepted, in gap-free seq order).

CREATE TABLE intents (
    op_id       TEXT PRIMARY KEY,
    method      TEXT NOT NULL,
    path        TEXT NOT NULL,
    class       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    body        TEXT,
    created_at  TEXT NOT NULL
);

CREATE TABLE ops (
    seq             INTEGER PRIMARY KEY,
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

-- One row, rewritten by readiness checks to prove the op log takes writes.
CREATE TABLE health (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at  TEXT NOT NULL
);
