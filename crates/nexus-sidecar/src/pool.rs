//! A worker's HTTP/1.1 connections to upstreams, kept open between
//! requests.
//!
//! hyper-util's pooled client returns an HTTP/1.1 connection to its pool
//! from a task it spawns for every request (the connection is not free
//! until the answer's body has been read), and builds a connect future
//! beside every checkout. On the sidecar's hot path that was a fifth of its
//! user time. Here a connection goes back to its host's list as soon as the
//! answer's head is in, and a checkout takes the most recently used one
//! that is free again: no task, no channel. hyper's own connection
//! (`client::conn::http1`) still does all the HTTP.
//!
//! A host whose TLS handshake picks HTTP/2 (ALPN) is remembered and left to
//! the multiplexing client from then on: one connection carries all its
//! requests, and there is nothing to pool.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::uri::{Authority, Scheme};
use axum::http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use tower::ServiceExt;

/// Connections kept per host (more are closed once their answer is read).
const MAX_KEPT: usize = 256;

/// Why a request did not get an answer's head.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be made (refused, timed out, TLS failed).
    #[error("connect: {0}")]
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The connection failed while the request was sent or answered.
    #[error("request: {0}")]
    Request(#[from] hyper::Error),
    /// The URI has no scheme or authority (routes always give both).
    #[error("the upstream URI has no scheme or authority")]
    NoAuthority,
}

/// What the pool did with a request.
pub enum Sent {
    /// The upstream's answer.
    Answer(Response<Incoming>),
    /// The host speaks HTTP/2: send it with the multiplexing client.
    Http2(Request<Body>),
}

struct Idle {
    sender: http1::SendRequest<Body>,
    used: Instant,
}

enum Kind {
    /// HTTP/1.1: its connections, in use or free, most recent last.
    Http1(Vec<Idle>),
    /// Chose HTTP/2 over TLS.
    Http2,
}

/// One upstream host. Found by comparing scheme and authority: a worker
/// talks to a few hosts (its routes'), and hashing an authority (case
/// folded byte by byte) cost more than the comparisons.
struct Host {
    scheme: Scheme,
    authority: Authority,
    /// Its `Host` header, made once.
    header: HeaderValue,
    kind: Kind,
}

impl Host {
    fn is(&self, scheme: &Scheme, authority: &Authority) -> bool {
        // The same route gives the same bytes: compared as they are first,
        // case-insensitively only when they differ.
        (self.authority.as_str() == authority.as_str() || self.authority == *authority)
            && self.scheme == *scheme
    }
}

/// One worker's HTTP/1.1 upstream connections.
pub struct Pool {
    https: HttpsConnector<HttpConnector>,
    idle_timeout: Duration,
    hosts: Mutex<Vec<Host>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool connecting through `https` (plaintext for `http` URIs; over
    /// TLS it should offer HTTP/2 too, which sends the host elsewhere);
    /// connections unused for `idle_timeout` are closed.
    pub fn new(https: HttpsConnector<HttpConnector>, idle_timeout: Duration) -> Self {
        Self {
            https,
            idle_timeout,
            hosts: Mutex::new(Vec::new()),
        }
    }

    /// Sends `req` (absolute URI) on a free connection to its host, or a new
    /// one; a reused connection that turns out closed before the request
    /// went out is replaced once. The request gets the `Host` header from
    /// its URI and goes out in origin form, as hyper-util's client sends it.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Sent, PoolError> {
        let uri = req.uri().clone();
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(PoolError::NoAuthority);
        };
        let mut parts = axum::http::uri::Parts::default();
        parts.path_and_query = uri.path_and_query().cloned();
        // A path and query alone always make a URI.
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| PoolError::NoAuthority)?;
        let now = Instant::now();
        let mut retried = false;
        loop {
            // Where the host is in the list, or its new `Host` header: the
            // checkin after the answer does not look or make it again.
            let (mut sender, reused, known) = match self.checkout(scheme, authority, now) {
                Checkout::Free(s, host, at) => {
                    req.headers_mut().entry(header::HOST).or_insert(host);
                    (s, true, Known::At(at))
                }
                Checkout::Http2 => return Ok(Sent::Http2(with_uri(req, uri))),
                // Boxed: the connect future is large, and every request's
                // future would carry (and move) it otherwise.
                Checkout::None => match Box::pin(self.connect(scheme, authority, &uri)).await? {
                    Some(s) => {
                        let host = host_header(&uri)?;
                        req.headers_mut()
                            .entry(header::HOST)
                            .or_insert_with(|| host.clone());
                        (s, false, Known::New(host))
                    }
                    None => return Ok(Sent::Http2(with_uri(req, uri))),
                },
            };
            match sender.try_send_request(req).await {
                Ok(answer) => {
                    self.checkin(scheme, authority, known, sender, now);
                    return Ok(Sent::Answer(answer));
                }
                Err(mut e) => match e.take_message() {
                    // The host closed a kept connection as the request
                    // arrived: nothing was sent, a new connection gets it.
                    Some(again) if reused && !retried => {
                        retried = true;
                        req = again;
                    }
                    _ => return Err(PoolError::Request(e.into_error())),
                },
            }
        }
    }

    fn hosts(&self) -> std::sync::MutexGuard<'_, Vec<Host>> {
        // Whole values only; a panic elsewhere cannot leave half an entry.
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used free connection (stale ones are closed on the
    /// way; closed ones are dropped when none is free).
    fn checkout(&self, scheme: &Scheme, authority: &Authority, now: Instant) -> Checkout {
        let mut hosts = self.hosts();
        let Some((at, host)) = hosts
            .iter_mut()
            .enumerate()
            .find(|(_, h)| h.is(scheme, authority))
        else {
            return Checkout::None;
        };
        let list = match &mut host.kind {
            Kind::Http2 => return Checkout::Http2,
            Kind::Http1(list) => list,
        };
        while let Some(i) = list.iter().rposition(|c| c.sender.is_ready()) {
            let c = list.swap_remove(i);
            if now.duration_since(c.used) < self.idle_timeout {
                return Checkout::Free(c.sender, host.header.clone(), at);
            }
        }
        list.retain(|c| !c.sender.is_closed());
        Checkout::None
    }

    /// Back in the list at once: it is free again when the answer's body
    /// has been read, which `checkout` sees.
    fn checkin(
        &self,
        scheme: &Scheme,
        authority: &Authority,
        known: Known,
        sender: http1::SendRequest<Body>,
        now: Instant,
    ) {
        let mut hosts = self.hosts();
        // Hosts are never removed from the list: a place found at checkout
        // is still theirs.
        let found = match known {
            Known::At(at) => Ok(at),
            Known::New(header) => hosts
                .iter()
                .position(|h| h.is(scheme, authority))
                .ok_or(header),
        };
        let at = match found {
            Ok(at) => at,
            Err(header) => {
                hosts.push(Host {
                    scheme: scheme.clone(),
                    authority: authority.clone(),
                    header,
                    kind: Kind::Http1(Vec::new()),
                });
                hosts.len() - 1
            }
        };
        if let Kind::Http1(list) = &mut hosts[at].kind {
            if list.len() >= MAX_KEPT {
                list.retain(|c| !c.sender.is_closed());
            }
            if list.len() < MAX_KEPT {
                list.push(Idle { sender, used: now });
            }
        }
    }

    /// A new connection to `uri`'s host; `None` when TLS chose HTTP/2 (the
    /// host is remembered as such).
    async fn connect(
        &self,
        scheme: &Scheme,
        authority: &Authority,
        uri: &Uri,
    ) -> Result<Option<http1::SendRequest<Body>>, PoolError> {
        let io = self
            .https
            .clone()
            .oneshot(uri.clone())
            .await
            .map_err(PoolError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let mut hosts = self.hosts();
            match hosts.iter_mut().find(|h| h.is(scheme, authority)) {
                Some(h) => h.kind = Kind::Http2,
                None => hosts.push(Host {
                    scheme: scheme.clone(),
                    authority: authority.clone(),
                    header: host_header(uri)?,
                    kind: Kind::Http2,
                }),
            }
            return Ok(None);
        }
        let (mut sender, conn) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "an upstream connection ended");
            }
        });
        sender.ready().await?;
        Ok(Some(sender))
    }
}

/// Where a request's host is, for its checkin.
enum Known {
    /// At this place in the list.
    At(usize),
    /// Not looked up yet (a new connection): its `Host` header, should it
    /// be new.
    New(HeaderValue),
}

enum Checkout {
    /// A connection, the host's `Host` header and its place in the list.
    Free(http1::SendRequest<Body>, HeaderValue, usize),
    Http2,
    None,
}

fn with_uri(req: Request<Body>, uri: Uri) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    parts.headers.remove(header::HOST);
    Request::from_parts(parts, body)
}

/// `Host`: the URI's host, with its port unless it is the scheme's default.
fn host_header(uri: &Uri) -> Result<HeaderValue, PoolError> {
    let host = uri.host().ok_or(PoolError::NoAuthority)?;
    let default = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let value = match uri.port_u16() {
        Some(p) if p != default => HeaderValue::from_str(&format!("{host}:{p}")),
        _ => HeaderValue::from_str(host),
    };
    value.map_err(|_| PoolError::NoAuthority)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Clone, Copy)]
    enum Close {
        Never,
        AtOnce,
    }

    /// A raw HTTP/1.1 upstream: answers `ok` to every request head, closing
    /// the connection after each answer as `close` says; keeps the heads it
    /// saw and counts connections.
    async fn upstream(close: Close) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (a, h) = (accepted.clone(), heads.clone());
        // On a thread of its own: it runs while the test holds its runtime.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        std::thread::spawn(move || {
            rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 1024];
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = buf.drain(..end + 4).collect();
                            h.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
                            let answer: &[u8] = match close {
                                Close::Never => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                                Close::AtOnce => b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
                            };
                            if s.write_all(answer).await.is_err() || matches!(close, Close::AtOnce) {
                                return;
                            }
                        }
                    }
                });
            }
        })
        });
        (format!("http://{addr}"), accepted, heads)
    }

    fn pool() -> Pool {
        crate::upstream::pool(&crate::upstream::client_tls(None).unwrap())
    }

    async fn get(pool: &Pool, url: &str) -> String {
        let req = Request::get(url).body(Body::empty()).unwrap();
        let Sent::Answer(r) = pool.send(req).await.unwrap() else {
            panic!("a plaintext host is HTTP/1.1");
        };
        assert_eq!(r.status(), 200);
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap();
        String::from_utf8(body.to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_kept_connection_carries_the_next_request_in_origin_form() {
        let (url, accepted, heads) = upstream(Close::Never).await;
        let pool = pool();
        for i in 0..5 {
            assert_eq!(get(&pool, &format!("{url}/v1/x?n={i}")).await, "ok");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for all five"
        );
        let heads = heads.lock().unwrap();
        assert!(
            heads[4].starts_with("GET /v1/x?n=4 HTTP/1.1\r\n"),
            "{}",
            heads[4]
        );
        let host = url.trim_start_matches("http://");
        assert!(
            heads[4]
                .to_ascii_lowercase()
                .contains(&format!("\r\nhost: {host}\r\n")),
            "{}",
            heads[4]
        );
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_used_again() {
        let (url, accepted, _) = upstream(Close::AtOnce).await;
        let pool = pool();
        // Each answer closes its connection: none is checked out again.
        for i in 0..20 {
            assert_eq!(get(&pool, &format!("{url}/{i}")).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 20);
    }

    #[test]
    fn the_host_header_leaves_out_a_default_port() {
        let h = |u: &str| host_header(&u.parse().unwrap()).unwrap();
        assert_eq!(h("http://api.example:80/x"), "api.example");
        assert_eq!(h("https://api.example:443/x"), "api.example");
        assert_eq!(h("https://api.example:8443/x"), "api.example:8443");
        assert_eq!(h("http://127.0.0.1:9000/"), "127.0.0.1:9000");
        assert_eq!(h("http://[::1]:9000/"), "[::1]:9000");
        assert_eq!(h("http://[::1]/"), "[::1]");
    }
}
