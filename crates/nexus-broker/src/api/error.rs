//! The broker's API error: a status, a code and a message, rendered in the
//! one error shape of every Nexus server ([`nexus_core::error::ErrorBody`]).

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use nexus_core::error::ErrorBody;
use serde_json::{Map, Value};

use crate::registry::RegistryError;
use crate::store::StoreError;

/// An API error. Renders as JSON with the status it carries.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation; never a secret.
    pub message: String,
    /// Extra context fields merged into the body.
    pub context: Map<String, Value>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            context: Map::new(),
            retry_after: None,
        }
    }

    /// Adds `Retry-After` (and `retry_after_secs` in the body).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self.with("retry_after_secs", secs)
    }

    /// Adds a context field.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.context.insert(key.to_string(), value.into());
        self
    }

    /// 400 with a code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 500 that logs the cause but tells the caller nothing internal.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error; see the broker log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        ErrorBody {
            status: self.status,
            code: self.code.into(),
            message: self.message,
            context: self.context,
            retry_after: self.retry_after.map(HeaderValue::from),
        }
        .into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::new(StatusCode::NOT_FOUND, "not_found", "not found"),
            StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            e if e.is_bad_text() => ApiError::bad_request(
                "invalid_request",
                "text must not contain NUL or invalid characters",
            ),
            e if e.is_unavailable() => {
                tracing::error!(error = %e, "database unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database is unavailable; retry later",
                )
            }
            e => ApiError::internal(&e),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(p) => {
                ApiError::bad_request("invalid_profile", p.to_string()).with("field", p.field)
            }
            RegistryError::NotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "provider_not_found",
                "provider not found",
            ),
            RegistryError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            e @ RegistryError::Changed { now, .. } => ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "provider_changed",
                e.to_string(),
            )
            .with("version", now),
            RegistryError::Store(s) => s.into(),
        }
    }
}
