//! The broker's page templates (`crates/nexus-broker/pages/`), on the
//! layout of `nexus_core::pages`, loaded once for every page handler.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use minijinja::Environment;

use super::error::ApiError;

/// Every template of the broker's pages, by file name.
const TEMPLATES: &[(&str, &str)] = &[
    ("capture.html", include_str!("../../pages/capture.html")),
    ("message.html", include_str!("../../pages/message.html")),
    ("portal.html", include_str!("../../pages/portal.html")),
    ("console.html", include_str!("../../pages/console.html")),
    (
        "console_overview.html",
        include_str!("../../pages/console_overview.html"),
    ),
    (
        "console_connections.html",
        include_str!("../../pages/console_connections.html"),
    ),
    (
        "console_connection.html",
        include_str!("../../pages/console_connection.html"),
    ),
    (
        "console_providers.html",
        include_str!("../../pages/console_providers.html"),
    ),
    (
        "console_audit.html",
        include_str!("../../pages/console_audit.html"),
    ),
    (
        "console_agent_keys.html",
        include_str!("../../pages/console_agent_keys.html"),
    ),
    (
        "console_provider.html",
        include_str!("../../pages/console_provider.html"),
    ),
    (
        "console_webhooks.html",
        include_str!("../../pages/console_webhooks.html"),
    ),
    (
        "console_banners.html",
        include_str!("../../pages/console_banners.html"),
    ),
    (
        "console_counts.html",
        include_str!("../../pages/console_counts.html"),
    ),
    (
        "console_connection_row.html",
        include_str!("../../pages/console_connection_row.html"),
    ),
];

/// The environment with every template added.
pub fn templates() -> &'static Environment<'static> {
    static PAGES: std::sync::OnceLock<Environment<'static>> = std::sync::OnceLock::new();
    PAGES.get_or_init(|| {
        let mut env = nexus_core::pages::environment();
        for (name, src) in TEMPLATES {
            // Constants of this crate; the test below parses each.
            if let Err(e) = env.add_template(name, src) {
                tracing::error!(error = %e, template = name, "a page template does not parse");
            }
        }
        env
    })
}

/// The fields of a posted form (NUL refused, as in every JSON body).
pub struct Form(Vec<(String, String)>);

impl Form {
    /// Parses `application/x-www-form-urlencoded`.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let fields: Vec<(String, String)> =
            url::form_urlencoded::parse(body).into_owned().collect();
        if fields
            .iter()
            .any(|(k, v)| k.contains('\0') || v.contains('\0'))
        {
            return Err(ApiError::bad_request(
                "invalid_request",
                "strings must not contain NUL characters",
            ));
        }
        Ok(Self(fields))
    }

    /// A field's value, when given and not empty.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

/// A page with a title and one message.
pub fn message(status: StatusCode, title: &str, text: &str, framers: &[String]) -> Response {
    message_with(status, title, text, framers, None, None)
}

/// A link a message page offers (`href` is a path on this origin).
#[derive(serde::Serialize)]
pub struct Action<'a> {
    /// Where it goes.
    pub href: &'a str,
    /// What it says.
    pub label: &'a str,
}

/// A message page with a link to act on, and a path the browser goes on to
/// at once (a same-origin navigation: `SameSite=Strict` cookies set by
/// this answer travel with it, which a redirect at the end of a cross-site
/// chain would not do).
pub fn message_with(
    status: StatusCode,
    title: &str,
    text: &str,
    framers: &[String],
    action: Option<Action<'_>>,
    refresh_to: Option<&str>,
) -> Response {
    let html = nexus_core::pages::render(
        templates(),
        "message.html",
        minijinja::context! { title => title, message => text, action => action, refresh_to => refresh_to },
    );
    match html {
        Ok(h) => nexus_core::pages::respond(status, h, &[], framers),
        Err(e) => ApiError::internal(&e).into_response(),
    }
}

/// A refusal: a page for a browser (it asked for HTML), the JSON error for
/// anything else.
pub fn refuse(headers: &HeaderMap, e: ApiError, title: &str, framers: &[String]) -> Response {
    refuse_with(headers, e, title, framers, None)
}

/// [`refuse`], the page offering `action` (what to do next).
pub fn refuse_with(
    headers: &HeaderMap,
    e: ApiError,
    title: &str,
    framers: &[String],
    action: Option<Action<'_>>,
) -> Response {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        message_with(e.status, title, &e.message, framers, action, None)
    } else {
        e.into_response()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_template_parses_and_is_listed() {
        let mut env = nexus_core::pages::environment();
        for (name, src) in super::TEMPLATES {
            env.add_template(name, src)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/pages");
        for f in std::fs::read_dir(dir).unwrap() {
            let name = f.unwrap().file_name().to_string_lossy().into_owned();
            if !name.ends_with(".html") {
                continue;
            }
            assert!(
                super::TEMPLATES.iter().any(|(n, _)| *n == name),
                "{name} is not in TEMPLATES"
            );
        }
    }
}
