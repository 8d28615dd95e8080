//! What can go wrong, typed so an agent can decide what to do.

use std::time::Duration;

/// A bridge failure. Messages never contain a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BridgeError {
    /// A person must act (re-consent, reconnect): the connection is
    /// `attention_required`, `failed` or revoked. Never retried by the bridge.
    #[error("a person must act on this connection ({code}): {message}")]
    InteractionRequired {
        /// `attention_required`, `connection_failed`, `connection_revoked`, ...
        code: String,
        /// The gateway's explanation.
        message: String,
    },
    /// The connection's handshake has not completed yet.
    #[error("the connection is still pending: {0}")]
    Pending(String),
    /// An operator paused token issuance.
    #[error("token issuance is paused: {reason}")]
    Paused {
        /// The operator's reason.
        reason: String,
        /// When to try again, if the gateway said.
        retry_after: Option<Duration>,
    },
    /// Unknown connection (or one the agent key may not reach).
    #[error("not found: {0}")]
    NotFound(String),
    /// The agent key is missing, unknown or revoked.
    #[error("the gateway refused the agent key: {0}")]
    Unauthorized(String),
    /// The gateway could not be reached, or did not answer in time.
    #[error("gateway unreachable: {0}")]
    Transport(String),
    /// Any other error answer from the gateway.
    #[error("gateway answered {status} {code}: {message}")]
    Gateway {
        /// HTTP status.
        status: u16,
        /// The error code.
        code: String,
        /// The explanation.
        message: String,
        /// `Retry-After`, if sent.
        retry_after: Option<Duration>,
    },
    /// Plaintext HTTP to a host that is not loopback, without
    /// `allow_insecure_transport(true)`.
    #[error("refusing plaintext HTTP to {0}: use https, or allow_insecure_transport(true)")]
    InsecureTransport(String),
    /// The connection's strategy is not one this bridge knows.
    #[error("unknown strategy '{0}'")]
    UnknownStrategy(String),
    /// The strategy could not be applied (missing config or credential, an
    /// unsignable request).
    #[error("strategy {strategy}: {message}")]
    Strategy {
        /// Strategy type.
        strategy: String,
        /// What is wrong.
        message: String,
    },
    /// The bridge was configured wrongly.
    #[error("invalid bridge configuration: {0}")]
    Config(String),
    /// Waiting for a connection to become active took too long.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl BridgeError {
    /// Whether trying again later can help (transport, 5xx, 429, pauses).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Transport(_) | Self::Paused { .. } | Self::Pending(_) => true,
            Self::Gateway { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// The bridge error inside an error from the [`crate::AgentClient`]
    /// middleware stack, if it is one.
    pub fn of(err: &reqwest_middleware::Error) -> Option<&BridgeError> {
        match err {
            reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<BridgeError>(),
            reqwest_middleware::Error::Reqwest(_) => None,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InteractionRequired { .. } => "interaction_required",
            Self::Pending(_) => "pending",
            Self::Paused { .. } => "paused",
            Self::NotFound(_) => "not_found",
            Self::Unauthorized(_) => "unauthorized",
            Self::Transport(_) => "transport",
            Self::Gateway { .. } => "gateway",
            Self::InsecureTransport(_) => "insecure_transport",
            Self::UnknownStrategy(_) => "unknown_strategy",
            Self::Strategy { .. } => "strategy",
            Self::Config(_) => "config",
            Self::Timeout(_) => "timeout",
        }
    }

    /// The error a gateway answer stands for.
    pub(crate) fn from_answer(status: u16, body: &[u8], retry_after: Option<Duration>) -> Self {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let code = (v["error"].as_str().or(v["code"].as_str()))
            .unwrap_or("unknown")
            .to_string();
        let message = v["message"]
            .as_str()
            .unwrap_or("the gateway gave no explanation")
            .to_string();
        match (status, code.as_str()) {
            (401, _) => Self::Unauthorized(message),
            (404, _) => Self::NotFound(message),
            (423, _) => Self::Paused {
                reason: v["reason"].as_str().unwrap_or(&message).to_string(),
                retry_after,
            },
            (409, "connection_pending") => Self::Pending(message),
            (409 | 410, "attention_required" | "connection_failed" | "connection_revoked")
            | (410, _) => Self::InteractionRequired { code, message },
            _ => Self::Gateway {
                status,
                code,
                message,
                retry_after,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_what_an_agent_can_act_on() {
        let e = |s, b: &str| BridgeError::from_answer(s, b.as_bytes(), None);
        assert!(matches!(
            e(409, r#"{"error":"attention_required","message":"m"}"#),
            BridgeError::InteractionRequired { .. }
        ));
        assert!(matches!(
            e(410, r#"{"error":"connection_revoked","message":"m"}"#),
            BridgeError::InteractionRequired { .. }
        ));
        assert!(matches!(
            e(409, r#"{"error":"connection_pending","message":"m"}"#),
            BridgeError::Pending(_)
        ));
        assert_eq!(
            e(
                423,
                r#"{"error":"issuance_paused","message":"m","reason":"incident"}"#
            ),
            BridgeError::Paused {
                reason: "incident".into(),
                retry_after: None
            }
        );
        assert!(matches!(e(401, "{}"), BridgeError::Unauthorized(_)));
        assert!(matches!(e(404, "not json"), BridgeError::NotFound(_)));
        let g = e(503, r#"{"error":"provider_unavailable","message":"m"}"#);
        assert!(g.is_retryable());
        assert!(!e(409, r#"{"error":"attention_required","message":"m"}"#).is_retryable());
    }
}
