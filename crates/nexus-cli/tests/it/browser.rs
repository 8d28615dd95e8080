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

use crate::{env_file, env_value, free_port, http, stop, up_full, up_printed};

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

/// The element `css` selects, waiting (at most 10 s) for the page to show it.
async fn waited(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
}

/// Clicks the element `css` selects.
async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
}

/// The text of the element `css` selects.
async fn text_of(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap()
}

/// Types `keys` into the element `css` selects.
async fn type_into(c: &Client, css: &str, keys: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .send_keys(keys)
        .await
        .unwrap();
}

/// An admin API answer (GET), as JSON.
async fn admin_json(h: &reqwest::Client, url: String, admin: &str) -> Value {
    h.get(url)
        .header("x-api-key", admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A static-key connection made by API (an application's agent asks, the
/// key is captured as JSON): its id.
async fn connect_by_api(
    h: &reqwest::Client,
    gateway: &str,
    agent_key: &str,
    workspace: &str,
    provider: &str,
    back: &str,
) -> String {
    let spec: Value = h
        .post(format!("{gateway}/v1/request-connection"))
        .bearer_auth(agent_key)
        .json(&json!({"user_id": workspace, "provider_name": provider, "return_url": back}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let done = h
        .post(format!("{gateway}/auth/capture-credential"))
        .json(&json!({"state": spec["state"], "credentials": {"api_key": CANARY}}))
        .send()
        .await
        .unwrap();
    assert!(done.status().is_success());
    spec["connection_id"].as_str().unwrap().to_string()
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
    let h1 = text_of(c, "h1").await;
    assert_eq!(h1, format!("Connect {xss_name}"));
    assert_eq!(
        b.js("return document.querySelectorAll('img, script').length")
            .await,
        0
    );
    assert!(c.get_alert_text().await.is_err(), "no script ran");
    let label = text_of(c, "label[for=f-api_key]").await;
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
    click(c, "#f-region option[value=eu]").await;
    click(c, "button[type=submit]").await;
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
    type_into(c, "#f-api_key", CANARY).await;
    click(c, "#f-region option[value=us]").await;
    click(c, "button[type=submit]").await;
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
    let conn: Value = admin_json(&h, format!("{broker}/connections/{id}"), &admin).await;
    assert_eq!(conn["status"], "active", "{conn}");

    let _ = b.client.close().await;
    let logs = stop(child, "-TERM").await;
    assert!(!logs.contains(CANARY), "the key in the logs");
}

/// Clicks the submit button of the form whose action is `action` and whose
/// hidden `field` is `value`.
async fn submit(c: &Client, action: &str, field: &str, value: &str) {
    let css = format!("form[action='{action}'] input[name={field}][value='{value}']");
    let input = c
        .find(Locator::Css(&css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"));
    let form = input
        .find(Locator::XPath("./ancestor::form"))
        .await
        .unwrap();
    form.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

/// Waits (bounded) until the browser is on a page whose path is `path`.
async fn on_page(c: &Client, path: &str) -> url::Url {
    for _ in 0..100 {
        let u = c.current_url().await.unwrap();
        if u.path() == path {
            return u;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "never reached {path}: at {}",
        c.current_url().await.unwrap()
    );
}

/// Waits (bounded) until the browser's URL contains `needle`.
async fn on_url_with(c: &Client, needle: &str) -> url::Url {
    for _ in 0..100 {
        let u = c.current_url().await.unwrap();
        if u.as_str().contains(needle) {
            return u;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "never reached a URL with {needle}: at {}",
        c.current_url().await.unwrap()
    );
}

/// A person manages one workspace in the connect portal, from a link an
/// application made with its agent key: the link's token leaves the address
/// bar for an HttpOnly cookie; they connect a static-key provider through
/// the capture form and come back connected, disconnect another (revoked),
/// pause the workspace (red banner with their reason as text; the token API
/// answers 423) and resume. Refused: posts without the CSRF token, another
/// workspace's connection, a revoked link.
#[tokio::test]
async fn a_person_manages_a_workspace_in_the_connect_portal() {
    let Some(b) = browser("a_person_manages_a_workspace_in_the_connect_portal").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (child, broker, gateway) = up_full(tmp.path(), &[("NEXUS_LOG", "warn")], &[]).await;
    let env = env_file(tmp.path());
    let admin = env_value(&env, "API_KEY");
    let agent_key = crate::env_value_last(&env, "AGENT_KEY");
    let h = http();
    let schema = json!({"type": "object", "required": ["api_key"],
        "properties": {"api_key": {"type": "string", "title": "API key", "format": "password"}}});
    for (name, description) in [
        ("weather", "Forecasts <i>by the hour</i>"),
        ("search", "Web search"),
        ("hidden", "Not offered by this link"),
    ] {
        let r = h
            .post(format!("{broker}/providers"))
            .header("x-api-key", &admin)
            .json(&json!({"profile": {"name": name, "auth_type": "header", "description": description,
                "params": {"header_name": "X-Key", "credential_field": "api_key", "credential_schema": schema}}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
    let back = return_page().await;
    // `search` is connected already (by API), in the workspace and in another.
    let mut made_by_api = Vec::new();
    for ws in ["ws-portal", "ws-other"] {
        made_by_api.push(connect_by_api(&h, &gateway, &agent_key, ws, "search", &back).await);
    }
    let (search_id, other_ws_id) = (made_by_api[0].clone(), made_by_api[1].clone());

    let made = h
        .post(format!("{gateway}/v1/connect-sessions"))
        .bearer_auth(&agent_key)
        .json(&json!({"workspace_id": "ws-portal", "providers": ["weather", "search"], "return_url": back}))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status().as_u16(), 201);
    let made: Value = made.json().await.unwrap();
    let link = made["url"].as_str().unwrap().to_string();
    let token = made["token"].as_str().unwrap().to_string();
    assert!(
        link.starts_with(&format!("{gateway}/connect?session=nxc_")),
        "{link}"
    );

    // The link: the token becomes a cookie the page's scripts cannot read.
    let c = &b.client;
    c.goto(&link).await.unwrap();
    let at = on_page(c, "/connect").await;
    assert!(at.query().is_none(), "the token left the address bar: {at}");
    assert_eq!(b.js("return document.cookie").await, "", "HttpOnly");
    let text = text_of(c, "main").await;
    assert!(text.contains("Workspace ws-portal"), "{text}");
    assert!(
        text.contains("Forecasts <i>by the hour</i>"),
        "text as text: {text}"
    );
    assert!(
        !text.contains("Not offered"),
        "only the link's providers: {text}"
    );
    let search_state = c
        .find(Locator::Css(&format!("#conn-{search_id} .state")))
        .await
        .unwrap();
    assert_eq!(
        search_state.attr("data-status").await.unwrap().as_deref(),
        Some("active")
    );
    b.shot("portal").await;
    let problems = b.accessibility().await;
    assert!(problems.is_empty(), "axe on the portal: {problems:#?}");

    // Connect weather through the capture form, and come back connected.
    let weather_id = {
        let list: Value =
            admin_json(&h, format!("{broker}/providers/by-name/weather"), &admin).await;
        list["id"].as_str().unwrap().to_string()
    };
    submit(c, "/connect/start", "provider_id", &weather_id).await;
    on_page(c, "/auth/capture").await;
    type_into(c, "#f-api_key", CANARY).await;
    click(c, "button[type=submit]").await;
    on_url_with(c, "status=success").await;
    let notice = text_of(c, "[role=status]").await;
    assert_eq!(notice, "Connected.");
    let cards = text_of(c, ".cards").await;
    assert!(
        cards.contains("weather") && cards.contains("Connected"),
        "{cards}"
    );
    b.shot("portal-connected").await;

    // Disconnect search: revoked, and said so.
    submit(c, "/connect/disconnect", "connection_id", &search_id).await;
    on_url_with(c, "notice=disconnected").await;
    let state = c
        .find(Locator::Css(&format!("#conn-{search_id} .state")))
        .await
        .unwrap()
        .attr("data-status")
        .await
        .unwrap();
    assert_eq!(state.as_deref(), Some("revoked"));
    let conn: Value = admin_json(&h, format!("{broker}/connections/{search_id}"), &admin).await;
    assert_eq!(conn["status"], "revoked");
    b.shot("portal-disconnected").await;

    // Pause with a reason (hostile text stays text); agents get 423.
    let reason = "<b>maintenance</b> until 5pm";
    type_into(c, "#pause-reason", reason).await;
    click(c, "form.pause button[type=submit]").await;
    on_url_with(c, "notice=paused").await;
    let banner = text_of(c, ".banner-red").await;
    assert!(
        banner.contains(reason) && banner.contains("connect:cs_"),
        "{banner}"
    );
    b.shot("portal-paused").await;
    let problems = b.accessibility().await;
    assert!(
        problems.is_empty(),
        "axe on the paused portal: {problems:#?}"
    );
    let weather_conn = {
        let list: Value = admin_json(
            &h,
            format!("{broker}/connections?workspace_id=ws-portal"),
            &admin,
        )
        .await;
        list["connections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["provider_id"] == weather_id.as_str() && c["status"] == "active")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut paused = 0;
    for _ in 0..50 {
        let r = h
            .get(format!("{gateway}/v1/token/{weather_conn}"))
            .bearer_auth(&agent_key)
            .send()
            .await
            .unwrap();
        paused = r.status().as_u16();
        if paused == 423 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(paused, 423, "the token API answers 423 while paused");
    click(c, ".banner-red button[type=submit]").await;
    on_url_with(c, "notice=resumed").await;
    assert!(
        c.find(Locator::Css(".banner-red")).await.is_err(),
        "banner gone"
    );

    // Refusals, outside the browser: no CSRF token; another workspace's
    // connection (with a valid token); then a revoked link.
    let cookie = format!("nexus_connect={token}");
    let page = h
        .get(format!("{gateway}/connect"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap()
        .to_string();
    let post = |body: String| {
        let (h, cookie, gateway) = (h.clone(), cookie.clone(), gateway.clone());
        async move {
            h.post(format!("{gateway}/connect/disconnect"))
                .header("cookie", cookie)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let r = post(format!("connection_id={other_ws_id}")).await;
    assert_eq!(r.status().as_u16(), 403);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"], "csrf_failed");
    let r = post(format!("csrf={csrf}&connection_id={other_ws_id}")).await;
    assert_eq!(r.status().as_u16(), 404, "another workspace's connection");
    let other: Value = admin_json(&h, format!("{broker}/connections/{other_ws_id}"), &admin).await;
    assert_eq!(other["status"], "active", "untouched");
    let r = h
        .delete(format!(
            "{broker}/connect-sessions/{}",
            made["id"].as_str().unwrap()
        ))
        .header("x-api-key", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    c.refresh().await.unwrap();
    let Ok(main) = c.find(Locator::Css("main")).await else {
        panic!("no page: {}", c.source().await.unwrap_or_default());
    };
    let text = main.text().await.unwrap();
    assert!(text.contains("revoked"), "{text}");
    b.shot("portal-revoked-link").await;
    let r = post(format!("csrf={csrf}&connection_id={weather_conn}")).await;
    assert_eq!(r.status().as_u16(), 401, "a revoked link does nothing");

    let _ = b.client.close().await;
    let logs = stop(child, "-TERM").await;
    assert!(!logs.contains(CANARY), "a key in the logs");
    assert!(!logs.contains(&token), "the link's token in the logs");
}

/// An application's page that shows the connect portal in a frame and
/// writes every message it receives into `#log`.
async fn embedding_app() -> (String, std::sync::Arc<std::sync::Mutex<String>>) {
    use std::sync::{Arc, Mutex};
    let link = Arc::new(Mutex::new(String::new()));
    let port = free_port();
    let shared = link.clone();
    let app = axum::Router::new().route(
        "/app",
        axum::routing::get(move || {
            let src = shared.lock().unwrap().clone();
            async move {
                axum::response::Html(format!(
                    "<!doctype html><html lang=\"en\"><head><title>The application</title></head><body>\
                     <h1>Settings</h1><iframe id=\"portal\" title=\"Connections\" src=\"{src}\" width=\"600\" height=\"700\"></iframe>\
                     <pre id=\"log\"></pre><script>window.addEventListener('message', function (e) {{\
                     document.getElementById('log').textContent += e.origin + ' ' + JSON.stringify(e.data) + '\\n'; }});</script>\
                     </body></html>"
                ))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://127.0.0.1:{port}"), link)
}

/// An application shows the portal in a frame (its origin in
/// CONNECT_EMBED_ORIGINS): the person connects a static-key provider inside
/// the frame, and the application's page receives the completion message
/// from the portal's origin. Pages say who may frame them.
#[tokio::test]
async fn the_portal_works_in_a_frame_and_tells_the_application() {
    let Some(b) = browser("the_portal_works_in_a_frame_and_tells_the_application").await else {
        return;
    };
    let (app_origin, link_slot) = embedding_app().await;
    let tmp = tempfile::tempdir().unwrap();
    let (child, broker, gateway) = up_full(
        tmp.path(),
        &[
            ("NEXUS_LOG", "warn"),
            ("CONNECT_EMBED_ORIGINS", &app_origin),
        ],
        &[],
    )
    .await;
    let env = env_file(tmp.path());
    let admin = env_value(&env, "API_KEY");
    let agent_key = crate::env_value_last(&env, "AGENT_KEY");
    let h = http();
    let created: Value = h
        .post(format!("{broker}/providers"))
        .header("x-api-key", &admin)
        .json(&json!({"profile": {"name": "weather", "auth_type": "header",
            "params": {"header_name": "X-Key", "credential_field": "api_key", "credential_schema":
                {"type": "object", "required": ["api_key"], "properties": {"api_key": {"type": "string", "title": "API key"}}}}}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let weather_id = created["id"].as_str().unwrap().to_string();
    let made: Value = h
        .post(format!("{gateway}/v1/connect-sessions"))
        .bearer_auth(&agent_key)
        .json(&json!({"workspace_id": "ws-embed"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let link = made["url"].as_str().unwrap().to_string();
    *link_slot.lock().unwrap() = link.clone();

    // The policy: this application may frame the pages, nobody else.
    let page = h
        .get(&link)
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains(&format!("frame-ancestors {app_origin};")),
        "{csp}"
    );
    assert!(page.headers().get("x-frame-options").is_none());

    let c = &b.client;
    c.goto(&format!("{app_origin}/app")).await.unwrap();
    let frame = c.find(Locator::Css("#portal")).await.unwrap();
    frame.enter_frame().await.unwrap();
    waited(
        c,
        &format!("form[action='/connect/start'] input[value='{weather_id}']"),
    )
    .await;
    submit(c, "/connect/start", "provider_id", &weather_id).await;
    waited(c, "#f-api_key")
        .await
        .send_keys(CANARY)
        .await
        .unwrap();
    click(c, "button[type=submit]").await;
    waited(c, "[role=status]").await;
    c.enter_parent_frame().await.unwrap();
    let mut log = String::new();
    for _ in 0..50 {
        log = text_of(c, "#log").await;
        if !log.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (from, data) = log
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("no message: {log:?}"));
    assert_eq!(from, gateway, "from the portal's origin");
    let data: Value = serde_json::from_str(data).unwrap();
    assert_eq!(data["type"], "nexus:connect", "{data}");
    assert_eq!(data["status"], "active", "{data}");
    assert_eq!(data["provider"], "weather", "{data}");
    assert!(data["connection_id"].as_str().unwrap().len() > 10, "{data}");
    assert!(!log.contains(CANARY));
    b.shot("portal-in-a-frame").await;

    let _ = b.client.close().await;
    let logs = stop(child, "-TERM").await;
    assert!(!logs.contains(CANARY), "a key in the logs");
}

/// Waits until the page's live stream is open, and marks the page: a
/// marker still there later proves the page was updated, not reloaded.
async fn live(b: &Browser) {
    for _ in 0..100 {
        if b.js("return document.body.dataset.live || ''").await == json!("on") {
            b.js("window.nexusMarker = 1; return 1").await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the console's live stream did not open");
}

/// `nexus console`: a one-time sign-in link (the admin key stays in the
/// terminal).
async fn console_link(dir: &std::path::Path, broker: &str) -> String {
    let out = crate::nexus(dir)
        .args(["console", "--state-dir", "state", "--broker-url", broker])
        .env("NEXUS_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        link.starts_with(&format!("{broker}/console/sign-in?token=nxl_")),
        "{link}"
    );
    link
}

/// An operator signs in to the console with a one-time link, sees the
/// counts and the amber banner when a connection needs a person, filters
/// connections, opens one (timeline, reconnect link, revoke with
/// confirmation), pulls the kill switch (red banner with who, when and why
/// on every page; agents get 423) and resumes, and signs out. Refused: a
/// used link, a post without the CSRF token, a signed-out session.
#[tokio::test]
async fn an_operator_works_in_the_console() {
    let Some(b) = browser("an_operator_works_in_the_console").await else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (child, broker, gateway, printed) =
        up_printed(tmp.path(), &[("NEXUS_LOG", "warn")], &[]).await;
    let env = env_file(tmp.path());
    let admin = env_value(&env, "API_KEY");
    let agent_key = crate::env_value_last(&env, "AGENT_KEY");
    let h = http();
    let r = h
        .post(format!("{broker}/providers"))
        .header("x-api-key", &admin)
        .json(&json!({"profile": {"name": "weather", "auth_type": "header",
            "params": {"header_name": "X-Key", "credential_field": "api_key", "credential_schema":
                {"type": "object", "required": ["api_key"], "properties": {"api_key": {"type": "string"}}}}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let back = return_page().await;
    let mut ids = Vec::new();
    for ws in ["ws-a", "ws-a", "ws-b"] {
        ids.push(connect_by_api(&h, &gateway, &agent_key, ws, "weather", &back).await);
    }

    // Signed in by the link `nexus up` printed (a newcomer's first step);
    // the link works once.
    let link = printed;
    assert!(
        link.starts_with(&format!("{broker}/console/sign-in?token=nxl_")),
        "{link}"
    );
    let c = &b.client;
    c.goto(&link).await.unwrap();
    on_page(c, "/console").await;
    live(&b).await;
    assert_eq!(b.js("return document.cookie").await, "", "HttpOnly");
    let table = text_of(c, "table").await;
    assert!(table.contains("active 3"), "{table}");
    b.shot("console-overview").await;
    let problems = b.accessibility().await;
    assert!(problems.is_empty(), "axe on the overview: {problems:#?}");
    // The console is the broker's (private zone): the gateway does not serve it.
    let public = link.replacen(&broker, &gateway, 1);
    let r = h.get(&public).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404, "the console through the gateway");
    let again = h.get(&link).send().await.unwrap();
    assert_eq!(again.status().as_u16(), 401, "a link works once");

    // A scope fails: degraded, and the amber banner says a person is needed.
    let report = h
        .post(format!("{broker}/connections/{}/scope-failures", ids[0]))
        .header("x-api-key", &admin)
        .json(&json!({"status": 403, "scopes": ["forecast.hourly"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(report.status().as_u16(), 202, "{:?}", report.text().await);
    // Live: the banner and the counts change without a reload.
    let amber = waited(c, ".banner-amber").await.text().await.unwrap();
    assert!(amber.contains("1 connection needs a person"), "{amber}");
    assert_eq!(
        b.js("return window.nexusMarker").await,
        json!(1),
        "reloaded"
    );
    let counts = text_of(c, "#live-counts").await;
    assert!(counts.contains("degraded 1"), "{counts}");
    b.shot("console-overview-live").await;

    // Connections, filtered.
    c.goto(&format!("{broker}/console/connections?workspace=ws-a"))
        .await
        .unwrap();
    let rows = b
        .js("return document.querySelectorAll('tbody tr').length")
        .await;
    assert_eq!(rows, 2);
    // A row changes state live.
    live(&b).await;
    let report = h
        .post(format!("{broker}/connections/{}/scope-failures", ids[1]))
        .header("x-api-key", &admin)
        .json(&json!({"status": 403, "scopes": ["forecast.daily"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(report.status().as_u16(), 202);
    let status = format!("tr[data-id='{}'] td.state[data-status='degraded']", ids[1]);
    let cell = waited(c, &status).await.text().await.unwrap();
    assert!(cell.contains("degraded"), "{cell}");
    assert_eq!(
        b.js("return window.nexusMarker").await,
        json!(1),
        "reloaded"
    );
    let resolved = h
        .post(format!("{broker}/connections/{}/scope-failures", ids[1]))
        .header("x-api-key", &admin)
        .json(&json!({"ok_scopes": ["forecast.daily"]}))
        .send()
        .await
        .unwrap();
    assert!(
        resolved.status().is_success(),
        "{:?}",
        resolved.text().await
    );
    c.goto(&format!("{broker}/console/connections?state=degraded"))
        .await
        .unwrap();
    let body = text_of(c, "tbody").await;
    assert!(
        body.contains(&ids[0]) && body.contains("forecast.hourly"),
        "{body}"
    );
    assert!(!body.contains(&ids[1]));
    b.shot("console-connections").await;
    let problems = b.accessibility().await;
    assert!(problems.is_empty(), "axe on the connections: {problems:#?}");

    // One connection: timeline, a reconnect link, revoke only when confirmed.
    c.find(Locator::LinkText(&ids[0]))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    on_page(c, &format!("/console/connections/{}", ids[0])).await;
    let timeline = text_of(c, ".timeline").await;
    assert!(timeline.contains("connection."), "{timeline}");
    click(c, "form[action$='/reconnect-link'] button").await;
    let reconnect = waited(c, "#reconnect-url")
        .await
        .prop("value")
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(reconnect.contains("/connect?session=nxc_"), "{reconnect}");
    click(c, "form[action$='/revoke'] button").await;
    let note = waited(c, "[role=status].notice")
        .await
        .text()
        .await
        .unwrap();
    assert!(note.contains("confirm"), "{note}");
    click(c, "#revoke-confirm").await;
    click(c, "form[action$='/revoke'] button").await;
    let mut state = None;
    for _ in 0..50 {
        if let Ok(el) = c.find(Locator::Css("dd.state")).await {
            // The page may be replaced under us (stale element): look again.
            state = el.attr("data-status").await.ok().flatten();
            if state.as_deref() == Some("revoked") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state.as_deref(), Some("revoked"));
    b.shot("console-connection").await;
    let problems = b.accessibility().await;
    assert!(problems.is_empty(), "axe on a connection: {problems:#?}");

    // The kill switch: a reason, a confirmation, a red banner everywhere.
    c.goto(&format!("{broker}/console")).await.unwrap();
    let reason = "<script>x</script> incident 42";
    type_into(c, "#pause-reason", reason).await;
    click(c, "#pause-confirm").await;
    click(c, "form.pause button").await;
    let red = waited(c, ".banner-red").await.text().await.unwrap();
    assert!(
        red.contains(reason) && red.contains("console:admin"),
        "{red}"
    );
    b.shot("console-paused").await;
    c.goto(&format!("{broker}/console/connections"))
        .await
        .unwrap();
    assert!(
        c.find(Locator::Css(".banner-red")).await.is_ok(),
        "on every page"
    );
    let paused = h
        .get(format!("{gateway}/v1/token/{}", ids[2]))
        .bearer_auth(&agent_key)
        .send()
        .await
        .unwrap();
    assert_eq!(paused.status().as_u16(), 423);
    let audit: Value = admin_json(
        &h,
        format!("{broker}/audit?event_type=issuance.paused"),
        &admin,
    )
    .await;
    assert_eq!(audit["events"][0]["actor"], "console:admin", "{audit}");
    c.goto(&format!("{broker}/console")).await.unwrap();
    click(c, "form[action='/console/pause'] button").await;
    for _ in 0..50 {
        if c.find(Locator::Css(".banner-red")).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        c.find(Locator::Css(".banner-red")).await.is_err(),
        "resumed"
    );

    // A provider from the catalogue: refused without its placeholder (the
    // secret not sent back), then added with it; the secret stays write-only.
    c.goto(&format!("{broker}/console/providers"))
        .await
        .unwrap();
    click(c, "#t-template option[value=shopify]").await;
    type_into(c, "#t-client-id", "shop-client").await;
    type_into(c, "#t-client-secret", CANARY).await;
    click(c, "form.add-provider button").await;
    let refused = waited(c, ".errors[role=alert]").await.text().await.unwrap();
    assert!(refused.contains("needs a value for shop"), "{refused}");
    assert!(
        !c.source().await.unwrap().contains(CANARY),
        "no secret sent back"
    );
    type_into(c, "#t-placeholders", "shop=my-store").await;
    type_into(c, "#t-client-secret", CANARY).await;
    click(c, "form.add-provider button").await;
    on_url_with(c, "added=shopify").await;
    let table = text_of(c, "table").await;
    assert!(table.contains("shopify oauth2 set"), "{table}");
    let id = admin_json(&h, format!("{broker}/providers/by-name/shopify"), &admin).await;
    let shop = admin_json(
        &h,
        format!("{broker}/providers/{}", id["id"].as_str().unwrap()),
        &admin,
    )
    .await;
    assert_eq!(
        shop["auth_url"], "https://my-store.myshopify.com/admin/oauth/authorize",
        "{shop}"
    );
    assert!(!shop.to_string().contains(CANARY));
    b.shot("console-providers").await;
    let problems = b.accessibility().await;
    assert!(problems.is_empty(), "axe on the providers: {problems:#?}");

    // Agent keys: made with the key shown once, then revoked (confirmed):
    // the gateway refuses it.
    c.goto(&format!("{broker}/console/agent-keys"))
        .await
        .unwrap();
    type_into(c, "#k-name", "reporting-bot").await;
    type_into(c, "#k-workspaces", "ws-a, ws-b").await;
    click(c, "form.new-key button").await;
    let key = waited(c, "#new-key")
        .await
        .prop("value")
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(key.starts_with("nxa_"), "{key}");
    let works = h
        .get(format!("{gateway}/v1/check-connection/{}", ids[1]))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(works.status().as_u16(), 200);
    b.shot("console-agent-keys").await;
    let problems = b.accessibility().await;
    assert!(problems.is_empty(), "axe on the agent keys: {problems:#?}");
    c.goto(&format!("{broker}/console/agent-keys"))
        .await
        .unwrap();
    assert!(!c.source().await.unwrap().contains(&key), "shown once");
    let key_id = b
        .js("return [...document.querySelectorAll('tbody tr')].find(r => r.textContent.includes('reporting-bot')).id.slice(4)")
        .await;
    let key_id = key_id.as_str().unwrap().to_string();
    click(c, &format!("#confirm-{key_id}")).await;
    click(c, &format!("#key-{key_id} button")).await;
    let mut state = String::new();
    for _ in 0..50 {
        if let Ok(el) = c.find(Locator::Css(&format!("#key-{key_id}"))).await {
            state = el.text().await.unwrap_or_default();
            if state.contains("revoked") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(state.contains("revoked"), "{state}");
    let mut refused = 0;
    for _ in 0..150 {
        // The gateway trusts a verified key for up to 10 s.
        let r = h
            .get(format!("{gateway}/v1/check-connection/{}", ids[1]))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        refused = r.status().as_u16();
        if refused == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(refused, 401, "a revoked key is refused");

    // The audit log: what the console did, a page at a time.
    c.goto(&format!("{broker}/console/audit?limit=5"))
        .await
        .unwrap();
    let first = text_of(c, "tbody").await;
    assert_eq!(
        b.js("return document.querySelectorAll('tbody tr').length")
            .await,
        5
    );
    click(c, "a[rel=next]").await;
    on_url_with(c, "before=").await;
    let second = text_of(c, "tbody").await;
    assert_ne!(first, second, "the next page holds older events");
    c.goto(&format!("{broker}/console/audit?type=agent_key.revoked"))
        .await
        .unwrap();
    let revoked = text_of(c, "tbody").await;
    assert!(
        revoked.contains("agent_key.revoked") && revoked.contains("console:admin"),
        "{revoked}"
    );
    b.shot("console-audit").await;
    let problems = b.accessibility().await;
    assert!(problems.is_empty(), "axe on the audit log: {problems:#?}");

    // A second session, outside the browser: the cookie's flags, a post
    // without the CSRF token, then signing out ends it.
    let second = console_link(tmp.path(), &broker).await;
    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let signed = no_redirect.get(&second).send().await.unwrap();
    assert_eq!(signed.status().as_u16(), 303);
    let set = signed.headers()["set-cookie"].to_str().unwrap().to_string();
    for part in [
        "nexus_console=nxs_",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console",
    ] {
        assert!(set.contains(part), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();
    let forged = no_redirect
        .post(format!("{broker}/console/pause"))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("action=pause&reason=x&confirm=yes")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 403, "no CSRF token");
    click(c, "form[action='/console/sign-out'] button").await;
    for _ in 0..50 {
        if c.find(Locator::Css("nav.console-nav")).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.goto(&format!("{broker}/console")).await.unwrap();
    let text = text_of(c, "main").await;
    assert!(text.contains("signed out"), "{text}");
    b.shot("console-signed-out").await;

    let _ = b.client.close().await;
    let logs = stop(child, "-TERM").await;
    assert!(!logs.contains(CANARY), "a key in the logs");
    assert!(
        !logs.contains(link.split("token=").nth(1).unwrap()),
        "a link's token in the logs"
    );
}

/// An operator signs in to the console through the organisation's OpenID
/// provider (the real `oidc-provider` peer): by e-mail on the allow-list,
/// by group, and refused when neither; a forged answer is refused; the
/// client secret never reaches the logs.
#[tokio::test]
async fn an_operator_signs_in_through_the_organisations_openid_provider() {
    let Some(b) = browser("an_operator_signs_in_through_the_organisations_openid_provider").await
    else {
        return;
    };
    const SECRET: &str = "console-client-secret-canary-4f1c0a";
    let port = free_port();
    let broker_addr = format!("127.0.0.1:{port}");
    let Some(idp) = nexus_testkit::OidcPeer::start(
        json!([{
            "client_id": "nexus-console",
            "client_secret": SECRET,
            "redirect_uris": [format!("http://{broker_addr}/console/sso/callback")],
            "token_endpoint_auth_method": "client_secret_basic",
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
            "scope": "openid email profile groups",
        }]),
        &[],
    )
    .await
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (child, broker, _gateway) = up_full(
        tmp.path(),
        &[
            ("NEXUS_LOG", "info"),
            ("BROKER_ADDR", &broker_addr),
            ("CONSOLE_OIDC_ISSUER", &idp.issuer),
            ("CONSOLE_OIDC_CLIENT_ID", "nexus-console"),
            ("CONSOLE_OIDC_CLIENT_SECRET", SECRET),
            ("CONSOLE_OIDC_SCOPES", "openid email groups"),
            ("CONSOLE_OPERATORS", "Alice@example.test"),
            ("CONSOLE_OPERATOR_GROUPS", "nexus-operators"),
            // The provider runs on loopback, a private address.
            ("EGRESS_ALLOWED_CIDRS", "127.0.0.1/32"),
        ],
        &[],
    )
    .await;
    let env = env_file(tmp.path());
    let admin = env_value(&env, "API_KEY");
    let h = http();
    let c = &b.client;

    // Signed out: the page offers single sign-on.
    c.goto(&format!("{broker}/console")).await.unwrap();
    let text = text_of(c, "main").await;
    assert!(text.contains("signed out"), "{text}");
    b.shot("console-sso-offered").await;
    let problems = b.accessibility().await;
    assert!(
        problems.is_empty(),
        "axe on the signed-out page: {problems:#?}"
    );
    c.find(Locator::LinkText("Sign in with single sign-on"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The provider (account "alice") consents on its own; back at the
    // broker, the session opens and the console shows who is signed in.
    on_page(c, "/console").await;
    let who = text_of(c, "body").await;
    assert!(who.contains("alice@example.test"), "{who}");
    assert_eq!(b.js("return document.cookie").await, "", "HttpOnly");
    b.shot("console-sso-signed-in").await;
    click(c, "form[action='/console/sign-out'] button").await;
    for _ in 0..50 {
        if c.find(Locator::Css("nav.console-nav")).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Someone the allow-list does not name is refused, with a page.
    c.goto(&format!("{broker}/console/sso?login_hint=mallory"))
        .await
        .unwrap();
    let refused = text_of(c, "main").await;
    assert!(
        refused.contains("mallory@example.test is not allowed"),
        "{refused}"
    );
    b.shot("console-sso-refused").await;
    let problems = b.accessibility().await;
    assert!(problems.is_empty(), "axe on the refusal: {problems:#?}");
    c.goto(&format!("{broker}/console")).await.unwrap();
    assert!(text_of(c, "main").await.contains("signed out"));

    // A member of the operators' group is let in.
    c.goto(&format!("{broker}/console/sso?login_hint=ops-bob"))
        .await
        .unwrap();
    on_page(c, "/console").await;
    assert!(text_of(c, "body").await.contains("ops-bob@example.test"));

    // Audited: who, how, and why they were let in; the refusal too.
    let signed = admin_json(
        &h,
        format!("{broker}/audit?event_type=console.signed_in"),
        &admin,
    )
    .await
    .to_string();
    assert!(
        signed.contains("console:alice@example.test") && signed.contains("group:nexus-operators"),
        "{signed}"
    );
    let refusals = admin_json(
        &h,
        format!("{broker}/audit?event_type=console.sign_in_refused"),
        &admin,
    )
    .await
    .to_string();
    assert!(refusals.contains("operator_not_allowed"), "{refusals}");

    // An answer that this browser did not start is refused.
    let forged = h
        .get(format!(
            "{broker}/console/sso/callback?code=abc&state=forged&iss={}",
            idp.issuer
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 400);
    let body: Value = forged.json().await.unwrap();
    assert_eq!(body["error"], "sso_state_invalid", "{body}");

    let _ = b.client.close().await;
    let logs = stop(child, "-TERM").await;
    assert!(!logs.contains(SECRET), "the client secret in the logs");
}

/// The whole story of a grant that loses a scope, with the real OpenID
/// provider: a person connects (consent at the provider); the operator
/// watches the console while the person withdraws a scope at the provider
/// and the agent's 403 is reported: the row turns `degraded` and the amber
/// banner appears without a reload. The operator hands the person the
/// reconnect link; the person reconnects in the portal, consents again, and
/// the connection is `active` with nothing failing. Then the operator
/// pauses the person's workspace: a red banner with the reason, and the
/// token API answers 423 for that workspace only.
#[tokio::test]
async fn an_operator_sees_a_grant_degrade_and_the_person_reconnects_at_the_real_provider() {
    let Some(b) =
        browser("an_operator_sees_a_grant_degrade_and_the_person_reconnects_at_the_real_provider")
            .await
    else {
        return;
    };
    let gateway_addr = format!("127.0.0.1:{}", free_port());
    let Some(idp) = nexus_testkit::OidcPeer::start(
        json!([{
            "client_id": "nexus",
            "client_secret": "nexus-secret",
            "redirect_uris": [format!("http://{gateway_addr}/auth/callback")],
            "token_endpoint_auth_method": "client_secret_post",
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "scope": "openid email offline_access calendar.read calendar.write",
        }]),
        &[],
    )
    .await
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (child, broker, gateway) = up_full(
        tmp.path(),
        &[
            ("NEXUS_LOG", "warn"),
            ("GATEWAY_ADDR", &gateway_addr),
            ("EGRESS_ALLOWED_CIDRS", "127.0.0.1/32"),
        ],
        &[],
    )
    .await;
    let env = env_file(tmp.path());
    let admin = env_value(&env, "API_KEY");
    let agent_key = crate::env_value_last(&env, "AGENT_KEY");
    let h = http();
    let r = h
        .post(format!("{broker}/providers"))
        .header("x-api-key", &admin)
        .json(&json!({"profile": {"name": "calendar", "auth_type": "oauth2",
            "client_id": "nexus", "client_secret": "nexus-secret", "issuer": idp.issuer,
            "enable_discovery": true, "scopes": ["openid", "email", "offline_access", "calendar.read"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{:?}", r.text().await);

    // The person connects: consent at the provider (account "alice").
    let back = return_page().await;
    let spec: Value = h
        .post(format!("{gateway}/v1/request-connection"))
        .bearer_auth(&agent_key)
        .json(&json!({"user_id": "ws-cal", "provider_name": "calendar", "return_url": back}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = spec["connection_id"].as_str().unwrap().to_string();
    let c = &b.client;
    c.goto(spec["authUrl"].as_str().unwrap()).await.unwrap();
    on_url_with(c, "status=success").await;
    let conn = admin_json(&h, format!("{broker}/connections/{id}"), &admin).await;
    assert_eq!(conn["status"], "active", "{conn}");

    // The operator watches the workspace's connections.
    let link = console_link(tmp.path(), &broker).await;
    c.goto(&link).await.unwrap();
    on_page(c, "/console").await;
    c.goto(&format!("{broker}/console/connections?workspace=ws-cal"))
        .await
        .unwrap();
    live(&b).await;

    // The person withdraws calendar.read at the provider; the agent's call
    // gets 403 and is reported (as the bridge and the sidecar do).
    let removed = idp.remove_scope("alice", "nexus", "calendar.read").await;
    assert_eq!(removed["updated"], 1, "{removed}");
    let report = h
        .post(format!("{broker}/connections/{id}/scope-failures"))
        .header("x-api-key", &admin)
        .json(&json!({"status": 403, "scopes": ["calendar.read"],
            "www_authenticate": "Bearer error=\"insufficient_scope\", scope=\"calendar.read\""}))
        .send()
        .await
        .unwrap();
    assert_eq!(report.status().as_u16(), 202, "{:?}", report.text().await);
    let row = format!("tr[data-id='{id}'] td.state[data-status='degraded']");
    waited(c, &row).await;
    let amber = waited(c, ".banner-amber").await.text().await.unwrap();
    assert!(amber.contains("1 connection needs a person"), "{amber}");
    assert_eq!(
        b.js("return window.nexusMarker").await,
        json!(1),
        "reloaded"
    );
    let cells = text_of(c, &format!("tr[data-id='{id}']")).await;
    assert!(cells.contains("calendar.read"), "{cells}");
    b.shot("console-degraded-live").await;

    // The reconnect link, handed to the person, opens the portal.
    c.find(Locator::LinkText(&id))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    on_page(c, &format!("/console/connections/{id}")).await;
    click(c, "form[action$='/reconnect-link'] button").await;
    let reconnect = waited(c, "#reconnect-url")
        .await
        .prop("value")
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(reconnect.starts_with(&gateway), "{reconnect}");
    c.goto(&reconnect).await.unwrap();
    on_page(c, "/connect").await;
    let text = text_of(c, "main").await;
    assert!(
        text.contains("calendar.read"),
        "the missing scope is named: {text}"
    );
    b.shot("portal-reconnect").await;
    let problems = b.accessibility().await;
    assert!(problems.is_empty(), "axe on the portal: {problems:#?}");
    click(c, "form[action='/connect/start'] button").await;
    // Consent at the provider again, then back in the portal.
    on_url_with(c, "status=success").await;
    let mut status = Value::Null;
    for _ in 0..50 {
        let conn = admin_json(&h, format!("{broker}/connections/{id}"), &admin).await;
        status = conn["status"].clone();
        if status == "active" {
            assert_eq!(conn["failing_scopes"], json!([]), "{conn}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "active");
    b.shot("portal-reconnected").await;

    // The operator sees it active, and pauses the workspace.
    c.goto(&format!("{broker}/console/connections/{id}"))
        .await
        .unwrap();
    let state = waited(c, "dd.state")
        .await
        .attr("data-status")
        .await
        .unwrap();
    assert_eq!(state.as_deref(), Some("active"));
    c.goto(&format!("{broker}/console")).await.unwrap();
    type_into(c, "#ws-pause-workspace", "ws-cal").await;
    type_into(c, "#ws-pause-reason", "<b>key</b> leak review").await;
    click(c, "#ws-pause-confirm").await;
    click(c, "form.pause-workspace button").await;
    let red = waited(c, ".banner-red").await.text().await.unwrap();
    assert!(
        red.contains("workspace ws-cal") && red.contains("<b>key</b> leak review"),
        "the reason shown as text: {red}"
    );
    b.shot("console-workspace-paused").await;
    let problems = b.accessibility().await;
    assert!(problems.is_empty(), "axe on the overview: {problems:#?}");
    let mut paused = 0;
    for _ in 0..50 {
        paused = h
            .get(format!("{gateway}/v1/token/{id}"))
            .bearer_auth(&agent_key)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if paused == 423 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(paused, 423, "the paused workspace's token");
    click(c, "form[action='/console/pause'] button.secondary").await;
    for _ in 0..50 {
        if c.find(Locator::Css(".banner-red")).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        c.find(Locator::Css(".banner-red")).await.is_err(),
        "resumed"
    );
    // A workspace id is text too.
    type_into(c, "#ws-pause-workspace", "<i>ws-x</i>").await;
    type_into(c, "#ws-pause-reason", "drill").await;
    click(c, "#ws-pause-confirm").await;
    click(c, "form.pause-workspace button").await;
    let red = waited(c, ".banner-red").await.text().await.unwrap();
    assert!(red.contains("workspace <i>ws-x</i>"), "{red}");

    let _ = b.client.close().await;
    let logs = stop(child, "-TERM").await;
    assert!(
        !logs.contains("nexus-secret"),
        "the client secret in the logs"
    );
}

/// The console's providers and webhooks: a provider opened from the list
/// and its profile edited (the secret write-only, a stale edit refused, the
/// form kept with the reason); a provider added from a typed profile; a
/// webhook delivery the broker gave up on (the receiver was down) retried
/// from the page once the receiver is back, and delivered.
#[tokio::test]
async fn an_operator_edits_a_provider_and_retries_a_webhook_delivery() {
    let Some(b) = browser("an_operator_edits_a_provider_and_retries_a_webhook_delivery").await
    else {
        return;
    };
    let receiver_port = free_port();
    let tmp = tempfile::tempdir().unwrap();
    let (child, broker, gateway) = up_full(
        tmp.path(),
        &[
            ("NEXUS_LOG", "warn"),
            ("EGRESS_ALLOWED_CIDRS", "127.0.0.1/32"),
            // Given up after the first failed attempt.
            ("WEBHOOK_MAX_AGE_SECS", "1"),
        ],
        &[],
    )
    .await;
    let env = env_file(tmp.path());
    let admin = env_value(&env, "API_KEY");
    let agent_key = crate::env_value_last(&env, "AGENT_KEY");
    let h = http();
    let hook: Value = h
        .post(format!("{broker}/webhooks"))
        .header("x-api-key", &admin)
        .json(&json!({"url": format!("http://127.0.0.1:{receiver_port}/hook")}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hook_id = hook["id"].as_str().expect("webhook id").to_string();
    let r = h
        .post(format!("{broker}/providers"))
        .header("x-api-key", &admin)
        .json(&json!({"profile": {"name": "weather", "auth_type": "header",
            "params": {"header_name": "X-Key", "credential_field": "api_key", "credential_schema":
                {"type": "object", "required": ["api_key"], "properties": {"api_key": {"type": "string"}}}}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let provider_id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let back = return_page().await;
    connect_by_api(&h, &gateway, &agent_key, "ws-a", "weather", &back).await;

    // Nobody listens: the delivery fails and is given up.
    let deliveries = format!("{broker}/webhooks/{hook_id}/deliveries");
    let mut given_up = false;
    for _ in 0..100 {
        let d = admin_json(&h, deliveries.clone(), &admin).await;
        if d["deliveries"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["status"] == "failed"))
        {
            given_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(given_up, "a delivery to a closed port is given up");

    let link = console_link(tmp.path(), &broker).await;
    let c = &b.client;
    c.goto(&link).await.unwrap();
    on_page(c, "/console").await;
    c.find(Locator::LinkText("Webhooks"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    on_page(c, "/console/webhooks").await;
    let row = text_of(c, "tr.delivery-failed").await;
    assert!(row.contains("connection."), "{row}");
    b.shot("console-webhooks-failed").await;
    let problems = b.accessibility().await;
    assert!(problems.is_empty(), "axe on the webhooks: {problems:#?}");

    // The receiver is back; the operator retries.
    let got = std::sync::Arc::new(std::sync::Mutex::new(0usize));
    let seen = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let seen = seen.clone();
            async move {
                *seen.lock().unwrap() += 1;
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", receiver_port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    click(c, "tr.delivery-failed form button").await;
    let note = waited(c, "[role=status].notice")
        .await
        .text()
        .await
        .unwrap();
    assert!(note.contains("Retrying"), "{note}");
    for _ in 0..100 {
        if *got.lock().unwrap() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(*got.lock().unwrap(), 1, "the retried delivery arrived");
    let mut delivered = false;
    for _ in 0..50 {
        c.goto(&format!("{broker}/console/webhooks")).await.unwrap();
        if c.find(Locator::Css("tr.delivery-delivered")).await.is_ok() {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(delivered, "the page shows it delivered");
    b.shot("console-webhooks-delivered").await;
    // Only given-up deliveries are retried.
    let again = h
        .post(format!(
            "{broker}/webhooks/{hook_id}/deliveries/no-such-message/retry"
        ))
        .header("x-api-key", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 404);

    // A provider, opened from the list, edited.
    c.goto(&format!("{broker}/console/providers"))
        .await
        .unwrap();
    c.find(Locator::LinkText("weather"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    on_page(c, &format!("/console/providers/{provider_id}")).await;
    let version: i64 = text_of(c, "dd.version").await.parse().unwrap();
    let profile: Value = serde_json::from_str(
        &waited(c, "#p-profile")
            .await
            .prop("value")
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert!(profile.get("client_secret").is_none(), "{profile}");
    let mut edited = profile.clone();
    edited["description"] = json!("<img src=x onerror=alert(1)> weather API");
    let field = waited(c, "#p-profile").await;
    field.clear().await.unwrap();
    field.send_keys(&edited.to_string()).await.unwrap();
    click(c, "form.edit-provider button").await;
    let note = waited(c, "[role=status].notice")
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(note, "Saved.");
    assert_eq!(
        text_of(c, "dd.version").await,
        (version + 1).to_string(),
        "a new version"
    );
    let stored = admin_json(&h, format!("{broker}/providers/{provider_id}"), &admin).await;
    assert_eq!(
        stored["description"], "<img src=x onerror=alert(1)> weather API",
        "{stored}"
    );
    b.shot("console-provider").await;
    let problems = b.accessibility().await;
    assert!(problems.is_empty(), "axe on a provider: {problems:#?}");

    // Someone else changes it meanwhile: this page's edit is refused.
    let r = h
        .patch(format!("{broker}/providers/{provider_id}"))
        .header("x-api-key", &admin)
        .json(&json!({"profile": {"description": "changed elsewhere"}}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
    click(c, "form.edit-provider button").await;
    let error = waited(c, ".errors").await.text().await.unwrap();
    assert!(error.contains("Not saved"), "{error}");
    let stored = admin_json(&h, format!("{broker}/providers/{provider_id}"), &admin).await;
    assert_eq!(stored["description"], "changed elsewhere");

    // A provider from a typed profile, its secret write-only.
    c.goto(&format!("{broker}/console/providers"))
        .await
        .unwrap();
    let typed = json!({"name": "search", "auth_type": "header",
        "params": {"header_name": "X-Search-Key", "credential_field": "key", "credential_schema":
            {"type": "object", "required": ["key"], "properties": {"key": {"type": "string"}}}}});
    let field = waited(c, "#n-profile").await;
    field.clear().await.unwrap();
    field.send_keys(&typed.to_string()).await.unwrap();
    click(c, "form.add-profile button").await;
    let note = waited(c, "[role=status].notice")
        .await
        .text()
        .await
        .unwrap();
    assert!(note.contains("Added search"), "{note}");
    let field = waited(c, "#n-profile").await;
    field.clear().await.unwrap();
    field.send_keys("{\"name\": ").await.unwrap();
    click(c, "form.add-profile button").await;
    let error = waited(c, ".errors").await.text().await.unwrap();
    assert!(error.contains("not JSON"), "{error}");

    let _ = b.client.close().await;
    let logs = stop(child, "-TERM").await;
    assert!(!logs.contains(CANARY), "a key in the logs");
}
