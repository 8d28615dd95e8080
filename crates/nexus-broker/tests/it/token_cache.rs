//! The in-memory token cache: the warm path serves without decrypting, and a
//! change made anywhere (another replica, the refresh engine, an operator's
//! SQL) stops being served on every replica: at once where it is announced
//! (PostgreSQL NOTIFY), within the cache's max age (1 s) otherwise.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::fake_idp::FakeIdp;
use crate::harness::{assert_json_error, backend_tests, Backend, TestBroker};

/// Fetches `path` until `done` holds (bounded), returning the last answer.
async fn eventually(
    broker: &TestBroker,
    path: &str,
    done: impl Fn(StatusCode, &serde_json::Value) -> bool,
) -> (StatusCode, serde_json::Value) {
    crate::harness::eventually(|| broker.get(path), |(s, body)| done(*s, body)).await
}

/// [`crate::tokens::connected`] with an hour-long token, plus a second broker
/// (replica) on the same database.
async fn connected(b: &Backend) -> (TestBroker, TestBroker, std::sync::Arc<FakeIdp>, String) {
    let (a, idp, id) = crate::tokens::connected(b, 3600, |_| {}).await;
    let mut settings = a.settings.clone();
    settings.broker_addr = Some("127.0.0.1:0".into());
    let replica = TestBroker::start_on(a.db.share(), settings).await;
    (a, replica, idp, id)
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
    let other = a
        .state
        .config()
        .keys
        .encrypt_str(aad, &nexus_core::Secret::new("access-planted".to_string()));
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
    let (_, tok) = eventually(&a, &format!("/connections/{id}/token"), |_, t| {
        t["access_token"] == "access-planted"
    })
    .await;
    assert_eq!(tok["access_token"], "access-planted");
    replica.stop().await;
    a.finish().await;
}

async fn changes_on_another_replica_stop_being_served(b: Backend) {
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
    let (_, tok) = eventually(&a, &format!("/connections/{id}/token"), |_, t| {
        t["access_token"] == "access-2"
    })
    .await;
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
    let (_, tok) = eventually(&a, &format!("/connections/{id}/token"), |_, t| {
        t["provider"] == "fake-renamed"
    })
    .await;
    assert_eq!(tok["provider"], "fake-renamed");

    // A state change written by any replica (here: straight to the
    // database) stops issuance on every replica.
    a.db.exec(&format!(
        "UPDATE connections SET status = 'attention_required', error_description = 'revoked at the provider' WHERE id = '{id}'"
    ))
    .await;
    for broker in [&a, &replica] {
        let (s, body) = eventually(broker, &format!("/connections/{id}/token"), |s, _| {
            s == StatusCode::CONFLICT
        })
        .await;
        assert_json_error(s, &body, 409, "attention_required");
    }
    a.db.exec(&format!(
        "UPDATE connections SET status = 'revoked' WHERE id = '{id}'"
    ))
    .await;
    let (s, body) = eventually(&a, &format!("/connections/{id}/token"), |s, _| {
        s == StatusCode::GONE
    })
    .await;
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
    let (s, body) = eventually(&a, &format!("/connections/{id}/token"), |s, _| {
        s == StatusCode::CONFLICT
    })
    .await;
    assert_json_error(s, &body, 409, "connection_unusable");
    replica.stop().await;
    a.finish().await;
}

/// On PostgreSQL, a change made outside any broker (here: plain SQL) is
/// announced by the triggers and drops the cached response, without waiting
/// for the max age. (SQLite has no such channel: that is the max age's job.)
async fn postgres_announces_changes_made_by_anyone(b: Backend) {
    if matches!(b, Backend::Sqlite) {
        return;
    }
    let (a, replica, _idp, id) = connected(&b).await;
    // The announcement of the connection's own activation may still be on
    // its way (and drop the first cached answer): fetch until one stays.
    for _ in 0..20 {
        let (_, tok) = a.get(&format!("/connections/{id}/token")).await;
        assert_eq!(tok["access_token"], "access-1");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if a.state.tokens().cached_responses() == 1 {
            break;
        }
    }
    assert_eq!(a.state.tokens().cached_responses(), 1);
    // A column that is not in the stamp announces nothing.
    a.db.exec(&format!(
        "UPDATE connections SET error_description = 'note' WHERE id = '{id}'"
    ))
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(a.state.tokens().cached_responses(), 1);
    a.db.exec(&format!(
        "UPDATE connections SET status = 'revoked' WHERE id = '{id}'"
    ))
    .await;
    crate::harness::wait_until(|| a.state.tokens().cached_responses() == 0).await;
    assert_eq!(
        a.state.tokens().cached_responses(),
        0,
        "the NOTIFY dropped it"
    );
    replica.stop().await;
    a.finish().await;
}

backend_tests!(
    postgres_announces_changes_made_by_anyone,
    warm_path_serves_without_decrypting,
    changes_on_another_replica_stop_being_served,
    deleted_provider_is_not_served_from_cache,
);
