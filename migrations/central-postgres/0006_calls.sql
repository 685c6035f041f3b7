-- The last batch call of each writer (the session a central process keeps
-- for its captures), by the nonce it gave it, with what the call answered:
-- a call whose answer was lost (the connection broken as it ran) is read
-- back from here, all or nothing, as the call committed it or not. A
-- writer's row not written for an hour is forgotten (its process stopped).
CREATE TABLE calls (
    writer   TEXT PRIMARY KEY,
    nonce    BIGINT NOT NULL,
    answers  JSON NOT NULL,
    at       TEXT NOT NULL
);
