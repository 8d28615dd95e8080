//! The gateway's errors: the broker's `{"error", "message", ...}` passed
//! through with its status, or the gateway's own, in the same shape; mapped
//! to gRPC status codes with a machine-readable reason.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use nexus_core::error::ErrorBody;
use serde_json::{Map, Value};

/// An error answer.
#[derive(Debug, Clone)]
pub struct GatewayError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code (`attention_required`, `connection_not_found`, ...).
    pub code: String,
    /// Human-readable text; never a secret.
    pub message: String,
    /// Extra fields (e.g. `reason` of a pause).
    pub context: Map<String, Value>,
    /// The broker's `Retry-After`, passed on.
    pub retry_after: Option<axum::http::HeaderValue>,
}

impl GatewayError {
    /// An error of the gateway's own.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            code: code.to_string(),
            message: message.into(),
            context: Map::new(),
            retry_after: None,
        }
    }

    /// The same error with a `Retry-After` of `wait` (whole seconds, at least 1).
    pub fn retry_after(mut self, wait: std::time::Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        self.retry_after = Some(axum::http::HeaderValue::from(secs.max(1)));
        self
    }

    /// 401: no usable agent key.
    pub fn unauthenticated(code: &str, message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 404 for a connection the key may not reach, exactly as for an unknown one.
    pub fn connection_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "connection_not_found",
            "connection not found",
        )
    }

    /// 503: the broker did not answer.
    pub fn broker_unavailable(why: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %why, "broker unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            "the broker is unavailable; retry later",
        )
    }

    /// The broker's error answer, passed through. The broker refusing the
    /// gateway itself (wrong `BROKER_API_KEY`, not in `ALLOWED_CIDRS`) is a
    /// configuration fault: agents get 502, the operator a log line.
    pub fn from_broker(status: StatusCode, body: &[u8]) -> Self {
        let e = Self::from_broker_body(status, body);
        if matches!(
            e.code.as_str(),
            "invalid_api_key" | "missing_api_key" | "ip_not_allowed" | "credential_not_allowed"
        ) {
            tracing::error!(code = %e.code, "the broker refused the gateway; check BROKER_API_KEY and the broker's ALLOWED_CIDRS");
            return Self::new(
                StatusCode::BAD_GATEWAY,
                "broker_unavailable",
                "the gateway cannot use the broker; see the gateway log",
            );
        }
        e
    }

    fn from_broker_body(status: StatusCode, body: &[u8]) -> Self {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(mut o)) => {
                let code = o
                    .remove("error")
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| "broker_error".into());
                let message = o
                    .remove("message")
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| "the broker refused the request".into());
                // The copy of `error` for reference clients; written again on the way out.
                o.remove("code");
                Self {
                    status,
                    code,
                    message,
                    context: o,
                    retry_after: None,
                }
            }
            _ => Self::new(
                StatusCode::BAD_GATEWAY,
                "broker_error",
                format!("the broker answered {status} without a JSON error"),
            ),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        self.clone().into_wire().json()
    }

    /// The one error shape every Nexus server sends.
    fn into_wire(self) -> ErrorBody {
        ErrorBody {
            status: self.status,
            code: self.code.into(),
            message: self.message,
            context: self.context,
            retry_after: self.retry_after,
        }
    }

    /// The gRPC status: SPEC §4 mapping, with a `google.rpc.ErrorInfo` whose
    /// reason is the error code.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self.status.as_u16() {
            400 | 413 | 415 | 422 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 | 410 => Code::FailedPrecondition,
            // A pause is lifted by an operator: callers retry later.
            423 => Code::Unavailable,
            429 => Code::ResourceExhausted,
            502..=504 => Code::Unavailable,
            _ => Code::Internal,
        };
        let mut meta = std::collections::HashMap::new();
        for (k, v) in &self.context {
            if let Some(s) = v.as_str() {
                meta.insert(k.clone(), s.to_string());
            }
        }
        let details = tonic_types::ErrorDetails::with_error_info(self.code.clone(), "nexus", meta);
        use tonic_types::StatusExt;
        tonic::Status::with_error_details(code, self.message.clone(), details)
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        self.into_wire().into_response()
    }
}
