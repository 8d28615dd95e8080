//! Connections: read API, health surface, and the token API (SPEC §2-§4).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::AppState;
use crate::handshake::parse_list;
use crate::store::{rfc3339, ConnectionRow};
use crate::token::TokenError;

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        let msg = e.to_string();
        match e {
            TokenError::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "connection_not_found", msg)
            }
            TokenError::Pending => ApiError::new(StatusCode::CONFLICT, "connection_pending", msg),
            TokenError::AttentionRequired(_) => {
                ApiError::new(StatusCode::CONFLICT, "attention_required", msg)
            }
            TokenError::Revoked => ApiError::new(StatusCode::GONE, "connection_revoked", msg),
            TokenError::Failed => ApiError::new(StatusCode::CONFLICT, "connection_failed", msg),
            TokenError::ProviderUnavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "provider_unavailable", msg)
            }
            TokenError::Unusable(_) => {
                ApiError::new(StatusCode::CONFLICT, "connection_unusable", msg)
            }
            TokenError::Store(s) => s.into(),
        }
    }
}

/// A connection's health, without a single secret.
fn view(c: &ConnectionRow) -> Value {
    let identity: Value = c
        .identity
        .as_deref()
        .and_then(|i| serde_json::from_str(i).ok())
        .unwrap_or(Value::Null);
    json!({
        "id": c.id,
        "workspace_id": c.workspace_id,
        "provider_id": c.provider_id,
        "status": c.status,
        "requested_scopes": parse_list(&c.requested_scopes),
        "granted_scopes": parse_list(&c.granted_scopes),
        "failing_scopes": parse_list(&c.failing_scopes),
        "identity": identity,
        "expires_at": c.expires_at.map(rfc3339),
        "last_success_at": c.last_success_at.map(rfc3339),
        "last_failure_at": c.last_failure_at.map(rfc3339),
        "error_code": c.error_code,
        "error_description": c.error_description,
        "consecutive_failures": c.consecutive_failures,
        "next_refresh_at": c.next_refresh_at.map(rfc3339),
        "created_at": rfc3339(c.created_at),
        "updated_at": rfc3339(c.updated_at),
    })
}

fn needs_attention(c: &ConnectionRow) -> bool {
    matches!(c.status.as_str(), "attention_required" | "degraded")
}

/// `?workspace_id=` (or `user_id=`).
#[derive(Deserialize)]
pub struct WorkspaceQuery {
    workspace_id: Option<String>,
    user_id: Option<String>,
}

/// `GET /connections?workspace_id=` → `{workspace_id, connections: [...]}`.
pub async fn list(
    State(st): State<AppState>,
    Query(q): Query<WorkspaceQuery>,
) -> Result<Json<Value>, ApiError> {
    let ws = q
        .workspace_id
        .or(q.user_id)
        .filter(|w| !w.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing_fields", "workspace_id is required"))?;
    let rows = st.store().list_connections(&ws).await?;
    Ok(Json(
        json!({"workspace_id": ws, "connections": rows.iter().map(view).collect::<Vec<_>>()}),
    ))
}

/// `GET /connections/{id}`.
pub async fn get(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = st
        .store()
        .get_connection(&id)
        .await?
        .ok_or(TokenError::NotFound)?;
    Ok(Json(view(&c)))
}

/// `GET /workspaces/{id}/connections/status` → `{workspace_id, connections: {id: health}, any_needs_attention}`.
pub async fn status(
    State(st): State<AppState>,
    Path(ws): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let rows = st.store().list_connections(&ws).await?;
    let mut by_id = Map::new();
    for c in &rows {
        let mut v = view(c);
        v["needs_attention"] = json!(needs_attention(c));
        by_id.insert(c.id.clone(), v);
    }
    Ok(Json(
        json!({"workspace_id": ws, "connections": by_id, "any_needs_attention": rows.iter().any(needs_attention)}),
    ))
}

/// `GET /connections/{id}/token`: strategy + usage secrets.
pub async fn token(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(st.tokens().token(&id, false).await?))
}

/// `POST /connections/{id}/refresh`: refresh now (single-flight), then the token response.
pub async fn refresh(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(st.tokens().token(&id, true).await?))
}
