//! One agent request through the sidecar: route, credentials, strategy,
//! upstream, and the agent loop of the bridge (401 → one forced refresh and
//! one replay; 403 → scope report; connections that need a person answered
//! without an upstream call), with bodies streamed both ways.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{request, Method, Response, StatusCode, Version};
use hyper::body::Body as _;
use nexus_bridge::{Bridge, BridgeError, Credentials};

use crate::connection::Resolver;
use crate::error::SidecarError;
use crate::headers;
use crate::memory::{self, RateMemory};
use crate::routes::{Route, RouteKind, Routes};
use crate::target;
use crate::upstream::{Upstreams, Via};

/// What every worker shares.
#[derive(Debug)]
pub struct Proxy {
    /// The routes.
    pub routes: Routes,
    /// Their metric handles, registered once (looked up twice a request:
    /// a fast hash, the keys are the routes file's names).
    pub metrics: HashMap<String, RouteMetrics, foldhash::fast::RandomState>,
    /// Credentials and reports.
    pub bridge: Bridge,
    /// Connections looked up by workspace and provider.
    pub resolver: Resolver,
    /// Remembered upstream 429s.
    pub rate: RateMemory,
    /// People sent to consent by `mcp` routes.
    pub elicitations: crate::mcp::Elicitations,
    /// Bodies kept for a replay.
    pub replay_body_max: usize,
    /// Bodies a strategy may hash.
    pub signed_body_max: usize,
    /// Time to an upstream's response head.
    pub upstream_timeout: std::time::Duration,
}

/// One worker: a thread with its own runtime and its own upstream
/// connections (no request crosses threads), sharing the rest.
#[derive(Debug)]
pub struct Worker {
    /// What the workers share.
    pub proxy: Arc<Proxy>,
    /// This worker's upstream clients.
    pub upstreams: Upstreams,
}

/// A route's metric handles: on the hot path one atomic add each, no label
/// allocation, no registry lookup.
#[derive(Debug)]
pub struct RouteMetrics {
    /// `nexus_sidecar_requests_total{outcome="upstream_1xx".."upstream_5xx"}`.
    by_class: [metrics::Counter; 5],
    /// `nexus_sidecar_upstream_duration_seconds`.
    upstream: metrics::Histogram,
    /// `nexus_sidecar_short_circuits_total`.
    short_circuits: metrics::Counter,
}

impl RouteMetrics {
    /// The handles of `route` (register after the recorder is installed).
    pub fn new(route: &str) -> Self {
        let r = metrics::SharedString::from(Arc::<str>::from(route));
        let class = |c: &'static str| metrics::counter!("nexus_sidecar_requests_total", "route" => r.clone(), "outcome" => c);
        Self {
            by_class: [
                class("upstream_1xx"),
                class("upstream_2xx"),
                class("upstream_3xx"),
                class("upstream_4xx"),
                class("upstream_5xx"),
            ],
            upstream: metrics::histogram!("nexus_sidecar_upstream_duration_seconds", "route" => r.clone()),
            short_circuits: metrics::counter!("nexus_sidecar_short_circuits_total", "route" => r),
        }
    }
}

/// How long an `mcp` route waits for its scope report before answering.
const REPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The target of the access log (turn it off with `nexus_sidecar::access=off`).
const ACCESS: &str = "nexus_sidecar::access";

/// The handler of every path but `/_nexus/...`.
pub async fn handle(w: Arc<Worker>, req: Request) -> Response<Body> {
    let started = Instant::now();
    // The query can hold anything (even a credential the agent should not
    // have): never logged. Taken only when the access log is on.
    let logged = tracing::enabled!(target: ACCESS, tracing::Level::INFO).then(|| {
        (
            req.method().clone(),
            nexus_core::text::printable(req.uri().path(), 256).into_owned(),
        )
    });
    let mut route: Option<&str> = None;
    let (resp, code) = match w.forward(req, &mut route).await {
        // An answer of the sidecar's own that is not an error status (an
        // MCP elicitation) still says what it was.
        Ok(r) => {
            let own = r
                .extensions()
                .get::<crate::error::OwnAnswer>()
                .map(|o| o.0.to_string());
            (r, own)
        }
        Err(e) => {
            let code = e.code().to_string();
            (axum::response::IntoResponse::into_response(e), Some(code))
        }
    };
    let class = usize::from(resp.status().as_u16() / 100).clamp(1, 5) - 1;
    match (&code, route.and_then(|r| w.proxy.metrics.get(r))) {
        (None, Some(m)) => m.by_class[class].increment(1),
        _ => {
            let outcome = code
                .clone()
                .unwrap_or_else(|| format!("upstream_{}xx", class + 1));
            metrics::counter!("nexus_sidecar_requests_total", "route" => route.unwrap_or("(none)").to_string(), "outcome" => outcome)
                .increment(1)
        }
    }
    if let Some((method, path)) = logged {
        let upstream_class = format!("upstream_{}xx", class + 1);
        tracing::info!(
            target: ACCESS,
            method = %method,
            route = %route.unwrap_or("(none)"),
            path = %path,
            status = resp.status().as_u16(),
            outcome = %code.as_deref().unwrap_or(&upstream_class),
            ms = started.elapsed().as_millis() as u64,
            "request"
        );
    }
    resp
}

/// A request body: in memory (replayable, hashable) or a stream.
enum Payload {
    Kept(Bytes),
    Streamed(Body),
}

fn too_large(limit: usize, why: &str) -> SidecarError {
    SidecarError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("{why}: the body is over {limit} bytes (SIDECAR_SIGNED_BODY_MAX_BYTES)"),
    )
    .with("limit", limit)
}

/// Why the strategy of `creds` must hash the whole body, if it must
/// (`hmac_payload`; SigV4 but for S3, which is signed `UNSIGNED-PAYLOAD`).
fn hashing(creds: &Credentials) -> Option<String> {
    let s = &creds.strategy;
    (s.kind == "hmac_payload" || (s.kind == "aws_sigv4" && s.field("service") != Some("s3")))
        .then(|| format!("{} signs the whole body", s.kind))
}

fn strategy_error(e: BridgeError) -> SidecarError {
    SidecarError::new(StatusCode::BAD_GATEWAY, "strategy_failed", e.to_string())
}

impl Worker {
    async fn forward<'w>(
        &'w self,
        req: Request,
        named: &mut Option<&'w str>,
    ) -> Result<Response<Body>, SidecarError> {
        let p = &*self.proxy;
        let (route, rest) = target::split(&p.routes, req.method(), req.version(), req.uri())?;
        *named = Some(&route.name);
        let rest = rest.to_string();
        match route.kind {
            RouteKind::Http => self.relay(route, &rest, req, None).await,
            // Boxed: the MCP path's future is large; HTTP routes' requests
            // would carry (and copy) it otherwise.
            RouteKind::Mcp => Box::pin(self.mcp(route, &rest, req)).await,
        }
    }

    /// Forwards one request of `route` (`rest`: the path after its name);
    /// `kept`: its body, already read (then the request's own is ignored).
    pub(crate) async fn relay(
        &self,
        route: &Route,
        rest: &str,
        mut req: Request,
        kept: Option<Bytes>,
    ) -> Result<Response<Body>, SidecarError> {
        let p = &*self.proxy;
        let connection = p
            .resolver
            .connection(&p.bridge, route)
            .await
            .map_err(|e| SidecarError::from_bridge(&e, ""))?;
        if let Some(wait) = p.rate.wait(&route.name, &connection) {
            if let Some(m) = p.metrics.get(&route.name) {
                m.short_circuits.increment(1);
            }
            return Err(SidecarError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "upstream_rate_limited",
                "the upstream asked to slow down (429 with Retry-After); the sidecar answers for it until then",
            )
            .retry_after(wait));
        }
        let creds = match p.bridge.token(&connection).await {
            Ok(c) => c,
            Err(e) => {
                // A deleted connection: look again (a person may have made a
                // new one). One that needs a person stays: it is the one
                // they must reconnect, and the bridge holds its answer.
                if matches!(e, BridgeError::NotFound(_)) {
                    p.resolver.forget(&route.name);
                }
                return Err(SidecarError::from_bridge(&e, &connection));
            }
        };
        let upgrade = headers::wants_upgrade(req.headers());
        let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let method = parts.method.clone();
        let strategy = &creds.strategy;
        let drop = (strategy.kind == "query_param")
            .then(|| strategy.field("param_name"))
            .flatten();
        parts.uri = target::upstream_uri(route, rest, parts.uri.query(), drop)?;
        parts.version = if route.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        headers::outbound(&mut parts.headers, upgrade, strategy);
        parts.extensions = Default::default();
        let payload = match kept {
            Some(bytes) => self.kept(&creds, bytes)?,
            None => self.payload(&creds, &parts, body).await?,
        };

        let replay = match &payload {
            Payload::Kept(b) => Some((parts.clone(), b.clone())),
            Payload::Streamed(_) => None,
        };
        let resp = self.send(route, &creds, parts, payload, upgrade).await?;
        let resp = match resp.status() {
            StatusCode::UNAUTHORIZED => match replay {
                Some((parts, body)) => {
                    // Revoked or rotated early: one forced refresh, one replay.
                    // The rare paths are boxed: their futures (gateway
                    // calls) would otherwise make every request's larger.
                    let fresh = Box::pin(p.bridge.refresh_after(&connection, creds.generation))
                        .await
                        .map_err(|e| SidecarError::from_bridge(&e, &connection))?;
                    let again = self
                        .send(route, &fresh, parts.clone(), Payload::Kept(body), upgrade)
                        .await?;
                    if again.status() == StatusCode::UNAUTHORIZED {
                        Box::pin(self.report(route, &connection, &parts.method, rest, &again))
                            .await;
                    }
                    again
                }
                None => {
                    // A streamed body cannot be sent twice: the agent gets
                    // the 401, and its retry finds fresh credentials.
                    let bridge = p.bridge.clone();
                    let (id, generation) = (connection.clone(), creds.generation);
                    tokio::spawn(async move {
                        let _ = bridge.refresh_after(&id, generation).await;
                    });
                    resp
                }
            },
            StatusCode::FORBIDDEN => {
                Box::pin(self.report(route, &connection, &method, rest, &resp)).await;
                resp
            }
            StatusCode::TOO_MANY_REQUESTS => {
                if let Some(wait) = resp
                    .headers()
                    .get(axum::http::header::RETRY_AFTER)
                    .and_then(|v| memory::retry_after(v, SystemTime::now()))
                {
                    p.rate.remember(&route.name, &connection, wait);
                }
                resp
            }
            _ => resp,
        };
        Ok(self.back_to_agent(resp, on_upgrade))
    }

    /// A body read already: kept for the replay, within the hashing cap.
    fn kept(&self, creds: &Credentials, bytes: Bytes) -> Result<Payload, SidecarError> {
        match hashing(creds) {
            Some(why) if bytes.len() > self.proxy.signed_body_max => {
                Err(too_large(self.proxy.signed_body_max, &why))
            }
            _ => Ok(Payload::Kept(bytes)),
        }
    }

    /// Reads the body into memory when it must be (a strategy hashes it) or
    /// may cheaply be (small enough to replay); else streams it.
    async fn payload(
        &self,
        creds: &Credentials,
        parts: &request::Parts,
        body: Body,
    ) -> Result<Payload, SidecarError> {
        let must_hash = hashing(creds);
        if body.is_end_stream() {
            return Ok(Payload::Kept(Bytes::new()));
        }
        let length = parts
            .headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let unreadable = |e: axum::Error| {
            SidecarError::new(
                StatusCode::BAD_REQUEST,
                "body_unreadable",
                format!("the request body could not be read: {e}"),
            )
        };
        if let Some(why) = must_hash {
            if length.is_some_and(|l| l > self.proxy.signed_body_max as u64) {
                return Err(too_large(self.proxy.signed_body_max, &why));
            }
            return match axum::body::to_bytes(body, self.proxy.signed_body_max).await {
                Ok(b) => Ok(Payload::Kept(b)),
                Err(e) if is_length_limit(&e) => Err(too_large(self.proxy.signed_body_max, &why)),
                Err(e) => Err(unreadable(e)),
            };
        }
        match length {
            Some(l) if l <= self.proxy.replay_body_max as u64 => {
                axum::body::to_bytes(body, self.proxy.replay_body_max)
                    .await
                    .map(Payload::Kept)
                    .map_err(unreadable)
            }
            _ => Ok(Payload::Streamed(body)),
        }
    }

    /// Applies the credentials and sends; the upstream's answer as it is.
    async fn send(
        &self,
        route: &Route,
        creds: &Credentials,
        mut parts: request::Parts,
        payload: Payload,
        upgrade: bool,
    ) -> Result<Response<hyper::body::Incoming>, SidecarError> {
        let req = match payload {
            Payload::Kept(bytes) => {
                let mut req = axum::http::Request::from_parts(parts, bytes);
                nexus_bridge::strategy::apply_http(creds, &mut req).map_err(strategy_error)?;
                req.map(Body::from)
            }
            Payload::Streamed(body) => {
                nexus_bridge::strategy::apply_parts(creds, &mut parts).map_err(strategy_error)?;
                axum::http::Request::from_parts(parts, body)
            }
        };
        let started = Instant::now();
        let via = if route.http2 {
            Via::H2c
        } else if upgrade {
            Via::Upgrade
        } else {
            Via::Negotiated
        };
        let sent = self.upstreams.send(req, via);
        let resp = tokio::time::timeout(self.proxy.upstream_timeout, sent).await;
        if let Some(m) = self.proxy.metrics.get(&route.name) {
            m.upstream.record(started.elapsed().as_secs_f64());
        }
        match resp {
            Ok(Ok(r)) => Ok(r),
            // The error may name the URL, which can hold a credential
            // (query_param): only its kind is told.
            Ok(Err(e)) => Err(SidecarError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                format!("the upstream of route '{}' could not be reached ({})", route.name, error_kind(&e)),
            )),
            Err(_) => Err(SidecarError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!(
                    "the upstream of route '{}' did not answer within {} s (SIDECAR_UPSTREAM_TIMEOUT_SECS)",
                    route.name,
                    self.proxy.upstream_timeout.as_secs()
                ),
            )),
        }
    }

    /// Reports the upstream's refusal in the background, as the bridge does
    /// (the same report at most once a minute). On an `mcp` route a refusal
    /// that sends a person to consent is reported before answering, so the
    /// link the agent gets already offers the missing scopes; once a person
    /// was sent, repeats go to the background again. The path is the one
    /// after the route name, which the route's scope hints are written
    /// against.
    async fn report(
        &self,
        route: &Route,
        connection: &str,
        method: &Method,
        path: &str,
        resp: &Response<hyper::body::Incoming>,
    ) {
        let www = resp
            .headers()
            .get(axum::http::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok());
        let report = nexus_bridge::scope_report(
            &route.scopes,
            resp.status(),
            method,
            Some(route.authority.host()),
            path,
            www,
            None,
        );
        let sends_a_person = || {
            resp.status() == StatusCode::UNAUTHORIZED
                || crate::mcp::insufficient_scope(resp.headers())
        };
        if route.kind == RouteKind::Mcp
            && sends_a_person()
            && !self.proxy.elicitations.outstanding(&route.name)
        {
            let sent = self.proxy.bridge.report_scope_failure(connection, &report);
            match tokio::time::timeout(REPORT_WAIT, sent).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(route = %route.name, error = %e, "a scope report failed")
                }
                Err(_) => {
                    tracing::warn!(route = %route.name, "a scope report took over {} s", REPORT_WAIT.as_secs())
                }
            }
        } else {
            self.proxy.bridge.report_in_background(connection, report);
        }
    }

    /// The upstream's answer for the agent: hop-by-hop headers dropped, the
    /// body streamed; a protocol switch joins the two connections.
    fn back_to_agent(
        &self,
        resp: Response<hyper::body::Incoming>,
        on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<Body> {
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let (mut parts, body) = resp.into_parts();
        headers::inbound(&mut parts.headers, switching);
        if switching {
            if let Some(agent_side) = on_upgrade {
                let mut upstream = Response::from_parts(parts.clone(), ());
                let upstream_side = hyper::upgrade::on(&mut upstream);
                tokio::spawn(tunnel(agent_side, upstream_side));
            }
        }
        parts.extensions = Default::default();
        Response::from_parts(parts, Body::new(body))
    }
}

/// Copies bytes both ways between the agent and the upstream after a
/// protocol switch (WebSocket frames pass through untouched).
async fn tunnel(agent: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (Ok(agent), Ok(upstream)) = tokio::join!(agent, upstream) else {
        tracing::debug!("a protocol switch did not complete on both sides");
        return;
    };
    let mut agent = hyper_util::rt::TokioIo::new(agent);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    let _ = tokio::io::copy_bidirectional(&mut agent, &mut upstream).await;
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

fn error_kind(e: &crate::upstream::UpstreamError) -> &'static str {
    if e.is_connect() {
        "connection refused or failed"
    } else {
        "the connection failed mid-request"
    }
}
