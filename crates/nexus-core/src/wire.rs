//! The broker↔gateway contract, in one place: the routes a gateway calls,
//! the headers that say what it may cache, the change stream's lines, the
//! served-token report, and how a token answer is completed at serve time.
//!
//! Both sides use these items (the broker's router mounts [`routes`], the
//! gateway's client fills them in), so the two cannot drift apart.
//!
//! Caching rules, as the broker applies them:
//!
//! * **How long.** A token answer that may be kept says so in
//!   [`CACHEABLE_HEADER`]: milliseconds, never more than the broker's own
//!   remaining trust in its entry and never past the token's refresh margin.
//!   Without the header the answer must not be kept. [`EXPIRES_AT_HEADER`]
//!   lets the gateway recompute `expires_in` at serve time ([`complete`]).
//! * **Until what.** Every change the broker's cache hears is announced on a
//!   newline-delimited JSON stream, [`routes::TOKEN_CHANGES`]: first
//!   `{"type":"ready"}`, then `{"type":"connection","id":"..."}` (drop that
//!   entry), `{"type":"all"}` (drop everything) and `{"type":"ping"}` every
//!   [`PING_EVERY`] ([`ChangeLine`]). The stream ends when the broker can no
//!   longer hear every change or shuts down; a gateway then drops everything
//!   and keeps nothing until a new stream says ready.
//! * **Audit.** Tokens served from a gateway's cache are reported back
//!   ([`routes::TOKENS_ISSUED`], [`IssuedReport`]) and audited like the
//!   broker's own.

use std::time::Duration;

/// Response header: how long (ms) a gateway may keep this token answer.
pub const CACHEABLE_HEADER: &str = "x-nexus-cacheable-ms";
/// Response header: when the served token expires (unix ms), so a kept answer
/// can state `expires_in` correctly later. Absent for tokens without expiry.
pub const EXPIRES_AT_HEADER: &str = "x-nexus-expires-at-ms";
/// How often the change stream says it is alive.
pub const PING_EVERY: Duration = Duration::from_secs(5);

/// The broker routes a gateway calls, as axum path templates. The broker
/// mounts exactly these strings; the gateway fills `{id}` with [`fill`].
pub mod routes {
    /// Liveness.
    pub const HEALTH: &str = "/health";
    /// Providers, `[{id, name, auth_type}]`.
    pub const PROVIDERS: &str = "/providers";
    /// Providers grouped by auth type, with their public metadata.
    pub const PROVIDERS_METADATA: &str = "/providers/metadata";
    /// Start a handshake.
    pub const CONSENT_SPEC: &str = "/auth/consent-spec";
    /// One connection (`GET`), or its revocation (`DELETE`).
    pub const CONNECTION: &str = "/connections/{id}";
    /// A connection's strategy and usage secrets.
    pub const CONNECTION_TOKEN: &str = "/connections/{id}/token";
    /// Refresh now, then the token answer.
    pub const CONNECTION_REFRESH: &str = "/connections/{id}/refresh";
    /// An agent's report of refused scopes.
    pub const CONNECTION_SCOPE_FAILURES: &str = "/connections/{id}/scope-failures";
    /// A workspace's connections' health.
    pub const WORKSPACE_STATUS: &str = "/workspaces/{id}/connections/status";
    /// The change stream.
    pub const TOKEN_CHANGES: &str = "/tokens/changes";
    /// Tokens a gateway served from its cache.
    pub const TOKENS_ISSUED: &str = "/tokens/issued";
    /// Verify an agent key.
    pub const AGENT_KEY_VERIFY: &str = "/agent-keys/verify";
    /// Connect-portal links (the gateway's `POST /v1/connect-sessions`).
    pub const CONNECT_SESSIONS: &str = "/connect-sessions";
    /// Nexus's client ID metadata document, public: the broker serves it
    /// and the gateway forwards it (its URL under `BASE_URL` is Nexus's
    /// client id at MCP authorization servers).
    pub const CLIENT_METADATA: &str = "/auth/client-metadata.json";

    /// Every (method, route) a gateway calls, and all the broker lets its
    /// gateway credential (`GATEWAY_API_KEY`) reach: no key minting, no
    /// provider changes, no audit or webhook administration.
    pub const GATEWAY_USES: &[(&str, &str)] = &[
        ("GET", PROVIDERS_METADATA),
        ("POST", CONSENT_SPEC),
        ("GET", CONNECTION),
        ("GET", CONNECTION_TOKEN),
        ("POST", CONNECTION_REFRESH),
        ("POST", CONNECTION_SCOPE_FAILURES),
        ("GET", WORKSPACE_STATUS),
        ("GET", TOKEN_CHANGES),
        ("POST", TOKENS_ISSUED),
        ("POST", AGENT_KEY_VERIFY),
        ("POST", CONNECT_SESSIONS),
    ];
}

/// The path segments of `template` with `{id}` replaced by `id` (one
/// segment, to be percent-encoded by whoever builds the URL).
///
/// ```
/// use nexus_core::wire::{fill, routes};
/// assert_eq!(fill(routes::CONNECTION_TOKEN, "c1"), ["connections", "c1", "token"]);
/// ```
pub fn fill<'a>(template: &'static str, id: &'a str) -> Vec<&'a str> {
    template
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| if s == "{id}" { id } else { s })
        .collect()
}

/// One line of the change stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeLine {
    /// The stream hears every change from now on.
    Ready,
    /// Drop this connection's entry.
    Connection(String),
    /// Drop everything.
    All,
    /// Still alive.
    Ping,
}

impl ChangeLine {
    /// Parses one line (without its newline); `None` for a line this version
    /// does not know. Callers treat that as [`ChangeLine::All`]: an unknown
    /// event could be an invalidation.
    pub fn parse(line: &[u8]) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(line).ok()?;
        Some(match v.get("type")?.as_str()? {
            "ready" => Self::Ready,
            "connection" => Self::Connection(v.get("id")?.as_str()?.to_string()),
            "all" => Self::All,
            "ping" => Self::Ping,
            _ => return None,
        })
    }

    /// The line as sent, newline included.
    ///
    /// ```
    /// use nexus_core::wire::ChangeLine;
    /// let line = ChangeLine::Connection("c1".into()).encode();
    /// assert_eq!(ChangeLine::parse(line.strip_suffix(b"\n").unwrap()), Some(ChangeLine::Connection("c1".into())));
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Ready => b"{\"type\":\"ready\"}\n".to_vec(),
            Self::All => b"{\"type\":\"all\"}\n".to_vec(),
            Self::Ping => b"{\"type\":\"ping\"}\n".to_vec(),
            Self::Connection(id) => {
                let line = serde_json::json!({"type": "connection", "id": id});
                format!("{line}\n").into_bytes()
            }
        }
    }
}

/// Issuances a gateway served from its cache, for one connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Issued {
    /// Connection.
    pub connection_id: String,
    /// How many tokens.
    pub count: u64,
    /// First one (unix ms).
    pub first_at: i64,
    /// Last one (unix ms).
    pub last_at: i64,
}

/// The body of [`routes::TOKENS_ISSUED`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IssuedReport {
    /// Per connection.
    pub issued: Vec<Issued>,
}

/// Most entries one [`IssuedReport`] may carry.
pub const MAX_ISSUED_ENTRIES: usize = 10_000;

/// A token answer's JSON `prefix` (an open object ending in `,` or `{`)
/// closed with `"expires_in"`: the whole seconds left at `now` (unix ms).
/// Without expiry the field is left out (the v1 contract types it as a
/// number, never null). The broker and gateway caches both serve this way.
///
/// ```
/// use nexus_core::wire::complete;
/// assert_eq!(complete(b"{\"a\":1,", Some(10_500), 500), b"{\"a\":1,\"expires_in\":10}");
/// assert_eq!(complete(b"{\"a\":1,", None, 500), b"{\"a\":1}");
/// assert_eq!(complete(b"{", None, 500), b"{}");
/// ```
pub fn complete(prefix: &[u8], expires_at: Option<i64>, now: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + 24);
    out.extend_from_slice(prefix);
    match expires_at {
        Some(e) => {
            out.extend_from_slice(b"\"expires_in\":");
            out.extend_from_slice(((e - now) / 1000).max(0).to_string().as_bytes());
        }
        None if out.last() == Some(&b',') => {
            out.pop();
        }
        None => {}
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_lines_do_not_parse() {
        assert_eq!(ChangeLine::parse(b"{\"type\":\"later\"}"), None);
        assert_eq!(ChangeLine::parse(b"garbage"), None);
        for line in [
            ChangeLine::Ready,
            ChangeLine::All,
            ChangeLine::Ping,
            ChangeLine::Connection("a\"b".into()),
        ] {
            let text = line.encode();
            assert_eq!(ChangeLine::parse(&text[..text.len() - 1]), Some(line));
        }
    }

    #[test]
    fn fill_replaces_only_the_id_segment() {
        assert_eq!(
            fill(routes::WORKSPACE_STATUS, "w/1"),
            ["workspaces", "w/1", "connections", "status"]
        );
        assert_eq!(fill(routes::PROVIDERS, "x"), ["providers"]);
    }
}
