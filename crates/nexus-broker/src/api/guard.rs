//! Admin API guards: the network allowlist (`ALLOWED_CIDRS`) and the API
//! key, as one hand-written layer ([`Guard`]) so a guarded request costs no
//! boxed future and no clone of the route's service.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::future::{Either, Ready};
use ipnet::IpNet;
use nexus_core::net::ip_allowed;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

use super::error::ApiError;
use crate::config::BrokerConfig;

/// Whether `given` hashes to `expected`, compared in constant time: hashing
/// first makes the comparison independent of where the keys differ and of
/// their lengths.
fn digest_matches(given: &[u8], expected: &[u8; 32]) -> bool {
    let a = Sha256::digest(given);
    a.ct_eq(expected).into()
}

/// Refuses callers outside `ALLOWED_CIDRS` (when set) with 403, and, for
/// admin routes, requests without `X-API-Key` equal to `API_KEY` with 401. A
/// request without a known peer address is refused when a list is set:
/// fail closed.
#[derive(Clone)]
pub struct Guard {
    cidrs: Arc<Vec<IpNet>>,
    /// SHA-256 of `API_KEY`, computed once; `None`: network check only.
    key_digest: Option<[u8; 32]>,
    /// SHA-256 of `GATEWAY_API_KEY`, when set: accepted on the routes a
    /// gateway calls only.
    gateway_digest: Option<[u8; 32]>,
}

/// Which key a guarded request carried (a request extension the audit
/// reads: `Caller::admin` names the actor after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// `API_KEY`.
    Admin,
    /// `GATEWAY_API_KEY`.
    Gateway,
}

impl Credential {
    /// The actor name audit events record.
    pub fn actor(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Gateway => "gateway",
        }
    }
}

impl Guard {
    /// Network allowlist and API key (the admin API).
    pub fn admin(config: &BrokerConfig) -> Self {
        Self {
            cidrs: Arc::new(config.allowed_cidrs.clone()),
            key_digest: Some(Sha256::digest(config.api_key.expose().as_bytes()).into()),
            gateway_digest: config
                .gateway_api_key
                .as_ref()
                .map(|k| Sha256::digest(k.expose().as_bytes()).into()),
        }
    }

    /// Network allowlist only (guarded operations routes).
    pub fn network(config: &BrokerConfig) -> Self {
        Self {
            cidrs: Arc::new(config.allowed_cidrs.clone()),
            key_digest: None,
            gateway_digest: None,
        }
    }

    /// Why `req` is refused, if it is; if not, which key it carried.
    fn refusal(&self, req: &mut Request) -> Option<ApiError> {
        if !self.cidrs.is_empty() {
            let peer = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip());
            if !peer.is_some_and(|ip| ip_allowed(&self.cidrs, ip)) {
                return Some(ApiError::new(
                    StatusCode::FORBIDDEN,
                    "ip_not_allowed",
                    "your address is not in ALLOWED_CIDRS",
                ));
            }
        }
        let expected = self.key_digest.as_ref()?;
        // A typed name: a `&str` lookup parses the name on every request.
        static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
        let Some(given) = req.headers().get(&X_API_KEY) else {
            return Some(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_api_key",
                "send the admin API key in X-API-Key",
            ));
        };
        let given = given.as_bytes();
        if digest_matches(given, expected) {
            req.extensions_mut().insert(Credential::Admin);
            return None;
        }
        if let Some(gateway) = &self.gateway_digest {
            if digest_matches(given, gateway) {
                let method = req.method().as_str();
                let allowed = req.extensions().get::<MatchedPath>().is_some_and(|p| {
                    nexus_core::wire::routes::GATEWAY_USES
                        .iter()
                        .any(|(m, r)| *m == method && *r == p.as_str())
                });
                if !allowed {
                    return Some(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "credential_not_allowed",
                        "the gateway's key reaches only the routes a gateway calls; use API_KEY",
                    ));
                }
                req.extensions_mut().insert(Credential::Gateway);
                return None;
            }
        }
        Some(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "the API key is not valid",
        ))
    }
}

impl<S> Layer<S> for Guard {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guarded {
            guard: self.clone(),
            inner,
        }
    }
}

/// A route behind a [`Guard`].
#[derive(Clone)]
pub struct Guarded<S> {
    guard: Guard,
    inner: S,
}

impl<S> Service<Request> for Guarded<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        match self.guard.refusal(&mut req) {
            Some(e) => Either::Left(futures_util::future::ready(Ok(e.into_response()))),
            None => Either::Right(self.inner.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys_match(given: &[u8], expected: &[u8]) -> bool {
        digest_matches(given, &Sha256::digest(expected).into())
    }

    #[test]
    fn key_comparison() {
        assert!(keys_match(b"abc", b"abc"));
        assert!(!keys_match(b"abc", b"abd"));
        assert!(!keys_match(b"", b"abc"));
        assert!(!keys_match(b"abcd", b"abc"));
    }
}
