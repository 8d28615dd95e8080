//! The agent loop, as a `reqwest-middleware` middleware: credentials applied
//! to every request; a 401 from the provider forces one refresh and one
//! retry, and a 401 after that is reported; a 403 is reported as a scope
//! failure (scopes from the route's hints, else the provider's
//! `WWW-Authenticate`) and returned to the caller. Reports go out in the
//! background: they never delay or fail the request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Extensions, Method, StatusCode};
use reqwest_middleware::{Middleware, Next};

use crate::error::BridgeError;
use crate::gateway::{check_transport, GatewayClient, ScopeReport};
use crate::Bridge;

/// Scopes a route needs, reported when the provider answers it with 403.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeHint {
    /// Only this method (`None`: any).
    pub method: Option<Method>,
    /// Requests whose path starts with this; also sent as the report's
    /// `path_template` (never the raw path, which can carry ids).
    pub path_prefix: String,
    /// The scopes it needs.
    pub scopes: Vec<String>,
}

/// Per-request scopes, overriding hints:
/// `client.get(url).with_extension(RequiredScopes(vec!["files.read".into()]))`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequiredScopes(pub Vec<String>);

/// The middleware of one connection. Build it with [`Bridge::middleware`]
/// or, with a client around it, [`Bridge::agent_client`].
pub struct NexusAuth {
    bridge: Bridge,
    connection: Arc<str>,
    hints: Arc<Vec<ScopeHint>>,
}

impl NexusAuth {
    pub(crate) fn new(bridge: Bridge, connection: &str, hints: Vec<ScopeHint>) -> Self {
        Self {
            bridge,
            connection: connection.into(),
            hints: Arc::new(hints),
        }
    }

    fn report(
        &self,
        status: StatusCode,
        method: &Method,
        url: &url::Url,
        resp: &reqwest::Response,
        ext: &Extensions,
    ) {
        let www = resp
            .headers()
            .get(http::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok());
        let explicit = ext.get::<RequiredScopes>().map(|r| r.0.clone());
        let report = scope_report(
            &self.hints,
            status,
            method,
            url.host_str(),
            url.path(),
            www,
            explicit,
        );
        self.bridge.reporter().submit(&self.connection, report);
    }
}

/// The hint for a request: the longest path prefix among those for its
/// method (or any method).
pub fn best_hint<'a>(hints: &'a [ScopeHint], method: &Method, path: &str) -> Option<&'a ScopeHint> {
    hints
        .iter()
        .filter(|h| {
            h.method.as_ref().is_none_or(|m| m == method) && path.starts_with(&h.path_prefix)
        })
        .max_by_key(|h| h.path_prefix.len())
}

/// The report of a provider's 401/403 to a request: scopes from `explicit`
/// (per request), else the route's hint, else none (the broker then reads
/// the provider's `WWW-Authenticate`); the hint's prefix as the path
/// template, never the raw path (it can carry ids).
pub fn scope_report(
    hints: &[ScopeHint],
    status: StatusCode,
    method: &Method,
    host: Option<&str>,
    path: &str,
    www_authenticate: Option<&str>,
    explicit: Option<Vec<String>>,
) -> ScopeReport {
    let hint = best_hint(hints, method, path);
    ScopeReport {
        status: status.as_u16(),
        scopes: explicit
            .or_else(|| hint.map(|h| h.scopes.clone()))
            .unwrap_or_default(),
        method: Some(method.to_string()),
        host: host.map(str::to_string),
        path_template: hint.map(|h| h.path_prefix.clone()),
        www_authenticate: www_authenticate.map(str::to_string),
        ..Default::default()
    }
}

fn refused(e: BridgeError) -> reqwest_middleware::Error {
    reqwest_middleware::Error::middleware(e)
}

#[async_trait::async_trait]
impl Middleware for NexusAuth {
    async fn handle(
        &self,
        mut req: reqwest::Request,
        ext: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<reqwest::Response> {
        // The credentials go wherever the request goes.
        check_transport(req.url(), self.bridge.allows_insecure()).map_err(refused)?;
        let creds = self.bridge.token(&self.connection).await.map_err(refused)?;
        let (method, url) = (req.method().clone(), req.url().clone());
        let retry = req.try_clone();
        crate::strategy::apply_reqwest(&creds, &mut req).map_err(refused)?;
        // A transport error names its URL; with `query_param` that URL holds
        // the credential, and agents log errors.
        let in_url = creds.strategy.kind == "query_param";
        let hide = |e: reqwest_middleware::Error| if in_url { e.without_url() } else { e };
        let resp = next.clone().run(req, ext).await.map_err(hide)?;
        match resp.status() {
            StatusCode::UNAUTHORIZED => {
                // Perhaps revoked or rotated early: one forced refresh, one retry.
                let Some(mut retry) = retry else {
                    self.report(StatusCode::UNAUTHORIZED, &method, &url, &resp, ext);
                    return Ok(resp);
                };
                let fresh = self
                    .bridge
                    .refresh_after(&self.connection, creds.generation)
                    .await
                    .map_err(refused)?;
                crate::strategy::apply_reqwest(&fresh, &mut retry).map_err(refused)?;
                let again = next.run(retry, ext).await.map_err(hide)?;
                if again.status() == StatusCode::UNAUTHORIZED {
                    self.report(StatusCode::UNAUTHORIZED, &method, &url, &again, ext);
                }
                Ok(again)
            }
            StatusCode::FORBIDDEN => {
                self.report(StatusCode::FORBIDDEN, &method, &url, &resp, ext);
                Ok(resp)
            }
            _ => Ok(resp),
        }
    }
}

/// Sends reports in the background: at most [`MAX_IN_FLIGHT`] at once (more
/// are dropped and counted), the same report at most once per [`REPEAT_AFTER`].
pub(crate) struct Reporter {
    gateway: GatewayClient,
    recent: Mutex<HashMap<String, Instant>>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

const MAX_IN_FLIGHT: usize = 8;
const REPEAT_AFTER: Duration = Duration::from_secs(60);

impl Reporter {
    pub(crate) fn new(gateway: GatewayClient) -> Self {
        Self {
            gateway,
            recent: Mutex::new(HashMap::new()),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    pub(crate) fn submit(&self, connection: &str, report: ScopeReport) {
        let outcome = |o: &'static str| {
            metrics::counter!("nexus_bridge_reports_total", "outcome" => o).increment(1);
        };
        let key = format!(
            "{connection} {} {:?} {:?} {:?}",
            report.status, report.scopes, report.www_authenticate, report.path_template
        );
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            recent.retain(|_, at| now.duration_since(*at) < REPEAT_AFTER);
            if recent.contains_key(&key) {
                return outcome("repeated");
            }
            recent.insert(key, now);
        }
        let (Ok(permit), Ok(rt)) = (
            self.in_flight.clone().try_acquire_owned(),
            tokio::runtime::Handle::try_current(),
        ) else {
            return outcome("dropped");
        };
        let gateway = self.gateway.clone();
        let connection = connection.to_string();
        rt.spawn(async move {
            let _permit = permit;
            match gateway.report_scope_failure(&connection, &report).await {
                Ok(_) => outcome("sent"),
                Err(e) => {
                    outcome("failed");
                    tracing::warn!(connection = %connection, error = %e, "scope failure report not accepted");
                }
            }
        });
    }
}
