//! Pages in a real browser: Debian's headless Chromium driven through
//! chromedriver (WebDriver), clicking through what a person does, with
//! axe-core (npm) checking every page and screenshots kept in
//! `target/tmp/screenshots/` for people to look at.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::{env_file, env_value, free_port, http, stop, up_full};

/// A headless Chromium session and the chromedriver serving it.
struct Browser {
    client: Client,
    _driver: Child,
    shots: PathBuf,
    axe: Option<String>,
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A browser, or `None` (after one line, outside CI) when chromium or
/// chromedriver is missing.
async fn browser(test: &str) -> Option<Browser> {
    let chromium = on_path("chromium").or_else(|| on_path("chromium-browser"));
    let (Some(chromium), Some(driver)) = (chromium, on_path("chromedriver")) else {
        assert!(
            !ci(),
            "CI=true but chromium or chromedriver is missing (apt-get install chromium chromium-driver)"
        );
        eprintln!("skipped: {test} (chromium and chromium-driver are not installed)");
        return None;
    };
    let axe_file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/peers/axe/node_modules/axe-core/axe.min.js"
    );
    let axe = match std::fs::read_to_string(axe_file) {
        Ok(s) => Some(s),
        Err(e) => {
            assert!(!ci(), "CI=true but axe-core is missing ({axe_file}: {e}); run npm ci --prefix tests/peers/axe");
            eprintln!("{test}: no accessibility checks (axe-core: {e})");
            None
        }
    };
    let port = free_port();
    let driver = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver starts");
    let url = format!("http://127.0.0.1:{port}");
    let http = http();
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(r) = http.get(format!("{url}/status")).send().await {
            if r.json::<Value>()
                .await
                .is_ok_and(|v| v["value"]["ready"] == true)
            {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "chromedriver did not become ready");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--no-first-run", "--disable-extensions"]
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&url)
        .await
        .expect("a WebDriver session");
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    Some(Browser {
        client,
        _driver: driver,
        shots,
        axe,
    })
}

impl Browser {
    /// Saves a screenshot of the page as it is.
    async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    /// axe-core's serious and critical violations on the page, as
    /// `id: help (selectors)` lines.
    async fn accessibility(&self) -> Vec<String> {
        let Some(axe) = &self.axe else {
            return Vec::new();
        };
        // WebDriver scripts run outside the page's Content-Security-Policy.
        self.client.execute(axe, vec![]).await.unwrap();
        let result = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document).then(r => done(r.violations), e => done([{id: 'axe-error', impact: 'critical', help: String(e), nodes: []}]));",
                vec![],
            )
            .await
            .unwrap();
        assert!(result.is_array(), "axe answered {result}");
        result
            .as_array()
            .into_iter()
            .flatten()
            .filter(|v| matches!(v["impact"].as_str(), Some("serious" | "critical")))
            .map(|v| {
                let targets: Vec<String> = v["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| n["target"].to_string())
                    .collect();
                format!("{}: {} ({})", v["id"], v["help"], targets.join(", "))
            })
            .collect()
    }

    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap()
    }
}

/// Where the browser is sent back after connecting: the application's page.
async fn return_page() -> String {
    let port = free_port();
    let app = axum::Router::new().route(
        "/done",
        axum::routing::get(|| async {
            axum::response::Html(
                "<!doctype html><html lang=\"en\"><head><title>Back in the app</title></head>\
                 <body><main><h1>Back in the application</h1></main></body></html>",
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://127.0.0.1:{port}/done")
}

const CANARY: &str = "canary-browser-key-7d2e91";

/// A person connects a static-key provider through the hosted capture form
/// (reached through the gateway): values the operator typed, hostile ones
/// included, render as text; a refused entry comes back with the error and
/// without the secret; the accepted one lands on the application's page and
/// the connection is active. axe-core finds nothing serious on any page.
#[tokio::test]
async fn a_person_connects_a_static_key_in_the_capture_form() {
    let Some(b) = browser("a_person_connects_a_static_key_in_the_capture_form").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (child, broker, gateway) = up_full(tmp.path(), &[("NEXUS_LOG", "warn")], &[]).await;
    let env = env_file(tmp.path());
    let admin = env_value(&env, "API_KEY");
    let agent_key = crate::env_value_last(&env, "AGENT_KEY");
    let h = http();
    let xss_name = "weather<img src=x onerror=alert(1)>";
    let created = h
        .post(format!("{broker}/providers"))
        .header("x-api-key", &admin)
        .json(&json!({"profile": {
            "name": xss_name, "auth_type": "header",
            "description": "<script>alert(2)</script> forecasts & more",
            "params": {"header_name": "X-Key", "credential_field": "api_key",
                "credential_schema": {"type": "object", "required": ["api_key", "region"], "properties": {
                    "api_key": {"type": "string", "title": "API key <b>\"'", "minLength": 12, "format": "password",
                                "description": "<img src=x onerror=alert(3)> from the dashboard"},
                    "region": {"type": "string", "title": "Region", "enum": ["eu", "us"]}}}}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let back = return_page().await;
    let spec: Value = h
        .post(format!("{gateway}/v1/request-connection"))
        .bearer_auth(&agent_key)
        .json(&json!({"user_id": "ws-browser", "provider_name": xss_name, "return_url": back}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let auth_url = spec["authUrl"].as_str().unwrap_or_else(|| panic!("{spec}"));
    assert!(
        auth_url.starts_with(&gateway),
        "the form is reached through the gateway: {auth_url}"
    );

    // The form: hostile text rendered as text, the stylesheet applied under
    // the page's policy, nothing inline.
    let c = &b.client;
    c.goto(auth_url).await.unwrap();
    let h1 = c
        .find(Locator::Css("h1"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(h1, format!("Connect {xss_name}"));
    assert_eq!(
        b.js("return document.querySelectorAll('img, script').length")
            .await,
        0
    );
    assert!(c.get_alert_text().await.is_err(), "no script ran");
    let label = c
        .find(Locator::Css("label[for=f-api_key]"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(label.starts_with("API key <b>\"'"), "{label}");
    let font = b
        .js("return getComputedStyle(document.body).fontFamily")
        .await;
    assert!(
        font.as_str().unwrap_or("").contains("system-ui"),
        "the stylesheet applies: {font}"
    );
    b.shot("capture-form").await;
    let problems = b.accessibility().await;
    assert!(problems.is_empty(), "axe on the form: {problems:#?}");

    // On a phone: no sideways scrolling.
    c.set_window_size(390, 844).await.unwrap();
    let fits = b
        .js("return document.documentElement.scrollWidth <= window.innerWidth")
        .await;
    assert_eq!(fits, true, "the form fits a phone's width");
    b.shot("capture-phone").await;
    c.set_window_size(1280, 900).await.unwrap();

    // Too short a key: the form again, with the reason and without the key.
    let key = c.find(Locator::Css("#f-api_key")).await.unwrap();
    key.send_keys("short-key").await.unwrap();
    c.find(Locator::Css("#f-region option[value=eu]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let found = c
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css("[role=alert]"))
        .await;
    let Ok(found) = found else {
        let at = c.current_url().await.ok();
        panic!(
            "no error list at {at:?}: {}",
            c.source().await.unwrap_or_default()
        );
    };
    let alert = found.text().await.unwrap();
    assert!(alert.contains("api_key"), "{alert}");
    let value = b
        .js("return document.querySelector('#f-api_key').value")
        .await;
    assert_eq!(value, "", "a secret is never sent back to the browser");
    let source = c.source().await.unwrap();
    assert!(!source.contains("short-key"));
    b.shot("capture-errors").await;
    let problems = b.accessibility().await;
    assert!(problems.is_empty(), "axe on the errors: {problems:#?}");

    // The real key: back to the application, connected.
    c.find(Locator::Css("#f-api_key"))
        .await
        .unwrap()
        .send_keys(CANARY)
        .await
        .unwrap();
    c.find(Locator::Css("#f-region option[value=us]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let mut landed = c.current_url().await.unwrap();
    for _ in 0..100 {
        if landed.as_str().starts_with(&back) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        landed = c.current_url().await.unwrap();
    }
    assert!(landed.as_str().starts_with(&back), "{landed}");
    let q: std::collections::HashMap<String, String> = landed.query_pairs().into_owned().collect();
    assert_eq!(
        q.get("status").map(String::as_str),
        Some("success"),
        "{landed}"
    );
    b.shot("capture-done").await;
    // The checker is real: an unlabelled input on a page is reported.
    b.js("document.body.insertAdjacentHTML('beforeend', '<input type=text>'); return 1")
        .await;
    if b.axe.is_some() {
        let problems = b.accessibility().await;
        assert!(
            problems.iter().any(|p| p.starts_with("\"label\"")),
            "axe misses an unlabelled input: {problems:?}"
        );
    }
    let id = q["connection_id"].clone();
    let conn: Value = h
        .get(format!("{broker}/connections/{id}"))
        .header("x-api-key", &admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(conn["status"], "active", "{conn}");

    let _ = b.client.close().await;
    let logs = stop(child, "-TERM").await;
    assert!(!logs.contains(CANARY), "the key in the logs");
}
