//! Audit writer benchmark: what a request path pays to audit an event.
//!
//! Baseline: one synchronous insert (its own transaction) per event, what a
//! hot path would pay without the writer. Measured: `AuditSink::record` from
//! 64 concurrent tasks through the batching writer, then the time until every
//! event is durable (shutdown flush). Runs on SQLite, and on PostgreSQL when
//! `NEXUS_TEST_DATABASE_URL` is set (in a private schema, dropped afterwards).
//!
//! `cargo bench -p nexus-broker --bench audit_writer`

mod support;

use std::time::{Duration, Instant};

use nexus_broker::events::audit::AuditConfig;
use nexus_broker::events::audit::{AuditEvent, AuditWriter};
use nexus_broker::store::Store;
use serde_json::json;

const BASELINE_EVENTS: usize = 2_000;
const WRITER_EVENTS: usize = 100_000;
const TASKS: usize = 64;

fn event(i: usize) -> AuditEvent {
    AuditEvent::new("token.fetched")
        .connection(format!("conn-{}", i % 1000))
        .workspace("ws-bench")
        .detail(json!({"i": i}))
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

async fn run(label: &str, url: &str) {
    let store = Store::connect(url).await.expect("connect");
    store.migrate().await.expect("migrate");

    // Baseline: synchronous single-event transactions.
    let mut lat = Vec::with_capacity(BASELINE_EVENTS);
    let start = Instant::now();
    for i in 0..BASELINE_EVENTS {
        let t = Instant::now();
        store.insert_audit_batch(&[event(i)]).await.expect("insert");
        lat.push(t.elapsed());
    }
    let base_total = start.elapsed();
    lat.sort();
    let base_rate = BASELINE_EVENTS as f64 / base_total.as_secs_f64();
    println!(
        "{label:<10} sync insert per event : {:>9.0} events/s   p50 {:>8.1?}  p99 {:>8.1?}",
        base_rate,
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );

    // Batching writer, 64 concurrent producers.
    let writer = AuditWriter::spawn(store.clone(), AuditConfig::default());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let sink = writer.sink();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(WRITER_EVENTS / TASKS);
            for i in (t..WRITER_EVENTS).step_by(TASKS) {
                let s = Instant::now();
                sink.record(event(i)).await.expect("record");
                lat.push(s.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::with_capacity(WRITER_EVENTS);
    for t in tasks {
        lat.extend(t.await.expect("task"));
    }
    let recorded = start.elapsed();
    let stats = writer.shutdown().await;
    let durable = start.elapsed();
    lat.sort();
    let rate = WRITER_EVENTS as f64 / durable.as_secs_f64();
    println!(
        "{label:<10} batching writer       : {:>9.0} events/s   record() p50 {:>8.1?}  p99 {:>8.1?}  (all queued {:.2?}, all durable {:.2?}, {} batches)",
        rate,
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        recorded,
        durable,
        stats.batches
    );
    println!(
        "{label:<10} throughput ratio      : {:.1}x",
        rate / base_rate
    );
    assert_eq!(stats.written as usize, WRITER_EVENTS);
    assert_eq!(
        support::scalar(url, "SELECT COUNT(*) FROM audit_events").await as usize,
        BASELINE_EVENTS + WRITER_EVENTS,
        "every event is stored"
    );
    store.close().await;
}

#[tokio::main]
async fn main() {
    support::on_each_backend(|label, url| async move { run(label, &url).await }).await;
}
