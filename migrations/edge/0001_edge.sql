-- An edge's own state: how far it has applied, what central IDs are called
-- here, and the outcome of each op (to acknowledge a repeat without replaying).

CREATE TABLE cursor (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL
);
INSERT INTO cursor (id, seq) VALUES (1, 0);

CREATE TABLE id_map (
    central_id  TEXT PRIMARY KEY,
    edge_id     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE outcomes (
    seq         INTEGER PRIMARY KEY,
    op_id       TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    status      INTEGER,
    detail      TEXT,
    edge_ids    TEXT NOT NULL DEFAULT '[]',
    applied_at  TEXT NOT NULL
);
