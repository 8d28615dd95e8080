//! `/providers/mcp`: an OAuth-protected MCP server registered by its URL
//! (see [`crate::mcp`]). `…/plan` tells what Nexus found, changing nothing.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::mcp::{self, McpError, McpServer};

impl From<McpError> for ApiError {
    fn from(e: McpError) -> Self {
        let status = match e {
            McpError::BadUrl(_) => StatusCode::BAD_REQUEST,
            McpError::Egress(_) => StatusCode::FORBIDDEN,
            // The server or its metadata is at fault, not the request.
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

/// `POST /providers/mcp/plan {url}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanMcp {
    /// The MCP server's URL (its Streamable HTTP endpoint).
    pub url: String,
}

/// `POST /providers/mcp {url, name, client_id, client_secret?, scopes?}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMcp {
    /// The MCP server's URL.
    pub url: String,
    /// The provider's name.
    pub name: String,
    /// A client registered in advance at the server's authorization server.
    pub client_id: Option<String>,
    /// Its secret (none: a public client, PKCE alone).
    pub client_secret: Option<String>,
    /// Scopes instead of those the server asks for.
    pub scopes: Option<Vec<String>>,
}

async fn found(st: &AppState, url: &str) -> Result<McpServer, ApiError> {
    Ok(mcp::discover(st.handshakes().provider_http(), &st.config().egress, url).await?)
}

/// Whether Nexus can be known by its client ID metadata document there:
/// the server takes such documents, and the document's URL (`BASE_URL`)
/// is https (an authorization server fetches it), or on loopback for
/// development.
fn cimd_usable(st: &AppState, server: &McpServer) -> bool {
    let url = st.handshakes().client_metadata_url();
    server.client_id_metadata_document_supported
        && (url.starts_with("https://") || !nexus_core::egress::plaintext_beyond_loopback(url))
}

/// How Nexus identifies itself to the server's authorization server.
enum Client<'a> {
    /// A client registered in advance.
    PreRegistered(&'a str),
    /// Its client ID metadata document (a public client).
    MetadataDocument,
    /// Dynamic registration (RFC 7591).
    Register,
    /// None of these: someone must register a client.
    Missing,
}

/// The client, in the MCP specification's order of preference.
fn choose<'a>(st: &AppState, server: &McpServer, given: Option<&'a str>) -> Client<'a> {
    match given {
        Some(id) => Client::PreRegistered(id),
        None if cimd_usable(st, server) => Client::MetadataDocument,
        None if server.registration_endpoint.is_some() => Client::Register,
        None => Client::Missing,
    }
}

/// What to do when no client can be had.
fn missing_client(st: &AppState, server: &McpServer) -> String {
    format!(
        "register a client at {} with redirect URI {} and give its client_id (dynamic registration and client ID metadata documents are not supported yet)",
        server.issuer,
        st.handshakes().shared_redirect_uri()
    )
}

/// The plan's account of the client Nexus would use.
fn client_plan(st: &AppState, server: &McpServer) -> Value {
    match choose(st, server, None) {
        Client::PreRegistered(id) => json!({"method": "pre_registered", "client_id": id}),
        Client::MetadataDocument => json!({
            "method": "client_id_metadata_document",
            "client_id": st.handshakes().client_metadata_url(),
        }),
        Client::Register => json!({
            "method": "dynamic_registration",
            "registration_endpoint": server.registration_endpoint,
            "redirect_uri": st.handshakes().shared_redirect_uri(),
        }),
        Client::Missing => json!({"method": "none", "message": missing_client(st, server)}),
    }
}

/// `POST /providers/mcp/plan`: what the server's metadata says, checked.
pub async fn plan(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<PlanMcp>,
) -> Result<Json<Value>, ApiError> {
    let server = found(&st, &req.url).await?;
    let client = client_plan(&st, &server);
    Ok(Json(json!({"server": server, "client": client,
        "redirect_uri": st.handshakes().shared_redirect_uri()})))
}

/// `POST /providers/mcp`: the server as a provider whose tokens are bound
/// to it (`params.resource`).
pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewMcp>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if req.client_id.as_deref().is_none_or(|c| c.trim().is_empty()) && req.client_secret.is_some() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "client_secret was given without client_id: a secret belongs to a client registered in advance",
        ));
    }
    let server = found(&st, &req.url).await?;
    let given = req
        .client_id
        .as_deref()
        .map(str::trim)
        .filter(|c| !c.is_empty());
    let profile = match choose(&st, &server, given) {
        Client::PreRegistered(client_id) => server.profile(
            req.name.trim(),
            client_id,
            req.client_secret.as_deref(),
            None,
            req.scopes,
        ),
        // A public client known by its metadata document: PKCE, no secret.
        Client::MetadataDocument => server.profile(
            req.name.trim(),
            st.handshakes().client_metadata_url(),
            None,
            None,
            req.scopes,
        ),
        Client::Register => {
            let made = mcp::register(
                st.handshakes().provider_http(),
                &server,
                st.handshakes().shared_redirect_uri(),
            )
            .await?;
            server.profile(
                req.name.trim(),
                &made.client_id,
                made.client_secret.as_ref().map(|s| s.expose().as_str()),
                Some(&made.auth_method),
                req.scopes,
            )
        }
        Client::Missing => {
            return Err(ApiError::bad_request(
                "client_id_required",
                missing_client(&st, &server),
            ));
        }
    };
    let id = st
        .registry()
        .create(json!({ "profile": profile }), &caller.admin())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "name": req.name.trim(), "server": server,
            "redirect_uri": st.handshakes().shared_redirect_uri()})),
    ))
}

/// `GET /auth/client-metadata.json`: Nexus's client ID metadata document
/// (public: authorization servers fetch it).
pub async fn client_metadata(State(st): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CACHE_CONTROL, "public, max-age=3600")],
        Json(st.handshakes().client_metadata()),
    )
        .into_response()
}
