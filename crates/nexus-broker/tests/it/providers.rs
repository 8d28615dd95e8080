//! Provider registry: CRUD, aliases, metadata, soft delete, uniqueness.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{assert_json_error, backend_tests, Backend, TestBroker};

pub fn oauth_profile(name: &str) -> Value {
    json!({
        "name": name,
        "auth_type": "oauth2",
        "client_id": "client-123",
        "client_secret": "not-a-canary",
        "auth_url": "https://idp.example.com/authorize",
        "token_url": "https://idp.example.com/token",
        "user_info_endpoint": "https://idp.example.com/userinfo",
        "api_base_url": "https://api.example.com",
        "scopes": ["openid", "email"],
        "params": {"access_type": "offline", "prompt": "consent"},
        "description": "Example IdP",
        "category": "identity"
    })
}

pub fn api_key_profile(name: &str) -> Value {
    json!({
        "name": name,
        "auth_type": "api_key",
        "api_base_url": "https://api.weather.example",
        "params": {
            "credential_schema": {
                "type": "object",
                "required": ["api_key"],
                "properties": {"api_key": {"type": "string", "title": "API key", "writeOnly": true}}
            },
            "strategy": {"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}}
        }
    })
}

async fn crud_round_trip(b: Backend) {
    let t = TestBroker::start(&b).await;
    let google = t.create_provider(oauth_profile("google")).await;
    let weather = t.create_provider(api_key_profile("weather")).await;

    let (s, list) = t.get("/providers").await;
    assert_eq!(s, StatusCode::OK);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["google", "weather"]);
    assert!(list[0]["id"].is_string());

    let (s, p) = t.get(&format!("/providers/{google}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(p["id"], google);
    assert_eq!(p["client_secret_set"], true);
    assert!(
        p.get("client_secret").is_none(),
        "secret must never be returned: {p}"
    );
    assert_eq!(p["auth_header"], "client_secret_post");
    assert_eq!(p["strategy"]["type"], "oauth2");
    assert_eq!(p["params"]["access_type"], "offline");

    let (_, w) = t.get(&format!("/providers/{weather}")).await;
    assert_eq!(w["client_secret_set"], false);
    assert_eq!(
        w["strategy"],
        json!({"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}})
    );

    let (s, by_name) = t.get("/providers/by-name/google").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(by_name["id"], google);

    // PUT without client_secret keeps the stored secret.
    let mut changed = oauth_profile("google");
    changed.as_object_mut().unwrap().remove("client_secret");
    changed["scopes"] = json!(["openid", "email", "calendar.read"]);
    let (s, body) = t
        .call(
            Method::PUT,
            &format!("/providers/{google}"),
            Some(json!({"profile": changed})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (_, p) = t.get(&format!("/providers/{google}")).await;
    assert_eq!(p["scopes"], json!(["openid", "email", "calendar.read"]));
    assert_eq!(p["client_secret_set"], true);

    // A GET body can be sent back as a PUT unchanged.
    let (s, body) = t
        .call(
            Method::PUT,
            &format!("/providers/{google}"),
            Some(json!({"profile": p})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");

    // PATCH merges; null removes.
    let (s, body) = t
        .call(Method::PATCH, &format!("/providers/{google}"), Some(json!({"profile": {"description": null, "category": "work", "client_secret": null}})))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (_, p) = t.get(&format!("/providers/{google}")).await;
    assert!(p.get("description").is_none(), "{p}");
    assert_eq!(p["category"], "work");
    assert_eq!(p["client_secret_set"], false);
    assert_eq!(p["client_id"], "client-123");

    // PATCH that breaks a rule is refused and changes nothing.
    let (s, body) = t
        .call(
            Method::PATCH,
            &format!("/providers/{google}"),
            Some(json!({"profile": {"token_url": "ftp://nope", "category": "x"}})),
        )
        .await;
    assert_json_error(s, &body, 400, "invalid_profile");
    assert_eq!(body["field"], "token_url");
    let (_, p) = t.get(&format!("/providers/{google}")).await;
    assert_eq!(p["category"], "work");

    t.finish().await;
}

async fn metadata_groups_by_auth_type(b: Backend) {
    let t = TestBroker::start(&b).await;
    let google = t.create_provider(oauth_profile("google")).await;
    let weather = t.create_provider(api_key_profile("weather")).await;
    let (s, m) = t.get("/providers/metadata").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        m["oauth2"]["google"],
        json!({"id": google, "api_base_url": "https://api.example.com", "user_info_endpoint": "https://idp.example.com/userinfo",
               "scopes": ["openid", "email"], "description": "Example IdP", "category": "identity"})
    );
    assert_eq!(m["api_key"]["weather"]["id"], weather);
    // Absent text is an empty string, never null (the reference's clients type it so).
    assert_eq!(m["api_key"]["weather"]["user_info_endpoint"], "");
    assert_eq!(m["api_key"]["weather"]["description"], "");
    assert_eq!(m.as_object().unwrap().len(), 2);
    t.finish().await;
}

async fn duplicate_names_conflict_and_failed_changes_keep_data(b: Backend) {
    let t = TestBroker::start(&b).await;
    t.create_provider(oauth_profile("google")).await;
    let github = t.create_provider(oauth_profile("github")).await;
    let (s, body) = t
        .post("/providers", json!({"profile": oauth_profile("google")}))
        .await;
    assert_json_error(s, &body, 409, "conflict");
    assert!(body["message"].as_str().unwrap().contains("google"));
    // Names are unique and found in any letter case (as the reference's
    // are); the registered spelling is kept for display.
    let (s, body) = t
        .post("/providers", json!({"profile": oauth_profile("GOOGLE")}))
        .await;
    assert_json_error(s, &body, 409, "conflict");
    let (s, body) = t.get("/providers/by-name/GoOgLe").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["name"], "google");
    let mixed = t.create_provider(oauth_profile("OpenWeather")).await;
    let (s, body) = t.get("/providers/by-name/openweather").await;
    assert_eq!(
        (s, body["id"].as_str()),
        (StatusCode::OK, Some(mixed.as_str()))
    );
    assert_eq!(body["name"], "OpenWeather");

    // Renaming onto a taken name fails as a whole: row and audit log unchanged.
    let (_, before) = t.get("/audit").await;
    let (s, body) = t
        .call(
            Method::PATCH,
            &format!("/providers/{github}"),
            Some(json!({"profile": {"name": "google", "category": "x"}})),
        )
        .await;
    assert_json_error(s, &body, 409, "conflict");
    let (_, p) = t.get(&format!("/providers/{github}")).await;
    assert_eq!(p["name"], "github");
    assert_eq!(p["category"], "identity");
    let (_, after) = t.get("/audit").await;
    assert_eq!(
        before["count"], after["count"],
        "a failed change writes no audit event"
    );
    t.finish().await;
}

async fn soft_delete_frees_the_name(b: Backend) {
    let t = TestBroker::start(&b).await;
    let id = t.create_provider(oauth_profile("google")).await;
    let (s, _) = t
        .post(
            &format!("/providers/{id}/aliases"),
            json!({"alias": "Google Prod"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);

    let (s, body) = t
        .call(Method::DELETE, &format!("/providers/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = t.get(&format!("/providers/{id}")).await;
    assert_json_error(s, &body, 404, "provider_not_found");
    let (s, body) = t.get("/providers/by-name/google").await;
    assert_json_error(s, &body, 404, "provider_not_found");
    let (s, body) = t.get("/providers/by-name/google-prod").await;
    assert_json_error(s, &body, 404, "provider_not_found");
    let (s, body) = t
        .call(Method::DELETE, &format!("/providers/{id}"), None)
        .await;
    assert_json_error(s, &body, 404, "provider_not_found");
    let (_, list) = t.get("/providers").await;
    assert_eq!(list, json!([]));

    // Name and alias are free again.
    let again = t.create_provider(oauth_profile("google")).await;
    assert_ne!(again, id);
    let (s, _) = t
        .post(
            &format!("/providers/{again}/aliases"),
            json!({"alias": "google-prod"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);

    // Delete by name, through an alias spelling.
    let (s, body) = t
        .call(Method::DELETE, "/providers/by-name/GOOGLE_PROD", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["id"], again);

    // Soft delete: the rows are still there, marked deleted.
    let deleted_at =
        t.db.scalar(&format!(
            "SELECT deleted_at FROM providers WHERE id = '{id}'"
        ))
        .await;
    assert!(deleted_at.is_some_and(|ms| ms > 0));
    let rows =
        t.db.scalar("SELECT COUNT(*) FROM providers WHERE name = 'google'")
            .await;
    assert_eq!(rows, Some(2));
    t.finish().await;
}

async fn aliases_resolve_by_normalized_form(b: Backend) {
    let t = TestBroker::start(&b).await;
    let id = t.create_provider(oauth_profile("google")).await;
    let other = t.create_provider(oauth_profile("github")).await;
    let (s, body) = t
        .post(
            &format!("/providers/{id}/aliases"),
            json!({"alias": "Google Prod"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(body["alias"], "google-prod");

    for spelling in ["google-prod", "GOOGLE_PROD", "google%20prod"] {
        let (s, body) = t.get(&format!("/providers/by-name/{spelling}")).await;
        assert_eq!(s, StatusCode::OK, "{spelling}: {body}");
        assert_eq!(body["id"], id);
    }
    // The same alias cannot point at two providers.
    let (s, body) = t
        .post(
            &format!("/providers/{other}/aliases"),
            json!({"alias": "google_prod"}),
        )
        .await;
    assert_json_error(s, &body, 409, "conflict");
    // Unknown provider, empty alias.
    let (s, body) = t
        .post(
            "/providers/00000000-0000-0000-0000-000000000000/aliases",
            json!({"alias": "x"}),
        )
        .await;
    assert_json_error(s, &body, 404, "provider_not_found");
    let (s, body) = t
        .post(&format!("/providers/{id}/aliases"), json!({"alias": "--"}))
        .await;
    assert_json_error(s, &body, 400, "invalid_profile");

    let (s, list) = t.get(&format!("/providers/{id}/aliases")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        list,
        json!([{"alias": "google-prod", "display": "Google Prod"}])
    );
    let (_, p) = t.get(&format!("/providers/{id}")).await;
    assert_eq!(p["aliases"], json!(["Google Prod"]));

    let (s, _) = t
        .call(
            Method::DELETE,
            &format!("/providers/{id}/aliases/Google%20Prod"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = t.get("/providers/by-name/google-prod").await;
    assert_json_error(s, &body, 404, "provider_not_found");
    t.finish().await;
}

async fn every_static_auth_type_registers(b: Backend) {
    let t = TestBroker::start(&b).await;
    let schema = |fields: &[&str]| {
        let props: serde_json::Map<String, Value> = fields
            .iter()
            .map(|f| (f.to_string(), json!({"type": "string"})))
            .collect();
        json!({"type": "object", "required": fields, "properties": props})
    };
    let cases = [
        (
            "basic",
            "basic_auth",
            schema(&["username", "password"]),
            json!({"config": {"username_field": "username", "password_field": "password"}}),
        ),
        (
            "hdr",
            "header",
            schema(&["token"]),
            json!({"config": {"header_name": "Authorization", "credential_field": "token", "value_prefix": "Token "}}),
        ),
        (
            "qp",
            "query_param",
            schema(&["key"]),
            json!({"config": {"param_name": "key", "credential_field": "key"}}),
        ),
        (
            "hmac",
            "hmac_payload",
            schema(&["secret"]),
            json!({"config": {"header_name": "X-Signature", "algorithm": "sha256", "credential_field": "secret", "encoding": "hex"}}),
        ),
        (
            "aws",
            "aws_sigv4",
            schema(&["access_key", "secret_key", "session_token"]),
            json!({"config": {"region": "eu-west-1", "service": "s3"}}),
        ),
    ];
    for (name, auth_type, schema, strategy) in cases {
        let id = t
            .create_provider(json!({"name": name, "auth_type": auth_type, "params": {"credential_schema": schema, "strategy": strategy}}))
            .await;
        let (_, p) = t.get(&format!("/providers/{id}")).await;
        assert_eq!(p["strategy"]["type"], auth_type, "{p}");
    }
    // Discovery-based OAuth needs no explicit endpoints.
    t.create_provider(json!({"name": "oidc", "auth_type": "oauth2", "client_id": "c", "issuer": "https://accounts.example.com", "enable_discovery": true}))
        .await;
    let (_, m) = t.get("/providers/metadata").await;
    assert_eq!(m.as_object().unwrap().len(), 6);
    t.finish().await;
}

async fn concurrent_changes_never_fail_or_get_lost(b: Backend) {
    let t = TestBroker::start(&b).await;
    let id = t.create_provider(oauth_profile("google")).await;
    // Alias adds racing provider creates: every one succeeds, none is a 5xx.
    let mut tasks = Vec::new();
    for i in 0..30 {
        let (client, base, key, id) = (
            t.client.clone(),
            t.base.clone(),
            t.api_key.clone(),
            id.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let alias = client
                .post(format!("{base}/providers/{id}/aliases"))
                .header("x-api-key", &key)
                .json(&json!({"alias": format!("alias-{i}")}))
                .send();
            let create = client
                .post(format!("{base}/providers"))
                .header("x-api-key", &key)
                .json(&json!({"profile": oauth_profile(&format!("p{i}"))}))
                .send();
            let (a, c) = tokio::join!(alias, create);
            (a.unwrap().status(), c.unwrap().status())
        }));
    }
    for task in tasks {
        let (a, c) = task.await.unwrap();
        assert_eq!((a, c), (StatusCode::CREATED, StatusCode::CREATED));
    }
    let (_, aliases) = t.get(&format!("/providers/{id}/aliases")).await;
    assert_eq!(aliases.as_array().unwrap().len(), 30);

    // An update computed from a stale read is refused, not applied over a newer one.
    let store = t.state.store();
    let row = store.get_provider(&id).await.unwrap().unwrap();
    let (s, _) = t
        .call(
            Method::PATCH,
            &format!("/providers/{id}"),
            Some(json!({"profile": {"category": "newer"}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let stale = nexus_broker::store::ProviderUpdate {
        name: row.name.clone(),
        auth_type: row.auth_type.clone(),
        profile: row.profile.clone(),
        client_secret: nexus_broker::store::SecretUpdate::Keep,
        expected_version: row.version,
    };
    let err = store
        .update_provider(
            &id,
            &stale,
            &nexus_broker::events::audit::AuditEvent::new("test"),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, nexus_broker::store::StoreError::Conflict(_)),
        "{err}"
    );
    let (_, p) = t.get(&format!("/providers/{id}")).await;
    assert_eq!(p["category"], "newer");
    t.finish().await;
}

/// Static providers in the reference implementation's documented shape
/// (strategy settings flat in `params`, its defaults, `api_key` as a legacy
/// alias of `header`, `base_url`) register, and answer with the strategy
/// the reference would send.
async fn reference_shaped_static_providers_register(b: Backend) {
    let t = TestBroker::start(&b).await;
    let schema = |fields: &[&str]| {
        let props: serde_json::Map<String, Value> = fields
            .iter()
            .map(|f| (f.to_string(), json!({"type": "string"})))
            .collect();
        json!({"type": "object", "properties": props, "required": fields})
    };
    for (profile, strategy, base) in [
        (
            json!({"name": "freedcamp", "auth_type": "header", "params": {
                "base_url": "https://freedcamp.com/api/v1/", "header_name": "X-Freedcamp-Key",
                "credential_field": "user_key", "credential_schema": schema(&["user_key"])}}),
            json!({"type": "header", "config": {"header_name": "X-Freedcamp-Key", "credential_field": "user_key"}}),
            Some("https://freedcamp.com/api/v1/"),
        ),
        (
            json!({"name": "legacy", "auth_type": "api_key", "params": {
                "value_prefix": "Token ", "credential_schema": schema(&["api_key"])}}),
            json!({"type": "header", "config": {"header_name": "Authorization", "credential_field": "api_key", "value_prefix": "Token "}}),
            None,
        ),
        (
            json!({"name": "q", "auth_type": "query_param", "params": {
                "param_name": "appid", "credential_schema": schema(&["api_key"])}}),
            json!({"type": "query_param", "config": {"param_name": "appid", "credential_field": "api_key"}}),
            None,
        ),
        (
            json!({"name": "basic", "auth_type": "basic_auth", "params": {
                "credential_schema": schema(&["username", "password"])}}),
            json!({"type": "basic_auth", "config": {"username_field": "username", "password_field": "password"}}),
            None,
        ),
        (
            json!({"name": "aws", "auth_type": "aws_sigv4", "params": {
                "service": "execute-api", "credential_schema": schema(&["access_key", "secret_key"])}}),
            json!({"type": "aws_sigv4", "config": {"service": "execute-api", "region": "us-east-1"}}),
            None,
        ),
        (
            json!({"name": "signed", "auth_type": "hmac_payload", "params": {
                "header_name": "X-Signature", "secret_field": "secret", "credential_schema": schema(&["secret"])}}),
            json!({"type": "hmac_payload", "config": {"header_name": "X-Signature", "credential_field": "secret", "algorithm": "sha256", "encoding": "hex"}}),
            None,
        ),
    ] {
        let name = profile["name"].clone();
        let (s, body) = t
            .post("/providers", json!({"profile": profile.clone()}))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{name}: {body}");
        // The same flat shape planned again (a manifest's second plan) is
        // no change: it normalises to what was stored.
        let (s, plan) = t.post("/providers/plan", json!({"profile": profile})).await;
        assert_eq!(s, StatusCode::OK, "{name}: {plan}");
        assert_eq!(plan["action"], "none", "{name}: {plan}");
        let id = body["id"].as_str().unwrap();
        let (_, view) = t.get(&format!("/providers/{id}")).await;
        assert_eq!(view["strategy"], strategy, "{name}");
        assert_eq!(view["api_base_url"].as_str(), base, "{name}");
        // One stored form: the flat keys moved into the strategy.
        assert!(
            view["params"].get("header_name").is_none(),
            "{name}: {view}"
        );
    }
    t.finish().await;
}

/// A request with an `If-Match` header; status, ETag and JSON body.
async fn with_if_match(
    t: &TestBroker,
    method: Method,
    path: &str,
    tag: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Option<String>, Value) {
    let mut req = t
        .client
        .request(method, format!("{}{path}", t.base))
        .header("x-api-key", &t.api_key);
    if let Some(tag) = tag {
        req = req.header("if-match", tag);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let etag = resp
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_string());
    (status, etag, resp.json().await.unwrap())
}

/// `POST /providers/plan` says what a registration would do and stores
/// nothing (the secret compared in the vault, never shown); `If-Match` with
/// the version read refuses a change someone made since (412), and the
/// refused change leaves the provider as it was.
async fn plans_change_nothing_and_if_match_refuses_stale_writes(b: Backend) {
    let t = TestBroker::start(&b).await;
    let secret_of = |plan: &Value| -> Value {
        plan["changes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["field"] == "client_secret")
            .cloned()
            .unwrap_or(Value::Null)
    };
    let (s, plan) = t
        .post(
            "/providers/plan",
            json!({"profile": oauth_profile("google")}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{plan}");
    assert_eq!(plan["action"], "create");
    assert!(plan["changes"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["field"] == "client_id" && c["before"].is_null() && c["after"] == "client-123"));
    assert_eq!(secret_of(&plan)["after"], "(set)");
    assert!(!plan.to_string().contains("not-a-canary"), "{plan}");
    let (_, list) = t.get("/providers").await;
    assert_eq!(list, json!([]), "a plan stores nothing");
    let (s, body) = t
        .post(
            "/providers/plan",
            json!({"profile": {"name": "x", "auth_type": "oauth2", "client_id": "c", "auth_url": "javascript:alert(1)", "token_url": "https://a/t"}}),
        )
        .await;
    assert_json_error(s, &body, 400, "invalid_profile");

    let google = t.create_provider(oauth_profile("google")).await;
    let (_, plan) = t
        .post(
            "/providers/plan",
            json!({"profile": oauth_profile("google")}),
        )
        .await;
    assert_eq!(
        plan["action"], "none",
        "the same profile and secret: {plan}"
    );
    assert_eq!(plan["id"], google);
    let version = plan["version"].as_i64().unwrap();

    let mut wanted = oauth_profile("google");
    wanted["scopes"] = json!(["openid"]);
    wanted["client_secret"] = json!("rotated-secret-value");
    let (_, plan) = t
        .post("/providers/plan", json!({"profile": wanted.clone()}))
        .await;
    assert_eq!(plan["action"], "update");
    assert_eq!(
        plan["changes"],
        json!([
            {"field": "scopes", "before": ["openid", "email"], "after": ["openid"]},
            {"field": "client_secret", "before": "(set)", "after": "(changed)"},
        ])
    );
    assert!(!plan.to_string().contains("rotated-secret-value"), "{plan}");

    let path = format!("/providers/{google}");
    let (s, etag, view) = with_if_match(&t, Method::GET, &path, None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(etag.as_deref(), Some(format!("\"{version}\"").as_str()));
    assert_eq!(view["version"], version);

    // Someone else changes it after the plan was read.
    let (s, _) = t
        .call(
            Method::PATCH,
            &path,
            Some(json!({"profile": {"description": "edited by hand"}})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let tag = format!("\"{version}\"");
    for (method, body) in [
        (Method::PUT, Some(json!({"profile": wanted.clone()}))),
        (
            Method::PATCH,
            Some(json!({"profile": {"scopes": ["openid"]}})),
        ),
        (Method::DELETE, None),
    ] {
        let (s, _, body) = with_if_match(&t, method.clone(), &path, Some(&tag), body).await;
        assert_json_error(s, &body, 412, "provider_changed");
        assert_eq!(body["version"], version + 1, "{method}: {body}");
    }
    let (_, view) = t.get(&path).await;
    assert_eq!(
        view["scopes"],
        json!(["openid", "email"]),
        "nothing overwritten"
    );
    assert_eq!(view["description"], "edited by hand");

    let (s, _, body) = with_if_match(
        &t,
        Method::PUT,
        &path,
        Some("three"),
        Some(json!({"profile": oauth_profile("google")})),
    )
    .await;
    assert_json_error(s, &body, 400, "invalid_if_match");
    let fresh = format!("W/\"{}\"", version + 1);
    let (s, _, body) = with_if_match(
        &t,
        Method::PUT,
        &path,
        Some(&fresh),
        Some(json!({"profile": wanted})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, _, body) = with_if_match(&t, Method::DELETE, &path, Some("*"), None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    t.finish().await;
}

backend_tests!(
    plans_change_nothing_and_if_match_refuses_stale_writes,
    reference_shaped_static_providers_register,
    concurrent_changes_never_fail_or_get_lost,
    crud_round_trip,
    metadata_groups_by_auth_type,
    duplicate_names_conflict_and_failed_changes_keep_data,
    soft_delete_frees_the_name,
    aliases_resolve_by_normalized_form,
    every_static_auth_type_registers,
);
