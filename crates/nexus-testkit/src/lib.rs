//! Test support shared by the crates' integration tests: the real OpenID
//! provider peer (panva's `oidc-provider` from npm, tests/peers/oidc-provider)
//! and a browser that follows its redirects.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

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
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
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

    pub async fn stats(&self) -> Value {
        reqwest::get(format!("{}/__admin/stats", self.issuer))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
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
