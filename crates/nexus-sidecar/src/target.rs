//! Where a request goes: the route named by its first path segment, and the
//! upstream URI built from the route's fixed scheme and host. Nothing the
//! agent sends can change the host: absolute-form targets and `CONNECT` are
//! refused, `Host` is replaced, and paths that could climb out of the
//! route's base path (dot segments, encoded slashes or backslashes, at any
//! depth of percent-encoding) are refused.

use axum::http::{Method, StatusCode, Uri, Version};

use crate::error::SidecarError;
use crate::routes::{Route, Routes};

fn refused(code: &'static str, message: impl Into<String>) -> SidecarError {
    SidecarError::new(StatusCode::BAD_REQUEST, code, message)
}

/// The route a request names, and the rest of its path (raw, as sent).
/// HTTP/2 requests always carry a scheme and authority (their `Host`); in
/// HTTP/1 an absolute target is a proxy request, refused.
pub fn split<'r, 'p>(
    routes: &'r Routes,
    method: &Method,
    version: Version,
    uri: &'p Uri,
) -> Result<(&'r Route, &'p str), SidecarError> {
    if method == Method::CONNECT {
        return Err(SidecarError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "not_a_proxy",
            "the sidecar is not an open proxy: call http://127.0.0.1:PORT/<route>/<path>",
        ));
    }
    if version < Version::HTTP_2 && (uri.scheme().is_some() || uri.authority().is_some()) {
        return Err(refused(
            "absolute_target_refused",
            "absolute request targets are refused: the route decides the host; call /<route>/<path>",
        ));
    }
    let path = uri.path();
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let (name, rest) = match trimmed.find('/') {
        Some(i) => (&trimmed[..i], &trimmed[i..]),
        None => (trimmed, ""),
    };
    let route = routes.get(name).ok_or_else(|| {
        SidecarError::new(
            StatusCode::NOT_FOUND,
            "unknown_route",
            format!(
                "no route named '{}': the first path segment names a route of the routes file",
                nexus_core::text::printable(name, 64)
            ),
        )
        .with("routes", routes.names())
    })?;
    Ok((route, rest))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// One round of percent-decoding (invalid escapes kept as they are).
fn decode_once(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(h * 16 + l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// Whether a path segment could mean something else to a server that
/// decodes it (once or more): a dot segment, a slash, a backslash, a NUL.
fn dangerous(segment: &str) -> bool {
    let b = segment.as_bytes();
    if !b.contains(&b'%') {
        // Nothing to decode: the loop below would stop at its first check.
        return b == b"." || b == b".." || b.iter().any(|&c| matches!(c, b'/' | b'\\' | 0));
    }
    let mut s = b.to_vec();
    for _ in 0..4 {
        if s == b"." || s == b".." || s.iter().any(|&b| matches!(b, b'/' | b'\\' | 0)) {
            return true;
        }
        let next = decode_once(&s);
        if next == s {
            return false;
        }
        s = next;
    }
    // Still changing after four rounds: nobody encodes a path like that.
    true
}

/// The upstream URI for `rest` (the path after the route name) and the
/// agent's query, without the pairs named `drop` (a credential parameter
/// the strategy will add: replaced, not merged).
pub fn upstream_uri(
    route: &Route,
    rest: &str,
    query: Option<&str>,
    drop: Option<&str>,
) -> Result<Uri, SidecarError> {
    if rest.split('/').any(dangerous) {
        return Err(refused(
            "path_refused",
            "the path has a dot segment or an encoded slash, backslash or NUL: it could leave the route's base path",
        ));
    }
    let mut target =
        String::with_capacity(route.base_path.len() + rest.len() + query.map_or(0, str::len) + 1);
    target.push_str(&route.base_path);
    // `/<route>` alone is the upstream URL itself (an MCP endpoint such as
    // `https://h/mcp` is not `https://h/mcp/`).
    if rest.is_empty() && route.base_path.is_empty() {
        target.push('/');
    } else {
        target.push_str(rest);
    }
    let kept = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|pair| !pair.is_empty())
        .filter(|pair| match drop {
            Some(name) => url::form_urlencoded::parse(pair.as_bytes())
                .next()
                .is_none_or(|(k, _)| k != name),
            None => true,
        });
    let mut separator = '?';
    for pair in kept {
        target.push(separator);
        target.push_str(pair);
        separator = '&';
    }
    let invalid = || refused("path_refused", "the path or query is not a valid URI");
    // Parts put together directly: the builder moves its whole state on
    // every step, which showed on the hot path.
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(route.scheme.clone());
    parts.authority = Some(route.authority.clone());
    parts.path_and_query = Some(
        http::uri::PathAndQuery::from_maybe_shared(axum::body::Bytes::from(target))
            .map_err(|_| invalid())?,
    );
    Uri::from_parts(parts).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Routes {
        Routes::parse(
            "[routes.api]\nupstream = \"https://api.example.com/v1/\"\nconnection = \"c\"",
        )
        .unwrap()
    }

    fn go(target: &str) -> Result<String, String> {
        let r = routes();
        let uri: Uri = target.parse().map_err(|_| "unparsable".to_string())?;
        let (route, rest) =
            split(&r, &Method::GET, Version::HTTP_11, &uri).map_err(|e| e.code().to_string())?;
        upstream_uri(route, rest, uri.query(), Some("key"))
            .map(|u| u.to_string())
            .map_err(|e| e.code().to_string())
    }

    #[test]
    fn forwards_under_the_base_path_only() {
        assert_eq!(
            go("/api/users/1?a=1&b=2").unwrap(),
            "https://api.example.com/v1/users/1?a=1&b=2"
        );
        assert_eq!(go("/api").unwrap(), "https://api.example.com/v1");
        assert_eq!(go("/api/").unwrap(), "https://api.example.com/v1/");
        assert_eq!(
            go("/api/a%20b").unwrap(),
            "https://api.example.com/v1/a%20b"
        );
        // The credential parameter the agent sent is dropped (replaced later).
        assert_eq!(
            go("/api/x?key=stolen&k=1&key%3D=2").unwrap(),
            "https://api.example.com/v1/x?k=1&key%3D=2"
        );
        assert_eq!(
            go("/api/x?ke%79=stolen").unwrap(),
            "https://api.example.com/v1/x"
        );
        assert_eq!(go("/nope/x"), Err("unknown_route".into()));
        assert_eq!(go("/"), Err("unknown_route".into()));
    }

    #[test]
    fn nothing_leaves_the_route() {
        for bad in [
            "/api/../admin",
            "/api/./x",
            "/api/%2e%2e/admin",
            "/api/%2E./admin",
            "/api/%252e%252e/admin",
            "/api/a%2fb",
            "/api/a%2Fb",
            "/api/a%5cb",
            "/api/a%00b",
            "/api/a%25252fb",
            "/api/a\\b",
        ] {
            assert_eq!(go(bad), Err("path_refused".into()), "{bad}");
        }
        assert_eq!(
            go("http://evil.example.com/api/x"),
            Err("absolute_target_refused".into())
        );
        let r = routes();
        let e = split(
            &r,
            &Method::CONNECT,
            Version::HTTP_11,
            &"/api".parse().unwrap(),
        )
        .unwrap_err();
        assert_eq!(e.code(), "not_a_proxy");
    }
}
