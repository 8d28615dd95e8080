-- Connect sessions: a short-lived link that lets a person manage one
-- workspace's connections in the connect portal. Only a hash of the token
-- is kept; a session ends at expires_at or when revoked.
CREATE TABLE connect_sessions (
    id           TEXT PRIMARY KEY,
    token_hash   TEXT NOT NULL UNIQUE,
    workspace_id TEXT NOT NULL,
    providers    TEXT,
    return_url   TEXT,
    created_by   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    revoked_at   BIGINT
);
CREATE INDEX connect_sessions_workspace ON connect_sessions (workspace_id);
