-- One leader among the central processes on this database, for the duties
-- only one may do at a time (publishing, ack deadlines, resync and drift
-- runs). It is elected by a session advisory lock held on a connection of
-- its own; each election moves the epoch on, and a duty's writes are
-- fenced by it: a write made at an epoch that is no longer the current one
-- is refused by the database.
CREATE TABLE leader (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    epoch   BIGINT NOT NULL CHECK (epoch >= 0),
    holder  TEXT,
    since   TEXT
);
INSERT INTO leader (id, epoch) VALUES (1, 0);

-- What the leader keeps: the last seq it published.
CREATE TABLE oplog_meta (
    key    TEXT PRIMARY KEY,
    value  BIGINT NOT NULL
);
