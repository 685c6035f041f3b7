-- The differences in `drift` are those of an edge's last completed audit;
-- `found_ms` says when it finished (`finished_ms` is the latest run's, which
-- may be running or have failed). `fence` and `excluded` are that audit's too.
ALTER TABLE drift_runs ADD COLUMN found_ms INTEGER;
UPDATE drift_runs SET found_ms = finished_ms WHERE state = 'done';
