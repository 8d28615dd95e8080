//! A complete OAuth handshake where the real OpenID provider redirects the
//! browser to the gateway's callback, which forwards it to the broker.

use nexus_testkit::{browser, client, consent, q, OidcPeer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{Stack, RETURN_URL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_through_the_gateway_callback() {
    handshake_through_the_gateway(false).await;
}

/// The same with mutual TLS between the gateway and the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_through_the_gateway_to_a_mutual_tls_broker() {
    handshake_through_the_gateway(true).await;
}

async fn handshake_through_the_gateway(mutual_tls: bool) {
    let port = crate::harness::free_port();
    let gateway = format!("http://127.0.0.1:{port}");
    let Some(peer) = OidcPeer::start(
        json!([client(
            "nexus",
            "client_secret_post",
            &format!("{gateway}/auth/callback")
        )]),
        &[],
    )
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = if mutual_tls {
        let d = crate::mtls::certificates(dir.path());
        Stack::start_tuned(port, "", false, crate::mtls::mutual_tls(&d, true)).await
    } else {
        Stack::start(port, "").await
    };
    let (st, b) = s
        .admin(
            Method::POST,
            "/providers",
            Some(json!({"profile": {
                "name": "idp", "auth_type": "oauth2", "client_id": "nexus", "client_secret": "nexus-secret",
                "issuer": peer.issuer, "enable_discovery": true, "scopes": ["openid", "email", "calendar.read"]
            }})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let tok = connect(&s, "idp", &gateway, &format!("{gateway}/auth/callback")).await;
    assert_eq!(tok["strategy"]["type"], "oauth2");
    let at = tok["access_token"].as_str().unwrap();
    let r = reqwest::Client::new()
        .get(format!("{}/api/resource?scope=calendar.read", peer.issuer))
        .bearer_auth(at)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "the token works at the provider"
    );
    if mutual_tls {
        // The callback reached the broker through the gateway's mutual TLS.
        let (_, audit) = s
            .admin(Method::GET, "/audit?event_type=connection.active", None)
            .await;
        assert_eq!(
            audit["events"][0]["client_identity"],
            crate::mtls::GATEWAY_ID,
            "{audit}"
        );
    }
    s.stop().await;
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Connects `provider` for a new agent key's workspace through the gateway:
/// request-connection (whose authUrl must name `redirect_uri`), consent at
/// the real provider as a browser, then the token answer.
async fn connect(s: &Stack, provider: &str, gateway: &str, redirect_uri: &str) -> Value {
    let (_, key) = s.agent_key(&["u1"]).await;
    let (st, spec) = s
        .call(
            Some(&key),
            Method::POST,
            "/v1/request-connection",
            Some(json!({"user_id": "u1", "provider_name": provider, "return_url": RETURN_URL})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{spec}");
    let auth_url = spec["authUrl"].as_str().unwrap();
    assert!(
        auth_url.contains(&urlencode(redirect_uri)),
        "redirect_uri is {redirect_uri}: {auth_url}"
    );
    let back = consent(&browser(), auth_url, gateway).await;
    assert_eq!(q(&back, "status").as_deref(), Some("success"), "{back}");
    let id = spec["connection_id"].as_str().unwrap();
    let (st, tok) = s
        .call(Some(&key), Method::GET, &format!("/v1/token/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{tok}");
    tok
}

/// A provider with its own redirect URI (`redirect: per_provider`), through
/// the gateway, at the real OpenID provider: the IdP knows only
/// `/auth/callback/{provider id}`, and the handshake completes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_provider_redirect_uri_through_the_gateway() {
    let port = crate::harness::free_port();
    let gateway = format!("http://127.0.0.1:{port}");
    let s = Stack::start(port, "").await;
    // The provider first (its id names its redirect URI), the IdP second,
    // then the provider is pointed at the IdP.
    let (st, b) = s
        .admin(
            Method::POST,
            "/providers",
            Some(json!({"profile": {
                "name": "own", "auth_type": "oauth2", "client_id": "nexus", "client_secret": "nexus-secret",
                "issuer": "http://127.0.0.1:9", "enable_discovery": true, "redirect": "per_provider",
                "scopes": ["openid", "email", "calendar.read"]
            }})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let own = format!("{gateway}/auth/callback/{id}");
    let Some(peer) =
        OidcPeer::start(json!([client("nexus", "client_secret_post", &own)]), &[]).await
    else {
        s.stop().await;
        return;
    };
    let (st, b) = s
        .admin(
            Method::PATCH,
            &format!("/providers/{id}"),
            Some(json!({"profile": {"issuer": peer.issuer}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{b}");
    let (_, view) = s
        .admin(Method::GET, &format!("/providers/{id}"), None)
        .await;
    assert_eq!(view["redirect_uri"], own.as_str());
    let tok = connect(&s, "own", &gateway, &own).await;
    assert!(tok["access_token"].is_string());
    s.stop().await;
}
