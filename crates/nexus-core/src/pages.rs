//! Server-rendered pages: one template engine (minijinja, which escapes
//! every value in an `.html` template), one layout, one stylesheet served
//! from the page's own origin, and one Content-Security-Policy without
//! `unsafe-inline` for all of them.
//!
//! A part adds its templates to [`environment`] and answers with
//! [`respond`]; both servers mount [`stylesheet`] at [`STYLESHEET_PATH`].
//!
//! ```
//! let mut env = nexus_core::pages::environment();
//! env.add_template("hello.html", r#"{% extends "layout.html" %}{% block main %}<p>{{ who }}</p>{% endblock %}"#).unwrap();
//! let html = nexus_core::pages::render(&env, "hello.html", minijinja::context! { who => "<b>" }).unwrap();
//! assert!(html.contains("<p>&lt;b&gt;</p>"));
//! ```

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use minijinja::Environment;

/// Where the stylesheet is served, on the broker and on the gateway.
pub const STYLESHEET_PATH: &str = "/assets/nexus.css";
/// Where the connect portal's one script is served.
pub const SCRIPT_PATH: &str = "/assets/connect.js";

const STYLESHEET: &str = include_str!("../pages/nexus.css");
const SCRIPT: &str = include_str!("../pages/connect.js");
const LAYOUT: &str = include_str!("../pages/layout.html");

/// A page could not be rendered (a template bug, caught by the tests).
#[derive(Debug, thiserror::Error)]
#[error("page {template}: {source}")]
pub struct PageError {
    /// The template.
    pub template: String,
    /// minijinja's account.
    #[source]
    pub source: minijinja::Error,
}

/// A template environment holding the layout (`layout.html`). Templates
/// whose names end in `.html` are escaped as HTML (minijinja's default).
pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // The layout is a constant of this crate; its syntax is checked by the
    // tests, so adding it cannot fail at run time.
    if let Err(e) = env.add_template("layout.html", LAYOUT) {
        tracing::error!(error = %e, "the page layout does not parse");
    }
    env
}

/// Renders `template` with `ctx`.
pub fn render<S: serde::Serialize>(
    env: &Environment<'_>,
    template: &str,
    ctx: S,
) -> Result<String, PageError> {
    let wrap = |source| PageError {
        template: template.to_string(),
        source,
    };
    env.get_template(template)
        .map_err(wrap)?
        .render(ctx)
        .map_err(wrap)
}

/// An origin is scheme://host[:port]; anything else (a space, a quote, a
/// semicolon) could change a policy it is written into.
fn clean_origin(t: &str) -> bool {
    !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:/[]".contains(c))
}

/// The Content-Security-Policy of every page: scripts, styles and images
/// from the page's origin only, nothing inline. `form_targets` are the
/// origins a form may post to or be redirected to after posting besides
/// the page's own (browsers apply `form-action` to the redirect that
/// answers a form, e.g. the way back to an application); `frame_ancestors`
/// the origins that may show the page in a frame (none when empty).
pub fn csp(form_targets: &[&str], frame_ancestors: &[String]) -> String {
    let mut form_action = String::from("'self'");
    for t in form_targets.iter().filter(|t| clean_origin(t)) {
        form_action.push(' ');
        form_action.push_str(t);
    }
    let framers: Vec<&str> = frame_ancestors
        .iter()
        .map(String::as_str)
        .filter(|t| clean_origin(t))
        .collect();
    let frame = if framers.is_empty() {
        "'none'".to_string()
    } else {
        framers.join(" ")
    };
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'; form-action {form_action}; frame-ancestors {frame}; base-uri 'none'"
    )
}

/// The headers every page carries: the policy, no framing (but by
/// `frame_ancestors`), no caching, no referrer to other sites, no content
/// sniffing.
pub fn secure_headers(resp: &mut Response, form_targets: &[&str], frame_ancestors: &[String]) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&csp(form_targets, frame_ancestors)) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    // X-Frame-Options has no allow-list: the policy's frame-ancestors
    // decides when some origins may frame the page.
    if frame_ancestors.is_empty() {
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Not no-referrer: with it, browsers send `Origin: null` on the page's
    // own form posts, which the origin check must refuse. same-origin keeps
    // the page's URL (its signed state) from every other site.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// An HTML answer with [`secure_headers`].
pub fn respond(
    status: StatusCode,
    html: String,
    form_targets: &[&str],
    frame_ancestors: &[String],
) -> Response {
    let mut resp = (status, axum::response::Html(html)).into_response();
    secure_headers(&mut resp, form_targets, frame_ancestors);
    resp
}

/// A 303 to `to` with [`secure_headers`] (the answer to a page's form).
pub fn redirect(to: &str, frame_ancestors: &[String]) -> Response {
    let mut resp = axum::response::Redirect::to(to).into_response();
    secure_headers(&mut resp, &[], frame_ancestors);
    resp
}

/// `GET /assets/connect.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /assets/nexus.css`.
pub async fn stylesheet() -> Response {
    asset("text/css; charset=utf-8", STYLESHEET)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_and_the_layout_links_the_stylesheet() {
        let mut env = environment();
        env.add_template(
            "t.html",
            r#"{% extends "layout.html" %}{% block title %}{{ t }}{% endblock %}{% block main %}<a title="{{ t }}">{{ t }}</a>{% endblock %}"#,
        )
        .unwrap();
        let html = render(
            &env,
            "t.html",
            minijinja::context! { t => "\"><script>alert(1)</script>" },
        )
        .unwrap();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&quot;&gt;&lt;script&gt;"), "{html}");
        assert!(html.contains(&format!(
            r#"<link rel="stylesheet" href="{STYLESHEET_PATH}">"#
        )));
        assert!(!LAYOUT.contains("style=") && !LAYOUT.contains("<style"));
    }

    #[test]
    fn the_policy_allows_nothing_inline_and_only_clean_form_targets() {
        let p = csp(
            &["https://app.example.com", "https://x.example; script-src *"],
            &[],
        );
        assert!(!p.contains("unsafe-inline"));
        assert!(
            p.contains("form-action 'self' https://app.example.com;"),
            "{p}"
        );
        assert!(!p.contains("script-src *"), "{p}");
        assert!(p.contains("frame-ancestors 'none'"));
        let p = csp(&[], &["https://app.example.com".into(), "x; y".into()]);
        assert!(
            p.contains("frame-ancestors https://app.example.com;"),
            "{p}"
        );
    }
}
