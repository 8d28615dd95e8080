//! Outbound HTTP to providers: timeouts, bounded bodies, no redirects.
//!
//! Token, discovery and JWKS endpoints are called with a client that never
//! follows redirects (a redirect on a token endpoint is a misconfiguration or
//! an attack, and following it could carry the code or secret elsewhere) and
//! that reads at most [`MAX_BODY`] bytes of any answer.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;

/// Largest provider response read, in bytes.
pub const MAX_BODY: usize = 1024 * 1024;

/// Failures talking to a provider. Messages never include response bodies,
/// which can carry tokens.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    /// Could not connect, TLS failed, or the request timed out.
    #[error("provider unreachable: {0}")]
    Transport(String),
    /// The response body exceeded [`MAX_BODY`].
    #[error("provider response larger than {MAX_BODY} bytes")]
    TooLarge,
    /// The HTTP client could not be built.
    #[error("HTTP client setup failed: {0}")]
    Setup(String),
}

/// A provider's answer, body already read (bounded).
#[derive(Debug)]
pub struct Fetched {
    /// Status code.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body bytes (at most [`MAX_BODY`]).
    pub body: Vec<u8>,
}

impl Fetched {
    /// True when `Content-Type` says JSON (`application/json`, `application/*+json`).
    pub fn is_json(&self) -> bool {
        self.headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .is_some_and(|ct| {
                ct == "application/json"
                    || (ct.starts_with("application/") && ct.ends_with("+json"))
            })
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Builds the provider client: rustls on ring (set explicitly, not taken from
/// a process-wide default), webpki roots, no redirects, timeouts.
pub fn client(timeout: Duration) -> Result<reqwest::Client, OutboundError> {
    builder(Duration::from_secs(5).min(timeout))?
        .timeout(timeout)
        .build()
        .map_err(|e| OutboundError::Setup(e.to_string()))
}

/// Like [`client`], for calls that carry secrets to addresses a profile or
/// a discovery document names: every name is resolved through the egress
/// policy (see [`crate::egress`]).
pub fn guarded_client(
    timeout: Duration,
    egress: Arc<crate::egress::Egress>,
) -> Result<reqwest::Client, OutboundError> {
    builder(Duration::from_secs(5).min(timeout))?
        .timeout(timeout)
        .dns_resolver(Arc::new(crate::egress::EgressResolver(egress)))
        .build()
        .map_err(|e| OutboundError::Setup(e.to_string()))
}

/// Like [`client`], for long-lived streamed answers: no limit on the whole
/// exchange, but each read must arrive within `idle`.
pub fn streaming_client(idle: Duration) -> Result<reqwest::Client, OutboundError> {
    builder(Duration::from_secs(5).min(idle))?
        .read_timeout(idle)
        .build()
        .map_err(|e| OutboundError::Setup(e.to_string()))
}

/// How long an idle pooled connection is kept.
pub const IDLE_POOLED: Duration = Duration::from_secs(4);

/// Like [`client`] and [`streaming_client`] (`idle`), trusting and
/// presenting what `tls` says: a caller of one known server (the gateway
/// calling its broker) with an extra CA and a client certificate.
pub fn clients_with(
    timeout: Duration,
    idle: Duration,
    tls: &crate::mtls::ClientTls,
) -> Result<(reqwest::Client, reqwest::Client), OutboundError> {
    let config = tls
        .config()
        .map_err(|e| OutboundError::Setup(e.to_string()))?;
    let one = builder_with(Duration::from_secs(5).min(timeout), config.clone())
        .timeout(timeout)
        .build()
        .map_err(|e| OutboundError::Setup(e.to_string()))?;
    let streaming = builder_with(Duration::from_secs(5).min(idle), config)
        .read_timeout(idle)
        .build()
        .map_err(|e| OutboundError::Setup(e.to_string()))?;
    Ok((one, streaming))
}

fn builder(connect_timeout: Duration) -> Result<reqwest::ClientBuilder, OutboundError> {
    let tls = crate::mtls::ClientTls::default()
        .config()
        .map_err(|e| OutboundError::Setup(e.to_string()))?;
    Ok(builder_with(connect_timeout, tls))
}

fn builder_with(connect_timeout: Duration, tls: rustls::ClientConfig) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        // Nexus servers close keep-alive connections idle for
        // HEADER_READ_TIMEOUT_SECS (10 s by default); a pooled connection
        // reused as the server closes it fails its request. Drop them first.
        .pool_idle_timeout(IDLE_POOLED)
        .user_agent(concat!("nexus/", env!("CARGO_PKG_VERSION")))
}

/// Sends `req` and reads the body, refusing more than [`MAX_BODY`] bytes.
pub async fn send(req: reqwest::RequestBuilder) -> Result<Fetched, OutboundError> {
    let mut resp = req.send().await.map_err(transport)?;
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(OutboundError::TooLarge);
    }
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(OutboundError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Fetched {
        status,
        headers,
        body,
    })
}

fn transport(e: reqwest::Error) -> OutboundError {
    // reqwest's Display includes the URL; provider URLs carry no secrets
    // (codes travel in bodies), but strip the query to be safe.
    let e = e.without_url();
    OutboundError::Transport(format!("{}: {e}", failure_kind(&e)))
}

/// What kind of transport failure `e` is, in words fit for logs and
/// delivery records (no URL, no body).
pub fn failure_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    }
}
