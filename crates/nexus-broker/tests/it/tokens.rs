//! The token API and on-demand refresh, against the fake provider: usage
//! secrets only, one refresh for many callers, and the state rules of SPEC §2.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::fake_idp::{FakeIdp, TokenMode};
use crate::handshake::{callback, start};
use crate::harness::{assert_json_error, backend_tests, Backend, TestBroker};

/// A broker (settings adjusted) with an active OAuth connection to the fake
/// provider whose token (`access-1`, refresh token `refresh-1`) expires in
/// `expires_in` s. Shared by the token, refresh and cache tests.
pub(crate) async fn connected(
    b: &Backend,
    expires_in: i64,
    adjust: impl FnOnce(&mut nexus_broker::config::Settings),
) -> (TestBroker, std::sync::Arc<FakeIdp>, String) {
    let idp = FakeIdp::start().await;
    let t = TestBroker::start_public(b, |s| {
        s.provider_timeout_secs = Some("1".into());
        adjust(s);
    })
    .await;
    t.create_provider(idp.profile("fake")).await;
    {
        let mut k = idp.knobs();
        k.expires_in = expires_in;
        k.refresh_token = "refresh-1".into();
        k.access_token = "access-1".into();
    }
    let flow = start(&t, &idp, "fake", json!({})).await;
    let (s, _, body) = callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{body}");
    // As if the token had been issued an hour-long lifetime ago, so the
    // configured margin applies (not the half-life cap for short tokens).
    t.db.exec(&format!(
        "UPDATE connections SET last_success_at = last_success_at - 3600000, next_refresh_at = expires_at - 300000 WHERE id = '{}'",
        flow.connection_id
    ))
    .await;
    (t, idp, flow.connection_id)
}

fn stored_refresh_token(t: &TestBroker, id: &str, env: &str) -> String {
    let aad = nexus_broker::vault::Aad {
        table: "connections",
        row_id: id,
        column: "refresh_token",
    };
    t.state
        .config()
        .keys
        .decrypt_str(aad, env)
        .unwrap()
        .expose()
        .clone()
}

async fn token_response_carries_usage_secrets_only(b: Backend) {
    let (t, _idp, id) = connected(&b, 3600, |_| {}).await;
    let (s, tok) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(s, StatusCode::OK, "{tok}");
    assert_eq!(tok["access_token"], "access-1");
    assert_eq!(tok["token_type"], "Bearer");
    assert_eq!(tok["credentials"], json!({"access_token": "access-1"}));
    assert_eq!(tok["strategy"], json!({"type": "oauth2", "config": {}}));
    assert_eq!(tok["provider"], "fake");
    assert_eq!(tok["status"], "active");
    assert_eq!(tok["degraded"], false);
    assert_eq!(tok["failing_scopes"], json!([]));
    assert_eq!(tok["scope"], "openid email calendar.read");
    assert!(tok["id_token"].as_str().unwrap().split('.').count() == 3);
    assert!(tok["expires_in"].as_i64().unwrap() > 3500);
    assert!(tok["expires_at"].as_str().unwrap().ends_with('Z'));
    let text = tok.to_string();
    for secret in ["refresh-1", "fake-client-secret", "code_verifier"] {
        assert!(!text.contains(secret), "{secret} must never be served");
    }
    // Health views carry no secret either.
    let (_, one) = t.get(&format!("/connections/{id}")).await;
    let (_, list) = t.get("/connections?workspace_id=ws-1").await;
    let (_, status) = t.get("/workspaces/ws-1/connections/status").await;
    for v in [&one, &list, &status] {
        let text = v.to_string();
        assert!(
            !text.contains("access-1") && !text.contains("refresh-1"),
            "{text}"
        );
    }
    assert_eq!(one["status"], "active");
    assert_eq!(one["identity"]["email"], "alice@example.test");
    assert_eq!(list["connections"][0]["id"], id.as_str());
    assert_eq!(status["any_needs_attention"], false);
    assert_eq!(status["connections"][&id]["needs_attention"], false);
    let (s, body) = t.get("/connections").await;
    assert_json_error(s, &body, 400, "missing_fields");
    t.finish().await;
}

async fn static_credentials_serve_only_the_strategy_fields(b: Backend) {
    let t = TestBroker::start_public(&b, |_| {}).await;
    t.create_provider(json!({
        "name": "basic", "auth_type": "basic_auth",
        "params": {
            "credential_schema": {"type": "object", "required": ["user", "pass"], "properties": {
                "user": {"type": "string"}, "pass": {"type": "string"}, "recovery_code": {"type": "string"}}},
            "strategy": {"config": {"username_field": "user", "password_field": "pass"}}
        }
    }))
    .await;
    let (_, spec) = t.post("/auth/consent-spec", json!({"workspace_id": "w", "provider_name": "basic", "return_url": crate::handshake::RETURN_URL})).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/auth/capture-credential", t.base))
        .json(&json!({"state": spec["state"], "credentials": {"user": "u1", "pass": "p1", "recovery_code": "never-serve-me"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let id = spec["connection_id"].as_str().unwrap();
    let (s, tok) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(s, StatusCode::OK, "{tok}");
    assert_eq!(tok["credentials"], json!({"user": "u1", "pass": "p1"}));
    assert_eq!(tok["strategy"]["type"], "basic_auth");
    assert!(tok["expires_at"].is_null());
    assert!(!tok.to_string().contains("never-serve-me"));
    t.finish().await;
}

async fn an_expiring_token_is_refreshed_once_for_many_callers(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |_| {}).await;
    {
        let mut k = idp.knobs();
        k.expires_in = 3600;
        k.access_token = "access-2".into();
        k.refresh_token = "refresh-2".into();
    }
    let before = idp.counters().token_requests;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        tasks.push(t.spawn_call(Method::GET, &format!("/connections/{id}/token")));
    }
    for task in tasks {
        let (s, tok) = task.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{tok}");
        assert_eq!(
            tok["access_token"], "access-2",
            "nobody is served the expiring token"
        );
    }
    {
        let c = idp.counters();
        assert_eq!(
            c.token_requests - before,
            1,
            "exactly one refresh at the provider"
        );
        assert_eq!(c.last_token_form["grant_type"], "refresh_token");
        assert_eq!(c.last_token_form["refresh_token"], "refresh-1");
    }
    let c = t.state.store().get_connection(&id).await.unwrap().unwrap();
    assert_eq!(
        stored_refresh_token(&t, &id, c.refresh_token.as_deref().unwrap()),
        "refresh-2",
        "rotation stored"
    );

    // A response without a refresh token keeps the stored one; a forced refresh always calls.
    idp.knobs().rotate = false;
    idp.knobs().access_token = "access-3".into();
    let (s, tok) = t
        .call(Method::POST, &format!("/connections/{id}/refresh"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{tok}");
    assert_eq!(tok["access_token"], "access-3");
    let c = t.state.store().get_connection(&id).await.unwrap().unwrap();
    assert_eq!(
        stored_refresh_token(&t, &id, c.refresh_token.as_deref().unwrap()),
        "refresh-2"
    );
    t.finish().await;
}

async fn a_dead_grant_needs_a_person(b: Backend) {
    for (mode, code) in [
        (TokenMode::Error("invalid_grant"), "invalid_grant"),
        (
            TokenMode::Raw(200, r#"{"ok":false,"error":"invalid_refresh_token"}"#),
            "invalid_refresh_token",
        ),
        (
            TokenMode::Raw(400, r#"{"error":"bad_refresh_token"}"#),
            "bad_refresh_token",
        ),
    ] {
        let (t, idp, id) = connected(&b, 60, |_| {}).await;
        idp.knobs().token_mode = mode;
        let (s, body) = t.get(&format!("/connections/{id}/token")).await;
        assert_json_error(s, &body, 409, "attention_required");
        let c = t.state.store().get_connection(&id).await.unwrap().unwrap();
        assert_eq!(c.status, "attention_required");
        assert_eq!(c.error_code.as_deref(), Some(code));
        // No second call to the provider: the state answers now.
        let calls = idp.counters().token_requests;
        let (s, body) = t.get(&format!("/connections/{id}/token")).await;
        assert_json_error(s, &body, 409, "attention_required");
        assert_eq!(idp.counters().token_requests, calls);
        let (_, status) = t.get("/workspaces/ws-1/connections/status").await;
        assert_eq!(status["any_needs_attention"], true);
        let (_, audit) = t
            .get(&format!(
                "/audit?event_type=connection.attention_required&connection_id={id}"
            ))
            .await;
        assert_eq!(audit["count"], 1);
        t.finish().await;
    }
}

async fn transient_faults_never_need_a_person(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |_| {}).await;
    for mode in [
        TokenMode::ServerError,
        TokenMode::Html,
        TokenMode::Raw(429, "{}"),
        TokenMode::Slow(Duration::from_secs(3)),
        TokenMode::Error("invalid_client"),
    ] {
        idp.knobs().token_mode = mode.clone();
        let (s, tok) = t.get(&format!("/connections/{id}/token")).await;
        assert_eq!(
            s,
            StatusCode::OK,
            "{mode:?}: the still-valid token is served: {tok}"
        );
        assert_eq!(tok["access_token"], "access-1");
        // Skip the backoff so the next mode is tried at once.
        t.db.exec(&format!(
            "UPDATE connections SET next_refresh_at = 0 WHERE id = '{id}'"
        ))
        .await;
    }
    let c = t.state.store().get_connection(&id).await.unwrap().unwrap();
    assert_eq!(c.status, "active");
    assert_eq!(c.consecutive_failures, 5);
    assert_eq!(c.error_code.as_deref(), Some("invalid_client"));

    // Once the token has expired, a transient fault is a 503, still not attention_required.
    let (t2, idp2, id2) = connected(&b, 0, |_| {}).await;
    idp2.knobs().token_mode = TokenMode::ServerError;
    let (s, body) = t2.get(&format!("/connections/{id2}/token")).await;
    assert_json_error(s, &body, 503, "provider_unavailable");
    assert_eq!(
        t2.state
            .store()
            .get_connection(&id2)
            .await
            .unwrap()
            .unwrap()
            .status,
        "active"
    );
    // Inside the backoff, requests do not call the provider again (no storm).
    let calls = idp2.counters().token_requests;
    let (s, body) = t2.get(&format!("/connections/{id2}/token")).await;
    assert_json_error(s, &body, 503, "provider_unavailable");
    assert_eq!(idp2.counters().token_requests, calls);
    // The provider recovers and the retry comes due: so does the connection.
    idp2.knobs().token_mode = TokenMode::Normal;
    t2.db
        .exec(&format!(
            "UPDATE connections SET next_refresh_at = 0 WHERE id = '{id2}'"
        ))
        .await;
    let (s, tok) = t2.get(&format!("/connections/{id2}/token")).await;
    assert_eq!(s, StatusCode::OK, "{tok}");
    let c = t2
        .state
        .store()
        .get_connection(&id2)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((c.consecutive_failures, c.error_code), (0, None));
    t.finish().await;
    t2.finish().await;
}

async fn connection_states_answer_as_the_spec_says(b: Backend) {
    let idp = FakeIdp::start().await;
    let t = TestBroker::start_public(&b, |_| {}).await;
    t.create_provider(idp.profile("fake")).await;
    let pending = start(&t, &idp, "fake", json!({})).await;
    let (s, body) = t
        .get(&format!("/connections/{}/token", pending.connection_id))
        .await;
    assert_json_error(s, &body, 409, "connection_pending");
    let failed = start(&t, &idp, "fake", json!({})).await;
    callback(&t, &[("error", "access_denied"), ("state", &failed.state)]).await;
    let (s, body) = t
        .get(&format!("/connections/{}/token", failed.connection_id))
        .await;
    assert_json_error(s, &body, 409, "connection_failed");
    let (s, body) = t.get("/connections/nope/token").await;
    assert_json_error(s, &body, 404, "connection_not_found");
    let (s, body) = t.get("/connections/nope").await;
    assert_json_error(s, &body, 404, "connection_not_found");
    t.finish().await;
}

async fn refresh_tokens_never_leave_the_broker(b: Backend) {
    crate::harness::init_logs();
    let first = format!("canary-refresh-{}", uuid::Uuid::new_v4().simple());
    let rotated = format!("canary-rotated-{}", uuid::Uuid::new_v4().simple());
    let idp = FakeIdp::start().await;
    let t = TestBroker::start_public(&b, |s| s.provider_timeout_secs = Some("1".into())).await;
    t.create_provider(idp.profile("fake")).await;
    {
        let mut k = idp.knobs();
        k.refresh_token = first.clone();
        k.expires_in = 0;
    }
    let flow = start(&t, &idp, "fake", json!({})).await;
    callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    let id = flow.connection_id;
    let mut seen = Vec::new();
    // A refresh that rotates, a forced one, a failing one, a dead grant.
    idp.knobs().refresh_token = rotated.clone();
    seen.push(t.get(&format!("/connections/{id}/token")).await.1);
    seen.push(
        t.post(&format!("/connections/{id}/refresh"), json!({}))
            .await
            .1,
    );
    idp.knobs().token_mode = TokenMode::Raw(500, r#"{"error":"server_error"}"#);
    seen.push(
        t.post(&format!("/connections/{id}/refresh"), json!({}))
            .await
            .1,
    );
    t.db.exec(&format!(
        "UPDATE connections SET next_refresh_at = 0, expires_at = 0 WHERE id = '{id}'"
    ))
    .await;
    idp.knobs().token_mode = TokenMode::Error("invalid_grant");
    seen.push(t.get(&format!("/connections/{id}/token")).await.1);
    seen.push(t.get(&format!("/connections/{id}")).await.1);
    seen.push(t.get("/connections?workspace_id=ws-1").await.1);
    seen.push(t.get("/workspaces/ws-1/connections/status").await.1);
    seen.push(
        t.post(
            &format!("/connections/{id}/scope-failures"),
            json!({"status": 401, "scopes": ["calendar.read"]}),
        )
        .await
        .1,
    );
    seen.push(
        t.call(Method::DELETE, &format!("/connections/{id}"), None)
            .await
            .1,
    );
    assert_eq!(
        idp.counters().last_revocation_form["token"],
        rotated.as_str(),
        "the provider got the refresh token to revoke"
    );
    seen.push(t.get("/audit?limit=1000").await.1);
    // Webhook payloads (attention_required, revoked) carry none either.
    let events = t.db.scalar("SELECT COUNT(*) FROM webhook_messages").await;
    assert!(events >= Some(2), "{events:?}");
    let leaked =
        t.db.scalar("SELECT COUNT(*) FROM webhook_messages WHERE payload LIKE '%canary-%'")
            .await;
    assert_eq!(leaked, Some(0));
    let metrics = t
        .client
        .get(format!("{}/metrics", t.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        idp.counters().refresh_requests >= 3,
        "the refresh paths ran"
    );
    let logged = crate::harness::logs();
    for secret in [&first, &rotated] {
        for body in &seen {
            assert!(
                !body.to_string().contains(secret.as_str()),
                "in a response: {body}"
            );
        }
        assert!(!metrics.contains(secret.as_str()), "in metrics");
        assert!(!logged.contains(secret.as_str()), "in logs");
    }
    t.finish().await;
}

async fn issued_tokens_are_audited_with_counts(b: Backend) {
    let (t, _idp, id) = connected(&b, 3600, |_| {}).await;
    for _ in 0..5 {
        let (s, _) = t.get(&format!("/connections/{id}/token")).await;
        assert_eq!(s, StatusCode::OK);
    }
    // A graceful stop writes what was counted.
    let db = t.stop().await;
    let rows = db
        .scalar(&format!(
            "SELECT COUNT(*) FROM audit_events WHERE event_type = 'token.issued' AND connection_id = '{id}'"
        ))
        .await
        .unwrap();
    assert!((1..=2).contains(&rows), "coalesced: {rows} rows");
    let total = db
        .scalar(&format!(
            "SELECT CAST(SUM(CAST(n AS BIGINT)) AS BIGINT) FROM (SELECT {} AS n FROM audit_events WHERE event_type = 'token.issued' AND connection_id = '{id}') x",
            if db.url.starts_with("sqlite:") { "json_extract(detail, '$.count')" } else { "(detail::json->>'count')" }
        ))
        .await;
    assert_eq!(total, Some(5), "every issuance counted");
    db.drop_db().await;
}

backend_tests!(
    issued_tokens_are_audited_with_counts,
    refresh_tokens_never_leave_the_broker,
    token_response_carries_usage_secrets_only,
    static_credentials_serve_only_the_strategy_fields,
    an_expiring_token_is_refreshed_once_for_many_callers,
    a_dead_grant_needs_a_person,
    transient_faults_never_need_a_person,
    connection_states_answer_as_the_spec_says,
);
