//! Metrics (Prometheus) and request logging.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

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
                    spawn_upkeep(handle.clone());
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

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds histogram samples into their buckets every few seconds. The
/// recorder keeps every sample until then (or until a scrape): without
/// this, a server nobody scrapes grows by a few bytes per request, forever.
/// A plain thread, so it runs whatever runtimes come and go.
fn spawn_upkeep(handle: PrometheusHandle) {
    let started = std::thread::Builder::new()
        .name("nexus-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms grow until scraped");
    }
}

/// A request's counter and latency histogram.
type Handles = (metrics::Counter, metrics::Histogram);

/// Per route template: the handles of each (method, status) seen.
type RouteHandles = HashMap<Box<str>, Vec<(&'static str, u16, Handles)>>;

/// Most (method, status) pairs cached per route and thread; any further
/// pair is registered on each use (still correct, only slower).
const MAX_PAIRS_PER_ROUTE: usize = 64;

thread_local! {
    /// Handles by route template, then (method, status). Route templates
    /// come from the router's table, so the map stays small.
    static HANDLES: RefCell<RouteHandles> = RefCell::new(HashMap::new());
}

/// Counts one request and records its latency.
pub fn record(route: &str, method: &'static str, status: u16, seconds: f64) {
    HANDLES.with(|cell| {
        let mut map = cell.borrow_mut();
        if let Some((_, _, (count, time))) = map
            .get(route)
            .and_then(|l| l.iter().find(|(m, s, _)| *m == method && *s == status))
        {
            count.increment(1);
            time.record(seconds);
            return;
        }
        let (count, time) = register(route, method, status);
        count.increment(1);
        time.record(seconds);
        let list = map.entry(route.into()).or_default();
        if list.len() < MAX_PAIRS_PER_ROUTE {
            list.push((method, status, (count, time)));
        }
    });
}

fn register(route: &str, method: &'static str, status: u16) -> Handles {
    // Handles taken before the recorder exists would count nowhere forever.
    let _ = metrics_handle();
    let route = metrics::SharedString::from(Arc::<str>::from(route));
    (
        metrics::counter!("nexus_http_requests_total", "route" => route.clone(), "method" => method, "status" => status_label(status)),
        metrics::histogram!("nexus_http_request_duration_seconds", "route" => route, "method" => method),
    )
}

/// A status as a label value, without allocating for the common ones.
fn status_label(status: u16) -> metrics::SharedString {
    let s: &'static str = match status {
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

/// A counter whose labels are all literals, registered once (after the
/// process's recorder is installed) and kept: on a hot path this costs one
/// atomic add instead of a label allocation and a registry lookup.
///
/// ```
/// nexus_core::static_counter!("example_total", "result" => "hit").increment(1);
/// ```
#[macro_export]
macro_rules! static_counter {
    ($name:literal $(, $k:literal => $v:literal)* $(,)?) => {{
        static HANDLE: ::std::sync::OnceLock<$crate::__metrics::Counter> = ::std::sync::OnceLock::new();
        HANDLE.get_or_init(|| {
            let _ = $crate::telemetry::metrics_handle();
            $crate::__metrics::counter!($name $(, $k => $v)*)
        })
    }};
}
