//! The routes file: the only places the sidecar sends anything.
//!
//! ```toml
//! [routes.calendar]
//! upstream = "https://www.googleapis.com/calendar/v3"
//! connection = "conn_123"            # or: workspace = "u1" and provider = "google"
//!
//! [[routes.calendar.scopes]]         # reported when the upstream answers 403
//! method = "POST"                    # optional: any method
//! path = "/users/me/calendarList"
//! scopes = ["https://www.googleapis.com/auth/calendar"]
//!
//! [routes.search]
//! upstream = "http://127.0.0.1:9200" # plaintext only to loopback, unless allow_plaintext
//! connection = "conn_456"
//! http2 = true                       # HTTP/2 without TLS (h2c) to this upstream, e.g. gRPC
//!
//! [routes.linear]                    # an MCP server: agents use http://127.0.0.1:PORT/linear
//! kind = "mcp"                       # as its Streamable HTTP URL
//! upstream = "https://mcp.linear.app/mcp"
//! workspace = "u1"                   # an MCP route names its workspace: a person of it
//! provider = "linear"                # is sent to consent when the connection needs one
//! ```
//!
//! The agent calls `http://127.0.0.1:PORT/<route>/<path>?<query>`; the
//! sidecar forwards to `<upstream>/<path>?<query>`.

use std::collections::BTreeMap;

use http::Method;
use nexus_bridge::ScopeHint;
use serde::Deserialize;
use url::Url;

/// Where a route's credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionRef {
    /// A connection id.
    Id(String),
    /// The workspace's connection to a provider (name or id), resolved
    /// through the gateway.
    Lookup {
        /// Workspace (user) id.
        workspace: String,
        /// Provider name or id.
        provider: String,
    },
}

/// What a route carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouteKind {
    /// Any HTTP API: the upstream's answers reach the agent as they are.
    #[default]
    Http,
    /// An MCP server (Streamable HTTP): when the connection needs a person,
    /// the agent's MCP client gets a URL-mode elicitation carrying a
    /// connect-portal link instead of an OAuth challenge (see
    /// [`crate::mcp`]).
    Mcp,
}

/// One route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Its name: the first path segment agents use.
    pub name: String,
    /// What it carries.
    pub kind: RouteKind,
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port of the upstream: the only one this route's credentials reach.
    pub authority: http::uri::Authority,
    /// The upstream's base path, without a trailing slash (may be empty).
    pub base_path: String,
    /// Its connection.
    pub connection: ConnectionRef,
    /// HTTP/2 without TLS to the upstream (prior knowledge).
    pub http2: bool,
    /// Scopes reported when the upstream refuses a request with 403.
    pub scopes: Vec<ScopeHint>,
}

/// Every route, by name.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    by_name: BTreeMap<String, Route>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    routes: BTreeMap<String, RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(default)]
    kind: Option<String>,
    upstream: String,
    connection: Option<String>,
    workspace: Option<String>,
    provider: Option<String>,
    #[serde(default)]
    http2: bool,
    #[serde(default)]
    allow_plaintext: bool,
    #[serde(default)]
    scopes: Vec<RawHint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHint {
    method: Option<String>,
    path: String,
    scopes: Vec<String>,
}

/// What is wrong with a routes file (the route is named).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoutesError {
    /// Not TOML, or an unknown field.
    #[error("not a valid routes file: {0}")]
    Syntax(String),
    /// No routes at all.
    #[error("no routes: add a [routes.NAME] table with upstream and connection")]
    Empty,
    /// One route is wrong.
    #[error("route '{route}': {reason}")]
    Route {
        /// The route.
        route: String,
        /// What is wrong.
        reason: String,
    },
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('_')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && name != "."
        && name != ".."
}

impl Routes {
    /// Parses and checks a routes file.
    pub fn parse(text: &str) -> Result<Self, RoutesError> {
        let file: File =
            toml::from_str(text).map_err(|e| RoutesError::Syntax(e.message().to_string()))?;
        if file.routes.is_empty() {
            return Err(RoutesError::Empty);
        }
        let mut by_name = BTreeMap::new();
        for (name, raw) in file.routes {
            let route = Self::check(&name, raw).map_err(|reason| RoutesError::Route {
                route: name.clone(),
                reason,
            })?;
            by_name.insert(name, route);
        }
        Ok(Self { by_name })
    }

    fn check(name: &str, raw: RawRoute) -> Result<Route, String> {
        if !valid_name(name) {
            return Err(
                "a route name is 1-64 letters, digits, '-', '_' or '.', not starting with '_'"
                    .into(),
            );
        }
        let url = Url::parse(&raw.upstream).map_err(|e| format!("upstream: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err("upstream must be an http(s) URL with a host".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "upstream must not carry user information (credentials come from Nexus)".into(),
            );
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err("upstream must not have a query or fragment".into());
        }
        if nexus_bridge::gateway::check_transport(&url, raw.allow_plaintext).is_err() {
            return Err("plaintext HTTP beyond loopback would send credentials in clear: use https, or allow_plaintext = true".into());
        }
        if raw.http2 && url.scheme() == "https" {
            return Err(
                "http2 = true is for plaintext upstreams; over TLS HTTP/2 is negotiated".into(),
            );
        }
        let kind = match raw.kind.as_deref() {
            None | Some("http") => RouteKind::Http,
            Some("mcp") => RouteKind::Mcp,
            Some(other) => {
                return Err(format!(
                    "kind '{}' is not known: use \"http\" (the default) or \"mcp\"",
                    nexus_core::text::printable(other, 32)
                ))
            }
        };
        if kind == RouteKind::Mcp && (raw.workspace.is_none() || raw.provider.is_none()) {
            return Err("an mcp route names its workspace and provider (workspace = \"...\", provider = \"...\"): a person of that workspace is sent to connect when the connection needs one".into());
        }
        let connection = match (raw.connection, raw.workspace, raw.provider) {
            (Some(id), None, None) if !id.trim().is_empty() => ConnectionRef::Id(id),
            (None, Some(workspace), Some(provider))
                if !workspace.trim().is_empty() && !provider.trim().is_empty() =>
            {
                ConnectionRef::Lookup {
                    workspace,
                    provider,
                }
            }
            _ => {
                return Err(
                    "set connection = \"<id>\", or workspace and provider (not both)".into(),
                )
            }
        };
        let authority: http::uri::Authority = url
            [url::Position::BeforeHost..url::Position::AfterPort]
            .parse()
            .map_err(|_| "upstream host is not valid".to_string())?;
        let mut scopes = Vec::new();
        for h in raw.scopes {
            let method = match h.method {
                Some(m) => Some(
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| format!("scopes: '{m}' is not a method"))?,
                ),
                None => None,
            };
            if !h.path.starts_with('/') || h.scopes.is_empty() {
                return Err(
                    "scopes: each entry needs a path starting with '/' and at least one scope"
                        .into(),
                );
            }
            scopes.push(ScopeHint {
                method,
                path_prefix: h.path,
                scopes: h.scopes,
            });
        }
        Ok(Route {
            name: name.to_string(),
            kind,
            scheme: if url.scheme() == "https" {
                http::uri::Scheme::HTTPS
            } else {
                http::uri::Scheme::HTTP
            },
            authority,
            base_path: url.path().trim_end_matches('/').to_string(),
            connection,
            http2: raw.http2,
            scopes,
        })
    }

    /// The route named `name`.
    pub fn get(&self, name: &str) -> Option<&Route> {
        self.by_name.get(name)
    }

    /// Every route.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.by_name.values()
    }

    /// Route names, for error messages.
    pub fn names(&self) -> Vec<&str> {
        self.by_name.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_routes_file_with_both_connection_forms() {
        let r = Routes::parse(
            r#"
            [routes.cal]
            upstream = "https://www.googleapis.com/calendar/v3/"
            connection = "conn_1"
            [[routes.cal.scopes]]
            method = "post"
            path = "/users"
            scopes = ["calendar"]

            [routes.local]
            upstream = "http://127.0.0.1:9200"
            workspace = "u1"
            provider = "Search"
            http2 = true
            "#,
        )
        .unwrap();
        let cal = r.get("cal").unwrap();
        assert_eq!(cal.authority.as_str(), "www.googleapis.com");
        assert_eq!(cal.base_path, "/calendar/v3");
        assert_eq!(cal.scopes[0].method, Some(Method::POST));
        let local = r.get("local").unwrap();
        assert_eq!(local.authority.as_str(), "127.0.0.1:9200");
        assert_eq!(local.base_path, "");
        assert!(local.http2);
        assert_eq!(
            local.connection,
            ConnectionRef::Lookup {
                workspace: "u1".into(),
                provider: "Search".into()
            }
        );
    }

    #[test]
    fn wrong_routes_are_named() {
        let e = |t: &str| Routes::parse(t).unwrap_err().to_string();
        assert!(e("").contains("no routes"));
        assert!(
            e("[routes.a]\nupstream = \"https://x\"\nconection = \"c\"").contains("unknown field")
        );
        let plain = e("[routes.a]\nupstream = \"http://api.example.com\"\nconnection = \"c\"");
        assert!(
            plain.contains("route 'a'") && plain.contains("plaintext"),
            "{plain}"
        );
        assert!(
            e("[routes._nexus]\nupstream = \"https://x\"\nconnection = \"c\"")
                .contains("route name")
        );
        assert!(
            e("[routes.a]\nupstream = \"https://u:p@x\"\nconnection = \"c\"")
                .contains("user information")
        );
        assert!(
            e("[routes.a]\nupstream = \"https://x\"\nconnection = \"c\"\nworkspace = \"w\"")
                .contains("not both")
        );
        assert!(e("[routes.a]\nupstream = \"https://x\"").contains("connection"));
        assert!(
            e("[routes.a]\nupstream = \"https://x?k=1\"\nconnection = \"c\"").contains("query")
        );
        assert!(
            e("[routes.a]\nkind = \"mcp\"\nupstream = \"https://x/mcp\"\nconnection = \"c\"")
                .contains("names its workspace and provider")
        );
        assert!(
            e("[routes.a]\nkind = \"ftp\"\nupstream = \"https://x\"\nconnection = \"c\"")
                .contains("kind 'ftp'")
        );
        let mcp = Routes::parse(
            "[routes.a]\nkind = \"mcp\"\nupstream = \"https://x/mcp\"\nworkspace = \"w\"\nprovider = \"p\"",
        )
        .unwrap();
        assert_eq!(mcp.get("a").unwrap().kind, RouteKind::Mcp);
    }
}
