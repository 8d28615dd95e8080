//! Tests of the `nexus` binary itself: what a newcomer and an operator run.

mod browser;
mod deploy;
mod mcp_conformance;
mod operate;
mod providers;
mod schemathesis;
mod soak;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nexus_broker::config::{BrokerConfig, Settings};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_nexus");

/// An HTTP client for talking to the spawned binary. The test process needs
/// its one rustls provider, as the binary installs its own at start-up.
fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// Runs a Python script of the repository (`path` from its root) with
/// `args`; `None` (after one line, outside CI) when python3 cannot run.
async fn python(path: &str, args: &[&str], test: &str) -> Option<std::process::Output> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new("python3")
        .arg(format!("{root}/{path}"))
        .args(args)
        .current_dir(root)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    match out {
        Ok(o) => Some(o),
        Err(e) => {
            assert!(
                !std::env::var("CI").is_ok_and(|v| v == "true"),
                "CI=true but python3 cannot run: {e}"
            );
            eprintln!("skipped: {test} (python3: {e})");
            None
        }
    }
}

/// The binary with a clean environment: only what the test passes in.
fn nexus(dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Starts `nexus up` and waits (bounded) for the line with the broker URL.
async fn up(dir: &Path, extra_env: &[(&str, &str)]) -> (Child, String) {
    up_with(dir, extra_env, &[]).await
}

async fn up_with(dir: &Path, extra_env: &[(&str, &str)], extra_args: &[&str]) -> (Child, String) {
    let (child, broker, _) = up_full(dir, extra_env, extra_args).await;
    (child, broker)
}

/// Starts `nexus up`; the child, the broker URL and the gateway URL.
async fn up_full(
    dir: &Path,
    extra_env: &[(&str, &str)],
    extra_args: &[&str],
) -> (Child, String, String) {
    let (child, broker, gateway, _) = up_printed(dir, extra_env, extra_args).await;
    (child, broker, gateway)
}

/// [`up_full`], and the one-time console link `nexus up` printed.
async fn up_printed(
    dir: &Path,
    extra_env: &[(&str, &str)],
    extra_args: &[&str],
) -> (Child, String, String, String) {
    let mut cmd = nexus(dir);
    cmd.args(["up", "--state-dir", "state"]);
    // A test that must know an address first (a redirect URI registered at
    // a provider) gives BROKER_ADDR or GATEWAY_ADDR; else any free port.
    for (var, flag) in [
        ("BROKER_ADDR", "--broker-addr"),
        ("GATEWAY_ADDR", "--gateway-addr"),
    ] {
        if !extra_env.iter().any(|(k, _)| *k == var) {
            cmd.args([flag, "127.0.0.1:0"]);
        }
    }
    cmd.args(extra_args).env("NEXUS_LOG", "trace");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn nexus up");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let (gateway, url, console) = tokio::time::timeout(Duration::from_secs(30), async {
        let (mut gateway, mut url, mut console) = (String::new(), String::new(), String::new());
        let first = |rest: &str| rest.split_whitespace().next().expect("url").to_string();
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("gateway") {
                gateway = first(rest);
            } else if let Some(rest) = line.strip_prefix("broker API") {
                url = first(rest);
            } else if let Some(rest) = line.strip_prefix("console") {
                console = first(rest);
            } else if line.starts_with("Stop with Ctrl-C") {
                assert!(!url.is_empty(), "nexus up printed no broker URL");
                return (gateway, url, console);
            }
        }
        panic!("nexus up exited before it was ready");
    })
    .await
    .expect("nexus up printed its URLs in time");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, url, gateway, console)
}

/// Sends a signal and waits (bounded) for a clean exit; returns stderr.
async fn stop(mut child: Child, signal: &str) -> String {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut stderr = child.stderr.take().expect("stderr");
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    let mut err = String::new();
    stderr.read_to_string(&mut err).await.unwrap();
    assert!(exit.success(), "exit {exit:?}; stderr:\n{err}");
    err
}

fn env_file(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("state/nexus.env")).expect("nexus.env")
}

fn env_value(text: &str, name: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} in nexus.env"))
        .to_string()
}

#[tokio::test]
async fn up_starts_from_nothing_and_reuses_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let canary = "canary-up-client-secret-31c9";
    let (child, url) = up(tmp.path(), &[]).await;
    let http = http();
    let health: Value = http
        .get(format!("{url}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health, json!({"status": "ok"}));

    let env = env_file(tmp.path());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(tmp.path().join("state/nexus.env"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let key = env_value(&env, "API_KEY");
    let resp = http
        .post(format!("{url}/providers"))
        .header("x-api-key", &key)
        .json(&json!({"profile": {"name": "google", "auth_type": "oauth2", "client_id": "cid", "client_secret": canary,
            "issuer": "https://accounts.google.com", "enable_discovery": true, "scopes": ["openid"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let stderr = stop(child, "-INT").await;
    assert!(
        stderr.contains("route=/providers"),
        "request logs are on stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains(canary),
        "the client secret reached the logs"
    );
    for f in std::fs::read_dir(tmp.path().join("state")).unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap();
        assert!(!bytes.windows(canary.len()).any(|w| w == canary.as_bytes()));
    }

    // Second run: same keys, same data; SIGTERM also stops it cleanly.
    let (child, url) = up(tmp.path(), &[]).await;
    assert_eq!(env_file(tmp.path()), env);
    let list: Value = http
        .get(format!("{url}/providers"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["name"], "google");
    stop(child, "-TERM").await;

    // An explicit environment variable wins over the state folder.
    let (child, url) = up(
        tmp.path(),
        &[("API_KEY", "an-explicit-admin-key-from-env-1234")],
    )
    .await;
    let status = http
        .get(format!("{url}/providers"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 401);
    let status = http
        .get(format!("{url}/providers"))
        .header("x-api-key", "an-explicit-admin-key-from-env-1234")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 200);
    stop(child, "-INT").await;
}

async fn broker_fails_with(env: &[(&str, &str)]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = nexus(tmp.path());
    cmd.arg("broker").env("BROKER_ADDR", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success(), "broker must refuse to start");
    let err = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, got:\n{err}");
    lines[0].to_string()
}

#[tokio::test]
async fn bad_keys_stop_startup_with_one_line_naming_the_variable() {
    let good_key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let base = [
        ("DATABASE_URL", "sqlite:nexus.db"),
        ("ENCRYPTION_KEY", good_key),
        ("STATE_KEY", good_key),
        ("API_KEY", "an-admin-key-long-enough-123"),
    ];
    let with = |k: &'static str, v: &'static str| -> Vec<(&'static str, &'static str)> {
        base.iter()
            .map(|(bk, bv)| if *bk == k { (*bk, v) } else { (*bk, *bv) })
            .filter(|(_, v)| !v.is_empty())
            .collect()
    };
    let line = broker_fails_with(&with("ENCRYPTION_KEY", "c2hvcnQ=")).await;
    assert!(
        line.contains("ENCRYPTION_KEY") && line.contains("32 bytes"),
        "{line}"
    );
    let line = broker_fails_with(&with("ENCRYPTION_KEY", "not base64 at all!")).await;
    assert!(
        line.contains("ENCRYPTION_KEY") && line.contains("base64"),
        "{line}"
    );
    let line = broker_fails_with(&with("ENCRYPTION_KEY", "")).await;
    assert!(
        line.contains("ENCRYPTION_KEY") && line.contains("not set"),
        "{line}"
    );
    let line = broker_fails_with(&with("STATE_KEY", "")).await;
    assert!(line.contains("STATE_KEY"), "{line}");
    let line = broker_fails_with(&with("API_KEY", "short")).await;
    assert!(line.contains("API_KEY"), "{line}");
    let mut ring = with("ENCRYPTION_KEY", "");
    ring.push(("ENCRYPTION_KEYS", "k1=nope"));
    let line = broker_fails_with(&ring).await;
    assert!(line.contains("ENCRYPTION_KEYS"), "{line}");
    // The bad value itself is never printed.
    let line = broker_fails_with(&with("ENCRYPTION_KEY", "c2VjcmV0LWJ1dC1zaG9ydA==")).await;
    assert!(!line.contains("c2VjcmV0LWJ1dC1zaG9ydA=="), "{line}");
}

#[tokio::test]
async fn keys_generate_prints_keys_the_broker_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = nexus(tmp.path())
        .args(["keys", "generate"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let settings = Settings {
        database_url: Some("sqlite::memory:".into()),
        encryption_key: Some(env_value(&text, "ENCRYPTION_KEY")),
        state_key: Some(env_value(&text, "STATE_KEY")),
        api_key: Some(env_value(&text, "API_KEY")),
        // The webhook secret works with any endpoint URL.
        webhook_url: Some("https://hooks.example.test/nexus".into()),
        webhook_secret: Some(env_value(&text, "WEBHOOK_SECRET")),
        ..Default::default()
    };
    BrokerConfig::from_settings(&settings).expect("generated keys are valid");
    let again = nexus(tmp.path())
        .args(["keys", "generate"])
        .output()
        .await
        .unwrap();
    assert_ne!(
        String::from_utf8(again.stdout).unwrap(),
        text,
        "fresh keys every time"
    );
}

async fn rewrap_cmd(dir: &Path) -> (bool, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        nexus(dir)
            .args(["keys", "rewrap", "--state-dir", "state"])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[tokio::test]
async fn rotate_then_rewrap_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, url) = up(tmp.path(), &[]).await;
    let key = env_value(&env_file(tmp.path()), "API_KEY");
    let http = http();
    for name in ["a", "b", "c"] {
        let resp = http
            .post(format!("{url}/providers"))
            .header("x-api-key", &key)
            .json(&json!({"profile": {"name": name, "auth_type": "oauth2", "client_id": "cid", "client_secret": format!("s-{name}"),
                "auth_url": "https://idp.example/auth", "token_url": "https://idp.example/token"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
    }
    stop(child, "-INT").await;

    // Rotate: a new active key in front of the old one.
    let env = env_file(tmp.path());
    let old = env_value(&env, "ENCRYPTION_KEY");
    let generated = nexus(tmp.path())
        .args(["keys", "generate"])
        .output()
        .await
        .unwrap();
    let new_key = env_value(
        &String::from_utf8(generated.stdout).unwrap(),
        "ENCRYPTION_KEY",
    );
    std::fs::write(
        tmp.path().join("state/nexus.env"),
        format!("{env}ENCRYPTION_KEYS=k2:{new_key},default:{old}\n"),
    )
    .unwrap();
    let (ok, out, err) = rewrap_cmd(tmp.path()).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("rewrapped 3 secret(s) to key 'k2'"), "{out}");
    let (ok, out, _) = rewrap_cmd(tmp.path()).await;
    assert!(ok && out.contains("rewrapped 0"), "{out}");

    // Drop the old key: nothing is left on it, so nothing fails.
    std::fs::write(
        tmp.path().join("state/nexus.env"),
        format!("{env}ENCRYPTION_KEYS=k2:{new_key}\n"),
    )
    .unwrap();
    let (ok, out, err) = rewrap_cmd(tmp.path()).await;
    assert!(ok, "{out}{err}");

    // Had a row stayed behind, a ring without its key says so and fails.
    let other = nexus(tmp.path())
        .args(["keys", "generate"])
        .output()
        .await
        .unwrap();
    let other_key = env_value(&String::from_utf8(other.stdout).unwrap(), "ENCRYPTION_KEY");
    std::fs::write(
        tmp.path().join("state/nexus.env"),
        format!("{env}ENCRYPTION_KEYS=k3:{other_key}\n"),
    )
    .unwrap();
    let (ok, _, err) = rewrap_cmd(tmp.path()).await;
    assert!(!ok);
    assert!(err.contains("no key with id 'k2'"), "{err}");
    assert!(err.contains("3 secret(s) could not be decrypted"), "{err}");
}

#[tokio::test]
async fn migrate_applies_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let out = nexus(tmp.path())
            .args(["migrate", "--database-url", "sqlite:m.db"])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8(out.stdout)
            .unwrap()
            .contains("migrations applied"));
    }
    let out = nexus(tmp.path())
        .args(["migrate", "--database-url", "mysql://x"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("DATABASE_URL"));
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, url) = up_with(tmp.path(), &[], &["--log-format", "json"]).await;
    http().get(format!("{url}/health")).send().await.unwrap();
    let stderr = stop(child, "-INT").await;
    let mut saw_request = false;
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        if v["fields"]["route"] == "/health" {
            saw_request = true;
            assert_eq!(v["fields"]["status"], 200);
        }
    }
    assert!(saw_request, "{stderr}");
}

#[tokio::test]
async fn up_runs_the_gateway_with_a_development_agent_key_and_agents_commands_work() {
    let tmp = tempfile::tempdir().unwrap();
    let (child, broker, gateway) = up_full(tmp.path(), &[], &[]).await;
    let http = http();
    let env = env_file(tmp.path());
    let dev_key = env_value(&env, "AGENT_KEY");
    assert!(dev_key.starts_with("nxa_"));
    // The gateway holds its own key, not the admin one.
    let gateway_key = env_value(&env, "GATEWAY_API_KEY");
    assert!(gateway_key.len() >= 24 && gateway_key != env_value(&env, "API_KEY"));
    let ok = http
        .get(format!("{gateway}/v1/providers"))
        .bearer_auth(&dev_key)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let no = http
        .get(format!("{gateway}/v1/providers"))
        .send()
        .await
        .unwrap();
    assert_eq!(no.status().as_u16(), 401);
    let body: Value = no.json().await.unwrap();
    assert_eq!(body["error"], "missing_agent_key");

    let agents = |args: &[&str]| {
        let mut c = nexus(tmp.path());
        c.args(["agents"])
            .args(args)
            .args(["--state-dir", "state", "--broker-url", &broker]);
        c.output()
    };
    let out = agents(&[
        "create",
        "--workspace",
        "w1",
        "--workspace",
        "w2",
        "--name",
        "bot",
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("nxa_"), "{key}");
    let ok = http
        .get(format!("{gateway}/v1/workspaces/w2/connections/status"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let out = agents(&["list"]).await.unwrap();
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(listed.contains("bot") && !listed.contains(&key), "{listed}");
    let id = listed
        .lines()
        .find(|l| l.contains("bot"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let out = agents(&["revoke", &id]).await.unwrap();
    assert!(out.status.success());
    let out = agents(&["revoke", &id]).await.unwrap();
    assert!(!out.status.success(), "revoking twice is an error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
    // A second start reuses the development key.
    let stderr = stop(child, "-TERM").await;
    assert!(
        !stderr.contains(&dev_key) && !stderr.contains(&key),
        "keys never logged"
    );
    let (child, _, gateway) = up_full(tmp.path(), &[], &[]).await;
    assert_eq!(env_value(&env_file(tmp.path()), "AGENT_KEY"), dev_key);
    let ok = http
        .get(format!("{gateway}/v1/providers"))
        .bearer_auth(&dev_key)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    stop(child, "-TERM").await;
    // A database reset leaves AGENT_KEY unknown: the next start makes a new one.
    std::fs::remove_file(tmp.path().join("state/nexus.db")).unwrap();
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(tmp.path().join(format!("state/nexus.db{ext}")));
    }
    let (child, _, gateway) = up_full(tmp.path(), &[], &[]).await;
    let fresh = env_value_last(&env_file(tmp.path()), "AGENT_KEY");
    assert_ne!(fresh, dev_key);
    let ok = http
        .get(format!("{gateway}/v1/providers"))
        .bearer_auth(&fresh)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    stop(child, "-TERM").await;
}

/// The last `NAME=` line (later lines win, as the state folder reads them).
fn env_value_last(text: &str, name: &str) -> String {
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{name} in nexus.env"))
        .to_string()
}

/// `nexus sidecar` beside `nexus up`: the access log has one line per
/// request without the query, and a canary credential appears in no log
/// line of either process, no answer and no metric.
#[tokio::test]
async fn the_sidecar_binary_proxies_and_logs_no_secret() {
    const CANARY: &str = "CANARY-sidecar-cli-5b1e";
    let tmp = tempfile::tempdir().unwrap();
    let (up_child, broker, gateway) = up_full(tmp.path(), &[], &[]).await;
    let http = http();
    let env = env_file(tmp.path());
    let admin = env_value(&env, "API_KEY");
    let agent_key = env_value_last(&env, "AGENT_KEY");
    let created = http
        .post(format!("{broker}/providers"))
        .header("x-api-key", &admin)
        .json(&json!({"profile": {"name": "self", "auth_type": "header", "params": {
            "header_name": "X-Canary-Key", "credential_field": "api_key",
            "credential_schema": {"type": "object", "required": ["api_key"], "properties": {"api_key": {"type": "string"}}}
        }}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let spec: Value = http
        .post(format!("{gateway}/v1/request-connection"))
        .bearer_auth(&agent_key)
        .json(&json!({"user_id": "w1", "provider_name": "self", "return_url": "http://localhost:3000/done"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let captured = http
        .post(format!("{gateway}/auth/capture-credential"))
        .json(&json!({"state": spec["state"], "credentials": {"api_key": CANARY}}))
        .send()
        .await
        .unwrap();
    assert!(captured.status().is_success());
    // The gateway itself is the upstream: it answers /health.
    std::fs::write(
        tmp.path().join("routes.toml"),
        format!("[routes.gw]\nupstream = \"{gateway}\"\nworkspace = \"w1\"\nprovider = \"self\"\n"),
    )
    .unwrap();
    let port = free_port();
    let mut sidecar = nexus(tmp.path())
        .args(["sidecar", "--gateway-url", &gateway])
        .args(["--sidecar-addr", &format!("127.0.0.1:{port}")])
        .args(["--sidecar-routes-file", "routes.toml"])
        .env("AGENT_KEY", &agent_key)
        .env("NEXUS_LOG", "trace")
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut ready = None;
    for _ in 0..100 {
        if let Ok(r) = http.get(format!("{base}/_nexus/ready")).send().await {
            ready = Some(r.status().as_u16());
            if r.status().is_success() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, Some(200));
    let mut seen = String::new();
    for path in [
        "/gw/health?note=QUERY-NOT-LOGGED",
        "/gw/v1/providers",
        "/none/x",
        "/_nexus/metrics",
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        seen += &format!("{:?}", r.headers());
        seen += &r.text().await.unwrap();
    }
    assert!(
        seen.contains("\"status\":\"ok\""),
        "the gateway's /health through the sidecar: {seen}"
    );
    assert!(seen.contains("unknown_route"));
    assert!(!seen.contains(CANARY), "the canary reached the agent");
    let pid = sidecar.id().unwrap().to_string();
    let mut stdout = sidecar.stdout.take().unwrap();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(20), sidecar.wait())
        .await
        .unwrap()
        .unwrap();
    let mut logs = String::new();
    sidecar
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    stdout.read_to_string(&mut logs).await.unwrap();
    assert!(exit.success(), "{logs}");
    let access: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("nexus_sidecar::access"))
        .collect();
    // Probes of /_nexus/... are not logged (a kubelet asks every few seconds).
    assert_eq!(
        access.len(),
        3,
        "one access line per proxied request:\n{logs}"
    );
    assert!(
        access.iter().any(|l| l.contains("route=gw")
            && l.contains("path=/gw/health")
            && l.contains("status=200")),
        "{access:?}"
    );
    assert!(
        !logs.contains("QUERY-NOT-LOGGED"),
        "a query string in the logs"
    );
    assert!(!logs.contains(CANARY), "the canary in the sidecar's logs");
    assert!(
        !logs.contains(&agent_key),
        "the agent key in the sidecar's logs"
    );
    let up_logs = stop(up_child, "-TERM").await;
    assert!(!up_logs.contains(CANARY), "the canary in nexus up's logs");
}

/// Whether each tool runs (`tool --version`); outside CI a missing one
/// skips `test` with one line, under CI it fails.
fn tools_present(tools: &[&str], test: &str) -> bool {
    for tool in tools {
        if std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "CI=true but {tool} is missing"
            );
            eprintln!("skipped: {test} ({tool} is missing)");
            return false;
        }
    }
    true
}

fn run(cmd: &mut std::process::Command) -> (bool, String) {
    let out = cmd.output().expect("runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The SHA-256 fingerprint of the certificate `addr` presents (openssl).
fn presented(addr: &str, ca: &Path, extra: &[&str]) -> (bool, String) {
    let script = format!(
        "openssl s_client -connect {addr} -servername localhost -CAfile {} {} </dev/null 2>&1",
        ca.display(),
        extra.join(" ")
    );
    run(std::process::Command::new("sh").args(["-c", &script]))
}

/// `nexus certs dev` and `nexus up --tls`: curl and openssl (from Debian,
/// not our code) talk TLS 1.2+ with ALPN h2 and http/1.1 to both servers;
/// replaced certificates are served to new connections after SIGHUP while
/// an open connection keeps working; a bad new pair is refused and the
/// previous one kept; bad pairs stop a start with the variable named.
#[tokio::test]
async fn tls_with_development_certificates_reloads_without_dropping_connections() {
    if !tools_present(&["curl", "openssl"], "TLS test") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Info, not trace: stderr is read only at the end, and a full pipe would
    // stall the server.
    let (child, broker, gateway) = up_full(tmp.path(), &[("NEXUS_LOG", "info")], &["--tls"]).await;
    assert!(
        gateway.starts_with("https://") && broker.starts_with("https://"),
        "{gateway} {broker}"
    );
    let ca = tmp.path().join("state/certs/ca.pem");
    for base in [&gateway, &broker] {
        let (ok, out) = run(std::process::Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(&ca)
            .arg(format!("{base}/health")));
        assert!(ok && out.contains("\"ok\""), "{base}: {out}");
        // Without the development CA: refused by curl's verification.
        let (ok, _) =
            run(std::process::Command::new("curl").args(["-sS", &format!("{base}/health")]));
        assert!(!ok);
    }
    let gaddr = gateway.trim_start_matches("https://");
    let (ok, out) = presented(gaddr, &ca, &["-alpn", "h2,http/1.1"]);
    assert!(
        ok && out.contains("ALPN protocol: h2") && out.contains("Verify return code: 0 (ok)"),
        "{out}"
    );
    let (_, out) = presented(gaddr, &ca, &["-alpn", "http/1.1", "-tls1_2"]);
    assert!(
        out.contains("ALPN protocol: http/1.1") && out.contains("TLSv1.2"),
        "{out}"
    );
    let (_, out) = presented(gaddr, &ca, &["-tls1_1"]);
    assert!(out.contains("Cipher is (NONE)"), "TLS 1.1 refused: {out}");
    // An IP address sent as SNI (wrk and other OpenSSL clients do): served,
    // and no log line per handshake (checked at the end).
    let (_, out) = run(std::process::Command::new("sh").args([
        "-c",
        &format!(
            "openssl s_client -connect {gaddr} -servername 127.0.0.1 -CAfile {} </dev/null 2>&1",
            ca.display()
        ),
    ]));
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    // gRPC over TLS from Python's grpcio (ALPN h2 on the shared port).
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/grpc_tls.py");
    let grpc_key = env_value_last(&env_file(tmp.path()), "AGENT_KEY");
    let (ok, out) = run(std::process::Command::new("python3")
        .arg(script)
        .arg(gaddr)
        .arg(&ca)
        .arg(&grpc_key)
        .arg("no-such-connection"));
    if out.contains("No module named 'grpc'") && std::env::var("CI").map_or(true, |v| v != "true") {
        eprintln!("skipped: grpcio over TLS (pip install -r crates/nexus-cli/tests/data/requirements.txt)");
    } else {
        assert!(ok, "grpcio over TLS: {out}");
        let answer: Value = serde_json::from_str(out.trim()).expect(&out);
        assert_eq!(answer["1"], "failed", "{answer}");
        assert_eq!(answer["2"], "not_found", "{answer}");
    }
    // The sidecar: HTTPS itself (its development certificate), and the
    // gateway's TLS trusted through GATEWAY_CA_FILE (without it, unreachable).
    let certs = tmp.path().join("state/certs");
    std::fs::write(
        tmp.path().join("tls-routes.toml"),
        "[routes.api]\nupstream = \"https://127.0.0.1:9\"\nworkspace = \"nobody\"\nprovider = \"none\"\n",
    )
    .unwrap();
    let agent_key = env_value_last(&env_file(tmp.path()), "AGENT_KEY");
    for (trust, expected) in [
        (true, "connection_not_found"),
        (false, "gateway_unreachable"),
    ] {
        let port = free_port();
        let mut cmd = nexus(tmp.path());
        cmd.args([
            "sidecar",
            "--gateway-url",
            &gateway,
            "--sidecar-routes-file",
            "tls-routes.toml",
        ])
        .args(["--sidecar-addr", &format!("127.0.0.1:{port}")])
        .args([
            "--tls-cert-file",
            "state/certs/sidecar.pem",
            "--tls-key-file",
            "state/certs/sidecar-key.pem",
        ])
        .env("AGENT_KEY", &agent_key)
        .env("NEXUS_LOG", "warn");
        if trust {
            cmd.args(["--gateway-ca-file", "state/certs/ca.pem"]);
        }
        let mut sidecar = cmd.spawn().unwrap();
        let mut ready = String::new();
        for _ in 0..50 {
            let (ok, out) = run(std::process::Command::new("curl")
                .args(["-sS", "--cacert"])
                .arg(&ca)
                .arg(format!("https://127.0.0.1:{port}/_nexus/ready")));
            if ok {
                ready = out;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready.contains(expected), "trust={trust}: {ready}");
        let _ = sidecar.kill().await;
    }
    let fingerprint = |out: &str| {
        out.lines()
            .find(|l| l.contains("-----BEGIN CERTIFICATE-----"))
            .map(|_| {
                out.split("-----BEGIN CERTIFICATE-----")
                    .nth(1)
                    .unwrap()
                    .split("-----END")
                    .next()
                    .unwrap()
                    .to_string()
            })
            .expect("a certificate in the output")
    };
    let (_, before) = presented(gaddr, &ca, &["-showcerts"]);

    // A connection opened now, kept alive across the reload.
    let _ = http();
    let old_ca = reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap();
    let kept = reqwest::Client::builder()
        .add_root_certificate(old_ca)
        .build()
        .unwrap();
    assert_eq!(
        kept.get(format!("{gateway}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // New certificates (a new CA too), then SIGHUP.
    let (ok, out) = run(std::process::Command::new(BIN)
        .current_dir(tmp.path())
        .args(["certs", "dev", "--state-dir", "state", "--force"]));
    assert!(ok && out.contains("TLS_CERT_FILE="), "{out}");
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let mut after = String::new();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, out) = presented(gaddr, &ca, &["-showcerts"]);
        if out.contains("Verify return code: 0 (ok)") && fingerprint(&out) != fingerprint(&before) {
            after = out;
            break;
        }
    }
    assert!(
        !after.is_empty(),
        "the new certificate is presented to new connections"
    );
    assert_eq!(
        kept.get(format!("{gateway}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "the connection opened before the reload still works"
    );

    // A bad pair (another certificate's key) is refused; the last good one stays.
    std::fs::copy(certs.join("sidecar-key.pem"), certs.join("gateway-key.pem")).unwrap();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, out) = presented(gaddr, &ca, &["-showcerts"]);
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert_eq!(
        fingerprint(&out),
        fingerprint(&after),
        "the previous good certificate is kept"
    );
    let metrics = run(std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&ca)
        .arg(format!("{gateway}/metrics")))
    .1;
    assert!(
        metrics.contains("nexus_tls_reloads_total{outcome=\"refused\"}"),
        "{metrics}"
    );
    let stderr = stop(child, "-TERM").await;
    assert!(stderr.contains("new TLS certificate refused"), "{stderr}");
    assert!(
        !stderr.contains("Illegal SNI"),
        "rustls's per-handshake warning about the client's SNI is logged: {stderr}"
    );

    // Start-up refuses a mismatched pair and a missing file, naming the variable.
    let gateway_fails = |cert: &Path, key: &Path| {
        let mut c = std::process::Command::new(BIN);
        c.current_dir(tmp.path())
            .env_clear()
            .env("BROKER_URL", "http://127.0.0.1:9")
            .env("BROKER_API_KEY", "k".repeat(32))
            .env("GATEWAY_ADDR", "127.0.0.1:0")
            .env("TLS_CERT_FILE", cert)
            .env("TLS_KEY_FILE", key)
            .arg("gateway");
        run(&mut c)
    };
    let (ok, out) = gateway_fails(&certs.join("gateway.pem"), &certs.join("gateway-key.pem"));
    assert!(
        !ok && out.contains("TLS_KEY_FILE") && out.contains("is not the key"),
        "{out}"
    );
    let (ok, out) = gateway_fails(&certs.join("missing.pem"), &certs.join("sidecar-key.pem"));
    assert!(!ok && out.contains("TLS_CERT_FILE"), "{out}");
}

/// Mutual TLS between real processes, checked with curl and openssl (not our
/// TLS code): `nexus broker` requiring client certificates from the
/// development CA with the gateway's SPIFFE ID accepts the gateway's
/// certificate and refuses no certificate and a certificate without that
/// identity at the handshake; `nexus gateway` with its client certificate is
/// ready, without it not.
#[tokio::test]
async fn mutual_tls_between_broker_and_gateway_processes() {
    if !tools_present(&["curl", "openssl"], "mutual TLS test") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (ok, out) = run(std::process::Command::new(BIN)
        .current_dir(tmp.path())
        .args(["certs", "dev", "--state-dir", "state"]));
    assert!(ok, "{out}");
    let certs = tmp.path().join("state/certs");
    let c = |n: &str| certs.join(n).display().to_string();
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let port = free_port();
    let mut cmd = nexus(tmp.path());
    cmd.arg("broker")
        .env("DATABASE_URL", "sqlite:nexus.db")
        .env("ENCRYPTION_KEY", key)
        .env("STATE_KEY", key)
        .env("API_KEY", "an-admin-key-long-enough-123")
        .env("GATEWAY_API_KEY", "the-gateways-key-long-enough-456")
        .env("NEXUS_LOG", "warn")
        .env("BROKER_ADDR", format!("127.0.0.1:{port}"))
        .env("TLS_CERT_FILE", c("broker.pem"))
        .env("TLS_KEY_FILE", c("broker-key.pem"))
        .env("BROKER_CLIENT_CA_FILE", c("ca.pem"))
        .env("BROKER_CLIENT_IDS", "spiffe://nexus.local/nexus/gateway");
    let broker = cmd.spawn().unwrap();
    let url = format!("https://127.0.0.1:{port}/health");
    let curl = |cert: Option<(&str, &str)>| {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "5", "--cacert", &c("ca.pem")]);
        if let Some((cert, key)) = cert {
            cmd.args(["--cert", &c(cert), "--key", &c(key)]);
        }
        run(cmd.arg(&url))
    };
    let gateway_cert = Some(("gateway-client.pem", "gateway-client-key.pem"));
    let mut answer = (false, String::new());
    for _ in 0..100 {
        answer = curl(gateway_cert);
        if answer.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        answer.0 && answer.1.contains("\"ok\""),
        "the gateway's certificate is accepted: {}",
        answer.1
    );
    let (ok, out) = curl(None);
    assert!(!ok, "no client certificate: refused: {out}");
    // The sidecar's server certificate: same CA, no gateway identity.
    let (ok, out) = curl(Some(("sidecar.pem", "sidecar-key.pem")));
    assert!(!ok, "another identity: refused: {out}");
    let script = format!(
        "openssl s_client -connect 127.0.0.1:{port} -CAfile {} -cert {} -key {} </dev/null 2>&1",
        c("ca.pem"),
        c("gateway-client.pem"),
        c("gateway-client-key.pem")
    );
    let (_, out) = run(std::process::Command::new("sh").args(["-c", &script]));
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");

    // `nexus agents` as an operator: with a client certificate, and without.
    for with_cert in [true, false] {
        let mut cmd = std::process::Command::new(BIN);
        cmd.current_dir(tmp.path())
            .env_clear()
            .env("API_KEY", "an-admin-key-long-enough-123")
            .env("BROKER_CA_FILE", c("ca.pem"))
            .args([
                "agents",
                "list",
                "--broker-url",
                &format!("https://127.0.0.1:{port}"),
            ]);
        if with_cert {
            cmd.env("BROKER_CLIENT_CERT_FILE", c("gateway-client.pem"))
                .env("BROKER_CLIENT_KEY_FILE", c("gateway-client-key.pem"));
        }
        let (ok, out) = run(&mut cmd);
        assert_eq!(ok, with_cert, "with_cert={with_cert}: {out}");
        if !with_cert {
            assert!(out.contains("cannot reach the broker"), "{out}");
        }
    }

    // The gateway process, with and without its client certificate.
    for with_cert in [true, false] {
        let gport = free_port();
        let mut cmd = nexus(tmp.path());
        cmd.arg("gateway")
            .env("BROKER_URL", format!("https://127.0.0.1:{port}"))
            .env("BROKER_API_KEY", "the-gateways-key-long-enough-456")
            .env("BROKER_CA_FILE", c("ca.pem"))
            .env("GATEWAY_ADDR", format!("127.0.0.1:{gport}"))
            .env("NEXUS_LOG", "warn");
        if with_cert {
            cmd.env("BROKER_CLIENT_CERT_FILE", c("gateway-client.pem"))
                .env("BROKER_CLIENT_KEY_FILE", c("gateway-client-key.pem"));
        }
        let gateway = cmd.spawn().unwrap();
        let ready = format!("http://127.0.0.1:{gport}/ready");
        let mut status = 0;
        for _ in 0..100 {
            if let Ok(r) = http().get(&ready).send().await {
                status = r.status().as_u16();
                if status == 200 || !with_cert {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            status,
            if with_cert { 200 } else { 503 },
            "with_cert={with_cert}"
        );
        stop(gateway, "-TERM").await;
    }
    stop(broker, "-TERM").await;
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
