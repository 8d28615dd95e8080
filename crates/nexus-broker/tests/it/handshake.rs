//! Handshake engine against the programmable fake provider: the full flow,
//! and every fault the issue lists. Each failure must end in a clear error
//! and leave no token stored.

use std::sync::Arc;
use std::time::Duration;

use nexus_broker::config::BrokerConfig;
use nexus_broker::oauth::state_token;
use nexus_broker::store::{ConnectionRow, Store};
use nexus_broker::vault::Aad;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use url::Url;

use crate::fake_idp::{FakeIdp, IdTokenMode, TokenMode};
use crate::harness::{assert_json_error, backend_tests, logs, Backend, TestBroker};

pub const RETURN_URL: &str = "http://localhost:3000/connected";

pub struct Flow {
    pub connection_id: String,
    pub state: String,
    pub auth_url: Url,
}

impl Flow {
    pub fn param(&self, k: &str) -> Option<String> {
        self.auth_url
            .query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.into_owned())
    }
}

/// Starts a handshake and tells the fake which nonce and challenge to expect.
pub async fn start(t: &TestBroker, idp: &FakeIdp, provider: &str, extra: Value) -> Flow {
    let mut body =
        json!({"workspace_id": "ws-1", "provider_name": provider, "return_url": RETURN_URL});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (s, spec) = t.post("/auth/consent-spec", body).await;
    assert_eq!(s, StatusCode::OK, "{spec}");
    let flow = Flow {
        connection_id: spec["connection_id"].as_str().unwrap().into(),
        state: spec["state"].as_str().unwrap().into(),
        auth_url: Url::parse(spec["authUrl"].as_str().unwrap()).unwrap(),
    };
    let mut k = idp.knobs();
    k.nonce = flow.param("nonce").unwrap_or_default();
    k.challenge = flow.param("code_challenge").unwrap_or_default();
    flow
}

pub fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Calls the broker's callback like a browser; returns status, Location and body.
pub async fn callback(t: &TestBroker, pairs: &[(&str, &str)]) -> (StatusCode, Option<Url>, String) {
    let mut url = Url::parse(&format!("{}/auth/callback", t.base)).unwrap();
    url.query_pairs_mut().extend_pairs(pairs);
    let resp = browser().get(url).send().await.unwrap();
    let status = resp.status();
    let location = resp
        .headers()
        .get("location")
        .map(|l| Url::parse(l.to_str().unwrap()).unwrap());
    (status, location, resp.text().await.unwrap())
}

fn q(url: &Url, k: &str) -> Option<String> {
    url.query_pairs()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.into_owned())
}

async fn connection(t: &TestBroker, id: &str) -> ConnectionRow {
    t.state
        .store()
        .get_connection(id)
        .await
        .unwrap()
        .expect("connection exists")
}

fn open(t: &TestBroker, c: &ConnectionRow, column: &str, env: &str) -> String {
    let aad = Aad {
        table: "connections",
        row_id: &c.id,
        column,
    };
    t.state
        .config()
        .keys
        .decrypt_str(aad, env)
        .unwrap()
        .expose()
        .clone()
}

/// Asserts a failed handshake: redirect with status=error and the code, nothing stored.
async fn assert_failed(
    t: &TestBroker,
    flow: &Flow,
    resp: (StatusCode, Option<Url>, String),
    code: &str,
) {
    let (status, location, body) = resp;
    assert_eq!(status, StatusCode::SEE_OTHER, "{body}");
    let loc = location.expect("redirect");
    assert!(loc.as_str().starts_with(RETURN_URL), "{loc}");
    assert_eq!(q(&loc, "status").as_deref(), Some("error"), "{loc}");
    assert_eq!(q(&loc, "error").as_deref(), Some(code), "{loc}");
    assert_eq!(
        q(&loc, "connection_id").as_deref(),
        Some(flow.connection_id.as_str())
    );
    let c = connection(t, &flow.connection_id).await;
    assert_eq!(c.status, "failed");
    assert_eq!(c.error_code.as_deref(), Some(code));
    assert!(
        c.access_token.is_none() && c.refresh_token.is_none() && c.id_token.is_none(),
        "nothing half-stored"
    );
}

async fn setup(b: &Backend) -> (TestBroker, Arc<FakeIdp>) {
    let idp = FakeIdp::start().await;
    let t = TestBroker::start_public(b, |s| s.provider_timeout_secs = Some("1".into())).await;
    t.create_provider(idp.profile("fake")).await;
    (t, idp)
}

async fn full_flow_with_pkce_stores_sealed_tokens(b: Backend) {
    let (t, idp) = setup(&b).await;
    let flow = start(&t, &idp, "fake", json!({})).await;
    let a = &flow.auth_url;
    assert!(
        a.as_str().starts_with(&format!("{}/authorize?", idp.base)),
        "{a}"
    );
    assert_eq!(flow.param("response_type").as_deref(), Some("code"));
    assert_eq!(flow.param("client_id").as_deref(), Some("fake-client"));
    assert_eq!(
        flow.param("redirect_uri"),
        Some(format!("{}/auth/callback", t.base))
    );
    assert_eq!(
        flow.param("scope").as_deref(),
        Some("openid email calendar.read")
    );
    assert_eq!(flow.param("code_challenge_method").as_deref(), Some("S256"));
    assert_eq!(flow.param("code_challenge").unwrap().len(), 43);
    assert!(flow.param("nonce").unwrap().len() >= 32);
    assert_eq!(flow.param("access_type").as_deref(), Some("offline"));
    assert_eq!(flow.param("state").as_deref(), Some(flow.state.as_str()));
    assert_eq!(connection(&t, &flow.connection_id).await.status, "pending");

    let (s, loc, body) = callback(
        &t,
        &[
            ("code", "code-1"),
            ("state", &flow.state),
            ("iss", &idp.base),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{body}");
    let loc = loc.unwrap();
    assert_eq!(
        loc.as_str(),
        format!(
            "{RETURN_URL}?status=success&connection_id={}&provider=fake",
            flow.connection_id
        )
    );
    {
        let c = idp.counters();
        assert_eq!(c.token_requests, 1);
        let f = &c.last_token_form;
        assert_eq!(f["grant_type"], "authorization_code");
        assert_eq!(f["code"], "code-1");
        assert_eq!(
            f["redirect_uri"].as_str(),
            flow.param("redirect_uri").as_deref(),
            "same redirect_uri at both steps"
        );
        assert_eq!(f["client_id"], "fake-client");
        assert_eq!(f["client_secret"], "fake-client-secret");
        assert!(c.last_token_auth.is_none());
        assert_eq!(c.userinfo_requests, 1);
    }
    let c = connection(&t, &flow.connection_id).await;
    assert_eq!(c.status, "active");
    assert_eq!(c.workspace_id, "ws-1");
    assert_eq!(
        open(&t, &c, "access_token", c.access_token.as_deref().unwrap()),
        "fake-access-token"
    );
    assert_eq!(
        open(&t, &c, "refresh_token", c.refresh_token.as_deref().unwrap()),
        "fake-refresh-token"
    );
    assert!(c.id_token.is_some());
    assert!(c.expires_at.unwrap() > nexus_broker::store::now_ms());
    let identity: Value = serde_json::from_str(c.identity.as_deref().unwrap()).unwrap();
    assert_eq!(
        identity,
        json!({"sub": "alice", "email": "alice@example.test", "name": "Alice A.", "picture": "https://example.test/alice.png"})
    );
    assert_eq!(
        serde_json::from_str::<Value>(&c.granted_scopes).unwrap(),
        json!(["openid", "email", "calendar.read"])
    );
    let (_, audit) = t
        .get(&format!(
            "/audit?connection_id={}&order=asc",
            flow.connection_id
        ))
        .await;
    let types: Vec<&str> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["handshake.started", "connection.active"]);
    t.finish().await;
}

async fn client_secret_basic_is_honoured(b: Backend) {
    let idp = FakeIdp::start().await;
    let t = TestBroker::start_public(&b, |_| {}).await;
    let mut p = idp.profile("basic");
    p["auth_header"] = json!("client_secret_basic");
    p["client_secret"] = json!("s3cr:et/+");
    t.create_provider(p).await;
    let flow = start(&t, &idp, "basic", json!({})).await;
    let (s, _, body) = callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{body}");
    let (auth, form) = {
        let c = idp.counters();
        (
            c.last_token_auth.clone().unwrap(),
            c.last_token_form.clone(),
        )
    };
    let decoded = String::from_utf8(
        base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            auth.strip_prefix("Basic ").unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        decoded, "fake-client:s3cr%3Aet%2F%2B",
        "RFC 6749 §2.3.1 form-encoding"
    );
    assert!(form.get("client_secret").is_none());
    t.finish().await;
}

async fn replayed_and_racing_callbacks_exchange_once(b: Backend) {
    let (t, idp) = setup(&b).await;
    let flow = start(&t, &idp, "fake", json!({})).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (base, state, iss) = (t.base.clone(), flow.state.clone(), idp.base.clone());
        tasks.push(tokio::spawn(async move {
            let mut url = Url::parse(&format!("{base}/auth/callback")).unwrap();
            url.query_pairs_mut()
                .append_pair("code", "c")
                .append_pair("state", &state)
                .append_pair("iss", &iss);
            browser().get(url).send().await.unwrap().status()
        }));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::SEE_OTHER)
            .count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::BAD_REQUEST)
            .count(),
        9,
        "{statuses:?}"
    );
    assert_eq!(
        idp.counters().token_requests,
        1,
        "exactly one code exchange"
    );
    let (s, _, body) = callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_json_error(s, &body, 400, "invalid_state");
    assert!(body["message"].as_str().unwrap().contains("already used"));
    assert_eq!(idp.counters().token_requests, 1);
    assert_eq!(connection(&t, &flow.connection_id).await.status, "active");
    t.finish().await;
}

async fn forged_expired_and_unknown_states_are_refused(b: Backend) {
    let (t, idp) = setup(&b).await;
    let flow = start(&t, &idp, "fake", json!({})).await;
    let key = BrokerConfig::from_settings(&t.settings).unwrap().state_key;
    let (id, rest) = flow.state.split_once('.').unwrap();
    let tampered = format!("{}x.{rest}", id);
    let past = state_token::sign(key.expose(), id, 1_000);
    let unknown = state_token::sign(key.expose(), "0000000000000000", 4_000_000_000);
    let foreign_key = state_token::sign(b"some-other-state-key-some-other-", id, 4_000_000_000);
    for (state, needle) in [
        (tampered.as_str(), "signature"),
        (past.as_str(), "expired"),
        (unknown.as_str(), "known handshake"),
        (foreign_key.as_str(), "signature"),
        ("garbage", "malformed"),
    ] {
        let (s, loc, body) = callback(&t, &[("code", "c"), ("state", state)]).await;
        assert!(loc.is_none(), "an untrusted state never redirects");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_json_error(s, &body, 400, "invalid_state");
        assert!(
            body["message"].as_str().unwrap().contains(needle),
            "{state}: {body}"
        );
    }
    let (s, _, body) = callback(&t, &[("code", "c")]).await;
    assert_json_error(
        s,
        &serde_json::from_str(&body).unwrap(),
        400,
        "invalid_state",
    );
    assert_eq!(idp.counters().token_requests, 0);
    // The real handshake is still usable afterwards.
    let (s, _, _) = callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    t.finish().await;
}

async fn iss_is_checked_per_rfc9207(b: Backend) {
    let (t, idp) = setup(&b).await;
    let flow = start(&t, &idp, "fake", json!({})).await;
    let resp = callback(
        &t,
        &[
            ("code", "c"),
            ("state", &flow.state),
            ("iss", "https://evil.example"),
        ],
    )
    .await;
    assert_failed(&t, &flow, resp, "iss_mismatch").await;
    let flow = start(&t, &idp, "fake", json!({})).await;
    let resp = callback(&t, &[("code", "c"), ("state", &flow.state)]).await;
    assert_failed(&t, &flow, resp, "iss_missing").await;
    assert_eq!(
        idp.counters().token_requests,
        0,
        "no exchange after an iss failure"
    );

    // A provider that does not advertise iss may omit it.
    let quiet = FakeIdp::start().await;
    quiet.knobs().iss_parameter_supported = false;
    t.create_provider(quiet.profile("quiet")).await;
    let flow = start(&t, &quiet, "quiet", json!({})).await;
    let (s, loc, _) = callback(&t, &[("code", "c"), ("state", &flow.state)]).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(q(&loc.unwrap(), "status").as_deref(), Some("success"));
    t.finish().await;
}

async fn bad_id_tokens_are_refused(b: Backend) {
    let (t, idp) = setup(&b).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let cases: Vec<(IdTokenMode, Value)> = vec![
        (IdTokenMode::AlgNone, json!({})),
        (IdTokenMode::Hs256, json!({})),
        (IdTokenMode::Good, json!({"aud": "someone-else"})),
        (IdTokenMode::Good, json!({"iss": "https://evil.example"})),
        (IdTokenMode::Good, json!({"exp": now - 3600})),
        (IdTokenMode::Good, json!({"iat": now + 3600})),
        (IdTokenMode::Good, json!({"nonce": "not-the-nonce"})),
        (IdTokenMode::Good, json!({"nonce": null})),
        (IdTokenMode::Good, json!({"aud": ["fake-client", "other"]})),
        (
            IdTokenMode::Good,
            json!({"aud": ["fake-client", "other"], "azp": "other"}),
        ),
        (IdTokenMode::Absent, json!({})),
    ];
    for (mode, overrides) in cases {
        let flow = start(&t, &idp, "fake", json!({})).await;
        {
            let mut k = idp.knobs();
            k.id_token_mode = mode.clone();
            k.claim_overrides = overrides.as_object().unwrap().clone();
        }
        let resp = callback(
            &t,
            &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
        )
        .await;
        assert_failed(&t, &flow, resp, "invalid_id_token").await;
    }
    // Several audiences with azp naming us is fine.
    let flow = start(&t, &idp, "fake", json!({})).await;
    {
        let mut k = idp.knobs();
        k.id_token_mode = IdTokenMode::Good;
        k.claim_overrides = json!({"aud": ["fake-client", "other"], "azp": "fake-client"})
            .as_object()
            .unwrap()
            .clone();
    }
    let (s, loc, _) = callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(q(&loc.unwrap(), "status").as_deref(), Some("success"));

    // An unknown kid forces exactly one JWKS refetch, then fails.
    let before = idp.counters().jwks_requests;
    let flow = start(&t, &idp, "fake", json!({})).await;
    {
        let mut k = idp.knobs();
        k.id_token_mode = IdTokenMode::UnknownKid;
        k.claim_overrides.clear();
    }
    let resp = callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_failed(&t, &flow, resp, "invalid_id_token").await;
    assert_eq!(idp.counters().jwks_requests, before + 1);
    // A second unknown kid within the interval does not refetch again.
    let flow = start(&t, &idp, "fake", json!({})).await;
    let resp = callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_failed(&t, &flow, resp, "invalid_id_token").await;
    assert_eq!(
        idp.counters().jwks_requests,
        before + 1,
        "refetch is rate-limited"
    );
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
        metrics.contains("nexus_id_token_verification_failures_total{reason=\"unknown_kid\"}"),
        "{metrics}"
    );
    t.finish().await;
}

async fn token_endpoint_faults_fail_cleanly(b: Backend) {
    let (t, idp) = setup(&b).await;
    for mode in [
        TokenMode::Html,
        TokenMode::ServerError,
        TokenMode::Huge,
        TokenMode::NoAccessToken,
        TokenMode::Error("invalid_grant"),
        TokenMode::Slow(Duration::from_secs(3)),
    ] {
        let flow = start(&t, &idp, "fake", json!({})).await;
        idp.knobs().token_mode = mode.clone();
        let resp = callback(
            &t,
            &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
        )
        .await;
        assert_failed(&t, &flow, resp, "token_exchange_failed").await;
        let c = connection(&t, &flow.connection_id).await;
        let desc = c.error_description.unwrap_or_default();
        assert!(
            !desc.contains("<html>"),
            "{mode:?}: bodies are never echoed: {desc}"
        );
    }
    // A wrong PKCE verifier is refused by the provider.
    idp.knobs().token_mode = TokenMode::Normal;
    let flow = start(&t, &idp, "fake", json!({})).await;
    idp.knobs().challenge = "not-the-challenge".into();
    let resp = callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_failed(&t, &flow, resp, "token_exchange_failed").await;
    t.finish().await;
}

async fn discovery_issuer_mismatch_is_refused(b: Backend) {
    let idp = FakeIdp::start().await;
    idp.knobs().discovery_issuer = Some("https://evil.example".into());
    let t = TestBroker::start_public(&b, |_| {}).await;
    t.create_provider(idp.profile("liar")).await;
    let (s, body) = t
        .post(
            "/auth/consent-spec",
            json!({"workspace_id": "w", "provider_name": "liar", "return_url": RETURN_URL}),
        )
        .await;
    assert_json_error(s, &body, 502, "provider_discovery_failed");
    assert!(
        body["message"].as_str().unwrap().contains("evil.example"),
        "{body}"
    );
    t.finish().await;
}

async fn consent_spec_input_rules(b: Backend) {
    let (t, idp) = setup(&b).await;
    let base = json!({"workspace_id": "w", "provider_name": "fake", "return_url": RETURN_URL});
    let with = |k: &str, v: Value| {
        let mut x = base.clone();
        if v.is_null() {
            x.as_object_mut().unwrap().remove(k);
        } else {
            x[k] = v;
        }
        x
    };
    let cases = [
        (
            with("return_url", json!("https://evil.example/steal")),
            400,
            "return_url_not_allowed",
        ),
        (
            with("return_url", json!("http://localhost.evil.example/")),
            400,
            "return_url_not_allowed",
        ),
        (
            with("return_url", json!("javascript:alert(1)")),
            400,
            "invalid_request",
        ),
        (
            with("return_url", json!("/relative")),
            400,
            "invalid_request",
        ),
        (with("return_url", Value::Null), 400, "missing_fields"),
        (with("workspace_id", Value::Null), 400, "missing_fields"),
        (with("provider_name", Value::Null), 400, "missing_fields"),
        (
            with("provider_name", json!("nope")),
            404,
            "provider_not_found",
        ),
        (with("scopes", json!(["a b"])), 400, "invalid_request"),
        (
            with(
                "connection_id",
                json!("00000000-0000-0000-0000-000000000000"),
            ),
            404,
            "connection_not_found",
        ),
        (with("scopes", json!("openid")), 400, "invalid_request"),
        (with("surprise", json!(1)), 400, "invalid_request"),
    ];
    for (body, status, code) in cases {
        let (s, resp) = t.post("/auth/consent-spec", body.clone()).await;
        assert_json_error(s, &resp, status, code);
    }
    // `user_id` (the gateway's name) works like workspace_id; provider by id works too.
    let (_, p) = t.get("/providers/by-name/fake").await;
    let (s, spec) = t
        .post("/auth/consent-spec", json!({"user_id": "w", "provider_id": p["id"], "return_url": RETURN_URL, "scopes": ["openid"]}))
        .await;
    assert_eq!(s, StatusCode::OK, "{spec}");
    assert_eq!(spec["scopes"], json!(["openid"]));
    // Static providers get the broker's own capture form.
    t.create_provider(crate::providers::api_key_profile("weather"))
        .await;
    let (s, resp) = t
        .post(
            "/auth/consent-spec",
            with("provider_name", json!("weather")),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{resp}");
    let capture = format!("{}/auth/capture?state=", t.base);
    assert!(
        resp["authUrl"].as_str().unwrap().starts_with(&capture),
        "{resp}"
    );
    // No key, no handshake.
    let resp = reqwest::Client::new()
        .post(format!("{}/auth/consent-spec", t.base))
        .json(&base)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    drop(idp);
    t.finish().await;
}

async fn denied_consent_marks_the_connection_failed(b: Backend) {
    let (t, idp) = setup(&b).await;
    let flow = start(&t, &idp, "fake", json!({})).await;
    let resp = callback(
        &t,
        &[
            ("error", "access_denied"),
            ("error_description", "The user said no"),
            ("state", &flow.state),
        ],
    )
    .await;
    assert_failed(&t, &flow, resp, "access_denied").await;
    assert_eq!(idp.counters().token_requests, 0);
    let (_, audit) = t.get("/audit?event_type=connection.handshake_failed").await;
    assert_eq!(
        audit["events"][0]["connection_id"],
        flow.connection_id.as_str()
    );
    assert_eq!(audit["events"][0]["detail"]["error"], "access_denied");

    // Whoever holds a consent URL writes this text: a line break or an
    // escape sequence must not reach the log, the row or the API raw.
    let flow = start(&t, &idp, "fake", json!({})).await;
    let forged = "no\n2026-01-01T00:00:00Z  INFO nexus: forged-line \u{1b}[31mred\u{202E}";
    let resp = callback(
        &t,
        &[
            ("error", "access_denied"),
            ("error_description", forged),
            ("state", &flow.state),
        ],
    )
    .await;
    assert_failed(&t, &flow, resp, "access_denied").await;
    let (_, c) = t.get(&format!("/connections/{}", flow.connection_id)).await;
    let stored = c["error_description"].as_str().unwrap();
    assert!(!stored.chars().any(char::is_control), "{stored:?}");
    assert!(!stored.contains('\u{202E}'), "{stored:?}");
    assert!(
        stored.contains("\\u{a}2026-01-01"),
        "escaped, still readable: {stored:?}"
    );
    let log = crate::harness::logs();
    assert!(
        log.contains("forged-line"),
        "the description is logged, escaped"
    );
    assert!(!log.contains("\n2026-01-01T00:00:00Z  INFO nexus: forged-line"));
    assert!(!log.contains('\u{1b}'));
    t.finish().await;
}

async fn reconnect_keeps_the_id_and_the_old_state_until_success(b: Backend) {
    let (t, idp) = setup(&b).await;
    let flow = start(&t, &idp, "fake", json!({})).await;
    callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    let first = connection(&t, &flow.connection_id).await;
    assert_eq!(first.status, "active");

    // A reconnect that is denied leaves the connection as it was.
    let again = start(
        &t,
        &idp,
        "fake",
        json!({"connection_id": flow.connection_id}),
    )
    .await;
    assert_eq!(again.connection_id, flow.connection_id);
    let (s, loc, _) = callback(&t, &[("error", "access_denied"), ("state", &again.state)]).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(q(&loc.unwrap(), "error").as_deref(), Some("access_denied"));
    let after_denial = connection(&t, &flow.connection_id).await;
    assert_eq!(after_denial.status, "active");
    assert_eq!(
        after_denial.access_token, first.access_token,
        "old credentials kept"
    );
    assert_eq!(after_denial.error_code.as_deref(), Some("access_denied"));

    // A successful reconnect updates the same connection.
    idp.knobs().access_token = "second-access-token".into();
    let third = start(
        &t,
        &idp,
        "fake",
        json!({"connection_id": flow.connection_id}),
    )
    .await;
    let (s, loc, _) = callback(
        &t,
        &[("code", "c2"), ("state", &third.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(
        q(&loc.unwrap(), "connection_id").as_deref(),
        Some(flow.connection_id.as_str())
    );
    let c = connection(&t, &flow.connection_id).await;
    assert_eq!(
        open(&t, &c, "access_token", c.access_token.as_deref().unwrap()),
        "second-access-token"
    );
    assert!(c.error_code.is_none());
    assert!(c.version > first.version);

    // Another workspace cannot reconnect it: same answer as an unknown connection.
    let (s, body) = t
        .post("/auth/consent-spec", json!({"workspace_id": "ws-other", "provider_name": "fake", "return_url": RETURN_URL, "connection_id": flow.connection_id}))
        .await;
    assert_json_error(s, &body, 404, "connection_not_found");
    t.finish().await;
}

async fn userinfo_with_another_subject_is_refused(b: Backend) {
    let (t, idp) = setup(&b).await;
    idp.knobs().userinfo_sub = Some("mallory".into());
    let flow = start(&t, &idp, "fake", json!({})).await;
    let resp = callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_failed(&t, &flow, resp, "userinfo_mismatch").await;
    t.finish().await;
}

async fn code_verifier_and_tokens_never_leak(b: Backend) {
    let (t, idp) = setup(&b).await;
    let code = format!("canary-code-{}", uuid::Uuid::new_v4().simple());
    let refresh = format!("canary-refresh-{}", uuid::Uuid::new_v4().simple());
    let access = format!("canary-access-{}", uuid::Uuid::new_v4().simple());
    {
        let mut k = idp.knobs();
        k.refresh_token = refresh.clone();
        k.access_token = access.clone();
    }
    let flow = start(&t, &idp, "fake", json!({})).await;
    let (s, loc, _) = callback(
        &t,
        &[("code", &code), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let verifier = idp.counters().last_token_form["code_verifier"]
        .as_str()
        .unwrap()
        .to_string();
    // A failing exchange with another canary code, to cover error paths too.
    let flow2 = start(&t, &idp, "fake", json!({})).await;
    idp.knobs().token_mode = TokenMode::Error("invalid_grant");
    let code2 = format!("canary-code-{}", uuid::Uuid::new_v4().simple());
    let (_, loc2, _) = callback(
        &t,
        &[
            ("code", &code2),
            ("state", &flow2.state),
            ("iss", &idp.base),
        ],
    )
    .await;

    let (_, audit) = t.get("/audit?limit=1000").await;
    let (_, conn_audit) = t
        .call(
            Method::GET,
            &format!("/audit?connection_id={}", flow.connection_id),
            None,
        )
        .await;
    let metrics = t
        .client
        .get(format!("{}/metrics", t.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let logged = logs();
    let store: &Store = t.state.store();
    let c = store
        .get_connection(&flow.connection_id)
        .await
        .unwrap()
        .unwrap();
    for secret in [&code, &code2, &verifier, &refresh, &access] {
        for (what, text) in [
            ("redirect", loc.as_ref().unwrap().to_string()),
            ("error redirect", loc2.as_ref().unwrap().to_string()),
            ("audit", audit.to_string()),
            ("audit", conn_audit.to_string()),
            ("metrics", metrics.clone()),
            ("logs", logged.clone()),
            ("stored row", format!("{c:?}")),
        ] {
            assert!(
                !text.contains(secret.as_str()),
                "a secret reached the {what}"
            );
        }
    }
    t.finish().await;
}

async fn discovery_is_persisted_and_revalidated(b: Backend) {
    let idp = FakeIdp::start().await;
    let t = TestBroker::start_public(&b, |_| {}).await;
    t.create_provider(idp.profile("fake")).await;
    start(&t, &idp, "fake", json!({})).await;
    start(&t, &idp, "fake", json!({})).await;
    assert_eq!(idp.counters().discovery_requests, 1, "cached in memory");
    let settings = t.settings.clone();
    let db = t.stop().await;

    // After a restart the document comes from the database, not the network.
    let t = TestBroker::start_on(db, settings.clone()).await;
    start(&t, &idp, "fake", json!({})).await;
    assert_eq!(
        idp.counters().discovery_requests,
        1,
        "persisted across restarts"
    );
    let url = format!("{}/.well-known/openid-configuration", idp.base);
    let mut doc = t.state.store().get_cached_doc(&url).await.unwrap().unwrap();
    assert_eq!(doc.etag.as_deref(), Some("\"v1\""));
    let db = t.stop().await;

    // Once stale, it is revalidated with If-None-Match and kept on 304.
    let store = db.store().await;
    doc.expires_at = 0;
    store.put_cached_doc(&doc).await.unwrap();
    store.close().await;
    let t = TestBroker::start_on(db, settings).await;
    start(&t, &idp, "fake", json!({})).await;
    {
        let c = idp.counters();
        assert_eq!(c.discovery_requests, 2);
        assert_eq!(c.conditional_discovery_requests, 1);
    }
    let refreshed = t.state.store().get_cached_doc(&url).await.unwrap().unwrap();
    assert!(refreshed.expires_at > nexus_broker::store::now_ms());
    t.finish().await;
}

async fn cleanup_removes_abandoned_handshakes(b: Backend) {
    let (t, idp) = setup(&b).await;
    let abandoned = start(&t, &idp, "fake", json!({})).await;
    let done = start(&t, &idp, "fake", json!({})).await;
    callback(
        &t,
        &[("code", "c"), ("state", &done.state), ("iss", &idp.base)],
    )
    .await;
    // Nothing is old enough yet.
    assert_eq!(t.state.handshakes().cleanup().await.unwrap(), (0, 0));
    // Age every handshake past its expiry and the pending connection past its TTL.
    let old = nexus_broker::store::now_ms() - 3_600_000;
    t.db.exec(&format!("UPDATE handshakes SET expires_at = {old}"))
        .await;
    t.db.exec(&format!("UPDATE connections SET created_at = {old}"))
        .await;
    let (handshakes, connections) = t.state.handshakes().cleanup().await.unwrap();
    assert_eq!((handshakes, connections), (2, 1));
    assert!(t
        .state
        .store()
        .get_connection(&abandoned.connection_id)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        connection(&t, &done.connection_id).await.status,
        "active",
        "live connections stay"
    );
    t.finish().await;
}

async fn discovery_is_shared_through_redis(b: Backend) {
    let Some(redis) = crate::harness::redis_url() else {
        return;
    };
    let idp = FakeIdp::start().await;
    let prefix = format!("nexus-test-{}:", uuid::Uuid::new_v4().simple());
    let with_redis = |s: &mut nexus_broker::config::Settings| {
        s.redis_url = Some(redis.clone());
        s.redis_key_prefix = Some(prefix.clone());
    };
    // Two replicas with separate databases share only Redis.
    let a = TestBroker::start_public(&b, with_redis).await;
    let bb = TestBroker::start_public(&b, with_redis).await;
    a.create_provider(idp.profile("fake")).await;
    bb.create_provider(idp.profile("fake")).await;
    start(&a, &idp, "fake", json!({})).await;
    assert_eq!(idp.counters().discovery_requests, 1);
    let flow = start(&bb, &idp, "fake", json!({})).await;
    assert_eq!(
        idp.counters().discovery_requests,
        1,
        "the second replica read it from Redis"
    );
    // And the JWKS fetched by one replica serves the other.
    let (s, _, _) = callback(
        &a,
        &[
            ("code", "c"),
            ("state", &start(&a, &idp, "fake", json!({})).await.state),
            ("iss", &idp.base),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    let jwks = idp.counters().jwks_requests;
    {
        let mut k = idp.knobs();
        k.nonce = flow.param("nonce").unwrap();
        k.challenge = flow.param("code_challenge").unwrap();
    }
    let (s, loc, _) = callback(
        &bb,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(q(&loc.unwrap(), "status").as_deref(), Some("success"));
    assert_eq!(idp.counters().jwks_requests, jwks);
    a.finish().await;
    bb.finish().await;
}

async fn unreachable_redis_stops_startup(b: Backend) {
    let db = crate::harness::TestDb::new(&b).await;
    let mut settings = crate::harness::test_settings(&db);
    settings.redis_url = Some("redis://127.0.0.1:1".into());
    let err = nexus_broker::server::Broker::start(BrokerConfig::from_settings(&settings).unwrap())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().starts_with("REDIS_URL:"), "{err}");
    db.drop_db().await;
}

/// A discovery document is data from the network: endpoints it names on a
/// forbidden address (here a loopback listener the policy denies, standing in
/// for a metadata service or an internal host; no test sends a packet beyond
/// loopback), or over plaintext, or on link-local addresses, are refused
/// before any secret is sent.
async fn discovered_endpoints_obey_the_egress_policy(b: Backend) {
    let trap = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let trap_addr = trap.local_addr().unwrap();
    let knocks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = knocks.clone();
    let trap_task = tokio::spawn(async move {
        while let Ok((_s, _)) = trap.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let t = TestBroker::start_public(&b, |s| {
        s.egress_denied_cidrs = Some("127.0.0.2/32".into());
    })
    .await;
    for (name, endpoint, why) in [
        ("denied", format!("http://{trap_addr}/token"), "127.0.0.2"),
        (
            "metadata",
            "http://169.254.169.254/latest/token".to_string(),
            "169.254.169.254",
        ),
        (
            "plaintext",
            "http://idp.example.com/token".to_string(),
            "https",
        ),
    ] {
        let idp = FakeIdp::start().await;
        idp.knobs().token_endpoint = Some(endpoint);
        t.create_provider(idp.profile(name)).await;
        let (s, body) = t
            .post(
                "/auth/consent-spec",
                json!({"workspace_id": "w", "provider_name": name, "return_url": RETURN_URL}),
            )
            .await;
        assert_json_error(s, &body, 502, "provider_discovery_failed");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("egress") && message.contains(why),
            "{message}"
        );
        assert_eq!(idp.counters().token_requests, 0);
    }
    assert_eq!(
        knocks.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing reached the denied listener"
    );
    // Registered endpoints follow the same rule: no plaintext beyond loopback.
    let (s, body) = t
        .post(
            "/providers",
            json!({"profile": {"name": "plain", "auth_type": "oauth2", "client_id": "c",
                   "auth_url": "http://idp.example.com/a", "token_url": "http://idp.example.com/t"}}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("https"),
        "{body}"
    );
    trap_task.abort();
    t.finish().await;
}

/// A provider with its own redirect URI (RFC 9700's mix-up defence for
/// IdPs without `iss`): the authorization response must arrive there; at the
/// shared path or another provider's, it is refused and the handshake stays
/// usable.
async fn per_provider_redirect_uris_defend_against_mix_up(b: Backend) {
    let (t, idp) = setup(&b).await;
    let mut profile = idp.profile("own");
    profile["redirect"] = json!("per_provider");
    let id = t.create_provider(profile).await;
    let (_, view) = t.get(&format!("/providers/{id}")).await;
    let own = format!("{}/auth/callback/{id}", t.base);
    assert_eq!(
        view["redirect_uri"],
        own.as_str(),
        "what to register at the IdP"
    );
    let (_, shared_view) = t.get("/providers/by-name/fake").await;
    let (_, shared_view) = t
        .get(&format!(
            "/providers/{}",
            shared_view["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        shared_view["redirect_uri"],
        format!("{}/auth/callback", t.base)
    );

    let flow = start(&t, &idp, "own", json!({})).await;
    assert_eq!(flow.param("redirect_uri").as_deref(), Some(own.as_str()));
    let pairs = [
        ("code", "code-1"),
        ("state", flow.state.as_str()),
        ("iss", idp.base.as_str()),
    ];
    // At the shared path, and at another provider's: refused, nothing used up.
    let (s, _, body) = callback(&t, &pairs).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("another redirect URI"), "{body}");
    let mut elsewhere = Url::parse(&format!(
        "{}/auth/callback/{}",
        t.base,
        shared_view["id"].as_str().unwrap()
    ))
    .unwrap();
    elsewhere.query_pairs_mut().extend_pairs(pairs);
    assert_eq!(
        browser().get(elsewhere).send().await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(idp.counters().token_requests, 0);
    // At its own: the handshake completes.
    let mut url = Url::parse(&own).unwrap();
    url.query_pairs_mut().extend_pairs(pairs);
    let resp = browser().get(url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let back = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(back.contains("status=success"), "{back}");
    assert_eq!(connection(&t, &flow.connection_id).await.status, "active");
    t.finish().await;
}

/// Providers that document comma-separated scopes (Slack, Shopify...):
/// requested scopes joined with commas, granted ones read with commas, and
/// the setting itself never sent as an authorize parameter.
async fn comma_separated_scopes_for_providers_that_ask_for_them(b: Backend) {
    let idp = FakeIdp::start().await;
    let t = TestBroker::start_public(&b, |_| {}).await;
    let mut profile = idp.profile("commas");
    profile["params"]["scope_separator"] = json!(",");
    t.create_provider(profile).await;
    idp.knobs().granted_scope = Some("openid,email".into());
    let flow = start(&t, &idp, "commas", json!({})).await;
    assert_eq!(
        flow.param("scope").as_deref(),
        Some("openid,email,calendar.read")
    );
    assert_eq!(flow.param("scope_separator"), None);
    let (s, _, body) = callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{body}");
    let c = connection(&t, &flow.connection_id).await;
    assert_eq!(
        serde_json::from_str::<Value>(&c.granted_scopes).unwrap(),
        json!(["openid", "email"])
    );
    t.finish().await;
}

/// RFC 8707: a provider with `params.resource` sends it on the
/// authorization request, the code exchange and every refresh; a resource
/// that is not an absolute URI without a fragment is refused at
/// registration.
async fn resource_indicators_travel_with_every_grant(b: Backend) {
    let (t, idp) = setup(&b).await;
    let mut p = idp.profile("mcp-like");
    p["params"]["resource"] = json!("https://mcp.example.com/mcp");
    t.create_provider(p).await;
    let flow = start(&t, &idp, "mcp-like", json!({})).await;
    assert_eq!(
        flow.param("resource").as_deref(),
        Some("https://mcp.example.com/mcp")
    );
    let (s, _, body) = callback(
        &t,
        &[
            ("code", "code-r"),
            ("state", &flow.state),
            ("iss", &idp.base),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{body}");
    {
        let c = idp.counters();
        assert_eq!(c.last_token_form["grant_type"], "authorization_code");
        assert_eq!(c.last_token_form["resource"], "https://mcp.example.com/mcp");
    }
    let (s, body) = t
        .call(
            reqwest::Method::POST,
            &format!("/connections/{}/refresh", flow.connection_id),
            None,
        )
        .await;
    assert!(s.is_success(), "{s} {body}");
    {
        let c = idp.counters();
        assert_eq!(c.last_token_form["grant_type"], "refresh_token");
        assert_eq!(c.last_token_form["resource"], "https://mcp.example.com/mcp");
    }
    // Without the parameter, none is sent.
    let flow = start(&t, &idp, "fake", json!({})).await;
    assert_eq!(flow.param("resource"), None);
    for bad in [
        json!("https://mcp.example.com/mcp#frag"),
        json!("not a uri"),
        json!("http://mcp.example.com/mcp"),
        json!(["https://a.example.com"]),
    ] {
        let mut p = idp.profile("bad-resource");
        p["params"]["resource"] = bad.clone();
        let (s, e) = t.post("/providers", json!({ "profile": p })).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {e}");
        assert!(
            e["message"].as_str().unwrap().contains("params.resource"),
            "{e}"
        );
    }
    t.finish().await;
}

/// A step-up: the provider refused a call for a scope the connection never
/// had (an MCP server's 403 `insufficient_scope`, `scope="calendar.write"`).
/// The connection is `degraded` with that scope failing, and a reconnect
/// without explicit scopes asks for what it had plus that scope; the scopes
/// granted then clear it.
async fn a_reconnect_asks_for_the_scopes_that_failed(b: Backend) {
    let (t, idp) = setup(&b).await;
    let flow = start(&t, &idp, "fake", json!({})).await;
    let (s, _, body) = callback(
        &t,
        &[("code", "c1"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{body}");
    let id = flow.connection_id.clone();
    let (s, r) = t
        .post(
            &format!("/connections/{id}/scope-failures"),
            json!({"status": 403, "www_authenticate":
                "Bearer error=\"insufficient_scope\", scope=\"calendar.write\""}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{r}");
    assert_eq!(r["status"], "degraded", "{r}");
    assert_eq!(r["failing_scopes"], json!(["calendar.write"]));
    // Explicit scopes are taken as they are.
    let chosen = start(
        &t,
        &idp,
        "fake",
        json!({"connection_id": id, "scopes": ["calendar.read"]}),
    )
    .await;
    assert_eq!(chosen.param("scope").as_deref(), Some("calendar.read"));
    let again = start(&t, &idp, "fake", json!({"connection_id": id})).await;
    assert_eq!(again.connection_id, id);
    assert_eq!(
        again.param("scope").as_deref(),
        Some("openid email calendar.read calendar.write"),
        "what it had, and what failed"
    );
    idp.knobs().granted_scope = Some("openid email calendar.read calendar.write".into());
    let (s, _, body) = callback(
        &t,
        &[("code", "c2"), ("state", &again.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{body}");
    let c = connection(&t, &id).await;
    assert_eq!(c.status, "active");
    assert_eq!(c.failing_scopes, "[]");
    t.finish().await;
}

backend_tests!(
    comma_separated_scopes_for_providers_that_ask_for_them,
    a_reconnect_asks_for_the_scopes_that_failed,
    resource_indicators_travel_with_every_grant,
    per_provider_redirect_uris_defend_against_mix_up,
    discovered_endpoints_obey_the_egress_policy,
    discovery_is_shared_through_redis,
    unreachable_redis_stops_startup,
    full_flow_with_pkce_stores_sealed_tokens,
    client_secret_basic_is_honoured,
    replayed_and_racing_callbacks_exchange_once,
    forged_expired_and_unknown_states_are_refused,
    iss_is_checked_per_rfc9207,
    bad_id_tokens_are_refused,
    token_endpoint_faults_fail_cleanly,
    discovery_issuer_mismatch_is_refused,
    consent_spec_input_rules,
    denied_consent_marks_the_connection_failed,
    reconnect_keeps_the_id_and_the_old_state_until_success,
    userinfo_with_another_subject_is_refused,
    code_verifier_and_tokens_never_leak,
    discovery_is_persisted_and_revalidated,
    cleanup_removes_abandoned_handshakes,
);
