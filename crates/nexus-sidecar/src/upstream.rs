//! The clients that reach upstreams: rustls with the platform's roots (the
//! webpki roots where the platform has none) plus an optional extra CA;
//! HTTP/2 by ALPN over TLS, or by prior knowledge to a plaintext upstream
//! that asks for it; HTTP/1.1 only for protocol upgrades. Redirects are
//! never followed: they go back to the agent. HTTP/1.1 connections are kept
//! by [`crate::pool`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use crate::pool::{Pool, PoolError, Sent};

/// Why the upstream clients could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// The extra CA file is unreadable or holds no certificate.
    #[error("SIDECAR_CA_FILE {path}: {reason}")]
    CaFile {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

type Https = HttpsConnector<HttpConnector>;

/// One worker's clients, sharing one TLS configuration.
#[derive(Debug)]
pub struct Upstreams {
    /// HTTP/1.1 in plaintext, and over TLS to hosts that do not choose
    /// HTTP/2: kept connections without a task per request.
    pool: Pool,
    /// HTTP/2 over TLS, to the hosts that choose it (ALPN).
    auto: Client<Https, Body>,
    /// HTTP/2 by prior knowledge (plaintext upstreams with `http2 = true`).
    h2c: Client<HttpConnector, Body>,
    /// HTTP/1.1 only: protocol upgrades (WebSocket) need it.
    h1: Client<Https, Body>,
}

/// How a request must reach its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// As the host prefers: HTTP/2 over TLS when it chooses it, else HTTP/1.1.
    Negotiated,
    /// HTTP/2 by prior knowledge (a plaintext upstream that asks for it).
    H2c,
    /// HTTP/1.1 on a connection of its own: a protocol switch takes it over.
    Upgrade,
}

/// Why an upstream gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// From the kept HTTP/1.1 connections.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// From hyper-util's client.
    #[error(transparent)]
    Client(#[from] hyper_util::client::legacy::Error),
}

impl UpstreamError {
    /// Whether no connection could be made at all (as opposed to one
    /// failing mid-request).
    pub fn is_connect(&self) -> bool {
        match self {
            Self::Pool(e) => matches!(e, PoolError::Connect(_) | PoolError::NoAuthority),
            Self::Client(e) => e.is_connect(),
        }
    }
}

fn roots(extra_ca: Option<&Path>) -> Result<rustls::RootCertStore, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = extra_ca {
        let bad = |reason: String| TlsSetupError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("no PEM certificate in it".into()));
        }
        for c in certs {
            roots.add(c)?;
        }
    }
    Ok(roots)
}

/// Time to connect to an upstream.
const CONNECT: Duration = Duration::from_secs(5);
/// Time an upstream connection is kept unused.
const IDLE: Duration = Duration::from_secs(30);

fn connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT));
    http
}

/// TLS (offering HTTP/2 with `h2`) or plaintext, by the URI's scheme.
fn https(tls: &rustls::ClientConfig, h2: bool) -> Https {
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http();
    if h2 {
        b.enable_all_versions().wrap_connector(connector())
    } else {
        b.enable_http1().wrap_connector(connector())
    }
}

/// A worker's pool of HTTP/1.1 connections as the sidecar makes it (also
/// the benchmark floor's, `examples/hyper_proxy.rs`).
pub fn pool(tls: &rustls::ClientConfig) -> Pool {
    Pool::new(https(tls, true), IDLE)
}

/// The TLS configuration of every upstream client: the platform's roots
/// plus `extra_ca`, on the ring provider (set here, not taken from a
/// process default). Built once; each worker's clients share it.
pub fn client_tls(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(extra_ca)?)
        .with_no_client_auth())
}

impl Upstreams {
    /// The clients, on `tls` (see [`client_tls`]).
    pub fn new(tls: &rustls::ClientConfig) -> Self {
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_timer(TokioTimer::new())
                .pool_idle_timeout(IDLE)
                .timer(TokioTimer::new());
            b
        };
        Self {
            pool: pool(tls),
            auto: builder().build(https(tls, true)),
            h2c: builder().http2_only(true).build(connector()),
            h1: builder().build(https(tls, false)),
        }
    }

    /// Sends `req` (absolute URI) to its upstream; the answer's head.
    pub async fn send(
        &self,
        req: axum::http::Request<Body>,
        via: Via,
    ) -> Result<axum::http::Response<hyper::body::Incoming>, UpstreamError> {
        Ok(match via {
            Via::H2c => self.h2c.request(req).await?,
            Via::Upgrade => self.h1.request(req).await?,
            Via::Negotiated => match self.pool.send(req).await? {
                Sent::Answer(answer) => answer,
                Sent::Http2(req) => self.auto.request(req).await?,
            },
        })
    }
}
