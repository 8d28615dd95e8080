//! The agent loop (the reqwest middleware) against a fake gateway and a fake
//! provider: 401 → one refresh and one retry; 403 → reported, returned;
//! reports never block; plaintext only to loopback.

use std::sync::atomic::Ordering;
use std::time::Duration;

use nexus_bridge::{Bridge, BridgeError, RequiredScopes};
use serde_json::Value;

use crate::cache::bridge;
use crate::fake::{Gateway, Mode, Provider};

async fn reports(g: &Gateway, n: usize) -> Vec<Value> {
    for _ in 0..200 {
        if g.reports.lock().unwrap().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    g.reports.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_forces_one_refresh_and_one_retry() {
    let g = Gateway::start(Mode::Ok { expires_in: 3600 }).await;
    // The provider already moved on to the second token (rotated early).
    let p = Provider::start("at-2").await;
    let b = bridge(&g, Default::default());
    let api = b.agent_client("c1").build().unwrap();
    let r = api.get(format!("{}/items", p.url)).send().await.unwrap();
    assert_eq!(r.status(), 200, "the caller never sees the 401");
    assert_eq!(g.tokens.load(Ordering::SeqCst), 1);
    assert_eq!(g.refreshes.load(Ordering::SeqCst), 1);
    assert_eq!(p.calls.load(Ordering::SeqCst), 2);

    // Many requests refused at once with the same credentials: one refresh.
    *p.accepted.lock().unwrap() = "at-3".into();
    *g.delay.lock().unwrap() = Duration::from_millis(50);
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let (api, url) = (api.clone(), format!("{}/items", p.url));
            tokio::spawn(async move { api.get(url).send().await.unwrap().status() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        g.refreshes.load(Ordering::SeqCst),
        2,
        "one more refresh, not 30"
    );
    assert!(reports(&g, 0).await.is_empty(), "nothing to report");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_that_a_refresh_does_not_cure_is_reported() {
    let g = Gateway::start(Mode::Ok { expires_in: 3600 }).await;
    let p = Provider::start("never").await;
    let b = bridge(&g, Default::default());
    let api = b.agent_client("c1").build().unwrap();
    let r = api.get(format!("{}/items", p.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(p.calls.load(Ordering::SeqCst), 2, "retried once only");
    let rep = reports(&g, 1).await;
    assert_eq!(rep[0]["status"], 401);
    assert_eq!(rep[0]["www_authenticate"], "Bearer error=\"invalid_token\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_is_reported_with_its_scopes_and_returned() {
    let g = Gateway::start(Mode::Ok { expires_in: 3600 }).await;
    let p = Provider::start("at-1").await;
    let b = bridge(&g, Default::default());
    let api = b
        .agent_client("c1")
        .scope_hint(Some(http::Method::GET), "/admin/users", &["admin.users"])
        .build()
        .unwrap();
    let r = api
        .get(format!("{}/admin/users/42", p.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "returned to the caller");
    let rep = reports(&g, 1).await;
    assert_eq!(rep.len(), 1);
    assert_eq!(rep[0]["connection"], "c1");
    assert_eq!(rep[0]["status"], 403);
    assert_eq!(rep[0]["scopes"], serde_json::json!(["admin.users"]));
    assert_eq!(
        rep[0]["path_template"], "/admin/users",
        "never the raw path"
    );
    assert_eq!(rep[0]["method"], "GET");
    assert_eq!(rep[0]["host"], "127.0.0.1");
    // The same failure again inside a minute: not reported again.
    for _ in 0..5 {
        api.get(format!("{}/admin/users/7", p.url))
            .send()
            .await
            .unwrap();
    }
    // Without a hint: the provider's challenge goes along for the broker to read.
    api.get(format!("{}/admin/settings", p.url))
        .with_extension(RequiredScopes(vec!["admin.settings".into()]))
        .send()
        .await
        .unwrap();
    api.get(format!("{}/admin/other", p.url))
        .send()
        .await
        .unwrap();
    let rep = reports(&g, 3).await;
    assert_eq!(rep.len(), 3, "{rep:?}");
    assert_eq!(rep[1]["scopes"], serde_json::json!(["admin.settings"]));
    assert!(rep[2].get("scopes").is_none());
    assert_eq!(
        rep[2]["www_authenticate"],
        "Bearer error=\"insufficient_scope\", scope=\"admin\""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_never_block_or_fail_the_request() {
    let g = Gateway::start(Mode::Ok { expires_in: 3600 }).await;
    let p = Provider::start("at-1").await;
    let b = bridge(&g, Default::default());
    let api = b.agent_client("c1").build().unwrap();
    api.get(format!("{}/items", p.url)).send().await.unwrap();
    // The gateway holds every report unanswered: the 403 still comes back.
    g.reports_open.send_replace(false);
    let r = api.get(format!("{}/admin/x", p.url)).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(
        g.reports.lock().unwrap().is_empty(),
        "the report is still held"
    );
    g.reports_open.send_replace(true);
    assert_eq!(reports(&g, 1).await.len(), 1, "and arrives once released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interaction_required_reaches_the_caller_typed() {
    let g = Gateway::start(Mode::Fail(409, "attention_required")).await;
    let p = Provider::start("at-1").await;
    let b = bridge(&g, Default::default());
    let api = b.agent_client("c1").build().unwrap();
    let e = api
        .get(format!("{}/items", p.url))
        .send()
        .await
        .unwrap_err();
    assert!(
        matches!(
            BridgeError::of(&e),
            Some(BridgeError::InteractionRequired { .. })
        ),
        "{e}"
    );
    assert_eq!(
        p.calls.load(Ordering::SeqCst),
        0,
        "nothing sent without credentials"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_cross_the_network_in_clear() {
    let g = Gateway::start(Mode::Ok { expires_in: 3600 }).await;
    let b = bridge(&g, Default::default());
    let api = b.agent_client("c1").build().unwrap();
    let e = api
        .get("http://api.example.com/items")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        BridgeError::of(&e),
        Some(&BridgeError::InsecureTransport("api.example.com".into()))
    );
    assert_eq!(g.calls(), 0, "refused before fetching anything");
    assert!(matches!(
        Bridge::builder("http://gateway.example.com", "nxa_test").build(),
        Err(BridgeError::InsecureTransport(_))
    ));
    assert!(Bridge::builder("http://gateway.example.com", "nxa_test")
        .allow_insecure_transport(true)
        .build()
        .is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_in_the_url_stays_out_of_error_messages() {
    let g = Gateway::start(Mode::Query("canary-query-key")).await;
    let b = bridge(&g, Default::default());
    let api = b.agent_client("c1").build().unwrap();
    // Nothing listens there: the request fails in transport.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = api
        .get(format!("http://127.0.0.1:{port}/items"))
        .send()
        .await
        .unwrap_err();
    let shown = format!("{e} {e:?}");
    assert!(!shown.contains("canary-query-key"), "{shown}");
}
