//! The REST API (SPEC §4), wire-compatible with the reference gateway.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use nexus_core::wire::routes;

use crate::auth::Authed;
use crate::broker::Reply;
use crate::core::{ConnectionCheck, Gateway};
use crate::error::GatewayError;

type Result<T> = std::result::Result<T, GatewayError>;

/// The broker's answer as it is; never stored by browsers or proxies (token
/// responses hold usage secrets).
fn pass(reply: Reply) -> Response {
    const JSON: HeaderValue = HeaderValue::from_static("application/json");
    const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");
    (
        reply.status,
        [
            (header::CONTENT_TYPE, JSON),
            (header::CACHE_CONTROL, NO_STORE),
        ],
        reply.body,
    )
        .into_response()
}

/// A JSON object body (the reference's error codes: `invalid_json`).
fn object(body: &Bytes) -> Result<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(GatewayError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body must be a JSON object",
        )),
        Err(e) => Err(GatewayError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

/// `POST /v1/request-connection`.
pub async fn request_connection(
    State(g): State<Arc<Gateway>>,
    Authed(agent): Authed,
    body: Bytes,
) -> Result<Json<Value>> {
    let req = object(&body)?;
    Ok(Json(g.request_connection(&agent, req).await?))
}

/// `POST /v1/connect-sessions` → 201 `{id, url, token, expires_at, workspace_id}`.
pub async fn connect_session(
    State(g): State<Arc<Gateway>>,
    Authed(agent): Authed,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    let req = object(&body)?;
    Ok((
        StatusCode::CREATED,
        Json(g.connect_session(&agent, req).await?),
    ))
}

/// `GET /v1/check-connection/{id}` → `{"status", "state", ...}`.
pub async fn check_connection(
    State(g): State<Arc<Gateway>>,
    Authed(agent): Authed,
    Path(id): Path<String>,
) -> Result<Json<ConnectionCheck>> {
    Ok(Json(g.check_connection(&agent, &id).await?))
}

/// `GET /v1/token/{id}`.
pub async fn token(
    State(g): State<Arc<Gateway>>,
    Authed(agent): Authed,
    Path(id): Path<String>,
) -> Result<Response> {
    Ok(pass(g.token(&agent, &id, false).await?))
}

/// `POST /v1/refresh/{id}`.
pub async fn refresh(
    State(g): State<Arc<Gateway>>,
    Authed(agent): Authed,
    Path(id): Path<String>,
) -> Result<Response> {
    Ok(pass(g.token(&agent, &id, true).await?))
}

/// `GET /v1/providers`.
pub async fn providers(State(g): State<Arc<Gateway>>, _: Authed) -> Result<Response> {
    Ok(pass(g.providers().await?))
}

/// `POST /v1/connections/{id}/scope-failures`.
pub async fn scope_failures(
    State(g): State<Arc<Gateway>>,
    Authed(agent): Authed,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response> {
    let report = Value::Object(object(&body)?);
    Ok(pass(g.scope_failure(&agent, &id, &report).await?))
}

/// `GET /v1/workspaces/{id}/connections/status`.
pub async fn workspace_status(
    State(g): State<Arc<Gateway>>,
    Authed(agent): Authed,
    Path(ws): Path<String>,
) -> Result<Response> {
    Ok(pass(g.workspace_status(&agent, &ws).await?))
}

/// `GET /health`.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /ready`: the broker answers.
pub async fn ready(State(g): State<Arc<Gateway>>) -> Response {
    match g.broker.get(g.broker.url(routes::HEALTH, "")).await {
        Ok(r) if r.status.is_success() => Json(json!({"status": "ready"})).into_response(),
        _ => GatewayError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            "the broker is not reachable",
        )
        .into_response(),
    }
}
