-- The database of the process holding an edge's ID (a random ID the edge keeps
-- in its own database): a process with another database (a second process
-- under one ID, a lost or replaced volume) is resynced before it applies ops,
-- whatever its cursor says.
ALTER TABLE edges ADD COLUMN database TEXT;
