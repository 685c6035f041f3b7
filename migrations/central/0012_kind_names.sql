-- One vocabulary for resource kinds: a drift row names its kind as the op log,
-- the audit API and the catalogue do (older releases wrote the state reader's
-- own names: membership, assignment, protocol).
UPDATE drift SET kind = 'group_membership' WHERE kind = 'membership';
-- An inherited grant's key ends so (compared with case, unlike LIKE); a drift
-- row keeps no path to tell by, and the next drift audit writes them again.
UPDATE drift SET kind = 'inherited_grant'
    WHERE kind = 'assignment' AND substr(key, -12) = ' (inherited)';
UPDATE drift SET kind = 'grant' WHERE kind = 'assignment';
UPDATE drift SET kind = 'federation_protocol' WHERE kind = 'protocol';
