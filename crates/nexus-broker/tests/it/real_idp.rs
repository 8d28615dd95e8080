//! The handshake against a real, independent OpenID provider: panva's
//! `oidc-provider` from npm (tests/peers/oidc-provider), on loopback.
//! Skipped with one line when Node or the peer's packages are missing,
//! except under CI, where that is a failure.

use nexus_testkit::{browser, client, consent, q, OidcPeer};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::handshake::RETURN_URL;
use crate::harness::{backend_tests, Backend, TestBroker};

async fn real_provider_consent_refresh_token_identity_and_reconnect(b: Backend) {
    let port = TestBroker::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let redirect = format!("{base}/auth/callback");
    let clients = json!([
        client("nexus", "client_secret_post", &redirect),
        client("nexus-basic", "client_secret_basic", &redirect)
    ]);
    let Some(peer) = OidcPeer::start(clients, &[]).await else {
        return;
    };
    let t = TestBroker::start_public(&b, |s| {
        s.broker_addr = Some(format!("127.0.0.1:{port}"));
        s.base_url = Some(base.clone());
    })
    .await;
    for (name, id, auth) in [
        ("idp", "nexus", "client_secret_post"),
        ("idp-basic", "nexus-basic", "client_secret_basic"),
    ] {
        t.create_provider(json!({
            "name": name, "auth_type": "oauth2", "client_id": id, "client_secret": format!("{id}-secret"),
            "auth_header": auth, "issuer": peer.issuer, "enable_discovery": true,
            "scopes": ["openid", "email", "profile", "calendar.read"]
        }))
        .await;
    }

    for name in ["idp", "idp-basic"] {
        let (s, spec) = t
            .post(
                "/auth/consent-spec",
                json!({"workspace_id": "ws-real", "provider_name": name, "return_url": RETURN_URL}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{spec}");
        let browser = browser();
        let back = consent(&browser, spec["authUrl"].as_str().unwrap(), &base).await;
        assert_eq!(q(&back, "status").as_deref(), Some("success"), "{back}");
        let id = spec["connection_id"].as_str().unwrap();
        assert_eq!(q(&back, "connection_id").as_deref(), Some(id));
        assert_eq!(q(&back, "provider").as_deref(), Some(name));

        let c = t.state.store().get_connection(id).await.unwrap().unwrap();
        assert_eq!(c.status, "active");
        assert!(
            c.refresh_token.is_some(),
            "the provider issued a refresh token and it is stored"
        );
        assert!(c.id_token.is_some());
        let identity: Value = serde_json::from_str(c.identity.as_deref().unwrap()).unwrap();
        assert_eq!(identity["sub"], "alice");
        assert_eq!(identity["email"], "alice@example.test");
        assert_eq!(identity["name"], "Alice");
        assert_eq!(identity["picture"], "https://example.test/alice.png");
        let granted: Vec<String> = serde_json::from_str(&c.granted_scopes).unwrap();
        assert!(
            granted.contains(&"calendar.read".to_string()),
            "{granted:?}"
        );

        // Reconnect: same connection id, new tokens.
        let (s, again) = t
            .post("/auth/consent-spec", json!({"workspace_id": "ws-real", "provider_name": name, "return_url": RETURN_URL, "connection_id": id}))
            .await;
        assert_eq!(s, StatusCode::OK, "{again}");
        let back = consent(&browser, again["authUrl"].as_str().unwrap(), &base).await;
        assert_eq!(q(&back, "status").as_deref(), Some("success"), "{back}");
        assert_eq!(q(&back, "connection_id").as_deref(), Some(id));
        let c2 = t.state.store().get_connection(id).await.unwrap().unwrap();
        assert_eq!(c2.status, "active");
        assert_ne!(c2.access_token, c.access_token);
        assert!(c2.version > c.version);
    }
    let stats = peer.stats().await;
    assert_eq!(stats["token_requests"]["authorization_code"], 4, "{stats}");
    let (_, ready) = t.get("/ready").await;
    assert_eq!(ready["status"], "ready");
    t.finish().await;
}

async fn real_provider_refresh_is_single_flight_and_revocation_needs_a_person(b: Backend) {
    let port = TestBroker::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let clients = json!([client(
        "nexus",
        "client_secret_post",
        &format!("{base}/auth/callback")
    )]);
    // Short-lived access tokens: 10 s; an 8 s margin is capped at half the
    // lifetime, so they are refreshed when fewer than 5 s remain.
    let Some(peer) = OidcPeer::start(clients, &[("ACCESS_TOKEN_TTL", "10")]).await else {
        return;
    };
    let t = TestBroker::start_public(&b, |s| {
        s.broker_addr = Some(format!("127.0.0.1:{port}"));
        s.base_url = Some(base.clone());
        s.refresh_margin_secs = Some("8".into());
    })
    .await;
    t.create_provider(json!({
        "name": "idp", "auth_type": "oauth2", "client_id": "nexus", "client_secret": "nexus-secret",
        "issuer": peer.issuer, "enable_discovery": true, "scopes": ["openid", "email", "calendar.read"]
    }))
    .await;
    let (_, spec) = t
        .post(
            "/auth/consent-spec",
            json!({"workspace_id": "ws", "provider_name": "idp", "return_url": RETURN_URL}),
        )
        .await;
    let back = consent(&browser(), spec["authUrl"].as_str().unwrap(), &base).await;
    assert_eq!(q(&back, "status").as_deref(), Some("success"), "{back}");
    let id = spec["connection_id"].as_str().unwrap().to_string();
    let (_, first) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(
        peer.stats().await["token_requests"]["refresh_token"],
        0,
        "a fresh token is served as is"
    );

    // A second broker on the same database (its own pool, cache, locks and
    // lease owner ids; the refresh lease in the database is all they share).
    let mut settings = t.settings.clone();
    settings.broker_addr = Some("127.0.0.1:0".into());
    let replica = TestBroker::start_on(t.db.share(), settings).await;

    // Once the token is inside the margin, 200 concurrent token requests split
    // across both brokers make exactly one refresh. With rotation and reuse
    // detection at the provider, a second refresh with the same refresh
    // token would kill the grant.
    tokio::time::sleep(std::time::Duration::from_millis(5500)).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let broker = if i % 2 == 0 { &t } else { &replica };
        tasks.push(broker.spawn_call(reqwest::Method::GET, &format!("/connections/{id}/token")));
    }
    let mut tokens = std::collections::HashSet::new();
    for task in tasks {
        let (s, tok) = task.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{tok}");
        tokens.insert(tok["access_token"].as_str().unwrap().to_string());
    }
    assert_eq!(tokens.len(), 1, "everyone got the one refreshed token");
    assert!(
        !tokens.contains(first["access_token"].as_str().unwrap()),
        "nobody got the expiring token"
    );
    assert_eq!(peer.stats().await["token_requests"]["refresh_token"], 1);

    // Concurrent forced refreshes coalesce with any refresh finished after they
    // asked; whatever they did, the grant must survive (no refresh-token reuse).
    let mut tasks = Vec::new();
    for _ in 0..10 {
        tasks.push(t.spawn_call(reqwest::Method::POST, &format!("/connections/{id}/refresh")));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap().0, StatusCode::OK);
    }
    let grants: Value = reqwest::get(format!(
        "{}/__admin/grants?sub=alice&client_id=nexus",
        peer.issuer
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        grants["grants"].as_array().unwrap().len(),
        1,
        "the grant survived: {grants}"
    );
    replica.stop().await;

    // The person revokes access at the provider: the next refresh needs a person.
    assert_eq!(peer.revoke_grant("alice", "nexus").await, 1);
    let (s, body) = t
        .call(
            reqwest::Method::POST,
            &format!("/connections/{id}/refresh"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "attention_required");
    let (s, body) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("attention_required"))
    );
    let (_, health) = t.get(&format!("/connections/{id}")).await;
    assert_eq!(health["status"], "attention_required");
    assert_eq!(health["error_code"], "invalid_grant");
    t.finish().await;
}

async fn real_provider_background_refresh_by_two_replicas_keeps_the_grant(b: Backend) {
    let port = TestBroker::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let clients = json!([client(
        "nexus",
        "client_secret_post",
        &format!("{base}/auth/callback")
    )]);
    // 4 s access tokens, refreshed 2 s before expiry by the background
    // workers of two replicas. The provider rotates refresh tokens and kills
    // the grant on reuse, so one double refresh anywhere would end the test.
    let Some(peer) = OidcPeer::start(clients, &[("ACCESS_TOKEN_TTL", "4")]).await else {
        return;
    };
    let tune = |s: &mut nexus_broker::config::Settings| {
        s.refresh_margin_secs = Some("2".into());
        s.refresh_jitter_secs = Some("0".into());
        s.refresh_worker = Some("true".into());
    };
    let t = TestBroker::start_public(&b, |s| {
        s.broker_addr = Some(format!("127.0.0.1:{port}"));
        s.base_url = Some(base.clone());
        tune(s);
    })
    .await;
    let mut settings = t.settings.clone();
    settings.broker_addr = Some("127.0.0.1:0".into());
    tune(&mut settings);
    let replica = TestBroker::start_on(t.db.share(), settings).await;
    t.create_provider(json!({
        "name": "idp", "auth_type": "oauth2", "client_id": "nexus", "client_secret": "nexus-secret",
        "issuer": peer.issuer, "enable_discovery": true, "scopes": ["openid", "calendar.read"]
    }))
    .await;
    let (_, spec) = t
        .post(
            "/auth/consent-spec",
            json!({"workspace_id": "ws", "provider_name": "idp", "return_url": RETURN_URL}),
        )
        .await;
    let back = consent(&browser(), spec["authUrl"].as_str().unwrap(), &base).await;
    assert_eq!(q(&back, "status").as_deref(), Some("success"), "{back}");
    let id = spec["connection_id"].as_str().unwrap().to_string();

    // Nobody asks for a token; three access-token lifetimes pass (bounded wait).
    let peer_ref = &peer;
    let refreshes = crate::harness::eventually(
        || async move {
            peer_ref.stats().await["token_requests"]["refresh_token"]
                .as_i64()
                .unwrap()
        },
        |n| *n >= 3,
    )
    .await;
    assert!(
        refreshes >= 3,
        "the workers refreshed ahead of expiry: {refreshes}"
    );
    // Whichever replica serves it, the token works at the resource API.
    for broker in [&t, &replica] {
        let (s, tok) = broker.get(&format!("/connections/{id}/token")).await;
        assert_eq!(s, StatusCode::OK, "{tok}");
        let api = reqwest::Client::new()
            .get(format!("{}/api/resource?scope=calendar.read", peer.issuer))
            .bearer_auth(tok["access_token"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(api.status(), StatusCode::OK);
    }
    let (_, health) = t.get(&format!("/connections/{id}")).await;
    assert_eq!(health["status"], "active", "{health}");
    assert_eq!(health["consecutive_failures"], 0, "{health}");
    let grants: Value = reqwest::get(format!(
        "{}/__admin/grants?sub=alice&client_id=nexus",
        peer.issuer
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        grants["grants"].as_array().unwrap().len(),
        1,
        "no refresh token was ever reused: {grants}"
    );

    // The person revokes the grant at the provider: the workers' next
    // refresh (within one 4 s cycle) finds out, with nobody asking for a token.
    assert_eq!(peer.revoke_grant("alice", "nexus").await, 1);
    let path = format!("/connections/{id}");
    let (_, health) = crate::harness::eventually(
        || t.get(&path),
        |(_, h)| h["status"] == "attention_required",
    )
    .await;
    assert_eq!(health["status"], "attention_required", "{health}");
    assert_eq!(health["error_code"], "invalid_grant");
    for broker in [&t, &replica] {
        let (s, body) = broker.get(&format!("/connections/{id}/token")).await;
        assert_eq!(
            (s, body["error"].as_str()),
            (StatusCode::CONFLICT, Some("attention_required")),
            "{body}"
        );
    }
    replica.stop().await;
    t.finish().await;
}

/// Calls the peer's scope-enforcing API with a token; status and WWW-Authenticate.
async fn resource(peer: &OidcPeer, token: &str, scope: &str) -> (StatusCode, Option<String>) {
    let resp = reqwest::Client::new()
        .get(format!("{}/api/resource?scope={scope}", peer.issuer))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let www = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (resp.status(), www)
}

async fn real_provider_partial_scope_withdrawal_reconsent_and_revocation(b: Backend) {
    let port = TestBroker::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let redirect = format!("{base}/auth/callback");
    let Some(peer) = OidcPeer::start(
        json!([client("nexus", "client_secret_post", &redirect)]),
        &[],
    )
    .await
    else {
        return;
    };
    let receiver = crate::webhooks::Receiver::start().await;
    let t = TestBroker::start_public(&b, |s| {
        s.broker_addr = Some(format!("127.0.0.1:{port}"));
        s.base_url = Some(base.clone());
    })
    .await;
    crate::webhooks::subscribe(&t, &receiver, json!(["*"])).await;
    t.create_provider(json!({
        "name": "idp", "auth_type": "oauth2", "client_id": "nexus", "client_secret": "nexus-secret",
        "auth_header": "client_secret_post", "issuer": peer.issuer, "enable_discovery": true,
        "scopes": ["openid", "email", "profile", "calendar.read"]
    }))
    .await;
    let browser = browser();
    let (s, spec) = t
        .post(
            "/auth/consent-spec",
            json!({"workspace_id": "ws-scope", "provider_name": "idp", "return_url": RETURN_URL}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{spec}");
    let back = consent(&browser, spec["authUrl"].as_str().unwrap(), &base).await;
    assert_eq!(q(&back, "status").as_deref(), Some("success"), "{back}");
    let id = spec["connection_id"].as_str().unwrap().to_string();
    let token_path = format!("/connections/{id}/token");
    let (_, tok) = t.get(&token_path).await;
    let at = tok["access_token"].as_str().unwrap().to_string();
    assert_eq!(
        resource(&peer, &at, "calendar.read").await.0,
        StatusCode::OK
    );

    // The person withdraws calendar.read at the provider.
    let removed = peer.remove_scope("alice", "nexus", "calendar.read").await;
    assert_eq!(removed["updated"], 1, "{removed}");
    let (status, www) = resource(&peer, &at, "calendar.read").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // What an agent's bridge reports: the provider's own header.
    let (s, out) = t
        .post(
            &format!("/connections/{id}/scope-failures"),
            json!({"status": 403, "www_authenticate": www.unwrap(), "method": "GET",
                   "host": "127.0.0.1", "path_template": "/api/resource"}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{out}");
    assert_eq!(out["status"], "degraded");
    assert_eq!(
        out["failing_scopes"],
        json!(["calendar.read"]),
        "exactly that scope"
    );
    // Other scopes are still served.
    let (s, tok) = t.get(&token_path).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(tok["degraded"], true);
    assert_eq!(tok["failing_scopes"], json!(["calendar.read"]));
    let at = tok["access_token"].as_str().unwrap().to_string();
    assert_eq!(resource(&peer, &at, "email").await.0, StatusCode::OK);
    let degraded = crate::harness::eventually(
        || std::future::ready(receiver.delivered("connection.degraded")),
        |v| !v.is_empty(),
    )
    .await;
    assert_eq!(degraded.len(), 1, "one connection.degraded webhook");
    assert!(degraded[0].verified);
    assert_eq!(
        degraded[0].body["data"]["failing_scopes"],
        json!(["calendar.read"])
    );
    let hint = &degraded[0].body["data"]["reconsent"]["body"];

    // Re-consent as the webhook's hint says: the scope is granted again.
    let mut again = hint.clone();
    again["return_url"] = json!(RETURN_URL);
    let (s, spec) = t.post("/auth/consent-spec", again).await;
    assert_eq!(s, StatusCode::OK, "{spec}");
    let back = consent(&browser, spec["authUrl"].as_str().unwrap(), &base).await;
    assert_eq!(q(&back, "status").as_deref(), Some("success"), "{back}");
    let (s, tok) = t.get(&token_path).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(tok["status"], "active", "{tok}");
    assert_eq!(tok["degraded"], false);
    let at = tok["access_token"].as_str().unwrap().to_string();
    assert_eq!(
        resource(&peer, &at, "calendar.read").await.0,
        StatusCode::OK
    );
    let recovered = crate::harness::eventually(
        || std::future::ready(receiver.delivered("connection.recovered")),
        |v| !v.is_empty(),
    )
    .await;
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].body["data"]["old_state"], "degraded");

    // Revocation reaches the provider: the grant is gone there.
    let revocations_before = peer.stats().await["revocations"].as_i64().unwrap();
    let (s, out) = t
        .call(reqwest::Method::DELETE, &format!("/connections/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{out}");
    assert_eq!(out["provider_revocation"]["result"], "revoked", "{out}");
    assert_eq!(
        peer.stats().await["revocations"].as_i64().unwrap(),
        revocations_before + 1
    );
    let grants: Value = reqwest::get(format!(
        "{}/__admin/grants?sub=alice&client_id=nexus",
        peer.issuer
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(grants["grants"], json!([]), "{grants}");
    assert_eq!(
        resource(&peer, &at, "email").await.0,
        StatusCode::UNAUTHORIZED
    );
    let (s, e) = t.get(&token_path).await;
    crate::harness::assert_json_error(s, &e, 410, "connection_revoked");
    let revoked = crate::harness::eventually(
        || std::future::ready(receiver.delivered("connection.revoked")),
        |v| !v.is_empty(),
    )
    .await;
    assert_eq!(revoked.len(), 1);
    t.finish().await;
}

backend_tests!(
    real_provider_partial_scope_withdrawal_reconsent_and_revocation,
    real_provider_consent_refresh_token_identity_and_reconnect,
    real_provider_refresh_is_single_flight_and_revocation_needs_a_person,
    real_provider_background_refresh_by_two_replicas_keeps_the_grant,
);
