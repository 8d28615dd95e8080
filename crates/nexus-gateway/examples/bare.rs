//! The throughput ceiling for the HTTP benchmark (`bench/http/run.py`): a
//! bare axum 0.8 server on a multi-threaded tokio runtime, like Nexus's
//! servers, answering `GET /v1/token/{id}` with a precomputed token-shaped
//! JSON body (1024 bytes, or the size given as the second argument) and
//! nothing else (no middleware, no state). `POST` on the same route reads
//! the body as it streams and answers its length (the sidecar benchmark's
//! upload sink).
//!
//! Built with the same release profile as Nexus:
//!
//! ```sh
//! cargo build --release -p nexus-gateway --example bare
//! target/release/examples/bare 127.0.0.1:0 [BYTES] [nexus-serve]   # prints `listening on ADDR`
//! ```
//!
//! With `nexus-serve` it is served by Nexus's own serving loop
//! (`nexus_core::serve`: timeouts, connection cap) instead of `axum::serve`,
//! to measure what that loop costs.

use std::io::Write;

/// The same allocator as the `nexus` binary, so the ratio measures Nexus's
/// own work and not the allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderValue;
use axum::routing::get;
use axum::Router;

/// A token answer shaped like the broker's (static credential, header
/// strategy), padded with a long credential to `size` bytes (at least the
/// unpadded answer, about 330 bytes).
fn body(size: usize) -> Bytes {
    let head = r#"{"connection_id":"0b6f3c1e-8d2a-4f57-9c3e-5a1d7e2b9f40","credentials":{"api_key":"weather-key-0000-"#;
    let tail = concat!(
        r#""},"degraded":false,"expires_at":null,"failing_scopes":[],"provider":"weather","scope":"","#,
        r#""status":"active","strategy":{"type":"header","config":{"credential_field":"api_key","#,
        r#""header_name":"X-Api-Key"}},"expires_in":null}"#,
    );
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut s = String::with_capacity(size);
    s.push_str(head);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str(tail);
    Bytes::from(s)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:0".into());
    let size = args
        .next()
        .map(|s| s.parse().expect("second argument: body size in bytes"))
        .unwrap_or(1024);
    let nexus_serve = args.next().as_deref() == Some("nexus-serve");
    let body = body(size);
    let json = HeaderValue::from_static("application/json");
    let app = Router::new().route(
        "/v1/token/{id}",
        get(move || {
            let body = body.clone();
            let json = json.clone();
            async move { ([(CONTENT_TYPE, json)], body) }
        })
        // A sink for the sidecar benchmark's streamed upload: reads the body
        // as it comes and answers its length.
        .post(|body: axum::body::Body| async move {
            use futures_util::StreamExt;
            let mut stream = body.into_data_stream();
            let mut n = 0usize;
            while let Some(Ok(chunk)) = stream.next().await {
                n += chunk.len();
            }
            n.to_string()
        }),
    );
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .unwrap_or_else(|e| panic!("cannot bind {addr}: {e}"));
    let local = listener.local_addr().expect("local address");
    println!("listening on {local}");
    let _ = std::io::stdout().flush();
    if nexus_serve {
        nexus_core::serve::serve(
            listener,
            app,
            nexus_core::serve::Limits::default(),
            std::future::pending(),
        )
        .await
        .expect("serve");
    } else {
        axum::serve(listener, app).await.expect("serve");
    }
}
