//! Property-based API testing with schemathesis (PyPI) against a running
//! `nexus up`: the gateway's and the broker's own OpenAPI documents, and the
//! reference's v1 contract (vendored under the gateway's test data), with
//! every check but positive-data acceptance (see below): zero failures.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use crate::{env_file, env_value_last, http, up_full};

/// schemathesis's command-line entry point, run by the same `python3` the
/// other Python peers use.
const ENTRY: &str =
    "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'st'; sys.exit(schemathesis())";

/// Whether schemathesis is installed; outside CI a missing one skips.
fn available() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import schemathesis"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI=true but schemathesis is missing: pip install -r crates/nexus-gateway/tests/data/contract/requirements.txt"
        );
        eprintln!("skipped: schemathesis (pip install -r crates/nexus-gateway/tests/data/contract/requirements.txt)");
    }
    ok
}

/// A static provider and one live connection, so generated requests meet
/// real rows too.
async fn seed(broker: &str, api_key: &str) {
    let http = http();
    let r = http
        .post(format!("{broker}/providers"))
        .header("x-api-key", api_key)
        .json(&json!({"profile": {
            "name": "Weather", "auth_type": "api_key",
            "params": {
                "credential_schema": {"type": "object", "required": ["api_key"],
                    "properties": {"api_key": {"type": "string"}}},
                "strategy": {"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}}
            }
        }}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let spec: Value = http
        .post(format!("{broker}/auth/consent-spec"))
        .header("x-api-key", api_key)
        .json(
            &json!({"workspace_id": "default", "provider_name": "weather",
                      "return_url": "http://localhost/done"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r = http
        .post(format!("{broker}/auth/capture-credential"))
        .json(&json!({"state": spec["state"], "credentials": {"api_key": "weather-key-0001"}}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_against_the_three_documents() {
    if !available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (mut child, broker, gateway) = up_full(tmp.path(), &[("NEXUS_LOG", "warn")], &[]).await;
    // Keep draining stderr (the log) so the server never blocks on it.
    let log = Arc::new(Mutex::new(String::new()));
    let mut stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    let drain = tokio::spawn(async move {
        let mut buf = [0u8; 8192];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let env = env_file(tmp.path());
    let api_key = env_value_last(&env, "API_KEY");
    let agent_key = env_value_last(&env, "AGENT_KEY");
    seed(&broker, &api_key).await;

    let reference = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../nexus-gateway/tests/data/contract/reference-openapi.yaml");
    let agent = format!("Authorization: Bearer {agent_key}");
    let admin = format!("X-API-Key: {api_key}");
    let runs: [(&str, String, Option<&str>, &str); 3] = [
        ("gateway", format!("{gateway}/openapi.json"), None, &agent),
        (
            "reference contract",
            reference.display().to_string(),
            Some(&gateway),
            &agent,
        ),
        // Last: its generated calls change state (pauses, deletions).
        ("broker", format!("{broker}/openapi.json"), None, &admin),
    ];
    let mut failures = Vec::new();
    for (name, location, url, header) in runs {
        let mut cmd = tokio::process::Command::new("python3");
        cmd.args(["-c", ENTRY, "run", &location])
            .args(url.map(|u| format!("--url={u}")))
            .args([
                "--header",
                header,
                // Every check but one: "schema-valid request accepted" cannot
                // hold where valid input is something only the server issues
                // (a signed state, an existing id, a provider's credential
                // schema); its opposite (invalid input refused with 4xx),
                // status codes, content types, response schemas and
                // server errors are all checked.
                "--exclude-checks",
                "positive_data_acceptance",
                "--max-examples",
                "30",
                "--seed",
                "20261130",
                "--max-failures",
                "20",
                "--request-timeout",
                "10",
                // A stream that pings forever: no generated request ends it.
                "--exclude-path",
                "/tokens/changes",
                "--no-color",
            ])
            .env("SCHEMATHESIS_TELEMETRY", "false")
            // It keeps a database of examples in its working folder.
            .current_dir(tmp.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("schemathesis against the {name} ran over 300 s"))
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        eprintln!("== schemathesis: {name}\n{}", tail(&text, 12));
        if !out.status.success() {
            failures.push(format!("== {name}\n{text}"));
        }
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    let log = log.lock().unwrap().clone();
    assert!(
        !log.contains("panicked"),
        "the server panicked under generated input:\n{log}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
