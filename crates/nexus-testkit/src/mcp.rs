//! A fake OAuth-protected MCP server and its authorization server on
//! loopback, able to lie in each of the ways the MCP authorization
//! specification says a client must catch (the broker's and the CLI's
//! tests register it by URL).

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode as AxStatus};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// How the fake server and its authorization server answer.
#[derive(Clone, Default)]
pub struct Lies {
    /// The challenge carries no `resource_metadata` (well-known fallback).
    pub bare_challenge: bool,
    /// The metadata's `resource`, instead of this server.
    pub resource: Option<String>,
    /// The authorization server the metadata names, instead of ours.
    pub authorization_server: Option<String>,
    /// The issuer the authorization server's metadata says.
    pub issuer: Option<String>,
    /// PKCE methods offered.
    pub pkce: Option<Vec<&'static str>>,
    /// No dynamic registration offered.
    pub no_registration: bool,
    /// Client ID metadata documents taken.
    pub cimd: bool,
    /// The redirect URIs dynamic registration answers with, instead of
    /// the ones asked for.
    pub registered_redirects: Option<Vec<String>>,
}

pub struct FakeMcp {
    /// `http://127.0.0.1:PORT`; the MCP endpoint is `/mcp`.
    pub base: String,
    /// How it answers now.
    pub lies: Mutex<Lies>,
    /// Registration requests received.
    pub registrations: Mutex<Vec<Value>>,
}

pub const DYN_SECRET: &str = "dyn-secret-canary-5b1e";

async fn register(State(f): State<Arc<FakeMcp>>, Json(req): Json<Value>) -> Response {
    let lie = f.lies.lock().unwrap().registered_redirects.clone();
    f.registrations.lock().unwrap().push(req.clone());
    (
        AxStatus::CREATED,
        Json(json!({
            "client_id": "dyn-client",
            "client_secret": DYN_SECRET,
            "redirect_uris": lie.map(Value::from).unwrap_or_else(|| req["redirect_uris"].clone()),
            "token_endpoint_auth_method": "client_secret_basic",
        })),
    )
        .into_response()
}

async fn mcp_endpoint(State(f): State<Arc<FakeMcp>>) -> Response {
    let bare = f.lies.lock().unwrap().bare_challenge;
    let challenge = if bare {
        "Bearer".to_string()
    } else {
        format!(
            r#"Bearer error="invalid_token", resource_metadata="{}/.well-known/oauth-protected-resource/mcp", scope="tools:read""#,
            f.base
        )
    };
    (
        AxStatus::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, challenge)],
        Json(json!({"error": "invalid_token"})),
    )
        .into_response()
}

async fn resource_metadata(State(f): State<Arc<FakeMcp>>) -> Json<Value> {
    let l = f.lies.lock().unwrap().clone();
    Json(json!({
        "resource": l.resource.unwrap_or_else(|| format!("{}/mcp", f.base)),
        "authorization_servers": [l.authorization_server.unwrap_or_else(|| format!("{}/as", f.base))],
        "scopes_supported": ["tools:read", "tools:write"],
    }))
}

async fn server_metadata(State(f): State<Arc<FakeMcp>>) -> Json<Value> {
    let l = f.lies.lock().unwrap().clone();
    let b = &f.base;
    let mut m = json!({
        "issuer": l.issuer.unwrap_or_else(|| format!("{b}/as")),
        "authorization_endpoint": format!("{b}/as/authorize"),
        "token_endpoint": format!("{b}/as/token"),
        "code_challenge_methods_supported": l.pkce.unwrap_or_else(|| vec!["S256"]),
    });
    if l.cimd {
        m["client_id_metadata_document_supported"] = json!(true);
    }
    if !l.no_registration {
        m["registration_endpoint"] = json!(format!("{b}/as/register"));
    }
    Json(m)
}

/// Starts the fake on loopback.
pub async fn start() -> Arc<FakeMcp> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake = Arc::new(FakeMcp {
        base: format!("http://{}", listener.local_addr().unwrap()),
        lies: Mutex::new(Lies::default()),
        registrations: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/mcp", post(mcp_endpoint))
        .route(
            "/.well-known/oauth-protected-resource/mcp",
            get(resource_metadata),
        )
        .route(
            "/.well-known/oauth-authorization-server/as",
            get(server_metadata),
        )
        .route("/as/register", post(register))
        .with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    fake
}
