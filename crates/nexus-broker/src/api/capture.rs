//! Hosted capture pages: `GET /auth/capture` (HTML form), `GET
//! /auth/capture-schema` (JSON), `POST /auth/capture-credential` (form or JSON).
//! Public: a person's browser reaches them through the consent URL.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::extract::Caller;
use super::AppState;
use crate::browser_session::{cookie, set_cookie, SameSite};
use crate::events::audit::Actor;
use crate::handshake::capture::{typed_from_form, CaptureForm, CaptureOutcome, Field};

/// The CSRF cookie of one handshake's form: named per handshake, so two
/// forms open in one browser do not overwrite each other's cookie.
fn csrf_cookie(handshake_id: &str) -> String {
    let id: String = handshake_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect();
    format!("nexus_capture_{id}")
}

/// `?state=`.
#[derive(Deserialize)]
pub struct StateQuery {
    state: Option<String>,
}

fn need_state(q: StateQuery) -> Result<String, ApiError> {
    q.state
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request("invalid_state", "state is missing"))
}

/// One input of the form, with the value to show again after an error.
#[derive(serde::Serialize)]
struct Input<'a> {
    #[serde(flatten)]
    field: &'a Field,
    /// Secret values are never sent back to the browser, not even after an error.
    value: String,
}

fn page(
    form: &CaptureForm,
    state: &str,
    errors: &[String],
    previous: &Map<String, Value>,
) -> Result<String, ApiError> {
    let p = &form.provider.profile;
    let fields: Vec<Input<'_>> = form
        .fields
        .iter()
        .map(|f| Input {
            field: f,
            value: if f.secret {
                String::new()
            } else {
                previous
                    .get(&f.name)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            },
        })
        .collect();
    nexus_core::pages::render(
        super::pages::templates(),
        "capture.html",
        minijinja::context! {
            provider => p.name,
            description => p.description,
            errors => errors,
            state => state,
            csrf => form.csrf,
            fields => fields,
        },
    )
    .map_err(|e| ApiError::internal(&e))
}

/// The origin the browser is sent to after the form: browsers apply the
/// page's `form-action` to that redirect too.
fn return_origin(form: &CaptureForm) -> Option<String> {
    url::Url::parse(&form.handshake.return_url)
        .ok()
        .map(|u| u.origin().ascii_serialization())
        .filter(|o| o != "null")
}

/// A form page; with `csrf`, the handshake id, its token and whether the
/// cookie must be `Secure`.
fn html(
    status: StatusCode,
    body: String,
    form: &CaptureForm,
    framers: &[String],
    csrf: Option<(&str, &str, bool)>,
) -> Response {
    let back = return_origin(form);
    let targets: Vec<&str> = back.as_deref().into_iter().collect();
    let mut resp = nexus_core::pages::respond(status, body, &targets, framers);
    if let Some((handshake_id, token, secure)) = csrf {
        let set = set_cookie(
            &csrf_cookie(handshake_id),
            token,
            "/auth",
            SameSite::Strict,
            600,
            secure,
        );
        if let Some(v) = set {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
}

async fn load(st: &AppState, state: &str) -> Result<CaptureForm, ApiError> {
    st.handshakes()
        .capture_form(state)
        .await
        .map_err(ApiError::from)
}

/// `GET /auth/capture?state=`: the form.
pub async fn form(
    State(st): State<AppState>,
    Query(q): Query<StateQuery>,
) -> Result<Response, ApiError> {
    let state = need_state(q)?;
    let form = load(&st, &state).await?;
    let secure = st.config().base_url.scheme() == "https";
    Ok(html(
        StatusCode::OK,
        page(&form, &state, &[], &Map::new())?,
        &form,
        &st.config().connect_embed_origins,
        Some((&form.handshake.id, &form.csrf, secure)),
    ))
}

/// `GET /auth/capture-schema?state=`: what the form asks, as JSON.
pub async fn schema(
    State(st): State<AppState>,
    Query(q): Query<StateQuery>,
) -> Result<Json<Value>, ApiError> {
    let state = need_state(q)?;
    let form = load(&st, &state).await?;
    let p = &form.provider;
    Ok(Json(json!({
        "provider": {"id": p.row.id, "name": p.profile.name, "description": p.profile.description, "auth_type": p.profile.auth_type.as_str()},
        "connection_id": form.handshake.connection_id,
        "schema": form.schema,
        "fields": form.fields,
        "expires_at": crate::store::rfc3339(form.handshake.expires_at),
    })))
}

/// `POST /auth/capture-credential`: an HTML form post (`state`, `csrf` and the
/// fields; answered with a redirect or the form with errors), or JSON
/// `{state, credentials}` (answered with JSON).
pub async fn submit(
    State(st): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let actor = Actor {
        name: "user".into(),
        ip: caller.ip,
        user_agent: caller.user_agent,
        client_identity: caller.client_identity,
    };
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct.starts_with("application/json") {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct JsonSubmit {
            state: String,
            credentials: Map<String, Value>,
        }
        let req: JsonSubmit = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(
                "invalid_request",
                format!("body must be {{state, credentials}}: {e}"),
            )
        })?;
        // The same input guard as every other JSON body.
        if req.state.contains('\0')
            || super::extract::contains_nul(&Value::Object(req.credentials.clone()))
        {
            return Err(ApiError::bad_request(
                "invalid_request",
                "strings must not contain NUL characters",
            ));
        }
        let form = load(&st, &req.state).await?;
        return match st.handshakes().submit_capture(&form, req.credentials, &actor).await? {
            CaptureOutcome::Done(url) => Ok(Json(json!({"status": "success", "connection_id": form.handshake.connection_id, "redirect_url": url})).into_response()),
            CaptureOutcome::Invalid(errors) => Err(ApiError::bad_request("invalid_credentials", errors.join("; ")).with("errors", errors)),
        };
    }
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the form (application/x-www-form-urlencoded) or JSON {state, credentials}",
        ));
    }
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let mut raw = Map::new();
    for (k, v) in pairs {
        if v.contains('\0') {
            return Err(ApiError::bad_request(
                "invalid_request",
                "strings must not contain NUL characters",
            ));
        }
        raw.insert(k, Value::String(v));
    }
    let state = raw
        .get("state")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if state.is_empty() {
        return Err(ApiError::bad_request("invalid_state", "state is missing"));
    }
    let form = load(&st, &state).await?;
    // CSRF: the token must be this handshake's, and the same-site cookie must carry it.
    let token = raw.get("csrf").and_then(Value::as_str).unwrap_or_default();
    let cookie_ok = cookie(&headers, &csrf_cookie(&form.handshake.id)).is_some_and(|c| c == token);
    if !cookie_ok || !st.handshakes().csrf_ok(&form.handshake.id, token) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "csrf_failed",
            "the form was not submitted from its own page; open the link again",
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let base = st.config().base_url.origin().ascii_serialization();
        if origin != base {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf_failed",
                "cross-origin form submission refused",
            ));
        }
    }
    let credentials = typed_from_form(&form.fields, &raw);
    match st
        .handshakes()
        .submit_capture(&form, credentials, &actor)
        .await
    {
        Ok(CaptureOutcome::Done(url)) => Ok(nexus_core::pages::redirect(
            &url,
            &st.config().connect_embed_origins,
        )),
        Ok(CaptureOutcome::Invalid(errors)) => Ok(html(
            StatusCode::OK,
            page(&form, &state, &errors, &raw)?,
            &form,
            &st.config().connect_embed_origins,
            None,
        )),
        Err(e) => Err(e.into()),
    }
}
