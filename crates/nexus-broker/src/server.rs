//! Running the broker: connect, migrate, bind, serve, shut down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::BrokerConfig;
use crate::events::audit::AuditWriter;
use crate::oauth::shared_cache::SharedCache;
use crate::store::{Store, StoreError};
use nexus_core::telemetry;

/// Failures while starting or running the broker.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened or migrated.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// The outbound HTTP client could not be built.
    #[error(transparent)]
    Outbound(#[from] nexus_core::outbound::OutboundError),
    /// `REDIS_URL` is set but Redis cannot be reached.
    #[error(transparent)]
    Redis(#[from] crate::oauth::shared_cache::SharedCacheError),
    /// Stored secrets use keys the configured ring does not hold.
    #[error("{0}")]
    MissingKeys(String),
    /// The TLS certificate or key is unusable.
    #[error(transparent)]
    Tls(#[from] nexus_core::tls::TlsError),
    /// The listen address could not be bound or the server failed.
    #[error("listening on {addr}: {source}")]
    Io {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// A broker that is bound and ready to serve.
pub struct Broker {
    state: AppState,
    writer: AuditWriter,
    listener: TcpListener,
    tls: Option<Arc<nexus_core::tls::TlsServer>>,
}

impl Broker {
    /// Opens the store (applying migrations), starts the audit writer and binds
    /// `config.listen_addr` (port 0 picks a free port).
    pub async fn start(config: BrokerConfig) -> Result<Self, ServeError> {
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(nexus_core::tls::TlsServer::load_with(
                files.clone(),
                config.client_auth.as_ref(),
            )?)),
            None => None,
        };
        if !config.listen_addr.ip().is_loopback() {
            if tls.is_none() {
                tracing::warn!(addr = %config.listen_addr, "the broker serves plaintext HTTP on a non-loopback address: set TLS_CERT_FILE and TLS_KEY_FILE, or keep it on a private network");
            }
            if config.allowed_cidrs.is_empty() {
                tracing::warn!("ALLOWED_CIDRS is not set: any address that reaches the broker may try its admin API");
            }
        }
        let store = Store::connect(&config.database_url).await?;
        store.migrate().await?;
        check_key_ring(&store, &config).await?;
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| ServeError::Io {
                addr: config.listen_addr,
                source,
            })?;
        let shared = match &config.redis_url {
            Some(url) => Some(SharedCache::connect(url, &config.redis_key_prefix).await?),
            None => None,
        };
        let writer = AuditWriter::spawn(store.clone(), config.audit);
        let state = AppState::new(
            config,
            store,
            writer.sink(),
            telemetry::metrics_handle(),
            shared,
        )?;
        let config = state.config();
        state
            .webhooks()
            .sync_env(
                config.webhook.as_ref().map(|w| &w.0),
                config.webhook.as_ref().map(|w| w.1.as_ref()),
            )
            .await?;
        if config.issuance_paused {
            let actor = crate::events::audit::Actor {
                name: "config".into(),
                ip: None,
                user_agent: None,
                client_identity: None,
            };
            state
                .pauses()
                .pause(
                    crate::store::PauseScope::Operator,
                    "NEXUS_ISSUANCE_PAUSED=true at start-up".into(),
                    &actor,
                )
                .await?;
            tracing::warn!(
                "token issuance is paused (NEXUS_ISSUANCE_PAUSED); resume with DELETE /admin/pause"
            );
        }
        state.pauses().reload().await?;
        Ok(Self {
            state,
            writer,
            listener,
            tls,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        // A bound TcpListener always has a local address; fall back to the configured one.
        self.listener
            .local_addr()
            .unwrap_or(self.state.config().listen_addr)
    }

    /// Shared state (for embedding the broker in another process).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests,
    /// flushes the audit queue and closes the database.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let addr = self.local_addr();
        let app = api::router(self.state.clone());
        let cleanup = tokio::spawn(cleanup_loop(self.state.clone()));
        let invalidation = tokio::spawn(self.state.tokens().clone().run_invalidation());
        // Never aborted mid-flush (events in hand would be lost): it stops
        // between flushes, then the last flush runs below.
        let (stop_issued, mut issued_stopped) = tokio::sync::watch::channel(false);
        let issued = {
            let tokens = self.state.tokens().clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick.tick() => tokens.flush_issued().await,
                        _ = issued_stopped.changed() => return,
                    }
                }
            })
        };
        let pauses = tokio::spawn(
            self.state
                .pauses()
                .clone()
                .run(self.state.config().pause_reload),
        );
        let (stop_deliveries, stop_d) = tokio::sync::watch::channel(false);
        let deliverer = self
            .state
            .config()
            .webhooks
            .worker
            .then(|| tokio::spawn(self.state.webhooks().clone().run_worker(stop_d)));
        let (stop_refresher, stop) = tokio::sync::watch::channel(false);
        let refresher = self
            .state
            .config()
            .refresh
            .worker
            .then(|| tokio::spawn(self.state.tokens().refresher().clone().run_worker(stop)));
        let limits = self.state.config().limits;
        if let Some(tls) = &self.tls {
            tls.spawn_reloader();
        }
        let served = nexus_core::serve::serve_with(self.listener, app, limits, self.tls, {
            // Change streams never end by themselves: end them when shutdown
            // begins, or draining would wait for them forever.
            let edge = self.state.tokens().edge().clone();
            async move {
                shutdown.await;
                edge.close();
            }
        })
        .await;
        cleanup.abort();
        invalidation.abort();
        pauses.abort();
        if let Some(mut d) = deliverer {
            // Attempts in flight record their result (else they are retried
            // after the lease: at least once either way).
            let _ = stop_deliveries.send(true);
            let grace = self.state.config().webhooks.timeout + Duration::from_secs(5);
            if tokio::time::timeout(grace, &mut d).await.is_err() {
                tracing::warn!("webhook worker did not stop in time; aborting it");
                d.abort();
            }
        }
        if let Some(mut r) = refresher {
            // Let refreshes in flight store their result (a rotated refresh
            // token must not be lost); each is bounded by the provider
            // timeout, and the lease bounds the whole batch.
            let _ = stop_refresher.send(true);
            let grace = self.state.config().refresh.lease + Duration::from_secs(5);
            if tokio::time::timeout(grace, &mut r).await.is_err() {
                tracing::warn!("refresh worker did not stop in time; aborting it");
                r.abort();
            }
        }
        // Refreshes started by requests (whose callers may be gone) and
        // late commits of rotated tokens: stopping must not cut them.
        let left = self
            .state
            .tokens()
            .refresher()
            .drain(self.state.config().refresh.lease + Duration::from_secs(5))
            .await;
        if left > 0 {
            tracing::error!(
                running = left,
                "refreshes still running at shutdown; a rotated refresh token they hold is lost"
            );
        }
        let _ = stop_issued.send(true);
        let _ = issued.await;
        self.state.tokens().flush_issued().await;
        let stats = self.writer.shutdown().await;
        tracing::info!(
            written = stats.written,
            dropped = stats.dropped,
            "audit writer flushed"
        );
        self.state.store().close().await;
        served.map_err(|source| ServeError::Io { addr, source })
    }
}

/// Refuses to start when stored secrets were written under a key id that
/// the ring no longer holds: better one clear line at start-up than failed
/// decryptions later.
async fn check_key_ring(store: &Store, config: &BrokerConfig) -> Result<(), ServeError> {
    let prefixes: Vec<String> = config
        .keys
        .key_ids()
        .map(|id| format!("{}.{id}.", crate::vault::ENVELOPE_VERSION))
        .collect();
    let mut unreadable = 0;
    for col in crate::store::ENCRYPTED_COLUMNS {
        unreadable += store.count_outside_keys(col, &prefixes).await?;
    }
    if unreadable > 0 {
        let ids: Vec<&str> = config.keys.key_ids().collect();
        return Err(ServeError::MissingKeys(format!(
            "ENCRYPTION_KEY(S): {unreadable} stored secret(s) use a key id not in the key ring ({}); add the old key back (after the active one) and run `nexus keys rewrap` before removing it",
            ids.join(", ")
        )));
    }
    Ok(())
}

/// Removes expired handshakes and abandoned pending connections every minute.
async fn cleanup_loop(state: AppState) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tick.tick().await;
        match state.handshakes().cleanup().await {
            Ok((0, 0)) => {}
            Ok((handshakes, connections)) => {
                tracing::info!(
                    handshakes,
                    connections,
                    "removed expired handshakes and abandoned pending connections"
                )
            }
            Err(e) => tracing::warn!(error = %e, "handshake cleanup failed"),
        }
        // Webhook history is kept for a week after the last delivery ended.
        let week_ago = crate::store::now_ms() - 7 * 24 * 3600 * 1000;
        match state.store().prune_webhooks(week_ago).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "pruned old webhook events"),
            Err(e) => tracing::warn!(error = %e, "webhook pruning failed"),
        }
    }
}
