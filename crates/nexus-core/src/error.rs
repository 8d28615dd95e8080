//! The one error shape of every Nexus server: `{"error": code, "code": code,
//! "message": text, ...context}` with the status it carries. `code` repeats
//! `error` because the reference's v1 contract (its `ErrorEnvelope`) and its
//! clients read `code`; Nexus's own clients read `error`. Both stay.

use std::borrow::Cow;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

/// An error answer as it goes on the wire. The broker's and the gateway's
/// error types both render through it, so the shape is written once.
#[derive(Debug, Clone)]
pub struct ErrorBody {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code (`not_found`, `issuance_paused`, ...).
    pub code: Cow<'static, str>,
    /// Human-readable explanation; never a secret.
    pub message: String,
    /// Extra fields merged into the body (e.g. `field`, `reason`).
    pub context: Map<String, Value>,
    /// A `Retry-After` header value.
    pub retry_after: Option<HeaderValue>,
}

impl ErrorBody {
    /// An error with a status, code and message.
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            context: Map::new(),
            retry_after: None,
        }
    }

    /// The JSON body: the context fields, then `error`, `code` and `message`
    /// (which a context field of the same name cannot override).
    ///
    /// ```
    /// use axum::http::StatusCode;
    /// let e = nexus_core::error::ErrorBody::new(StatusCode::NOT_FOUND, "not_found", "no such thing");
    /// assert_eq!(
    ///     e.json(),
    ///     serde_json::json!({"error": "not_found", "code": "not_found", "message": "no such thing"})
    /// );
    /// ```
    pub fn json(&self) -> Value {
        let mut body = self.context.clone();
        body.insert("error".into(), Value::String(self.code.to_string()));
        body.insert("code".into(), Value::String(self.code.to_string()));
        body.insert("message".into(), Value::String(self.message.clone()));
        Value::Object(body)
    }
}

impl IntoResponse for ErrorBody {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.json())).into_response();
        if let Some(v) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        // A body refused for its size is left unread: the connection ends
        // after this answer (and says so), instead of a client reusing it
        // while the server drains or drops the rest (HTTP/2 strips it).
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            resp.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        resp
    }
}

/// The code for an error status that came without one (axum's own
/// rejections, the body-limit layer).
pub fn code_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        408 => "request_timeout",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        422 => "invalid_request",
        429 => "rate_limited",
        503 => "unavailable",
        s if s >= 500 => "internal_error",
        _ => "error",
    }
}

const MAX_PASSTHROUGH_MESSAGE: usize = 512;

/// An error answer that is not JSON (axum's own rejections,
/// method-not-allowed, the body-limit layer) rewritten to the JSON error
/// shape, its text (if short) as the message, so no client ever has to
/// parse text. Used by [`crate::middleware::Edge`].
pub async fn rewrite_as_json(resp: Response) -> Response {
    let status = resp.status();
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.len() <= MAX_PASSTHROUGH_MESSAGE)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
    let body = ErrorBody::new(status, code_for(status), text)
        .json()
        .to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}
