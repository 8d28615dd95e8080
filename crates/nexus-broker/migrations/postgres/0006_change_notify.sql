-- Tell every broker replica when something a token response shows changes,
-- whoever changed it (another replica, an operator's SQL, a migration):
-- replicas LISTEN on nexus_changes and drop their cached responses.
-- NOTIFY is transactional: it is delivered on commit, never for a rollback.
CREATE FUNCTION nexus_connection_changed() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('nexus_changes', 'c:' || OLD.id);
        RETURN OLD;
    END IF;
    IF NEW.status IS DISTINCT FROM OLD.status
       OR NEW.version IS DISTINCT FROM OLD.version
       OR NEW.granted_scopes IS DISTINCT FROM OLD.granted_scopes
       OR NEW.failing_scopes IS DISTINCT FROM OLD.failing_scopes
       OR NEW.token_type IS DISTINCT FROM OLD.token_type
       OR NEW.expires_at IS DISTINCT FROM OLD.expires_at
       OR NEW.last_success_at IS DISTINCT FROM OLD.last_success_at
       OR NEW.provider_id IS DISTINCT FROM OLD.provider_id THEN
        PERFORM pg_notify('nexus_changes', 'c:' || NEW.id);
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER connections_changed
    AFTER UPDATE OR DELETE ON connections
    FOR EACH ROW EXECUTE FUNCTION nexus_connection_changed();

CREATE FUNCTION nexus_provider_changed() RETURNS trigger AS $$
BEGIN
    IF NEW.version IS DISTINCT FROM OLD.version
       OR NEW.deleted_at IS DISTINCT FROM OLD.deleted_at
       OR NEW.profile IS DISTINCT FROM OLD.profile THEN
        PERFORM pg_notify('nexus_changes', 'p:' || NEW.id);
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER providers_changed
    AFTER UPDATE ON providers
    FOR EACH ROW EXECUTE FUNCTION nexus_provider_changed();
