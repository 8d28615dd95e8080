//! Hosted capture of static credentials: the form, its CSRF protection, the
//! JSON path, and secrets that never come back out.

use reqwest::StatusCode;
use serde_json::{json, Value};
use url::Url;

use crate::handshake::RETURN_URL;
use crate::harness::{assert_json_error, backend_tests, logs, Backend, TestBroker};

fn weather_profile() -> Value {
    json!({
        "name": "weather",
        "auth_type": "api_key",
        "description": "Weather <b>API</b> & more",
        "params": {
            "credential_schema": {
                "type": "object",
                "required": ["api_key", "account"],
                "properties": {
                    "api_key": {"type": "string", "title": "API key", "writeOnly": true, "minLength": 20, "description": "From the dashboard"},
                    "account": {"type": "string", "title": "Account"},
                    "region": {"type": "string", "enum": ["eu", "us"]}
                }
            },
            "strategy": {"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}}
        }
    })
}

async fn start(t: &TestBroker) -> (String, String, Url) {
    let (s, spec) = t.post("/auth/consent-spec", json!({"workspace_id": "ws-static", "provider_name": "weather", "return_url": RETURN_URL})).await;
    assert_eq!(s, StatusCode::OK, "{spec}");
    let url = Url::parse(spec["authUrl"].as_str().unwrap()).unwrap();
    (
        spec["connection_id"].as_str().unwrap().into(),
        spec["state"].as_str().unwrap().into(),
        url,
    )
}

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn hidden(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} in form"))
        + marker.len();
    html[start..].split('"').next().unwrap().to_string()
}

async fn form_capture_end_to_end(b: Backend) {
    let t = TestBroker::start_public(&b, |_| {}).await;
    t.create_provider(weather_profile()).await;
    let (cid, state, url) = start(&t).await;
    assert_eq!(url.path(), "/auth/capture");
    assert!(url.as_str().starts_with(&t.base));

    let browser = browser();
    let resp = browser.get(url.clone()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("form-action 'self'"),
        "{csp}"
    );
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let html = resp.text().await.unwrap();
    assert!(
        html.contains(r#"type="password" name="api_key""#),
        "secret fields are password inputs"
    );
    assert!(html.contains(r#"type="text" name="account""#));
    assert!(html.contains("<select id=\"f-region\" name=\"region\""));
    assert!(
        !csp.contains("unsafe-inline") && csp.contains("style-src 'self'"),
        "{csp}"
    );
    assert!(
        !html.contains("<style") && !html.contains(" style="),
        "no inline style"
    );
    let css = browser
        .get(format!("{}/assets/nexus.css", t.base))
        .send()
        .await
        .unwrap();
    assert_eq!(css.headers()["content-type"], "text/css; charset=utf-8");
    assert!(html.contains("From the dashboard"));
    assert!(
        html.contains("Weather &lt;b&gt;API&lt;&#x2f;b&gt; &amp; more") && !html.contains("<b>"),
        "text is escaped"
    );
    assert!(
        !html.contains("<script") && !html.contains("http://") && !html.contains("https://"),
        "no external assets"
    );
    let csrf = hidden(&html, "csrf");
    assert_eq!(hidden(&html, "state"), state);

    // Missing and too-short input: the form comes back with errors, nothing is consumed.
    let canary = format!("canary-api-key-{}", uuid::Uuid::new_v4().simple());
    let resp = browser
        .post(format!("{}/auth/capture-credential", t.base))
        .form(&[
            ("state", state.as_str()),
            ("csrf", &csrf),
            ("api_key", "too-short"),
            ("account", "acme-corp"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let html = resp.text().await.unwrap();
    assert!(html.contains("api_key: is too short"), "{html}");
    assert!(
        html.contains(r#"value="acme-corp""#),
        "non-secret input is kept"
    );
    assert!(
        !html.contains("too-short"),
        "secret input is never sent back"
    );

    let resp = browser
        .post(format!("{}/auth/capture-credential", t.base))
        .form(&[
            ("state", state.as_str()),
            ("csrf", &csrf),
            ("api_key", canary.as_str()),
            ("account", "acme-corp"),
            ("region", "eu"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let loc = resp.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(
        loc,
        format!("{RETURN_URL}?status=success&connection_id={cid}&provider=weather")
    );

    let c = t.state.store().get_connection(&cid).await.unwrap().unwrap();
    assert_eq!(c.status, "active");
    let aad = nexus_broker::vault::Aad {
        table: "connections",
        row_id: &cid,
        column: "credentials",
    };
    let creds: Value = serde_json::from_str(
        t.state
            .config()
            .keys
            .decrypt_str(aad, c.credentials.as_deref().unwrap())
            .unwrap()
            .expose(),
    )
    .unwrap();
    assert_eq!(
        creds,
        json!({"api_key": canary, "account": "acme-corp", "region": "eu"})
    );

    // Single use.
    let resp = browser
        .post(format!("{}/auth/capture-credential", t.base))
        .form(&[
            ("state", state.as_str()),
            ("csrf", &csrf),
            ("api_key", canary.as_str()),
            ("account", "x"),
        ])
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_json_error(status, &body, 400, "invalid_state");

    let (_, audit) = t.get(&format!("/audit?connection_id={cid}")).await;
    assert_eq!(
        audit["events"][0]["detail"]["captured_fields"],
        json!(["account", "api_key", "region"])
    );
    for text in [audit.to_string(), logs(), format!("{c:?}")] {
        assert!(!text.contains(&canary), "the captured key leaked");
    }
    t.finish().await;
}

async fn csrf_is_enforced(b: Backend) {
    let t = TestBroker::start_public(&b, |_| {}).await;
    t.create_provider(weather_profile()).await;
    let (cid, state, url) = start(&t).await;
    let browser = browser();
    let html = browser.get(url).send().await.unwrap().text().await.unwrap();
    let csrf = hidden(&html, "csrf");
    let fields = [
        ("state", state.as_str()),
        ("csrf", csrf.as_str()),
        ("api_key", "k".repeat(30).leak() as &str),
        ("account", "a"),
    ];
    let post = format!("{}/auth/capture-credential", t.base);

    // Another site's page: no same-site cookie.
    let stranger = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = stranger.post(&post).form(&fields).send().await.unwrap();
    let status = resp.status();
    assert_json_error(status, &resp.json().await.unwrap(), 403, "csrf_failed");
    // The right cookie but a forged token.
    let mut forged = fields;
    forged[1] = ("csrf", "AAAA");
    let resp = browser.post(&post).form(&forged).send().await.unwrap();
    let status = resp.status();
    assert_json_error(status, &resp.json().await.unwrap(), 403, "csrf_failed");
    // A cross-origin post.
    let resp = browser
        .post(&post)
        .header("origin", "https://evil.example")
        .form(&fields)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    assert_json_error(status, &resp.json().await.unwrap(), 403, "csrf_failed");
    assert_eq!(
        t.state
            .store()
            .get_connection(&cid)
            .await
            .unwrap()
            .unwrap()
            .status,
        "pending"
    );
    // The genuine page still works.
    let resp = browser
        .post(&post)
        .header("origin", t.base.as_str())
        .form(&fields)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    t.finish().await;
}

async fn json_capture_and_schema(b: Backend) {
    let t = TestBroker::start_public(&b, |_| {}).await;
    t.create_provider(weather_profile()).await;
    let (cid, state, _) = start(&t).await;
    let resp = reqwest::get(format!("{}/auth/capture-schema?state={state}", t.base))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let schema: Value = resp.json().await.unwrap();
    assert_eq!(schema["provider"]["name"], "weather");
    assert_eq!(schema["connection_id"], cid.as_str());
    let api_key = schema["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "api_key")
        .unwrap();
    assert_eq!(api_key["secret"], true);
    assert_eq!(api_key["required"], true);

    let post = format!("{}/auth/capture-credential", t.base);
    let client = reqwest::Client::new();
    let short = "short-secret-value";
    let resp = client
        .post(&post)
        .json(&json!({"state": state, "credentials": {"api_key": short, "account": 5}}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_json_error(status, &body, 400, "invalid_credentials");
    assert_eq!(
        body["errors"],
        json!(["account: has the wrong type", "api_key: is too short"])
    );
    assert!(!body.to_string().contains(short));

    let good = "a-long-enough-api-key-value";
    let resp = client
        .post(&post)
        .json(&json!({"state": state, "credentials": {"api_key": good, "account": "acme"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "success");
    assert!(!body.to_string().contains(good));
    assert_eq!(
        t.state
            .store()
            .get_connection(&cid)
            .await
            .unwrap()
            .unwrap()
            .status,
        "active"
    );
    // The schema endpoint is gone with the state.
    let resp = reqwest::get(format!("{}/auth/capture-schema?state={state}", t.base))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    t.finish().await;
}

async fn capture_refuses_bad_and_oauth_states(b: Backend) {
    let idp = crate::fake_idp::FakeIdp::start().await;
    let t = TestBroker::start_public(&b, |_| {}).await;
    t.create_provider(idp.profile("fake")).await;
    let (s, spec) = t
        .post(
            "/auth/consent-spec",
            json!({"workspace_id": "w", "provider_name": "fake", "return_url": RETURN_URL}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let oauth_state = spec["state"].as_str().unwrap();
    for q in [
        format!("state={oauth_state}"),
        "state=garbage".into(),
        String::new(),
    ] {
        for path in ["/auth/capture", "/auth/capture-schema"] {
            let resp = reqwest::get(format!("{}{path}?{q}", t.base)).await.unwrap();
            let status = resp.status();
            assert_json_error(status, &resp.json().await.unwrap(), 400, "invalid_state");
        }
    }
    let resp = reqwest::Client::new()
        .post(format!("{}/auth/capture-credential", t.base))
        .body("x")
        .header("content-type", "text/plain")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    t.finish().await;
}

/// Posts a JSON capture; the status and the JSON answer.
async fn submit_json(t: &TestBroker, body: Value) -> (StatusCode, Value) {
    let resp = reqwest::Client::new()
        .post(format!("{}/auth/capture-credential", t.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    (resp.status(), resp.json().await.unwrap())
}

/// Opens a capture page in `browser` (keeping its cookie), then submits
/// good credentials from it; the status of the submission.
async fn fill_in(t: &TestBroker, browser: &reqwest::Client, state: &str, url: Url) -> StatusCode {
    let html = browser.get(url).send().await.unwrap().text().await.unwrap();
    submit_form(t, browser, state, &html).await
}

/// Submits good credentials from an opened page's `html`.
async fn submit_form(
    t: &TestBroker,
    browser: &reqwest::Client,
    state: &str,
    html: &str,
) -> StatusCode {
    browser
        .post(format!("{}/auth/capture-credential", t.base))
        .form(&[
            ("state", state),
            ("csrf", &hidden(html, "csrf")),
            ("api_key", "a-long-enough-api-key-value"),
            ("account", "acme"),
        ])
        .send()
        .await
        .unwrap()
        .status()
}

/// Regressions from the adversarial review: an empty required field, NUL in
/// the JSON path, two forms open in one browser, and a capture state sent to
/// the OAuth callback (with a forged, line-breaking description).
async fn capture_input_gaps_are_closed(b: Backend) {
    let t = TestBroker::start_public(&b, |_| {}).await;
    t.create_provider(weather_profile()).await;

    // Empty (or blank) counts as missing.
    let (_, state, _) = start(&t).await;
    let (status, body) = submit_json(
        &t,
        json!({"state": state, "credentials": {"api_key": "a-long-enough-api-key-value", "account": "  "}}),
    )
    .await;
    assert_json_error(status, &body, 400, "invalid_credentials");
    assert!(
        body["message"].as_str().unwrap().contains("account"),
        "{body}"
    );

    // NUL is refused on the JSON path as everywhere else.
    let (status, body) = submit_json(
        &t,
        json!({"state": state, "credentials": {"api_key": "a-long-enough-api-key\u{0}", "account": "a"}}),
    )
    .await;
    assert_json_error(status, &body, 400, "invalid_request");

    // Two forms open in one browser: submitting the first still works.
    let browser = browser();
    let (_, state1, url1) = start(&t).await;
    let (cid2, state2, url2) = start(&t).await;
    let html1 = browser
        .get(url1)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let html2 = browser
        .get(url2)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (state, html) in [(&state1, &html1), (&state2, &html2)] {
        let status = submit_form(&t, &browser, state, html).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{state}");
    }

    // A capture state at the OAuth callback is refused and uses nothing up;
    // its forged description reaches neither the row nor the log.
    let (cid3, state3, url3) = start(&t).await;
    let resp = browser
        .get(format!(
            "{}/auth/callback?state={state3}&error=access_denied&error_description=x%0A2026-01-01T00:00:00Z%20INFO%20capture-state-at-callback%1B%5B31m",
            t.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (_, c) = t.get(&format!("/connections/{cid3}")).await;
    assert_eq!(c["status"], "pending", "{c}");
    let status = fill_in(&t, &browser, &state3, url3).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "the form still works");
    let (_, c) = t.get(&format!("/connections/{cid2}")).await;
    assert_eq!(c["status"], "active");
    let log = logs();
    assert!(
        !log.contains("capture-state-at-callback"),
        "nothing of the description logged"
    );
    t.finish().await;
}

backend_tests!(
    capture_input_gaps_are_closed,
    form_capture_end_to_end,
    csrf_is_enforced,
    json_capture_and_schema,
    capture_refuses_bad_and_oauth_states
);
