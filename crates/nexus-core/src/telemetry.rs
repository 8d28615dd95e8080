//! Metrics (Prometheus) and request logging.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Installs the process-wide Prometheus recorder once and returns its handle.
/// If another recorder was installed first, metrics from this crate go there
/// and the returned handle renders an empty page rather than failing.
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets_for_metric(
                Matcher::Suffix("duration_seconds".into()),
                LATENCY_BUCKETS,
            );
            match builder {
                Ok(b) => {
                    let recorder = b.build_recorder();
                    let handle = recorder.handle();
                    if metrics::set_global_recorder(recorder).is_err() {
                        tracing::warn!(
                            "a metrics recorder was already installed; /metrics will be empty"
                        );
                    }
                    handle
                }
                // Only fails for an empty bucket list, which LATENCY_BUCKETS is not.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Middleware: counts and times every request by route template, method and
/// status, and logs one line per request. Only the route template is logged,
/// never the raw path or query string, which can carry codes or tokens.
/// Labels are static strings or one shared route string: this runs on every
/// token fetch.
pub async fn track_requests(req: Request, next: Next) -> Response {
    let route: Arc<str> = match req.extensions().get::<MatchedPath>() {
        Some(p) => Arc::from(p.as_str()),
        None => Arc::from("unmatched"),
    };
    // Only standard methods become label values: anything else would let any
    // caller, even without a key, create metric series without bound.
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let start = Instant::now();
    let resp = next.run(req).await;
    let elapsed = start.elapsed();
    let status = resp.status();
    metrics::counter!("nexus_http_requests_total", "route" => route.clone(), "method" => method, "status" => status_label(status))
        .increment(1);
    metrics::histogram!("nexus_http_request_duration_seconds", "route" => route.clone(), "method" => method)
        .record(elapsed.as_secs_f64());
    tracing::info!(method, route = %route, status = status.as_u16(), latency_ms = elapsed.as_secs_f64() * 1e3, "request");
    resp
}

/// A status as a label value, without allocating for the common ones.
fn status_label(status: axum::http::StatusCode) -> metrics::SharedString {
    let s: &'static str = match status.as_u16() {
        200 => "200",
        201 => "201",
        202 => "202",
        204 => "204",
        303 => "303",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        410 => "410",
        413 => "413",
        415 => "415",
        423 => "423",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        other => return metrics::SharedString::from(other.to_string()),
    };
    metrics::SharedString::const_str(s)
}
