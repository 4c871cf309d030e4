-- The web console's signed-in sessions. The browser holds a random session id; the store keeps
-- its SHA-256 and the SHA-256 of the API token it was opened with, so signing out (or revoking
-- the token) ends the session everywhere, and a cookie replayed afterwards is refused.
CREATE TABLE console_sessions (
    session_hash TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    created_at TEXT NOT NULL,       -- RFC 3339, UTC
    expires_at TEXT NOT NULL        -- RFC 3339, UTC
);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
