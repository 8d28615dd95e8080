//! Answers the sidecar gives itself (never the upstream's): the JSON error
//! shape of every Nexus server, marked `x-nexus-error: <code>` so an agent
//! can tell them from the upstream's own errors.

use std::borrow::Cow;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use nexus_bridge::BridgeError;
use nexus_core::error::ErrorBody;
use serde_json::Value;

/// An answer of the sidecar's own.
#[derive(Debug, Clone)]
pub struct SidecarError(pub ErrorBody);

/// The header naming the sidecar's own errors.
pub const ERROR_HEADER: &str = "x-nexus-error";

/// Marks an answer of the sidecar's own that is not an error status (an
/// MCP elicitation), with its code for metrics and the access log. A
/// response extension, never read from headers: those an upstream sets
/// are its own (and [`crate::headers::inbound`] drops `x-nexus-error`).
#[derive(Debug, Clone, Copy)]
pub struct OwnAnswer(pub &'static str);

impl SidecarError {
    /// An error with a status, code and message.
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self(ErrorBody::new(status, code, message))
    }

    /// Adds a field to the body.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.0.context.insert(key.into(), value.into());
        self
    }

    /// Adds `Retry-After` (whole seconds, at least 1).
    pub fn retry_after(mut self, wait: Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        self.0.retry_after = Some(HeaderValue::from(secs.max(1)));
        self
    }

    /// The code, for metrics and the access log.
    pub fn code(&self) -> &str {
        &self.0.code
    }

    /// What a credential failure means to the agent. Connections that need
    /// a person are answered without any upstream call.
    pub fn from_bridge(e: &BridgeError, connection: &str) -> Self {
        let reconnect = "a person must connect the account again: start a handshake with \
                         POST /v1/request-connection and this connection_id";
        match e {
            BridgeError::InteractionRequired { code, message } => {
                let status = if code == "connection_revoked" {
                    StatusCode::GONE
                } else {
                    StatusCode::CONFLICT
                };
                Self::new(status, code.clone(), message.clone())
                    .with("state", code.as_str())
                    .with("interaction_required", true)
                    .with("reconsent", true)
                    .with("hint", reconnect)
                    .with("connection_id", connection)
            }
            BridgeError::Pending(m) => {
                Self::new(StatusCode::CONFLICT, "connection_pending", m.clone())
                    .with("state", "pending")
                    .with("interaction_required", true)
                    .with("hint", "the person has not finished consenting yet")
                    .with("connection_id", connection)
            }
            BridgeError::Paused {
                reason,
                retry_after,
            } => {
                let e = Self::new(
                    StatusCode::LOCKED,
                    "issuance_paused",
                    format!("an operator paused token issuance: {reason}"),
                )
                .with("reason", reason.as_str())
                .with("connection_id", connection);
                match retry_after {
                    Some(w) => e.retry_after(*w),
                    None => e,
                }
            }
            BridgeError::NotFound(m) => {
                Self::new(StatusCode::NOT_FOUND, "connection_not_found", m.clone())
                    .with("connection_id", connection)
            }
            BridgeError::Unauthorized(_) => Self::new(
                StatusCode::BAD_GATEWAY,
                "agent_key_refused",
                "the gateway refused the sidecar's agent key (check AGENT_KEY)",
            ),
            BridgeError::Transport(_) | BridgeError::Timeout(_) => Self::new(
                StatusCode::BAD_GATEWAY,
                "gateway_unreachable",
                "the Nexus gateway could not be reached; retry shortly",
            )
            .retry_after(Duration::from_secs(1)),
            BridgeError::Gateway {
                status,
                code,
                message,
                retry_after,
            } => {
                let s = if *status == 429 || *status >= 500 {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::BAD_GATEWAY
                };
                let e = Self::new(
                    s,
                    "gateway_error",
                    format!("the gateway answered {status} {code}: {message}"),
                );
                match retry_after {
                    Some(w) => e.retry_after(*w),
                    None => e,
                }
            }
            BridgeError::UnknownStrategy(_)
            | BridgeError::Strategy { .. }
            | BridgeError::InsecureTransport(_)
            | BridgeError::Config(_) => {
                Self::new(StatusCode::BAD_GATEWAY, "strategy_failed", e.to_string())
            }
        }
    }
}

impl IntoResponse for SidecarError {
    fn into_response(self) -> Response {
        let code = HeaderValue::from_str(&self.0.code).unwrap_or(HeaderValue::from_static("error"));
        let mut resp = self.0.into_response();
        resp.headers_mut().insert(ERROR_HEADER, code);
        resp
    }
}
