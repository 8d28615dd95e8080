//! REST through the gateway: every route, agent keys and workspaces, error
//! pass-through, CORS, and the reference gateway's wire shapes.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{Stack, RETURN_URL};

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_works_for_the_keys_workspace() {
    every_route(Stack::start(0, "").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_works_with_the_broker_in_process() {
    every_route(Stack::start_mode(0, "", true).await).await;
}

async fn every_route(s: Stack) {
    s.weather().await;
    let (_, key) = s.agent_key(&["u1"]).await;
    let id = s.connect(&key, "u1").await;

    let (st, c) = s
        .call(
            Some(&key),
            Method::GET,
            &format!("/v1/check-connection/{id}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        c,
        json!({"status": "active", "state": "active", "degraded": false, "reconsent": false})
    );
    let (st, tok) = s
        .call(Some(&key), Method::GET, &format!("/v1/token/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{tok}");
    assert_eq!(tok["credentials"], json!({"api_key": "weather-key-123"}));
    assert_eq!(tok["strategy"]["type"], "header");
    assert_eq!(tok["provider"], "weather");
    let (st, tok) = s
        .call(Some(&key), Method::POST, &format!("/v1/refresh/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{tok}");
    let (st, p) = s.call(Some(&key), Method::GET, "/v1/providers", None).await;
    assert_eq!(st, StatusCode::OK);
    // The reference's grouped map, strings (not null) for absent URLs.
    let weather = &p["api_key"]["weather"];
    assert_eq!(weather["api_base_url"], "", "{p}");
    assert_eq!(weather["user_info_endpoint"], "", "{p}");
    assert!(weather["scopes"].is_array(), "{p}");
    let (st, r) = s
        .call(
            Some(&key),
            Method::POST,
            &format!("/v1/connections/{id}/scope-failures"),
            Some(json!({"status": 403, "scopes": ["forecast.read"]})),
        )
        .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{r}");
    assert_eq!(r["status"], "degraded");
    let (st, w) = s
        .call(
            Some(&key),
            Method::GET,
            "/v1/workspaces/u1/connections/status",
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        w["connections"][&id]["failing_scopes"],
        json!(["forecast.read"])
    );
    assert_eq!(w["any_needs_attention"], true);
    // X-API-Key works as well as Bearer.
    let resp = s
        .client
        .get(format!("{}/v1/token/{id}", s.gateway))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Ops.
    for path in ["/health", "/ready", "/metrics"] {
        let r = s
            .client
            .get(format!("{}{path}", s.gateway))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keys_and_workspaces_are_enforced() {
    let s = Stack::start(0, "").await;
    s.weather().await;
    let (kid, key) = s.agent_key(&["u1"]).await;
    let (_, other) = s.agent_key(&["u2"]).await;
    let id = s.connect(&key, "u1").await;
    let token = format!("/v1/token/{id}");

    let (st, e) = s.call(None, Method::GET, &token, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(e["error"], "missing_agent_key");
    let (st, e) = s.call(Some("nxa_wrong"), Method::GET, &token, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    assert_eq!(e["error"], "invalid_agent_key");
    // Another workspace's connection answers exactly like an unknown one.
    let (st1, e1) = s.call(Some(&other), Method::GET, &token, None).await;
    let (st2, e2) = s
        .call(
            Some(&other),
            Method::GET,
            "/v1/token/no-such-connection",
            None,
        )
        .await;
    assert_eq!((st1, &e1), (st2, &e2));
    assert_eq!(st1, StatusCode::NOT_FOUND);
    assert_eq!(e1["error"], "connection_not_found");
    let (st, e) = s
        .call(
            Some(&other),
            Method::POST,
            &format!("/v1/refresh/{id}"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{e}");
    // v1 check-connection answers unknown connections 200 `failed`: the
    // same for another workspace's.
    let (st1, c1) = s
        .call(
            Some(&other),
            Method::GET,
            &format!("/v1/check-connection/{id}"),
            None,
        )
        .await;
    let (st2, c2) = s
        .call(
            Some(&other),
            Method::GET,
            "/v1/check-connection/no-such-connection",
            None,
        )
        .await;
    assert_eq!((st1, &c1), (st2, &c2));
    assert_eq!(st1, StatusCode::OK);
    assert_eq!(c1["status"], "failed");
    assert_eq!(c1["state"], "not_found");
    let (st, e) = s
        .call(
            Some(&other),
            Method::POST,
            &format!("/v1/connections/{id}/scope-failures"),
            Some(json!({"status": 403, "scopes": ["x"]})),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{e}");
    let (st, e) = s
        .call(
            Some(&other),
            Method::GET,
            "/v1/workspaces/u1/connections/status",
            None,
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{e}");
    let (st, e) = s
        .call(
            Some(&other),
            Method::POST,
            "/v1/request-connection",
            Some(json!({"user_id": "u1", "provider_name": "weather", "return_url": RETURN_URL})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{e}");

    // A revoked key stops working (after the short validation cache).
    let (st, _) = s.call(Some(&key), Method::GET, &token, None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = s
        .admin(Method::DELETE, &format!("/agent-keys/{kid}"), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let (st, e) = s.call(Some(&key), Method::GET, &token, None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED, "{e}");
    // Listed with its last use, never the key.
    let (_, list) = s.admin(Method::GET, "/agent-keys", None).await;
    let text = list.to_string();
    assert!(
        !text.contains(&key) && !text.contains(&other),
        "keys are never shown again"
    );
    let revoked = list["agent_keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == kid.as_str())
        .unwrap();
    assert_eq!(revoked["revoked"], true);
    assert!(revoked["last_used_at"].is_string());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_errors_pass_through_with_their_codes() {
    let s = Stack::start(0, "").await;
    s.weather().await;
    let (_, key) = s.agent_key(&["*"]).await;
    let id = s.connect(&key, "u1").await;
    s.broker_state
        .store()
        .revoke_connection(&id, &|c| nexus_broker::store::Transition {
            audit: nexus_broker::events::audit::AuditEvent::new("test").connection(c.id.clone()),
            event: None,
        })
        .await
        .unwrap();
    let (st, e) = s
        .call(Some(&key), Method::GET, &format!("/v1/token/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::GONE);
    assert_eq!(e["error"], "connection_revoked");
    let id2 = s.connect(&key, "u1").await;
    needs_a_person(&s, &id2).await;
    let (st, e) = s
        .call(Some(&key), Method::GET, &format!("/v1/token/{id2}"), None)
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{e}");
    assert_eq!(e["error"], "attention_required");
    let (st, e) = s
        .call(
            Some(&key),
            Method::POST,
            "/v1/request-connection",
            Some(json!({"user_id": "u1", "provider_name": "nope", "return_url": RETURN_URL})),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{e}");
    assert_eq!(e["error"], "provider_not_found");
    let resp = s
        .client
        .post(format!("{}/v1/request-connection", s.gateway))
        .bearer_auth(&key)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(resp.json::<Value>().await.unwrap()["error"], "invalid_json");
    let (st, e) = s
        .call(
            Some(&key),
            Method::POST,
            "/v1/request-connection",
            Some(json!({"provider_name": "weather"})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(e["error"], "missing_fields");
    let (st, e) = s.call(Some(&key), Method::GET, "/v1/nope", None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(e["message"].is_string());
    s.stop().await;
}

/// Moves a connection to `attention_required` as a rejected refresh would
/// (a state the gateway cannot cause).
pub async fn needs_a_person(s: &Stack, id: &str) {
    let store = s.broker_state.store();
    let c = store.get_connection(id).await.unwrap().unwrap();
    let ok = store
        .record_refresh_failure(
            id,
            c.version,
            "test",
            "invalid_grant",
            "the provider rejected the refresh",
            None,
            Some(&nexus_broker::store::Transition {
                audit: nexus_broker::events::audit::AuditEvent::new(
                    "connection.attention_required",
                ),
                event: None,
            }),
            true,
        )
        .await
        .unwrap();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_only_for_configured_origins() {
    let s = Stack::start(0, "https://app.example.test").await;
    let preflight = |origin: &'static str| {
        s.client
            .request(Method::OPTIONS, format!("{}/v1/token/abc", s.gateway))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let ok = preflight("https://app.example.test").await.unwrap();
    assert!(ok.status().is_success());
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example.test"
    );
    assert!(ok.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("authorization"));
    let no = preflight("https://evil.example.test").await.unwrap();
    assert!(no.headers().get("access-control-allow-origin").is_none());
    s.stop().await;

    // No origins configured (the default): no CORS at all.
    let s = Stack::start(0, "").await;
    let r = s
        .client
        .request(Method::OPTIONS, format!("{}/v1/token/abc", s.gateway))
        .header("origin", "https://app.example.test")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["error"].is_string(), "a JSON error: {body}");
    s.stop().await;
}

/// The reference gateway's four original endpoints, with literal fixtures of
/// its requests and the shapes of its responses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_wire_shapes() {
    let s = Stack::start(0, "").await;
    s.weather().await;
    let (_, key) = s.agent_key(&["user-123"]).await;
    let request: Value = serde_json::from_str(
        r#"{"user_id": "user-123", "provider_name": "weather", "scopes": [], "return_url": "http://localhost:3000/done", "metadata": {"source": "sdk"}}"#,
    )
    .unwrap();
    let (st, resp) = s
        .call(
            Some(&key),
            Method::POST,
            "/v1/request-connection",
            Some(request),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{resp}");
    assert_eq!(
        keys(&resp),
        ["authUrl", "connection_id", "provider_id", "scopes", "state"]
    );
    let id = resp["connection_id"].as_str().unwrap().to_string();
    let (_, check) = s
        .call(
            Some(&key),
            Method::GET,
            &format!("/v1/check-connection/{id}"),
            None,
        )
        .await;
    assert_eq!(check["status"], "pending", "{check}");
    assert_eq!(check["state"], "pending", "{check}");
    let (st, e) = s
        .call(Some(&key), Method::GET, &format!("/v1/token/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(keys(&e), ["code", "error", "message"]);
    assert_eq!(e["error"], "connection_pending");
    assert_eq!(e["code"], "connection_pending");
    let id = s.connect(&key, "user-123").await;
    let (_, tok) = s
        .call(Some(&key), Method::GET, &format!("/v1/token/{id}"), None)
        .await;
    for k in [
        "access_token",
        "token_type",
        "expires_in",
        "expires_at",
        "scope",
        "provider",
        "strategy",
        "credentials",
    ] {
        // Static credentials have no access token and no expiry: those
        // fields are absent (never null: the contract types them); the
        // ones the SDK reads are there.
        if ["access_token", "token_type", "expires_in", "expires_at"].contains(&k) {
            assert!(tok.get(k).is_none(), "{k} in {tok}");
        } else {
            assert!(tok.get(k).is_some(), "{k} in {tok}");
        }
    }
    assert!(tok.get("refresh_token").is_none());
    let (_, tok) = s
        .call(Some(&key), Method::POST, &format!("/v1/refresh/{id}"), None)
        .await;
    assert!(tok.get("credentials").is_some());
    s.stop().await;
}

/// The gateway's OpenAPI document: valid, and every operation routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_route() {
    let s = Stack::start(0, "").await;
    let (_, key) = s.agent_key(&["*"]).await;
    let doc = s.openapi().await;
    nexus_testkit::validate_openapi(&doc);
    let ops = nexus_testkit::operations(&doc);
    assert!(ops.len() >= 14, "{ops:?}");
    for (method, path) in ops {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let resp = s
            .client
            .request(m, format!("{}{path}", s.gateway))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(!body.contains("no route for"), "{method} {path} not routed");
    }
    assert_eq!(
        doc["paths"]["/v1/token/{id}"]["get"]["security"],
        json!([{"agentKey": []}])
    );
    s.stop().await;
}

/// The broker refusing the gateway itself is the operator's problem: agents
/// get 502, not a misleading 401. `/metrics` answers only to its networks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfiguration_is_not_blamed_on_agents() {
    let s = Stack::start(0, "").await;
    let (_, key) = s.agent_key(&["*"]).await;
    let config = nexus_gateway::GatewayConfig::from_settings(&nexus_gateway::GatewaySettings {
        broker_url: Some(s.broker.clone()),
        broker_api_key: Some("not-the-broker-api-key-0000000".into()),
        gateway_addr: Some("127.0.0.1:0".into()),
        metrics_allowed_cidrs: Some("10.0.0.0/8".into()),
        ..Default::default()
    })
    .unwrap();
    let gw = nexus_gateway::GatewayServer::start(config, nexus_core::telemetry::metrics_handle())
        .await
        .unwrap();
    let base = format!("http://{}", gw.local_addr());
    let task = tokio::spawn(gw.run(std::future::pending()));
    let r = s
        .client
        .get(format!("{base}/v1/providers"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "broker_unavailable"
    );
    let r = s
        .client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "loopback is not in 10.0.0.0/8"
    );
    task.abort();
    // Token answers are never cached on the way.
    s.weather().await;
    let id = s.connect(&key, "u1").await;
    let r = s
        .client
        .get(format!("{}/v1/token/{id}", s.gateway))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["cache-control"], "no-store");
    s.stop().await;
}

#[test]
fn bad_gateway_settings_name_their_variable() {
    use nexus_gateway::{GatewayConfig, GatewaySettings};
    let ok = GatewaySettings {
        broker_url: Some("http://10.0.0.5:8080".into()),
        broker_api_key: Some("k".repeat(32)),
        ..Default::default()
    };
    let err = |s: GatewaySettings| GatewayConfig::from_settings(&s).err().unwrap().to_string();
    assert!(GatewayConfig::from_settings(&ok).is_ok());
    assert!(err(GatewaySettings {
        broker_url: None,
        ..ok.clone()
    })
    .starts_with("BROKER_URL:"));
    assert!(err(GatewaySettings {
        broker_api_key: None,
        ..ok.clone()
    })
    .starts_with("BROKER_API_KEY:"));
    assert!(err(GatewaySettings {
        gateway_addr: Some("x".into()),
        ..ok.clone()
    })
    .starts_with("GATEWAY_ADDR:"));
    assert!(err(GatewaySettings {
        cors_allowed_origins: Some("https://a.test/path".into()),
        ..ok.clone()
    })
    .starts_with("CORS_ALLOWED_ORIGINS:"));
    for bad in [
        "/health",
        "/metrics",
        "/v1/x",
        "/auth/{x}",
        "relative",
        "/auth/capture",
    ] {
        let e = err(GatewaySettings {
            redirect_path: Some(bad.into()),
            ..ok.clone()
        });
        assert!(e.starts_with("REDIRECT_PATH:"), "{bad}: {e}");
    }
    assert!(err(GatewaySettings {
        metrics_allowed_cidrs: Some("nope".into()),
        ..ok
    })
    .starts_with("METRICS_ALLOWED_CIDRS:"));
}

/// A flood of made-up agent keys: each refusal is remembered (the broker is
/// asked once per key, not once per request), and an address that keeps
/// failing is refused with 429 until its window ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_are_remembered_and_failing_addresses_limited() {
    let mut s = Stack::start(0, "").await;
    let (_, good) = s.agent_key(&["*"]).await;
    let (st, _) = s
        .call(Some(&good), Method::GET, "/v1/providers", None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let made_up = format!("nxa_{}", "A".repeat(43));
    let (st, e) = s
        .call(Some(&made_up), Method::GET, "/v1/providers", None)
        .await;
    assert_eq!(
        (st, e["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_agent_key"))
    );
    // Without the broker, the refusal still comes from memory: no lookup.
    s.stop_broker();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (st, e) = s
        .call(Some(&made_up), Method::GET, "/v1/providers", None)
        .await;
    assert_eq!(
        (st, e["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_agent_key")),
        "{e}"
    );

    // Failures from this address, up to the limit; then 429 for everyone here.
    let limit = nexus_gateway::auth::MAX_FAILURES_PER_WINDOW as usize;
    let mut refused = None;
    for i in 0..limit + 5 {
        let resp = s
            .client
            .get(format!("{}/v1/providers", s.gateway))
            .bearer_auth(format!("nxa_bad{i}"))
            .send()
            .await
            .unwrap();
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = resp.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(retry >= 1);
            let e: Value = resp.json().await.unwrap();
            assert_eq!(e["code"], "too_many_auth_failures");
            refused = Some(i);
            break;
        }
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
    // Two failures came before the loop.
    assert_eq!(
        refused,
        Some(limit - 2),
        "refused once the limit was reached"
    );
    let (st, _) = s
        .call(Some(&good), Method::GET, "/v1/providers", None)
        .await;
    assert_eq!(
        st,
        StatusCode::TOO_MANY_REQUESTS,
        "the address is refused whatever it sends"
    );
    s.stop().await;
}

/// One agent key may start only so many handshakes a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_key_cannot_flood_handshakes() {
    let s = Stack::start_tuned(0, "", false, |_, g| g.agent_handshakes_per_minute = 3).await;
    s.weather().await;
    let (_, key) = s.agent_key(&["*"]).await;
    let (_, other) = s.agent_key(&["*"]).await;
    let start = |key: String, ws: String| {
        let s = &s;
        async move {
            s.call(
                Some(&key),
                Method::POST,
                "/v1/request-connection",
                Some(json!({"user_id": ws, "provider_name": "weather", "return_url": RETURN_URL})),
            )
            .await
        }
    };
    for i in 0..3 {
        let (st, b) = start(key.clone(), format!("ws-{i}")).await;
        assert_eq!(st, StatusCode::OK, "{b}");
    }
    let (st, e) = start(key.clone(), "ws-9".into()).await;
    assert_eq!(
        (st, e["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("too_many_handshakes"))
    );
    let (st, b) = start(other.clone(), "ws-9".into()).await;
    assert_eq!(st, StatusCode::OK, "another key has its own allowance: {b}");
    s.stop().await;
}
