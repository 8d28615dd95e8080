//! The throughput ceiling for the HTTP benchmark (`bench/http/run.py`): a
//! bare axum 0.8 server on a multi-threaded tokio runtime, like Nexus's
//! servers, answering `GET /v1/token/{id}` with a precomputed ~1 KB
//! token-shaped JSON body and nothing else (no middleware, no state).
//!
//! Built with the same release profile as Nexus:
//!
//! ```sh
//! cargo build --release -p nexus-gateway --example bare
//! target/release/examples/bare 127.0.0.1:0   # prints `listening on ADDR` once bound
//! ```

use std::io::Write;

use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderValue;
use axum::routing::get;
use axum::Router;

/// A token answer shaped like the broker's (header strategy, static
/// credential), padded to about 1 KB.
fn body() -> Bytes {
    let mut s = String::from(concat!(
        r#"{"connection_id":"0b6f3c1e-8d2a-4f57-9c3e-5a1d7e2b9f40","#,
        r#""provider":"weather","auth_type":"api_key","workspace_id":"bench","#,
        r#""strategy":{"type":"header","config":{"header_name":"X-Api-Key","credential_field":"api_key"}},"#,
        r#""credentials":{"api_key":"weather-key-0000-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"},"#,
        r#""expires_at":null,"cache_ttl_secs":300,"scopes":[],"#,
        r#""metadata":{"note":""#,
    ));
    while s.len() < 1024 - 4 {
        s.push('x');
    }
    s.push_str(r#""}}"#);
    Bytes::from(s)
}

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let body = body();
    let json = HeaderValue::from_static("application/json");
    let app = Router::new().route(
        "/v1/token/{id}",
        get(move || {
            let body = body.clone();
            let json = json.clone();
            async move { ([(CONTENT_TYPE, json)], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .unwrap_or_else(|e| panic!("cannot bind {addr}: {e}"));
    let local = listener.local_addr().expect("local address");
    println!("listening on {local}");
    let _ = std::io::stdout().flush();
    axum::serve(listener, app).await.expect("serve");
}
