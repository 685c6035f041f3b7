-- An entity at the edge stands for one entity of central's. A resync that
-- maps a new central ID to an entity (central deleted the old one and made
-- another under its name) ends the old ID's claim: an op on the old ID then
-- never reaches the entity that now stands for the new one. Earlier versions
-- could leave both IDs mapped; the newest mapping is kept.
DELETE FROM id_map WHERE EXISTS (
    SELECT 1 FROM id_map AS newer
    WHERE newer.edge_id = id_map.edge_id
      AND (newer.updated_at > id_map.updated_at
           OR (newer.updated_at = id_map.updated_at AND newer.rowid > id_map.rowid))
);
DROP INDEX id_map_by_edge;
CREATE UNIQUE INDEX id_map_one_per_edge_entity ON id_map (edge_id);
