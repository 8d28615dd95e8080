//! Agent keys: `POST|GET /agent-keys`, `DELETE /agent-keys/{id}`, and
//! `POST /agent-keys/verify` (the gateway's check).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::registry::agent_keys::{AgentKeyError, NewAgentKey};

impl From<AgentKeyError> for ApiError {
    fn from(e: AgentKeyError) -> Self {
        let msg = e.to_string();
        match e {
            AgentKeyError::Invalid(m) => ApiError::bad_request("invalid_request", m),
            AgentKeyError::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "agent_key_not_found", msg)
            }
            AgentKeyError::Store(s) => s.into(),
        }
    }
}

/// `POST /agent-keys {name, workspaces}` → 201 with the key, shown this once.
pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewAgentKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (view, key) = st.agent_keys().create(req, &caller.admin()).await?;
    let mut body = json!(view);
    body["key"] = json!(key.expose());
    Ok((StatusCode::CREATED, Json(body)))
}

/// `GET /agent-keys`.
pub async fn list(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"agent_keys": st.agent_keys().list().await?})))
}

/// `DELETE /agent-keys/{id}`.
pub async fn revoke(
    State(st): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    st.agent_keys().revoke(&id, &caller.admin()).await?;
    Ok(Json(json!({"id": id, "revoked": true})))
}

/// `POST /agent-keys/verify` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    key: String,
}

/// `POST /agent-keys/verify {key}` → `{id, name, workspaces, ...}`, or 401.
pub async fn verify(
    State(st): State<AppState>,
    ApiJson(v): ApiJson<Verify>,
) -> Result<Json<Value>, ApiError> {
    match st.agent_keys().verify(&v.key).await? {
        Some(k) => Ok(Json(json!(k))),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_agent_key",
            "unknown or revoked agent key",
        )),
    }
}
