-- A refresh's intent: set just before the refresh token goes to the
-- provider, cleared when the outcome is stored. A replica that takes over a
-- lease and finds it set knows the earlier attempt was cut off (process
-- killed, or the provider's answer never arrived) and that the provider may
-- have rotated the refresh token: it waits for a late commit first, and an
-- invalid_grant that follows is reported as an interrupted refresh, not as
-- the person revoking access.
ALTER TABLE connections ADD COLUMN refresh_started_at BIGINT;
