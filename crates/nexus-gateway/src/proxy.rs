//! The public pages, forwarded to the broker: the OAuth callback and the
//! hosted capture form. Only the gateway then faces the internet.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::core::Gateway;
use crate::error::GatewayError;

/// Request headers the broker's public pages read.
const FORWARDED_REQUEST: &[HeaderName] = &[
    header::CONTENT_TYPE,
    header::COOKIE,
    header::ORIGIN,
    header::REFERER,
    header::USER_AGENT,
    header::ACCEPT,
    header::ACCEPT_LANGUAGE,
];

/// Response headers passed back to the browser.
const FORWARDED_RESPONSE: &[HeaderName] = &[
    header::CONTENT_TYPE,
    header::LOCATION,
    header::SET_COOKIE,
    header::CACHE_CONTROL,
    header::CONTENT_SECURITY_POLICY,
    header::X_FRAME_OPTIONS,
    header::REFERRER_POLICY,
    header::X_CONTENT_TYPE_OPTIONS,
];

/// Forwards a public page (method, path, query, the headers above, body).
pub async fn forward(State(g): State<Arc<Gateway>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body: Bytes = match axum::body::to_bytes(body, g.config.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return GatewayError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body is larger than the limit",
            )
            .into_response()
        }
    };
    let url = g.broker.url_of(parts.uri.path(), parts.uri.query());
    let mut headers = Vec::new();
    for name in FORWARDED_REQUEST {
        for v in parts.headers.get_all(name) {
            headers.push((name.clone(), v.clone()));
        }
    }
    // Public pages: the browser's request, without the broker's API key.
    let reply = match g
        .broker
        .exchange(parts.method, &url, &headers, body, false)
        .await
    {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let mut r = Response::new(Body::from(reply.body));
    *r.status_mut() = reply.status;
    for name in FORWARDED_RESPONSE {
        for v in reply.headers.get_all(name) {
            r.headers_mut().append(name.clone(), v.clone());
        }
    }
    r
}
