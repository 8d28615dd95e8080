//! The refresh engine: background refresh ahead of expiry, one refresh across
//! replicas, leases that outlive a crash only briefly, backoff instead of
//! storms.

use std::sync::Arc;
use std::time::Duration;

use nexus_broker::config::Settings;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::fake_idp::{FakeIdp, TokenMode};
use crate::handshake::{callback, start};
use crate::harness::{assert_json_error, backend_tests, Backend, TestBroker};

/// A broker (settings adjusted) with an active connection whose token expires in `expires_in` s.
async fn connected(
    b: &Backend,
    expires_in: i64,
    adjust: impl FnOnce(&mut Settings),
) -> (TestBroker, Arc<FakeIdp>, String) {
    let idp = FakeIdp::start().await;
    let t = TestBroker::start_public(b, |s| {
        s.provider_timeout_secs = Some("1".into());
        adjust(s);
    })
    .await;
    t.create_provider(idp.profile("fake")).await;
    {
        let mut k = idp.knobs();
        k.expires_in = expires_in;
        k.access_token = "access-1".into();
        k.refresh_token = "refresh-1".into();
    }
    let flow = start(&t, &idp, "fake", json!({})).await;
    let (s, _, body) = callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER, "{body}");
    {
        let mut k = idp.knobs();
        k.expires_in = 3600;
        k.access_token = "access-2".into();
        k.refresh_token = "refresh-2".into();
    }
    (t, idp, flow.connection_id)
}

async fn background_worker_refreshes_ahead_of_expiry(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |s| s.refresh_worker = Some("true".into())).await;
    // Nobody asks for a token: the worker alone refreshes (bounded wait).
    for _ in 0..100 {
        if idp.counters().refresh_requests > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(idp.counters().refresh_requests, 1);
    let c = t.state.store().get_connection(&id).await.unwrap().unwrap();
    let next = c.next_refresh_at.unwrap();
    let now = nexus_broker::store::now_ms();
    assert!(
        next > now + 3_000_000,
        "next refresh about margin before the new expiry"
    );
    assert!(c.expires_at.unwrap() - next >= 300_000);
    let (_, tok) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(tok["access_token"], "access-2");
    // Stays at one: the fresh token is not refreshed again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(idp.counters().refresh_requests, 1);
    t.finish().await;
}

async fn two_replicas_refresh_once(b: Backend) {
    let (a, idp, id) = connected(&b, 60, |_| {}).await;
    // A second broker process on the same database, same keys.
    let mut settings = a.settings.clone();
    settings.broker_addr = Some("127.0.0.1:0".into());
    let replica = TestBroker::start_on(a.db.share(), settings).await;
    let mut tasks = Vec::new();
    for i in 0..60 {
        let broker = if i % 2 == 0 { &a } else { &replica };
        let (client, url, key) = (
            broker.client.clone(),
            format!("{}/connections/{id}/token", broker.base),
            broker.api_key.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let r = client
                .get(url)
                .header("x-api-key", key)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }));
    }
    for task in tasks {
        let (s, tok) = task.await.unwrap();
        assert_eq!(s, StatusCode::OK, "{tok}");
        assert_eq!(tok["access_token"], "access-2");
    }
    assert_eq!(
        idp.counters().refresh_requests,
        1,
        "one refresh across both replicas"
    );
    replica.stop().await;
    a.finish().await;
}

async fn a_crashed_refreshers_lease_expires(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |s| s.refresh_lease_secs = Some("1".into())).await;
    // A broker took the lease and died mid-refresh.
    let until = nexus_broker::store::now_ms() + 1500;
    t.db.exec(&format!("UPDATE connections SET lease_owner = 'crashed-broker', lease_until = {until} WHERE id = '{id}'")).await;
    let (s, tok) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(s, StatusCode::OK, "{tok}");
    assert_eq!(
        tok["access_token"], "access-2",
        "the lease expired and this broker refreshed"
    );
    assert_eq!(idp.counters().refresh_requests, 1);
    assert_eq!(
        t.db.scalar(&format!(
            "SELECT lease_until FROM connections WHERE id = '{id}'"
        ))
        .await,
        None,
        "no stuck lease"
    );
    t.finish().await;
}

async fn transient_failures_back_off_instead_of_storming(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |_| {}).await;
    idp.knobs().token_mode = TokenMode::ServerError;
    for _ in 0..10 {
        let (s, tok) = t.get(&format!("/connections/{id}/token")).await;
        assert_eq!(s, StatusCode::OK, "{tok}");
        assert_eq!(
            tok["access_token"], "access-1",
            "the still-valid token is served"
        );
    }
    assert_eq!(
        idp.counters().refresh_requests,
        1,
        "one attempt, then the cooldown holds"
    );
    let c = t.state.store().get_connection(&id).await.unwrap().unwrap();
    assert_eq!(c.consecutive_failures, 1);
    assert!(
        c.next_refresh_at.unwrap() > nexus_broker::store::now_ms(),
        "a retry is scheduled"
    );
    assert!(
        c.next_refresh_at.unwrap() <= nexus_broker::store::now_ms() + 11_000,
        "first backoff at most the base"
    );
    // When the retry is due and the provider is back, it recovers on its own.
    idp.knobs().token_mode = TokenMode::Normal;
    t.db.exec(&format!(
        "UPDATE connections SET next_refresh_at = 0 WHERE id = '{id}'"
    ))
    .await;
    let (s, tok) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(tok["access_token"], "access-2");
    let c = t.state.store().get_connection(&id).await.unwrap().unwrap();
    assert_eq!((c.consecutive_failures, c.status.as_str()), (0, "active"));
    t.finish().await;
}

async fn database_down_is_503_without_calling_the_provider(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |_| {}).await;
    let calls = idp.counters().token_requests;
    t.state.store().close().await;
    let (s, body) = t.get(&format!("/connections/{id}/token")).await;
    assert_json_error(s, &body, 503, "database_unavailable");
    assert_eq!(idp.counters().token_requests, calls);
    t.finish().await;
}

async fn tokens_without_expiry_get_a_keepalive(b: Backend) {
    let idp = FakeIdp::start().await;
    idp.knobs().omit_expiry = true;
    let t = TestBroker::start_public(&b, |_| {}).await;
    t.create_provider(idp.profile("fake")).await;
    let flow = start(&t, &idp, "fake", json!({})).await;
    callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    let c = t
        .state
        .store()
        .get_connection(&flow.connection_id)
        .await
        .unwrap()
        .unwrap();
    assert!(c.expires_at.is_none());
    let next = c
        .next_refresh_at
        .expect("a keep-alive refresh is scheduled");
    let day = 24 * 3_600_000;
    let now = nexus_broker::store::now_ms();
    assert!(
        next > now + day - 60_000 && next <= now + day,
        "{next} vs {now}"
    );
    let (s, tok) = t
        .get(&format!("/connections/{}/token", flow.connection_id))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(tok["expires_at"].is_null());
    t.finish().await;
}

backend_tests!(
    background_worker_refreshes_ahead_of_expiry,
    two_replicas_refresh_once,
    a_crashed_refreshers_lease_expires,
    transient_failures_back_off_instead_of_storming,
    database_down_is_503_without_calling_the_provider,
    tokens_without_expiry_get_a_keepalive,
);
