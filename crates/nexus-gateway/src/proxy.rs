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
    let mut url = g.config.broker_url.clone();
    url.set_path(parts.uri.path());
    url.set_query(parts.uri.query());
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes())
        .unwrap_or(reqwest::Method::GET);
    let mut out = g.broker.http().request(method, url);
    for name in FORWARDED_REQUEST {
        for v in parts.headers.get_all(name) {
            out = out.header(name.as_str(), v.as_bytes());
        }
    }
    let resp = match out.body(body).send().await {
        Ok(r) => r,
        Err(e) => return GatewayError::broker_unavailable(e.without_url()).into_response(),
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = Vec::new();
    for name in FORWARDED_RESPONSE {
        for v in resp.headers().get_all(name.as_str()) {
            headers.push((name.clone(), v.as_bytes().to_vec()));
        }
    }
    let bytes = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return GatewayError::broker_unavailable(e.without_url()).into_response(),
    };
    let mut r = Response::new(Body::from(bytes));
    *r.status_mut() = status;
    for (name, v) in headers {
        if let Ok(v) = axum::http::HeaderValue::from_bytes(&v) {
            r.headers_mut().append(name, v);
        }
    }
    r
}
