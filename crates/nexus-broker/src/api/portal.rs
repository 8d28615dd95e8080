//! The connect portal: `POST /connect-sessions` and `DELETE
//! /connect-sessions/{id}` (admin; the gateway's agent route calls the
//! first), and the pages a person opens from the session's link (public,
//! reached through the gateway): `GET /connect`, `POST /connect/start`,
//! `/connect/disconnect` and `/connect/pause`.
//!
//! The link's token is swapped for an `HttpOnly` cookie on first use (and
//! the browser sent to `/connect`, so the token leaves the address bar);
//! every form carries a CSRF token bound to the session, and a cross-origin
//! post is refused.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::browser_session::{cookie, set_cookie, SameSite};
use crate::events::audit::Actor;
use crate::handshake::ConsentRequest;
use crate::portal::{NewSession, Portal, PortalError, COOKIE};
use crate::store::{now_ms, parse_json_list, rfc3339, ConnectSessionRow, PauseScope};

impl From<PortalError> for ApiError {
    fn from(e: PortalError) -> Self {
        let msg = e.to_string();
        match e {
            PortalError::Invalid(m) => ApiError::bad_request("invalid_request", m),
            PortalError::Unknown => ApiError::new(StatusCode::UNAUTHORIZED, "session_invalid", msg),
            PortalError::Expired => ApiError::new(StatusCode::UNAUTHORIZED, "session_expired", msg),
            PortalError::Revoked => ApiError::new(StatusCode::UNAUTHORIZED, "session_revoked", msg),
            PortalError::Store(s) => s.into(),
        }
    }
}

fn portal(st: &AppState) -> Portal<'_> {
    Portal::new(st.store(), &st.handshakes().state_key)
}

/// `POST /connect-sessions {workspace_id, providers?, return_url?,
/// expires_in?}` → 201 `{id, url, token, expires_at, workspace_id}`; the
/// token (also in `url`) is shown this once.
pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewSession>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let providers = match req.providers {
        None => None,
        Some(list) => {
            let mut ids = Vec::with_capacity(list.len());
            for p in list {
                let found = match st.registry().get(&p).await {
                    Ok(found) => found,
                    Err(_) => st.registry().find(&p).await?,
                };
                if !ids.contains(&found.row.id) {
                    ids.push(found.row.id);
                }
            }
            Some(ids)
        }
    };
    if let Some(r) = &req.return_url {
        st.handshakes().check_return_url(r)?;
    }
    let made = portal(&st)
        .create(
            req.workspace_id.trim(),
            providers,
            req.return_url,
            req.expires_in,
            &st.config().base_url,
            &caller.admin(),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "id": made.id,
            "workspace_id": req.workspace_id.trim(),
            "url": made.url.expose(),
            "token": made.token.expose(),
            "expires_at": made.expires_at,
        })),
    ))
}

/// `DELETE /connect-sessions/{id}`: the link stops working at once.
pub async fn revoke(
    State(st): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    if !portal(&st).revoke(&id, &caller.admin()).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "session_not_found",
            "no live connect session has this id",
        ));
    }
    Ok(Json(json!({"id": id, "revoked": true})))
}

/// A refusal: a page for a browser, the JSON error for anything else.
fn refuse(st: &AppState, headers: &HeaderMap, e: ApiError) -> Response {
    super::pages::refuse(
        headers,
        e,
        "Connect link not usable",
        &st.config().connect_embed_origins,
    )
}

/// `?session=` (the link), or what the way back from a provider adds.
#[derive(Deserialize)]
pub struct PageQuery {
    session: Option<String>,
    status: Option<String>,
    connection_id: Option<String>,
    notice: Option<String>,
}

/// What the page tells the window that opened or frames it (through
/// `/assets/connect.js`, to `CONNECT_EMBED_ORIGINS` only) when a
/// connection attempt came back.
#[derive(Serialize)]
struct ResultView {
    status: String,
    connection: Option<String>,
    provider: Option<String>,
}

#[derive(Serialize)]
struct ConnectionView {
    id: String,
    provider: String,
    status: &'static str,
    state: &'static str,
    reason: Option<&'static str>,
    failing_scopes: Vec<String>,
    reconnect: bool,
    disconnect: bool,
}

#[derive(Serialize)]
struct ProviderView {
    id: String,
    name: String,
    description: Option<String>,
}

#[derive(Serialize)]
struct PauseView {
    operator: bool,
    reason: String,
    by: Option<String>,
    at: String,
}

fn state_words(status: &str) -> &'static str {
    match status {
        "active" => "Connected",
        "degraded" => "Connected, but some permissions are missing",
        "attention_required" => "Needs you: reconnect to keep it working",
        "revoked" => "Disconnected",
        "pending" => "Waiting for your consent",
        "failed" => "Connecting failed",
        _ => "Unknown state",
    }
}

/// The reason for a state, in words, from the connection's error code.
fn reason_words(code: Option<&str>) -> Option<&'static str> {
    Some(match code? {
        "invalid_grant" | "refresh_token_revoked" | "grant_revoked" => {
            "The account's access was withdrawn at the provider."
        }
        "refresh_interrupted" => {
            "A refresh was interrupted and the provider no longer accepts the old grant."
        }
        "insufficient_scope" | "scope_revoked" => {
            "The provider refuses some requests: permissions are missing."
        }
        "client_rejected" | "invalid_client" => {
            "The provider refused Nexus's application; an operator must fix it."
        }
        "consent_denied" | "access_denied" => "Consent was declined.",
        "revoked_by_user" | "revoked" => "It was disconnected.",
        _ => "The provider answered with an error.",
    })
}

fn notice_words(q: &PageQuery) -> Option<&'static str> {
    match (q.status.as_deref(), q.notice.as_deref()) {
        (Some("success"), _) => Some("Connected."),
        (Some(_), _) => Some("Connecting did not finish; you can try again."),
        (_, Some("disconnected")) => Some("Disconnected: the provider was told to revoke access."),
        (_, Some("paused")) => Some("Paused: agents of this workspace get no credentials."),
        (_, Some("resumed")) => Some("Resumed."),
        _ => None,
    }
}

/// The page, and the origins its forms may lead to (the authorization
/// endpoints of the OAuth providers it offers or can reconnect).
async fn render_page(
    st: &AppState,
    s: &ConnectSessionRow,
    q: &PageQuery,
) -> Result<(String, Vec<String>), ApiError> {
    let allowed: Option<Vec<String>> = s.providers.as_deref().map(parse_json_list);
    let providers = st.registry().list().await?;
    let name_of = |id: &str| {
        providers
            .iter()
            .find(|p| p.row.id == id)
            .map(|p| p.profile.name.clone())
    };
    let may_connect = |id: &str| allowed.as_ref().is_none_or(|a| a.iter().any(|x| x == id));
    let mut connections = Vec::new();
    for c in st.store().list_connections(&s.workspace_id).await? {
        let status = c.status.as_str();
        if status == "pending" {
            // Abandoned consents are not connections a person has.
            continue;
        }
        let name = name_of(&c.provider_id);
        connections.push(ConnectionView {
            reconnect: name.is_some()
                && may_connect(&c.provider_id)
                && matches!(
                    status,
                    "attention_required" | "degraded" | "revoked" | "failed"
                ),
            disconnect: status != "revoked",
            provider: name.unwrap_or_else(|| "(a provider that was removed)".into()),
            id: c.id,
            status,
            state: state_words(status),
            reason: if status == "active" {
                None
            } else {
                reason_words(c.error_code.as_deref())
            },
            failing_scopes: parse_json_list(&c.failing_scopes),
        });
    }
    // Looked up together, each for a short while (discovery is cached): a
    // provider that does not answer costs the page two seconds, not its
    // full timeout, and then only its button fails.
    let lookups = providers
        .iter()
        .filter(|p| may_connect(&p.row.id))
        .map(|p| async move {
            tokio::time::timeout(
                std::time::Duration::from_secs(2),
                st.handshakes().authorization_origin(p),
            )
            .await
            .ok()
            .flatten()
        });
    let mut form_targets: Vec<String> = Vec::new();
    for origin in futures_util::future::join_all(lookups)
        .await
        .into_iter()
        .flatten()
    {
        if !form_targets.contains(&origin) {
            form_targets.push(origin);
        }
    }
    let offer: Vec<ProviderView> = providers
        .iter()
        .filter(|p| may_connect(&p.row.id))
        .map(|p| ProviderView {
            id: p.row.id.clone(),
            name: p.profile.name.clone(),
            description: p.profile.description.clone(),
        })
        .collect();
    // Told from the connection as stored, not from the address bar (which
    // anyone can write): only a connection of this workspace is named.
    let origins = &st.config().connect_embed_origins;
    let result = match (q.status.as_deref(), origins.is_empty()) {
        (None, _) | (_, true) => None,
        (Some("success"), false) => {
            let found = match q.connection_id.as_deref() {
                Some(id) => st.store().get_connection(id).await?,
                None => None,
            }
            .filter(|c| c.workspace_id == s.workspace_id);
            Some(match found {
                Some(c) => ResultView {
                    status: c.status.as_str().to_string(),
                    provider: name_of(&c.provider_id),
                    connection: Some(c.id),
                },
                None => ResultView {
                    status: "error".into(),
                    connection: None,
                    provider: None,
                },
            })
        }
        (Some(_), false) => Some(ResultView {
            status: "error".into(),
            connection: None,
            provider: None,
        }),
    };
    let pause = st.pauses().check(Some(&s.workspace_id)).map(|p| PauseView {
        operator: matches!(p.scope, PauseScope::Operator),
        reason: p.reason,
        by: p.paused_by,
        at: rfc3339(p.paused_at),
    });
    nexus_core::pages::render(
        super::pages::templates(),
        "portal.html",
        minijinja::context! {
            workspace => s.workspace_id,
            connections => connections,
            providers => offer,
            pause => pause,
            csrf => portal(st).csrf_token(&s.id),
            notice => notice_words(q),
            return_url => s.return_url,
            result => result,
            origins => origins.join(" "),
        },
    )
    .map(|html| (html, form_targets))
    .map_err(|e| ApiError::internal(&e))
}

fn session_cookie(token: &str, max_age_secs: i64, secure: bool) -> Option<HeaderValue> {
    // Lax, not Strict: the way back from a provider's consent page is a
    // navigation another site started, and it must find the session.
    set_cookie(
        COOKIE,
        token,
        "/connect",
        SameSite::Lax,
        max_age_secs,
        secure,
    )
}

/// `GET /connect`: with `?session=` from the link, the token becomes a
/// cookie and the browser comes back without it; else the page.
pub async fn page(
    State(st): State<AppState>,
    Query(q): Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    let secure = st.config().base_url.scheme() == "https";
    if let Some(token) = q.session.as_deref() {
        let s = match portal(&st).session(token).await {
            Ok(s) => s,
            Err(e) => return refuse(&st, &headers, e.into()),
        };
        let mut resp = nexus_core::pages::redirect("/connect", &st.config().connect_embed_origins);
        let left = ((s.expires_at - now_ms()) / 1000).max(1);
        if let Some(v) = session_cookie(token, left, secure) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
        return resp;
    }
    let s = match current(&st, &headers).await {
        Ok(s) => s,
        Err(e) => return refuse(&st, &headers, e),
    };
    match render_page(&st, &s, &q).await {
        Ok((html, targets)) => nexus_core::pages::respond(
            StatusCode::OK,
            html,
            &targets.iter().map(String::as_str).collect::<Vec<_>>(),
            &st.config().connect_embed_origins,
        ),
        Err(e) => refuse(&st, &headers, e),
    }
}

async fn current(st: &AppState, headers: &HeaderMap) -> Result<ConnectSessionRow, ApiError> {
    let token = cookie(headers, COOKIE).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "session_missing",
            "open the connect link the application gave you",
        )
    })?;
    Ok(portal(st).session(&token).await?)
}

/// A checked form post: its session and fields.
struct Post {
    session: ConnectSessionRow,
    form: super::pages::Form,
    actor: Actor,
}

impl Post {
    fn get(&self, k: &str) -> Option<&str> {
        self.form.get(k)
    }
}

async fn checked(
    st: &AppState,
    caller: Caller,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Post, ApiError> {
    let session = current(st, headers).await?;
    let csrf_failed = |m: &str| ApiError::new(StatusCode::FORBIDDEN, "csrf_failed", m.to_string());
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        if origin != st.config().base_url.origin().ascii_serialization() {
            return Err(csrf_failed("cross-origin form submission refused"));
        }
    }
    let form = super::pages::Form::parse(body)?;
    let token = form.get("csrf").unwrap_or_default();
    if !portal(st).csrf_ok(&session.id, token) {
        return Err(csrf_failed(
            "the form was not submitted from its own page; reload the page",
        ));
    }
    let actor = Actor {
        name: format!("connect:{}", session.id),
        ip: caller.ip,
        user_agent: caller.user_agent,
        client_identity: caller.client_identity,
    };
    Ok(Post {
        session,
        form,
        actor,
    })
}

/// A connection of the session's workspace (another's is not found).
async fn own_connection(st: &AppState, p: &Post) -> Result<crate::store::ConnectionRow, ApiError> {
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "connection_not_found",
            "no such connection in this workspace",
        )
    };
    let id = p.get("connection_id").ok_or_else(not_found)?;
    let c = st.store().get_connection(id).await?.ok_or_else(not_found)?;
    if c.workspace_id != p.session.workspace_id {
        return Err(not_found());
    }
    Ok(c)
}

/// `POST /connect/start` (`provider_id`, or `connection_id` to reconnect):
/// a consent (or capture) handshake that comes back to the portal.
pub async fn start(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let go = async {
        let p = checked(&st, caller, &headers, &body).await?;
        let (provider_id, connection_id) = if p.get("connection_id").is_some() {
            let c = own_connection(&st, &p).await?;
            (c.provider_id, Some(c.id))
        } else {
            let id = p.get("provider_id").unwrap_or_default().to_string();
            (id, None)
        };
        let allowed = p
            .session
            .providers
            .as_deref()
            .map(parse_json_list)
            .is_none_or(|a| a.contains(&provider_id));
        if !allowed || provider_id.is_empty() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "provider_not_allowed",
                "this connect link does not offer that provider",
            ));
        }
        let base = st
            .config()
            .base_url
            .as_str()
            .trim_end_matches('/')
            .to_string();
        let spec = st
            .handshakes()
            .consent_spec(
                ConsentRequest {
                    workspace_id: Some(p.session.workspace_id.clone()),
                    provider_id: Some(provider_id),
                    provider_name: None,
                    scopes: None,
                    return_url: Some(format!("{base}/connect")),
                    connection_id,
                    metadata: None,
                },
                &p.actor,
            )
            .await?;
        Ok::<_, ApiError>(spec.auth_url)
    };
    match go.await {
        Ok(url) => nexus_core::pages::redirect(&url, &st.config().connect_embed_origins),
        Err(e) => refuse(&st, &headers, e),
    }
}

/// `POST /connect/disconnect` (`connection_id`): revoked at the provider
/// (RFC 7009) and erased here.
pub async fn disconnect(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let go = async {
        let p = checked(&st, caller, &headers, &body).await?;
        let c = own_connection(&st, &p).await?;
        st.tokens().refresher().revoke(&c.id, &p.actor).await?;
        Ok::<_, ApiError>(())
    };
    match go.await {
        Ok(()) => back(&st, "disconnected"),
        Err(e) => refuse(&st, &headers, e),
    }
}

/// `POST /connect/pause` (`action` = `pause` with a `reason`, or `resume`):
/// the workspace's own pause (an operator's pause stays until the operator
/// lifts it).
pub async fn pause(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let go = async {
        let p = checked(&st, caller, &headers, &body).await?;
        let scope = PauseScope::Workspace(p.session.workspace_id.clone());
        match p.get("action") {
            Some("pause") => {
                let reason = super::pauses::reason(p.get("reason").map(str::to_string), true)?
                    .unwrap_or_default();
                st.pauses().pause(scope, reason, &p.actor).await?;
                Ok("paused")
            }
            Some("resume") => {
                st.pauses().resume(scope, &p.actor).await?;
                Ok("resumed")
            }
            _ => Err(ApiError::bad_request(
                "invalid_request",
                "action must be pause or resume",
            )),
        }
    };
    match go.await {
        Ok(notice) => back(&st, notice),
        Err(e) => refuse(&st, &headers, e),
    }
}

fn back(st: &AppState, notice: &str) -> Response {
    nexus_core::pages::redirect(
        &format!("/connect?notice={notice}"),
        &st.config().connect_embed_origins,
    )
}
