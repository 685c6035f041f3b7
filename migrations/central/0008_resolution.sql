-- Writes whose outcome was unknown are resolved by asking central's Keystone
-- (see `keystone::resolve`): `resolution` is 'pending' until then (the op and
-- every op after it wait to be published), then 'applied' (the op becomes
-- `committed`, with what was found), 'not_applied' (edges skip it, in sync) or
-- 'unresolvable' (out of sync at every edge until a resync of that edge).
-- Ops of other states have none.
ALTER TABLE ops ADD COLUMN resolution TEXT
    CHECK (resolution IN ('pending', 'applied', 'not_applied', 'unresolvable'));

-- Unknown outcomes of earlier versions were published and skipped unresolved.
UPDATE ops SET resolution = 'unresolvable' WHERE state = 'unknown_outcome';

CREATE INDEX ops_by_resolution ON ops (resolution, seq) WHERE resolution IS NOT NULL;
