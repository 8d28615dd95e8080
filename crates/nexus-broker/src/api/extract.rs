//! Request extractors whose failures are JSON API errors.

use std::net::SocketAddr;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::events::audit::Actor;

/// `Json<T>` whose rejections are JSON errors: 400 `invalid_json` for syntax,
/// 400 `invalid_request` for wrong types or missing fields, 415 for a missing
/// content type, 413 for an oversized body.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let value = match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) => v,
            Err(rej) => return Err(json_rejection(rej)),
        };
        // PostgreSQL text cannot hold NUL and SQLite would store it: refuse it
        // up front so both backends answer alike.
        if contains_nul(&value) {
            return Err(ApiError::bad_request(
                "invalid_request",
                "strings must not contain NUL characters",
            ));
        }
        serde_json::from_value(value).map(ApiJson).map_err(|e| {
            ApiError::bad_request(
                "invalid_request",
                format!("request body does not match: {e}"),
            )
        })
    }
}

/// Whether any string (or key) in `v` holds a NUL character.
pub(crate) fn contains_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(contains_nul),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || contains_nul(v)),
        _ => false,
    }
}

fn json_rejection(rej: JsonRejection) -> ApiError {
    match rej {
        JsonRejection::JsonSyntaxError(e) => ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid JSON: {}", e.body_text()),
        ),
        JsonRejection::JsonDataError(e) => ApiError::bad_request("invalid_request", e.body_text()),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body is larger than the limit (MAX_BODY_BYTES)",
        ),
        other => ApiError::new(other.status(), "invalid_request", other.body_text()),
    }
}

/// The caller's network address and user agent, for the audit log.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// Peer IP address.
    pub ip: Option<String>,
    /// `User-Agent` header, truncated.
    pub user_agent: Option<String>,
    /// The key the request carried (admin routes).
    pub credential: Option<super::guard::Credential>,
    /// The identity of the client certificate (mutual TLS).
    pub client_identity: Option<String>,
}

impl Caller {
    /// The actor for this caller on an admin route: `admin`, or `gateway`
    /// when it came with the gateway's key.
    pub fn admin(&self) -> Actor {
        Actor {
            name: self
                .credential
                .unwrap_or(super::guard::Credential::Admin)
                .actor()
                .into(),
            ip: self.ip.clone(),
            user_agent: self.user_agent.clone(),
            client_identity: self.client_identity.clone(),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string());
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect());
        let credential = parts.extensions.get::<super::guard::Credential>().copied();
        let client_identity = parts
            .extensions
            .get::<nexus_core::mtls::PeerIdentity>()
            .map(|p| p.0.to_string());
        Ok(Caller {
            ip,
            user_agent,
            credential,
            client_identity,
        })
    }
}
