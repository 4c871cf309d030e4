-- Sources, models, destinations and mappings created through the HTTP API (what sluice.yaml
-- declares is not stored here). `spec` is the definition's JSON as sluice.yaml would write it,
-- with its secrets sealed (see engine/src/secrets.rs).
CREATE TABLE definitions (
    kind TEXT NOT NULL,             -- source, model, destination, mapping
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at TEXT NOT NULL,       -- RFC 3339, UTC
    updated_at TEXT NOT NULL,
    PRIMARY KEY (kind, name)
);
-- A mapping enabled or disabled through the API, over what its definition says.
CREATE TABLE mapping_switches (
    mapping TEXT PRIMARY KEY,
    enabled INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);
-- Bumped by every change to the two tables above, so processes sharing the store notice.
CREATE TABLE catalog_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO catalog_version (id, version) VALUES (1, 0);
-- API bearer tokens made by `sluice token create`; only their SHA-256 is kept.
CREATE TABLE api_tokens (
    name TEXT PRIMARY KEY,
    scope TEXT NOT NULL,            -- read, admin
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
-- A cancellation asked for (through the API, possibly by another process); the run stops at
-- its next commit point.
ALTER TABLE runs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
-- A dry run computed what it would send, sent nothing and committed nothing.
ALTER TABLE runs ADD COLUMN dry_run INTEGER NOT NULL DEFAULT 0;
-- A backfill limited to the rows matching this predicate.
ALTER TABLE runs ADD COLUMN row_filter TEXT;
CREATE INDEX runs_by_time ON runs (started_at, id);
