//! Running the gateway: REST and gRPC on one port (gRPC over HTTP/2, REST
//! over HTTP/1.1 and HTTP/2), CORS for REST, the public pages forwarded.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, Method};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;

use crate::config::GatewayConfig;
use crate::core::Gateway;
use crate::grpc::pb::nexus_service_server::NexusServiceServer;
use crate::grpc::Service;
use crate::{contract, proxy, rest};
use nexus_core::openapi::{doc, mount, Kind, Route, RouteDoc};

/// Failures starting or running the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayServeError {
    /// The broker client could not be built.
    #[error(transparent)]
    Client(#[from] nexus_core::outbound::OutboundError),
    /// The TLS certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] nexus_core::tls::TlsError),
    /// Binding or serving failed.
    #[error("listening on {addr}: {source}")]
    Io {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

type Routes = Vec<Route<Arc<Gateway>>>;

/// Errors every agent route can answer.
fn agent_errors(d: RouteDoc) -> RouteDoc {
    d.fails(401, "no agent key, or an unknown or revoked one")
        .fails(
            502,
            "the broker refused the gateway (see the gateway's log)",
        )
        .fails(
            503,
            "the broker (or the provider) is unavailable; retry later",
        )
}

/// Errors of the token routes, beyond [`agent_errors`].
fn token_errors(d: RouteDoc) -> RouteDoc {
    agent_errors(d)
        .fails(404, "unknown connection, or one outside the key's workspaces")
        .fails(409, "the connection does not serve: connection_pending, attention_required (a person must consent again), connection_failed, connection_unusable (its provider was deleted)")
        .fails(410, "connection_revoked")
        .fails(423, "issuance_paused: an operator paused token issuance (reason, paused_scope, paused_at)")
}

/// The agent API (agent key on every call).
fn api_routes() -> Routes {
    vec![
        (
            agent_errors(doc(
                "POST",
                "/v1/request-connection",
                "Start a consent or capture handshake for user_id",
            ))
            .returns(contract::consent())
            .fails(400, "invalid_json, missing_fields, or an invalid field")
            .fails(
                403,
                "workspace_forbidden: the key may not act for that user_id",
            )
            .fails(
                404,
                "provider_not_found, or connection_not_found for a reconnect",
            )
            .fails(
                429,
                "too_many_handshakes (per agent key or workspace) or too_many_pending_connections, with Retry-After",
            ),
            post(rest::request_connection),
        ),
        (
            agent_errors(doc(
                "POST",
                "/v1/connect-sessions",
                "A connect-portal link for one of the key's workspaces (token shown once)",
            ))
            .status(201)
            .fails(400, "invalid_json, missing_fields, or an invalid field")
            .fails(
                403,
                "workspace_forbidden: the key may not act for that workspace",
            ),
            post(rest::connect_session),
        ),
        (
            agent_errors(doc(
                "GET",
                "/v1/check-connection/{id}",
                "A connection's status (v1 enum) and precise state",
            ))
            .returns(contract::check()),
            get(rest::check_connection),
        ),
        (
            token_errors(doc("GET", "/v1/token/{id}", "Strategy and usage secrets"))
                .returns(contract::token()),
            get(rest::token),
        ),
        (
            token_errors(doc(
                "POST",
                "/v1/refresh/{id}",
                "Refresh now, then the token response",
            ))
            .no_body()
            .returns(contract::token()),
            post(rest::refresh),
        ),
        (
            agent_errors(doc(
                "GET",
                "/v1/providers",
                "Providers grouped by auth_type, then name",
            ))
            .returns(contract::providers()),
            get(rest::providers),
        ),
        (
            doc(
                "POST",
                "/v1/connections/{id}/scope-failures",
                "Report scopes the provider refused (or that work again)",
            )
            .status(202),
            post(rest::scope_failures),
        ),
        (
            doc(
                "GET",
                "/v1/workspaces/{id}/connections/status",
                "A workspace's connections' health",
            ),
            get(rest::workspace_status),
        ),
    ]
}

/// Browsers arrive here from the provider; forwarded to the broker.
fn public_routes(redirect_path: &str) -> Routes {
    vec![
        (
            doc(
                "GET",
                redirect_path,
                "OAuth callback (forwarded to the broker)",
            )
            .oauth_callback(),
            get(proxy::forward),
        ),
        (
            doc(
                "GET",
                &format!("{redirect_path}/{{provider_id}}"),
                "A provider's own OAuth callback (forwarded to the broker)",
            )
            .oauth_callback(),
            get(proxy::forward),
        ),
        (
            doc(
                "GET",
                "/connect",
                "The connect portal (forwarded to the broker)",
            )
            .open()
            .answers(Kind::Html),
            get(proxy::forward),
        ),
        (
            doc(
                "POST",
                "/connect/start",
                "Portal: connect or reconnect (form)",
            )
            .open()
            .answers(Kind::Redirect),
            post(proxy::forward),
        ),
        (
            doc("POST", "/connect/disconnect", "Portal: disconnect (form)")
                .open()
                .answers(Kind::Redirect),
            post(proxy::forward),
        ),
        (
            doc(
                "POST",
                "/connect/pause",
                "Portal: pause or resume the workspace (form)",
            )
            .open()
            .answers(Kind::Redirect),
            post(proxy::forward),
        ),
        (
            doc(
                "GET",
                nexus_core::pages::SCRIPT_PATH,
                "The connect portal's script",
            )
            .open()
            .answers(Kind::Script),
            get(nexus_core::pages::script),
        ),
        (
            doc(
                "GET",
                nexus_core::pages::STYLESHEET_PATH,
                "The pages' stylesheet",
            )
            .open()
            .answers(Kind::Css),
            get(nexus_core::pages::stylesheet),
        ),
        (
            doc(
                "GET",
                nexus_core::wire::routes::CLIENT_METADATA,
                "Nexus's client ID metadata document (its client id at MCP authorization servers)",
            )
            .open(),
            get(proxy::forward),
        ),
        (
            doc("GET", "/auth/capture", "Hosted form for static credentials")
                .open()
                .query("state", true, "the signed state of the handshake")
                .answers(Kind::Html),
            get(proxy::forward),
        ),
        (
            doc(
                "GET",
                "/auth/capture-schema",
                "The credential schema of a capture",
            )
            .open()
            .query("state", true, "the signed state of the handshake"),
            get(proxy::forward),
        ),
        (
            doc(
                "POST",
                "/auth/capture-credential",
                "Submit static credentials",
            )
            .open(),
            post(proxy::forward),
        ),
    ]
}

fn ops_routes() -> Routes {
    vec![
        (doc("GET", "/health", "Liveness").open(), get(rest::health)),
        (
            doc("GET", "/ready", "The broker answers").open(),
            get(rest::ready),
        ),
    ]
}

/// The gateway's OpenAPI document, from the same tables as [`router`]
/// (gRPC is described by proto/nexus/v1/nexus.proto).
pub fn openapi(redirect_path: &str) -> serde_json::Value {
    let mut docs: Vec<RouteDoc> = api_routes()
        .into_iter()
        .chain(public_routes(redirect_path))
        .chain(ops_routes())
        .map(|(d, _)| d)
        .collect();
    docs.push(
        doc("GET", "/metrics", "Prometheus metrics")
            .open()
            .answers(Kind::Text),
    );
    docs.push(doc("GET", "/openapi.json", "This document").open());
    nexus_core::openapi::document(
        "Nexus gateway",
        "The agent-facing API: request and check connections, fetch and refresh tokens, report refused scopes. Send an agent key as Authorization: Bearer nxa_... (or X-API-Key). gRPC (nexus.v1.NexusService) is served on the same port.",
        &docs,
        "agentKey",
        serde_json::json!({
            "agentKey": {"type": "http", "scheme": "bearer", "description": "an agent key, nxa_..."},
        }),
    )
}

/// The complete router.
pub fn router(g: Arc<Gateway>, metrics: PrometheusHandle) -> Router {
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::list(g.config.cors_allowed_origins.clone()))
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            "x-api-key".parse().unwrap_or(header::AUTHORIZATION),
        ])
        .max_age(std::time::Duration::from_secs(600));
    let document = Arc::new(openapi(&g.config.redirect_path));
    let api = mount(Router::new(), api_routes());
    // Without allowed origins there is nothing to answer a browser with: no
    // CORS layer at all (it would add Vary headers to every token answer).
    let api = if g.config.cors_allowed_origins.is_empty() {
        api
    } else {
        api.layer(cors)
    };
    let public = mount(Router::new(), public_routes(&g.config.redirect_path));
    let cidrs = g.config.metrics_allowed_cidrs.clone();
    let ops = mount(Router::new(), ops_routes())
        .route(
            "/metrics",
            get(
                move |axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>| {
                    let allowed = nexus_core::net::ip_allowed(&cidrs, peer.ip());
                    let body = if allowed {
                        Ok(metrics.render())
                    } else {
                        Err(crate::error::GatewayError::new(
                            axum::http::StatusCode::FORBIDDEN,
                            "ip_not_allowed",
                            "your address is not in METRICS_ALLOWED_CIDRS",
                        ))
                    };
                    std::future::ready(body)
                },
            ),
        )
        .route(
            "/openapi.json",
            get(move || std::future::ready(axum::Json((*document).clone()))),
        );
    let grpc = tonic::service::Routes::new(NexusServiceServer::new(Service::new(g.clone())))
        .prepare()
        .into_axum_router();
    let max_body = g.config.max_body_bytes;
    Router::new()
        .merge(api)
        .merge(public)
        .merge(ops)
        .with_state(g)
        .merge(grpc)
        .fallback(not_found)
        .layer(RequestBodyLimitLayer::new(max_body))
        .layer(nexus_core::middleware::Edge)
}

async fn not_found(uri: axum::http::Uri) -> crate::error::GatewayError {
    crate::error::GatewayError::new(
        axum::http::StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", uri.path()),
    )
}

/// A bound gateway.
pub struct GatewayServer {
    gateway: Arc<Gateway>,
    listener: TcpListener,
    metrics: PrometheusHandle,
    tls: Option<Arc<nexus_core::tls::TlsServer>>,
}

impl GatewayServer {
    /// Binds `config.listen_addr` (port 0 picks one). `metrics` is the
    /// process's Prometheus handle (shared with the broker under `nexus up`).
    pub async fn start(
        config: GatewayConfig,
        metrics: PrometheusHandle,
    ) -> Result<Self, GatewayServeError> {
        Self::start_with(config, metrics, None).await
    }

    /// Like [`GatewayServer::start`]; with `broker` (e.g. a
    /// [`BrokerClient::local`] under `nexus up`) instead of one over the network.
    pub async fn start_with(
        config: GatewayConfig,
        metrics: PrometheusHandle,
        broker: Option<crate::broker::BrokerClient>,
    ) -> Result<Self, GatewayServeError> {
        let addr = config.listen_addr;
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(nexus_core::tls::TlsServer::load_with(
                files.clone(),
                config.client_auth.as_ref(),
            )?)),
            None => None,
        };
        if tls.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the gateway serves plaintext HTTP on a non-loopback address: set TLS_CERT_FILE and TLS_KEY_FILE, or put it behind TLS (it answers with tokens)");
        }
        if broker.is_none()
            && nexus_core::egress::plaintext_beyond_loopback(config.broker_url.as_str())
        {
            tracing::warn!(broker = %nexus_core::settings::redact_url(config.broker_url.as_str()), "BROKER_URL is plaintext HTTP beyond loopback: tokens and the broker key cross that network unencrypted");
        }
        let gateway = match broker {
            Some(b) => Gateway::with_broker(config, b),
            None => Gateway::new(config)?,
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| GatewayServeError::Io { addr, source })?;
        Ok(Self {
            gateway,
            listener,
            metrics,
            tls,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener has an address; fall back to the configured one.
        self.listener
            .local_addr()
            .unwrap_or(self.gateway.config.listen_addr)
    }

    /// The gateway's state (its token cache, broker client, configuration).
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayServeError> {
        let addr = self.local_addr();
        let g = self.gateway.clone();
        let follower = tokio::spawn(crate::changes::follow(g.clone()));
        let reporter = tokio::spawn(crate::changes::report(
            g.clone(),
            g.config.served_report_every,
        ));
        let limits = self.gateway.config.limits;
        let app = router(self.gateway, self.metrics);
        if let Some(tls) = &self.tls {
            tls.spawn_reloader();
        }
        let served =
            nexus_core::serve::serve_with(self.listener, app, limits, self.tls, shutdown).await;
        follower.abort();
        reporter.abort();
        // Tokens served from the cache since the last report: audited too.
        g.tokens.set_live(false);
        crate::changes::report_once(&g).await;
        served.map_err(|source| GatewayServeError::Io { addr, source })
    }
}
