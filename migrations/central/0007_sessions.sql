-- Sessions of the control plane (protocol 2).
--
-- meta 'session': central's session number, drawn anew (higher) at each start.
-- edges.session: the session of the edge process that holds the edge's ID
-- (0: none yet, or an edge of protocol 1); only it may apply ops and ack.
-- edges.protocol: the control protocol that process speaks.
-- edges.needs_resync: why the edge must be resynced before it applies ops
-- again (its cursor went back: a lost or restored database); cleared when a
-- resync of it completes.
-- edges.clock_skew_ms: the edge's clock less central's, as last measured.
ALTER TABLE edges ADD COLUMN session INTEGER NOT NULL DEFAULT 0;
ALTER TABLE edges ADD COLUMN protocol INTEGER;
ALTER TABLE edges ADD COLUMN needs_resync TEXT;
ALTER TABLE edges ADD COLUMN clock_skew_ms INTEGER;
