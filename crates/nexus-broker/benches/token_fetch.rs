//! Token fetch benchmark: `GET /connections/{id}/token` on a warm broker,
//! against a bare axum handler returning the same JSON body (the baseline
//! SPEC §11 measures the gateway against), with the token cache on and off.
//!
//! 64 concurrent keep-alive clients over loopback for a fixed time each;
//! 1,000 active OAuth connections with hour-long tokens (no refresh due), so
//! this is the steady-state path: stamp read, cache, audit via the batching
//! writer. Runs on SQLite, and on PostgreSQL when `NEXUS_TEST_DATABASE_URL`
//! is set (private schema, dropped afterwards).
//!
//! `cargo bench -p nexus-broker --bench token_fetch`

mod support;

use std::sync::Arc;

use nexus_testkit::load;
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use nexus_broker::config::{BrokerConfig, Settings};
use nexus_broker::server::Broker;
use nexus_broker::store::now_ms;
use nexus_broker::vault::generate_key_b64;
use serde_json::{json, Value};

const CLIENTS: usize = 64;
const CONNECTIONS: usize = 1_000;
const RUN: Duration = Duration::from_secs(5);
const API_KEY: &str = "bench-admin-key-0123456789abcdef";

/// Starts a broker on `url`; returns its base URL, its shutdown sender and task.
async fn broker(
    url: &str,
    cache: &str,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
    Arc<nexus_broker::vault::KeyRing>,
) {
    let settings = Settings {
        database_url: Some(url.into()),
        encryption_key: Some(
            KEY.get_or_init(|| generate_key_b64().expose().clone())
                .clone(),
        ),
        state_key: Some(generate_key_b64().expose().clone()),
        api_key: Some(API_KEY.into()),
        broker_addr: Some("127.0.0.1:0".into()),
        refresh_worker: Some("false".into()),
        // Seeding starts many handshakes in one workspace.
        handshake_starts_per_minute: Some("1000000".into()),
        token_cache_capacity: Some(cache.into()),
        ..Default::default()
    };
    let config = BrokerConfig::from_settings(&settings).expect("config");
    let keys = config.keys.clone();
    let b = Broker::start(config).await.expect("broker");
    let base = format!("http://{}", b.local_addr());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = b
            .run(async {
                let _ = rx.await;
            })
            .await;
    });
    (base, tx, task, keys)
}

/// One vault key for all brokers of a run, so seeded secrets stay readable.
static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

async fn run(label: &str, url: &str) {
    // First broker: register the provider (through the API) and seed.
    let (base, stop, task, keys) = broker(url, "10000").await;
    let http = reqwest::Client::new();
    let resp: Value = http
        .post(format!("{base}/providers"))
        .header("x-api-key", API_KEY)
        .json(&json!({"profile": {
            "name": "bench", "auth_type": "oauth2", "client_id": "bench-client",
            "client_secret": "bench-secret", "auth_url": "http://127.0.0.1:9/authorize",
            "token_url": "http://127.0.0.1:9/token", "scopes": ["openid", "email"]
        }}))
        .send()
        .await
        .expect("provider")
        .json()
        .await
        .expect("json");
    let provider_id = resp["id"].as_str().expect("provider id").to_string();
    let now = now_ms();
    support::seed(
        url,
        &support::Seed {
            keys: &keys,
            provider_id: &provider_id,
            count: CONNECTIONS,
            access_token: |i| format!("access-token-{i:05}-{}", "x".repeat(64)),
            expires_at: now + 3_600_000,
            next_refresh_at: now + 3_000_000,
            last_success_at: Some(now),
        },
    )
    .await;
    let urls: Arc<Vec<String>> = Arc::new(
        (0..CONNECTIONS)
            .map(|i| format!("{base}/connections/{}/token", support::connection_id(i)))
            .collect(),
    );
    let body: Value = http
        .get(&urls[0])
        .header("x-api-key", API_KEY)
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("json");
    let warm = load(urls.clone(), ("x-api-key", API_KEY), CLIENTS, RUN).await;
    let _ = stop.send(());
    let _ = task.await;

    let (base, stop, task, _) = broker(url, "0").await;
    let cold_urls: Arc<Vec<String>> = Arc::new(
        (0..CONNECTIONS)
            .map(|i| format!("{base}/connections/{}/token", support::connection_id(i)))
            .collect(),
    );
    let cold = load(cold_urls, ("x-api-key", API_KEY), CLIENTS, RUN).await;
    let _ = stop.send(());
    let _ = task.await;

    // Baseline: a bare axum handler returning the same body.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let bare = format!("http://{}", listener.local_addr().expect("addr"));
    let app = Router::new().route(
        "/connections/{id}/token",
        get(move || {
            let body = body.clone();
            async move { Json(body) }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let bare_urls: Arc<Vec<String>> = Arc::new(
        (0..CONNECTIONS)
            .map(|i| format!("{bare}/connections/{}/token", support::connection_id(i)))
            .collect(),
    );
    let baseline = load(bare_urls, ("x-api-key", API_KEY), CLIENTS, RUN).await;
    server.abort();

    for (name, f) in [
        ("bare axum", &baseline),
        ("broker, cache on", &warm),
        ("broker, cache off", &cold),
    ] {
        println!(
            "{label:<9} {name:<18} {:>8.0} req/s  ({:>5.1}% of bare)  p50 {:>8.1?}  p99 {:>8.1?}  ({:.2}x bare p99)",
            f.rate,
            100.0 * f.rate / baseline.rate,
            f.p50,
            f.p99,
            f.p99.as_secs_f64() / baseline.p99.as_secs_f64(),
        );
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    support::on_each_backend(|label, url| async move { run(label, &url).await }).await;
}
