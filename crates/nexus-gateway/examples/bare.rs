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
//! target/release/examples/bare 127.0.0.1:0 BYTES tls CERT.pem KEY.pem
//! ```
//!
//! With `nexus-serve` it is served by Nexus's own serving loop
//! (`nexus_core::serve`: timeouts, connection cap) instead of `axum::serve`,
//! to measure what that loop costs. With `tls` it serves HTTPS through a
//! plain accept loop (tokio-rustls, then hyper's HTTP/1 + HTTP/2 builder;
//! TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, as Nexus's servers), the
//! ceiling of the TLS benchmark (`bench/http/run.py --tls`).

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
    let mode = args.next();
    let nexus_serve = mode.as_deref() == Some("nexus-serve");
    let tls = (mode.as_deref() == Some("tls")).then(|| {
        let cert = args
            .next()
            .expect("tls: certificate file (PEM) after `tls`");
        let key = args
            .next()
            .expect("tls: key file (PEM) after the certificate");
        tls_config(&cert, &key)
    });
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
    if let Some(config) = tls {
        serve_tls(listener, app, config).await;
    } else if nexus_serve {
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

/// A rustls server configuration for one certificate and key, like Nexus's
/// (ring, TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`) without the reloading.
fn tls_config(cert: &str, key: &str) -> std::sync::Arc<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .unwrap_or_else(|e| panic!("{cert}: {e}"));
    let key = PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("certificate and key");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    std::sync::Arc::new(config)
}

/// Accepts, completes the TLS handshake and serves each connection with
/// hyper's auto (HTTP/1 or HTTP/2) builder: nothing else (no timeouts, no
/// connection cap), as `axum::serve` for plaintext.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    config: std::sync::Arc<rustls::ServerConfig>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let builder = std::sync::Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, app, builder) = (acceptor.clone(), app.clone(), builder.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = TowerToHyperService::new(app);
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .await;
        });
    }
}
