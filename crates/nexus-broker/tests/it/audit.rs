//! Audit: provider mutations are audited with caller details; the batching
//! writer flushes on shutdown, pushes back when full, and never loses events
//! silently.

use std::time::Duration;

use nexus_broker::events::audit::AuditConfig;
use nexus_broker::events::audit::{AuditEvent, AuditWriter};
use nexus_broker::store::AuditFilter;
use reqwest::Method;
use serde_json::json;

use crate::harness::{backend_tests, Backend, TestBroker, TestDb};
use crate::providers::{api_key_profile, oauth_profile};

async fn mutations_are_audited_and_filterable(b: Backend) {
    let t = TestBroker::start(&b).await;
    let g = t.create_provider(oauth_profile("google")).await;
    let w = t.create_provider(api_key_profile("weather")).await;
    t.post(&format!("/providers/{g}/aliases"), json!({"alias": "gp"}))
        .await;
    t.call(
        Method::PATCH,
        &format!("/providers/{g}"),
        Some(json!({"profile": {"category": "x"}})),
    )
    .await;
    t.call(Method::DELETE, &format!("/providers/{w}"), None)
        .await;

    let (_, all) = t.get("/audit").await;
    let types: Vec<&str> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "provider.deleted",
            "provider.updated",
            "provider.alias_added",
            "provider.created",
            "provider.created"
        ],
        "newest first"
    );
    let first = &all["events"][4];
    assert_eq!(first["actor"], "admin");
    assert_eq!(first["ip"], "127.0.0.1");
    assert!(first["occurred_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(all["events"][1]["detail"]["changed"], json!(["category"]));

    let (_, created) = t.get("/audit?event_type=provider.created&order=asc").await;
    assert_eq!(created["count"], 2);
    assert_eq!(created["events"][0]["provider_id"], g);
    let (_, one) = t.get("/audit?limit=1").await;
    assert_eq!(one["count"], 1);
    let (_, by_provider) = t.get(&format!("/audit?provider_id={w}")).await;
    assert_eq!(by_provider["count"], 2);
    let (_, future) = t.get("/audit?since=2999-01-01T00:00:00Z").await;
    assert_eq!(future["count"], 0);
    let (_, past) = t.get("/audit?since=0").await;
    assert_eq!(past["count"], 5);
    let (_, none) = t.get("/audit?connection_id=nope").await;
    assert_eq!(none["count"], 0);
    t.finish().await;
}

fn event(i: usize) -> AuditEvent {
    AuditEvent::new("token.fetched")
        .connection(format!("c{i}"))
        .detail(json!({"i": i}))
}

async fn writer_batches_and_flushes_on_shutdown(b: Backend) {
    let db = TestDb::new(&b).await;
    let store = db.store().await;
    // A flush interval far beyond the test: only shutdown can write these.
    let writer = AuditWriter::spawn(
        store.clone(),
        AuditConfig {
            queue_capacity: 1000,
            max_batch: 100,
            flush_interval: Duration::from_secs(3600),
        },
    );
    let sink = writer.sink();
    for i in 0..250 {
        sink.record(event(i)).await.unwrap();
    }
    let stats = writer.shutdown().await;
    assert_eq!(stats.written, 250);
    assert_eq!(stats.dropped, 0);
    assert!(stats.batches >= 3, "{stats:?}");
    let rows = store
        .query_audit(&AuditFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rows.len(), 250);
    // After shutdown the sink refuses, loudly.
    assert!(sink.record(event(999)).await.is_err());
    store.close().await;
    db.drop_db().await;
}

async fn writer_flushes_on_its_interval_and_pushes_back_when_full(b: Backend) {
    let full_before = crate::harness::counter("nexus_audit_queue_full_total");
    let db = TestDb::new(&b).await;
    let store = db.store().await;
    let writer = AuditWriter::spawn(
        store.clone(),
        AuditConfig {
            queue_capacity: 4,
            max_batch: 8,
            flush_interval: Duration::from_millis(20),
        },
    );
    // 16 concurrent producers, 25 events each, through a queue of 4.
    let mut tasks = Vec::new();
    for p in 0..16 {
        let sink = writer.sink();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                sink.record(event(p * 100 + i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Written by the interval flush, without a shutdown (bounded wait).
    let mut seen = 0;
    for _ in 0..200 {
        seen = store
            .query_audit(&AuditFilter {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .len();
        if seen == 400 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(seen, 400);
    assert!(
        crate::harness::counter("nexus_audit_queue_full_total") > full_before,
        "16 producers through a queue of 4 must have waited"
    );
    let stats = writer.shutdown().await;
    assert_eq!(stats.written, 400);
    store.close().await;
    db.drop_db().await;
}

async fn writer_counts_what_it_cannot_write(b: Backend) {
    crate::harness::init_logs();
    let db = TestDb::new(&b).await;
    let store = db.store().await;
    let writer = AuditWriter::spawn(
        store.clone(),
        AuditConfig {
            queue_capacity: 100,
            max_batch: 100,
            flush_interval: Duration::from_secs(3600),
        },
    );
    let sink = writer.sink();
    for i in 0..10 {
        sink.record(event(i)).await.unwrap();
    }
    // The table disappears under the writer: shutdown cannot write and must say so.
    db.exec("DROP TABLE audit_events").await;
    let stats = writer.shutdown().await;
    assert_eq!(stats.written, 0);
    assert_eq!(stats.dropped, 10);
    assert!(crate::harness::logs().contains("audit events could not be written at shutdown"));
    store.close().await;
    db.drop_db().await;
}

async fn writer_shutdown_is_prompt_while_the_database_is_down(b: Backend) {
    crate::harness::init_logs();
    let db = TestDb::new(&b).await;
    let store = db.store().await;
    let writer = AuditWriter::spawn(
        store.clone(),
        AuditConfig {
            queue_capacity: 100,
            max_batch: 100,
            flush_interval: Duration::from_millis(10),
        },
    );
    let sink = writer.sink();
    store.close().await;
    for i in 0..3 {
        sink.record(event(i)).await.unwrap();
    }
    // Let it start retrying against the closed pool.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = tokio::time::timeout(Duration::from_secs(15), writer.shutdown())
        .await
        .expect("shutdown must not hang while the database is down");
    assert_eq!(stats.written, 0);
    assert_eq!(stats.dropped, 3);
    db.drop_db().await;
}

async fn a_poison_event_does_not_wedge_the_queue(b: Backend) {
    crate::harness::init_logs();
    let db = TestDb::new(&b).await;
    let store = db.store().await;
    // A CHECK that refuses one event type stands in for any event the database rejects.
    let poison = if db.url.starts_with("sqlite:") {
        "CREATE TRIGGER poison BEFORE INSERT ON audit_events WHEN NEW.event_type = 'poison' BEGIN SELECT RAISE(ABORT, 'poison'); END"
    } else {
        "ALTER TABLE audit_events ADD CONSTRAINT no_poison CHECK (event_type <> 'poison')"
    };
    db.exec(poison).await;
    let writer = AuditWriter::spawn(
        store.clone(),
        AuditConfig {
            queue_capacity: 100,
            max_batch: 100,
            flush_interval: Duration::from_millis(10),
        },
    );
    let sink = writer.sink();
    sink.record(event(1)).await.unwrap();
    sink.record(AuditEvent::new("poison")).await.unwrap();
    sink.record(event(2)).await.unwrap();
    // The good events arrive without a shutdown: the batch was split.
    let mut seen = 0;
    for _ in 0..200 {
        seen = store
            .query_audit(&AuditFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .len();
        if seen == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(seen, 2);
    let stats = writer.shutdown().await;
    assert_eq!((stats.written, stats.dropped), (2, 1));
    store.close().await;
    db.drop_db().await;
}

backend_tests!(
    writer_shutdown_is_prompt_while_the_database_is_down,
    a_poison_event_does_not_wedge_the_queue,
    mutations_are_audited_and_filterable,
    writer_batches_and_flushes_on_shutdown,
    writer_flushes_on_its_interval_and_pushes_back_when_full,
    writer_counts_what_it_cannot_write,
);
