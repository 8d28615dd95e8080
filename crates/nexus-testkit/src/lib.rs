//! Test support shared by the crates' integration tests: the real OpenID
//! provider peer (panva's `oidc-provider` from npm, tests/peers/oidc-provider)
//! and a browser that follows its redirects.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

pub mod certs;
pub mod mcp;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use url::Url;

pub struct OidcPeer {
    pub issuer: String,
    _child: Child,
}

fn peer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/peers/oidc-provider")
}

fn skip_or_fail(reason: &str) -> Option<OidcPeer> {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but the OpenID provider peer cannot run: {reason}");
    }
    eprintln!("skipped: real OpenID provider test ({reason}; run `npm ci --prefix tests/peers/oidc-provider`)");
    None
}

impl OidcPeer {
    /// Starts the provider with `clients` (oidc-provider client metadata).
    pub async fn start(clients: Value, extra_env: &[(&str, &str)]) -> Option<OidcPeer> {
        let dir = peer_dir();
        if !dir.join("node_modules/oidc-provider").exists() {
            return skip_or_fail("tests/peers/oidc-provider/node_modules is missing");
        }
        let mut cmd = Command::new("node");
        cmd.arg("server.mjs")
            .current_dir(&dir)
            .env("PORT", "0")
            .env("CLIENTS", clients.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return skip_or_fail(&format!("cannot run node: {e}")),
        };
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("provider ready in time")
            .unwrap()
            .expect("ready line");
        let ready: Value = serde_json::from_str(&line).unwrap();
        Some(OidcPeer {
            issuer: ready["issuer"].as_str().unwrap().to_string(),
            _child: child,
        })
    }

    /// The person `sub` withdraws `scope` from the grants of `client_id`
    /// (partial revocation); the provider's answer (`updated`: how many).
    pub async fn remove_scope(&self, sub: &str, client_id: &str, scope: &str) -> Value {
        reqwest::Client::new()
            .post(format!("{}/__admin/remove-scope", self.issuer))
            .json(&json!({"sub": sub, "client_id": client_id, "scope": scope}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// The person `sub` revokes every grant of `client_id` at the provider
    /// (as from its account page); how many grants went.
    pub async fn revoke_grant(&self, sub: &str, client_id: &str) -> u64 {
        let answer: Value = reqwest::Client::new()
            .post(format!("{}/__admin/revoke-grant", self.issuer))
            .json(&json!({"sub": sub, "client_id": client_id}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["revoked"].as_u64().unwrap_or(0)
    }

    pub async fn stats(&self) -> Value {
        reqwest::get(format!("{}/__admin/stats", self.issuer))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// A free loopback port (for a server whose URL must be known before it starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A browser: keeps cookies, follows nothing by itself.
pub fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Follows the provider's redirects (login and consent complete on their own)
/// until the broker's callback answers; returns where the broker sends the browser.
pub async fn consent(browser: &reqwest::Client, auth_url: &str, broker_base: &str) -> Url {
    let mut url = Url::parse(auth_url).unwrap();
    for _ in 0..10 {
        let resp = browser.get(url.clone()).send().await.unwrap();
        let status = resp.status();
        let location = resp
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_string());
        let Some(location) = location else {
            panic!(
                "{status} without a redirect at {url}: {}",
                resp.text().await.unwrap_or_default()
            );
        };
        let next = url.join(&location).unwrap();
        if url.as_str().starts_with(broker_base) {
            // The broker's callback answered: this is the return URL.
            return next;
        }
        url = next;
    }
    panic!("too many redirects");
}

/// oidc-provider client metadata for `id` (secret `<id>-secret`) with the
/// scopes the peer knows.
pub fn client(id: &str, auth: &str, redirect_uri: &str) -> Value {
    json!({
        "client_id": id, "client_secret": format!("{id}-secret"), "redirect_uris": [redirect_uri],
        "token_endpoint_auth_method": auth, "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"], "scope": "openid email profile offline_access calendar.read calendar.write"
    })
}

/// A query parameter of `url`.
pub fn q(url: &Url, k: &str) -> Option<String> {
    url.query_pairs()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.into_owned())
}

/// Checks an OpenAPI document with `openapi-spec-validator` (PyPI), an
/// independent implementation of the specification. Skipped with one line
/// when it is not installed, except under CI (`.ci/run` installs it).
pub fn validate_openapi(doc: &Value) {
    let path = std::env::temp_dir().join(format!(
        "nexus-openapi-{}-{:?}.json",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, doc.to_string()).unwrap();
    let out = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output();
    let _ = std::fs::remove_file(&path);
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named") => {
            if ci {
                panic!("CI=true but openapi-spec-validator is not installed (pip install openapi-spec-validator)");
            }
            eprintln!("skipped: OpenAPI validation (pip install openapi-spec-validator to run it)");
        }
        Ok(o) => panic!(
            "the OpenAPI document is invalid:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            if ci {
                panic!("CI=true but python3 cannot run: {e}");
            }
            eprintln!("skipped: OpenAPI validation (python3: {e})");
        }
    }
}

/// Every operation of an OpenAPI document, as (method, path with each
/// `{param}` replaced by `x`).
pub fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        let concrete: String = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "x" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for method in ops.as_object().unwrap().keys() {
            out.push((method.to_ascii_uppercase(), concrete.clone()));
        }
    }
    out
}

/// Throughput and latency of one load run.
pub struct Figures {
    pub rate: f64,
    pub p50: Duration,
    pub p99: Duration,
}

/// The benchmarks' load: `clients` tasks drive `urls` round-robin over
/// keep-alive connections for `run`, each request carrying `header`; every
/// answer must be 200. The URLs are fetched once first (warm-up).
pub async fn load(
    urls: std::sync::Arc<Vec<String>>,
    header: (&str, &str),
    clients: usize,
    run: Duration,
) -> Figures {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .expect("client");
    let (name, value) = (header.0.to_string(), header.1.to_string());
    for u in urls.iter() {
        let r = client
            .get(u)
            .header(&name, &value)
            .send()
            .await
            .expect("warm-up");
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }
    let start = std::time::Instant::now();
    let deadline = start + run;
    let mut tasks = Vec::new();
    for t in 0..clients {
        let (client, urls, name, value) =
            (client.clone(), urls.clone(), name.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = t;
            while std::time::Instant::now() < deadline {
                let s = std::time::Instant::now();
                let r = client
                    .get(&urls[i % urls.len()])
                    .header(&name, &value)
                    .send()
                    .await
                    .expect("request");
                assert_eq!(r.status(), 200);
                r.bytes().await.expect("body");
                lat.push(s.elapsed());
                i += clients;
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("task"));
    }
    let took = start.elapsed();
    lat.sort();
    Figures {
        rate: lat.len() as f64 / took.as_secs_f64(),
        p50: lat[lat.len() / 2],
        p99: lat[(lat.len() as f64 * 0.99) as usize],
    }
}
