-- An entity at the edge stands for one entity of central's. A resync that
-- maps a new central ID to an entity (central deleted the old one and made
-- another under its name) ends the old ID's claim: an op on the old ID then
-- never reaches the entity that now stands for the new one. Earlier versions
-- could leave both IDs mapped; the newest mapping is kept.
-- Kinds Keystone lets look alike (no unique key: two services of one type and
-- name at central both name the site's one) may map several central IDs to one
-- entity; the list is `Kind::lets_look_alikes` (checked by a test).
DELETE FROM id_map
WHERE kind NOT IN ('service', 'endpoint', 'endpoint_group', 'credential', 'ec2_credential', 'policy')
  AND EXISTS (
    SELECT 1 FROM id_map AS newer
    WHERE newer.edge_id = id_map.edge_id
      AND newer.kind = id_map.kind
      AND (newer.updated_at > id_map.updated_at
           OR (newer.updated_at = id_map.updated_at AND newer.rowid > id_map.rowid))
);
CREATE UNIQUE INDEX id_map_one_per_edge_entity ON id_map (edge_id)
WHERE kind NOT IN ('service', 'endpoint', 'endpoint_group', 'credential', 'ec2_credential', 'policy');
