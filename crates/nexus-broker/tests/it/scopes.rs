//! Scope failure reports (SPEC §8): degraded connections, de-duplication,
//! 401 → one forced refresh first, success reports, re-consent clearing,
//! rate limits and malformed reports.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::handshake::{callback, start};
use crate::harness::{assert_json_error, backend_tests, eventually, Backend, TestBroker};
use crate::tokens::connected;
use crate::webhooks::{subscribe, Receiver};

async fn report(t: &TestBroker, id: &str, body: Value) -> (StatusCode, Value) {
    t.post(&format!("/connections/{id}/scope-failures"), body)
        .await
}

async fn audit_count(t: &TestBroker, kind: &str, id: &str) -> usize {
    // The audit writer batches; read what has landed.
    let (_, a) = t
        .get(&format!("/audit?event_type={kind}&connection_id={id}"))
        .await;
    a["events"].as_array().map_or(0, Vec::len)
}

async fn a_403_report_degrades_the_connection_and_names_the_scope(b: Backend) {
    let r = Receiver::start().await;
    let (t, _idp, id) = connected(&b, 3600, |_| {}).await;
    subscribe(
        &t,
        &r,
        json!(["connection.degraded", "connection.recovered"]),
    )
    .await;
    let (s, out) = report(
        &t,
        &id,
        json!({
            "status": 403, "method": "get", "host": "api.example.test", "path_template": "/calendars/{id}/events",
            "www_authenticate": "Bearer realm=\"api\", error=\"insufficient_scope\", scope=\"calendar.read\"",
            "provider_error": "insufficient_scope"
        }),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{out}");
    assert_eq!(out["action"], "recorded");
    assert_eq!(out["counted"], true);
    assert_eq!(out["status"], "degraded");
    assert_eq!(out["failing_scopes"], json!(["calendar.read"]));

    // The token is still served, marked degraded.
    let (s, tok) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(s, StatusCode::OK, "{tok}");
    assert_eq!(tok["degraded"], true);
    assert_eq!(tok["status"], "degraded");
    assert_eq!(tok["failing_scopes"], json!(["calendar.read"]));
    assert_eq!(tok["access_token"], "access-1");

    // Repeats inside the window are counted, not audited or announced again.
    for _ in 0..3 {
        let (s, out) = report(&t, &id, json!({"status": 403, "scopes": ["calendar.read"]})).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{out}");
        assert_eq!(out["action"], "duplicate");
    }
    let (_, c) = t.get(&format!("/connections/{id}")).await;
    assert_eq!(c["status"], "degraded");
    let f = &c["scope_failures"][0];
    assert_eq!(f["scope"], "calendar.read");
    assert_eq!(f["reports"], 4);
    assert_eq!(f["last_status"], 403);
    assert_eq!(f["method"], Value::Null, "the last report had no method");
    let (_, st) = t.get("/workspaces/ws-1/connections/status").await;
    assert_eq!(st["any_needs_attention"], true);

    // A second scope joins the set.
    let (_, out) = report(
        &t,
        &id,
        json!({"status": 403, "scopes": ["calendar.write"]}),
    )
    .await;
    assert_eq!(
        out["failing_scopes"],
        json!(["calendar.read", "calendar.write"])
    );

    let degraded = eventually(
        || std::future::ready(r.delivered("connection.degraded")),
        |v| v.len() >= 2,
    )
    .await;
    assert_eq!(degraded.len(), 2, "one per new scope, none for repeats");
    // Deliveries run concurrently: order by what they describe, not arrival.
    let mut degraded = degraded;
    degraded.sort_by_key(|e| {
        e.body["data"]["failing_scopes"]
            .as_array()
            .map_or(0, Vec::len)
    });
    let d = &degraded[0].body["data"];
    assert_eq!(d["old_state"], "active");
    assert_eq!(d["new_state"], "degraded");
    assert_eq!(d["failing_scopes"], json!(["calendar.read"]));
    assert_eq!(d["reconsent"]["path"], "/auth/consent-spec");
    assert_eq!(d["reconsent"]["body"]["connection_id"], id.as_str());
    let scopes = d["reconsent"]["body"]["scopes"].as_array().unwrap();
    assert!(scopes.contains(&json!("calendar.read")));

    // Success for both clears them: active again, recovered once.
    let (_, out) = report(&t, &id, json!({"ok_scopes": ["calendar.read"]})).await;
    assert_eq!(out["action"], "cleared");
    assert_eq!(out["status"], "degraded");
    let (_, out) = report(
        &t,
        &id,
        json!({"ok_scopes": ["calendar.write", "never.failed"]}),
    )
    .await;
    assert_eq!(out["status"], "active");
    assert_eq!(out["failing_scopes"], json!([]));
    let (_, tok) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(tok["degraded"], false);
    let rec = eventually(
        || std::future::ready(r.delivered("connection.recovered")),
        |v| !v.is_empty(),
    )
    .await;
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].body["data"]["old_state"], "degraded");
    assert_eq!(rec[0].body["data"]["new_state"], "active");

    assert_eq!(audit_count(&t, "connection.recovered", &id).await, 1);
    assert_eq!(audit_count(&t, "connection.scope_failure", &id).await, 2);
    t.finish().await;
}

async fn a_401_forces_one_refresh_before_it_counts(b: Backend) {
    let (t, idp, id) = connected(&b, 3600, |_| {}).await;
    let before = idp.counters().refresh_requests;
    let body = json!({"status": 401, "scopes": ["calendar.read"]});
    let (s, out) = report(&t, &id, body.clone()).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{out}");
    assert_eq!(out["action"], "refreshed");
    assert_eq!(out["counted"], false);
    assert_eq!(out["status"], "active");
    assert_eq!(idp.counters().refresh_requests, before + 1);
    // The new token fails too (observed after the refresh): now it counts.
    let (s, out) = report(&t, &id, body.clone()).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{out}");
    assert_eq!(out["action"], "recorded");
    assert_eq!(out["status"], "degraded");
    assert_eq!(
        idp.counters().refresh_requests,
        before + 1,
        "one refresh only"
    );
    // A 401 seen before the latest refresh is stale: the agent should retry.
    let (_, _) = t
        .call(Method::POST, &format!("/connections/{id}/refresh"), None)
        .await;
    let old = time::OffsetDateTime::now_utc() - time::Duration::seconds(30);
    let (s, out) = report(
        &t,
        &id,
        json!({"status": 401, "scopes": ["calendar.write"], "observed_at": old.format(&time::format_description::well_known::Rfc3339).unwrap()}),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{out}");
    assert_eq!(out["action"], "stale");
    assert_eq!(out["failing_scopes"], json!(["calendar.read"]));
    t.finish().await;
}

async fn reconsent_that_grants_the_scope_recovers(b: Backend) {
    let r = Receiver::start().await;
    let (t, idp, id) = connected(&b, 3600, |_| {}).await;
    subscribe(
        &t,
        &r,
        json!(["connection.recovered", "connection.degraded"]),
    )
    .await;
    let (_, out) = report(
        &t,
        &id,
        json!({"status": 403, "scopes": ["calendar.read", "drive.read"]}),
    )
    .await;
    assert_eq!(out["status"], "degraded");
    // Re-consent granting calendar.read only: still degraded, drive.read left.
    idp.knobs().granted_scope = Some("openid email calendar.read".into());
    let flow = start(&t, &idp, "fake", json!({"connection_id": id})).await;
    let (s, _, _) = callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (_, c) = t.get(&format!("/connections/{id}")).await;
    assert_eq!(c["status"], "degraded", "{c}");
    assert_eq!(c["failing_scopes"], json!(["drive.read"]));
    assert_eq!(c["scope_failures"].as_array().unwrap().len(), 1);
    // Re-consent granting both: active, recovered.
    idp.knobs().granted_scope = Some("openid email calendar.read drive.read".into());
    let flow = start(&t, &idp, "fake", json!({"connection_id": id})).await;
    let (s, _, _) = callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let (_, c) = t.get(&format!("/connections/{id}")).await;
    assert_eq!(c["status"], "active", "{c}");
    assert_eq!(c["failing_scopes"], json!([]));
    assert_eq!(c["scope_failures"], json!([]));
    let (_, tok) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(tok["degraded"], false);
    let rec = eventually(
        || std::future::ready(r.delivered("connection.recovered")),
        |v| !v.is_empty(),
    )
    .await;
    assert_eq!(rec.len(), 1, "{:?}", r.all());
    assert_eq!(rec[0].body["data"]["old_state"], "degraded");
    assert_eq!(rec[0].body["data"]["new_state"], "active");
    assert_eq!(audit_count(&t, "connection.degraded", &id).await, 1);
    t.finish().await;
}

async fn bad_reports_are_400_and_change_nothing(b: Backend) {
    let (t, _idp, id) = connected(&b, 3600, |_| {}).await;
    let path = format!("/connections/{id}/scope-failures");
    for (body, code) in [
        (json!({}), "missing_scopes"),
        (json!({"status": 403}), "missing_scopes"),
        (
            json!({"status": 403, "www_authenticate": "Bearer error=\"invalid_token\""}),
            "missing_scopes",
        ),
        (json!({"status": 500, "scopes": ["a"]}), "invalid_status"),
        (json!({"scopes": ["a"]}), "invalid_status"),
        (json!({"status": 403, "scopes": ["a b"]}), "invalid_scopes"),
        (json!({"status": 403, "scopes": [""]}), "invalid_scopes"),
        (
            json!({"status": 403, "scopes": ["x".repeat(300)]}),
            "invalid_scopes",
        ),
        (
            json!({"status": 403, "scopes": (0..60).map(|i| format!("s{i}")).collect::<Vec<_>>()}),
            "invalid_scopes",
        ),
        (json!({"status": "403", "scopes": ["a"]}), "invalid_request"),
        (json!({"status": 403, "scopes": "a"}), "invalid_request"),
        (
            json!({"status": 403, "scopes": ["a"], "extra": 1}),
            "invalid_request",
        ),
        (
            json!({"status": 403, "scopes": ["a"], "method": "GET /x"}),
            "invalid_request",
        ),
        (
            json!({"status": 403, "scopes": ["a"], "path_template": "no-slash"}),
            "invalid_request",
        ),
        (
            json!({"status": 403, "scopes": ["a"], "observed_at": "2001-01-01T00:00:00Z"}),
            "invalid_request",
        ),
        (
            json!({"status": 403, "scopes": ["a"], "observed_at": "tomorrow"}),
            "invalid_request",
        ),
        (json!([1, 2]), "invalid_request"),
    ] {
        let (s, e) = t.post(&path, body.clone()).await;
        assert_json_error(s, &e, 400, code);
    }
    let resp = t
        .client
        .post(format!("{}{path}", t.base))
        .header("x-api-key", &t.api_key)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (_, c) = t.get(&format!("/connections/{id}")).await;
    assert_eq!(c["status"], "active");
    assert_eq!(c["scope_failures"], json!([]));

    let (s, e) = report(&t, "nope", json!({"status": 403, "scopes": ["a"]})).await;
    assert_json_error(s, &e, 404, "connection_not_found");
    let (s, _) = t
        .call(Method::DELETE, &format!("/connections/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, e) = report(&t, &id, json!({"status": 403, "scopes": ["a"]})).await;
    assert_json_error(s, &e, 410, "connection_revoked");
    t.finish().await;
}

async fn reports_are_rate_limited_per_connection(b: Backend) {
    let db = crate::harness::TestDb::new(&b).await;
    let idp = crate::fake_idp::FakeIdp::start().await;
    let mut settings = crate::harness::test_settings(&db);
    let port = TestBroker::free_port();
    settings.broker_addr = Some(format!("127.0.0.1:{port}"));
    settings.base_url = Some(format!("http://127.0.0.1:{port}"));
    let t = TestBroker::start_with(db, settings, |c| {
        c.scope.burst = 4;
        c.scope.per_minute = 1;
        c.scope.max_failing = 2;
    })
    .await;
    t.create_provider(idp.profile("fake")).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let flow = start(&t, &idp, "fake", json!({})).await;
        let (s, _, _) = callback(
            &t,
            &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
        )
        .await;
        assert_eq!(s, StatusCode::SEE_OTHER);
        ids.push(flow.connection_id);
    }
    let body = json!({"status": 403, "scopes": ["calendar.read"]});
    let (s, out) = report(&t, &ids[0], body.clone()).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{out}");
    let (s, out) = report(&t, &ids[0], json!({"status": 403, "scopes": ["b"]})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{out}");
    // At most max_failing scopes are recorded; a report beyond is refused.
    let (s, e) = report(&t, &ids[0], json!({"status": 403, "scopes": ["c"]})).await;
    assert_json_error(s, &e, 409, "conflict");
    let (_, c) = t.get(&format!("/connections/{}", ids[0])).await;
    assert_eq!(c["failing_scopes"], json!(["calendar.read", "b"]));
    let (s, out) = report(&t, &ids[0], body.clone()).await;
    assert_eq!(s, StatusCode::ACCEPTED, "repeats are fine: {out}");
    let resp = t
        .client
        .post(format!("{}/connections/{}/scope-failures", t.base, ids[0]))
        .header("x-api-key", &t.api_key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"], "rate_limited");
    // Another connection has its own budget.
    let (s, _) = report(&t, &ids[1], body).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    t.finish().await;
}

backend_tests!(
    a_403_report_degrades_the_connection_and_names_the_scope,
    a_401_forces_one_refresh_before_it_counts,
    reconsent_that_grants_the_scope_recovers,
    bad_reports_are_400_and_change_nothing,
    reports_are_rate_limited_per_connection,
);
