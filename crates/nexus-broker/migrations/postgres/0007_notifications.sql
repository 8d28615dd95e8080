-- Partial scope revocation: one row per failing scope of a connection, with
-- what the reports said. connections.failing_scopes keeps the names, which is
-- what token responses show.
CREATE TABLE scope_failures (
    connection_id  TEXT NOT NULL REFERENCES connections (id) ON DELETE CASCADE,
    scope          TEXT NOT NULL,
    first_seen_at  BIGINT NOT NULL,
    last_seen_at   BIGINT NOT NULL,
    -- Reports counted (repeats inside the de-duplication window included).
    reports        BIGINT NOT NULL,
    -- When the last report that was not a repeat was recorded (and audited).
    recorded_at    BIGINT NOT NULL,
    last_status    BIGINT NOT NULL,
    last_method    TEXT,
    last_host      TEXT,
    last_path      TEXT,
    provider_error TEXT,
    PRIMARY KEY (connection_id, scope)
);

-- A 401 report makes the broker refresh once before it counts (scope.rs).
ALTER TABLE connections ADD COLUMN unauthorized_refresh_at BIGINT;

-- Webhook endpoints; the signing secret is a vault envelope.
CREATE TABLE webhook_endpoints (
    id          TEXT PRIMARY KEY,
    url         TEXT NOT NULL,
    -- JSON array of event types; ["*"] subscribes to all.
    events      TEXT NOT NULL,
    secret      TEXT NOT NULL,
    description TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    deleted_at  BIGINT
);

-- The outbox: one row per event, written in the transaction of the state
-- change it describes. The id is the webhook-id receivers de-duplicate on.
CREATE TABLE webhook_messages (
    id         TEXT PRIMARY KEY,
    event_type TEXT NOT NULL,
    payload    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- One row per (event, endpoint subscribed when it happened).
CREATE TABLE webhook_deliveries (
    message_id      TEXT NOT NULL REFERENCES webhook_messages (id) ON DELETE CASCADE,
    endpoint_id     TEXT NOT NULL REFERENCES webhook_endpoints (id),
    -- pending | delivered | failed (gave up) | cancelled (endpoint deleted)
    status          TEXT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT,
    last_attempt_at BIGINT,
    last_status     BIGINT,
    last_error      TEXT,
    delivered_at    BIGINT,
    lease_owner     TEXT,
    lease_until     BIGINT,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (message_id, endpoint_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);

-- Every attempt, for operators asking "why did my receiver not get it".
CREATE TABLE webhook_attempts (
    message_id   TEXT NOT NULL,
    endpoint_id  TEXT NOT NULL,
    attempt      BIGINT NOT NULL,
    attempted_at BIGINT NOT NULL,
    http_status  BIGINT,
    error        TEXT,
    duration_ms  BIGINT NOT NULL,
    PRIMARY KEY (message_id, endpoint_id, attempt)
);

-- Issuance pauses (the kill switch): kind 'operator' (workspace_id '') or
-- 'workspace'. Token requests under a pause answer 423.
CREATE TABLE issuance_pauses (
    kind         TEXT NOT NULL,
    workspace_id TEXT NOT NULL,
    reason       TEXT NOT NULL,
    paused_by    TEXT,
    paused_at    BIGINT NOT NULL,
    PRIMARY KEY (kind, workspace_id)
);

-- Every replica keeps the pauses in memory (token requests must not read the
-- database for them): tell them all when the table changes.
CREATE FUNCTION nexus_pauses_changed() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('nexus_changes', 'w:');
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER issuance_pauses_changed
    AFTER INSERT OR UPDATE OR DELETE ON issuance_pauses
    FOR EACH STATEMENT EXECUTE FUNCTION nexus_pauses_changed();
