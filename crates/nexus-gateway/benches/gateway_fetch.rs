//! Token fetch through the gateway (SPEC §11): `GET /v1/token/{id}` with an
//! agent key, 64 concurrent keep-alive clients, against a bare axum handler
//! serving the same JSON body, measured in the same run:
//!
//! - separate processes: broker, gateway and the bare handler each in their
//!   own process (this binary re-executed in a role), the load from this one;
//! - inside one process, as under `nexus up`: broker, gateway, bare handler
//!   and load in this process.
//!
//! 100 active static-credential connections (header strategy) of one
//! workspace, SQLite in a temporary folder, token caches on (the broker's,
//! and the gateway's following the broker's change stream). Bare and
//! gateway runs alternate three times; the medians are the figures.
//!
//! `cargo bench -p nexus-gateway --bench gateway_fetch`

use std::process::Stdio;
use std::sync::Arc;

use nexus_testkit::{load, Figures};
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use nexus_broker::config::{BrokerConfig, Settings};
use nexus_broker::server::Broker;
use nexus_gateway::{GatewayConfig, GatewayServer, GatewaySettings};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

const CLIENTS: usize = 64;
const CONNECTIONS: usize = 100;
const RUN: Duration = Duration::from_secs(4);
/// Bare and gateway runs alternate this many times; medians are reported
/// (this 2-core VM drifts between runs more than the code differs).
const ROUNDS: usize = 3;
const API_KEY: &str = "bench-admin-key-0123456789abcdef";
const ROLE: &str = "NEXUS_BENCH_ROLE";

/// The vault and state keys all brokers of one run share.
#[derive(Clone)]
struct Keys {
    encryption: String,
    state: String,
}

fn broker_settings(db: &str, k: &Keys) -> Settings {
    Settings {
        database_url: Some(db.into()),
        encryption_key: Some(k.encryption.clone()),
        state_key: Some(k.state.clone()),
        api_key: Some(API_KEY.into()),
        broker_addr: Some("127.0.0.1:0".into()),
        refresh_worker: Some("false".into()),
        // Seeding starts many handshakes in one workspace.
        handshake_starts_per_minute: Some("1000000".into()),
        ..Default::default()
    }
}

async fn start_broker(db: &str, k: &Keys) -> (String, Broker) {
    let b = Broker::start(BrokerConfig::from_settings(&broker_settings(db, k)).expect("config"))
        .await
        .expect("broker");
    (format!("http://{}", b.local_addr()), b)
}

async fn start_gateway(
    broker: &str,
    local: Option<nexus_gateway::broker::BrokerClient>,
) -> (String, GatewayServer) {
    let config = GatewayConfig::from_settings(&GatewaySettings {
        broker_url: Some(broker.into()),
        broker_api_key: Some(API_KEY.into()),
        gateway_addr: Some("127.0.0.1:0".into()),
        ..Default::default()
    })
    .expect("gateway config");
    let g = GatewayServer::start_with(config, nexus_core::telemetry::metrics_handle(), local)
        .await
        .expect("gateway");
    (format!("http://{}", g.local_addr()), g)
}

async fn bare(body: Value) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = Router::new().route(
        "/v1/token/{id}",
        get(move || {
            let body = body.clone();
            async move { Json(body) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// Runs one server in this process (a child of the benchmark) and prints
/// `READY <url>`; stops when the parent closes stdin.
async fn child(role: &str) {
    let url = match role {
        "broker" => {
            let keys = Keys {
                encryption: std::env::var("BENCH_ENCRYPTION_KEY").expect("key"),
                state: std::env::var("BENCH_STATE_KEY").expect("key"),
            };
            let (url, b) = start_broker(&std::env::var("BENCH_DB").expect("db"), &keys).await;
            tokio::spawn(b.run(std::future::pending()));
            url
        }
        "gateway" => {
            let (url, g) =
                start_gateway(&std::env::var("BENCH_BROKER").expect("broker"), None).await;
            tokio::spawn(g.run(std::future::pending()));
            url
        }
        _ => {
            let body: Value =
                serde_json::from_str(&std::env::var("BENCH_BODY").expect("body")).expect("json");
            bare(body).await
        }
    };
    println!("READY {url}");
    let _ = tokio::task::spawn_blocking(|| for _ in std::io::stdin().lines() {}).await;
}

/// Starts this binary in `role`; the child and its URL.
async fn spawn(role: &str, env: &[(&str, String)]) -> (tokio::process::Child, String) {
    let mut cmd = tokio::process::Command::new(std::env::current_exe().expect("exe"));
    cmd.env(ROLE, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut c = cmd.spawn().expect("spawn");
    let mut lines = BufReader::new(c.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("child ready in time")
        .expect("read")
        .expect("ready line");
    let url = line.strip_prefix("READY ").expect("READY").to_string();
    (c, url)
}

/// Registers a static provider, connects `CONNECTIONS` accounts of one
/// workspace through the broker, makes an agent key; (ids, key, token body).
async fn seed(broker: &str) -> (Vec<String>, String, Value) {
    let http = reqwest::Client::new();
    let admin = |m: reqwest::Method, path: &str, body: Value| {
        http.request(m, format!("{broker}{path}"))
            .header("x-api-key", API_KEY)
            .json(&body)
            .send()
    };
    let r = admin(reqwest::Method::POST, "/providers", json!({"profile": {
        "name": "weather", "auth_type": "api_key",
        "params": {
            "credential_schema": {"type": "object", "required": ["api_key"], "properties": {"api_key": {"type": "string"}}},
            "strategy": {"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}}
        }
    }}))
    .await
    .expect("provider");
    assert_eq!(r.status(), 201);
    let mut ids = Vec::new();
    for i in 0..CONNECTIONS {
        let spec: Value = admin(
            reqwest::Method::POST,
            "/auth/consent-spec",
            json!({"workspace_id": "bench", "provider_name": "weather", "return_url": "http://localhost/done"}),
        )
        .await
        .expect("consent")
        .json()
        .await
        .expect("json");
        let r = http
            .post(format!("{broker}/auth/capture-credential"))
            .json(&json!({"state": spec["state"], "credentials": {"api_key": format!("weather-key-{i:04}-{}", "x".repeat(40))}}))
            .send()
            .await
            .expect("capture");
        assert!(r.status().is_success());
        ids.push(spec["connection_id"].as_str().expect("id").to_string());
    }
    let k: Value = admin(
        reqwest::Method::POST,
        "/agent-keys",
        json!({"name": "bench", "workspaces": ["bench"]}),
    )
    .await
    .expect("agent key")
    .json()
    .await
    .expect("json");
    let body: Value = admin(
        reqwest::Method::GET,
        &format!("/connections/{}/token", ids[0]),
        json!({}),
    )
    .await
    .expect("token")
    .json()
    .await
    .expect("json");
    (ids, k["key"].as_str().expect("key").to_string(), body)
}

fn urls(base: &str, ids: &[String]) -> Arc<Vec<String>> {
    Arc::new(
        ids.iter()
            .map(|id| format!("{base}/v1/token/{id}"))
            .collect(),
    )
}

fn report(label: &str, rows: &[(&str, &Figures)], baseline: &Figures) {
    for (name, f) in rows {
        println!(
            "{label:<20} {name:<16} {:>8.0} req/s  ({:>5.1}% of bare)  p50 {:>8.1?}  p99 {:>8.1?}  ({:.2}x bare p99)",
            f.rate,
            100.0 * f.rate / baseline.rate,
            f.p50,
            f.p99,
            f.p99.as_secs_f64() / baseline.p99.as_secs_f64(),
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Alternates bare and gateway runs [`ROUNDS`] times; prints each round and
/// the medians of the ratios.
async fn compare(label: &str, bare_url: &str, gateway: &str, ids: &[String], key: &str) {
    let auth = format!("Bearer {key}");
    let (mut rates, mut p99s) = (Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        let baseline = load(urls(bare_url, ids), ("authorization", &auth), CLIENTS, RUN).await;
        let through = load(urls(gateway, ids), ("authorization", &auth), CLIENTS, RUN).await;
        report(
            &format!("{label} #{round}"),
            &[("bare axum", &baseline), ("gateway", &through)],
            &baseline,
        );
        rates.push(through.rate / baseline.rate);
        p99s.push(through.p99.as_secs_f64() / baseline.p99.as_secs_f64());
    }
    println!(
        "{label:<20} median: gateway {:.1}% of bare, p99 {:.2}x bare",
        100.0 * median(rates),
        median(p99s)
    );
}

/// The separate-process run; returns what it seeded.
async fn separate(db: &str, keys: &Keys) -> (Vec<String>, String, Value) {
    let (mut b, broker) = spawn(
        "broker",
        &[
            ("BENCH_DB", db.to_string()),
            ("BENCH_ENCRYPTION_KEY", keys.encryption.clone()),
            ("BENCH_STATE_KEY", keys.state.clone()),
        ],
    )
    .await;
    let (ids, key, body) = seed(&broker).await;
    let (mut g, gateway) = spawn("gateway", &[("BENCH_BROKER", broker.clone())]).await;
    let (mut x, bare_url) = spawn("bare", &[("BENCH_BODY", body.to_string())]).await;
    compare("separate processes", &bare_url, &gateway, &ids, &key).await;
    for c in [&mut g, &mut x, &mut b] {
        let _ = c.kill().await;
    }
    (ids, key, body)
}

/// `BENCH_ONLY=router`: time per request of the gateway's router (the
/// whole middleware stack and handler, token from its cache) and of the bare
/// router, called in process one request at a time.
async fn routers(state: Arc<nexus_gateway::core::Gateway>, body: Value, ids: &[String], key: &str) {
    use tower::ServiceExt;
    let gateway =
        nexus_gateway::server::router(state.clone(), nexus_core::telemetry::metrics_handle());
    let bare = Router::new().route(
        "/v1/token/{id}",
        get(move || {
            let body = body.clone();
            async move { Json(body) }
        }),
    );
    for _ in 0..100 {
        if state.tokens.is_live() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (name, app) in [("bare axum", bare), ("gateway", gateway)] {
        let mut per = Vec::new();
        for round in 0..6 {
            let n = 20_000;
            let start = std::time::Instant::now();
            for i in 0..n {
                let req = axum::http::Request::get(format!("/v1/token/{}", ids[i % ids.len()]))
                    .header("authorization", format!("Bearer {key}"))
                    .body(axum::body::Body::empty())
                    .expect("request");
                let resp = app.clone().oneshot(req).await.expect("infallible");
                assert_eq!(resp.status(), 200);
                axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .expect("body");
            }
            if round > 0 {
                per.push(start.elapsed() / n as u32);
            }
        }
        per.sort();
        println!(
            "router only          {name:<16} {:>8.2?} per request (median of 5 x 20000)",
            per[2]
        );
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Ok(role) = std::env::var(ROLE) {
        return child(&role).await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite:{}", dir.path().join("bench.db").display());
    let keys = Keys {
        encryption: nexus_broker::vault::generate_key_b64().expose().clone(),
        state: nexus_broker::vault::generate_key_b64().expose().clone(),
    };

    // `BENCH_ONLY=one` skips the separate-process run (for profiling);
    // `BENCH_ONLY=router` times the routers alone, in process.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let (ids, key, body) = if only == "one" || only == "router" {
        let (broker, b) = start_broker(&db, &keys).await;
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let t = tokio::spawn(b.run(async {
            let _ = rx.await;
        }));
        let seeded = seed(&broker).await;
        let _ = stop.send(());
        let _ = t.await;
        seeded
    } else {
        separate(&db, &keys).await
    };

    // One process, as under `nexus up`.
    let (broker, b) = start_broker(&db, &keys).await;
    let local = nexus_gateway::broker::BrokerClient::local(
        nexus_broker::api::router(b.state().clone()),
        b.state().config().api_key.clone(),
    );
    let (bstop, brx) = tokio::sync::oneshot::channel::<()>();
    let bt = tokio::spawn(b.run(async {
        let _ = brx.await;
    }));
    let (gateway, g) = start_gateway(&broker, Some(local)).await;
    let state = g.gateway().clone();
    let gt = tokio::spawn(g.run(std::future::pending()));
    let bare_url = bare(body.clone()).await;
    if std::env::var("BENCH_ONLY").is_ok_and(|v| v == "router") {
        // Server-side CPU only: the routers called in process, no sockets.
        return routers(state, body, &ids, &key).await;
    }
    compare("one process", &bare_url, &gateway, &ids, &key).await;
    gt.abort();
    let _ = bstop.send(());
    let _ = bt.await;
}
