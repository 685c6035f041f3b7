-- The ops whose outcome is unknown and not yet resolved, by when they were
-- forwarded: a write's check for one of its keys reads these (few, and
-- recent), never every op in doubt there ever was.
CREATE INDEX ops_in_doubt ON ops (created_at)
    WHERE state = 'unknown_outcome'
      AND resolution IS DISTINCT FROM 'applied'
      AND resolution IS DISTINCT FROM 'not_applied';
