-- The ID map's size, kept by triggers, so that it is read without counting
-- the map (once per applied op, for status and metrics).
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    n     INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO counters (name, n) SELECT 'id_map', COUNT(*) FROM id_map;

CREATE TRIGGER id_map_added AFTER INSERT ON id_map
BEGIN
    UPDATE counters SET n = n + 1 WHERE name = 'id_map';
END;

CREATE TRIGGER id_map_removed AFTER DELETE ON id_map
BEGIN
    UPDATE counters SET n = n - 1 WHERE name = 'id_map';
END;
