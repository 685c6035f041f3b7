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

CREATE TRIGGER fenced BEFORE INSERT OR UPDATE OR DELETE ON deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION sg_fence();
CREATE TRIGGER fenced BEFORE INSERT OR UPDATE OR DELETE ON meta
    FOR EACH STATEMENT EXECUTE FUNCTION sg_fence();
CREATE TRIGGER fenced BEFORE INSERT OR UPDATE OR DELETE ON edges
    FOR EACH STATEMENT EXECUTE FUNCTION sg_fence();
CREATE TRIGGER fenced BEFORE INSERT OR UPDATE OR DELETE ON resyncs
    FOR EACH STATEMENT EXECUTE FUNCTION sg_fence();
CREATE TRIGGER fenced BEFORE INSERT OR UPDATE OR DELETE ON drift_runs
    FOR EACH STATEMENT EXECUTE FUNCTION sg_fence();
CREATE TRIGGER fenced BEFORE INSERT OR UPDATE OR DELETE ON drift
    FOR EACH STATEMENT EXECUTE FUNCTION sg_fence();
CREATE TRIGGER fenced BEFORE INSERT OR UPDATE OR DELETE ON needs_password
    FOR EACH STATEMENT EXECUTE FUNCTION sg_fence();
CREATE TRIGGER fenced BEFORE INSERT OR UPDATE OR DELETE ON resync_users
    FOR EACH STATEMENT EXECUTE FUNCTION sg_fence();
-- Ops are inserted by every replica; the leader alone changes them (the
-- resolution of an unknown outcome).
CREATE TRIGGER fenced BEFORE UPDATE OR DELETE ON ops
    FOR EACH STATEMENT EXECUTE FUNCTION sg_fence();
CREATE TRIGGER fenced BEFORE UPDATE OR DELETE ON intents
    FOR EACH STATEMENT EXECUTE FUNCTION sg_fence();

-- Writes that touch one entity are serialised across replicas from intent
-- to commit: each replica, once its own writes are ordered, takes session
-- advisory locks (class 0x53474b59) on the keys a write touches, all or
-- none, exclusively where it changes one. `sg_try_keys` takes every one or,
-- when one is held elsewhere, gives back those it took and answers false.
CREATE FUNCTION sg_try_keys(keys INTEGER[], exclusive BOOLEAN[]) RETURNS BOOLEAN
LANGUAGE plpgsql AS $$
DECLARE
    i INTEGER;
    j INTEGER;
    ok BOOLEAN;
BEGIN
    FOR i IN 1 .. COALESCE(array_length(keys, 1), 0) LOOP
        IF exclusive[i] THEN
            ok := pg_try_advisory_lock(1397181273, keys[i]);
        ELSE
            ok := pg_try_advisory_lock_shared(1397181273, keys[i]);
        END IF;
        IF NOT ok THEN
            FOR j IN 1 .. i - 1 LOOP
                IF exclusive[j] THEN
                    PERFORM pg_advisory_unlock(1397181273, keys[j]);
                ELSE
                    PERFORM pg_advisory_unlock_shared(1397181273, keys[j]);
                END IF;
            END LOOP;
            RETURN FALSE;
        END IF;
    END LOOP;
    RETURN TRUE;
END
$$;

CREATE FUNCTION sg_unlock_keys(keys INTEGER[], exclusive BOOLEAN[]) RETURNS VOID
LANGUAGE plpgsql AS $$
DECLARE
    i INTEGER;
BEGIN
    FOR i IN 1 .. COALESCE(array_length(keys, 1), 0) LOOP
        IF exclusive[i] THEN
            PERFORM pg_advisory_unlock(1397181273, keys[i]);
        ELSE
            PERFORM pg_advisory_unlock_shared(1397181273, keys[i]);
        END IF;
    END LOOP;
END
$$;
