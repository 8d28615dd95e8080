-- Connections: one workspace linked to one provider. The id is stable for the
-- connection's whole life; re-consent updates the same row.
CREATE TABLE connections (
    id                   TEXT PRIMARY KEY,
    workspace_id         TEXT NOT NULL,
    provider_id          TEXT NOT NULL REFERENCES providers (id),
    status               TEXT NOT NULL,
    requested_scopes     TEXT NOT NULL,
    granted_scopes       TEXT NOT NULL DEFAULT '[]',
    -- Vault envelopes (see store::ENCRYPTED_COLUMNS).
    access_token         TEXT,
    refresh_token        TEXT,
    id_token             TEXT,
    credentials          TEXT,
    token_type           TEXT,
    expires_at           INTEGER,
    identity             TEXT,
    version              INTEGER NOT NULL DEFAULT 0,
    last_success_at      INTEGER,
    last_failure_at      INTEGER,
    error_code           TEXT,
    error_description    TEXT,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    failing_scopes       TEXT NOT NULL DEFAULT '[]',
    next_refresh_at      INTEGER,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
);
CREATE INDEX connections_workspace ON connections (workspace_id);
CREATE INDEX connections_status ON connections (status, created_at);

-- One row per consent attempt. The id is what the signed state carries;
-- consumed_at makes the callback single-use.
CREATE TABLE handshakes (
    id            TEXT PRIMARY KEY,
    connection_id TEXT NOT NULL REFERENCES connections (id),
    provider_id   TEXT NOT NULL REFERENCES providers (id),
    workspace_id  TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    return_url    TEXT NOT NULL,
    redirect_uri  TEXT NOT NULL,
    code_verifier TEXT,
    nonce         TEXT,
    is_reconnect  INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    consumed_at   INTEGER,
    created_at    INTEGER NOT NULL
);
CREATE INDEX handshakes_expiry ON handshakes (expires_at);

-- Discovery documents and JWKS, so a restart does not refetch them.
CREATE TABLE http_cache (
    url           TEXT PRIMARY KEY,
    body          TEXT NOT NULL,
    etag          TEXT,
    last_modified TEXT,
    fetched_at    INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL
);
