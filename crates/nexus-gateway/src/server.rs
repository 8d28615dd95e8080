//! Running the gateway: REST and gRPC on one port (gRPC over HTTP/2, REST
//! over HTTP/1.1 and HTTP/2), CORS for REST, the public pages forwarded.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{header, Method};
use axum::middleware::from_fn;
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
use crate::{proxy, rest};

/// Failures starting or running the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayServeError {
    /// The broker client could not be built.
    #[error(transparent)]
    Client(#[from] nexus_broker::outbound::OutboundError),
    /// Binding or serving failed.
    #[error("listening on {addr}: {source}")]
    Io {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
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
    let api = Router::new()
        .route("/v1/request-connection", post(rest::request_connection))
        .route("/v1/check-connection/{id}", get(rest::check_connection))
        .route("/v1/token/{id}", get(rest::token))
        .route("/v1/refresh/{id}", post(rest::refresh))
        .route("/v1/providers", get(rest::providers))
        .route(
            "/v1/connections/{id}/scope-failures",
            post(rest::scope_failures),
        )
        .route(
            "/v1/workspaces/{id}/connections/status",
            get(rest::workspace_status),
        )
        .layer(cors);
    let public = Router::new()
        .route(&g.config.redirect_path, get(proxy::forward))
        .route("/auth/capture", get(proxy::forward))
        .route("/auth/capture-schema", get(proxy::forward))
        .route("/auth/capture-credential", post(proxy::forward));
    let ops = Router::new()
        .route("/health", get(rest::health))
        .route("/ready", get(rest::ready))
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
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
        .layer(from_fn(nexus_broker::api::error::reject_nul))
        .layer(from_fn(nexus_broker::telemetry::track_requests))
        .layer(from_fn(nexus_broker::api::error::json_errors))
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
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener has an address; fall back to the configured one.
        self.listener
            .local_addr()
            .unwrap_or(self.gateway.config.listen_addr)
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), GatewayServeError> {
        let addr = self.local_addr();
        let app = router(self.gateway, self.metrics);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| GatewayServeError::Io { addr, source })
    }
}
