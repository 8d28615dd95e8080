-- Provider names match case-insensitively, as the reference's do ("Google"
-- finds "google"); the name keeps the case it was registered with, for display.
-- Uniqueness moves to the lower-cased name. (SQLite's lower() folds ASCII
-- letters only; PostgreSQL's folds all of Unicode.) A database holding two
-- live names that differ only in case stops here: rename or delete one.
DROP INDEX providers_live_name;
CREATE UNIQUE INDEX providers_live_name_ci ON providers (lower(name)) WHERE deleted_at IS NULL;
