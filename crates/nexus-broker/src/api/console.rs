//! The operator console, on the broker (private zone, behind
//! `ALLOWED_CIDRS`): `POST /console/links` (admin key) mints a one-time
//! sign-in link (`nexus up` prints one); the link opens a session held in an
//! `HttpOnly`, `SameSite=Strict` cookie with an idle and an absolute
//! expiry. Pages: overview, connections (filtered), a connection (timeline,
//! refresh, revoke, a reconnect link for the person), and the kill switch.
//! Every page shows a red banner while any pause is on and an amber one
//! while connections need a person; every change carries a CSRF token and
//! is audited as `console:<operator>`.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::Caller;
use super::AppState;
use crate::browser_session;
use crate::browser_session::{cookie, set_cookie, SameSite};
use crate::events::audit::{Actor, AuditEvent};
use crate::store::{
    now_ms, parse_json_list, rfc3339, AuditFilter, ConnectionRow, ConsoleSessionRow, PauseScope,
};

/// The session cookie.
const COOKIE: &str = "nexus_console";
/// A sign-in link is usable this long, once.
const LINK_TTL_MS: i64 = 10 * 60 * 1000;
/// A session ends after this long without a page.
const IDLE_MS: i64 = 30 * 60 * 1000;
/// And after this long whatever happens.
const ABSOLUTE_MS: i64 = 12 * 60 * 60 * 1000;
const CSRF_PURPOSE: &str = "nexus-console-csrf";

/// `POST /console/links {operator?}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewLink {
    /// Who will sign in (audited as `console:<operator>`); default `admin`.
    pub operator: Option<String>,
}

/// `POST /console/links` → 201 `{path, expires_at}`: a one-time sign-in
/// link (path on this broker), usable for 10 minutes.
pub async fn create_link(
    State(st): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    // The body is optional (`{"operator": ...}`), so it is parsed by hand.
    let req: NewLink = if body.iter().all(u8::is_ascii_whitespace) {
        NewLink::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_request",
                format!("body must be {{\"operator\": text}}: {e}"),
            )
        })?
    };
    let operator = req
        .operator
        .map(|o| o.trim().to_string())
        .unwrap_or_else(|| "admin".into());
    let (path, expires_at) = mint_link(&st, &operator, &caller.admin()).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"path": path, "operator": operator, "expires_at": expires_at})),
    ))
}

/// A one-time sign-in link for `operator`: its path on this broker and
/// when it expires (what `nexus up` prints).
pub async fn mint_link(
    st: &AppState,
    operator: &str,
    actor: &Actor,
) -> Result<(String, String), ApiError> {
    if operator.is_empty()
        || operator.len() > 100
        || !operator
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "@._-".contains(c))
    {
        return Err(ApiError::bad_request(
            "invalid_request",
            "operator must be 1 to 100 letters, digits, '@', '.', '_' or '-'",
        ));
    }
    let token = browser_session::new_token("nxl_");
    let now = now_ms();
    let audit = AuditEvent::new("console.link_created")
        .actor(actor.name.clone())
        .by(actor)
        .detail(json!({"operator": operator}));
    st.store()
        .create_console_link(
            &browser_session::hash(token.expose()),
            operator,
            now,
            now + LINK_TTL_MS,
            &audit,
        )
        .await?;
    Ok((
        format!("/console/sign-in?token={}", token.expose()),
        rfc3339(now + LINK_TTL_MS),
    ))
}

/// Whether the console's cookies carry `Secure` (`CONSOLE_URL` is https,
/// or the broker serves TLS itself).
fn secure_cookie(st: &AppState) -> bool {
    st.config().console_secure_cookies
}

fn page(html: Result<String, nexus_core::pages::PageError>) -> Response {
    match html {
        Ok(h) => nexus_core::pages::respond(StatusCode::OK, h, &[], &[]),
        Err(e) => ApiError::internal(&e).into_response(),
    }
}

/// A refusal: a page for a browser, the JSON error for anything else. A
/// signed-out browser is offered single sign-on when it is configured.
fn refuse(st: &AppState, headers: &HeaderMap, e: ApiError) -> Response {
    if e.code == "console_signed_out" && st.config().console_sso.is_some() {
        let e = ApiError::new(
            e.status,
            e.code,
            "You are signed out. Sign in with your organisation's account, or open a one-time link (`nexus console` prints one).",
        );
        let sso = super::pages::Action {
            href: "/console/sso",
            label: "Sign in with single sign-on",
        };
        return super::pages::refuse_with(headers, e, "Console", &[], Some(sso));
    }
    super::pages::refuse(headers, e, "Console", &[])
}

/// The sign-in cookie of a single sign-on under way.
const SSO_COOKIE: &str = "nexus_console_sso";

fn sso_not_configured() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "sso_not_configured",
        "single sign-on is not configured (CONSOLE_OIDC_ISSUER); sign in with a one-time link (`nexus console`)",
    )
}

/// `GET /console/sso?login_hint=`: off to the identity provider, with the
/// sealed sign-in cookie (`SameSite=Lax`: it must come back with the
/// provider's top-level redirect).
pub async fn sso_start(
    State(st): State<AppState>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some(sso) = st.config().console_sso.as_ref() else {
        return refuse(&st, &headers, sso_not_configured());
    };
    let started = st
        .handshakes()
        .operator_start(sso, q.get("login_hint").map(String::as_str))
        .await;
    match started {
        Ok(s) => {
            let mut resp = nexus_core::pages::redirect(s.authorize_url.as_str(), &[]);
            let set = sso_cookie(&st, &s.cookie, crate::handshake::operator::LOGIN_TTL_SECS);
            if let Some(v) = set {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Err(e) => sso_refused(&st, &headers, e),
    }
}

fn sso_refused(
    st: &AppState,
    headers: &HeaderMap,
    e: crate::handshake::operator::SsoError,
) -> Response {
    use crate::handshake::operator::SsoError;
    let status = match &e {
        SsoError::State(_) => StatusCode::BAD_REQUEST,
        SsoError::Denied(_) | SsoError::NotAllowed(_) => StatusCode::FORBIDDEN,
        SsoError::Provider(_) => StatusCode::BAD_GATEWAY,
    };
    let again = super::pages::Action {
        href: "/console/sso",
        label: "Try again",
    };
    let err = ApiError::new(status, e.code(), e.to_string());
    let mut resp = super::pages::refuse_with(headers, err, "Console", &[], Some(again));
    clear_sso_cookie(st, &mut resp);
    resp
}

/// The sign-in cookie of a single sign-on under way (`SameSite=Lax`: it
/// must come back with the provider's top-level redirect).
fn sso_cookie(st: &AppState, value: &str, max_age_secs: i64) -> Option<HeaderValue> {
    set_cookie(
        SSO_COOKIE,
        value,
        "/console/sso",
        SameSite::Lax,
        max_age_secs,
        secure_cookie(st),
    )
}

fn clear_sso_cookie(st: &AppState, resp: &mut Response) {
    if let Some(v) = sso_cookie(st, "", 0) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// `GET /console/sso/callback`: the provider's answer. An operator on the
/// allow-list gets a session; anyone else a refusal, audited either way.
pub async fn sso_callback(
    State(st): State<AppState>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    caller: Caller,
    headers: HeaderMap,
) -> Response {
    let Some(sso) = st.config().console_sso.as_ref() else {
        return refuse(&st, &headers, sso_not_configured());
    };
    let kept = cookie(&headers, SSO_COOKIE);
    let finished = st
        .handshakes()
        .operator_finish(sso, &q, kept.as_deref())
        .await;
    let op = match finished {
        Ok(op) => op,
        // A forged or stale answer is refused without an audit event: anyone
        // can send those, and the log is for people who reached the provider.
        Err(e @ crate::handshake::operator::SsoError::State(_)) => {
            return sso_refused(&st, &headers, e);
        }
        Err(e) => {
            let mut audit = AuditEvent::new("console.sign_in_refused")
                .detail(json!({"method": "oidc", "reason": e.code(), "message": e.to_string()}));
            audit.ip = caller.ip.clone();
            audit.user_agent = caller.user_agent.clone();
            if st.audit().record(audit).await.is_err() {
                tracing::warn!(
                    "the audit queue is closed: a refused console sign-in went unrecorded"
                );
            }
            return sso_refused(&st, &headers, e);
        }
    };
    let (session, session_token) = new_session(op.name.clone());
    let mut audit = AuditEvent::new("console.signed_in")
        .actor(format!("console:{}", op.name))
        .detail(json!({"session_id": session.id, "method": "oidc",
            "subject": op.subject, "allowed_by": op.allowed_by}));
    audit.ip = caller.ip;
    audit.user_agent = caller.user_agent;
    if let Err(e) = st
        .store()
        .open_console_session(
            &session,
            &browser_session::hash(session_token.expose()),
            &audit,
        )
        .await
    {
        return refuse(&st, &headers, e.into());
    }
    let mut resp = super::pages::message_with(
        StatusCode::OK,
        "Console",
        &format!("Signed in as {}.", op.name),
        &[],
        Some(super::pages::Action {
            href: "/console",
            label: "Open the console",
        }),
        Some("/console"),
    );
    if let Some(v) = session_cookie(&st, session_token.expose(), ABSOLUTE_MS / 1000) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    clear_sso_cookie(&st, &mut resp);
    resp
}

/// A new session for `operator` (filled in by the store for a link's
/// sign-in) and its token, the cookie's value.
fn new_session(operator: String) -> (ConsoleSessionRow, nexus_core::Secret<String>) {
    let now = now_ms();
    (
        ConsoleSessionRow {
            id: format!("con_{}", uuid::Uuid::new_v4().simple()),
            operator,
            created_at: now,
            last_seen_at: now,
            expires_at: now + ABSOLUTE_MS,
            ended_at: None,
        },
        browser_session::new_token("nxs_"),
    )
}

/// The session cookie (`SameSite=Strict`); an empty value with no age
/// removes it.
fn session_cookie(st: &AppState, value: &str, max_age_secs: i64) -> Option<HeaderValue> {
    set_cookie(
        COOKIE,
        value,
        "/console",
        SameSite::Strict,
        max_age_secs,
        secure_cookie(st),
    )
}

fn signed_out() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "console_signed_out",
        "You are signed out. Open a new sign-in link (`nexus console` prints one).",
    )
}

/// `GET /console/sign-in?token=`: the link, used once, opens a session.
pub async fn sign_in(
    State(st): State<AppState>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    caller: Caller,
    headers: HeaderMap,
) -> Response {
    let Some(token) = q
        .get("token")
        .filter(|t| t.starts_with("nxl_") && t.len() < 100)
    else {
        return refuse(&st, &headers, signed_out());
    };
    let (session, session_token) = new_session(String::new());
    let mut audit = AuditEvent::new("console.signed_in")
        .detail(json!({"session_id": session.id, "method": "link"}));
    audit.ip = caller.ip;
    audit.user_agent = caller.user_agent;
    let used = st
        .store()
        .use_console_link(
            &browser_session::hash(token),
            &session,
            &browser_session::hash(session_token.expose()),
            &audit,
        )
        .await;
    match used {
        Ok(Some(_)) => {}
        Ok(None) => return refuse(&st, &headers, ApiError::new(
            StatusCode::UNAUTHORIZED,
            "console_link_invalid",
            "This sign-in link is unknown, used or expired. Each link works once, for 10 minutes.",
        )),
        Err(e) => return refuse(&st, &headers, e.into()),
    }
    let mut resp = nexus_core::pages::redirect("/console", &[]);
    if let Some(v) = session_cookie(&st, session_token.expose(), ABSOLUTE_MS / 1000) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// The live session of the request, its last page noted.
async fn session(st: &AppState, headers: &HeaderMap) -> Result<ConsoleSessionRow, ApiError> {
    let token = cookie(headers, COOKIE).ok_or_else(signed_out)?;
    let s = st
        .store()
        .console_session_by_hash(&browser_session::hash(&token))
        .await?
        .ok_or_else(signed_out)?;
    let now = now_ms();
    if !usable(&s, now) {
        return Err(signed_out());
    }
    if now - s.last_seen_at > 60_000 {
        st.store().touch_console_session(&s.id, now).await?;
    }
    Ok(s)
}

/// Whether a session may still be used at `now`.
fn usable(s: &ConsoleSessionRow, now: i64) -> bool {
    s.ended_at.is_none() && now < s.expires_at && now - s.last_seen_at <= IDLE_MS
}

fn actor(s: &ConsoleSessionRow, caller: &Caller) -> Actor {
    Actor {
        name: format!("console:{}", s.operator),
        ip: caller.ip.clone(),
        user_agent: caller.user_agent.clone(),
        client_identity: caller.client_identity.clone(),
    }
}

#[derive(Serialize)]
struct PauseView {
    scope: String,
    /// The workspace of a workspace pause.
    workspace: Option<String>,
    reason: String,
    by: Option<String>,
    at: String,
}

/// What every console page shows: who is signed in, the banners.
async fn frame(st: &AppState, s: &ConsoleSessionRow) -> Result<Value, ApiError> {
    // The pauses this replica enforces (the banner says what agents meet).
    let pauses: Vec<PauseView> = st
        .pauses()
        .all()
        .into_iter()
        .map(|p| PauseView {
            workspace: match &p.scope {
                PauseScope::Operator => None,
                PauseScope::Workspace(w) => Some(w.clone()),
            },
            scope: match &p.scope {
                PauseScope::Operator => "every workspace (operator)".into(),
                PauseScope::Workspace(w) => format!("workspace {w}"),
            },
            reason: p.reason,
            by: p.paused_by,
            at: rfc3339(p.paused_at),
        })
        .collect();
    let counts = st.store().count_connections_by_status().await?;
    let need = counts
        .iter()
        .filter(|(s, _)| matches!(s.as_str(), "attention_required" | "degraded"))
        .map(|(_, n)| n)
        .sum::<i64>();
    let operator_paused = st.pauses().operator().is_some();
    Ok(json!({
        "operator": s.operator,
        "csrf": browser_session::csrf_token(&st.handshakes().state_key, CSRF_PURPOSE, &s.id),
        "pauses": pauses,
        "operator_paused": operator_paused,
        "need_person": need,
        "counts": counts.iter().map(|(s, n)| json!({"status": s, "count": n})).collect::<Vec<_>>(),
    }))
}

/// Renders `template` with the frame's values and each of `parts`'
/// (later ones win).
fn render<const N: usize>(template: &str, frame: Value, parts: [Value; N]) -> Response {
    let mut ctx = frame;
    for part in parts {
        if let (Some(c), Value::Object(e)) = (ctx.as_object_mut(), part) {
            c.extend(e);
        }
    }
    page(nexus_core::pages::render(
        super::pages::templates(),
        template,
        ctx,
    ))
}

/// `GET /console`: counts by state, pauses, the kill switch.
pub async fn overview(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let go = async {
        let s = session(&st, &headers).await?;
        frame(&st, &s).await
    };
    match go.await {
        Ok(f) => render("console_overview.html", f, []),
        Err(e) => refuse(&st, &headers, e),
    }
}

/// `?workspace=&provider=&state=`.
#[derive(Debug, Default, Deserialize)]
pub struct Filter {
    workspace: Option<String>,
    provider: Option<String>,
    state: Option<String>,
}

fn state_words(status: &str) -> &'static str {
    match status {
        "active" => "active",
        "degraded" => "degraded: some scopes fail",
        "attention_required" => "needs the person to reconnect",
        "revoked" => "revoked",
        "pending" => "waiting for consent",
        "failed" => "failed",
        _ => "unknown",
    }
}

/// The reason for a state, in words, from its error code.
fn reason_words(code: &str) -> String {
    match code {
        "invalid_grant" => "the provider no longer accepts the grant (revoked or expired)".into(),
        "refresh_interrupted" => {
            "a refresh was interrupted; most likely the provider rotated the token (a revocation looks the same)".into()
        }
        "insufficient_scope" => "the provider refuses some calls: scopes missing".into(),
        "invalid_client" | "unauthorized_client" => {
            "the provider refuses Nexus's client: fix the provider's registration".into()
        }
        "access_denied" => "the person declined consent".into(),
        "provider_unavailable" => "the provider did not answer".into(),
        other => other.replace('_', " "),
    }
}

#[derive(Serialize)]
struct Row {
    id: String,
    workspace: String,
    provider: String,
    status: String,
    state: &'static str,
    reason: Option<String>,
    failing_scopes: Vec<String>,
    last_refresh: Option<String>,
    next_refresh: Option<String>,
}

async fn row(st: &AppState, c: &ConnectionRow) -> Row {
    let provider = match st.registry().get(&c.provider_id).await {
        Ok(p) => p.profile.name,
        Err(_) => format!("(removed provider {})", c.provider_id),
    };
    Row {
        id: c.id.clone(),
        workspace: c.workspace_id.clone(),
        provider,
        status: c.status.as_str().to_string(),
        state: state_words(c.status.as_str()),
        reason: c
            .error_code
            .as_deref()
            .filter(|_| c.status.as_str() != "active")
            .map(reason_words),
        failing_scopes: parse_json_list(&c.failing_scopes),
        last_refresh: c.last_success_at.map(rfc3339),
        next_refresh: c.next_refresh_at.map(rfc3339),
    }
}

fn nonempty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

/// `GET /console/connections`: filtered by workspace, provider (name) and
/// state.
pub async fn connections(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(f): Query<Filter>,
) -> Response {
    let go = async {
        let s = session(&st, &headers).await?;
        let provider_id = match nonempty(&f.provider) {
            Some(name) => match st.registry().find(name).await {
                Ok(p) => Some(p.row.id),
                // No such provider: nothing matches.
                Err(_) => Some(String::from("-")),
            },
            None => None,
        };
        let found = st
            .store()
            .find_connections(
                nonempty(&f.workspace),
                provider_id.as_deref(),
                nonempty(&f.state),
                200,
            )
            .await?;
        let mut rows = Vec::with_capacity(found.len());
        for c in &found {
            rows.push(row(&st, c).await);
        }
        Ok::<_, ApiError>((frame(&st, &s).await?, rows))
    };
    match go.await {
        Ok((fr, rows)) => render(
            "console_connections.html",
            fr,
            [
                json!({"rows": rows, "filter": {"workspace": f.workspace, "provider": f.provider, "state": f.state},
                   "states": ["active", "degraded", "attention_required", "revoked", "pending", "failed"]}),
            ],
        ),
        Err(e) => refuse(&st, &headers, e),
    }
}

async fn connection_page(
    st: &AppState,
    s: &ConsoleSessionRow,
    id: &str,
    extra: Value,
) -> Result<Response, ApiError> {
    let c = st.store().get_connection(id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "connection_not_found",
            "no such connection",
        )
    })?;
    let timeline = st
        .store()
        .query_audit(&AuditFilter {
            connection_id: Some(c.id.clone()),
            limit: 50,
            ..Default::default()
        })
        .await?;
    let fr = frame(st, s).await?;
    Ok(render(
        "console_connection.html",
        fr,
        [json!({"c": row(st, &c).await, "timeline": timeline}), extra],
    ))
}

/// `GET /console/connections/{id}`.
pub async fn connection(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let go = async {
        let s = session(&st, &headers).await?;
        connection_page(&st, &s, &id, json!({})).await
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

/// A checked form post: its session and fields.
async fn post(
    st: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(ConsoleSessionRow, super::pages::Form), ApiError> {
    let s = session(st, headers).await?;
    let form = super::pages::Form::parse(body)?;
    let csrf = form.get("csrf").unwrap_or_default();
    if !browser_session::csrf_ok(&st.handshakes().state_key, CSRF_PURPOSE, &s.id, csrf) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "csrf_failed",
            "the form was not submitted from its own page; reload the page",
        ));
    }
    Ok((s, form))
}

fn back(to: &str) -> Response {
    nexus_core::pages::redirect(to, &[])
}

/// `POST /console/connections/{id}/{action}`: `refresh`, `revoke` (with
/// `confirm=yes`) or `reconnect-link` (a connect-portal link for the
/// person, shown once on the page).
pub async fn connection_action(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let go = async {
        let (s, fields) = post(&st, &headers, &body).await?;
        let who = actor(&s, &caller);
        let c = st.store().get_connection(&id).await?.ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "connection_not_found",
                "no such connection",
            )
        })?;
        match action.as_str() {
            "refresh" => {
                let outcome = st.tokens().token(&c.id, true).await;
                let audit = AuditEvent::new("console.refresh_requested")
                    .actor(who.name.clone())
                    .by(&who)
                    .connection(c.id.clone())
                    .workspace(c.workspace_id.clone())
                    .detail(json!({"ok": outcome.is_ok()}));
                let _ = st.audit().record(audit).await;
                let note = match outcome {
                    Ok(_) => "Refreshed.".to_string(),
                    Err(e) => format!("Refresh refused: {}", ApiError::from(e).message),
                };
                connection_page(&st, &s, &c.id, json!({"note": note, "posted": true})).await
            }
            "revoke" => {
                if fields.get("confirm") != Some("yes") {
                    return connection_page(
                        &st,
                        &s,
                        &c.id,
                        json!({"note": "Not revoked: tick the box to confirm.", "posted": true}),
                    )
                    .await;
                }
                st.tokens().refresher().revoke(&c.id, &who).await?;
                Ok(back(&format!("/console/connections/{}", c.id)))
            }
            "reconnect-link" => {
                let made = crate::portal::Portal::new(st.store(), &st.handshakes().state_key)
                    .create(
                        &c.workspace_id,
                        Some(vec![c.provider_id.clone()]),
                        None,
                        None,
                        &st.config().base_url,
                        &who,
                    )
                    .await?;
                connection_page(
                    &st,
                    &s,
                    &c.id,
                    json!({"reconnect_url": made.url.expose(), "reconnect_expires": made.expires_at, "posted": true}),
                )
                .await
            }
            _ => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such action",
            )),
        }
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

/// `POST /console/pause`: `action=pause` with a `reason` and
/// `confirm=yes`, or `action=resume` (the operator pause);
/// `action=pause_workspace` with a `workspace`, a `reason` and
/// `confirm=yes`, or `action=resume_workspace` with a `workspace`.
pub async fn pause(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let go = async {
        let (s, fields) = post(&st, &headers, &body).await?;
        let who = actor(&s, &caller);
        let workspace = || {
            super::pauses::workspace(
                fields
                    .get("workspace")
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            )
        };
        // A pause needs its reason and the ticked box; a resume neither.
        let confirmed_reason = || {
            let reason = super::pauses::reason(fields.get("reason").map(str::to_string), true)?
                .unwrap_or_default();
            if fields.get("confirm") != Some("yes") {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    "Not paused: tick the box to confirm.",
                ));
            }
            Ok(reason)
        };
        match fields.get("action") {
            Some("pause") => {
                let reason = confirmed_reason()?;
                st.pauses()
                    .pause(PauseScope::Operator, reason, &who)
                    .await?;
            }
            Some("resume") => {
                st.pauses().resume(PauseScope::Operator, &who).await?;
            }
            Some("pause_workspace") => {
                let scope = workspace()?;
                let reason = confirmed_reason()?;
                st.pauses().pause(scope, reason, &who).await?;
            }
            Some("resume_workspace") => {
                st.pauses().resume(workspace()?, &who).await?;
            }
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    "action must be pause, resume, pause_workspace or resume_workspace",
                ))
            }
        }
        Ok(back("/console"))
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

/// `POST /console/sign-out`.
pub async fn sign_out(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let go = async {
        let (s, _) = post(&st, &headers, &body).await?;
        let who = actor(&s, &caller);
        let audit = AuditEvent::new("console.signed_out")
            .actor(who.name.clone())
            .by(&who)
            .detail(json!({"session_id": s.id}));
        st.store()
            .end_console_session(&s.id, now_ms(), &audit)
            .await?;
        let mut resp = super::pages::message(StatusCode::OK, "Console", "You are signed out.", &[]);
        if let Some(v) = session_cookie(&st, "", 0) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
        Ok::<_, ApiError>(resp)
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

#[derive(Serialize)]
struct ProviderRow {
    id: String,
    name: String,
    /// The name, percent-encoded for a query string.
    query: String,
    auth_type: &'static str,
    secret_set: bool,
}

#[derive(Serialize)]
struct TemplateOption {
    id: &'static str,
    name: &'static str,
    auth: &'static str,
    placeholders: Vec<&'static str>,
}

/// The providers page: the list and the catalogue form (`form` refills
/// it after a refusal; never the secret).
async fn providers_page(
    st: &AppState,
    s: &ConsoleSessionRow,
    extra: Value,
) -> Result<Response, ApiError> {
    let providers: Vec<ProviderRow> = st
        .registry()
        .list()
        .await?
        .iter()
        .map(|p| ProviderRow {
            id: p.row.id.clone(),
            name: p.profile.name.clone(),
            query: url::form_urlencoded::byte_serialize(p.profile.name.as_bytes()).collect(),
            auth_type: p.profile.auth_type.as_str(),
            secret_set: p.client_secret_set(),
        })
        .collect();
    let templates: Vec<TemplateOption> = crate::registry::catalogue::all()
        .map_err(|e| ApiError::internal(&e))?
        .iter()
        .map(|t| TemplateOption {
            id: &t.id,
            name: &t.name,
            auth: t.auth_type(),
            placeholders: t.placeholders.iter().map(|p| p.name.as_str()).collect(),
        })
        .collect();
    let fr = frame(st, s).await?;
    Ok(render(
        "console_providers.html",
        fr,
        [
            json!({"providers": providers, "templates": templates, "form": {},
                "blank_profile": BLANK_PROFILE}),
            extra,
        ],
    ))
}

/// `GET /console/providers`.
pub async fn providers(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let go = async {
        let s = session(&st, &headers).await?;
        let notice = q
            .get("added")
            .map(|name| format!("Added {name}. Register its redirect URI with the provider."));
        providers_page(&st, &s, json!({"notice": notice})).await
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

/// `POST /console/providers`: a provider from a catalogue template
/// (`template`, `name`, `placeholders` as NAME=VALUE lines, `client_id`,
/// `client_secret`). A refusal shows the form again with the reason, never
/// the secret.
pub async fn add_provider(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let go = async {
        let (s, form) = post(&st, &headers, &body).await?;
        let who = actor(&s, &caller);
        let attempt = async {
            let t = crate::registry::catalogue::get(form.get("template").unwrap_or_default())
                .map_err(|e| e.to_string())?;
            let mut values = std::collections::BTreeMap::new();
            for line in form.get("placeholders").unwrap_or_default().lines() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let (k, v) = line
                    .split_once('=')
                    .ok_or_else(|| format!("placeholder line '{line}' is not NAME=VALUE"))?;
                values.insert(k.trim().to_string(), v.trim().to_string());
            }
            let mut overrides = serde_json::Map::new();
            for (field, key) in [
                ("name", "name"),
                ("client_id", "client_id"),
                ("client_secret", "client_secret"),
            ] {
                if let Some(v) = form.get(field) {
                    overrides.insert(key.into(), json!(v.trim()));
                }
            }
            let profile = t.render(&values, &overrides).map_err(|e| e.to_string())?;
            let name = profile["name"].as_str().unwrap_or_default().to_string();
            st.registry()
                .create(json!({ "profile": profile }), &who)
                .await
                .map_err(|e| ApiError::from(e).message)?;
            Ok::<_, String>(name)
        };
        match attempt.await {
            Ok(name) => Ok(back(&format!(
                "/console/providers?added={}",
                url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()
            ))),
            Err(reason) => {
                let refill = json!({
                    "template": form.get("template"),
                    "name": form.get("name"),
                    "placeholders": form.get("placeholders"),
                    "client_id": form.get("client_id"),
                });
                providers_page(&st, &s, json!({"error": reason, "form": refill})).await
            }
        }
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

/// `?type=&connection=&limit=&before=`.
#[derive(Debug, Default, Deserialize)]
pub struct AuditQuery {
    #[serde(rename = "type")]
    event_type: Option<String>,
    connection: Option<String>,
    limit: Option<String>,
    before: Option<String>,
}

/// `GET /console/audit`: newest first, filtered by type and connection,
/// a page at a time (`before` = the last sequence number shown).
pub async fn audit(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Response {
    let go = async {
        let s = session(&st, &headers).await?;
        let limit = nonempty(&q.limit)
            .map(|v| {
                v.parse::<i64>()
                    .ok()
                    .filter(|n| (5..=200).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request("invalid_request", "limit must be from 5 to 200")
                    })
            })
            .transpose()?
            .unwrap_or(50);
        let before_id = nonempty(&q.before)
            .map(|v| {
                v.parse::<i64>().map_err(|_| {
                    ApiError::bad_request("invalid_request", "before must be an event number")
                })
            })
            .transpose()?;
        let events = st
            .store()
            .query_audit(&AuditFilter {
                event_type: nonempty(&q.event_type).map(str::to_string),
                connection_id: nonempty(&q.connection).map(str::to_string),
                before_id,
                limit,
                ..Default::default()
            })
            .await?;
        // A full page may have more behind it.
        let older = (events.len() as i64 == limit).then(|| {
            let mut u = url::Url::parse("http://console/console/audit")
                .unwrap_or_else(|_| unreachable!("a constant URL parses"));
            {
                let mut qp = u.query_pairs_mut();
                if let Some(t) = nonempty(&q.event_type) {
                    qp.append_pair("type", t);
                }
                if let Some(c) = nonempty(&q.connection) {
                    qp.append_pair("connection", c);
                }
                qp.append_pair("limit", &limit.to_string());
                if let Some(last) = events.last() {
                    qp.append_pair("before", &last.id.to_string());
                }
            }
            format!("{}?{}", u.path(), u.query().unwrap_or_default())
        });
        // Detail as one line of JSON (escaped by the template like any text).
        let events: Vec<Value> = events
            .iter()
            .map(|e| {
                let mut v = json!(e);
                v["detail"] = json!(e.detail.to_string());
                v
            })
            .collect();
        let fr = frame(&st, &s).await?;
        Ok::<_, ApiError>(render(
            "console_audit.html",
            fr,
            [json!({"events": events, "older": older,
                   "filter": {"type": q.event_type, "connection": q.connection, "limit": limit}})],
        ))
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

async fn agent_keys_page(
    st: &AppState,
    s: &ConsoleSessionRow,
    extra: Value,
) -> Result<Response, ApiError> {
    let keys = st.agent_keys().list().await?;
    let fr = frame(st, s).await?;
    Ok(render(
        "console_agent_keys.html",
        fr,
        [json!({"keys": keys}), extra],
    ))
}

/// `GET /console/agent-keys`.
pub async fn agent_keys(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let go = async {
        let s = session(&st, &headers).await?;
        agent_keys_page(&st, &s, json!({})).await
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

/// `POST /console/agent-keys` (`name`, `workspaces`): the new key is shown
/// on the answer, once.
pub async fn create_agent_key(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let go = async {
        let (s, form) = post(&st, &headers, &body).await?;
        let who = actor(&s, &caller);
        let workspaces: Vec<String> = form
            .get("workspaces")
            .unwrap_or_default()
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect();
        let made = st
            .agent_keys()
            .create(
                crate::registry::agent_keys::NewAgentKey {
                    name: form.get("name").unwrap_or_default().to_string(),
                    workspaces,
                },
                &who,
            )
            .await;
        match made {
            Ok((view, key)) => {
                agent_keys_page(
                    &st,
                    &s,
                    json!({"new_key": {"name": view.name, "key": key.expose()}}),
                )
                .await
            }
            Err(e) => agent_keys_page(&st, &s, json!({"error": ApiError::from(e).message})).await,
        }
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

/// `POST /console/agent-keys/{id}/revoke` (with `confirm=yes`).
pub async fn revoke_agent_key(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let go = async {
        let (s, form) = post(&st, &headers, &body).await?;
        if form.get("confirm") != Some("yes") {
            return agent_keys_page(
                &st,
                &s,
                json!({"error": "Not revoked: tick the box beside the key to confirm."}),
            )
            .await;
        }
        st.agent_keys().revoke(&id, &actor(&s, &caller)).await?;
        Ok(back("/console/agent-keys"))
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

/// `GET /console/live.js`: the pages' one script (live updates).
pub async fn script() -> Response {
    let mut resp = (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../pages/console.js"),
    )
        .into_response();
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// How long a burst of changes is gathered into one update.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(250);
/// Rows sent in one update at most (a bigger burst: the rest on the next).
const MAX_ROWS: usize = 50;
/// How often an idle stream checks that its session still stands.
const SESSION_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// One console page's stream of changes.
struct Live {
    st: AppState,
    token_hash: String,
    rx: tokio::sync::broadcast::Receiver<crate::tokens::edge::EdgeEvent>,
    closing: tokio::sync::watch::Receiver<bool>,
    /// The last update was sent: the stream ends (the page reconnects).
    ended: bool,
}

/// What a burst of changes touched.
#[derive(Default)]
struct Burst {
    connections: std::collections::BTreeSet<String>,
    /// Changes were missed (the stream lagged): the page reloads.
    missed: bool,
    /// The broker may miss changes from now on: this is the last update.
    ended: bool,
}

impl Burst {
    /// Takes one event in; `false` when the stream must end.
    fn take(
        &mut self,
        got: Result<crate::tokens::edge::EdgeEvent, tokio::sync::broadcast::error::RecvError>,
    ) -> bool {
        use crate::tokens::edge::EdgeEvent;
        use tokio::sync::broadcast::error::RecvError;
        match got {
            Ok(EdgeEvent::Connection(id)) => {
                self.connections.insert(id.to_string());
                true
            }
            // A provider or a pause: the frame (sent with every update) says it.
            Ok(EdgeEvent::All) => true,
            Err(RecvError::Lagged(_)) => {
                self.missed = true;
                true
            }
            Ok(EdgeEvent::Lost) | Err(RecvError::Closed) => {
                self.ended = true;
                false
            }
        }
    }
}

impl Live {
    /// The session, if it still stands (read, not touched: an open page
    /// does not keep an idle operator signed in).
    async fn session(&self) -> Option<ConsoleSessionRow> {
        let s = self
            .st
            .store()
            .console_session_by_hash(&self.token_hash)
            .await
            .ok()??;
        usable(&s, now_ms()).then_some(s)
    }

    /// The next update: rows of the connections that changed, then the
    /// banners and counts. `None` ends the stream (signed out, shutdown,
    /// or the broker may miss changes: the page reconnects or reloads).
    async fn next(&mut self) -> Option<Vec<axum::response::sse::Event>> {
        if self.ended {
            return None;
        }
        let mut burst = Burst::default();
        loop {
            let first = tokio::select! {
                _ = self.closing.wait_for(|c| *c) => return None,
                got = tokio::time::timeout(SESSION_RECHECK, self.rx.recv()) => got,
            };
            match first {
                Err(_) => {
                    self.session().await?;
                }
                Ok(got) => {
                    if !burst.take(got) {
                        return None;
                    }
                    break;
                }
            }
        }
        let until = tokio::time::Instant::now() + COALESCE;
        while burst.connections.len() < MAX_ROWS {
            match tokio::time::timeout_at(until, self.rx.recv()).await {
                Ok(got) => {
                    if !burst.take(got) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        self.ended = burst.ended;
        let s = self.session().await?;
        let st = &self.st;
        let mut out = Vec::with_capacity(burst.connections.len() + 2);
        for id in &burst.connections {
            let Ok(Some(c)) = st.store().get_connection(id).await else {
                continue;
            };
            let r = row(st, &c).await;
            let html = nexus_core::pages::render(
                super::pages::templates(),
                "console_connection_row.html",
                json!({ "r": r }),
            );
            if let Ok(html) = html {
                out.push(
                    axum::response::sse::Event::default()
                        .event("connection")
                        .data(json!({"id": id, "status": r.status, "row": html}).to_string()),
                );
            }
        }
        let f = frame(st, &s).await.ok()?;
        let part =
            |name: &str| nexus_core::pages::render(super::pages::templates(), name, f.clone());
        // A frame that cannot be drawn is not sent: empty banners would hide a pause.
        if let (Ok(banners), Ok(counts)) =
            (part("console_banners.html"), part("console_counts.html"))
        {
            out.push(
                axum::response::sse::Event::default()
                    .event("frame")
                    .data(json!({"banners": banners, "counts": counts}).to_string()),
            );
        }
        if burst.missed {
            out.push(
                axum::response::sse::Event::default()
                    .event("stale")
                    .data("{}"),
            );
        }
        Some(out)
    }
}

/// `GET /console/events`: server-sent events for the open page while its
/// session stands, from the broker's change stream (each replica hears
/// every change: the same notifications its token cache follows).
pub async fn events(State(st): State<AppState>, headers: HeaderMap) -> Response {
    use futures_util::StreamExt as _;
    if let Err(e) = session(&st, &headers).await {
        return refuse(&st, &headers, e);
    }
    if !st.tokens().hears_every_change() {
        // The page falls back to reloading until this replica hears again.
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "changes_unavailable",
            "this broker cannot hear every change right now; the page reloads instead",
        )
        .retry_after(5)
        .into_response();
    }
    let token_hash = cookie(&headers, COOKIE)
        .map(|t| browser_session::hash(&t))
        .unwrap_or_default();
    let edge = st.tokens().edge().clone();
    let live = Live {
        st,
        token_hash,
        rx: edge.subscribe(),
        closing: edge.closing(),
        ended: false,
    };
    let updates = futures_util::stream::unfold(live, |mut l| async move {
        let batch = l.next().await?;
        Some((batch, l))
    })
    .flat_map(|batch| {
        futures_util::stream::iter(batch.into_iter().map(Ok::<_, std::convert::Infallible>))
    });
    axum::response::sse::Sse::new(updates)
        .keep_alive(
            axum::response::sse::KeepAlive::new().interval(std::time::Duration::from_secs(15)),
        )
        .into_response()
}

/// What the "add from a profile" form starts with.
const BLANK_PROFILE: &str = r#"{
  "name": "example",
  "auth_type": "oauth2",
  "client_id": "",
  "issuer": "https://id.example.com",
  "enable_discovery": true,
  "scopes": ["openid", "email", "offline_access"]
}"#;

/// A profile typed into a form: a JSON object, with the form's secret
/// field put in (never echoed back).
fn typed_profile(
    text: &str,
    secret: Option<&str>,
    remove_secret: bool,
) -> Result<serde_json::Map<String, Value>, String> {
    let mut obj = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => o,
        Ok(_) => return Err("the profile must be a JSON object ({...})".into()),
        Err(e) => return Err(format!("the profile is not JSON: {e}")),
    };
    if obj.contains_key("client_secret") {
        return Err("put the client secret in its own field, not in the profile".into());
    }
    match (secret, remove_secret) {
        (Some(_), true) => {
            return Err("either a new client secret or removing it, not both".into());
        }
        (Some(s), false) => {
            obj.insert("client_secret".into(), json!(s));
        }
        (None, true) => {
            obj.insert("client_secret".into(), Value::Null);
        }
        (None, false) => {}
    }
    Ok(obj)
}

/// `POST /console/providers/new`: a provider from a typed profile.
pub async fn add_profile(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let go = async {
        let (s, form) = post(&st, &headers, &body).await?;
        let who = actor(&s, &caller);
        let text = form.get("profile").unwrap_or_default();
        let attempt = async {
            let obj = typed_profile(text, form.get("client_secret"), false)?;
            let name = obj
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            st.registry()
                .create(json!({ "profile": obj }), &who)
                .await
                .map_err(|e| ApiError::from(e).message)?;
            Ok::<_, String>(name)
        };
        match attempt.await {
            Ok(name) => Ok(back(&format!(
                "/console/providers?added={}",
                url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()
            ))),
            Err(reason) => {
                providers_page(
                    &st,
                    &s,
                    json!({"profile_error": reason, "profile_draft": text}),
                )
                .await
            }
        }
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

async fn provider_page(
    st: &AppState,
    s: &ConsoleSessionRow,
    id: &str,
    extra: Value,
) -> Result<Response, ApiError> {
    let p = st.registry().get(id).await?;
    let redirect_uri =
        (!p.profile.auth_type.is_static()).then(|| st.handshakes().redirect_uri_for(&p));
    let profile_json = serde_json::to_string_pretty(&p.profile.public_json()).unwrap_or_default();
    let fr = frame(st, s).await?;
    Ok(render(
        "console_provider.html",
        fr,
        [
            json!({
                "p": {
                    "id": p.row.id,
                    "name": p.profile.name,
                    "query": url::form_urlencoded::byte_serialize(p.profile.name.as_bytes()).collect::<String>(),
                    "auth_type": p.profile.auth_type.as_str(),
                    "version": p.row.version,
                    "secret_set": p.client_secret_set(),
                    "redirect_uri": redirect_uri,
                },
                "profile_json": profile_json,
            }),
            extra,
        ],
    ))
}

/// `GET /console/providers/{id}`: a provider, and its profile to edit.
pub async fn provider(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let go = async {
        let s = session(&st, &headers).await?;
        let notice = q.contains_key("saved").then_some("Saved.");
        provider_page(&st, &s, &id, json!({ "notice": notice })).await
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

/// `POST /console/providers/{id}`: `profile` (JSON), `version` (the one
/// the page showed: a change made since is refused, not overwritten),
/// `client_secret` (write-only) or `remove_secret=yes`.
pub async fn edit_provider(
    State(st): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let go = async {
        let (s, form) = post(&st, &headers, &body).await?;
        let who = actor(&s, &caller);
        let text = form.get("profile").unwrap_or_default();
        let attempt = async {
            let version = form
                .get("version")
                .and_then(|v| v.parse::<i64>().ok())
                .ok_or("the form has no version: reload the page")?;
            let obj = typed_profile(
                text,
                form.get("client_secret"),
                form.get("remove_secret") == Some("yes"),
            )?;
            st.registry()
                .replace_if(&id, json!({ "profile": obj }), &who, Some(version))
                .await
                .map_err(|e| ApiError::from(e).message)?;
            Ok::<_, String>(())
        };
        match attempt.await {
            Ok(()) => Ok(back(&format!("/console/providers/{id}?saved=1"))),
            Err(reason) => {
                provider_page(&st, &s, &id, json!({"error": reason, "profile_json": text})).await
            }
        }
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

/// `GET /console/webhooks`: endpoints and their recent deliveries.
pub async fn webhooks(
    State(st): State<AppState>,
    Query(q): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let go = async {
        let s = session(&st, &headers).await?;
        let notice = q
            .contains_key("retried")
            .then_some("Retrying now: the delivery is pending again.");
        webhooks_page(&st, &s, json!({ "notice": notice })).await
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

async fn webhooks_page(
    st: &AppState,
    s: &ConsoleSessionRow,
    extra: Value,
) -> Result<Response, ApiError> {
    let mut endpoints = Vec::new();
    for e in st.webhooks().list().await.map_err(ApiError::from)? {
        let deliveries = st
            .webhooks()
            .deliveries(&e.id, 20)
            .await
            .map_err(ApiError::from)?;
        let mut v = json!(e);
        v["url"] = json!(shown_url(&e.url));
        v["deliveries"] = json!(deliveries);
        endpoints.push(v);
    }
    let fr = frame(st, s).await?;
    Ok(render(
        "console_webhooks.html",
        fr,
        [json!({ "endpoints": endpoints }), extra],
    ))
}

/// A webhook URL as the page shows it: some receivers put their secret in
/// the path (`hooks.example.com/services/T0/B0/<secret>`), so long path
/// segments show only their last four characters, and no query.
fn shown_url(raw: &str) -> String {
    let Ok(u) = url::Url::parse(raw) else {
        return "(unreadable URL)".into();
    };
    let path: Vec<String> = u
        .path()
        .split('/')
        .map(|seg| {
            let chars: Vec<char> = seg.chars().collect();
            if chars.len() > 16 {
                format!("…{}", chars[chars.len() - 4..].iter().collect::<String>())
            } else {
                seg.to_string()
            }
        })
        .collect();
    format!(
        "{}{}{}",
        u.origin().ascii_serialization(),
        path.join("/"),
        if u.query().is_some() { "?…" } else { "" }
    )
}

/// `POST /console/webhooks/{id}/retry` (`message_id`): a given-up
/// delivery once more, now.
pub async fn retry_delivery(
    State(st): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let go = async {
        let (s, form) = post(&st, &headers, &body).await?;
        let who = actor(&s, &caller);
        match st
            .webhooks()
            .retry(&id, form.get("message_id").unwrap_or_default(), &who)
            .await
        {
            Ok(()) => Ok(back("/console/webhooks?retried=1")),
            Err(e) => {
                let e = ApiError::from(e);
                webhooks_page(&st, &s, json!({ "error": e.message })).await
            }
        }
    };
    go.await.unwrap_or_else(|e| refuse(&st, &headers, e))
}

#[cfg(test)]
mod tests {
    #[test]
    fn webhook_urls_show_no_secret_in_their_path() {
        assert_eq!(
            super::shown_url(
                "https://hooks.example.com/services/T000/B000/XXXXsecretXXXXXXXXXXabcd?x=1"
            ),
            "https://hooks.example.com/services/T000/B000/…abcd?…"
        );
        assert_eq!(
            super::shown_url("http://127.0.0.1:9000/hook"),
            "http://127.0.0.1:9000/hook"
        );
    }
}
