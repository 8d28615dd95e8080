-- The identity of the client certificate a caller presented (mutual TLS:
-- a SPIFFE ID or DNS name), recorded beside the API key's actor.
ALTER TABLE audit_events ADD COLUMN client_identity TEXT;
