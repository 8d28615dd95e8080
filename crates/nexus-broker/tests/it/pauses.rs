//! The kill switch: 423 under a workspace or operator pause, refreshes go on,
//! resume is instant, the operator's pause wins, every replica obeys.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::harness::{assert_json_error, backend_tests, eventually, Backend, TestBroker};
use crate::tokens::connected;

async fn a_paused_workspace_gets_423_and_resumes_at_once(b: Backend) {
    let (t, idp, id) = connected(&b, 3600, |_| {}).await;
    let token = format!("/connections/{id}/token");
    let (s, _) = t.get(&token).await;
    assert_eq!(s, StatusCode::OK, "warm the cache");
    // Another workspace's connection.
    let flow = crate::handshake::start(&t, &idp, "fake", json!({"workspace_id": "ws-2"})).await;
    let (s, _, _) = crate::handshake::callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let other = format!("/connections/{}/token", flow.connection_id);

    let (s, e) = t
        .call(Method::PUT, "/workspaces/ws-1/pause", Some(json!({})))
        .await;
    assert_json_error(s, &e, 400, "missing_fields");
    let (s, p) = t
        .call(
            Method::PUT,
            "/workspaces/ws-1/pause",
            Some(json!({"reason": "incident 42"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{p}");
    assert_eq!(p["pause"]["scope"], "workspace");
    // Cached or not, every token request answers 423 at once.
    let (s, e) = t.get(&token).await;
    assert_json_error(s, &e, 423, "issuance_paused");
    assert_eq!(e["reason"], "incident 42");
    assert_eq!(e["paused_scope"], "workspace");
    let (s, e) = t
        .call(Method::POST, &format!("/connections/{id}/refresh"), None)
        .await;
    assert_json_error(s, &e, 423, "issuance_paused");
    let (s, _) = t.get(&other).await;
    assert_eq!(s, StatusCode::OK, "other workspaces are served");
    let (_, st) = t.get("/workspaces/ws-1/connections/status").await;
    assert_eq!(st["issuance_paused"]["reason"], "incident 42");
    let (_, g) = t.get("/workspaces/ws-1/pause").await;
    assert_eq!(g["paused"], true);

    // The operator's pause wins over the workspace's.
    let (s, _) = t
        .call(
            Method::POST,
            "/admin/pause",
            Some(json!({"reason": "key rotation"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    for path in [&token, &other] {
        let (s, e) = t.get(path).await;
        assert_json_error(s, &e, 423, "issuance_paused");
        assert_eq!(e["reason"], "key rotation");
        assert_eq!(e["paused_scope"], "operator");
    }
    let (s, e) = t.get("/connections/unknown/token").await;
    assert_json_error(s, &e, 423, "issuance_paused");
    let (s, r) = t.call(Method::DELETE, "/admin/pause", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["was_paused"], true);
    let (s, e) = t.get(&token).await;
    assert_eq!(e["paused_scope"], "workspace", "{s} {e}");
    let (s, r) = t.call(Method::DELETE, "/workspaces/ws-1/pause", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["was_paused"], true);
    let (s, tok) = t.get(&token).await;
    assert_eq!(s, StatusCode::OK, "resumed at once: {tok}");
    let (s, r) = t.call(Method::DELETE, "/workspaces/ws-1/pause", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["was_paused"], false);

    let (_, a) = t.get("/audit?event_type=issuance.paused").await;
    assert_eq!(a["events"].as_array().unwrap().len(), 2, "{a}");
    let (_, a) = t.get("/audit?event_type=issuance.resumed").await;
    assert_eq!(a["events"].as_array().unwrap().len(), 2, "{a}");
    t.finish().await;
}

async fn refreshes_go_on_while_issuance_is_paused(b: Backend) {
    // A 4 s token and a margin of 2 s: the worker refreshes every ~2 s.
    let (t, idp, id) = connected(&b, 4, |s| {
        s.refresh_worker = Some("true".into());
        s.refresh_margin_secs = Some("2".into());
        s.refresh_jitter_secs = Some("0".into());
    })
    .await;
    t.db.exec(&format!(
        "UPDATE connections SET next_refresh_at = 0 WHERE id = '{id}'"
    ))
    .await;
    let (s, _) = t
        .call(
            Method::POST,
            "/admin/pause",
            Some(json!({"reason": "drill"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let before = idp.counters().refresh_requests;
    let after = eventually(
        || std::future::ready(idp.counters().refresh_requests),
        |n| *n >= before + 2,
    )
    .await;
    assert!(after >= before + 2, "refreshed while paused");
    let (s, e) = t.get(&format!("/connections/{id}/token")).await;
    assert_json_error(s, &e, 423, "issuance_paused");
    let (s, _) = t.call(Method::DELETE, "/admin/pause", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, tok) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(s, StatusCode::OK, "{tok}");
    assert!(
        tok["expires_in"].as_i64().unwrap() >= 1,
        "a fresh token at once: {tok}"
    );
    t.finish().await;
}

async fn the_environment_pauses_at_start_up_and_every_replica_obeys(b: Backend) {
    let (t, _idp, id) = connected(&b, 3600, |s| {
        s.issuance_paused = Some("true".into());
    })
    .await;
    let token = format!("/connections/{id}/token");
    let (s, e) = t.get(&token).await;
    assert_json_error(s, &e, 423, "issuance_paused");
    assert!(e["reason"]
        .as_str()
        .unwrap()
        .contains("NEXUS_ISSUANCE_PAUSED"));
    // A second replica on the same database.
    let mut settings = crate::harness::test_settings(&t.db);
    settings.encryption_key = t.settings.encryption_key.clone();
    settings.state_key = t.settings.state_key.clone();
    settings.api_key = t.settings.api_key.clone();
    let t2 = TestBroker::start_on(t.db.share(), settings).await;
    let (s, _) = t2.get(&token).await;
    assert_eq!(s.as_u16(), 423);
    let (s, _) = t.call(Method::DELETE, "/admin/pause", None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = eventually(|| t2.get(&token), |(s, _)| *s == StatusCode::OK).await;
    assert_eq!(s, StatusCode::OK, "the other replica resumed too");
    let (s, _) = t2
        .call(
            Method::PUT,
            "/workspaces/ws-1/pause",
            Some(json!({"reason": "r2"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, e) = eventually(|| t.get(&token), |(s, _)| s.as_u16() == 423).await;
    assert_json_error(s, &e, 423, "issuance_paused");
    assert_eq!(e["reason"], "r2");
    tokio::time::sleep(Duration::from_millis(10)).await;
    t2.stop().await;
    t.finish().await;
}

backend_tests!(
    a_paused_workspace_gets_423_and_resumes_at_once,
    refreshes_go_on_while_issuance_is_paused,
    the_environment_pauses_at_start_up_and_every_replica_obeys,
);
