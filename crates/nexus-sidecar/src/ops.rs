//! `/_nexus/health`, `/_nexus/ready` and `/_nexus/metrics` (route names
//! cannot start with `_`, so these never shadow a route).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Map, Value};

use crate::error::SidecarError;
use crate::forward::Proxy;

/// `GET /_nexus/health`: the process answers.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /_nexus/ready`: the gateway answers and every route's credentials
/// can be had (503 names the routes that cannot, and why). An `mcp` route
/// whose connection needs a person is ready: it serves, by sending the
/// agent's MCP client to consent (a pod must not wait for a person who
/// only its agent can ask).
pub async fn ready(State(p): State<Arc<Proxy>>) -> Response {
    let mut routes = Map::new();
    let mut all = true;
    for route in p.routes.iter() {
        let got = match p.resolver.connection(&p.bridge, route).await {
            Ok(id) => p
                .bridge
                .token(&id)
                .await
                .map(|_| ())
                .map_err(|e| SidecarError::from_bridge(&e, &id)),
            Err(e) => Err(SidecarError::from_bridge(&e, "")),
        };
        let v = match got {
            Ok(()) => json!({"ready": true}),
            Err(e)
                if route.kind == crate::routes::RouteKind::Mcp
                    && crate::mcp::person_needed(&e).is_some() =>
            {
                json!({"ready": true, "person_needed": e.code()})
            }
            Err(e) => {
                all = false;
                json!({"ready": false, "error": e.code()})
            }
        };
        routes.insert(route.name.clone(), v);
    }
    let status = if all {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"status": if all { "ready" } else { "not_ready" }, "routes": routes});
    if all {
        (status, Json(body)).into_response()
    } else {
        let mut e = SidecarError::new(
            status,
            "not_ready",
            "credentials for some routes cannot be had",
        );
        e.0.context = body.as_object().cloned().unwrap_or_default();
        e.into_response()
    }
}

/// `GET /_nexus/metrics`: Prometheus text.
pub async fn metrics(State(handle): State<PrometheusHandle>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

/// Any other `/_nexus/...` path.
pub async fn unknown() -> SidecarError {
    SidecarError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "the sidecar serves /_nexus/health, /_nexus/ready and /_nexus/metrics",
    )
}
