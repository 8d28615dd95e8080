//! Routes of kind `mcp`: what an MCP client sees when the connection needs
//! a person (a URL-mode elicitation with a connect link, never an OAuth
//! challenge), and that its retry after consent goes through. The official
//! conformance suite drives the same path with real OAuth servers
//! (`crates/nexus-cli/tests/it/mcp_conformance.rs`).

use serde_json::{json, Value};

use crate::harness::{Stack, Upstream};

async fn rpc(url: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = reqwest::Client::new()
        .post(url)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25")
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

/// The link of a URL-mode elicitation answering request `id`.
fn elicited(body: &Value, id: i64) -> (String, String) {
    assert_eq!(body["jsonrpc"], "2.0", "{body}");
    assert_eq!(body["id"], id, "{body}");
    assert_eq!(body["error"]["code"], -32042, "{body}");
    let e = &body["error"]["data"]["elicitations"][0];
    assert_eq!(e["mode"], "url", "{body}");
    let url = e["url"].as_str().unwrap().to_string();
    assert!(
        !body["error"]["message"].as_str().unwrap().contains(&url),
        "the bearer link is not in the message clients log: {body}"
    );
    (url, e["elicitationId"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_client_is_sent_to_the_connect_portal_and_its_retry_goes_through() {
    let s = Stack::start().await;
    let up = Upstream::start(None).await;
    s.provider("tools", json!({"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}}), &["api_key"]).await;
    let sc = s
        .sidecar(&format!(
            "[routes.tools]\nkind = \"mcp\"\nupstream = \"{}/base\"\nworkspace = \"u1\"\nprovider = \"tools\"\n",
            up.url()
        ))
        .await;
    let endpoint = format!("{}/tools", sc.url);
    let list = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list"});

    // Nobody has connected: a URL-mode elicitation, no upstream call.
    let (status, headers, body) = rpc(&endpoint, &list).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-nexus-error"], "url_elicitation");
    let (link, elicitation) = elicited(&body, 7);
    assert!(
        link.starts_with(&format!("{}/connect?session=", s.gateway)),
        "{link}"
    );
    // Asked again, the same link: one connect session, not one per request.
    let (_, _, again) = rpc(&endpoint, &list).await;
    assert_eq!(elicited(&again, 7), (link.clone(), elicitation));
    // The link opens the portal, offering the route's provider.
    // (It trades the token in the address for a cookie, as a browser keeps.)
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let opened = browser.get(&link).send().await.unwrap();
    assert!(opened.status().is_redirection(), "{}", opened.status());
    let cookie = opened.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let page = browser
        .get(format!("{}/connect", s.gateway))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Connect tools"));
    // A notification has no id to answer: the sidecar's plain error.
    let (status, headers, body) = rpc(
        &endpoint,
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(headers["x-nexus-error"], "connection_not_found");
    assert!(up.requests().is_empty(), "{:?}", up.requests());
    // The route serves (it sends people to consent): the sidecar is ready,
    // so a pod does not wait for a person only its agent can ask.
    let ready = reqwest::get(format!("{}/_nexus/ready", sc.url))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(
        ready["routes"]["tools"],
        json!({"ready": true, "person_needed": "connection_not_found"})
    );

    // The person connects; the client's retry at once goes through.
    let secret = "canary-mcp-route-secret";
    let c = s.connect("u1", "tools", json!({"api_key": secret})).await;
    let (status, headers, body) = rpc(&endpoint, &list).await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.get("x-nexus-error").is_none(), "{body}");
    assert_eq!(body["ok"], true, "{body}");
    let seen = up.last();
    assert_eq!(seen.uri, "/base");
    assert_eq!(seen.headers["x-api-key"], secret);
    assert_eq!(seen.headers["mcp-protocol-version"], "2025-11-25");

    // The server wants a scope the grant lacks: reported before the answer
    // (the connection is degraded already), and the client is sent to
    // consent again instead of seeing the challenge.
    let call =
        json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "write"}});
    let (status, headers, body) = rpc(&format!("{endpoint}/status/403"), &call).await;
    assert_eq!(status, 200, "{body}");
    assert!(headers.get("www-authenticate").is_none());
    elicited(&body, 8);
    let conn = s
        .admin(reqwest::Method::GET, &format!("/connections/{c}"), None)
        .await;
    assert_eq!(conn["status"], "degraded", "{conn}");
    assert_eq!(conn["failing_scopes"], json!(["files.write"]), "{conn}");

    // A body sent in chunks is still kept for the replay after a 401.
    let chunks = futures_util::stream::iter(
        [r#"{"jsonrpc":"2.0","id":9,"#, r#""method":"tools/list"}"#]
            .map(|c| Ok::<_, std::io::Error>(c.to_string())),
    );
    let r = reqwest::Client::new()
        .post(format!("{endpoint}/once401"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tries: Vec<_> = up
        .requests()
        .into_iter()
        .filter(|r| r.uri == "/base/once401")
        .collect();
    assert_eq!(tries.len(), 2, "{tries:?}");
    assert!(tries.iter().all(|t| t.body_len == 46), "{tries:?}");

    // An upstream cannot pass its answers off as the sidecar's own.
    let r = reqwest::get(format!("{endpoint}/forged")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-nexus-error").is_none());

    // Any other answer is the server's own.
    let r = reqwest::Client::new()
        .get(format!("{endpoint}/status/404"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().get("x-nexus-error").is_none());

    // A 401 that survives the forced refresh means a new consent too.
    let (status, headers, body) = rpc(&format!("{endpoint}/status/401"), &call).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["x-nexus-error"], "url_elicitation");
    elicited(&body, 8);

    // Nothing the agent received carries the credential.
    let metrics = reqwest::get(format!("{}/_nexus/metrics", sc.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let token = link.split("session=").nth(1).unwrap();
    assert!(!metrics.contains(secret) && !metrics.contains(token));
    assert!(
        metrics.contains(r#"outcome="url_elicitation""#),
        "elicitations are counted: {metrics}"
    );
    assert!(!metrics.contains("forged"), "{metrics}");
}

/// The MCP server peer (`tests/peers/mcp-server`, the official TypeScript
/// SDK), its tokens checked by introspection at `issuer`; `None` (one line,
/// outside CI) when it cannot run.
async fn mcp_server(issuer: &str) -> Option<(tokio::process::Child, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/peers/mcp-server");
    if !std::path::Path::new(dir)
        .join("node_modules/@modelcontextprotocol/sdk")
        .exists()
    {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI=true but the MCP server peer is not installed (npm ci --prefix tests/peers/mcp-server)"
        );
        eprintln!("skipped: MCP end to end (npm ci --prefix tests/peers/mcp-server)");
        return None;
    }
    let mut child = tokio::process::Command::new("node")
        .arg(format!("{dir}/server.mjs"))
        .env("ISSUER", issuer)
        .env("INTROSPECTION_CLIENT_ID", "mcp-server")
        .env("INTROSPECTION_CLIENT_SECRET", "mcp-server-secret")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let line = tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line())
        .await
        .expect("the MCP server started in time")
        .unwrap()
        .expect("its ready line");
    let ready: Value = serde_json::from_str(&line).unwrap();
    Some((child, ready["url"].as_str().unwrap().to_string()))
}

/// The Python MCP client (official SDK) once through the sidecar at `url`:
/// its one JSON line. `None` (one line, outside CI) without the SDK.
async fn mcp_client(url: &str) -> Option<Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/agent/mcp_agent.py");
    let ok = std::process::Command::new("python3")
        .args(["-c", "import mcp"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true"),
            "CI=true but the Python MCP SDK is missing (pip install -r crates/nexus-sidecar/tests/agent/requirements.txt)"
        );
        eprintln!("skipped: MCP end to end (pip install -r crates/nexus-sidecar/tests/agent/requirements.txt)");
        return None;
    }
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(url)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_default())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), out)
        .await
        .expect("the MCP client ended in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_str(stdout.trim()).unwrap())
}

/// What a person does with a connect link: opens it, presses the first
/// Connect or Reconnect, and consents at the provider (the peer's login and
/// consent complete by themselves).
async fn person_consents(link: &str, gateway: &str) {
    let b = nexus_testkit::browser();
    let opened = b.get(link).send().await.unwrap();
    assert!(opened.status().is_redirection(), "{}", opened.status());
    let page = b
        .get(format!("{gateway}/connect"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let at = page
        .find(r#"action="/connect/start""#)
        .unwrap_or_else(|| panic!("nothing to connect on the page: {page}"));
    let form = &page[at..at + page[at..].find("</form>").unwrap()];
    let fields: Vec<(String, String)> = form
        .split("<input ")
        .skip(1)
        .filter_map(|i| {
            let attr = |n: &str| {
                let start = i.find(&format!("{n}=\""))? + n.len() + 2;
                Some(i[start..start + i[start..].find('"')?].to_string())
            };
            Some((attr("name")?, attr("value")?))
        })
        .collect();
    let started = b
        .post(format!("{gateway}/connect/start"))
        .form(&fields)
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 303, "{fields:?}");
    let auth = started.headers()["location"].to_str().unwrap().to_string();
    nexus_testkit::consent(&b, &auth, gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_official_sdk_client_reaches_an_official_sdk_server_and_is_sent_to_consent_after_a_revocation(
) {
    let port = nexus_testkit::free_port();
    let gateway = format!("http://127.0.0.1:{port}");
    let Some(peer) = nexus_testkit::OidcPeer::start(
        json!([
            nexus_testkit::client(
                "nexus",
                "client_secret_basic",
                &format!("{gateway}/auth/callback")
            ),
            nexus_testkit::client(
                "mcp-server",
                "client_secret_basic",
                "http://127.0.0.1/unused"
            ),
        ]),
        &[],
    )
    .await
    else {
        return;
    };
    let Some((_server, mcp_url)) = mcp_server(&peer.issuer).await else {
        return;
    };
    let s = Stack::start_on(port).await;
    // Registered by its URL alone, with the client registered in advance at
    // the provider (it takes no dynamic registration).
    let added = s
        .admin(
            reqwest::Method::POST,
            "/providers/mcp",
            Some(json!({"url": mcp_url, "name": "calendar", "client_id": "nexus", "client_secret": "nexus-secret"})),
        )
        .await;
    assert_eq!(added["server"]["issuer"], peer.issuer, "{added}");
    let sc = s
        .sidecar(
            "[routes.calendar]\nkind = \"mcp\"\nupstream = \"MCP\"\nworkspace = \"u1\"\nprovider = \"calendar\"\n"
                .replace("MCP", &mcp_url)
                .as_str(),
        )
        .await;
    let url = format!("{}/calendar", sc.url);

    // Not connected: the client is told where a person connects.
    let Some(first) = mcp_client(&url).await else {
        return;
    };
    let link = first["elicitation"]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("{first}"));
    person_consents(link, &gateway).await;
    let answer = mcp_client(&url).await.unwrap();
    assert_eq!(answer["tools"], json!(["next_meeting"]), "{answer}");
    assert_eq!(answer["text"], "alice: stand-up at 09:30", "{answer}");

    // The person's grant is revoked at the provider: the server refuses
    // the token, the refresh fails, and the client is sent to consent again
    // instead of seeing an OAuth challenge.
    assert!(peer.revoke_grant("alice", "nexus").await >= 1);
    let refused = mcp_client(&url).await.unwrap();
    let link = refused["elicitation"]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("{refused}"));
    person_consents(link, &gateway).await;
    let again = mcp_client(&url).await.unwrap();
    assert_eq!(again["text"], "alice: stand-up at 09:30", "{again}");

    let stats: Value = reqwest::get(mcp_url.replace("/mcp", "/__stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["tool_calls"], 2, "{stats}");
}
