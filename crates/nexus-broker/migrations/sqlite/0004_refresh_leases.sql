-- Refresh leases: one refresher per connection across broker replicas. A
-- crashed holder's lease simply expires (lease_until).
ALTER TABLE connections ADD COLUMN lease_owner TEXT;
ALTER TABLE connections ADD COLUMN lease_until BIGINT;
CREATE INDEX connections_due ON connections (next_refresh_at);
