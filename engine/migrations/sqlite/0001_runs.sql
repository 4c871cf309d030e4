-- Runs, their failed records, and each mapping's committed baseline.
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    mapping TEXT NOT NULL,
    model TEXT NOT NULL,
    destination TEXT NOT NULL,
    status TEXT NOT NULL,           -- running, succeeded, partial, failed, interrupted
    full_resync INTEGER NOT NULL DEFAULT 0,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at TEXT NOT NULL,       -- RFC 3339, UTC
    finished_at TEXT,
    snapshot_id TEXT,
    baseline_snapshot_id TEXT,
    extracted INTEGER NOT NULL DEFAULT 0,
    added INTEGER NOT NULL DEFAULT 0,
    updated INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    extract_ms INTEGER,
    diff_ms INTEGER,
    deliver_ms INTEGER,
    schema_change TEXT,
    error TEXT
);
CREATE INDEX runs_by_mapping ON runs (mapping, started_at);
CREATE INDEX runs_by_status ON runs (status);

CREATE TABLE run_failures (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    record_key TEXT NOT NULL,       -- the primary key as a JSON object
    op TEXT NOT NULL,               -- added, updated, deleted
    error TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    first_failed_at TEXT NOT NULL
);
CREATE INDEX run_failures_by_run ON run_failures (run_id);

CREATE TABLE mapping_state (
    mapping TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    baseline_snapshot_id TEXT NOT NULL,
    exceptions_path TEXT,           -- Parquet file of records not yet acknowledged, if any
    exceptions_rows INTEGER NOT NULL DEFAULT 0,
    last_run_id TEXT NOT NULL,
    last_success_at TEXT NOT NULL   -- start of the run that committed this state
);
