//! Bad input: every refusal is a 4xx with a JSON `{error, message}` body,
//! never a 500, and nothing is stored.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{
    assert_json_error, backend_tests, test_settings, Backend, TestBroker, TestDb,
};
use crate::providers::{api_key_profile, oauth_profile};

async fn raw(
    t: &TestBroker,
    method: Method,
    path: &str,
    key: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut req = t
        .client
        .request(method, format!("{}{path}", t.base))
        .body(body);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status}: not JSON: {text}"));
    (status, body)
}

async fn malformed_bodies_are_4xx_json(b: Backend) {
    let t = TestBroker::start(&b).await;
    let key = t.api_key.clone();
    let post = |ct: Option<&'static str>, body: &[u8]| {
        raw(
            &t,
            Method::POST,
            "/providers",
            Some(&key),
            ct,
            body.to_vec(),
        )
    };

    let (s, body) = post(Some("application/json"), b"{\"profile\": {").await;
    assert_json_error(s, &body, 400, "invalid_json");
    let (s, body) = post(Some("application/json"), b"").await;
    assert!(s.is_client_error(), "{s} {body}");
    let (s, body) = post(None, b"{}").await;
    assert_json_error(s, &body, 415, "unsupported_media_type");
    let (s, body) = post(Some("application/json"), b"[1,2]").await;
    assert_json_error(s, &body, 400, "invalid_profile");
    let (s, body) = post(Some("application/json"), b"\"just a string\"").await;
    assert_json_error(s, &body, 400, "invalid_profile");

    let mut cases: Vec<(Value, &str)> = vec![
        (json!({"profile": {"auth_type": "oauth2"}}), "missing name"),
        (json!({"profile": "x"}), "profile not an object"),
        (
            json!({"profile": {"name": 5, "auth_type": "oauth2"}}),
            "wrong type",
        ),
        (
            json!({"profile": {"name": "x", "auth_type": "kerberos"}}),
            "unknown auth_type",
        ),
        (
            json!({"profile": {"name": "x", "auth_type": "oauth2", "auth_header": "client_secret_jwt", "client_id": "c", "auth_url": "https://a/x", "token_url": "https://a/t"}}),
            "unknown auth_header",
        ),
        (
            json!({"profile": {"name": "x", "auth_type": "oauth2", "client_id": "c", "auth_url": "javascript:alert(1)", "token_url": "https://a/t"}}),
            "bad url",
        ),
        (
            json!({"profile": {"name": "x", "auth_type": "oauth2", "client_id": "c"}}),
            "no endpoints",
        ),
        (
            json!({"profile": {"name": "x", "auth_type": "oauth2", "client_id": "c", "auth_url": "https://a/x", "token_url": "https://a/t", "scopes": [1]}}),
            "scope not a string",
        ),
        (
            json!({"profile": {"name": "x", "auth_type": "oauth2", "client_id": "c", "auth_url": "https://a/x", "token_url": "https://a/t", "enable_discovery": "yes"}}),
            "bool as string",
        ),
        (
            json!({"profile": {"name": "x", "auth_type": "api_key", "params": {}}}),
            "static without schema",
        ),
        (
            json!({"profile": {"name": "x", "auth_type": "api_key", "client_secret": "s", "params": {"credential_schema": {"type": "object"}, "strategy": {"config": {"header_name": "h", "credential_field": "k"}}}}}),
            "static with client secret",
        ),
        (
            json!({"profile": {"name": "", "auth_type": "oauth2"}}),
            "empty name",
        ),
    ];
    // Invalid JSON Schema, and schemas that would fetch over the network or from disk.
    for schema in [
        json!({"type": "object", "properties": {"k": {"type": "strnig"}}}),
        json!({"type": "object", "properties": {"k": {"$ref": "https://schemas.example.com/key.json"}}}),
        json!({"type": "object", "properties": {"k": {"$ref": "file:///etc/passwd"}}}),
        json!({"type": "object", "required": "api_key"}),
    ] {
        let mut p = api_key_profile("x");
        p["params"]["credential_schema"] = schema;
        cases.push((json!({"profile": p}), "bad schema"));
    }
    let mut missing_strategy_field = api_key_profile("x");
    missing_strategy_field["params"]["strategy"]["config"] = json!({"header_name": "X-Api-Key"});
    cases.push((
        json!({"profile": missing_strategy_field}),
        "strategy lacks credential_field",
    ));

    for (body, what) in cases {
        let (s, resp) = t.post("/providers", body).await;
        assert!(s.is_client_error(), "{what}: {s} {resp}");
        assert!(
            resp["error"].is_string() && resp["message"].is_string(),
            "{what}: {resp}"
        );
    }
    let (s, body) = t
        .post(
            "/providers",
            json!({"profile": {"name": "x", "auth_type": "kerberos"}}),
        )
        .await;
    assert_json_error(s, &body, 400, "invalid_profile");
    assert!(
        body["message"].as_str().unwrap().contains("kerberos"),
        "{body}"
    );
    let mut remote = api_key_profile("x");
    remote["params"]["credential_schema"]["properties"]["api_key"] =
        json!({"$ref": "https://schemas.example.com/key.json"});
    let (s, body) = t.post("/providers", json!({"profile": remote})).await;
    assert_json_error(s, &body, 400, "invalid_profile");
    assert_eq!(body["field"], "params.credential_schema");

    // Nothing was stored.
    let (_, list) = t.get("/providers").await;
    assert_eq!(list, json!([]));
    t.finish().await;
}

async fn oversized_body_is_413(b: Backend) {
    let t = TestBroker::start(&b).await;
    let mut p = oauth_profile("big");
    p["description"] = Value::String("x".repeat(2 * 1024 * 1024));
    let (s, body) = t.post("/providers", json!({"profile": p})).await;
    assert_json_error(s, &body, 413, "payload_too_large");
    let (_, list) = t.get("/providers").await;
    assert_eq!(list, json!([]));
    t.finish().await;
}

async fn api_key_is_required_and_checked(b: Backend) {
    let t = TestBroker::start(&b).await;
    for path in [
        "/providers",
        "/providers/metadata",
        "/audit",
        "/providers/by-name/x",
    ] {
        let (s, body) = raw(&t, Method::GET, path, None, None, vec![]).await;
        assert_json_error(s, &body, 401, "missing_api_key");
        let (s, body) = raw(&t, Method::GET, path, Some("wrong-key"), None, vec![]).await;
        assert_json_error(s, &body, 401, "invalid_api_key");
        let almost = format!("{}x", t.api_key);
        let (s, body) = raw(&t, Method::GET, path, Some(&almost), None, vec![]).await;
        assert_json_error(s, &body, 401, "invalid_api_key");
    }
    let body = serde_json::to_vec(&json!({"profile": oauth_profile("x")})).unwrap();
    let (s, resp) = raw(
        &t,
        Method::POST,
        "/providers",
        None,
        Some("application/json"),
        body,
    )
    .await;
    assert_json_error(s, &resp, 401, "missing_api_key");
    // Liveness needs no key.
    let (s, _) = raw(&t, Method::GET, "/health", None, None, vec![]).await;
    assert_eq!(s, StatusCode::OK);
    let (_, list) = t.get("/providers").await;
    assert_eq!(list, json!([]));
    t.finish().await;
}

async fn cidr_allowlist_refuses_outsiders(b: Backend) {
    let db = TestDb::new(&b).await;
    let mut settings = test_settings(&db);
    settings.allowed_cidrs = Some("10.0.0.0/8, 192.168.0.0/16".into());
    let t = TestBroker::start_on(db, settings).await;
    let (s, body) = t.get("/providers").await;
    assert_json_error(s, &body, 403, "ip_not_allowed");
    let (s, body) = t.get("/ready").await;
    assert_json_error(s, &body, 403, "ip_not_allowed");
    let (s, _) = t.get("/health").await;
    assert_eq!(s, StatusCode::OK);
    let db = t.stop().await;

    let mut settings = test_settings(&db);
    settings.allowed_cidrs = Some("127.0.0.0/8".into());
    let t = TestBroker::start_on(db, settings).await;
    let (s, _) = t.get("/providers").await;
    assert_eq!(s, StatusCode::OK);
    t.finish().await;
}

async fn unknown_routes_methods_and_queries(b: Backend) {
    let t = TestBroker::start(&b).await;
    let (s, body) = t.get("/no/such/route?code=CANARY").await;
    assert_json_error(s, &body, 404, "not_found");
    assert!(
        !body["message"].as_str().unwrap().contains("CANARY"),
        "query strings are never echoed"
    );
    let (s, body) = t.call(Method::PUT, "/providers", Some(json!({}))).await;
    assert_json_error(s, &body, 405, "method_not_allowed");
    let (s, body) = t.get("/providers/not-a-uuid").await;
    assert_json_error(s, &body, 404, "provider_not_found");
    for q in [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "since=yesterday",
        "order=sideways",
    ] {
        let (s, body) = t.get(&format!("/audit?{q}")).await;
        assert_json_error(s, &body, 400, "invalid_query");
    }
    let (s, body) = t.post("/providers/x/aliases", json!({"alias": 5})).await;
    assert_json_error(s, &body, 400, "invalid_request");
    let (s, body) = t
        .post("/providers/x/aliases", json!({"alias": "a", "extra": 1}))
        .await;
    assert_json_error(s, &body, 400, "invalid_request");
    t.finish().await;
}

async fn nul_and_odd_input_answer_alike_on_both_backends(b: Backend) {
    let t = TestBroker::start(&b).await;
    let id = t.create_provider(oauth_profile("google")).await;
    for path in [
        "/providers/%00",
        "/providers/by-name/a%00",
        "/audit?event_type=%00",
        "/providers/by-name/%2500x%00",
    ] {
        let (s, body) = t.get(path).await;
        assert_json_error(s, &body, 400, "invalid_request");
    }
    let (s, body) = t
        .post(
            &format!("/providers/{id}/aliases"),
            json!({"alias": "abc\u{0}"}),
        )
        .await;
    assert_json_error(s, &body, 400, "invalid_request");
    let (s, body) = t
        .post(
            &format!("/providers/{id}/aliases"),
            json!({"alias": "tab\there"}),
        )
        .await;
    assert_json_error(s, &body, 400, "invalid_profile");
    let mut p = oauth_profile("nul\u{0}name");
    let (s, body) = t.post("/providers", json!({"profile": p.clone()})).await;
    assert_json_error(s, &body, 400, "invalid_request");
    // A secret of the wrong type is refused without quoting it back.
    p["name"] = json!("typed");
    p["client_secret"] = json!(987654321);
    let (s, body) = t.post("/providers", json!({"profile": p})).await;
    assert_json_error(s, &body, 400, "invalid_profile");
    assert!(!body.to_string().contains("987654321"), "{body}");
    // Made-up methods do not become metric labels.
    let resp = t
        .client
        .request(
            Method::from_bytes(b"BREW").unwrap(),
            format!("{}/providers", t.base),
        )
        .header("x-api-key", &t.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    let metrics = t
        .client
        .get(format!("{}/metrics", t.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("BREW"));
    assert!(metrics.contains("method=\"other\""));
    t.finish().await;
}

backend_tests!(
    nul_and_odd_input_answer_alike_on_both_backends,
    malformed_bodies_are_4xx_json,
    oversized_body_is_413,
    api_key_is_required_and_checked,
    cidr_allowlist_refuses_outsiders,
    unknown_routes_methods_and_queries,
);
