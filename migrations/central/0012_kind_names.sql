-- One vocabulary for resource kinds: a drift row names its kind as the op log,
-- the audit API and the catalogue do (older releases wrote the state reader's
-- own names: membership, assignment, protocol).
UPDATE drift SET kind = 'group_membership' WHERE kind = 'membership';
UPDATE drift SET kind = 'inherited_grant' WHERE kind = 'assignment' AND key LIKE '% (inherited)';
UPDATE drift SET kind = 'grant' WHERE kind = 'assignment';
UPDATE drift SET kind = 'federation_protocol' WHERE kind = 'protocol';
