-- The latest scheduled start of each mapping, claimed by one scheduler among the processes
-- sharing this store: each fire time starts one run, however many `sluice serve` run.
CREATE TABLE schedule_fires (
    mapping TEXT PRIMARY KEY,
    fired_at TEXT NOT NULL,         -- RFC 3339, UTC
    fired_by TEXT NOT NULL          -- host:pid
);
