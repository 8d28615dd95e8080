-- Providers: non-secret profile fields as JSON, the client secret as a vault envelope.
CREATE TABLE providers (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    auth_type     TEXT NOT NULL,
    profile       TEXT NOT NULL,
    client_secret TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    deleted_at    INTEGER
);
-- Names are unique among live providers only: a soft-deleted name can be reused.
CREATE UNIQUE INDEX providers_live_name ON providers (name) WHERE deleted_at IS NULL;

CREATE TABLE provider_aliases (
    alias       TEXT PRIMARY KEY,
    display     TEXT NOT NULL,
    provider_id TEXT NOT NULL REFERENCES providers (id),
    created_at  INTEGER NOT NULL
);
CREATE INDEX provider_aliases_provider ON provider_aliases (provider_id);

CREATE TABLE audit_events (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    occurred_at   INTEGER NOT NULL,
    event_type    TEXT NOT NULL,
    actor         TEXT,
    provider_id   TEXT,
    connection_id TEXT,
    workspace_id  TEXT,
    ip            TEXT,
    user_agent    TEXT,
    detail        TEXT NOT NULL
);
CREATE INDEX audit_events_time ON audit_events (occurred_at);
CREATE INDEX audit_events_type ON audit_events (event_type, occurred_at);
CREATE INDEX audit_events_connection ON audit_events (connection_id, occurred_at);
