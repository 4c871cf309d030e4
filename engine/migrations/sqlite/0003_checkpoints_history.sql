-- Commit points inside a run. After each delivered batch the run writes the batch's results
-- (acknowledged records with the state the destination now has, failed records with the state
-- it still has) to a small Parquet file and records it here; a run that never reaches its own
-- commit (killed, or stopped by a shutdown) is folded into its mapping's state by the next run
-- from these rows, so acknowledged records are not sent again.
CREATE TABLE run_checkpoints (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    path TEXT NOT NULL,             -- in the snapshot store
    acknowledged INTEGER NOT NULL,
    failed INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- Run history: what started the run, records sent and retried, and what to do about a failure.
ALTER TABLE runs ADD COLUMN run_trigger TEXT NOT NULL DEFAULT 'manual';
ALTER TABLE runs ADD COLUMN sent INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN retried INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN recommended_action TEXT;
-- 0 while a run's results may still have to be taken into its mapping's state (it is going, or
-- it stopped before its commit); 1 once committed or recovered.
ALTER TABLE runs ADD COLUMN settled INTEGER NOT NULL DEFAULT 1;
CREATE INDEX runs_unsettled ON runs (mapping, settled);

ALTER TABLE run_failures ADD COLUMN last_failed_at TEXT;
ALTER TABLE run_failures ADD COLUMN payload TEXT;   -- the record as it was sent, truncated

-- A mapping whose first run was cut short has no baseline snapshot: its destination holds only
-- what its exceptions file lists.
CREATE TABLE mapping_state_new (
    mapping TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    baseline_snapshot_id TEXT,
    exceptions_path TEXT,
    exceptions_rows INTEGER NOT NULL DEFAULT 0,
    last_run_id TEXT NOT NULL,
    last_success_at TEXT NOT NULL
);
INSERT INTO mapping_state_new SELECT mapping, model, baseline_snapshot_id, exceptions_path,
    exceptions_rows, last_run_id, last_success_at FROM mapping_state;
DROP TABLE mapping_state;
ALTER TABLE mapping_state_new RENAME TO mapping_state;
