//! Connections: read API, health surface, and the token API (SPEC §2-§4).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::store::parse_json_list as parse_list;
use crate::store::{rfc3339, ConnectionRow};
use crate::tokens::scope::{ReportError, ScopeReport};
use crate::tokens::{TokenBody, TokenError};

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
            TokenError::Paused(p) => {
                let scope = crate::tokens::pause::scope_name(&p.scope);
                ApiError::new(StatusCode::LOCKED, "issuance_paused", msg)
                    .with("reason", p.reason)
                    .with("paused_scope", scope)
                    .with("paused_at", rfc3339(p.paused_at))
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
    c.status.wants_reconsent()
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

/// `GET /connections/{id}`: health, with what the scope reports said.
pub async fn get(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let c = st
        .store()
        .get_connection(&id)
        .await?
        .ok_or(TokenError::NotFound)?;
    let mut v = view(&c);
    v["scope_failures"] = json!(st.store().scope_failures(&id).await?);
    // A connection whose provider was deleted keeps its state but can never
    // serve again; check-connection must say so.
    let usable = match st.registry().get(&c.provider_id).await {
        Ok(_) => true,
        Err(crate::registry::RegistryError::NotFound) => false,
        Err(e) => return Err(e.into()),
    };
    v["usable"] = json!(usable);
    Ok(Json(v))
}

/// `DELETE /connections/{id}`: revoke at the provider (RFC 7009), erase here.
pub async fn revoke(
    State(st): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let r = st.tokens().refresher().revoke(&id, &caller.admin()).await?;
    Ok(Json(json!(r)))
}

impl From<ReportError> for ApiError {
    fn from(e: ReportError) -> Self {
        match e {
            ReportError::Invalid(code, m) => ApiError::bad_request(code, m),
            ReportError::RateLimited(wait) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many scope reports for this connection; retry later",
            )
            .retry_after(wait.as_secs().max(1)),
            ReportError::Token(t) => t.into(),
        }
    }
}

/// `POST /connections/{id}/scope-failures` → 202 with what the report did.
pub async fn scope_failures(
    State(st): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    ApiJson(report): ApiJson<ScopeReport>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let actor = crate::events::audit::Actor {
        name: "agent".into(),
        ip: caller.ip,
        user_agent: caller.user_agent,
        client_identity: caller.client_identity,
    };
    let outcome = st.scopes().report(&id, report, &actor).await?;
    Ok((StatusCode::ACCEPTED, Json(json!(outcome))))
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
    let paused = st
        .pauses()
        .check(Some(&ws))
        .map(|p| crate::tokens::pause::view(&p));
    Ok(Json(
        json!({"workspace_id": ws, "connections": by_id, "any_needs_attention": rows.iter().any(needs_attention), "issuance_paused": paused}),
    ))
}

/// `GET /connections/{id}/token`: strategy + usage secrets.
pub async fn token(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<TokenBody, ApiError> {
    Ok(st.tokens().token(&id, false).await?)
}

/// `POST /connections/{id}/refresh`: refresh now (single-flight), then the token response.
pub async fn refresh(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<TokenBody, ApiError> {
    Ok(st.tokens().token(&id, true).await?)
}

impl axum::response::IntoResponse for TokenBody {
    fn into_response(self) -> axum::response::Response {
        use axum::http::HeaderValue;
        const JSON: HeaderValue = HeaderValue::from_static("application/json");
        const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
        let mut resp = (
            [
                (axum::http::header::CONTENT_TYPE, JSON),
                // Usage secrets: never stored by a cache on the way (a
                // gateway keeps it only as `x-nexus-cacheable-ms` allows).
                (axum::http::header::CACHE_CONTROL, NO_STORE),
            ],
            self.body.into_inner(),
        )
            .into_response();
        let h = resp.headers_mut();
        if let Some(ms) = self.keep_ms {
            h.insert(nexus_core::wire::CACHEABLE_HEADER, HeaderValue::from(ms));
            if let Some(e) = self.expires_at {
                h.insert(nexus_core::wire::EXPIRES_AT_HEADER, HeaderValue::from(e));
            }
        }
        resp
    }
}
