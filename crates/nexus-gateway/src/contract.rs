//! The v1 answers' JSON schemas, for the gateway's OpenAPI document.
//!
//! v1 is the reference implementation's frozen agent contract ("additive
//! changes only"): every field it names keeps its name and type (strings are
//! never null; absent values are left out), and Nexus adds fields beside them
//! (`state`, `strategy`, `credentials`, ...). New clients read the added
//! fields; clients of the reference ignore them. A breaking change would need
//! `/v2`; none has been needed yet.

use serde_json::{json, Value};

/// `GET /v1/providers`: `{auth_type: {name: {...}}}`.
pub fn providers() -> Value {
    json!({
        "type": "object",
        "description": "providers grouped by auth_type, then by name",
        "additionalProperties": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["api_base_url", "user_info_endpoint", "scopes"],
                "properties": {
                    "id": {"type": "string"},
                    "api_base_url": {"type": "string", "description": "empty when not set"},
                    "user_info_endpoint": {"type": "string", "description": "empty when not set"},
                    "scopes": {"type": "array", "items": {"type": "string"}},
                    "description": {"type": "string"},
                    "category": {"type": "string"}
                }
            }
        }
    })
}

/// `POST /v1/request-connection`.
pub fn consent() -> Value {
    json!({
        "type": "object",
        "required": ["authUrl", "connection_id"],
        "properties": {
            "authUrl": {"type": "string", "format": "uri", "description": "where to send the person"},
            "connection_id": {"type": "string"},
            "state": {"type": "string"},
            "scopes": {"type": "array", "items": {"type": "string"}},
            "provider_id": {"type": "string"}
        }
    })
}

/// `GET /v1/check-connection/{id}`.
pub fn check() -> Value {
    json!({
        "type": "object",
        "required": ["status", "state", "degraded", "reconsent"],
        "properties": {
            "status": {
                "type": "string",
                "enum": ["active", "pending", "failed"],
                "description": "v1: active serves tokens (perhaps for fewer scopes), pending waits for consent, failed will not serve until someone acts (or the connection is unknown)"
            },
            "state": {
                "type": "string",
                "enum": ["active", "degraded", "pending", "attention_required", "revoked", "failed", "unusable", "not_found"],
                "description": "added: the precise state"
            },
            "degraded": {"type": "boolean", "description": "added: some scopes fail at the provider"},
            "failing_scopes": {"type": "array", "items": {"type": "string"}, "description": "added"},
            "error_code": {"type": "string", "description": "added: why it does not serve, or serves less"},
            "reconsent": {"type": "boolean", "description": "added: a person can fix it by consenting again (request-connection with this connection_id)"}
        }
    })
}

/// `GET /v1/token/{id}` and `POST /v1/refresh/{id}`.
pub fn token() -> Value {
    json!({
        "type": "object",
        "required": ["strategy", "credentials", "provider", "connection_id", "status"],
        "properties": {
            "access_token": {"type": "string", "description": "OAuth 2.0 connections only"},
            "token_type": {"type": "string"},
            "expires_in": {"type": "number", "description": "seconds left; absent without expiry"},
            "expires_at": {"type": "string", "format": "date-time", "description": "absent without expiry"},
            "scope": {"type": "string"},
            "id_token": {"type": "string"},
            "provider": {"type": "string"},
            "strategy": {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"type": "string"}, "config": {"type": "object"}},
                "description": "added: how to apply the credentials"
            },
            "credentials": {"type": "object", "description": "added: the usage secrets the strategy applies"},
            "connection_id": {"type": "string", "description": "added"},
            "status": {"type": "string", "enum": ["active", "degraded"], "description": "added"},
            "degraded": {"type": "boolean", "description": "added"},
            "failing_scopes": {"type": "array", "items": {"type": "string"}, "description": "added"}
        }
    })
}
