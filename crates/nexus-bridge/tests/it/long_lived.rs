//! Long-lived connections: the WebSocket keeper (dial with fresh
//! credentials, re-dial before expiry, stop for a person) and the tower
//! layer for hyper and tonic clients.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use nexus_bridge::{BridgeError, KeeperOptions, SessionEnd};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::cache::bridge;
use crate::fake::{Gateway, Mode};

/// A WebSocket echo server recording each handshake's Authorization;
/// handshakes whose credentials are in `refuse` get 401.
struct WsServer {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
}

async fn ws_server(refuse: &'static [&'static str]) -> WsServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/stream", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                // The signature is tungstenite's callback type.
                #[allow(clippy::result_large_err)]
                let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
                    let auth = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    log.lock().unwrap().push(auth.clone());
                    if refuse.iter().any(|r| auth.ends_with(r)) {
                        let mut no = ErrorResponse::new(None);
                        *no.status_mut() = http::StatusCode::UNAUTHORIZED;
                        return Err(no);
                    }
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, check).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    WsServer { url, seen }
}

fn quick() -> KeeperOptions {
    KeeperOptions {
        grace: Duration::from_secs(1),
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(200),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keeper_redials_with_fresh_credentials_before_they_expire() {
    // Two-second tokens: each socket is re-dialled with the next one.
    let g = Gateway::start(Mode::Ok { expires_in: 2 }).await;
    let server = ws_server(&[]).await;
    let b = bridge(&g, Default::default());
    let mut sessions = 0;
    b.ws_keeper("c1", &server.url)
        .options(quick())
        .run(|mut ws, mut redial| {
            sessions += 1;
            let last = sessions == 3;
            async move {
                ws.send(Message::text("hello")).await.unwrap();
                let echo = ws.next().await.unwrap().unwrap();
                assert_eq!(echo.into_text().unwrap().as_str(), "hello");
                if last {
                    return SessionEnd::Done;
                }
                redial.requested().await;
                let _ = ws.close(None).await;
                SessionEnd::Redial
            }
        })
        .await
        .unwrap();
    let seen = server.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let distinct: std::collections::BTreeSet<_> = seen.iter().collect();
    assert_eq!(distinct.len(), 3, "a fresh token for every dial: {seen:?}");
    assert!(seen.iter().all(|a| a.starts_with("Bearer at-")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_refreshed_and_a_person_stops_the_keeper() {
    let g = Gateway::start(Mode::Ok { expires_in: 3600 }).await;
    // The peer no longer takes the first token.
    let server = ws_server(&["at-1"]).await;
    let b = bridge(&g, Default::default());
    b.ws_keeper("c1", &server.url)
        .options(quick())
        .run(|_ws, _redial| async { SessionEnd::Done })
        .await
        .unwrap();
    assert_eq!(g.refreshes.load(Ordering::SeqCst), 1);
    assert_eq!(*server.seen.lock().unwrap(), ["Bearer at-1", "Bearer at-2"]);

    // A connection that needs a person: the keeper stops, dialling nothing.
    g.set(Mode::Fail(409, "attention_required"));
    let fresh = bridge(&g, Default::default());
    let e = fresh
        .ws_keeper("c2", &server.url)
        .options(quick())
        .run(|_ws, _redial| async { SessionEnd::Done })
        .await
        .unwrap_err();
    assert!(matches!(e, BridgeError::InteractionRequired { .. }), "{e}");
    assert_eq!(server.seen.lock().unwrap().len(), 2);

    // Plaintext to a remote host is refused before anything happens.
    let e = fresh
        .ws_keeper("c2", "ws://stream.example.com/x")
        .run(|_ws, _redial| async { SessionEnd::Done })
        .await
        .unwrap_err();
    assert!(matches!(e, BridgeError::InsecureTransport(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tower_layer_authenticates_every_call() {
    let g = Gateway::start(Mode::Ok { expires_in: 3600 }).await;
    let b = bridge(&g, Default::default());
    let echo = tower::service_fn(|req: http::Request<()>| async move {
        Ok::<_, Infallible>(req.headers().get("authorization").cloned())
    });
    let mut svc = ServiceBuilder::new().layer(b.layer("c1")).service(echo);
    for _ in 0..3 {
        let req = http::Request::get("https://grpc.example.com/pkg.Svc/Call")
            .body(())
            .unwrap();
        let auth = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(auth.unwrap(), "Bearer at-1");
    }
    assert_eq!(
        g.tokens.load(Ordering::SeqCst),
        1,
        "credentials from the cache"
    );

    let req = http::Request::get("http://grpc.example.com/pkg.Svc/Call")
        .body(())
        .unwrap();
    let e = svc.ready().await.unwrap().call(req).await.unwrap_err();
    assert!(e
        .downcast_ref::<BridgeError>()
        .is_some_and(|e| matches!(e, BridgeError::InsecureTransport(_))));

    g.set(Mode::Fail(409, "attention_required"));
    let mut svc = ServiceBuilder::new()
        .layer(bridge(&g, Default::default()).layer("c9"))
        .service(echo);
    let req = http::Request::get("https://grpc.example.com/pkg.Svc/Call")
        .body(())
        .unwrap();
    let e = svc.ready().await.unwrap().call(req).await.unwrap_err();
    assert!(e
        .downcast_ref::<BridgeError>()
        .is_some_and(|e| matches!(e, BridgeError::InteractionRequired { .. })));
}
