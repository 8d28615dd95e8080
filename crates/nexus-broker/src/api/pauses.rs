//! The kill switch: `POST|DELETE|GET /admin/pause` (operator-wide) and
//! `PUT|DELETE|GET /workspaces/{id}/pause`.

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::store::PauseScope;
use crate::tokens::pause::view;

/// Body of a pause request.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    /// Why (shown to callers in every 423).
    pub reason: Option<String>,
}

/// A pause's reason: trimmed, at most 500 characters, required when asked.
pub(super) fn reason(r: Option<String>, required: bool) -> Result<Option<String>, ApiError> {
    match r.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()) {
        None if required => Err(ApiError::bad_request(
            "missing_fields",
            "reason is required: callers see it in every 423",
        )),
        Some(s) if s.chars().count() > 500 => Err(ApiError::bad_request(
            "invalid_request",
            "reason must be at most 500 characters",
        )),
        other => Ok(other),
    }
}

pub(super) fn workspace(id: String) -> Result<PauseScope, ApiError> {
    if id.is_empty() || id.len() > 256 {
        return Err(ApiError::bad_request(
            "invalid_request",
            "workspace id must be 1 to 256 characters",
        ));
    }
    Ok(PauseScope::Workspace(id))
}

/// `POST /admin/pause {reason?}`: pause issuance for every workspace.
pub async fn operator_pause(
    State(st): State<AppState>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    // The body is optional here (`{"reason": ...}`), so it is parsed by hand.
    let req: PauseRequest = if body.iter().all(u8::is_ascii_whitespace) {
        PauseRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_request",
                format!("body must be {{\"reason\": text}}: {e}"),
            )
        })?
    };
    let reason = reason(req.reason, false)?
        .unwrap_or_else(|| "token issuance is paused by the operator".into());
    let p = st
        .pauses()
        .pause(PauseScope::Operator, reason, &caller.admin())
        .await?;
    Ok(Json(json!({"paused": true, "pause": view(&p)})))
}

/// `DELETE /admin/pause`: resume (workspace pauses stay).
pub async fn operator_resume(
    State(st): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let was = st
        .pauses()
        .resume(PauseScope::Operator, &caller.admin())
        .await?;
    Ok(Json(json!({"paused": false, "was_paused": was})))
}

/// `GET /admin/pause`: the operator pause, if any.
pub async fn operator_get(State(st): State<AppState>) -> Json<Value> {
    let p = st.pauses().operator();
    Json(json!({"paused": p.is_some(), "pause": p.as_ref().map(view)}))
}

/// `PUT /workspaces/{id}/pause {reason}`.
pub async fn workspace_pause(
    State(st): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    ApiJson(body): ApiJson<PauseRequest>,
) -> Result<Json<Value>, ApiError> {
    let scope = workspace(id)?;
    let reason = reason(body.reason, true)?.unwrap_or_default();
    let p = st.pauses().pause(scope, reason, &caller.admin()).await?;
    Ok(Json(json!({"paused": true, "pause": view(&p)})))
}

/// `DELETE /workspaces/{id}/pause`.
pub async fn workspace_resume(
    State(st): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let was = st.pauses().resume(workspace(id)?, &caller.admin()).await?;
    Ok(Json(json!({"paused": false, "was_paused": was})))
}

/// `GET /workspaces/{id}/pause`: what applies to the workspace (the
/// operator's pause wins when both are set).
pub async fn workspace_get(State(st): State<AppState>, Path(id): Path<String>) -> Json<Value> {
    let p = st.pauses().check(Some(&id));
    Json(json!({"workspace_id": id, "paused": p.is_some(), "pause": p.as_ref().map(view)}))
}
