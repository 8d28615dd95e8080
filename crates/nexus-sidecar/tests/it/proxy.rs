//! The sidecar against a real broker and gateway: every strategy applied
//! and only upstream, credentials the agent sends replaced, nothing leaving
//! the route's host, the agent loop (401 replay, 403 report, 429 memory),
//! connections that need a person, and bad configurations refused.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Stack, Upstream};

const CANARY: &str = "CANARY-7f3a9c-never-shown";

fn canary(tag: &str) -> String {
    format!("{CANARY}-{tag}")
}

/// The status line and the rest of a raw HTTP/1.1 exchange.
async fn raw(addr: &str, request: &str) -> (u16, String) {
    let addr = addr.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Everything an agent saw of an answer: status, headers and body.
async fn seen_by_agent(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let headers = format!("{:?}", resp.headers());
    let body = resp.text().await.unwrap();
    (status, format!("{headers}\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_reaches_the_upstream_and_nothing_else_sees_a_credential() {
    let s = Stack::start().await;
    let up = Upstream::start(None).await;
    let hdr = s
        .provider("hdr", json!({"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key", "value_prefix": "Key "}}), &["api_key"])
        .await;
    let _ = hdr;
    s.provider("qp", json!({"type": "query_param", "config": {"param_name": "key", "credential_field": "api_key"}}), &["api_key"]).await;
    s.provider("basic", json!({"type": "basic_auth", "config": {"username_field": "username", "password_field": "password"}}), &["username", "password"]).await;
    s.provider("hmac", json!({"type": "hmac_payload", "config": {"header_name": "X-Signature", "algorithm": "sha256", "credential_field": "secret", "encoding": "hex"}}), &["secret"]).await;
    s.provider(
        "aws",
        json!({"type": "aws_sigv4", "config": {"region": "eu-west-1", "service": "execute-api"}}),
        &["access_key", "secret_key"],
    )
    .await;
    let c_hdr = s
        .connect("u1", "hdr", json!({"api_key": canary("hdr")}))
        .await;
    let c_qp = s
        .connect("u1", "qp", json!({"api_key": canary("qp")}))
        .await;
    let _basic = s
        .connect(
            "u1",
            "basic",
            json!({"username": "alice", "password": canary("basic")}),
        )
        .await;
    let c_hmac = s
        .connect("u1", "hmac", json!({"secret": canary("hmac")}))
        .await;
    let c_aws = s
        .connect(
            "u1",
            "aws",
            json!({"access_key": "AKIDEXAMPLE", "secret_key": canary("aws")}),
        )
        .await;
    let u = up.url();
    let sc = s
        .sidecar(&format!(
            r#"
            [routes.hdr]
            upstream = "{u}/v1"
            connection = "{c_hdr}"
            [routes.qp]
            upstream = "{u}"
            connection = "{c_qp}"
            [routes.basic]
            upstream = "{u}"
            workspace = "u1"
            provider = "BASIC"
            [routes.hmac]
            upstream = "{u}"
            connection = "{c_hmac}"
            [routes.aws]
            upstream = "{u}"
            connection = "{c_aws}"
            "#
        ))
        .await;
    let agent = reqwest::Client::new();
    let mut everything_the_agent_saw = String::new();

    // header: the agent's own Authorization, X-Api-Key and Host are replaced.
    let r = agent
        .get(format!("{}/hdr/items/7?x=1", sc.url))
        .header("authorization", "Bearer agent-made")
        .header("x-api-key", "agent-made")
        .header("host", "evil.example.com")
        .send()
        .await
        .unwrap();
    let (status, saw) = seen_by_agent(r).await;
    assert_eq!(status, 200, "{saw}");
    everything_the_agent_saw += &saw;
    let seen = up.last();
    assert_eq!(seen.uri, "/v1/items/7?x=1");
    assert_eq!(
        seen.headers["x-api-key"],
        format!("Key {}", canary("hdr")).as_str()
    );
    assert!(seen.headers.get("authorization").is_none());
    assert_eq!(seen.headers["host"], up.addr.to_string().as_str());

    // query_param: the agent's own key= is dropped, the credential added.
    let r = agent
        .get(format!("{}/qp/search?key=stolen&q=a%20b", sc.url))
        .send()
        .await
        .unwrap();
    let (status, saw) = seen_by_agent(r).await;
    assert_eq!(status, 200);
    everything_the_agent_saw += &saw;
    assert_eq!(
        up.last().uri,
        format!("/search?q=a%20b&key={}", canary("qp"))
    );

    // basic_auth, the connection found by workspace and provider name.
    let r = agent
        .get(format!("{}/basic/me", sc.url))
        .send()
        .await
        .unwrap();
    let (status, saw) = seen_by_agent(r).await;
    assert_eq!(status, 200, "{saw}");
    everything_the_agent_saw += &saw;
    let expected =
        base64::engine::general_purpose::STANDARD.encode(format!("alice:{}", canary("basic")));
    assert_eq!(
        up.last().headers["authorization"],
        format!("Basic {expected}").as_str()
    );

    // hmac_payload over the exact body.
    let body = r#"{"event":"ping"}"#;
    let r = agent
        .post(format!("{}/hmac/hook", sc.url))
        .header("x-signature", "agent-made")
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, saw) = seen_by_agent(r).await;
    assert_eq!(status, 200);
    everything_the_agent_saw += &saw;
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(canary("hmac").as_bytes()).unwrap();
    mac.update(body.as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(up.last().headers["x-signature"], hex.as_str());
    assert_eq!(up.last().body_len, body.len() as u64);
    assert_eq!(up.last().method, "POST");

    // aws_sigv4: signed for the upstream's host, the payload hashed.
    let r = agent
        .post(format!("{}/aws/prod/items", sc.url))
        .header("x-amz-date", "20000101T000000Z")
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, saw) = seen_by_agent(r).await;
    assert_eq!(status, 200);
    everything_the_agent_saw += &saw;
    let seen = up.last();
    let auth = seen.headers["authorization"].to_str().unwrap();
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"),
        "{auth}"
    );
    assert!(
        auth.contains("/eu-west-1/execute-api/aws4_request"),
        "{auth}"
    );
    assert_ne!(seen.headers["x-amz-date"], "20000101T000000Z");

    // Errors and operations pages carry no credential either.
    for path in [
        "/nope/x",
        "/hdr/../x",
        "/_nexus/ready",
        "/_nexus/metrics",
        "/_nexus/health",
    ] {
        let r = agent.get(format!("{}{path}", sc.url)).send().await.unwrap();
        everything_the_agent_saw += &seen_by_agent(r).await.1;
    }
    assert!(everything_the_agent_saw.contains("nexus_sidecar_requests_total"));
    assert!(
        !everything_the_agent_saw.contains(CANARY),
        "a credential reached the agent"
    );
    assert!(
        !s.metrics.render().contains(CANARY),
        "a credential in the metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_the_agent_sends_takes_a_credential_off_the_routes_host() {
    let s = Stack::start().await;
    let elsewhere = Upstream::start(None).await;
    let up = Upstream::start(Some(elsewhere.url())).await;
    s.provider("hdr", json!({"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}}), &["api_key"]).await;
    let c = s
        .connect("u1", "hdr", json!({"api_key": canary("egress")}))
        .await;
    let sc = s
        .sidecar(&format!(
            "[routes.api]\nupstream = \"{}/base\"\nconnection = \"{c}\"\n",
            up.url()
        ))
        .await;
    let other = elsewhere.addr.to_string();
    let attempts = [
        format!("GET http://{other}/steal HTTP/1.1\r\nHost: {other}\r\nConnection: close\r\n\r\n"),
        format!(
            "GET http://{other}/api/steal HTTP/1.1\r\nHost: {other}\r\nConnection: close\r\n\r\n"
        ),
        format!("CONNECT {other} HTTP/1.1\r\nHost: {other}\r\nConnection: close\r\n\r\n"),
        "GET /api/../../steal HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_string(),
        "GET /api/%2e%2e/steal HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_string(),
        "GET /api/%2F%2Fevil/steal HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_string(),
        "GET /api/%252e%252e/steal HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_string(),
        "GET //evil.example.com/steal HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_string(),
    ];
    for a in &attempts {
        let (status, text) = raw(&sc.url, a).await;
        assert!((400..500).contains(&status), "{a:?} -> {text}");
        assert!(text.contains("\"error\""), "a JSON error: {text}");
        assert!(
            text.to_ascii_lowercase().contains("x-nexus-error"),
            "{text}"
        );
    }
    // A Host header names another host: the request still goes to the route's.
    let (status, _) = raw(
        &sc.url,
        &format!("GET /api/ok HTTP/1.1\r\nHost: {other}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(up.last().uri, "/base/ok");
    // The upstream redirects elsewhere: the agent gets the redirect, the
    // sidecar follows nothing.
    let agent = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = agent
        .get(format!("{}/api/redirect", sc.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(
        r.headers()["location"],
        format!("{}/steal", elsewhere.url()).as_str()
    );

    assert!(
        elsewhere.requests().is_empty(),
        "another host was reached: {:?}",
        elsewhere.requests()
    );
    for seen in up.requests() {
        assert_eq!(seen.headers["host"], up.addr.to_string().as_str());
        assert!(seen.uri.starts_with("/base/"), "{}", seen.uri);
    }
}

async fn connection(s: &Stack, id: &str) -> Value {
    s.admin(reqwest::Method::GET, &format!("/connections/{id}"), None)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_loop_replays_reports_remembers_and_stops_for_people() {
    let s = Stack::start().await;
    let up = Upstream::start(None).await;
    s.provider("hdr", json!({"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}}), &["api_key"]).await;
    let c = s
        .connect("u1", "hdr", json!({"api_key": canary("loop")}))
        .await;
    let c2 = s
        .connect("u2", "hdr", json!({"api_key": canary("loop2")}))
        .await;
    let u = up.url();
    let sc = s
        .sidecar_with(
            &format!(
                r#"
            [routes.api]
            upstream = "{u}"
            connection = "{c}"
            [[routes.api.scopes]]
            path = "/status/403"
            scopes = ["files.write"]
            [routes.other]
            upstream = "{u}"
            connection = "{c2}"
            "#
            ),
            |st| st.sidecar_recheck_secs = Some("1".into()),
        )
        .await;
    let agent = reqwest::Client::new();

    // 401 once: one forced refresh, one replay, the agent sees 200.
    let refreshes = s.gateway_calls("/v1/refresh");
    let r = agent
        .post(format!("{}/api/once401", sc.url))
        .body("replayed body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tries: Vec<_> = up
        .requests()
        .into_iter()
        .filter(|r| r.uri == "/once401")
        .collect();
    assert_eq!(tries.len(), 2);
    assert!(tries
        .iter()
        .all(|t| t.body_len == 13 && t.headers.contains_key("x-api-key")));
    assert_eq!(s.gateway_calls("/v1/refresh"), refreshes + 1);

    // 403: returned as it is and reported with the route's scope hint.
    let r = agent
        .delete(format!("{}/api/status/403", sc.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(
        r.headers().get("x-nexus-error").is_none(),
        "the upstream's own answer"
    );
    assert_eq!(r.text().await.unwrap(), "upstream said 403");
    let mut conn = Value::Null;
    for _ in 0..100 {
        conn = connection(&s, &c).await;
        if conn["failing_scopes"] == json!(["files.write"]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(conn["failing_scopes"], json!(["files.write"]), "{conn}");
    assert_eq!(conn["status"], "degraded");

    // 429 with Retry-After: remembered for this route and connection only.
    let r = agent
        .get(format!("{}/api/status/429", sc.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("x-nexus-error").is_none());
    let before = up.requests().len();
    for _ in 0..5 {
        let r = agent
            .get(format!("{}/api/anything", sc.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["x-nexus-error"], "upstream_rate_limited");
        let wait: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=30).contains(&wait), "{wait}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"], "upstream_rate_limited");
    }
    assert_eq!(
        up.requests().len(),
        before,
        "no upstream call inside the window"
    );
    let r = agent
        .get(format!("{}/other/anything", sc.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "another connection is not held back");
    let metrics = s.metrics.render();
    let short = metrics
        .lines()
        .find(|l| {
            l.starts_with("nexus_sidecar_short_circuits_total{") && l.contains("route=\"api\"")
        })
        .unwrap_or_else(|| panic!("no short-circuit metric:\n{metrics}"));
    assert!(short.ends_with(" 5"), "{short}");

    // Paused by an operator: within SIDECAR_RECHECK_SECS (1 s here), 423
    // with the reason and no upstream call.
    s.admin(
        reqwest::Method::PUT,
        "/workspaces/u2/pause",
        Some(json!({"reason": "incident 42"})),
    )
    .await;
    let mut r = agent
        .get(format!("{}/other/anything", sc.url))
        .send()
        .await
        .unwrap();
    for _ in 0..50 {
        if r.status() != 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        r = agent
            .get(format!("{}/other/anything", sc.url))
            .send()
            .await
            .unwrap();
    }
    assert_eq!(r.status(), 423);
    let before = up.requests().len();
    let r = agent
        .get(format!("{}/other/anything", sc.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 423);
    assert_eq!(r.headers()["x-nexus-error"], "issuance_paused");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"], "issuance_paused");
    assert_eq!(e["reason"], "incident 42");
    assert_eq!(up.requests().len(), before, "no upstream call while paused");
    s.admin(reqwest::Method::DELETE, "/workspaces/u2/pause", None)
        .await;

    // Revoked: the agent is told a person must act; the upstream sees nothing.
    s.admin(reqwest::Method::DELETE, &format!("/connections/{c2}"), None)
        .await;
    let mut e = Value::Null;
    for _ in 0..50 {
        let r = agent
            .get(format!("{}/other/anything", sc.url))
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            assert!(r.headers().contains_key("x-nexus-error"));
            e = r.json().await.unwrap();
            // (Until the pause's backoff ends, the pause is still told.)
            if e["error"] != "issuance_paused" {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(e["interaction_required"], true, "{e}");
    assert_eq!(e["reconsent"], true, "{e}");
    assert_eq!(e["connection_id"], c2.as_str());
    let before = up.requests().len();
    for _ in 0..20 {
        let r = agent
            .get(format!("{}/other/anything", sc.url))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    assert_eq!(
        up.requests().len(),
        before,
        "no upstream call for a connection that needs a person"
    );
    let ready = agent
        .get(format!("{}/_nexus/ready", sc.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["routes"]["api"]["ready"], true, "{ready}");
    assert_eq!(ready["routes"]["other"]["ready"], false, "{ready}");
}

#[tokio::test]
async fn bad_configurations_are_refused_by_name() {
    use nexus_sidecar::{SidecarConfig, SidecarSettings};
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[routes.a]\nupstream = \"https://api.example.com\"\nconnection = \"c\"\n",
    )
    .unwrap();
    let base = || SidecarSettings {
        gateway_url: Some("http://127.0.0.1:8090".into()),
        agent_key: Some("nxa_test".into()),
        sidecar_routes_file: Some(routes.display().to_string()),
        ..Default::default()
    };
    assert!(SidecarConfig::from_settings(&base()).is_ok());
    let var = |s: SidecarSettings| SidecarConfig::from_settings(&s).unwrap_err().var;
    assert_eq!(
        var(SidecarSettings {
            sidecar_addr: Some("0.0.0.0:8070".into()),
            ..base()
        }),
        "SIDECAR_ADDR"
    );
    assert!(SidecarConfig::from_settings(&SidecarSettings {
        sidecar_addr: Some("0.0.0.0:8070".into()),
        sidecar_allow_non_loopback: Some("true".into()),
        ..base()
    })
    .is_ok());
    assert_eq!(
        var(SidecarSettings {
            agent_key: None,
            ..base()
        }),
        "AGENT_KEY"
    );
    assert_eq!(
        var(SidecarSettings {
            gateway_url: Some("http://gw.example.com".into()),
            ..base()
        }),
        "GATEWAY_URL"
    );
    assert_eq!(
        var(SidecarSettings {
            sidecar_routes_file: Some("/nonexistent.toml".into()),
            ..base()
        }),
        "SIDECAR_ROUTES_FILE"
    );
    let key = dir.path().join("key");
    std::fs::write(&key, "nxa_from_file\n").unwrap();
    let c = SidecarConfig::from_settings(&SidecarSettings {
        agent_key: None,
        agent_key_file: Some(key.display().to_string()),
        ..base()
    })
    .unwrap();
    assert_eq!(c.agent_key.expose(), "nxa_from_file");
    assert!(!format!("{c:?}").contains("nxa_from_file"));

    // A port another sidecar holds is "in use", not silently shared.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = crate::harness::free_port();
    let on_port = || {
        SidecarConfig::from_settings(&SidecarSettings {
            sidecar_addr: Some(format!("127.0.0.1:{port}")),
            ..base()
        })
        .unwrap()
    };
    let metrics = nexus_core::telemetry::metrics_handle();
    let first = nexus_sidecar::Sidecar::start(on_port(), metrics.clone())
        .await
        .unwrap();
    let second = nexus_sidecar::Sidecar::start(on_port(), metrics).await;
    assert!(
        matches!(second, Err(nexus_sidecar::server::StartError::Bind { .. })),
        "a second sidecar on the same port started"
    );
    drop(first);
}
