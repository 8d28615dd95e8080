//! End to end with real parts and a Python agent: the real OpenID provider
//! (oidc-provider from npm) and its scope-enforcing resource API, the
//! broker and the gateway on loopback, the sidecar, and an agent written
//! with `requests` that holds only the sidecar's URL. Skipped with one line
//! when Node, the provider's packages or `requests` are missing, except
//! under CI.

use std::process::Stdio;
use std::time::Duration;

use nexus_bridge::{Bridge, ConnectionRequest};
use nexus_testkit::{browser, client, consent, q, OidcPeer};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use crate::harness::{free_port, Stack};

struct Agent {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Agent {
    /// The Python agent, with an environment holding nothing but the
    /// sidecar's URL (and what Python needs to start).
    fn start(sidecar: &str) -> Option<Agent> {
        let ok = std::process::Command::new("python3")
            .args(["-c", "import requests"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let reason = "python3 with requests is missing (pip install -r crates/nexus-sidecar/tests/agent/requirements.txt)";
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but {reason}");
            }
            eprintln!("skipped: Python agent test ({reason})");
            return None;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/agent/agent.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(sidecar)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Some(Agent {
            child,
            stdin,
            lines,
        })
    }

    async fn ask(&mut self, command: &str) -> Value {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await
            .unwrap();
        let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .expect("the agent answered in time")
            .unwrap()
            .expect("an answer line");
        serde_json::from_str(&line).unwrap()
    }

    /// Whether `needle` is anywhere in the agent's writable memory.
    fn memory_holds(&self, needle: &[u8]) -> bool {
        let pid = self.child.id().unwrap();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
        use std::io::{Read, Seek, SeekFrom};
        let mut scanned = 0usize;
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            let (Some(range), Some(perms)) = (f.next(), f.next()) else {
                continue;
            };
            if !perms.starts_with("rw") {
                continue;
            }
            let Some((a, b)) = range.split_once('-') else {
                continue;
            };
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            );
            let mut buf = vec![0u8; (b - a) as usize];
            if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut buf).is_err() {
                continue;
            }
            scanned += buf.len();
            if buf.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
        }
        assert!(
            scanned > 1 << 20,
            "read only {scanned} bytes of the agent's memory"
        );
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_agent_through_the_sidecar_holds_no_secret() {
    let port = free_port();
    let gateway = format!("http://127.0.0.1:{port}");
    let Some(peer) = OidcPeer::start(
        json!([client(
            "nexus",
            "client_secret_post",
            &format!("{gateway}/auth/callback")
        )]),
        &[("ACCESS_TOKEN_TTL", "4")],
    )
    .await
    else {
        return;
    };
    let s = Stack::start_on(port).await;
    s.admin(
        reqwest::Method::POST,
        "/providers",
        Some(json!({"profile": {
            "name": "idp", "auth_type": "oauth2", "client_id": "nexus", "client_secret": "nexus-secret",
            "issuer": peer.issuer, "enable_discovery": true,
            "scopes": ["openid", "email", "calendar.read"]
        }})),
    )
    .await;
    // The application starts the connection; a person consents in a browser.
    let bridge = Bridge::builder(&s.gateway, &s.agent_key).build().unwrap();
    let spec = bridge
        .request_connection(&ConnectionRequest {
            user_id: "u1".into(),
            provider_name: Some("idp".into()),
            return_url: "http://localhost:3000/done".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let back = consent(&browser(), &spec.auth_url, &gateway).await;
    assert_eq!(q(&back, "status").as_deref(), Some("success"), "{back}");
    let id = spec.connection_id.clone();
    bridge
        .wait_for_active(&id, Duration::from_secs(10))
        .await
        .unwrap();

    let sc = s
        .sidecar(&format!(
            "[routes.idp]\nupstream = \"{}\"\nworkspace = \"u1\"\nprovider = \"idp\"\n",
            peer.issuer
        ))
        .await;
    let Some(mut agent) = Agent::start(&sc.url) else {
        return;
    };

    // Across three access-token lifetimes: never a 401.
    let refreshes = peer.stats().await["token_requests"]["refresh_token"]
        .as_u64()
        .unwrap();
    let a = agent
        .ask("loop 13 /idp/api/resource?scope=calendar.read")
        .await;
    assert_eq!(
        a["statuses"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["200"],
        "{a}"
    );
    assert!(a["statuses"]["200"].as_u64().unwrap() > 50, "{a}");
    let refreshed = peer.stats().await["token_requests"]["refresh_token"]
        .as_u64()
        .unwrap()
        - refreshes;
    assert!(
        refreshed >= 2,
        "{refreshed} refreshes in 13 s of 4-second tokens"
    );

    // The agent's memory holds no token and no key: the live access token
    // (as the gateway serves it now) and the agent key are not in it.
    let token: Value = reqwest::Client::new()
        .get(format!("{}/v1/token/{id}", s.gateway))
        .bearer_auth(&s.agent_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let access = token["access_token"].as_str().unwrap().to_string();
    let a = agent.ask("once /idp/api/resource?scope=email").await;
    assert_eq!(a["status"], 200, "{a}");
    assert!(
        !agent.memory_holds(access.as_bytes()),
        "an access token in the agent's memory"
    );
    assert!(
        !agent.memory_holds(s.agent_key.as_bytes()),
        "the agent key in the agent's memory"
    );
    assert!(
        agent.memory_holds(b"/idp/api/resource?scope=email"),
        "the scan sees what the agent holds"
    );

    // The person withdraws calendar.read: the agent gets the 403, and the
    // connection is degraded with exactly that scope.
    let removed = peer.remove_scope("alice", "nexus", "calendar.read").await;
    assert_eq!(removed["updated"], 1);
    let a = agent
        .ask("once /idp/api/resource?scope=calendar.read")
        .await;
    assert_eq!(a["status"], 403, "{a}");
    assert_eq!(a["nexus_error"], Value::Null, "the provider's own 403");
    let mut conn = Value::Null;
    for _ in 0..100 {
        conn = s
            .admin(reqwest::Method::GET, &format!("/connections/{id}"), None)
            .await;
        if conn["failing_scopes"] == json!(["calendar.read"]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(conn["failing_scopes"], json!(["calendar.read"]), "{conn}");
    assert_eq!(conn["status"], "degraded");
    let a = agent.ask("once /idp/api/resource?scope=email").await;
    assert_eq!(a["status"], 200, "other scopes still work: {a}");

    // The person revokes the grant: the agent is told a person must act,
    // and the provider sees no further calls.
    peer.revoke_grant("alice", "nexus").await;
    let a = agent.ask("once /idp/api/resource?scope=email").await;
    assert_eq!(a["nexus_error"], "attention_required", "{a}");
    let body: Value = serde_json::from_str(a["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["interaction_required"], true, "{body}");
    assert_eq!(body["state"], "attention_required");
    let calls = peer.stats().await["resource_calls"].as_u64().unwrap();
    let gateway_calls = s.gateway_calls("route=\"/v1/");
    let a = agent.ask("loop 2 /idp/api/resource?scope=email").await;
    assert_eq!(
        a["statuses"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["409"],
        "{a}"
    );
    assert_eq!(
        peer.stats().await["resource_calls"].as_u64().unwrap(),
        calls,
        "the provider was called after revocation"
    );
    // About 20 requests in those 2 s: the gateway is not asked for each.
    let asked = s.gateway_calls("route=\"/v1/") - gateway_calls;
    assert!(
        asked <= 2,
        "{asked} gateway calls for a connection that needs a person"
    );
    agent.stdin.write_all(b"quit\n").await.unwrap();
}
