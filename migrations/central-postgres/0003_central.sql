-- The rest of central's schema on PostgreSQL: what SQLite's migrations
-- 0001 to 0012 hold, as they hold it today (integers are BIGINT, flags
-- BOOLEAN, times the same text or milliseconds). Keys and names are compared
-- and sorted byte by byte (COLLATE "C"), as SQLite does.

ALTER TABLE ops ADD COLUMN refs TEXT NOT NULL DEFAULT '[]';
ALTER TABLE ops ADD COLUMN traceparent TEXT;
ALTER TABLE ops ADD COLUMN resolution TEXT
    CHECK (resolution IN ('pending', 'applied', 'not_applied', 'unresolvable'));
CREATE INDEX ops_by_logged ON ops (logged_at);
CREATE INDEX ops_by_resolution ON ops (resolution, seq) WHERE resolution IS NOT NULL;

-- Writes forwarded and not yet answered. `opened` orders them as they were
-- opened (SQLite's rowid).
CREATE TABLE intents (
    op_id        TEXT PRIMARY KEY,
    opened       BIGSERIAL NOT NULL,
    method       TEXT NOT NULL,
    path         TEXT NOT NULL,
    class        TEXT NOT NULL,
    kind         TEXT NOT NULL,
    body         TEXT,
    refs         TEXT NOT NULL DEFAULT '[]',
    traceparent  TEXT,
    created_at   TEXT NOT NULL
);

CREATE TABLE health (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    checked_at  TEXT NOT NULL
);

CREATE TABLE entities (
    id          TEXT COLLATE "C" PRIMARY KEY,
    kind        TEXT NOT NULL,
    name        TEXT NOT NULL,
    domain_id   TEXT,
    updated_at  TEXT NOT NULL
);

CREATE TABLE edges (
    id             TEXT COLLATE "C" PRIMARY KEY,
    declared       BOOLEAN NOT NULL DEFAULT FALSE,
    cursor         BIGINT NOT NULL DEFAULT 0,
    version        TEXT,
    error          TEXT,
    first_seen_ms  BIGINT NOT NULL,
    last_seen_ms   BIGINT,
    acked_seq      BIGINT NOT NULL DEFAULT 0,
    session        BIGINT NOT NULL DEFAULT 0,
    protocol       BIGINT,
    needs_resync   TEXT,
    clock_skew_ms  BIGINT,
    database       TEXT,
    lease_ms       BIGINT
);

CREATE TABLE deliveries (
    seq         BIGINT NOT NULL REFERENCES ops (seq),
    edge        TEXT COLLATE "C" NOT NULL REFERENCES edges (id),
    state       TEXT NOT NULL CHECK (state IN ('pending', 'applied', 'adopted', 'failed', 'timed_out', 'skipped')),
    status      BIGINT,
    detail      TEXT,
    since_ms    BIGINT NOT NULL,
    updated_ms  BIGINT NOT NULL,
    PRIMARY KEY (seq, edge)
);
CREATE INDEX deliveries_by_state ON deliveries (state, edge, seq);
CREATE INDEX deliveries_by_edge ON deliveries (edge, seq);

CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  BIGINT NOT NULL
);

CREATE TABLE op_keys (
    key        TEXT COLLATE "C" NOT NULL,
    seq        BIGINT NOT NULL REFERENCES ops (seq),
    exclusive  BOOLEAN NOT NULL,
    PRIMARY KEY (key, seq)
);
CREATE INDEX op_keys_by_seq ON op_keys (seq);

CREATE TABLE resyncs (
    edge         TEXT COLLATE "C" PRIMARY KEY REFERENCES edges (id),
    kind         TEXT NOT NULL CHECK (kind IN ('resync', 'repair')),
    phase        TEXT NOT NULL,
    prune        BOOLEAN NOT NULL DEFAULT FALSE,
    fence        BIGINT,
    done         BIGINT NOT NULL DEFAULT 0,
    total        BIGINT NOT NULL DEFAULT 0,
    result       TEXT,
    error        TEXT,
    started_ms   BIGINT NOT NULL,
    updated_ms   BIGINT NOT NULL,
    finished_ms  BIGINT
);

CREATE TABLE drift_runs (
    edge         TEXT COLLATE "C" PRIMARY KEY REFERENCES edges (id),
    state        TEXT NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    fence        BIGINT,
    excluded     BIGINT NOT NULL DEFAULT 0,
    error        TEXT,
    started_ms   BIGINT NOT NULL,
    finished_ms  BIGINT,
    found_ms     BIGINT
);

CREATE TABLE drift (
    edge        TEXT COLLATE "C" NOT NULL REFERENCES edges (id),
    kind        TEXT COLLATE "C" NOT NULL,
    key         TEXT COLLATE "C" NOT NULL,
    category    TEXT NOT NULL CHECK (category IN ('missing_at_edge', 'only_at_edge', 'differs')),
    fields      TEXT NOT NULL DEFAULT '[]',
    central_id  TEXT,
    edge_id     TEXT,
    PRIMARY KEY (edge, kind, key)
);

CREATE TABLE needs_password (
    edge       TEXT COLLATE "C" NOT NULL REFERENCES edges (id),
    user_id    TEXT NOT NULL,
    user_key   TEXT COLLATE "C" NOT NULL,
    since_seq  BIGINT NOT NULL,
    PRIMARY KEY (edge, user_id)
);

CREATE TABLE resync_users (
    edge      TEXT COLLATE "C" NOT NULL REFERENCES edges (id),
    user_id   TEXT NOT NULL,
    user_key  TEXT NOT NULL,
    PRIMARY KEY (edge, user_id)
);
