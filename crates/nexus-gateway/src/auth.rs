//! Agent keys at the gateway: taken from `Authorization: Bearer nxa_...` or
//! `X-API-Key`, verified by the broker, and trusted for a short time
//! (`key_cache_ttl`) so most calls cost no broker round trip. A revoked key
//! stops working within that time.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use hashlink::LruCache;
use nexus_core::limit::Windows;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use nexus_core::wire::routes;

use crate::broker::BrokerClient;
use crate::error::GatewayError;

/// A verified agent key.
#[derive(Debug, Clone, Deserialize)]
pub struct Agent {
    /// Key id.
    pub id: String,
    /// Key name.
    pub name: String,
    /// Workspaces it may reach (`*` = all).
    pub workspaces: Vec<String>,
}

impl Agent {
    /// Whether this key may reach `workspace`.
    pub fn may(&self, workspace: &str) -> bool {
        self.workspaces.iter().any(|w| w == "*" || w == workspace)
    }
}

/// The key a request carries, if any: `Authorization: Bearer <key>`, else
/// `X-API-Key`. The two arguments are those headers' (or gRPC metadata
/// entries') values; the second is only looked up when the first is absent.
pub fn presented_key<'a>(
    authorization: Option<&'a str>,
    x_api_key: impl FnOnce() -> Option<&'a str>,
) -> Option<&'a str> {
    if let Some(v) = authorization {
        let (scheme, rest) = v.trim().split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| rest.trim())
            .filter(|k| !k.is_empty());
    }
    x_api_key().map(str::trim).filter(|k| !k.is_empty())
}

/// The key of an HTTP request, if any.
pub fn key_of(headers: &HeaderMap) -> Option<&str> {
    // Typed header names: a lookup by `&str` parses and hashes the name on
    // every request (measurable on the warm token path, issue #14).
    static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
    let value = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    presented_key(value(&header::AUTHORIZATION), || value(&X_API_KEY))
}

fn invalid_key() -> GatewayError {
    GatewayError::unauthenticated("invalid_agent_key", "unknown or revoked agent key")
}

/// SHA-256 of a presented key.
type KeyDigest = [u8; 32];

/// Authentication failures one client address may cause per window
/// before it is refused with 429 until the window ends.
pub const MAX_FAILURES_PER_WINDOW: u32 = 30;
/// The window of [`MAX_FAILURES_PER_WINDOW`].
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Client addresses tracked at once (the oldest windows go first).
const MAX_TRACKED: usize = 100_000;

/// Verified keys, by the SHA-256 of the key (the key itself is not kept),
/// refused keys likewise, and authentication failures by client address.
pub struct KeyCache {
    broker: BrokerClient,
    ttl: Duration,
    /// Read on every request (read lock, no reordering: eviction is by
    /// insertion order, and an entry lives `ttl` anyway).
    seen: RwLock<LruCache<KeyDigest, (Arc<Agent>, Instant)>>,
    /// Keys the broker refused: a flood of made-up keys costs the broker
    /// one lookup each per `ttl`, not one per request.
    refused: Mutex<LruCache<KeyDigest, Instant>>,
    /// Failures per client address.
    failures: Windows<IpAddr>,
}

impl KeyCache {
    /// A cache trusting verifications (and refusals) for `ttl`.
    pub fn new(broker: BrokerClient, ttl: Duration) -> Self {
        Self {
            broker,
            ttl,
            seen: RwLock::new(LruCache::new(10_000)),
            refused: Mutex::new(LruCache::new(10_000)),
            failures: Windows::new(MAX_FAILURES_PER_WINDOW, FAILURE_WINDOW, MAX_TRACKED),
        }
    }

    /// Refuses a client address that failed too often lately.
    fn check_throttle(&self, peer: Option<IpAddr>) -> Result<(), GatewayError> {
        let Some(wait) = peer.and_then(|ip| self.failures.exceeded(&ip)) else {
            return Ok(());
        };
        metrics::counter!("nexus_gateway_auth_throttled_total").increment(1);
        Err(GatewayError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_auth_failures",
            "too many failed authentications from this address; retry later",
        )
        .retry_after(wait))
    }

    /// Counts a failure against `peer` and returns `e`.
    fn failed(&self, peer: Option<IpAddr>, e: GatewayError) -> GatewayError {
        metrics::counter!("nexus_gateway_auth_failures_total").increment(1);
        if let Some(ip) = peer {
            self.failures.count(ip);
        }
        e
    }

    /// The agent behind `key`, presented from `peer` (the client address,
    /// for the failure limit).
    pub async fn verify(
        &self,
        key: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<Arc<Agent>, GatewayError> {
        self.check_throttle(peer)?;
        let Some(key) = key else {
            return Err(self.failed(
                peer,
                GatewayError::unauthenticated(
                    "missing_agent_key",
                    "send an agent key as Authorization: Bearer nxa_... or X-API-Key",
                ),
            ));
        };
        // Keys are `nxa_` + 43 base64url characters: anything else is refused
        // here, without costing the broker a lookup.
        let well_formed = key.len() == 47
            && key.starts_with("nxa_")
            && key[4..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !well_formed {
            return Err(self.failed(peer, invalid_key()));
        }
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if let Some((agent, at)) = self
            .seen
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .peek(&digest)
            .cloned()
        {
            if at.elapsed() < self.ttl {
                return Ok(agent);
            }
        }
        let refused_lately = self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peek(&digest)
            .is_some_and(|at| at.elapsed() < self.ttl);
        if refused_lately {
            return Err(self.failed(peer, invalid_key()));
        }
        let reply = self
            .broker
            .post(
                self.broker.url(routes::AGENT_KEY_VERIFY, ""),
                &serde_json::json!({"key": key}),
            )
            .await?;
        match reply.status {
            s if s.is_success() => {
                let agent: Agent = serde_json::from_slice(&reply.body).map_err(|_| {
                    GatewayError::broker_unavailable("unreadable agent key verification")
                })?;
                let agent = Arc::new(agent);
                self.seen
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(digest, (agent.clone(), Instant::now()));
                Ok(agent)
            }
            StatusCode::UNAUTHORIZED
                if GatewayError::from_broker(reply.status, &reply.body).code
                    == "invalid_agent_key" =>
            {
                self.refused
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(digest, Instant::now());
                Err(self.failed(peer, invalid_key()))
            }
            s => Err(GatewayError::from_broker(s, &reply.body)),
        }
    }
}

/// The verified agent of a REST request, as an extractor: `Authorization:
/// Bearer nxa_...` or `X-API-Key`, checked (and briefly trusted) before any
/// later extractor reads the request, so an unauthenticated caller costs no
/// body read.
pub struct Authed(pub Arc<Agent>);

impl axum::extract::FromRequestParts<Arc<crate::core::Gateway>> for Authed {
    type Rejection = GatewayError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        g: &Arc<crate::core::Gateway>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        g.keys
            .verify(key_of(&parts.headers), peer)
            .await
            .map(Authed)
    }
}
