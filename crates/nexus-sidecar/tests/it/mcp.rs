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
        body["error"]["message"].as_str().unwrap().contains(&url),
        "clients that show only the message still show the link: {body}"
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
    assert!(!metrics.contains(secret));
    assert!(
        metrics.contains(r#"outcome="url_elicitation""#),
        "elicitations are counted: {metrics}"
    );
}
