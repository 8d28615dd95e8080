//! Admin API guards: network allowlist and API key.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;
use nexus_core::net::ip_allowed;

/// Refuses callers outside `ALLOWED_CIDRS` (when set) with 403. A request
/// without a known peer address is refused too: fail closed.
pub async fn allow_cidrs(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let cidrs = &state.config().allowed_cidrs;
    if !cidrs.is_empty() {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let allowed = peer.is_some_and(|ip| ip_allowed(cidrs, ip));
        if !allowed {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "ip_not_allowed",
                "your address is not in ALLOWED_CIDRS",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Compares two keys in constant time. Hashing first makes the comparison
/// independent of where the keys differ and of their lengths.
pub fn keys_match(given: &[u8], expected: &[u8]) -> bool {
    let a = Sha256::digest(given);
    let b = Sha256::digest(expected);
    a.ct_eq(&b).into()
}

/// Requires `X-API-Key` to equal `API_KEY`.
pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(given) = req.headers().get("x-api-key") else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_api_key",
            "send the admin API key in X-API-Key",
        )
        .into_response();
    };
    if !keys_match(given.as_bytes(), state.config().api_key.expose().as_bytes()) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "the API key is not valid",
        )
        .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::keys_match;

    #[test]
    fn key_comparison() {
        assert!(keys_match(b"abc", b"abc"));
        assert!(!keys_match(b"abc", b"abd"));
        assert!(!keys_match(b"", b"abc"));
        assert!(!keys_match(b"abcd", b"abc"));
    }
}
