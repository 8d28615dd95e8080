//! Starting and running the sidecar.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::{any, get};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use nexus_bridge::{Bridge, BridgeError};
use tokio::net::TcpListener;

use crate::config::SidecarConfig;
use crate::forward::{self, Proxy};
use crate::ops;
use crate::upstream::{TlsSetupError, Upstreams};

/// Why the sidecar did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The gateway client could not be built.
    #[error("gateway client: {0}")]
    Bridge(#[from] BridgeError),
    /// The upstream TLS configuration is wrong.
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The reason.
        source: std::io::Error,
    },
}

/// A sidecar bound to its address, ready to run.
pub struct Sidecar {
    listener: TcpListener,
    app: Router,
    limits: nexus_core::serve::Limits,
    addr: SocketAddr,
}

/// The router: `/_nexus/...` for operations, every other path to a route.
pub fn router(proxy: Arc<Proxy>, metrics: PrometheusHandle) -> Router {
    let ops = Router::new()
        .route("/_nexus/health", get(ops::health))
        .route("/_nexus/ready", get(ops::ready))
        .with_state(proxy.clone())
        .route("/_nexus/metrics", get(ops::metrics).with_state(metrics))
        .route("/_nexus", any(ops::unknown))
        .route("/_nexus/{*rest}", any(ops::unknown));
    ops.fallback(forward::handle).with_state(proxy)
}

impl Sidecar {
    /// Builds the clients and binds the address.
    pub async fn start(
        config: SidecarConfig,
        metrics: PrometheusHandle,
    ) -> Result<Self, StartError> {
        let bridge = Bridge::builder(
            config.gateway_url.clone(),
            config.agent_key.expose().clone(),
        )
        .allow_insecure_transport(config.allow_plaintext_gateway)
        .cache_settings(nexus_bridge::CacheSettings {
            recheck: Some(config.recheck),
            ..Default::default()
        })
        .build()?;
        let proxy = Arc::new(Proxy {
            routes: config.routes.clone(),
            bridge,
            upstreams: Upstreams::new(config.ca_file.as_deref())?,
            resolver: Default::default(),
            rate: Default::default(),
            replay_body_max: config.replay_body_max,
            signed_body_max: config.signed_body_max,
            upstream_timeout: config.upstream_timeout,
        });
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen_addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen_addr,
            source,
        })?;
        Ok(Self {
            listener,
            app: router(proxy, metrics),
            limits: config.limits,
            addr,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown`; requests in flight then get the grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> std::io::Result<()> {
        nexus_core::serve::serve(self.listener, self.app, self.limits, shutdown).await
    }
}
