//! Agent keys at the broker: shown once, stored hashed, verified, revoked,
//! validated, audited without the key.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::harness::{assert_json_error, backend_tests, Backend, TestBroker};

async fn agent_keys_are_shown_once_stored_hashed_and_verified(b: Backend) {
    let t = TestBroker::start(&b).await;
    let (s, k) = t
        .post(
            "/agent-keys",
            json!({"name": "bot", "workspaces": ["w1", "w2", "w1"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{k}");
    let key = k["key"].as_str().unwrap().to_string();
    let id = k["id"].as_str().unwrap().to_string();
    assert!(key.starts_with("nxa_") && key.len() > 40);
    assert_eq!(k["workspaces"], json!(["w1", "w2"]));
    assert!(key.starts_with(k["prefix"].as_str().unwrap()));
    // Only a hash is stored.
    let stored =
        t.db.scalar(&format!(
            "SELECT COUNT(*) FROM agent_keys WHERE key_hash = '{}'",
            nexus_broker::registry::agent_keys::hash(&key)
        ))
        .await;
    assert_eq!(stored, Some(1));
    // (No key in this SQL: statements are logged at debug level.)
    let leaked =
        t.db.scalar(
            "SELECT COUNT(*) FROM agent_keys WHERE key_hash LIKE 'nxa_%' OR length(prefix) > 10",
        )
        .await;
    assert_eq!(leaked, Some(0));

    let (s, v) = t.post("/agent-keys/verify", json!({"key": key})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["id"], id.as_str());
    assert!(v["last_used_at"].is_string(), "use is noted");
    for bad in ["nxa_nope", "", "not-a-key", &"x".repeat(500)] {
        let (s, e) = t.post("/agent-keys/verify", json!({"key": bad})).await;
        assert_json_error(s, &e, 401, "invalid_agent_key");
    }
    let (_, list) = t.get("/agent-keys").await;
    assert!(!list.to_string().contains(&key));
    assert_eq!(list["agent_keys"][0]["revoked"], false);

    let (s, _) = t
        .call(Method::DELETE, &format!("/agent-keys/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, e) = t.post("/agent-keys/verify", json!({"key": key})).await;
    assert_json_error(s, &e, 401, "invalid_agent_key");
    let (s, e) = t
        .call(Method::DELETE, &format!("/agent-keys/{id}"), None)
        .await;
    assert_json_error(s, &e, 404, "agent_key_not_found");

    for body in [
        json!({"name": "", "workspaces": ["w"]}),
        json!({"name": "x", "workspaces": []}),
        json!({"name": "x", "workspaces": [""]}),
        json!({"name": "x"}),
        json!({"name": "x", "workspaces": ["w"], "admin": true}),
        json!({"name": "x".repeat(101), "workspaces": ["w"]}),
    ] {
        let (s, e) = t.post("/agent-keys", body).await;
        assert_json_error(s, &e, 400, "invalid_request");
    }
    let (_, audit) = t.get("/audit?event_type=agent_key.created").await;
    assert_eq!(audit["events"].as_array().unwrap().len(), 1);
    let (_, all) = t.get("/audit?limit=1000").await;
    assert!(!all.to_string().contains(&key), "never audited");
    let logged = crate::harness::logs();
    let line = logged.lines().find(|l| l.contains(&key));
    assert!(line.is_none(), "never logged: {line:?}");
    t.finish().await;
}

/// The gateway's own key reaches the routes a gateway calls and nothing
/// else: it cannot mint agent keys, change providers or read the audit log;
/// what it does is audited as `gateway`.
async fn the_gateway_key_reaches_only_the_gateways_routes(b: Backend) {
    let gateway_key = format!("gateway-key-{}", uuid::Uuid::new_v4().simple());
    let t = TestBroker::start_public(&b, |s| s.gateway_api_key = Some(gateway_key.clone())).await;
    t.create_provider(crate::providers::api_key_profile("weather"))
        .await;
    let as_gateway = |method: Method, path: &str, body: Option<serde_json::Value>| {
        let mut req = t
            .client
            .request(method, format!("{}{path}", t.base))
            .header("x-api-key", &gateway_key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status();
            (status, resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (s, spec) = as_gateway(
        Method::POST,
        "/auth/consent-spec",
        Some(json!({"workspace_id": "w", "provider_name": "weather", "return_url": crate::handshake::RETURN_URL})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{spec}");
    let id = spec["connection_id"].as_str().unwrap();
    for (m, p) in [
        (Method::GET, "/providers/metadata".to_string()),
        (Method::GET, format!("/connections/{id}")),
        (Method::GET, "/workspaces/w/connections/status".to_string()),
    ] {
        let (s, body) = as_gateway(m, &p, None).await;
        assert_eq!(s, StatusCode::OK, "{p}: {body}");
    }
    let (s, body) = as_gateway(
        Method::POST,
        "/agent-keys/verify",
        Some(json!({"key": format!("nxa_{}", "A".repeat(43))})),
    )
    .await;
    assert_json_error(s, &body, 401, "invalid_agent_key");
    for (m, p, body) in [
        (
            Method::POST,
            "/agent-keys",
            Some(json!({"name": "mine", "workspaces": ["*"]})),
        ),
        (Method::GET, "/agent-keys", None),
        (
            Method::PATCH,
            "/providers/x",
            Some(json!({"profile": {"token_url": "https://evil.test/t"}})),
        ),
        (Method::GET, "/audit", None),
        (Method::DELETE, &*format!("/connections/{id}"), None),
        (
            Method::POST,
            "/webhooks",
            Some(json!({"url": "https://evil.test/hook"})),
        ),
        (Method::POST, "/admin/pause", Some(json!({"reason": "x"}))),
    ] {
        let (s, e) = as_gateway(m, p, body).await;
        assert_json_error(s, &e, 403, "credential_not_allowed");
    }
    // The admin key still reaches everything; the audit names the gateway.
    let (_, audit) = t.get("/audit?event_type=handshake.started").await;
    assert_eq!(audit["events"][0]["actor"], "gateway", "{audit}");
    t.finish().await;
}

/// A flood of consent starts: each workspace may start a few per minute and
/// keep a few waiting for consent; the next get 429 with Retry-After, and
/// nothing is written for them.
async fn handshake_floods_are_refused_per_workspace(b: Backend) {
    let t = TestBroker::start_public(&b, |s| {
        s.handshake_starts_per_minute = Some("4".into());
        s.max_pending_per_workspace = Some("2".into());
    })
    .await;
    t.create_provider(crate::providers::api_key_profile("weather"))
        .await;
    let start = |ws: &str| {
        t.post(
            "/auth/consent-spec",
            json!({"workspace_id": ws, "provider_name": "weather", "return_url": crate::handshake::RETURN_URL}),
        )
    };
    for _ in 0..2 {
        let (s, body) = start("w1").await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    let (s, body) = start("w1").await;
    assert_json_error(s, &body, 429, "too_many_pending_connections");
    let (_, list) = t.get("/connections?workspace_id=w1").await;
    assert_eq!(
        list["connections"].as_array().unwrap().len(),
        2,
        "nothing written"
    );
    // Starts count whether or not they succeed: the fourth is the last.
    let (s, body) = start("w1").await;
    assert_json_error(s, &body, 429, "too_many_pending_connections");
    let resp = t
        .client
        .post(format!("{}/auth/consent-spec", t.base))
        .header("x-api-key", &t.api_key)
        .json(&json!({"workspace_id": "w1", "provider_name": "weather", "return_url": crate::handshake::RETURN_URL}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "too_many_handshakes");
    // Another workspace is not affected.
    let (s, body) = start("w2").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    t.finish().await;
}

backend_tests!(
    handshake_floods_are_refused_per_workspace,
    agent_keys_are_shown_once_stored_hashed_and_verified,
    the_gateway_key_reaches_only_the_gateways_routes
);
