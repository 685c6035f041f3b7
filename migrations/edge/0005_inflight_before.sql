-- A create of a kind Keystone lets exist twice (credentials, policies,
-- services, endpoints, endpoint groups) is marked in flight before it is sent,
-- with the look-alikes the site held then (`before`, a JSON list of edge IDs):
-- after a crash or an answer lost, only an entity that is not one of them, and
-- that no other central ID maps to, can be the one this op made.
-- Once the site answers, what the create made (`made`, edge IDs) is noted too,
-- so that an answer recorded but not yet committed is never looked for again.
ALTER TABLE inflight ADD COLUMN before TEXT;
ALTER TABLE inflight ADD COLUMN made TEXT;

-- The ID map read backwards (whether an edge entity is mapped already).
CREATE INDEX id_map_by_edge ON id_map (edge_id);
