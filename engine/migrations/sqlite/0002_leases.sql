-- A run's claim on its mapping, so two processes sharing this state never run one mapping at
-- once. A lease lapses at `expires_at` unless its holder renews it (a killed process stops
-- renewing), and is released when the run ends.
CREATE TABLE leases (
    mapping TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    holder TEXT NOT NULL,           -- host:pid
    acquired_at TEXT NOT NULL,      -- RFC 3339, UTC
    expires_at TEXT NOT NULL
);
