//! Connect sessions at the broker: made for one workspace with the
//! providers resolved, stored hashed, validated, ended by revocation or
//! expiry; the portal refuses what a session does not cover.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{assert_json_error, backend_tests, Backend, TestBroker};

fn static_profile(name: &str) -> Value {
    json!({"name": name, "auth_type": "header", "params": {"header_name": "X-Key",
        "credential_field": "api_key", "credential_schema": {"type": "object",
        "properties": {"api_key": {"type": "string"}}}}})
}

async fn sessions_are_validated_hashed_and_end(b: Backend) {
    let t = TestBroker::start(&b).await;
    let weather = t.create_provider(static_profile("weather")).await;
    t.create_provider(static_profile("search")).await;

    let (s, made) = t
        .post(
            "/connect-sessions",
            json!({"workspace_id": "ws-1", "providers": ["weather", weather, "search"], "expires_in": 120}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{made}");
    let token = made["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("nxc_") && token.len() > 40, "{made}");
    assert!(made["url"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/connect?session={token}")));
    let stored =
        t.db.scalar(&format!(
            "SELECT COUNT(*) FROM connect_sessions WHERE token_hash = '{}'",
            nexus_broker::registry::agent_keys::hash(&token)
        ))
        .await;
    assert_eq!(stored, Some(1), "only the hash is kept");
    let providers =
        t.db.scalar("SELECT COUNT(*) FROM connect_sessions WHERE providers LIKE '%weather%'")
            .await;
    assert_eq!(providers, Some(0), "providers are kept by id");

    for (body, code) in [
        (json!({"workspace_id": ""}), "invalid_request"),
        (json!({"workspace_id": "w\u{1}"}), "invalid_request"),
        (
            json!({"workspace_id": "w", "expires_in": 10}),
            "invalid_request",
        ),
        (
            json!({"workspace_id": "w", "expires_in": 86_401}),
            "invalid_request",
        ),
        (
            json!({"workspace_id": "w", "colour": "red"}),
            "invalid_request",
        ),
        (json!({"providers": []}), "invalid_request"),
    ] {
        let (s, e) = t.post("/connect-sessions", body.clone()).await;
        assert_json_error(s, &e, 400, code);
    }
    let (s, e) = t
        .post(
            "/connect-sessions",
            json!({"workspace_id": "w", "providers": ["nope"]}),
        )
        .await;
    assert_json_error(s, &e, 404, "provider_not_found");
    let (s, e) = t
        .post(
            "/connect-sessions",
            json!({"workspace_id": "w", "return_url": "https://evil.example/"}),
        )
        .await;
    assert_eq!(s.as_u16(), 400, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("ALLOWED_RETURN_DOMAINS"),
        "{e}"
    );

    // The link works, in a browser or not.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let first = http
        .get(format!("{}/connect?session={token}", t.base))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::SEE_OTHER);
    assert_eq!(first.headers()["location"], "/connect");
    let cookie = first.headers()["set-cookie"].to_str().unwrap().to_string();
    for part in [
        "nexus_connect=nxc_",
        "HttpOnly",
        "SameSite=Lax",
        "Path=/connect",
    ] {
        assert!(cookie.contains(part), "{cookie}");
    }
    let page = |tok: String, accept: &'static str| {
        let (http, base) = (http.clone(), t.base.clone());
        async move {
            http.get(format!("{base}/connect"))
                .header("cookie", format!("nexus_connect={tok}"))
                .header("accept", accept)
                .send()
                .await
                .unwrap()
        }
    };
    let ok = page(token.clone(), "text/html").await;
    assert_eq!(ok.status(), StatusCode::OK);
    let html = ok.text().await.unwrap();
    assert!(html.contains("Connect weather") && html.contains("Connect search"));
    // No cookie, a forged token, another form: refused, in JSON for a program.
    let r = http
        .get(format!("{}/connect", t.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"], "session_missing");
    let r = page("nxc_forged".into(), "application/json").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"], "session_invalid");
    // A person in a browser gets a page that says so.
    let r = page("nxc_forged".into(), "text/html").await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));

    // Revoked: refused at once, and only once revocable.
    let id = made["id"].as_str().unwrap();
    let (s, _) = t
        .call(Method::DELETE, &format!("/connect-sessions/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let r = page(token.clone(), "application/json").await;
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"], "session_revoked");
    let (s, e) = t
        .call(Method::DELETE, &format!("/connect-sessions/{id}"), None)
        .await;
    assert_json_error(s, &e, 404, "session_not_found");

    // Expired: refused.
    let (_, short) = t
        .post(
            "/connect-sessions",
            json!({"workspace_id": "ws-1", "expires_in": 60}),
        )
        .await;
    let short_token = short["token"].as_str().unwrap().to_string();
    t.db.exec(&format!(
        "UPDATE connect_sessions SET expires_at = 1 WHERE id = '{}'",
        short["id"].as_str().unwrap()
    ))
    .await;
    let r = page(short_token, "application/json").await;
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"], "session_expired");

    let (_, audit) = t.get("/audit?event_type=connect_session.created").await;
    assert_eq!(audit["events"].as_array().unwrap().len(), 2, "{audit}");
    assert!(!audit.to_string().contains(&token));
    assert!(!crate::harness::logs().contains(&token));
    t.finish().await;
}

backend_tests!(sessions_are_validated_hashed_and_end);
