//! The layer every Nexus server wraps its router in ([`Edge`]): NUL in the
//! URL refused, every request counted and timed by route template, and any
//! error answer that is not JSON rewritten to the one JSON error shape.
//!
//! One hand-written service instead of three `from_fn` middlewares: those
//! box a future and clone the inner (boxed) service per layer per request,
//! which on a warm token fetch cost more than the fetch itself. Here the
//! inner call happens in `call`, so nothing is cloned, and the only boxing
//! is on the rare path that must read a non-JSON error body.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};

use crate::error::{rewrite_as_json, ErrorBody};

/// The edge layer: see the module documentation. Apply it with
/// `Router::layer`, so that it runs after routing and sees the route
/// template.
#[derive(Debug, Clone, Copy, Default)]
pub struct Edge;

impl<S> Layer<S> for Edge {
    type Service = EdgeService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        EdgeService { inner }
    }
}

/// The service [`Edge`] makes.
#[derive(Debug, Clone)]
pub struct EdgeService<S> {
    inner: S,
}

impl<S> Service<Request> for EdgeService<S>
where
    S: Service<Request, Response = Response, Error = std::convert::Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let start = Instant::now();
        let method = method_label(req.method().as_str());
        let route = req.extensions().get::<MatchedPath>().cloned();
        let uri = req.uri();
        let refused = has_nul(uri.path()) || uri.query().is_some_and(has_nul);
        let (inner, early) = if refused {
            let e = ErrorBody::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "NUL characters are not allowed in URLs",
            );
            (None, Some(e.into_response()))
        } else {
            (Some(self.inner.call(req)), None)
        };
        EdgeFuture {
            inner,
            early,
            start,
            method,
            route,
            rewrite: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`EdgeService`].
    pub struct EdgeFuture<F> {
        #[pin]
        inner: Option<F>,
        early: Option<Response>,
        start: Instant,
        method: &'static str,
        route: Option<MatchedPath>,
        rewrite: Option<Pin<Box<dyn Future<Output = Response> + Send>>>,
    }
}

impl<F> Future for EdgeFuture<F>
where
    F: Future<Output = Result<Response, std::convert::Infallible>>,
{
    type Output = Result<Response, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(rewriting) = this.rewrite.as_mut() {
            return rewriting.as_mut().poll(cx).map(Ok);
        }
        let resp = match this.inner.as_pin_mut() {
            Some(f) => match ready!(f.poll(cx)) {
                Ok(r) => r,
                Err(never) => match never {},
            },
            None => this.early.take().unwrap_or_else(|| {
                // Polled again after completion: a caller bug; answer, never panic.
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }),
        };
        let elapsed = this.start.elapsed();
        let status = resp.status().as_u16();
        let route = this.route.as_ref().map_or("unmatched", MatchedPath::as_str);
        let method = *this.method;
        crate::telemetry::record(route, method, status, elapsed.as_secs_f64());
        // Failures are logged where they happen, with their cause; this
        // line is the access log, off unless asked for.
        tracing::debug!(method, route = %route, status, latency_ms = elapsed.as_secs_f64() * 1e3, "request");
        if !needs_rewrite(&resp) {
            return Poll::Ready(Ok(resp));
        }
        let mut rewriting = Box::pin(rewrite_as_json(resp));
        match rewriting.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(Ok(r)),
            Poll::Pending => {
                *this.rewrite = Some(rewriting);
                Poll::Pending
            }
        }
    }
}

/// Whether `resp` is an error answer that is not JSON yet. HTML is left
/// alone: only the pages answer it (`pages::respond`), to a browser that
/// asked for HTML, with the page a person can read; every other caller
/// gets the JSON error.
fn needs_rewrite(resp: &Response) -> bool {
    let status = resp.status();
    (status.is_client_error() || status.is_server_error())
        && !resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json") || v.starts_with("text/html"))
}

fn has_nul(s: &str) -> bool {
    s.as_bytes()
        .windows(3)
        .any(|w| w.eq_ignore_ascii_case(b"%00"))
}

/// Only standard methods become label values: anything else would let any
/// caller, even without a key, create metric series without bound.
fn method_label(m: &str) -> &'static str {
    match m {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tower::ServiceExt;

    async fn call(app: axum::Router, uri: &str) -> (StatusCode, serde_json::Value) {
        let resp = app
            .oneshot(
                Request::builder()
                    .uri(uri)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    fn app() -> axum::Router {
        axum::Router::new()
            .route(
                "/ok/{id}",
                get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
            )
            .route(
                "/text",
                get(|| async { (StatusCode::CONFLICT, "plain words") }),
            )
            .layer(Edge)
    }

    #[tokio::test]
    async fn passes_answers_refuses_nul_and_makes_errors_json() {
        assert_eq!(
            call(app(), "/ok/1").await,
            (StatusCode::OK, serde_json::json!({"ok": true}))
        );
        let (s, b) = call(app(), "/ok/a%00b").await;
        assert_eq!(
            (s, b["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_request"))
        );
        let (s, b) = call(app(), "/ok/1?x=%00").await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
        let (s, b) = call(app(), "/text").await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert_eq!(
            b,
            serde_json::json!({"error": "error", "code": "error", "message": "plain words"})
        );
        let (s, b) = call(app(), "/ok/1").await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
}
