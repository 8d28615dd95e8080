//! The in-memory token cache: the warm path serves without decrypting, and a
//! change made anywhere (another replica, the refresh engine, an operator)
//! is seen by the very next request on every replica.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::fake_idp::FakeIdp;
use crate::handshake::{callback, start};
use crate::harness::{assert_json_error, backend_tests, Backend, TestBroker};

async fn connected(b: &Backend) -> (TestBroker, TestBroker, std::sync::Arc<FakeIdp>, String) {
    let idp = FakeIdp::start().await;
    let a = TestBroker::start_public(b, |_| {}).await;
    a.create_provider(idp.profile("fake")).await;
    {
        let mut k = idp.knobs();
        k.expires_in = 3600;
        k.access_token = "access-1".into();
        k.refresh_token = "refresh-1".into();
    }
    let flow = start(&a, &idp, "fake", json!({})).await;
    let (s, _, body) = callback(
        &a,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{body}");
    let mut settings = a.settings.clone();
    settings.broker_addr = Some("127.0.0.1:0".into());
    let replica = TestBroker::start_on(a.db.share(), settings).await;
    (a, replica, idp, flow.connection_id)
}

async fn warm_path_serves_without_decrypting(b: Backend) {
    let (a, replica, _idp, id) = connected(&b).await;
    let (s, tok) = a.get(&format!("/connections/{id}/token")).await;
    assert_eq!(
        (s, tok["access_token"].as_str()),
        (StatusCode::OK, Some("access-1"))
    );
    // Swap the stored envelope for another valid one without bumping the
    // version: a broker that decrypted on every request would serve it.
    let aad = nexus_broker::vault::Aad {
        table: "connections",
        row_id: &id,
        column: "access_token",
    };
    let other = a.state.config().keys.encrypt_str(
        aad,
        &nexus_broker::Secret::new("access-planted".to_string()),
    );
    a.db.exec(&format!(
        "UPDATE connections SET access_token = '{other}' WHERE id = '{id}'"
    ))
    .await;
    let (_, tok) = a.get(&format!("/connections/{id}/token")).await;
    assert_eq!(tok["access_token"], "access-1", "served from the cache");
    assert!(tok["expires_in"].as_i64().unwrap() > 3000, "{tok}");
    // A version bump (what every credential write does) invalidates it.
    a.db.exec(&format!(
        "UPDATE connections SET version = version + 1 WHERE id = '{id}'"
    ))
    .await;
    let (_, tok) = a.get(&format!("/connections/{id}/token")).await;
    assert_eq!(tok["access_token"], "access-planted");
    replica.stop().await;
    a.finish().await;
}

async fn changes_on_another_replica_are_seen_at_once(b: Backend) {
    let (a, replica, idp, id) = connected(&b).await;
    // Both replicas warm their caches.
    for broker in [&a, &replica] {
        let (_, tok) = broker.get(&format!("/connections/{id}/token")).await;
        assert_eq!(tok["access_token"], "access-1");
    }
    // The replica refreshes: the first broker serves the new token next.
    idp.knobs().access_token = "access-2".into();
    let (s, tok) = replica
        .post(&format!("/connections/{id}/refresh"), json!({}))
        .await;
    assert_eq!(
        (s, tok["access_token"].as_str()),
        (StatusCode::OK, Some("access-2"))
    );
    let (_, tok) = a.get(&format!("/connections/{id}/token")).await;
    assert_eq!(tok["access_token"], "access-2");

    // The provider is renamed through the replica: seen by the first broker.
    let provider_id = {
        let (_, c) = a.get(&format!("/connections/{id}")).await;
        c["provider_id"].as_str().unwrap().to_string()
    };
    let mut profile = idp.profile("fake");
    profile["name"] = json!("fake-renamed");
    let (s, body) = replica
        .call(
            Method::PUT,
            &format!("/providers/{provider_id}"),
            Some(json!({"profile": profile})),
        )
        .await;
    assert!(s.is_success(), "{s} {body}");
    let (_, tok) = a.get(&format!("/connections/{id}/token")).await;
    assert_eq!(tok["provider"], "fake-renamed");

    // A state change written by any replica (here: straight to the
    // database) stops issuance on every replica with the next request.
    a.db.exec(&format!(
        "UPDATE connections SET status = 'attention_required', error_description = 'revoked at the provider' WHERE id = '{id}'"
    ))
    .await;
    for broker in [&a, &replica] {
        let (s, body) = broker.get(&format!("/connections/{id}/token")).await;
        assert_json_error(s, &body, 409, "attention_required");
    }
    a.db.exec(&format!(
        "UPDATE connections SET status = 'revoked' WHERE id = '{id}'"
    ))
    .await;
    let (s, body) = a.get(&format!("/connections/{id}/token")).await;
    assert_json_error(s, &body, 410, "connection_revoked");
    replica.stop().await;
    a.finish().await;
}

async fn deleted_provider_is_not_served_from_cache(b: Backend) {
    let (a, replica, _idp, id) = connected(&b).await;
    let (_, tok) = a.get(&format!("/connections/{id}/token")).await;
    assert_eq!(tok["access_token"], "access-1");
    let (_, c) = a.get(&format!("/connections/{id}")).await;
    let provider_id = c["provider_id"].as_str().unwrap().to_string();
    let (s, body) = replica
        .call(Method::DELETE, &format!("/providers/{provider_id}"), None)
        .await;
    assert!(s.is_success(), "{s} {body}");
    let (s, body) = a.get(&format!("/connections/{id}/token")).await;
    assert_json_error(s, &body, 409, "connection_unusable");
    replica.stop().await;
    a.finish().await;
}

backend_tests!(
    warm_path_serves_without_decrypting,
    changes_on_another_replica_are_seen_at_once,
    deleted_provider_is_not_served_from_cache,
);
