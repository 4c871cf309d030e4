-- Events outside sluice that `after_dbt:` schedules wait for, each with the latest time it
-- happened: a dbt Cloud job that succeeded (`dbt_job:<id or name>`, `dbt_job:*`), a dbt
-- invocation that built a model and passed its tests (`dbt_node:<unique id>`). Recorded by
-- the process that received or noticed it, read by every scheduler sharing this store.
CREATE TABLE external_events (
    name TEXT PRIMARY KEY,
    happened_at TEXT NOT NULL,      -- RFC 3339, UTC
    detail TEXT NOT NULL            -- what told of it (the webhook's event id, the invocation id)
);
