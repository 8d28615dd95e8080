-- The operator console: one-time sign-in links (minted with the admin key,
-- e.g. printed by `nexus up`) and the sessions they open. Tokens are kept
-- only as hashes.
CREATE TABLE console_links (
    token_hash TEXT PRIMARY KEY,
    operator   TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at    BIGINT
);
CREATE TABLE console_sessions (
    id           TEXT PRIMARY KEY,
    token_hash   TEXT NOT NULL UNIQUE,
    operator     TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    ended_at     BIGINT
);
