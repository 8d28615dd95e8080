//! Starting and running the sidecar.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::routing::{any, get};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use nexus_bridge::{Bridge, BridgeError};
use tokio::sync::{mpsc, watch};

use crate::config::SidecarConfig;
use crate::forward::{self, Proxy, RouteMetrics, Worker};
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
    UpstreamTls(#[from] TlsSetupError),
    /// The TLS certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] nexus_core::tls::TlsError),
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
    listeners: Vec<std::net::TcpListener>,
    proxy: Arc<Proxy>,
    metrics: PrometheusHandle,
    upstream_tls: rustls::ClientConfig,
    limits: nexus_core::serve::Limits,
    tls: Option<Arc<nexus_core::tls::TlsServer>>,
    addr: SocketAddr,
}

/// What one worker serves: `/_nexus/...` through a router (operations),
/// every other path straight to [`forward::handle`] (a route), without the
/// router's matching and layers on the proxied path.
#[derive(Clone)]
pub struct Entry {
    ops: Router,
    worker: Arc<Worker>,
}

impl Entry {
    /// The operations router and the proxy of `worker`.
    pub fn new(worker: Arc<Worker>, metrics: PrometheusHandle) -> Self {
        let ops = Router::new()
            .route("/_nexus/health", get(ops::health))
            .route("/_nexus/ready", get(ops::ready))
            .with_state(worker.proxy.clone())
            .route("/_nexus/metrics", get(ops::metrics).with_state(metrics))
            .route("/_nexus", any(ops::unknown))
            .route("/_nexus/{*rest}", any(ops::unknown));
        Self { ops, worker }
    }
}

type Answer = Result<axum::response::Response, Infallible>;

impl tower::Service<axum::extract::Request> for Entry {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = futures_util::future::Either<
        <Router as tower::Service<axum::extract::Request>>::Future,
        std::pin::Pin<Box<dyn Future<Output = Answer> + Send>>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both sides are always ready (a router is).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::extract::Request) -> Self::Future {
        let path = req.uri().path();
        if path == "/_nexus" || path.starts_with("/_nexus/") {
            futures_util::future::Either::Left(self.ops.call(req))
        } else {
            let worker = self.worker.clone();
            futures_util::future::Either::Right(Box::pin(async move {
                Ok(forward::handle(worker, req).await)
            }))
        }
    }
}

/// `workers` listening sockets on `addr` with `SO_REUSEPORT`: the kernel
/// spreads connections over them, one per worker thread (as nginx's
/// workers). Listening from here on, so a client may connect as soon as
/// `start` returns. The listeners and the address bound (port 0 picks one).
pub fn bind(
    addr: SocketAddr,
    workers: usize,
) -> std::io::Result<(Vec<std::net::TcpListener>, SocketAddr)> {
    use socket2::{Domain, Protocol, Socket, Type};
    if addr.port() != 0 {
        // SO_REUSEPORT would let a second sidecar on the same port share the
        // connections silently: a plain bind first says "in use" instead.
        drop(std::net::TcpListener::bind(addr)?);
    }
    let mut listeners = Vec::with_capacity(workers);
    let mut bound = addr;
    for _ in 0..workers.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&bound.into())?;
        socket.listen(1024)?;
        let listener = std::net::TcpListener::from(socket);
        // Port 0 picks a port once; the others join it.
        bound = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok((listeners, bound))
}

impl Sidecar {
    /// Builds the shared parts and binds the address (one socket per worker).
    pub async fn start(
        config: SidecarConfig,
        metrics: PrometheusHandle,
    ) -> Result<Self, StartError> {
        let bridge = Bridge::builder(
            config.gateway_url.clone(),
            config.agent_key.expose().clone(),
        )
        .allow_insecure_transport(config.allow_plaintext_gateway)
        .gateway_ca_pem(config.gateway_ca_pem.clone());
        let bridge = match &config.gateway_identity {
            Some(id) => bridge.gateway_client_identity_pem(id.cert.clone(), id.key.expose()),
            None => bridge,
        };
        let bridge = bridge
            .cache_settings(nexus_bridge::CacheSettings {
                recheck: Some(config.recheck),
                ..Default::default()
            })
            .build()?;
        // Read once, here: a bad CA file stops the start, not a worker.
        let upstream_tls = crate::upstream::client_tls(config.ca_file.as_deref())?;
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(nexus_core::tls::TlsServer::load(files.clone())?)),
            None => None,
        };
        let proxy = Arc::new(Proxy {
            metrics: config
                .routes
                .iter()
                .map(|r| (r.name.clone(), RouteMetrics::new(&r.name)))
                .collect(),
            routes: config.routes.clone(),
            bridge,
            resolver: Default::default(),
            rate: Default::default(),
            elicitations: Default::default(),
            replay_body_max: config.replay_body_max,
            signed_body_max: config.signed_body_max,
            upstream_timeout: config.upstream_timeout,
        });
        let (listeners, addr) =
            bind(config.listen_addr, config.workers).map_err(|source| StartError::Bind {
                addr: config.listen_addr,
                source,
            })?;
        Ok(Self {
            listeners,
            proxy,
            metrics,
            upstream_tls,
            limits: config.limits,
            tls,
            addr,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `shutdown`: each worker on its own thread with a
    /// single-threaded runtime; then requests in flight get the grace
    /// period. A worker that fails stops them all.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> std::io::Result<()> {
        let (stop, stopped) = watch::channel(false);
        let (report, mut ended) = mpsc::unbounded_channel::<std::io::Result<()>>();
        if let Some(tls) = &self.tls {
            tls.spawn_reloader();
        }
        let mut started = 0;
        let mut failure = None;
        for (i, listener) in self.listeners.into_iter().enumerate() {
            let upstreams = Upstreams::new(&self.upstream_tls);
            let worker = Arc::new(Worker {
                proxy: self.proxy.clone(),
                upstreams,
            });
            let app = Entry::new(worker, self.metrics.clone());
            let limits = self.limits;
            let tls = self.tls.clone();
            let mut stopped = stopped.clone();
            let report = report.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nexus-sidecar-{i}"))
                .spawn(move || {
                    let served = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .and_then(|rt| {
                            rt.block_on(async move {
                                let listener = tokio::net::TcpListener::from_std(listener)?;
                                let stop = async move {
                                    let _ = stopped.wait_for(|s| *s).await;
                                };
                                nexus_core::serve::serve_with(listener, app, limits, tls, stop)
                                    .await
                            })
                        });
                    let _ = report.send(served);
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(report);
        let mut result = match failure {
            Some(e) => Err(e),
            None => {
                tokio::select! {
                    () = shutdown => Ok(()),
                    early = ended.recv() => {
                        started -= 1;
                        Err(match early {
                            Some(Err(e)) => e,
                            _ => std::io::Error::other("a sidecar worker stopped on its own"),
                        })
                    }
                }
            }
        };
        let _ = stop.send(true);
        for _ in 0..started {
            if let Some(Err(e)) = ended.recv().await {
                result = result.and(Err(e));
            }
        }
        result
    }
}
