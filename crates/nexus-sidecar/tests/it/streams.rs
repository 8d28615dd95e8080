//! Real traffic shapes through the sidecar: server-sent events as they
//! come, a large upload streamed, a WebSocket echo with the credential on
//! the handshake, gRPC over h2c (the gateway's own service as upstream),
//! and `hmac_payload` over its body cap refused.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Stack, Upstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_uploads_and_signed_body_limits() {
    let s = Stack::start().await;
    let up = Upstream::start(None).await;
    s.provider("hdr", json!({"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}}), &["api_key"]).await;
    s.provider("hmac", json!({"type": "hmac_payload", "config": {"header_name": "X-Signature", "algorithm": "sha256", "credential_field": "secret", "encoding": "hex"}}), &["secret"]).await;
    let c = s
        .connect("u1", "hdr", json!({"api_key": "stream-key-1"}))
        .await;
    let h = s
        .connect("u1", "hmac", json!({"secret": "hmac-key-1"}))
        .await;
    let u = up.url();
    let sc = s
        .sidecar_with(
            &format!("[routes.api]\nupstream = \"{u}\"\nconnection = \"{c}\"\n[routes.signed]\nupstream = \"{u}\"\nconnection = \"{h}\"\n"),
            |st| st.sidecar_signed_body_max_bytes = Some("1024".into()),
        )
        .await;
    let agent = reqwest::Client::new();

    // The first event arrives while the upstream still holds the second:
    // nothing is buffered (if it were, this would wait for the release).
    let r = agent
        .get(format!("{}/api/sse", sc.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut body = r.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .expect("the first event passed through before the stream ended")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"data: event 0\n\n");
    up.release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(rest, b"data: event 1\n\n");
    assert!(up.last().headers.contains_key("x-api-key"));

    // 32 MiB in 64 KiB chunks, streamed (not kept for a replay).
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 512;
    let chunks =
        futures_util::stream::iter(0..CHUNKS).map(|_| Ok::<_, std::io::Error>(vec![7u8; CHUNK]));
    let r = agent
        .put(format!("{}/api/upload", sc.url))
        .header("content-length", (CHUNK * CHUNKS).to_string())
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["received"], (CHUNK * CHUNKS) as u64);
    assert!(up.last().headers.contains_key("x-api-key"));

    // hmac_payload must hash the body: over the cap it is refused, clearly.
    let before = up.requests().len();
    let r = agent
        .post(format!("{}/signed/hook", sc.url))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"], "body_too_large");
    assert_eq!(e["limit"], 1024);
    // Without a length (chunked) too.
    let chunks =
        futures_util::stream::iter(0..4).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 1024]));
    let r = agent
        .post(format!("{}/signed/hook", sc.url))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // The rest of the body is left unread: the connection is not reused
    // (a reused one raced the server's close under load).
    assert_eq!(r.headers()["connection"], "close");
    assert_eq!(up.requests().len(), before);
    let r = agent
        .post(format!("{}/signed/hook", sc.url))
        .body("small")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.last().headers["x-signature"].len(), 64);
}

/// A WebSocket echo server that accepts only handshakes carrying `key`.
async fn ws_echo(key: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                #[allow(clippy::result_large_err)]
                let check = |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
                             resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
                    if req.headers().get("x-api-key").is_some_and(|v| v == key) {
                        Ok(resp)
                    } else {
                        let mut refused = tokio_tungstenite::tungstenite::handshake::server::ErrorResponse::new(Some("no key".into()));
                        *refused.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::UNAUTHORIZED;
                        Err(refused)
                    }
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if ws.send(msg).await.is_err() {
                            break;
                        }
                    } else if msg.is_close() {
                        break;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_and_grpc_pass_through_with_credentials() {
    let s = Stack::start().await;
    s.provider("hdr", json!({"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}}), &["api_key"]).await;
    let c = s.connect("u1", "hdr", json!({"api_key": "ws-key-1"})).await;
    // The gateway's own gRPC service as a gRPC upstream: its credential is
    // an agent key, sent by the sidecar as `authorization: Bearer ...`.
    s.provider("nexus-self", json!({"type": "header", "config": {"header_name": "authorization", "credential_field": "api_key", "value_prefix": "Bearer "}}), &["api_key"]).await;
    let grpc_conn = s
        .connect("u1", "nexus-self", json!({"api_key": s.agent_key}))
        .await;
    let ws = ws_echo("ws-key-1").await;
    let sc = s
        .sidecar(&format!(
            r#"
            [routes.ws]
            upstream = "{ws}"
            connection = "{c}"
            [routes."nexus.v1.NexusService"]
            upstream = "{gw}/nexus.v1.NexusService"
            connection = "{grpc_conn}"
            http2 = true
            "#,
            gw = s.gateway
        ))
        .await;

    let url = format!("{}/ws/socket", sc.url.replace("http://", "ws://"));
    let (mut socket, resp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("the handshake went through");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        socket
            .send(Message::text(format!("hello {i}")))
            .await
            .unwrap();
        let back = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), format!("hello {i}"));
    }
    socket.close(None).await.unwrap();

    // gRPC over h2c to the sidecar, no key in the client: the sidecar adds it.
    use nexus_gateway::grpc::pb::{
        nexus_service_client::NexusServiceClient, CheckConnectionRequest, GetTokenRequest,
    };
    let channel = tonic::transport::Endpoint::from_shared(sc.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = NexusServiceClient::new(channel);
    for _ in 0..3 {
        let answer = client
            .check_connection(CheckConnectionRequest {
                connection_id: c.clone(),
            })
            .await
            .expect("the gateway accepted the key the sidecar added")
            .into_inner();
        assert_eq!(answer.status, "active");
    }
    // A gRPC error comes back as a gRPC status (trailers passed through).
    let e = client
        .get_token(GetTokenRequest {
            connection_id: "conn_that_does_not_exist".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_stream_in_flight_finish() {
    let s = Stack::start().await;
    let up = Upstream::start(None).await;
    s.provider("hdr", json!({"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}}), &["api_key"]).await;
    let c = s
        .connect("u1", "hdr", json!({"api_key": "shutdown-key-1"}))
        .await;
    let mut sc = s
        .sidecar(&format!(
            "[routes.api]\nupstream = \"{}\"\nconnection = \"{c}\"\n",
            up.url()
        ))
        .await;
    let r = reqwest::get(format!("{}/api/sse", sc.url)).await.unwrap();
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert_eq!(&first[..], b"data: event 0\n\n");
    // Shutdown begins while the stream is open: no new connections, but
    // the request in flight gets to finish.
    sc.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        reqwest::get(format!("{}/_nexus/health", sc.url))
            .await
            .is_err(),
        "no longer accepting"
    );
    up.release.notify_one();
    let rest = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&rest[..], b"data: event 1\n\n");
    assert!(body.next().await.is_none());
    tokio::time::timeout(Duration::from_secs(15), &mut sc.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_upstream_is_trusted_only_through_the_extra_ca() {
    let s = Stack::start().await;
    let (up, ca) = Upstream::start_tls(s.dir.path()).await;
    s.provider("hdr", json!({"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}}), &["api_key"]).await;
    let c = s
        .connect("u1", "hdr", json!({"api_key": "tls-key-1"}))
        .await;
    let routes = format!(
        "[routes.api]\nupstream = \"{}\"\nconnection = \"{c}\"\n",
        up.https_url()
    );
    // Without the CA: the upstream's certificate is not trusted, nothing sent.
    let plain = s.sidecar(&routes).await;
    let r = reqwest::get(format!("{}/api/x", plain.url)).await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-nexus-error"], "upstream_unreachable");
    assert!(up.requests().is_empty());
    // With SIDECAR_CA_FILE: HTTP/2 over TLS (ALPN), the credential applied.
    let trusting = s
        .sidecar_with(&routes, |st| {
            st.sidecar_ca_file = Some(ca.display().to_string())
        })
        .await;
    let r = reqwest::get(format!("{}/api/x", trusting.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.last().headers["x-api-key"], "tls-key-1");
    assert_eq!(
        up.last().version,
        axum::http::Version::HTTP_2,
        "ALPN chose h2"
    );
    // A bad CA file stops the start, naming the setting.
    let bad = s.dir.path().join("not-a-ca.pem");
    std::fs::write(&bad, "nothing here").unwrap();
    let file = s.dir.path().join("routes-bad-ca.toml");
    std::fs::write(&file, &routes).unwrap();
    let config = nexus_sidecar::SidecarConfig::from_settings(&nexus_sidecar::SidecarSettings {
        gateway_url: Some(s.gateway.clone()),
        agent_key: Some(s.agent_key.clone()),
        sidecar_addr: Some("127.0.0.1:0".into()),
        sidecar_routes_file: Some(file.display().to_string()),
        sidecar_ca_file: Some(bad.display().to_string()),
        ..Default::default()
    })
    .unwrap();
    let e = nexus_sidecar::Sidecar::start(config, s.metrics.clone())
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("SIDECAR_CA_FILE"), "{e}");
}

#[test]
fn certificates_outside_their_validity_stop_the_start() {
    use rcgen::{CertificateParams, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    for (from, to, said) in [
        (
            now - time::Duration::days(30),
            now - time::Duration::days(1),
            "expired at",
        ),
        (
            now + time::Duration::days(1),
            now + time::Duration::days(30),
            "is not valid before",
        ),
    ] {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.not_before = from;
        p.not_after = to;
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        let files = nexus_core::tls::TlsFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        let e = nexus_core::tls::TlsServer::load(files).unwrap_err();
        assert_eq!(e.var(), "TLS_CERT_FILE");
        assert!(e.to_string().contains(said), "{e}");
    }
}
