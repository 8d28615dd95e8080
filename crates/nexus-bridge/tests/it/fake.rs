//! A fake gateway and a fake provider API on loopback, for the faults a real
//! one will not produce on demand. Each counts what it was asked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// What the fake gateway answers token requests with.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// 200 with a new access token `at-N` (N counts tokens issued) lasting this long.
    Ok { expires_in: i64 },
    /// This status and error code.
    Fail(u16, &'static str),
    /// 200 with a static key applied as the `key` query parameter.
    Query(&'static str),
}

pub struct Gateway {
    pub url: String,
    pub mode: Mutex<Mode>,
    /// Delay before answering.
    pub delay: Mutex<Duration>,
    pub tokens: AtomicU64,
    pub refreshes: AtomicU64,
    pub issued: AtomicU64,
    pub reports: Mutex<Vec<Value>>,
    /// Reports are held (not answered) while this is false.
    pub reports_open: tokio::sync::watch::Sender<bool>,
}

impl Gateway {
    pub async fn start(mode: Mode) -> Arc<Gateway> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let g = Arc::new(Gateway {
            url: format!("http://{}", listener.local_addr().unwrap()),
            mode: Mutex::new(mode),
            delay: Mutex::new(Duration::ZERO),
            tokens: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            reports: Mutex::new(Vec::new()),
            reports_open: tokio::sync::watch::Sender::new(true),
        });
        let app = Router::new()
            .route("/v1/token/{id}", get(token))
            .route("/v1/refresh/{id}", post(refresh))
            .route("/v1/connections/{id}/scope-failures", post(report))
            .with_state(g.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        g
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn calls(&self) -> u64 {
        self.tokens.load(Ordering::SeqCst) + self.refreshes.load(Ordering::SeqCst)
    }

    async fn answer(&self, headers: &HeaderMap) -> Response {
        assert_eq!(
            headers["authorization"], "Bearer nxa_test",
            "the agent key is sent as a bearer token"
        );
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let mode = self.mode.lock().unwrap().clone();
        match mode {
            Mode::Ok { expires_in } => {
                let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
                Json(json!({
                    "access_token": format!("at-{n}"), "token_type": "Bearer",
                    "expires_in": expires_in, "scope": "read",
                    "strategy": {"type": "oauth2", "config": {}},
                    "credentials": {"access_token": format!("at-{n}")},
                }))
                .into_response()
            }
            Mode::Query(key) => Json(json!({
                "expires_in": null,
                "strategy": {"type": "query_param", "config": {"param_name": "key", "credential_field": "api_key"}},
                "credentials": {"api_key": key},
            }))
            .into_response(),
            Mode::Fail(status, code) => (
                StatusCode::from_u16(status).unwrap(),
                Json(json!({"error": code, "message": "fake", "reason": "fake pause"})),
            )
                .into_response(),
        }
    }
}

async fn token(
    State(g): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(_): Path<String>,
) -> Response {
    g.tokens.fetch_add(1, Ordering::SeqCst);
    g.answer(&headers).await
}

async fn refresh(
    State(g): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(_): Path<String>,
) -> Response {
    g.refreshes.fetch_add(1, Ordering::SeqCst);
    g.answer(&headers).await
}

async fn report(
    State(g): State<Arc<Gateway>>,
    Path(id): Path<String>,
    Json(mut body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    body["connection"] = json!(id);
    let _ = g.reports_open.subscribe().wait_for(|open| *open).await;
    g.reports.lock().unwrap().push(body);
    (StatusCode::ACCEPTED, Json(json!({"status": "degraded"})))
}

/// A provider API: 200 only for `Bearer <accepted>`, 401 otherwise; 403 with
/// an insufficient_scope challenge under /admin.
pub struct Provider {
    pub url: String,
    pub accepted: Mutex<String>,
    pub calls: AtomicU64,
}

impl Provider {
    pub async fn start(accepted: &str) -> Arc<Provider> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = Arc::new(Provider {
            url: format!("http://{}", listener.local_addr().unwrap()),
            accepted: Mutex::new(accepted.into()),
            calls: AtomicU64::new(0),
        });
        let app = Router::new().fallback(provider).with_state(p.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        p
    }
}

async fn provider(
    State(p): State<Arc<Provider>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    p.calls.fetch_add(1, Ordering::SeqCst);
    let want = format!("Bearer {}", p.accepted.lock().unwrap());
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer error=\"invalid_token\"")],
        )
            .into_response();
    }
    if uri.path().starts_with("/admin") {
        return (
            StatusCode::FORBIDDEN,
            [(
                "www-authenticate",
                "Bearer error=\"insufficient_scope\", scope=\"admin\"",
            )],
        )
            .into_response();
    }
    Json(json!({"ok": true})).into_response()
}
