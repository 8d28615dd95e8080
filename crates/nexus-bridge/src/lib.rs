//! Nexus bridge: the client library an agent embeds.
//!
//! Give it the gateway's URL, an agent key and a connection id, and make
//! requests as usual: the bridge fetches the connection's strategy and usage
//! secrets from the gateway, keeps them (refreshed before they expire,
//! single-flight), applies them to every request (SPEC §5: `oauth2`,
//! `header`, `query_param`, `basic_auth`, `aws_sigv4`, `hmac_payload`), and
//! runs the agent loop: a 401 from the provider forces one refresh and one
//! retry; a 403 is reported as a scope failure (SPEC §8) and returned.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let bridge = nexus_bridge::Bridge::builder("http://127.0.0.1:8090", std::env::var("AGENT_KEY")?).build()?;
//! let api = bridge.agent_client("conn_123").build()?;
//! let events = api.get("https://www.googleapis.com/calendar/v3/users/me/calendarList").send().await?;
//! println!("{}", events.status());
//! # Ok(()) }
//! ```
//!
//! When a person must act (the grant was revoked, the connection needs
//! re-consent), calls fail with [`BridgeError::InteractionRequired`], which
//! the bridge never retries; find it in a middleware error with
//! [`BridgeError::of`].
//!
//! Plaintext HTTP is allowed to loopback only, for the gateway and for the
//! requests credentials are applied to, unless
//! [`BridgeBuilder::allow_insecure_transport`] says otherwise. TLS is rustls.
//!
//! Metrics (the `metrics` crate; install any recorder):
//! `nexus_bridge_fetches_total{kind,outcome}`, `nexus_bridge_errors_total{kind}`,
//! `nexus_bridge_reports_total{outcome}`.

#![warn(missing_docs)]

mod agent;
mod cache;
pub mod credentials;
pub mod error;
pub mod gateway;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod keeper;
pub mod layer;
mod secret;
pub mod sigv4;
pub mod strategy;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use agent::{best_hint, scope_report, NexusAuth, RequiredScopes, ScopeHint};
pub use cache::CacheSettings;
pub use credentials::{Credentials, Strategy};
pub use error::BridgeError;
pub use gateway::{ConnectionRequest, ConsentSpec, GatewayClient, ScopeReport};
pub use keeper::{KeeperOptions, Redial, SessionEnd, WsKeeper};
pub use layer::NexusAuthLayer;
pub use secret::Secret;

/// A `reqwest` client whose requests carry a connection's credentials.
pub type AgentClient = reqwest_middleware::ClientWithMiddleware;

/// A bridge to one gateway with one agent key. Cheap to clone.
#[derive(Clone)]
pub struct Bridge {
    inner: Arc<Inner>,
}

struct Inner {
    gateway: GatewayClient,
    cache: cache::CredentialCache,
    reporter: agent::Reporter,
    allow_insecure: bool,
    timeout: Duration,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("gateway", &self.inner.gateway)
            .finish_non_exhaustive()
    }
}

/// Configures a [`Bridge`].
#[derive(Debug)]
pub struct BridgeBuilder {
    gateway_url: String,
    agent_key: Secret,
    allow_insecure: bool,
    timeout: Duration,
    cache: CacheSettings,
    gateway_ca_pem: Vec<u8>,
    gateway_identity: Option<gateway::ClientIdentityPem>,
    #[cfg(feature = "grpc")]
    grpc: bool,
}

impl BridgeBuilder {
    /// Talks to the gateway over gRPC instead of REST (feature `grpc`).
    #[cfg(feature = "grpc")]
    pub fn grpc(mut self, on: bool) -> Self {
        self.grpc = on;
        self
    }

    /// Allows plaintext HTTP to hosts other than loopback (gateway and
    /// provider). Off by default: credentials would cross the network in clear.
    pub fn allow_insecure_transport(mut self, allow: bool) -> Self {
        self.allow_insecure = allow;
        self
    }

    /// Timeout of each gateway call and of each agent request (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Trusts the CA certificates in `pem` (PEM) for the gateway's TLS too,
    /// besides the webpki roots: a private or development CA.
    pub fn gateway_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.gateway_ca_pem = pem.into();
        self
    }

    /// Presents this client certificate (PEM chain) and key (PEM) to a
    /// gateway that asks for one (mutual TLS).
    pub fn gateway_client_identity_pem(
        mut self,
        cert: impl Into<Vec<u8>>,
        key: impl Into<String>,
    ) -> Self {
        self.gateway_identity = Some(gateway::ClientIdentityPem {
            cert: cert.into(),
            key: Secret::new(key),
        });
        self
    }

    /// How credentials are kept and re-fetched.
    pub fn cache_settings(mut self, settings: CacheSettings) -> Self {
        self.cache = settings;
        self
    }

    /// The bridge.
    pub fn build(self) -> Result<Bridge, BridgeError> {
        let gateway = GatewayClient::with_tls(
            &self.gateway_url,
            self.agent_key,
            self.allow_insecure,
            self.timeout,
            &self.gateway_ca_pem,
            self.gateway_identity,
        )?;
        #[cfg(feature = "grpc")]
        let gateway = if self.grpc {
            gateway.over_grpc(self.timeout)?
        } else {
            gateway
        };
        Ok(Bridge {
            inner: Arc::new(Inner {
                cache: cache::CredentialCache::new(gateway.clone(), self.cache),
                reporter: agent::Reporter::new(gateway.clone()),
                gateway,
                allow_insecure: self.allow_insecure,
                timeout: self.timeout,
            }),
        })
    }
}

/// Builds an [`AgentClient`] for one connection.
#[derive(Debug)]
pub struct AgentClientBuilder {
    bridge: Bridge,
    connection: String,
    hints: Vec<ScopeHint>,
}

impl AgentClientBuilder {
    /// Scopes the routes under `path_prefix` need (for `method`, or any
    /// with `None`), reported when the provider answers them with 403.
    pub fn scope_hint(
        mut self,
        method: Option<http::Method>,
        path_prefix: &str,
        scopes: &[&str],
    ) -> Self {
        self.hints.push(ScopeHint {
            method,
            path_prefix: path_prefix.to_string(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        });
        self
    }

    /// The client (rustls, redirects followed; `reqwest` drops credentials
    /// on a redirect to another host).
    pub fn build(self) -> Result<AgentClient, BridgeError> {
        let http = gateway::http_client(self.bridge.inner.timeout, true)?;
        let auth = NexusAuth::new(self.bridge, &self.connection, self.hints);
        Ok(reqwest_middleware::ClientBuilder::new(http)
            .with(auth)
            .build())
    }
}

impl Bridge {
    /// A bridge to the gateway at `gateway_url` using `agent_key` (`nxa_...`).
    pub fn builder(gateway_url: impl Into<String>, agent_key: impl Into<String>) -> BridgeBuilder {
        BridgeBuilder {
            gateway_url: gateway_url.into(),
            agent_key: Secret::new(agent_key.into()),
            allow_insecure: false,
            timeout: Duration::from_secs(30),
            cache: CacheSettings::default(),
            gateway_ca_pem: Vec::new(),
            gateway_identity: None,
            #[cfg(feature = "grpc")]
            grpc: false,
        }
    }

    /// The gateway client (every REST call, uncached).
    pub fn gateway(&self) -> &GatewayClient {
        &self.inner.gateway
    }

    /// Starts a handshake: send the person to the answer's `auth_url`.
    pub async fn request_connection(
        &self,
        req: &ConnectionRequest,
    ) -> Result<ConsentSpec, BridgeError> {
        self.inner.gateway.request_connection(req).await
    }

    /// The connection's status (`pending`, `active`, `degraded`, ...).
    pub async fn check_connection(&self, id: &str) -> Result<String, BridgeError> {
        self.inner.gateway.check_connection(id).await
    }

    /// Waits until the connection can serve (`active` or `degraded`),
    /// checking with growing pauses; `InteractionRequired` when it ended
    /// otherwise, `Timeout` after `timeout`.
    pub async fn wait_for_active(&self, id: &str, timeout: Duration) -> Result<(), BridgeError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(250);
        loop {
            match self.check_connection(id).await {
                Ok(s) if s == "active" || s == "degraded" => return Ok(()),
                Ok(s) if s != "pending" => {
                    return Err(BridgeError::InteractionRequired {
                        message: format!("the connection is {s}"),
                        code: s,
                    })
                }
                Ok(_) => {}
                Err(e) if e.is_retryable() => {}
                Err(e) => return Err(e),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BridgeError::Timeout(format!(
                    "connection {id} not active after {timeout:?}"
                )));
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// The connection's credentials (cached; see [`CacheSettings`]).
    pub async fn token(&self, id: &str) -> Result<Arc<Credentials>, BridgeError> {
        self.inner.cache.get(id).await
    }

    /// Refreshes now and returns the new credentials.
    pub async fn refresh(&self, id: &str) -> Result<Arc<Credentials>, BridgeError> {
        let seen = self.inner.cache.generation(id);
        self.inner.cache.refreshed(id, seen).await
    }

    /// New credentials after the provider refused those of `generation`
    /// ([`Credentials::generation`]): one refresh however many requests saw
    /// the refusal; those arriving after it get its result.
    pub async fn refresh_after(
        &self,
        id: &str,
        generation: u64,
    ) -> Result<Arc<Credentials>, BridgeError> {
        self.inner.cache.refreshed(id, generation).await
    }

    /// Forgets the cached credentials of `id` and an answer held because a
    /// person must act: the next [`Self::token`] asks the gateway (after a
    /// person was sent to consent again, their new grant is then used at
    /// once). A passing failure keeps its backoff.
    pub fn forget(&self, id: &str) {
        self.inner.cache.forget(id);
    }

    /// Reports a scope failure (or success) now and waits for the answer.
    pub async fn report_scope_failure(
        &self,
        id: &str,
        report: &ScopeReport,
    ) -> Result<serde_json::Value, BridgeError> {
        self.inner.gateway.report_scope_failure(id, report).await
    }

    /// A client for the connection's provider API (see [`AgentClientBuilder`]).
    pub fn agent_client(&self, connection_id: &str) -> AgentClientBuilder {
        AgentClientBuilder {
            bridge: self.clone(),
            connection: connection_id.to_string(),
            hints: Vec::new(),
        }
    }

    /// The middleware alone, for a `reqwest_middleware` stack of your own.
    pub fn middleware(&self, connection_id: &str) -> NexusAuth {
        NexusAuth::new(self.clone(), connection_id, Vec::new())
    }

    /// A tower layer adding the connection's credentials to every request
    /// of a hyper or tonic client (e.g. around a gRPC `Channel`).
    pub fn layer(&self, connection_id: &str) -> NexusAuthLayer {
        NexusAuthLayer::new(self.clone(), connection_id)
    }

    /// A keeper of WebSocket connections to `url` with the connection's
    /// credentials (see [`WsKeeper::run`]).
    pub fn ws_keeper(&self, connection_id: &str, url: &str) -> WsKeeper {
        WsKeeper::new(self.clone(), connection_id, url)
    }

    pub(crate) fn reporter(&self) -> &agent::Reporter {
        &self.inner.reporter
    }

    /// Sends a scope report in the background, as the agent loop does: the
    /// same report at most once a minute, a few in flight at most (more are
    /// dropped and counted in `nexus_bridge_reports_total`).
    pub fn report_in_background(&self, connection_id: &str, report: ScopeReport) {
        self.inner.reporter.submit(connection_id, report);
    }

    pub(crate) fn allows_insecure(&self) -> bool {
        self.inner.allow_insecure
    }
}
