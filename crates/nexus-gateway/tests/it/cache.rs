//! The gateway's token cache: warm fetches cost no broker round trip, a
//! revocation or pause made at the broker reaches the gateway at once, the
//! tokens it served are audited, and without the broker nothing is served.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::harness::Stack;

async fn wait(cond: impl Fn() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Fetches `id`'s token until the status is `want` (at most 5 s); returns
/// the last answer and how many 200s came before it.
async fn token_until(s: &Stack, key: &str, id: &str, want: StatusCode) -> (StatusCode, Value, u64) {
    for ok in 0..250 {
        let (st, body) = s
            .call(Some(key), Method::GET, &format!("/v1/token/{id}"), None)
            .await;
        if st == want {
            return (st, body, ok);
        }
        assert_eq!(st, StatusCode::OK, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{id} never answered {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_the_cache_over_loopback() {
    changes_reach_the_cache(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_the_cache_in_process() {
    changes_reach_the_cache(true).await;
}

async fn changes_reach_the_cache(in_process: bool) {
    // The broker trusts its entries for a minute here, so only an
    // announcement can explain a change being seen within seconds; served
    // counts are reported by hand below.
    let s = Stack::start_tuned(0, "", in_process, |b, g| {
        b.refresh.cache_max_age = Duration::from_secs(60);
        g.served_report_every = Duration::from_secs(3600);
    })
    .await;
    s.weather().await;
    let (_, key) = s.agent_key(&["*"]).await;
    let a = s.connect(&key, "ws-a").await;
    let b = s.connect(&key, "ws-b").await;
    wait(|| s.gw.tokens.is_live()).await;
    assert!(s.gw.tokens.is_live(), "the change stream said ready");

    let mut served_a = 0;
    // The connections' own activations may still be on their way down the
    // change stream (and drop a first kept answer): fetch until both stay.
    for _ in 0..50 {
        for id in [&a, &b] {
            let (st, tok) = s
                .call(Some(&key), Method::GET, &format!("/v1/token/{id}"), None)
                .await;
            assert_eq!(st, StatusCode::OK, "{tok}");
            assert_eq!(tok["credentials"]["api_key"], "weather-key-123");
        }
        served_a += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        if s.gw.tokens.len() == 2 {
            break;
        }
    }
    assert_eq!(s.gw.tokens.len(), 2, "both answers kept");
    // Served while settling: counted apart, reported with the rest below.
    let settling = s.gw.tokens.take_served();
    for _ in 0..5 {
        let (st, tok) = s
            .call(Some(&key), Method::GET, &format!("/v1/token/{a}"), None)
            .await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(tok["credentials"]["api_key"], "weather-key-123");
        assert!(tok["expires_in"].is_null(), "{tok}");
        served_a += 1;
    }
    let from_cache = s.gw.tokens.take_served();
    assert_eq!(
        from_cache[&a].count, 5,
        "warm fetches never reached the broker"
    );
    s.gw.tokens.restore_served(from_cache);
    s.gw.tokens.restore_served(settling);

    // Revoked at the broker: the gateway stops serving it at once.
    let (st, _) = s
        .admin(Method::DELETE, &format!("/connections/{a}"), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, body, before) = token_until(&s, &key, &a, StatusCode::GONE).await;
    assert_eq!(body["error"], "connection_revoked", "{body}");
    served_a += before;

    // Paused at the broker: 423 at once, and 200 again on resume.
    let (st, _) = s
        .admin(
            Method::PUT,
            "/workspaces/ws-b/pause",
            Some(serde_json::json!({"reason": "incident 7"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let (_, body, _) = token_until(&s, &key, &b, StatusCode::LOCKED).await;
    assert_eq!(body["error"], "issuance_paused");
    s.admin(Method::DELETE, "/workspaces/ws-b/pause", None)
        .await;
    token_until(&s, &key, &b, StatusCode::OK).await;

    // A refresh through the gateway drops the kept answer.
    let (st, _) = s
        .call(Some(&key), Method::POST, &format!("/v1/refresh/{b}"), None)
        .await;
    assert_eq!(st, StatusCode::OK);

    // What the gateway served is audited at the broker with its own.
    nexus_gateway::changes::report_once(&s.gw).await;
    let path = format!("/audit?event_type=token.issued&connection_id={a}&limit=100");
    let mut audited = 0;
    for _ in 0..100 {
        let (_, audit) = s.admin(Method::GET, &path, None).await;
        audited = audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["detail"]["count"].as_u64().unwrap())
            .sum::<u64>();
        if audited == served_a {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(audited, served_a, "every token served is audited once");

    // Nothing of the secret in the gateway's metrics.
    let metrics = s
        .client
        .get(format!("{}/metrics", s.gateway))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("nexus_gateway_token_cache_total"));
    assert!(!metrics.contains("weather-key-123"));
    s.stop().await;
}

/// Without the broker's change stream the gateway cannot know what changed:
/// it keeps nothing and serves nothing from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_broker_nothing_is_served_from_memory() {
    let mut s = Stack::start(0, "").await;
    s.weather().await;
    let (_, key) = s.agent_key(&["*"]).await;
    let a = s.connect(&key, "ws-a").await;
    wait(|| s.gw.tokens.is_live()).await;
    // The connection's own activation may still be on its way down the
    // change stream (and drop the first kept answer): fetch until one stays.
    for _ in 0..50 {
        let (st, _) = s
            .call(Some(&key), Method::GET, &format!("/v1/token/{a}"), None)
            .await;
        assert_eq!(st, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(20)).await;
        if s.gw.tokens.len() == 1 {
            break;
        }
    }
    assert_eq!(s.gw.tokens.len(), 1);
    s.stop_broker();
    wait(|| !s.gw.tokens.is_live()).await;
    assert!(!s.gw.tokens.is_live());
    assert!(s.gw.tokens.is_empty());
    let (st, body) = s
        .call(Some(&key), Method::GET, &format!("/v1/token/{a}"), None)
        .await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "broker_unavailable");
    s.stop().await;
}
