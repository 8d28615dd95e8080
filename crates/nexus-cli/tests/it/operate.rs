//! The operator commands against a real broker (`nexus up`): connections
//! list/show/refresh/revoke, status, pause and resume, in both output
//! formats; a canary credential appears in no output.

use std::path::Path;

use serde_json::{json, Value};

use crate::{env_file, env_value, http, nexus, stop, up};

const CANARY: &str = "canary-weather-key-91c3e0";

async fn cli(dir: &Path, broker: &str, args: &[&str]) -> (bool, String) {
    let mut c = nexus(dir);
    c.args(args)
        .args(["--state-dir", "state", "--broker-url", broker])
        .env("NEXUS_LOG", "warn");
    let out = c.output().await.unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains(CANARY),
        "a credential in the output:\n{text}"
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn operators_list_refresh_pause_and_revoke_from_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    // Warnings only: stderr is read at the end, and a full pipe would stall
    // the server.
    let (child, broker) = up(tmp.path(), &[("NEXUS_LOG", "warn")]).await;
    let api_key = env_value(&env_file(tmp.path()), "API_KEY");
    let h = http();
    let admin = |method: reqwest::Method, path: &str, body: Value| {
        let req = h
            .request(method, format!("{broker}{path}"))
            .header("x-api-key", &api_key)
            .json(&body);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    admin(
        reqwest::Method::POST,
        "/providers",
        json!({"profile": {"name": "weather", "auth_type": "header", "params": {
            "header_name": "X-Key", "credential_field": "api_key",
            "credential_schema": {"type": "object", "required": ["api_key"],
                                  "properties": {"api_key": {"type": "string"}}}}}}),
    )
    .await;
    let spec = admin(
        reqwest::Method::POST,
        "/auth/consent-spec",
        json!({"workspace_id": "acme", "provider_name": "weather", "return_url": "http://localhost/done"}),
    )
    .await;
    let id = spec["connection_id"].as_str().unwrap().to_string();
    let captured = h
        .post(format!("{broker}/auth/capture-credential"))
        .json(&json!({"state": spec["state"], "credentials": {"api_key": CANARY}}))
        .send()
        .await
        .unwrap();
    assert!(captured.status().is_success());
    let d = tmp.path();

    let (ok, out) = cli(d, &broker, &["connections", "list", "--workspace", "acme"]).await;
    assert!(ok, "{out}");
    assert!(out.contains(&id) && out.contains("active"), "{out}");
    let (ok, out) = cli(
        d,
        &broker,
        &[
            "connections",
            "list",
            "--workspace",
            "acme",
            "--output",
            "json",
        ],
    )
    .await;
    assert!(ok, "{out}");
    let list: Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(list["connections"][0]["status"], "active");
    let (ok, out) = cli(d, &broker, &["connections", "show", &id]).await;
    assert!(ok && out.contains("status          active"), "{out}");
    let (ok, out) = cli(d, &broker, &["connections", "refresh", &id]).await;
    assert!(ok && out.contains("status          active"), "{out}");

    // The kill switch, for one workspace then for all.
    let (ok, out) = cli(
        d,
        &broker,
        &["pause", "--workspace", "acme", "--reason", "drill 7"],
    )
    .await;
    assert!(
        ok && out.contains("paused (workspace acme): drill 7"),
        "{out}"
    );
    let (ok, out) = cli(d, &broker, &["status", "--workspace", "acme"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("1 connection(s), 0 need(s) a person") && out.contains("PAUSED (workspace)"),
        "{out}"
    );
    assert!(out.contains("drill 7"), "{out}");
    let (ok, out) = cli(d, &broker, &["pause", "--workspace", "acme"]).await;
    assert!(!ok && out.contains("reason is required"), "{out}");
    let (ok, _) = cli(d, &broker, &["resume", "--workspace", "acme"]).await;
    assert!(ok);
    let (ok, out) = cli(d, &broker, &["pause", "--reason", "incident 42"]).await;
    assert!(ok && out.contains("every workspace"), "{out}");
    let (_, out) = cli(
        d,
        &broker,
        &["status", "--workspace", "acme", "--output", "json"],
    )
    .await;
    let status: Value = serde_json::from_str(&out).expect(&out);
    assert_eq!(status["issuance_paused"]["reason"], "incident 42");
    let (ok, _) = cli(d, &broker, &["resume"]).await;
    assert!(ok);
    let (_, out) = cli(d, &broker, &["status", "--workspace", "acme"]).await;
    assert!(!out.contains("PAUSED"), "{out}");

    let (ok, out) = cli(d, &broker, &["connections", "revoke", &id]).await;
    assert!(ok && out.contains(&format!("revoked {id}")), "{out}");
    let (ok, out) = cli(d, &broker, &["connections", "revoke", &id]).await;
    assert!(ok && out.contains("already revoked"), "{out}");
    let (ok, out) = cli(d, &broker, &["connections", "refresh", &id]).await;
    assert!(!ok && out.contains("refresh refused"), "{out}");
    assert!(out.contains("status          revoked"), "{out}");
    let (ok, out) = cli(d, &broker, &["connections", "show", "no-such-connection"]).await;
    assert!(!ok && out.contains("404"), "{out}");
    // Webhook endpoints: the secret printed once, listed, deliveries, removed.
    let (ok, out) = cli(
        d,
        &broker,
        &[
            "webhooks",
            "add",
            "http://127.0.0.1:9/nexus-hook",
            "--event",
            "connection.revoked",
        ],
    )
    .await;
    assert!(ok && out.contains("shown once"), "{out}");
    let (ok, out) = cli(d, &broker, &["webhooks", "list", "--output", "json"]).await;
    assert!(ok, "{out}");
    let hooks: Value = serde_json::from_str(&out).expect(&out);
    let hook = hooks["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["url"] == "http://127.0.0.1:9/nexus-hook")
        .expect("the endpoint is listed");
    assert!(hook.get("secret").is_none(), "{hook}");
    let hook_id = hook["id"].as_str().unwrap().to_string();
    let (ok, out) = cli(d, &broker, &["webhooks", "deliveries", &hook_id]).await;
    assert!(ok && out.contains("attempts"), "{out}");
    // Only a given-up delivery is retried: an unknown one is refused, said.
    let (ok, out) = cli(
        d,
        &broker,
        &["webhooks", "retry", &hook_id, "no-such-event"],
    )
    .await;
    assert!(!ok && out.contains("no failed delivery"), "{out}");
    let (ok, out) = cli(d, &broker, &["webhooks", "remove", &hook_id]).await;
    assert!(ok && out.contains("removed"), "{out}");

    // The audit log: filtered, as JSON lines, and followed.
    let (ok, out) = cli(
        d,
        &broker,
        &["audit", "--type", "connection.revoked", "--output", "json"],
    )
    .await;
    assert!(ok, "{out}");
    let event: Value = serde_json::from_str(out.lines().next().unwrap_or("")).expect(&out);
    assert_eq!(event["connection_id"], id);
    let mut follow = nexus(d);
    follow
        .args([
            "audit",
            "--follow",
            "--type",
            "provider.created",
            "--output",
            "json",
        ])
        .args(["--state-dir", "state", "--broker-url", &broker])
        .env("NEXUS_LOG", "warn");
    let mut follow = follow.spawn().unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(follow.stdout.take().unwrap()));
    // The page so far: the weather provider.
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
        .await
        .expect("the first page in time")
        .unwrap()
        .unwrap();
    assert!(first.contains("weather"), "{first}");
    admin(
        reqwest::Method::POST,
        "/providers",
        json!({"profile": {"name": "followed", "auth_type": "oauth2", "client_id": "c",
            "auth_url": "https://idp.example/a", "token_url": "https://idp.example/t"}}),
    )
    .await;
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), lines.next_line())
        .await
        .expect("a new event within two polls")
        .unwrap()
        .unwrap();
    assert!(next.contains("followed"), "{next}");
    let _ = follow.kill().await;

    // Shell completions know the operator commands.
    let out = nexus(d)
        .args(["completions", "bash"])
        .output()
        .await
        .unwrap();
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && script.contains("_nexus"),
        "{script}"
    );
    assert!(script.contains("connections") && script.contains("providers"));
    let logs = stop(child, "-TERM").await;
    assert!(!logs.contains(CANARY), "the credential in the broker's log");
}

/// `nexus mcp plan` and `nexus mcp add` against a fake OAuth-protected MCP
/// server: what was found, a provider registered through dynamic
/// registration (its secret never printed), a lying server refused.
#[tokio::test]
async fn mcp_servers_are_registered_from_the_cli() {
    let fake = nexus_testkit::mcp::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let (child, broker, gateway) = crate::up_full(tmp.path(), &[("NEXUS_LOG", "warn")], &[]).await;
    let d = tmp.path();
    let url = format!("{}/mcp", fake.base);
    let (ok, out) = cli(d, &broker, &["mcp", "plan", &url]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("authorization server    {}/as", fake.base))
            && out.contains("Nexus would register itself"),
        "{out}"
    );
    let (ok, out) = cli(d, &broker, &["mcp", "add", &url, "--name", "files"]).await;
    assert!(ok && out.contains("registered files"), "{out}");
    assert!(
        out.contains("[routes.files]\nkind = \"mcp\"")
            && out.contains(&format!("upstream = \"{url}\"")),
        "the sidecar route to add is printed: {out}"
    );
    assert!(!out.contains(nexus_testkit::mcp::DYN_SECRET), "{out}");
    let api_key = env_value(&env_file(d), "API_KEY");
    let listed: Value = http()
        .get(format!("{broker}/providers"))
        .header("x-api-key", &api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "files"),
        "{listed}"
    );
    fake.lies.lock().unwrap().pkce = Some(vec!["plain"]);
    let (ok, out) = cli(d, &broker, &["mcp", "add", &url, "--name", "weak"]).await;
    assert!(!ok && out.contains("S256"), "{out}");
    // The client ID metadata document is public: the gateway serves it,
    // its client id under the gateway's URL.
    let document: Value = http()
        .get(format!("{gateway}/auth/client-metadata.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        document["client_id"],
        format!("{gateway}/auth/client-metadata.json"),
        "{document}"
    );
    let logs = stop(child, "-TERM").await;
    assert!(
        !logs.contains(nexus_testkit::mcp::DYN_SECRET),
        "a secret in the logs"
    );
}
