-- See migrations/sqlite/0004_catalog.sql.
CREATE TABLE definitions (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE mapping_switches (
    mapping TEXT PRIMARY KEY,
    enabled BIGINT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE catalog_version (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);
INSERT INTO catalog_version (id, version) VALUES (1, 0);
CREATE TABLE api_tokens (
    name TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
ALTER TABLE runs ADD COLUMN cancel_requested BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN dry_run BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN row_filter TEXT;
CREATE INDEX runs_by_time ON runs (started_at, id);
