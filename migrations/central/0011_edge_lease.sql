-- The lease of the process holding an edge's ID, as it said in its hello: a
-- central that restarts waits that long (not a default of 30 s) before another
-- process may take the ID.
ALTER TABLE edges ADD COLUMN lease_ms INTEGER;
