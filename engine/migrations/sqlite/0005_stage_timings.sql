-- Where a mapping's time went besides the diff and the requests: reading the changed rows,
-- rendering payloads, and the commit points (intents, checkpoints and their transactions).
ALTER TABLE runs ADD COLUMN read_ms INTEGER;
ALTER TABLE runs ADD COLUMN render_ms INTEGER;
ALTER TABLE runs ADD COLUMN checkpoint_ms INTEGER;
