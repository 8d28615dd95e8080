//! Hosted capture pages: `GET /auth/capture` (HTML form), `GET
//! /auth/capture-schema` (JSON), `POST /auth/capture-credential` (form or JSON).
//! Public: a person's browser reaches them through the consent URL.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::extract::Caller;
use super::AppState;
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

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn input(f: &Field, previous: &Map<String, Value>) -> String {
    let name = escape(&f.name);
    let req = if f.required { " required" } else { "" };
    // Secret values are never sent back to the browser, not even after an error.
    let value = if f.secret {
        String::new()
    } else {
        previous
            .get(&f.name)
            .and_then(Value::as_str)
            .map(escape)
            .unwrap_or_default()
    };
    match (f.kind.as_str(), &f.choices) {
        (_, Some(choices)) => {
            let opts: String = choices
                .iter()
                .map(|c| {
                    let sel = if value == escape(c) { " selected" } else { "" };
                    format!("<option value=\"{0}\"{sel}>{0}</option>", escape(c))
                })
                .collect();
            format!("<select id=\"f-{name}\" name=\"{name}\"{req}><option value=\"\"></option>{opts}</select>")
        }
        ("boolean", _) => format!("<input id=\"f-{name}\" type=\"checkbox\" name=\"{name}\">"),
        ("integer" | "number", _) => {
            let step = if f.kind == "integer" { "1" } else { "any" };
            format!("<input id=\"f-{name}\" type=\"number\" step=\"{step}\" name=\"{name}\" value=\"{value}\"{req}>")
        }
        _ => {
            let t = if f.secret { "password" } else { "text" };
            format!("<input id=\"f-{name}\" type=\"{t}\" name=\"{name}\" value=\"{value}\" autocomplete=\"off\"{req}>")
        }
    }
}

fn page(
    form: &CaptureForm,
    state: &str,
    errors: &[String],
    previous: &Map<String, Value>,
) -> String {
    let p = &form.provider.profile;
    let mut rows = String::new();
    for f in &form.fields {
        let mark = if f.required {
            " <span class=\"req\" title=\"required\">*</span>"
        } else {
            ""
        };
        let help = f
            .description
            .as_deref()
            .map(|d| format!("<p class=\"help\">{}</p>", escape(d)))
            .unwrap_or_default();
        rows.push_str(&format!(
            "<div class=\"field\"><label for=\"f-{}\">{}{mark}</label>{}{help}</div>\n",
            escape(&f.name),
            escape(&f.title),
            input(f, previous)
        ));
    }
    let errs = if errors.is_empty() {
        String::new()
    } else {
        let items: String = errors
            .iter()
            .map(|e| format!("<li>{}</li>", escape(e)))
            .collect();
        format!("<div class=\"errors\" role=\"alert\"><p>Please correct:</p><ul>{items}</ul></div>")
    };
    let desc = p
        .description
        .as_deref()
        .map(|d| format!("<p>{}</p>", escape(d)))
        .unwrap_or_default();
    format!(
        "<!doctype html>
<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">
<title>Connect {name}</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;color:#1b1b1f}}
h1{{font-size:1.4rem}} .field{{margin:1rem 0}} label{{display:block;font-weight:600;margin-bottom:.3rem}}
input[type=text],input[type=password],input[type=number],select{{width:100%;padding:.5rem;box-sizing:border-box;font:inherit}}
.help{{color:#555;font-size:.9rem;margin:.3rem 0 0}} .req{{color:#b00020}}
.errors{{background:#fdecea;border:1px solid #b00020;padding:.5rem 1rem;border-radius:4px}}
button{{padding:.6rem 1.2rem;font:inherit;cursor:pointer}} footer{{color:#777;font-size:.8rem;margin-top:2rem}}
</style></head>
<body><main>
<h1>Connect {name}</h1>
{desc}
{errs}
<form method=\"post\" action=\"/auth/capture-credential\">
<input type=\"hidden\" name=\"state\" value=\"{state}\">
<input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">
{rows}<button type=\"submit\">Connect</button>
</form>
<footer>Your credentials are stored encrypted by Nexus and are never shown again.</footer>
</main></body></html>",
        name = escape(&p.name),
        state = escape(state),
        csrf = escape(&form.csrf),
    )
}

fn secure_headers(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
}

/// A form page; with `csrf`, the handshake id, its token and whether the
/// cookie must be `Secure`.
fn html(status: StatusCode, body: String, csrf: Option<(&str, &str, bool)>) -> Response {
    let mut resp = (status, Html(body)).into_response();
    secure_headers(&mut resp);
    if let Some((handshake_id, token, secure)) = csrf {
        let cookie = format!(
            "{}={token}; Path=/auth; HttpOnly; SameSite=Strict; Max-Age=600{}",
            csrf_cookie(handshake_id),
            if secure { "; Secure" } else { "" }
        );
        if let Ok(v) = HeaderValue::from_str(&cookie) {
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
        page(&form, &state, &[], &Map::new()),
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

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
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
        Ok(CaptureOutcome::Done(url)) => {
            let mut resp = Redirect::to(&url).into_response();
            secure_headers(&mut resp);
            Ok(resp)
        }
        Ok(CaptureOutcome::Invalid(errors)) => Ok(html(
            StatusCode::OK,
            page(&form, &state, &errors, &raw),
            None,
        )),
        Err(e) => Err(e.into()),
    }
}
