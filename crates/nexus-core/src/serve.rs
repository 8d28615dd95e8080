//! Serving a router on a listener with limits a public server needs, where
//! `axum::serve` has none: a time limit on reading a request's head (which
//! also closes idle keep-alive connections), on reading its body, a cap on
//! open connections (the ones over it get a JSON 503 and are closed), HTTP/2
//! limits (concurrent streams, header list size, reset floods), and a
//! deadline on graceful shutdown after which the connections left are
//! dropped.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

use crate::settings::{Setting, Values};
use crate::ConfigError;

/// `HEADER_READ_TIMEOUT_SECS`: how long a client may take to send a request's
/// head; also how long an idle keep-alive connection stays open.
pub const HEADER_READ_TIMEOUT_SECS: Setting = Setting::number(
    "HEADER_READ_TIMEOUT_SECS",
    "Time a client has to send a request's headers; idle keep-alive connections close after it too",
    "10",
    1,
    600,
    "seconds",
);
/// `BODY_READ_TIMEOUT_SECS`: how long a client may take to send a body.
pub const BODY_READ_TIMEOUT_SECS: Setting = Setting::number(
    "BODY_READ_TIMEOUT_SECS",
    "Time a client has to send a request's body",
    "30",
    1,
    3600,
    "seconds",
);
/// `MAX_CONNECTIONS`: open connections served at once.
pub const MAX_CONNECTIONS: Setting = Setting::number(
    "MAX_CONNECTIONS",
    "Connections served at once; more are answered 503 and closed (keep it below the file-descriptor limit)",
    "4096",
    1,
    1_000_000,
    "",
);
/// `SHUTDOWN_GRACE_SECS`: how long shutting down waits for requests in flight.
pub const SHUTDOWN_GRACE_SECS: Setting = Setting::number(
    "SHUTDOWN_GRACE_SECS",
    "On SIGTERM, how long requests in flight may finish before their connections are dropped",
    "10",
    0,
    600,
    "seconds",
);

/// Most concurrent HTTP/2 streams per connection.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Largest HTTP/2 header list a client may send (bytes).
pub const H2_MAX_HEADER_LIST_SIZE: u32 = 32 * 1024;
/// Largest HTTP/1 read buffer, hence request head (bytes).
pub const H1_MAX_BUF_SIZE: usize = 64 * 1024;
/// Streams a client may reset before the server has seen them (HTTP/2
/// rapid-reset floods, CVE-2023-44487) and errors it may provoke.
pub const H2_MAX_RESETS: usize = 32;

/// The limits of one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time to send a request head (and idle keep-alive time).
    pub header_read_timeout: Duration,
    /// Time to send a request body.
    pub body_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Time requests in flight get when shutdown begins.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// The limits a part's settings give (each part declares the four
    /// settings above among its own).
    pub fn from_values(v: &Values) -> Result<Self, ConfigError> {
        Ok(Self {
            header_read_timeout: v.secs(&HEADER_READ_TIMEOUT_SECS)?,
            body_read_timeout: v.secs(&BODY_READ_TIMEOUT_SECS)?,
            max_connections: v.count(&MAX_CONNECTIONS)?,
            shutdown_grace: v.secs(&SHUTDOWN_GRACE_SECS)?,
        })
    }
}

/// What a server serves: an [`axum::Router`], or a service like it (the
/// sidecar sends most requests past its router).
pub trait App:
    tower::Service<
        axum::extract::Request,
        Response = axum::response::Response,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> App for T where
    T: tower::Service<
            axum::extract::Request,
            Response = axum::response::Response,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops
/// accepting, asks every connection to finish (idle ones close at once), and
/// after `limits.shutdown_grace` drops the connections still open. Handlers
/// see the peer address as `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    app: impl App,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    serve_with(listener, app, limits, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given: the handshake must complete
/// within `limits.header_read_timeout` (a client that stalls it is
/// dropped and counted in `nexus_tls_handshake_failures_total`).
pub async fn serve_with(
    listener: TcpListener,
    app: impl App,
    limits: Limits,
    tls: Option<Arc<crate::tls::TlsServer>>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(H1_MAX_BUF_SIZE);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(H2_MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(H2_MAX_RESETS)
        .max_local_error_reset_streams(H2_MAX_RESETS)
        // Dead peers are found by ping; an HTTP/2 connection idle that long
        // without answering one is closed.
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let acceptor = tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(t.config()));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // Sent when the grace period is over: connections still open end.
    let (hard_stop, hard_stopped) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it
                    // was accepted: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    crate::static_counter!("nexus_accept_errors_total").increment(1);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            crate::static_counter!("nexus_connections_refused_total").increment(1);
            refuse(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut conn = Conn {
            router: app.clone(),
            builder: builder.clone(),
            // Taken here, before a TLS handshake: shutdown waits for it too.
            graceful: graceful.watcher(),
            hard_stopped: hard_stopped.clone(),
            limits,
            peer,
            identity: None,
        };
        match &acceptor {
            None => {
                tokio::spawn(async move {
                    conn.run(stream).await;
                    drop(slot);
                });
            }
            Some(acceptor) => {
                let accepting = acceptor.accept(stream);
                tokio::spawn(async move {
                    match tokio::time::timeout(limits.header_read_timeout, accepting).await {
                        Ok(Ok(tls)) => {
                            // A client certificate (mutual TLS) names the caller.
                            conn.identity = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(|c| crate::mtls::identities(c).into_iter().next())
                                .map(|id| crate::mtls::PeerIdentity(id.into()));
                            conn.run(tls).await
                        }
                        Ok(Err(e)) => {
                            let reason = crate::mtls::failure_reason(&e);
                            metrics::counter!("nexus_tls_handshake_failures_total", "reason" => reason)
                                .increment(1);
                            tracing::debug!(error = %e, reason, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics::counter!("nexus_tls_handshake_failures_total", "reason" => "timeout")
                                .increment(1);
                        }
                    }
                    drop(slot);
                });
            }
        }
    }
    drop(listener);
    // Held until here: its reloader stops once the server is gone.
    drop(tls);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(
                grace_secs = limits.shutdown_grace.as_secs(),
                "connections still open after the shutdown grace period; dropping them"
            );
            let _ = hard_stop.send(true);
        }
    }
    Ok(())
}

/// What serving one accepted connection needs.
struct Conn<S> {
    router: S,
    builder: Arc<auto::Builder<TokioExecutor>>,
    graceful: hyper_util::server::graceful::Watcher,
    hard_stopped: watch::Receiver<bool>,
    limits: Limits,
    peer: std::net::SocketAddr,
    /// The identity of a verified client certificate (mutual TLS).
    identity: Option<crate::mtls::PeerIdentity>,
}

impl<S: App> Conn<S> {
    /// Serves requests on `io` (plain TCP or TLS) until the connection ends,
    /// the grace period is over, or it stays silent past the head timeout.
    async fn run<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            router,
            builder,
            graceful,
            mut hard_stopped,
            limits,
            peer,
            identity,
        } = self;
        let body_timeout = limits.body_read_timeout;
        // Whether a request arrived: hyper times request heads only once it
        // knows the protocol, so a client that connects and sends nothing
        // (or half an HTTP/2 preface) is timed here.
        let spoke = Arc::new(AtomicBool::new(false));
        let heard = spoke.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            heard.store(true, Ordering::Relaxed);
            req.extensions_mut().insert(ConnectInfo(peer));
            if let Some(id) = &identity {
                req.extensions_mut().insert(id.clone());
            }
            // Only a body still to come can be slow: requests without one
            // (most GETs, the token fetch) skip the timer.
            let req = if req.body().is_end_stream() {
                req.map(axum::body::Body::new)
            } else {
                req.map(|b| axum::body::Body::new(TimeoutBody::new(body_timeout, b)))
            };
            router.clone().oneshot(req)
        });
        let conn = builder
            .serve_connection_with_upgrades(
                TokioIo::new(crate::linger::Lingering::new(io)),
                service,
            )
            .into_owned();
        let conn = graceful.watch(conn);
        let first_request = limits.header_read_timeout;
        let silent = async {
            tokio::time::sleep(first_request).await;
            if spoke.load(Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = conn => {}
            _ = hard_stopped.wait_for(|stop| *stop) => {}
            () = silent => {
                crate::static_counter!("nexus_connections_silent_total").increment(1);
            }
        }
    }
}

/// Answers a connection over the cap: 503 with the JSON error shape, then
/// closes at once. One non-blocking write into the empty socket buffer: no
/// task and no descriptor held for a client that does not read.
fn refuse(stream: TcpStream) {
    let body = crate::error::ErrorBody::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        "the server is at its connection limit; retry shortly",
    )
    .json()
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use axum::Router;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn quick() -> Limits {
        Limits {
            header_read_timeout: Duration::from_millis(500),
            body_read_timeout: Duration::from_millis(500),
            max_connections: 2,
            shutdown_grace: Duration::from_millis(500),
        }
    }

    /// A server on loopback; its address, its shutdown trigger, its task.
    async fn start(
        limits: Limits,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .route("/echo", post(|body: axum::body::Bytes| async move { body }))
            // Answers before reading the body, as a body limit does.
            .route(
                "/early",
                post(|| async { (axum::http::StatusCode::PAYLOAD_TOO_LARGE, "too large") }),
            )
            .route(
                "/forever",
                get(|| async {
                    std::future::pending::<()>().await;
                    "never"
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, app, limits, async {
            let _ = rx.await;
        }));
        (addr, tx, task)
    }

    /// Everything the server sends until it closes (bounded).
    async fn read_to_close(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .expect("the server closes the connection")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn get_ok(s: &mut TcpStream) {
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }

    #[tokio::test]
    async fn slow_heads_and_idle_keep_alives_are_closed() {
        let (addr, _stop, _task) = start(quick()).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        read_to_close(&mut slow).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        get_ok(&mut idle).await;
        read_to_close(&mut idle).await;
    }

    #[tokio::test]
    async fn silent_clients_and_half_prefaces_are_closed() {
        let (addr, _stop, _task) = start(quick()).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        read_to_close(&mut silent).await;
        // "P" could begin "PRI * HTTP/2.0" or "POST": the protocol is not
        // known yet, and hyper's own head timer has not started.
        let mut half = TcpStream::connect(addr).await.unwrap();
        half.write_all(b"PRI * HTTP/2").await.unwrap();
        read_to_close(&mut half).await;
    }

    #[tokio::test]
    async fn http2_header_lists_are_limited() {
        let (addr, _stop, _task) = start(quick()).await;
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let mut conn = Box::pin(conn);
        let driver = tokio::spawn(async move {
            let _ = (&mut conn).await;
        });
        let mut client = client.ready().await.unwrap();
        // A normal request works (and brings the server's SETTINGS).
        let req = axum::http::Request::get(format!("http://{addr}/"))
            .body(())
            .unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        assert_eq!(resp.await.unwrap().status(), 200);
        // A header list over the limit is refused, not processed (by the
        // server, or already by a client that read the server's SETTINGS;
        // without the limit, 33 KiB of headers would pass either way).
        let big = "x".repeat(H2_MAX_HEADER_LIST_SIZE as usize + 1024);
        let req = axum::http::Request::get(format!("http://{addr}/"))
            .header("x-big", big)
            .body(())
            .unwrap();
        let mut client = client.ready().await.unwrap();
        let refused = match client.send_request(req, true) {
            Ok((resp, _)) => match resp.await {
                Ok(r) => r.status() == 431,
                Err(_) => true,
            },
            Err(_) => true,
        };
        assert!(refused, "an oversized header list is refused");
        driver.abort();
    }

    #[tokio::test]
    async fn slow_bodies_are_cut_off() {
        let (addr, _stop, _task) = start(quick()).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789")
            .await
            .unwrap();
        let answer = read_to_close(&mut slow).await;
        assert!(!answer.contains("0123456789"), "{answer}");
    }

    #[tokio::test]
    async fn connections_over_the_cap_get_a_json_503() {
        let (addr, _stop, _task) = start(Limits {
            header_read_timeout: Duration::from_secs(30),
            ..quick()
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            get_ok(&mut s).await;
            held.push(s);
        }
        let mut over = TcpStream::connect(addr).await.unwrap();
        let answer = read_to_close(&mut over).await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.contains(r#""error":"too_many_connections""#),
            "{answer}"
        );
        // A slot frees when a connection ends.
        drop(held.pop());
        let mut again = None;
        for _ in 0..50 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 12];
            if s.read_exact(&mut buf).await.is_ok() && buf.starts_with(b"HTTP/1.1 200") {
                again = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(again.is_some(), "served again once a connection closed");
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_drops_stuck_ones_after_the_grace() {
        let (addr, stop, task) = start(Limits {
            header_read_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(1),
            ..quick()
        })
        .await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        get_ok(&mut idle).await;
        let mut stuck = TcpStream::connect(addr).await.unwrap();
        stuck
            .write_all(b"GET /forever HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        // The idle connection is closed when shutdown begins, the stuck one
        // when the grace period ends; the server returns (bounded waits).
        read_to_close(&mut idle).await;
        read_to_close(&mut stuck).await;
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("serve returns after the grace period")
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_early_answer_reaches_a_client_still_sending() {
        // reqwest (hyper's client) gives up on the answer when a body write
        // fails: without a lingering close it saw a broken pipe, not the 413.
        // The body is over the socket buffers but under LINGER_BYTES: past
        // that the close is cut on purpose, and the client may see a reset.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (addr, stop, _task) = start(Limits::default()).await;
        let client = reqwest::Client::new();
        for _ in 0..3 {
            let r = client
                .post(format!("http://{addr}/early"))
                .body(vec![b'x'; 8 * 1024 * 1024])
                .send()
                .await
                .expect("the answer, not a broken pipe");
            assert_eq!(r.status(), 413);
        }
        let _ = stop.send(());
    }
}
