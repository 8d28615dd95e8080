//! Headers across the proxy: hop-by-hop ones end at each hop (RFC 9110
//! §7.6.1), and credentials the agent sends are dropped so the strategy's
//! own replace them (never merged).

use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use nexus_bridge::Strategy;

/// Headers that only mean something on one connection.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, and those the `Connection` header names.
/// With `upgrade`, the protocol switch (`Connection: upgrade` and
/// `Upgrade`) is kept: the next hop must see it. `TE: trailers` is kept
/// (gRPC needs it); any other `TE` goes.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most requests and answers carry none: one pass over the few headers
    // there are instead of a lookup per name.
    if !headers
        .keys()
        .any(|k| HOP_BY_HOP.contains(k) || k == header::TE)
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let upgrade_to = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let trailers_only = headers
        .get_all(header::TE)
        .iter()
        .all(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if !trailers_only {
        headers.remove(header::TE);
    }
    if let Some(to) = upgrade_to {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, to);
    }
}

/// The agent's request headers as they go upstream: no hop-by-hop header,
/// no `Host` (the upstream's is set from the route), and none of the
/// headers the strategy sets.
pub fn outbound(headers: &mut HeaderMap, upgrade: bool, strategy: &Strategy) {
    strip_hop_by_hop(headers, upgrade);
    headers.remove(header::HOST);
    headers.remove(header::AUTHORIZATION);
    match strategy.kind.as_str() {
        "header" | "hmac_payload" => {
            if let Some(name) = strategy
                .field("header_name")
                .and_then(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            {
                headers.remove(name);
            }
        }
        "aws_sigv4" => {
            for name in ["x-amz-date", "x-amz-security-token", "x-amz-content-sha256"] {
                headers.remove(name);
            }
        }
        _ => {}
    }
}

/// The upstream's response headers as they go to the agent.
pub fn inbound(headers: &mut HeaderMap, upgrade: bool) {
    strip_hop_by_hop(headers, upgrade);
    // Only the sidecar's own answers say they are (README: anything
    // without it is the upstream's own answer).
    headers.remove(crate::error::ERROR_HEADER);
}

/// Whether a request asks to switch protocols (HTTP/1.1 `Upgrade`, e.g. a
/// WebSocket handshake).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn strategy(kind: &str, config: serde_json::Value) -> Strategy {
        Strategy {
            kind: kind.into(),
            config: config.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn hop_by_hop_and_agent_credentials_are_dropped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip"),
            ("host", "evil.example.com"),
            ("authorization", "Bearer agent-made"),
            ("x-api-key", "agent-made"),
            ("proxy-authorization", "Basic x"),
            ("accept", "application/json"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        outbound(
            &mut h,
            false,
            &strategy("header", json!({"header_name": "X-Api-Key"})),
        );
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["accept"]);

        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        outbound(&mut h, true, &strategy("oauth2", json!({})));
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }
}
