//! The credential cache against a fake gateway: single flight, ahead of
//! expiry, backoff, never expired, no retry storm.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use nexus_bridge::{Bridge, BridgeError, CacheSettings};

use crate::fake::{Gateway, Mode};

pub fn bridge(g: &Gateway, settings: CacheSettings) -> Bridge {
    Bridge::builder(&g.url, "nxa_test")
        .cache_settings(settings)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

fn quick() -> CacheSettings {
    CacheSettings {
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(200),
        min_refetch: Duration::from_millis(100),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tasks_cause_one_fetch() {
    let g = Gateway::start(Mode::Ok { expires_in: 3600 }).await;
    *g.delay.lock().unwrap() = Duration::from_millis(100);
    let b = bridge(&g, quick());
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move { b.token("c1").await })
        })
        .collect();
    for t in tasks {
        let c = t.await.unwrap().unwrap();
        assert_eq!(c.secret("access_token").unwrap().expose(), "at-1");
    }
    assert_eq!(g.tokens.load(Ordering::SeqCst), 1);
    // Another connection is another fetch.
    b.token("c2").await.unwrap();
    assert_eq!(g.tokens.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshed_ahead_of_expiry_and_never_served_expired() {
    // Two-second tokens: the bridge must come back before each expires.
    let g = Gateway::start(Mode::Ok { expires_in: 2 }).await;
    let b = bridge(&g, quick());
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..100 {
        let c = b.token("c1").await.unwrap();
        assert!(c.usable_at(SystemTime::now()), "never expired");
        seen.insert(c.secret("access_token").unwrap().expose().to_string());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen.len() >= 2, "re-fetched ahead of expiry: {seen:?}");
    // Five seconds of two-second tokens: a handful of fetches, not one per call.
    assert!(
        g.tokens.load(Ordering::SeqCst) <= 10,
        "{}",
        g.tokens.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_outage_backs_off_and_serves_only_what_still_works() {
    let g = Gateway::start(Mode::Ok { expires_in: 2 }).await;
    let b = bridge(&g, quick());
    let first = b.token("c1").await.unwrap();
    g.set(Mode::Fail(503, "broker_unavailable"));
    let before = g.calls();
    let mut errors = 0;
    for _ in 0..300 {
        match b.token("c1").await {
            Ok(c) => {
                assert!(c.usable_at(SystemTime::now()), "never expired");
                assert_eq!(
                    c.generation, first.generation,
                    "only the old credentials exist"
                );
            }
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                errors += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(errors > 0, "after expiry the outage shows");
    let during = g.calls() - before;
    assert!(
        during < 100,
        "backoff: {during} gateway calls for 300 requests"
    );
    g.set(Mode::Ok { expires_in: 3600 });
    let mut back = None;
    for _ in 0..100 {
        if let Ok(c) = b.token("c1").await {
            back = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back.unwrap().generation > first.generation, "recovered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_needs_a_person_is_not_retried() {
    let g = Gateway::start(Mode::Fail(409, "attention_required")).await;
    let b = bridge(&g, quick());
    for _ in 0..200 {
        let e = b.token("c1").await.unwrap_err();
        assert!(matches!(e, BridgeError::InteractionRequired { .. }), "{e}");
        assert!(!e.is_retryable());
    }
    assert_eq!(g.calls(), 1, "asked once, then held");
    // A revoked connection likewise.
    let b = bridge(&g, quick());
    g.set(Mode::Fail(410, "connection_revoked"));
    for _ in 0..50 {
        assert!(matches!(
            b.token("c2").await,
            Err(BridgeError::InteractionRequired { .. })
        ));
    }
    assert_eq!(g.calls(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_asks_again_after_a_person_acted_but_keeps_an_outage_backoff() {
    let g = Gateway::start(Mode::Fail(409, "attention_required")).await;
    let b = bridge(&g, quick());
    assert!(b.token("c1").await.is_err());
    assert!(b.token("c1").await.is_err());
    assert_eq!(g.calls(), 1, "held");
    // The person reconnected: once forgotten, the next call asks.
    g.set(Mode::Ok { expires_in: 3600 });
    b.forget("c1");
    let first = b.token("c1").await.unwrap();
    assert_eq!(g.calls(), 2);
    // Valid credentials are dropped too (a new grant replaces them).
    b.forget("c1");
    let second = b.token("c1").await.unwrap();
    assert!(second.generation > first.generation);
    assert_eq!(g.calls(), 3);
    // An outage's backoff is not wiped: forgetting does not storm it.
    g.set(Mode::Fail(503, "broker_unavailable"));
    b.forget("c1");
    assert!(b.token("c1").await.is_err());
    let during = g.calls();
    for _ in 0..20 {
        b.forget("c1");
        assert!(b.token("c1").await.unwrap_err().is_retryable());
    }
    assert!(g.calls() - during < 12, "{} calls", g.calls() - during);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_stops_the_use_of_cached_credentials() {
    let g = Gateway::start(Mode::Ok { expires_in: 3600 }).await;
    let b = bridge(&g, quick());
    b.token("c1").await.unwrap();
    g.set(Mode::Fail(423, "issuance_paused"));
    let e = b.refresh("c1").await.unwrap_err();
    assert!(
        matches!(&e, BridgeError::Paused { reason, .. } if reason == "fake pause"),
        "{e}"
    );
    assert!(
        matches!(b.token("c1").await, Err(BridgeError::Paused { .. })),
        "cached credentials dropped"
    );
    g.set(Mode::Ok { expires_in: 3600 });
    let mut ok = false;
    for _ in 0..100 {
        if b.token("c1").await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "served again after the pause");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recheck_bounds_how_long_hour_long_credentials_are_trusted() {
    // A pause or a revocation must reach a busy proxy within `recheck`,
    // even while its token has an hour left.
    let g = Gateway::start(Mode::Ok { expires_in: 3600 }).await;
    let b = bridge(
        &g,
        CacheSettings {
            recheck: Some(Duration::from_millis(200)),
            ..quick()
        },
    );
    b.token("c1").await.unwrap();
    for _ in 0..10 {
        b.token("c1").await.unwrap();
    }
    assert_eq!(g.tokens.load(Ordering::SeqCst), 1, "cached meanwhile");
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.token("c1").await.unwrap();
    assert_eq!(
        g.tokens.load(Ordering::SeqCst),
        2,
        "asked again after recheck"
    );
}
