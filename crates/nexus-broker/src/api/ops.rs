//! `/health`, `/ready`, `/metrics`.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::error::ApiError;
use super::AppState;

/// Liveness: the process answers.
pub async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the database answers within 2 s and the vault's active key works.
pub async fn ready(State(st): State<AppState>) -> Response {
    let db = tokio::time::timeout(Duration::from_secs(2), st.store().ping()).await;
    let db_ok = matches!(db, Ok(Ok(())));
    let keys_ok = st.config().keys.self_test();
    if db_ok && keys_ok {
        return Json(json!({
            "status": "ready",
            "database": "ok",
            "keys": "ok",
            "backend": format!("{:?}", st.store().backend()).to_lowercase(),
            "active_key_id": st.config().keys.active_id(),
        }))
        .into_response();
    }
    let mut problems = Vec::new();
    if !db_ok {
        problems.push("database unreachable");
    }
    if !keys_ok {
        problems.push("encryption key self-test failed");
    }
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        problems.join("; "),
    )
    .with("database", if db_ok { "ok" } else { "unreachable" })
    .with("keys", if keys_ok { "ok" } else { "failed" })
    .into_response()
}

/// Prometheus text exposition.
pub async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics().render(),
    )
        .into_response()
}
