-- Optimistic concurrency for provider updates: a PUT/PATCH computed from a
-- stale read must not overwrite a change made in between.
ALTER TABLE providers ADD COLUMN version BIGINT NOT NULL DEFAULT 0;
