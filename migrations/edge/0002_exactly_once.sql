-- Exactly once across crashes: the op being applied is marked before its write
-- is sent, and the mark is cleared in the transaction that records its outcome.
-- A mark found at start-up means the write may have been applied already.
CREATE TABLE inflight (
    seq         INTEGER PRIMARY KEY,
    op_id       TEXT NOT NULL,
    started_at  TEXT NOT NULL
);

-- Central asks for the outcomes that are not plainly `applied` (lost acks).
CREATE INDEX outcomes_exceptions ON outcomes (seq) WHERE outcome != 'applied';
