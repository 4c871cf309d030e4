-- sluice's metadata store on Postgres: the same tables as the SQLite store (see
-- migrations/sqlite), for several machines sharing one state. Timestamps are RFC 3339 text in
-- UTC, as in SQLite, so both stores order and compare them the same way.
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    mapping TEXT NOT NULL,
    model TEXT NOT NULL,
    destination TEXT NOT NULL,
    status TEXT NOT NULL,
    full_resync BIGINT NOT NULL DEFAULT 0,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    snapshot_id TEXT,
    baseline_snapshot_id TEXT,
    extracted BIGINT NOT NULL DEFAULT 0,
    added BIGINT NOT NULL DEFAULT 0,
    updated BIGINT NOT NULL DEFAULT 0,
    deleted BIGINT NOT NULL DEFAULT 0,
    delivered BIGINT NOT NULL DEFAULT 0,
    failed BIGINT NOT NULL DEFAULT 0,
    skipped BIGINT NOT NULL DEFAULT 0,
    extract_ms BIGINT,
    diff_ms BIGINT,
    deliver_ms BIGINT,
    schema_change TEXT,
    error TEXT,
    run_trigger TEXT NOT NULL DEFAULT 'manual',
    sent BIGINT NOT NULL DEFAULT 0,
    retried BIGINT NOT NULL DEFAULT 0,
    recommended_action TEXT,
    settled BIGINT NOT NULL DEFAULT 1
);
CREATE INDEX runs_by_mapping ON runs (mapping, started_at);
CREATE INDEX runs_by_status ON runs (status);
CREATE INDEX runs_unsettled ON runs (mapping, settled);

CREATE TABLE run_failures (
    seq BIGSERIAL PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    record_key TEXT NOT NULL,
    op TEXT NOT NULL,
    error TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    first_failed_at TEXT NOT NULL,
    last_failed_at TEXT,
    payload TEXT
);
CREATE INDEX run_failures_by_run ON run_failures (run_id, seq);

CREATE TABLE mapping_state (
    mapping TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    baseline_snapshot_id TEXT,
    exceptions_path TEXT,
    exceptions_rows BIGINT NOT NULL DEFAULT 0,
    last_run_id TEXT NOT NULL,
    last_success_at TEXT NOT NULL
);

CREATE TABLE leases (
    mapping TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    holder TEXT NOT NULL,
    acquired_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);

CREATE TABLE run_checkpoints (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    path TEXT NOT NULL,
    acknowledged BIGINT NOT NULL,
    failed BIGINT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
