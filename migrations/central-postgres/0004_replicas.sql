-- Several central processes (replicas) on one op log.
--
-- Each replica registers here as it starts and holds, for as long as it
-- runs, a session advisory lock named by its number (class 0x53474352,
-- `sg_replica_lock`) on a connection of its own: a replica whose lock can be
-- taken by another is gone (killed, or cut off), and the intents it left
-- open are settled by the leader. Numbers are never reused.
CREATE TABLE replicas (
    no         SERIAL PRIMARY KEY,
    name       TEXT NOT NULL,
    admin_url  TEXT,
    started    TEXT NOT NULL
);

-- The leader's published seq is kept in `meta`, as on SQLite.
DROP TABLE oplog_meta;

-- The replica that opened an intent (NULL: opened by a version that ran one
-- process only).
ALTER TABLE intents ADD COLUMN owner INTEGER;
CREATE INDEX intents_by_owner ON intents (owner);

-- The leader's replica, so that others can send it what only it does.
ALTER TABLE leader ADD COLUMN replica INTEGER;

-- Fencing: a connection of the leader's duties says the epoch it was
-- elected at (`SET syncgate.epoch`); a statement from it on the tables only
-- the leader changes is refused once another election has moved the epoch
-- on. The leader's row is read FOR SHARE, so an election waits for such a
-- transaction to end and a write at an old epoch never commits after a new
-- one is current. Connections that say no epoch (capture, the audit API,
-- edges registering) are not fenced.
CREATE FUNCTION sg_fence() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mine TEXT := current_setting('syncgate.epoch', true);
    current_epoch BIGINT;
BEGIN
    IF mine IS NULL OR mine = '' THEN
        RETURN NULL;
    END IF;
    SELECT epoch INTO current_epoch FROM leader WHERE id = 1 FOR SHARE;
    IF current_epoch IS DISTINCT FROM mine::BIGINT THEN
        RAISE EXCEPTION 'deposed: this process led at epoch %, another leads at epoch %',
            mine, current_epoch
            USING ERRCODE = 'SG001';
    END IF;
    RETURN NULL;
END
$$;

DO $$
DECLARE
    t TEXT;
BEGIN
    FOREACH t IN ARRAY ARRAY['deliveries', 'meta', 'edges', 'resyncs', 'drift_runs', 'drift',
                             'needs_password', 'resync_users'] LOOP
        EXECUTE format('CREATE TRIGGER fenced BEFORE INSERT OR UPDATE OR DELETE ON %I '
                       'FOR EACH STATEMENT EXECUTE FUNCTION sg_fence()', t);
    END LOOP;
END
$$;
-- Ops are inserted by every replica; the leader alone changes them (the
-- resolution of an unknown outcome).
CREATE TRIGGER fenced BEFORE UPDATE OR DELETE ON ops
    FOR EACH STATEMENT EXECUTE FUNCTION sg_fence();
CREATE TRIGGER fenced BEFORE UPDATE OR DELETE ON intents
    FOR EACH STATEMENT EXECUTE FUNCTION sg_fence();

-- Writes that touch one entity are serialised across replicas from intent
-- to commit: an intent is opened with the keys its write touches, under a
-- transaction lock that orders every replica's openings, and is refused
-- while another replica's open intent, or an op whose outcome is unknown
-- and not yet resolved, shares a key one of the two changes. The keys go
-- with the intent.
CREATE TABLE intent_keys (
    key        TEXT COLLATE "C" NOT NULL,
    op_id      TEXT NOT NULL REFERENCES intents (op_id) ON DELETE CASCADE,
    exclusive  BOOLEAN NOT NULL,
    PRIMARY KEY (key, op_id)
);
CREATE INDEX intent_keys_by_op ON intent_keys (op_id);
