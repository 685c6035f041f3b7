-- Exactly-once bookkeeping.
--
-- op_keys: the entity keys each op touched (exclusive = changed, else only
-- referenced), so a re-drive can find a later op it would undo.
--
-- Deliveries scale with exceptions, not with ops x edges: each edge has a
-- watermark `acked_seq` (every op at or below it has a known outcome there), and
-- `deliveries` keeps rows only for outcomes that are not plainly `applied`
-- (failed, adopted, skipped). Pending and timed-out deliveries are the ops above
-- an edge's watermark, younger or older than the ack timeout.

CREATE TABLE op_keys (
    key        TEXT NOT NULL,
    seq        INTEGER NOT NULL REFERENCES ops (seq),
    exclusive  INTEGER NOT NULL,
    PRIMARY KEY (key, seq)
) WITHOUT ROWID;
CREATE INDEX op_keys_by_seq ON op_keys (seq);

CREATE INDEX ops_by_logged ON ops (logged_at);

ALTER TABLE edges ADD COLUMN acked_seq INTEGER NOT NULL DEFAULT 0;

-- The watermark of an existing edge: below its first delivery still waiting for
-- an ack, else everything published.
UPDATE edges SET acked_seq = COALESCE(
    (SELECT MIN(d.seq) - 1 FROM deliveries d
     WHERE d.edge = edges.id AND d.state IN ('pending', 'timed_out')),
    (SELECT value FROM meta WHERE key = 'published_seq'),
    0);

DELETE FROM deliveries WHERE state IN ('pending', 'timed_out', 'applied');
