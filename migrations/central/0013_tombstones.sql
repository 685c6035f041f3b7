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
