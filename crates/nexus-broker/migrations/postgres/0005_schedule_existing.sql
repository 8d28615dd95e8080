-- Connections activated before the refresh engine existed have no schedule:
-- refresh them margin-before-expiry (default margin), or at once when they
-- carry no expiry (the keep-alive then sets the next one).
UPDATE connections
   SET next_refresh_at = CASE WHEN expires_at IS NULL THEN 0 ELSE expires_at - 300000 END
 WHERE next_refresh_at IS NULL
   AND refresh_token IS NOT NULL
   AND status IN ('active', 'degraded');
