//! Refresh engine benchmark (SPEC §11): N connections all due in one window,
//! refreshed by two broker replicas (two `Tokens` workers on one database)
//! against a loopback token endpoint that answers after 20 ms.
//!
//! Reports: time until every connection is refreshed, refreshes/s, how many
//! were refreshed after their old token expired (target 0), double refreshes
//! (target 0: the endpoint counts calls per refresh token), and the resident
//! memory of the process while the workers run (target: flat, the same growth
//! for 10k and 100k connections). Runs on SQLite, and on PostgreSQL when
//! `NEXUS_TEST_DATABASE_URL` is set (private schema, dropped afterwards).
//!
//! `cargo bench -p nexus-broker --bench refresh_engine`
//! (`BENCH_CONNECTIONS=10000,100000` by default; `BENCH_BACKENDS=sqlite,postgres`.)

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::{Form, Json, Router};
use nexus_broker::events::audit::Actor;
use nexus_broker::events::audit::AuditConfig;
use nexus_broker::events::audit::AuditWriter;
use nexus_broker::oauth::discovery::Discovery;
use nexus_broker::registry::Registry;
use nexus_broker::store::{now_ms, Store};
use nexus_broker::tokens::{RefreshSettings, Tokens};
use nexus_broker::vault::{generate_key_b64, KeyRing};
use nexus_core::outbound;
use serde_json::{json, Value};

const LATENCY: Duration = Duration::from_millis(20);
/// Every token expires this long after seeding; the margin equals it, so all
/// are due at once and must be refreshed within this window.
const WINDOW: Duration = Duration::from_secs(300);
const REPLICAS: usize = 2;

/// The loopback token endpoint: counts calls per refresh token.
struct Endpoint {
    calls: Vec<AtomicU32>,
    first_call_ms: Vec<AtomicI64>,
    distinct: AtomicUsize,
    total: AtomicUsize,
}

async fn token(
    State(ep): State<Arc<Endpoint>>,
    Form(form): Form<HashMap<String, String>>,
) -> Json<Value> {
    tokio::time::sleep(LATENCY).await;
    ep.total.fetch_add(1, Ordering::Relaxed);
    let i = form
        .get("refresh_token")
        .and_then(|rt| rt.strip_prefix("rt-"))
        .and_then(|n| n.parse::<usize>().ok());
    if let Some(i) = i.filter(|i| *i < ep.calls.len()) {
        if ep.calls[i].fetch_add(1, Ordering::Relaxed) == 0 {
            ep.first_call_ms[i].store(now_ms(), Ordering::Relaxed);
            ep.distinct.fetch_add(1, Ordering::Relaxed);
        }
    }
    Json(json!({"access_token": "fresh", "token_type": "Bearer", "expires_in": 3600}))
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn run(label: &str, url: &str, n: usize) {
    let ep = Arc::new(Endpoint {
        calls: (0..n).map(|_| AtomicU32::new(0)).collect(),
        first_call_ms: (0..n).map(|_| AtomicI64::new(0)).collect(),
        distinct: AtomicUsize::new(0),
        total: AtomicUsize::new(0),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let app = Router::new()
        .route("/token", post(token))
        .with_state(ep.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let keys = Arc::new(KeyRing::from_single_key(generate_key_b64().expose()).expect("key"));
    let store = Store::connect(url).await.expect("connect");
    store.migrate().await.expect("migrate");
    let registry = Registry::new(store.clone(), keys.clone());
    let actor = Actor {
        name: "bench".into(),
        ip: None,
        user_agent: None,
        client_identity: None,
    };
    let provider_id = registry
        .create(
            json!({"profile": {
                "name": "bench", "auth_type": "oauth2", "client_id": "bench-client",
                "client_secret": "bench-secret", "auth_url": format!("{base}/authorize"),
                "token_url": format!("{base}/token"), "scopes": ["a"]
            }}),
            &actor,
        )
        .await
        .expect("provider");
    let expires_at = now_ms() + WINDOW.as_millis() as i64;
    let seeding = Instant::now();
    support::seed(
        url,
        &support::Seed {
            keys: &keys,
            provider_id: &provider_id,
            count: n,
            access_token: |i| format!("at-{i}"),
            expires_at,
            next_refresh_at: now_ms(),
            last_success_at: None,
        },
    )
    .await;
    let seeded_in = seeding.elapsed();

    let settings = RefreshSettings {
        margin: WINDOW,
        ..RefreshSettings::default()
    };
    let rss_before = rss_kib();
    let start = Instant::now();
    let mut replicas = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..REPLICAS {
        // Each replica has its own pool, HTTP client, caches and lease owner id.
        let store = Store::connect(url).await.expect("connect");
        let http = outbound::client(Duration::from_secs(10)).expect("client");
        let writer = AuditWriter::spawn(store.clone(), AuditConfig::default());
        let tokens = Arc::new(Tokens::new(
            store.clone(),
            Registry::new(store.clone(), keys.clone()),
            keys.clone(),
            Arc::new(Discovery::new(http.clone(), store.clone())),
            http,
            writer.sink(),
            settings,
            Arc::new(nexus_broker::tokens::pause::Pauses::new(store.clone())),
        ));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        replicas.push((
            stop,
            tokio::spawn(tokens.refresher().clone().run_worker(stopped)),
        ));
        writers.push(writer);
    }
    let mut rss_peak = rss_before;
    // Bounded: the window plus a minute, then report whatever was reached.
    let deadline = start + WINDOW + Duration::from_secs(60);
    while ep.distinct.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        rss_peak = rss_peak.max(rss_kib());
    }
    let took = start.elapsed();
    // Stop the workers the way the broker does: finish the batch in hand.
    for (stop, worker) in replicas {
        let _ = stop.send(true);
        let _ = worker.await;
    }
    for w in writers {
        w.shutdown().await;
    }
    server.abort();

    let refreshed = ep.distinct.load(Ordering::Relaxed);
    let doubles = ep
        .calls
        .iter()
        .filter(|c| c.load(Ordering::Relaxed) > 1)
        .count();
    let late = ep
        .first_call_ms
        .iter()
        .filter(|t| t.load(Ordering::Relaxed) >= expires_at)
        .count();
    let pending = support::scalar(
        url,
        "SELECT COUNT(*) FROM connections WHERE version = 0 OR lease_owner IS NOT NULL",
    )
    .await;
    println!(
        "{label:<9} n={n:>6}  refreshed {refreshed:>6} in {:>6.1?} ({:>5.0}/s, seeding took {:.1?})  after expiry {late}  double {doubles}  calls {}  not stored {pending}  RSS {} MiB -> peak {} MiB (+{} MiB)",
        took,
        refreshed as f64 / took.as_secs_f64(),
        seeded_in,
        ep.total.load(Ordering::Relaxed),
        rss_before / 1024,
        rss_peak / 1024,
        rss_peak.saturating_sub(rss_before) / 1024,
    );
    store.close().await;
}

#[tokio::main]
async fn main() {
    // One crypto provider for the process, as the binary does.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sizes: Vec<usize> = std::env::var("BENCH_CONNECTIONS")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    for n in sizes {
        support::on_each_backend(|label, url| async move { run(label, &url, n).await }).await;
    }
}
