//! Long-lived WebSocket connections that always carry working credentials:
//! dial with fresh ones, re-dial before they expire, back off on failure,
//! stop when a person must act.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::credentials::Credentials;
use crate::error::BridgeError;
use crate::Bridge;

/// The socket a session gets.
pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The work is done: the keeper returns.
    Done,
    /// Dial again (the peer closed, or a re-dial was requested).
    Redial,
}

/// Tells a session that the keeper wants to re-dial (the credentials are
/// about to expire): finish up and return [`SessionEnd::Redial`].
#[derive(Debug)]
pub struct Redial(tokio::sync::watch::Receiver<bool>);

impl Redial {
    /// Resolves when a re-dial is requested.
    pub async fn requested(&mut self) {
        let _ = self.0.wait_for(|r| *r).await;
    }
}

/// Timing of a [`WsKeeper`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeeperOptions {
    /// Re-dial this long before the credentials expire (at most a quarter
    /// of their lifetime left at dialling).
    pub redial_before: Duration,
    /// How long a session may take to wind up after a re-dial request
    /// before it is dropped.
    pub grace: Duration,
    /// First backoff after a failed dial (doubling, full jitter).
    pub backoff_base: Duration,
    /// Longest backoff.
    pub backoff_cap: Duration,
}

impl Default for KeeperOptions {
    fn default() -> Self {
        Self {
            redial_before: Duration::from_secs(30),
            grace: Duration::from_secs(5),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
        }
    }
}

/// Keeps a WebSocket to `url` open with a connection's credentials; see
/// [`Bridge::ws_keeper`].
#[derive(Debug)]
pub struct WsKeeper {
    bridge: Bridge,
    connection: String,
    url: String,
    options: KeeperOptions,
}

impl WsKeeper {
    pub(crate) fn new(bridge: Bridge, connection: &str, url: &str) -> Self {
        Self {
            bridge,
            connection: connection.into(),
            url: url.into(),
            options: KeeperOptions::default(),
        }
    }

    /// Other timing.
    pub fn options(mut self, options: KeeperOptions) -> Self {
        self.options = options;
        self
    }

    /// Runs `session` on each socket until one returns [`SessionEnd::Done`]
    /// (then `Ok`), or the connection needs a person, the agent key is
    /// refused or the connection is unknown (then that error). Dial failures
    /// and dropped sockets are retried with capped exponential backoff.
    pub async fn run<F, Fut>(&self, mut session: F) -> Result<(), BridgeError>
    where
        F: FnMut(Socket, Redial) -> Fut,
        Fut: Future<Output = SessionEnd>,
    {
        let url = url::Url::parse(&self.url)
            .map_err(|e| BridgeError::Config(format!("WebSocket URL '{}': {e}", self.url)))?;
        crate::gateway::check_transport(&url, self.bridge.allows_insecure())?;
        let mut failures: u32 = 0;
        loop {
            let creds = match self.bridge.token(&self.connection).await {
                Ok(c) => c,
                Err(e) if fatal(&e) => return Err(e),
                Err(_) => {
                    failures += 1;
                    self.pause(failures).await;
                    continue;
                }
            };
            let ws = match self.dial(&creds).await {
                Ok(ws) => ws,
                Err(refused) => {
                    metrics::counter!("nexus_bridge_ws_dials_total", "outcome" => "failed")
                        .increment(1);
                    if refused {
                        // The peer turned the credentials down: ask for new ones.
                        match self
                            .bridge
                            .refresh_after(&self.connection, creds.generation)
                            .await
                        {
                            Err(e) if fatal(&e) => return Err(e),
                            _ => {}
                        }
                    }
                    failures += 1;
                    self.pause(failures).await;
                    continue;
                }
            };
            metrics::counter!("nexus_bridge_ws_dials_total", "outcome" => "ok").increment(1);
            failures = 0;
            let (tx, rx) = tokio::sync::watch::channel(false);
            let work = session(ws, Redial(rx));
            tokio::pin!(work);
            let end = match self.redial_at(&creds) {
                None => work.await,
                Some(at) => tokio::select! {
                    end = &mut work => end,
                    _ = tokio::time::sleep_until(at.into()) => {
                        tx.send_replace(true);
                        tokio::time::timeout(self.options.grace, &mut work)
                            .await
                            .unwrap_or(SessionEnd::Redial)
                    }
                },
            };
            if end == SessionEnd::Done {
                return Ok(());
            }
        }
    }

    /// When to re-dial: before the credentials expire (never sooner than a
    /// second from now), or never for credentials without expiry.
    fn redial_at(&self, creds: &Credentials) -> Option<Instant> {
        let left = creds
            .expires_at?
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let margin = self.options.redial_before.min(left / 4);
        Some(Instant::now() + left.saturating_sub(margin).max(Duration::from_secs(1)))
    }

    /// One dial; `Err(true)` when the peer refused the credentials (401/403).
    async fn dial(&self, creds: &Credentials) -> Result<Socket, bool> {
        let req = self.url.as_str().into_client_request().map_err(|_| false)?;
        let (mut parts, ()) = req.into_parts();
        crate::strategy::apply_parts(creds, &mut parts).map_err(|_| false)?;
        let req = http::Request::from_parts(parts, ());
        let tls = crate::gateway::tls_config().map_err(|_| false)?;
        let connector = tokio_tungstenite::Connector::Rustls(Arc::new(tls));
        match tokio_tungstenite::connect_async_tls_with_config(req, None, false, Some(connector))
            .await
        {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                Err(matches!(resp.status().as_u16(), 401 | 403))
            }
            Err(_) => Err(false),
        }
    }

    async fn pause(&self, failures: u32) {
        let o = &self.options;
        tokio::time::sleep(crate::cache::backoff(
            o.backoff_base,
            o.backoff_cap,
            failures,
        ))
        .await;
    }
}

/// Errors no amount of re-dialling fixes.
fn fatal(e: &BridgeError) -> bool {
    matches!(
        e,
        BridgeError::InteractionRequired { .. }
            | BridgeError::Unauthorized(_)
            | BridgeError::NotFound(_)
            | BridgeError::UnknownStrategy(_)
            | BridgeError::Strategy { .. }
            | BridgeError::InsecureTransport(_)
            | BridgeError::Config(_)
    )
}
