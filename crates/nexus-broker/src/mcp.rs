//! OAuth-protected MCP servers, found from their URL alone, as the MCP
//! authorization specification describes: the server's 401 challenge names
//! its protected-resource metadata (RFC 9728; else the well-known
//! locations), which names its authorization server, whose metadata
//! (RFC 8414 with path insertion, then OpenID discovery) gives the
//! endpoints. Every document is checked: the resource must be this server,
//! the issuer the one asked for, PKCE S256 offered, and every URL within
//! the egress policy. The result is an OAuth provider whose tokens are
//! bound to the server (`params.resource`, RFC 8707).

use serde::Serialize;
use serde_json::{json, Value};
use url::Url;

use nexus_core::egress::Egress;
use nexus_core::outbound;

/// Why an MCP server could not be used.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// The URL is not one an MCP client may use.
    #[error("url: {0}")]
    BadUrl(String),
    /// A URL on the way is outside the egress policy.
    #[error("{0}")]
    Egress(String),
    /// A document could not be fetched or read.
    #[error("{what} at {url}: {reason}")]
    Fetch {
        /// Which document.
        what: &'static str,
        /// Where.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The server published no protected-resource metadata.
    #[error("the server names no protected-resource metadata (no resource_metadata in its 401, none at the well-known locations): is it OAuth-protected?")]
    NoMetadata,
    /// The metadata describes another resource (a server lending another's
    /// authorization server to get tokens for it).
    #[error("the protected-resource metadata is for {got}, not for this server ({expected})")]
    ResourceMismatch {
        /// This server's canonical URI.
        expected: String,
        /// What the document says.
        got: String,
    },
    /// The authorization server's metadata names another issuer.
    #[error("the authorization server metadata names issuer {got}, not {expected}")]
    IssuerMismatch {
        /// The issuer asked for.
        expected: String,
        /// The one in the document.
        got: String,
    },
    /// PKCE with S256 is not offered: the MCP specification forbids going on.
    #[error("the authorization server {0} does not offer PKCE with S256 (code_challenge_methods_supported); MCP clients must refuse it")]
    NoS256(String),
    /// A document misses something required.
    #[error("{0}")]
    Incomplete(String),
    /// Dynamic registration failed, or answered with a client we would not
    /// use (other redirect URIs: the authorization server would send
    /// people's codes elsewhere).
    #[error("dynamic client registration at {endpoint}: {reason}")]
    Registration {
        /// The registration endpoint.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
}

impl McpError {
    /// The error code of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            McpError::BadUrl(_) => "invalid_request",
            McpError::Egress(_) => "egress_refused",
            McpError::Fetch { .. } => "mcp_unreachable",
            McpError::NoMetadata => "mcp_no_metadata",
            McpError::ResourceMismatch { .. } => "mcp_resource_mismatch",
            McpError::IssuerMismatch { .. } => "mcp_issuer_mismatch",
            McpError::NoS256(_) => "mcp_pkce_unsupported",
            McpError::Incomplete(_) => "mcp_metadata_incomplete",
            McpError::Registration { .. } => "mcp_registration_refused",
        }
    }
}

/// What Nexus found about an MCP server.
#[derive(Debug, Clone, Serialize)]
pub struct McpServer {
    /// The server's canonical URI.
    pub url: String,
    /// The protected resource its metadata names, which tokens are asked
    /// for (RFC 8707 `resource`): the server's URI, or a resource above it
    /// on the same origin (metadata at the root well-known location names
    /// the origin).
    pub resource: String,
    /// Where its protected-resource metadata was.
    pub resource_metadata: String,
    /// Its authorization server (issuer).
    pub issuer: String,
    /// Where that server's metadata was.
    pub authorization_server_metadata: String,
    /// Endpoints.
    pub authorization_endpoint: String,
    /// Token endpoint.
    pub token_endpoint: String,
    /// RFC 7009 revocation, when offered.
    pub revocation_endpoint: Option<String>,
    /// RFC 7591 dynamic registration, when offered.
    pub registration_endpoint: Option<String>,
    /// Whether the server takes Client ID Metadata Documents.
    pub client_id_metadata_document_supported: bool,
    /// How clients may authenticate at its token endpoint (empty: not
    /// said, which RFC 8414 reads as `client_secret_basic`).
    pub token_endpoint_auth_methods_supported: Vec<String>,
    /// Scopes to ask for: the challenge's, else the metadata's.
    pub scopes: Vec<String>,
}

/// A client Nexus registered at an authorization server (RFC 7591).
pub struct Registered {
    /// The client id it was given.
    pub client_id: String,
    /// Its secret, if the server gave one (sealed in the vault like any
    /// client secret once the provider is stored).
    pub client_secret: Option<nexus_core::Secret<String>>,
    /// How it authenticates at the token endpoint.
    pub auth_method: String,
}

/// Registers Nexus at `server`'s authorization server (RFC 7591) as a web
/// (confidential) client whose one redirect URI is `redirect_uri`. An
/// answer that changes the redirect URIs is refused.
pub async fn register(
    http: &reqwest::Client,
    server: &McpServer,
    redirect_uri: &str,
) -> Result<Registered, McpError> {
    let endpoint = server.registration_endpoint.clone().ok_or_else(|| {
        McpError::Incomplete("the authorization server offers no dynamic registration".into())
    })?;
    let fail = |reason: String| McpError::Registration {
        endpoint: endpoint.clone(),
        reason,
    };
    let mut asked = json!({
        "client_name": "Nexus",
        "application_type": "web",
        "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": server.preferred_auth_method(),
    });
    if !server.scopes.is_empty() {
        asked["scope"] = json!(server.scopes.join(" "));
    }
    let req = http
        .post(&endpoint)
        .header("accept", "application/json")
        .json(&asked);
    let got = outbound::send(req).await.map_err(|e| fail(e.to_string()))?;
    if !got.status.is_success() {
        // The body may describe the refusal; it holds no secret of ours.
        let why = serde_json::from_slice::<Value>(&got.body)
            .ok()
            .and_then(|v| {
                v["error_description"]
                    .as_str()
                    .or(v["error"].as_str())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        return Err(fail(format!(
            "HTTP {} {}",
            got.status.as_u16(),
            nexus_core::text::printable(&why, 200)
        )));
    }
    let v: Value = serde_json::from_slice(&got.body).map_err(|_| fail("not JSON".into()))?;
    let client_id = v["client_id"]
        .as_str()
        .filter(|c| !c.is_empty() && c.len() <= 512)
        .ok_or_else(|| fail("the answer has no client_id".into()))?
        .to_string();
    if let Some(uris) = v.get("redirect_uris") {
        let same = uris
            .as_array()
            .is_some_and(|a| a.len() == 1 && a[0].as_str() == Some(redirect_uri));
        if !same {
            return Err(fail(format!(
                "the registered redirect URIs are not ours ({redirect_uri})"
            )));
        }
    }
    // An answer without the method registered what was asked (RFC 7591 §3.2.1).
    let auth_method = v["token_endpoint_auth_method"]
        .as_str()
        .unwrap_or(server.preferred_auth_method())
        .to_string();
    if !matches!(
        auth_method.as_str(),
        "client_secret_basic" | "client_secret_post" | "none"
    ) {
        return Err(fail(format!(
            "token_endpoint_auth_method {} is not one Nexus speaks",
            nexus_core::text::printable(&auth_method, 60)
        )));
    }
    let client_secret = v["client_secret"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(|s| nexus_core::Secret::new(s.to_string()));
    if auth_method != "none" && client_secret.is_none() {
        return Err(fail(format!("{auth_method} without a client_secret")));
    }
    Ok(Registered {
        client_id,
        client_secret,
        auth_method,
    })
}

impl McpServer {
    /// How a client with a secret should authenticate at the token
    /// endpoint: `client_secret_basic` unless the server takes only
    /// `client_secret_post` (or only `none`, for a public client).
    pub fn preferred_auth_method(&self) -> &'static str {
        let m = &self.token_endpoint_auth_methods_supported;
        let takes = |x: &str| m.iter().any(|y| y == x);
        if m.is_empty() || takes("client_secret_basic") {
            "client_secret_basic"
        } else if takes("client_secret_post") {
            "client_secret_post"
        } else if takes("none") {
            "none"
        } else {
            "client_secret_basic"
        }
    }

    /// The provider profile for this server with a client registered at its
    /// authorization server (`auth_method`: how the client authenticates at
    /// the token endpoint).
    pub fn profile(
        &self,
        name: &str,
        client_id: &str,
        client_secret: Option<&str>,
        auth_method: Option<&str>,
        scopes: Option<Vec<String>>,
    ) -> Value {
        // The authorization server's metadata stays the source of its
        // endpoints (re-read as discovery documents are), and its issuer is
        // what RFC 9207 `iss` in each answer is compared with.
        let mut p = json!({
            "name": name,
            "auth_type": "oauth2",
            "client_id": client_id,
            "issuer": self.issuer,
            "well_known_url": self.authorization_server_metadata,
            "enable_discovery": true,
            "auth_url": self.authorization_endpoint,
            "token_url": self.token_endpoint,
            "scopes": scopes.unwrap_or_else(|| self.scopes.clone()),
            "api_base_url": self.url,
            "description": format!("MCP server {}", self.url),
            "params": {"resource": self.resource},
        });
        if let Some(r) = &self.revocation_endpoint {
            p["revocation_url"] = json!(r);
        }
        if let Some(s) = client_secret {
            p["client_secret"] = json!(s);
        }
        // A secret is sent the way the server says it takes them, unless
        // its registration said otherwise.
        let method = match auth_method {
            Some(m) => Some(m),
            None if client_secret.is_some() => Some(self.preferred_auth_method()),
            None => None,
        };
        if let Some(m @ ("client_secret_basic" | "client_secret_post")) = method {
            p["auth_header"] = json!(m);
        }
        p
    }
}

/// The canonical URI of an MCP server (MCP authorization, "Canonical
/// Server URI"): scheme and host lower-case, no fragment, no query, no
/// trailing slash.
pub fn canonical(url: &str) -> Result<Url, McpError> {
    let mut u = Url::parse(url).map_err(|_| McpError::BadUrl("not an absolute URL".into()))?;
    if !matches!(u.scheme(), "https" | "http") || u.host().is_none() {
        return Err(McpError::BadUrl("must be an https URL with a host".into()));
    }
    if u.fragment().is_some() || u.query().is_some() {
        return Err(McpError::BadUrl(
            "must have no query and no fragment".into(),
        ));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(McpError::BadUrl("must not carry credentials".into()));
    }
    let path = u.path().trim_end_matches('/').to_string();
    u.set_path(&path);
    Ok(u)
}

/// Whether the resource `named` by protected-resource metadata covers the
/// server at `server`: the same origin, and `named`'s path is the server's
/// or a whole-segment prefix of it (`https://h` covers `https://h/mcp`,
/// `https://h/m` does not cover `https://h/mcp`).
fn covers(named: &Url, server: &Url) -> bool {
    if named.origin() != server.origin() {
        return false;
    }
    let (n, s) = (named.path().trim_end_matches('/'), server.path());
    n.is_empty() || s == n || s.strip_prefix(n).is_some_and(|r| r.starts_with('/'))
}

/// The canonical URI as text: a server at the root has no trailing slash
/// (`https://mcp.example.com`), as the specification writes it.
fn canonical_text(u: &Url) -> String {
    if u.path() == "/" {
        u.origin().ascii_serialization()
    } else {
        u.as_str().to_string()
    }
}

/// The `resource_metadata` and `scope` parameters of a `Bearer` challenge.
fn challenge(www_authenticate: &str) -> (Option<String>, Option<String>) {
    use nexus_core::challenge::{bearer_params, param};
    let params = bearer_params(www_authenticate).unwrap_or_default();
    let get = |k: &str| param(&params, k).map(str::to_string);
    (get("resource_metadata"), get("scope"))
}

/// `/.well-known/<name>` inserted before the path of `base` (RFC 8414 §3,
/// RFC 9728 §3): `https://h/a/b` → `https://h/.well-known/<name>/a/b`.
fn inserted(base: &Url, name: &str) -> String {
    let path = base.path().trim_end_matches('/');
    format!(
        "{}/.well-known/{name}{path}",
        base.origin().ascii_serialization()
    )
}

/// Finds and checks an MCP server's authorization, fetching with `http`
/// (no redirects, bounded bodies) inside `egress`.
pub async fn discover(
    http: &reqwest::Client,
    egress: &Egress,
    server_url: &str,
) -> Result<McpServer, McpError> {
    let server = canonical(server_url)?;
    let resource = canonical_text(&server);
    let check = |what: &str, url: &str| inside(egress, what, url);
    check("MCP server", &resource)?;

    // The challenge: an unauthenticated MCP request.
    let probe = http
        .post(&resource)
        .header("accept", "application/json, text/event-stream")
        .json(
            &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "nexus", "version": env!("CARGO_PKG_VERSION")}}}),
        );
    let answered = outbound::send(probe).await.map_err(|e| McpError::Fetch {
        what: "MCP server",
        url: resource.clone(),
        reason: e.to_string(),
    })?;
    let (named, challenge_scope) = if answered.status.as_u16() == 401 {
        answered
            .headers
            .get_all("www-authenticate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(challenge)
            .find(|(m, s)| m.is_some() || s.is_some())
            .unwrap_or((None, None))
    } else {
        (None, None)
    };

    // The protected-resource metadata: as named, else the well-known
    // locations (path-inserted first, then the root).
    let root = format!(
        "{}/.well-known/oauth-protected-resource",
        server.origin().ascii_serialization()
    );
    let candidates = match &named {
        Some(m) => vec![m.clone()],
        None => vec![inserted(&server, "oauth-protected-resource"), root.clone()],
    };
    let (resource_metadata, prm) =
        first_found(http, egress, "protected-resource metadata", candidates)
            .await?
            .ok_or(McpError::NoMetadata)?;
    // RFC 9728 §3.3: the resource is the one the metadata's location was
    // derived from. Only the root location, found by falling back to it,
    // describes a resource above the server (its origin, or a prefix).
    let named_resource = prm["resource"].as_str().unwrap_or_default();
    let from_root = resource_metadata == root && named.is_none();
    let covering = canonical(named_resource)
        .ok()
        .filter(|n| {
            if from_root {
                covers(n, &server)
            } else {
                canonical_text(n) == resource
            }
        })
        .map(|n| canonical_text(&n));
    let Some(protected) = covering else {
        return Err(McpError::ResourceMismatch {
            expected: resource,
            got: nexus_core::text::printable(named_resource, 200).into_owned(),
        });
    };
    let issuer = prm["authorization_servers"]
        .as_array()
        .and_then(|a| a.iter().find_map(Value::as_str))
        .ok_or_else(|| {
            McpError::Incomplete(
                "the protected-resource metadata lists no authorization_servers".into(),
            )
        })?
        .to_string();
    check("authorization server", &issuer)?;
    let issuer_url = Url::parse(&issuer)
        .map_err(|_| McpError::Incomplete(format!("authorization server {issuer} is not a URL")))?;

    // Its metadata: RFC 8414 (path inserted), then OpenID discovery with
    // the path inserted, then appended.
    let candidates = vec![
        inserted(&issuer_url, "oauth-authorization-server"),
        inserted(&issuer_url, "openid-configuration"),
        format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        ),
    ];
    let found = first_found(http, egress, "authorization server metadata", candidates).await?;
    let (authorization_server_metadata, asm) = found.ok_or_else(|| {
        McpError::Incomplete(format!(
            "authorization server {issuer} publishes no metadata (RFC 8414 or OpenID discovery)"
        ))
    })?;
    let got_issuer = asm["issuer"].as_str().unwrap_or_default();
    if got_issuer != issuer {
        return Err(McpError::IssuerMismatch {
            expected: issuer,
            got: nexus_core::text::printable(got_issuer, 200).into_owned(),
        });
    }
    let s256 = asm["code_challenge_methods_supported"]
        .as_array()
        .is_some_and(|m| m.iter().any(|x| x == "S256"));
    if !s256 {
        return Err(McpError::NoS256(issuer));
    }
    let endpoint = |k: &str| -> Result<Option<String>, McpError> {
        match asm[k].as_str() {
            None => Ok(None),
            Some(u) => {
                check(k, u)?;
                Ok(Some(u.to_string()))
            }
        }
    };
    let authorization_endpoint = endpoint("authorization_endpoint")?.ok_or_else(|| {
        McpError::Incomplete(
            "the authorization server metadata has no authorization_endpoint".into(),
        )
    })?;
    let token_endpoint = endpoint("token_endpoint")?.ok_or_else(|| {
        McpError::Incomplete("the authorization server metadata has no token_endpoint".into())
    })?;
    let scopes = match challenge_scope {
        Some(s) => s.split_whitespace().map(str::to_string).collect(),
        None => strings(&prm["scopes_supported"]),
    };
    let auth_methods = strings(&asm["token_endpoint_auth_methods_supported"]);
    Ok(McpServer {
        url: resource,
        resource: protected,
        resource_metadata,
        issuer,
        authorization_server_metadata,
        authorization_endpoint,
        token_endpoint,
        revocation_endpoint: endpoint("revocation_endpoint")?,
        registration_endpoint: endpoint("registration_endpoint")?,
        client_id_metadata_document_supported: asm["client_id_metadata_document_supported"]
            .as_bool()
            .unwrap_or(false),
        token_endpoint_auth_methods_supported: auth_methods,
        scopes,
    })
}

/// The strings of a metadata array (none when it is absent or not one).
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

/// `url` is inside the egress policy (https, or http on loopback).
fn inside(egress: &Egress, what: &str, url: &str) -> Result<(), McpError> {
    egress
        .check_url(what, url, false)
        .map_err(|e| McpError::Egress(e.to_string()))
}

/// The first of `candidates` (well-known locations, in order; repeats
/// skipped) that holds a JSON object, each checked against `egress` before
/// it is fetched; `None` when every one answers 404.
async fn first_found(
    http: &reqwest::Client,
    egress: &Egress,
    what: &'static str,
    mut candidates: Vec<String>,
) -> Result<Option<(String, Value)>, McpError> {
    candidates.dedup();
    for url in candidates {
        inside(egress, what, &url)?;
        if let Some(doc) = fetch_json(http, what, &url).await? {
            return Ok(Some((url, doc)));
        }
    }
    Ok(None)
}

/// A JSON object at `url`; `None` for a 404 (nothing published there).
async fn fetch_json(
    http: &reqwest::Client,
    what: &'static str,
    url: &str,
) -> Result<Option<Value>, McpError> {
    let fail = |reason: String| McpError::Fetch {
        what,
        url: url.to_string(),
        reason,
    };
    let got = outbound::send(http.get(url).header("accept", "application/json"))
        .await
        .map_err(|e| fail(e.to_string()))?;
    if got.status.as_u16() == 404 {
        return Ok(None);
    }
    if !got.status.is_success() {
        return Err(fail(format!("HTTP {}", got.status.as_u16())));
    }
    match serde_json::from_slice::<Value>(&got.body) {
        Ok(v @ Value::Object(_)) => Ok(Some(v)),
        _ => Err(fail("not a JSON object".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_covers_its_own_path_and_below_on_its_origin() {
        let u = |s: &str| canonical(s).unwrap();
        let server = u("https://h.example/mcp");
        assert!(covers(&u("https://h.example/mcp"), &server));
        assert!(covers(&u("https://h.example"), &server));
        assert!(covers(&u("https://h.example/"), &server));
        assert!(!covers(&u("https://h.example/m"), &server));
        assert!(!covers(&u("https://h.example/mcp/deeper"), &server));
        assert!(!covers(&u("https://other.example/mcp"), &server));
        assert!(!covers(&u("http://h.example/mcp"), &server));
        assert!(!covers(&u("https://h.example:8443/mcp"), &server));
    }

    #[test]
    fn canonical_server_uris() {
        assert_eq!(
            canonical("HTTPS://MCP.Example.com/mcp/").unwrap().as_str(),
            "https://mcp.example.com/mcp"
        );
        assert_eq!(
            canonical("https://mcp.example.com").unwrap().as_str(),
            "https://mcp.example.com/"
        );
        assert!(canonical("https://mcp.example.com/mcp#x").is_err());
        assert!(canonical("https://u:p@mcp.example.com/mcp").is_err());
        assert!(canonical("ftp://mcp.example.com").is_err());
    }

    #[test]
    fn challenges_and_well_known_locations() {
        let (m, s) = challenge(
            r#"Bearer error="invalid_token", resource_metadata="https://h/.well-known/oauth-protected-resource/mcp", scope="files:read files:write""#,
        );
        assert_eq!(
            m.as_deref(),
            Some("https://h/.well-known/oauth-protected-resource/mcp")
        );
        assert_eq!(s.as_deref(), Some("files:read files:write"));
        assert_eq!(challenge("Basic realm=x"), (None, None));
        let u = Url::parse("https://as.example.com/tenant/1").unwrap();
        assert_eq!(
            inserted(&u, "oauth-authorization-server"),
            "https://as.example.com/.well-known/oauth-authorization-server/tenant/1"
        );
        let root = Url::parse("https://as.example.com").unwrap();
        assert_eq!(
            inserted(&root, "oauth-authorization-server"),
            "https://as.example.com/.well-known/oauth-authorization-server"
        );
    }
}
