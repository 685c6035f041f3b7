-- What deletes removed, kept when retention prunes the delete ops: a resync
-- of an edge whose next op is gone (offline longer than retention, or on a
-- lost volume) still deletes at the edge what central deleted meanwhile,
-- instead of keeping it as if the edge had made it. One small row per delete
-- (its path and the keys of what it removed), kept for good.
CREATE TABLE tombstones (
    seq   INTEGER PRIMARY KEY,
    path  TEXT NOT NULL,
    refs  TEXT NOT NULL
);

-- The latest password each user was given (a create with one, an admin
-- update, a self-service change), kept when retention prunes its op: a
-- resync sets it at an edge that missed it. One row per user, the op as it
-- was logged (its body sealed like the op log's).
CREATE TABLE kept_passwords (
    user_id         TEXT PRIMARY KEY,
    seq             INTEGER NOT NULL,
    op_id           TEXT NOT NULL,
    state           TEXT NOT NULL,
    method          TEXT NOT NULL,
    path            TEXT NOT NULL,
    class           TEXT NOT NULL,
    kind            TEXT NOT NULL,
    created_ids     TEXT NOT NULL,
    body            TEXT,
    upstream_status INTEGER,
    request_id      TEXT,
    detail          TEXT,
    refs            TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    logged_at       TEXT NOT NULL
);

-- The entity keys the ops retention pruned touched (each once): the
-- unknown-outcome resolver still tells an entity another op made from what
-- a write in doubt made.
CREATE TABLE pruned_keys (
    key  TEXT PRIMARY KEY
) WITHOUT ROWID;
