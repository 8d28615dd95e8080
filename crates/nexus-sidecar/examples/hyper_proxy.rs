//! The floor of the sidecar benchmark (`bench/sidecar/run.py`): the least a
//! proxy built like the sidecar costs, with none of its work. The same
//! worker model (one thread per worker, each with a single-threaded tokio
//! runtime and its own `SO_REUSEPORT` listener), hyper-util's HTTP/1 +
//! HTTP/2 server and the sidecar's upstream pool, but no router, no
//! credential lookup, no strategy, no metrics, no timeouts: every request's
//! path after `/api` goes to the upstream base URL with a fixed `X-Api-Key`
//! header. The gap between this and nginx is what hyper itself costs; the
//! gap between this and the sidecar is the sidecar's own work.
//!
//! ```sh
//! cargo build --release -p nexus-sidecar --example hyper_proxy
//! target/release/examples/hyper_proxy 127.0.0.1:0 http://127.0.0.1:8080/v1/token 2   # prints `listening on ADDR`
//! ```

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nexus_sidecar::pool::{Pool, Sent};

/// The same allocator as the `nexus` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Failure = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Failure> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: hyper_proxy LISTEN_ADDR UPSTREAM_BASE_URL WORKERS";
    let (Some(listen), Some(upstream), Some(workers)) = (args.get(1), args.get(2), args.get(3))
    else {
        return Err(usage.into());
    };
    let listen: SocketAddr = listen.parse()?;
    let upstream: Arc<str> = upstream.trim_end_matches('/').into();
    let workers: usize = workers.parse()?;
    let tls = nexus_sidecar::upstream::client_tls(None)?;
    // The sidecar's own listeners: one SO_REUSEPORT socket per worker.
    let (listeners, bound) = nexus_sidecar::server::bind(listen, workers)?;
    let mut threads = Vec::new();
    for listener in listeners {
        let pool = Arc::new(nexus_sidecar::upstream::pool(&tls));
        let upstream = upstream.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        threads.push(std::thread::spawn(move || {
            rt.block_on(serve(listener, pool, upstream))
        }));
    }
    println!("listening on {bound}");
    std::io::stdout().flush()?;
    for t in threads {
        t.join().map_err(|_| "a worker panicked")??;
    }
    Ok(())
}

async fn serve(
    listener: std::net::TcpListener,
    pool: Arc<Pool>,
    upstream: Arc<str>,
) -> Result<(), Failure> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let server = Arc::new(hyper_util::server::conn::auto::Builder::new(
        TokioExecutor::new(),
    ));
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let (pool, upstream, server) = (pool.clone(), upstream.clone(), server.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (pool, upstream) = (pool.clone(), upstream.clone());
                async move { Ok::<_, std::convert::Infallible>(forward(&pool, &upstream, req).await) }
            });
            let _ = server
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(pool: &Pool, upstream: &str, req: Request<Incoming>) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let rest = parts.uri.path().strip_prefix("/api").unwrap_or("/");
    let target = match parts.uri.query() {
        Some(q) => format!("{upstream}{rest}?{q}"),
        None => format!("{upstream}{rest}"),
    };
    let Ok(uri) = target.parse::<Uri>() else {
        return status(StatusCode::BAD_REQUEST);
    };
    parts.uri = uri;
    parts.headers.remove(axum::http::header::HOST);
    parts.headers.remove(axum::http::header::AUTHORIZATION);
    parts.headers.insert(
        "x-api-key",
        HeaderValue::from_static("weather-key-0000-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
    );
    match pool.send(Request::from_parts(parts, Body::new(body))).await {
        Ok(Sent::Answer(answer)) => answer.map(Body::new),
        _ => status(StatusCode::BAD_GATEWAY),
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = code;
    r
}
