-- Agent keys: what agents present to the gateway. Only a SHA-256 of the key
-- is stored (keys are 256-bit random, so a fast hash is enough); `prefix`
-- lets people tell keys apart. `workspaces` is a JSON array, ["*"] = all.
CREATE TABLE agent_keys (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,
    prefix       TEXT NOT NULL,
    workspaces   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    last_used_at BIGINT,
    revoked_at   BIGINT
);
