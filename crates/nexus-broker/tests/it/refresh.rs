//! The refresh engine: background refresh ahead of expiry, one refresh across
//! replicas, leases that outlive a crash only briefly, backoff instead of
//! storms.

use std::sync::Arc;
use std::time::Duration;

use nexus_broker::config::Settings;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::fake_idp::{FakeIdp, TokenMode};
use crate::handshake::{callback, start};
use crate::harness::{
    assert_json_error, backend_tests, eventually, wait_until, Backend, TestBroker,
};

/// [`crate::tokens::connected`], with the provider's next refresh answer set
/// to `access-2` / `refresh-2` (an hour long).
async fn connected(
    b: &Backend,
    expires_in: i64,
    adjust: impl FnOnce(&mut Settings),
) -> (TestBroker, Arc<FakeIdp>, String) {
    let (t, idp, id) = crate::tokens::connected(b, expires_in, adjust).await;
    {
        let mut k = idp.knobs();
        k.expires_in = 3600;
        k.access_token = "access-2".into();
        k.refresh_token = "refresh-2".into();
    }
    (t, idp, id)
}

async fn background_worker_refreshes_ahead_of_expiry(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |s| s.refresh_worker = Some("true".into())).await;
    // Nobody asks for a token: the worker alone refreshes (bounded wait).
    wait_until(|| idp.counters().refresh_requests > 0).await;
    assert_eq!(idp.counters().refresh_requests, 1);
    // The provider answered; the result is stored a moment later.
    let now = nexus_broker::store::now_ms();
    let store = t.state.store().clone();
    let c = eventually(
        || {
            let (store, id) = (store.clone(), id.clone());
            async move { store.get_connection(&id).await.unwrap().unwrap() }
        },
        |c| c.next_refresh_at.is_some_and(|n| n > now + 3_000_000),
    )
    .await;
    let next = c.next_refresh_at.unwrap();
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
        tasks.push(broker.spawn_call(Method::GET, &format!("/connections/{id}/token")));
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
    let (t, idp, id) = connected(&b, 60, |s| s.refresh_lease_secs = Some("3".into())).await;
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
    assert!(
        idp.counters().last_refresh_at >= until,
        "nobody called the provider while the crashed broker's lease held"
    );
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
    let mut settings = t.settings.clone();
    let db = t.stop().await;

    // When the day is up, a broker running the worker refreshes it.
    db.exec(&format!(
        "UPDATE connections SET next_refresh_at = 0 WHERE id = '{}'",
        flow.connection_id
    ))
    .await;
    settings.refresh_worker = Some("true".into());
    let t = TestBroker::start_on(db, settings).await;
    // Bounded wait for the refresh to be stored.
    let store = t.state.store().clone();
    let (store, id) = (&store, &flow.connection_id);
    let next = eventually(
        || async move {
            let c = store.get_connection(id).await.unwrap().unwrap();
            c.next_refresh_at.unwrap_or(0)
        },
        |next| *next > 0,
    )
    .await;
    assert_eq!(idp.counters().refresh_requests, 1);
    assert!(
        next > nexus_broker::store::now_ms() + day - 60_000,
        "next keep-alive in a day"
    );
    t.finish().await;
}

async fn a_revocation_during_a_refresh_wins(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |_| {}).await;
    idp.knobs().token_mode = TokenMode::Slow(Duration::from_millis(800));
    let fetch = t.spawn_call(Method::GET, &format!("/connections/{id}/token"));
    // The refresh is at the provider; meanwhile the connection is revoked
    // (by an operator, or another replica).
    wait_until(|| idp.counters().refresh_requests >= 1).await;
    t.db.exec(&format!(
        "UPDATE connections SET status = 'revoked' WHERE id = '{id}'"
    ))
    .await;
    let (s, body) = fetch.await.unwrap();
    assert_json_error(s, &body, 410, "connection_revoked");
    let (s, body) = t.get(&format!("/connections/{id}/token")).await;
    assert_json_error(s, &body, 410, "connection_revoked");
    let c = t.state.store().get_connection(&id).await.unwrap().unwrap();
    assert_eq!(c.status, "revoked", "the refresh did not resurrect it");
    t.finish().await;
}

async fn a_waiter_takes_the_holders_failure_instead_of_calling_again(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |_| {}).await;
    // Another replica holds the lease and is calling the provider.
    let until = nexus_broker::store::now_ms() + 5_000;
    t.db.exec(&format!("UPDATE connections SET lease_owner = 'other-broker', lease_until = {until} WHERE id = '{id}'")).await;
    let fetch = t.spawn_call(Method::GET, &format!("/connections/{id}/token"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // That replica's refresh fails (provider down): it records the failure
    // and a retry, and gives the lease back.
    let now = nexus_broker::store::now_ms();
    t.db.exec(&format!(
        "UPDATE connections SET lease_owner = NULL, lease_until = NULL, consecutive_failures = 1,
            last_failure_at = {now}, error_code = 'provider_unavailable', next_refresh_at = {}
         WHERE id = '{id}'",
        now + 60_000
    ))
    .await;
    let (s, tok) = fetch.await.unwrap();
    assert_eq!(s, StatusCode::OK, "{tok}");
    assert_eq!(tok["access_token"], "access-1", "the still-valid token");
    assert_eq!(
        idp.counters().refresh_requests,
        0,
        "no second call with the same refresh token"
    );
    t.finish().await;
}

async fn a_deleted_provider_is_not_rescheduled_forever(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |_| {}).await;
    let (_, c) = t.get(&format!("/connections/{id}")).await;
    let provider_id = c["provider_id"].as_str().unwrap().to_string();
    let (s, body) = t
        .call(Method::DELETE, &format!("/providers/{provider_id}"), None)
        .await;
    assert!(s.is_success(), "{s} {body}");
    // Now a broker with the worker finds the connection due.
    let mut settings = t.settings.clone();
    settings.refresh_worker = Some("true".into());
    let t = TestBroker::start_on(t.stop().await, settings).await;
    let store = t.state.store().clone();
    let (store, cid) = (&store, &id);
    let c = eventually(
        || async move { store.get_connection(cid).await.unwrap().unwrap() },
        |c| c.error_code.as_deref() == Some("provider_deleted"),
    )
    .await;
    assert_eq!(c.error_code.as_deref(), Some("provider_deleted"));
    assert_eq!(c.next_refresh_at, None, "no longer scheduled");
    assert_eq!(c.consecutive_failures, 1, "tried once, not in a loop");
    assert!(c.last_failure_at.is_some());
    assert_eq!(idp.counters().refresh_requests, 0);
    t.finish().await;
}

async fn retry_after_is_honoured_and_bounded(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |_| {}).await;
    for (header, at_least, at_most) in [
        ("120", 120_000, 900_000),
        ("999999999", 3_000_000, 3_600_000),
    ] {
        {
            let mut k = idp.knobs();
            k.token_mode = TokenMode::Raw(429, r#"{"error":"slow_down"}"#);
            k.retry_after = Some(header);
        }
        let now = nexus_broker::store::now_ms();
        let (s, _) = t.get(&format!("/connections/{id}/token")).await;
        assert_eq!(s, StatusCode::OK);
        let c = t.state.store().get_connection(&id).await.unwrap().unwrap();
        let wait = c.next_refresh_at.unwrap() - now;
        assert!(
            wait >= at_least && wait <= at_most + 1_000,
            "Retry-After {header}: retry in {wait} ms"
        );
        t.db.exec(&format!(
            "UPDATE connections SET next_refresh_at = 0 WHERE id = '{id}'"
        ))
        .await;
    }
    t.finish().await;
}

async fn forced_refreshes_respect_the_cooldown(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |_| {}).await;
    idp.knobs().token_mode = TokenMode::ServerError;
    for _ in 0..5 {
        let (s, tok) = t
            .post(&format!("/connections/{id}/refresh"), json!({}))
            .await;
        assert_eq!(s, StatusCode::OK, "{tok}");
        assert_eq!(tok["access_token"], "access-1");
    }
    assert_eq!(
        idp.counters().refresh_requests,
        1,
        "one call, then the backoff holds"
    );
    t.finish().await;
}

async fn an_expired_token_without_refresh_token_needs_a_person(b: Backend) {
    let idp = FakeIdp::start().await;
    {
        let mut k = idp.knobs();
        k.refresh_token = String::new();
        k.expires_in = 0;
    }
    let t = TestBroker::start_public(&b, |_| {}).await;
    t.create_provider(idp.profile("fake")).await;
    let flow = start(&t, &idp, "fake", json!({})).await;
    callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    let id = flow.connection_id;
    let (s, body) = t.get(&format!("/connections/{id}/token")).await;
    assert_json_error(s, &body, 409, "attention_required");
    let (_, c) = t.get(&format!("/connections/{id}")).await;
    assert_eq!(c["status"], "attention_required", "{c}");
    assert_eq!(c["error_code"], "no_refresh_token");
    let (_, status) = t.get("/workspaces/ws-1/connections/status").await;
    assert_eq!(status["any_needs_attention"], true, "{status}");
    let (_, audit) = t
        .get(&format!(
            "/audit?event_type=connection.attention_required&connection_id={id}"
        ))
        .await;
    assert_eq!(audit["count"], 1);
    assert_eq!(idp.counters().refresh_requests, 0);
    t.finish().await;
}

/// Rotated tokens the database refused at commit time are kept and stored
/// when it answers again; the old refresh token is never sent twice.
async fn rotated_tokens_survive_a_database_blip_at_commit(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |_| {}).await;
    let before = t.state.store().get_connection(&id).await.unwrap().unwrap();
    idp.knobs().token_mode = TokenMode::Slow(Duration::from_millis(800));
    let fetch = t.spawn_call(Method::GET, &format!("/connections/{id}/token"));
    // The refresh token is at the provider, which rotates it; the database
    // goes away before the answer comes back.
    wait_until(|| idp.counters().refresh_requests >= 1).await;
    assert_eq!(idp.counters().last_token_form["refresh_token"], "refresh-1");
    t.db.exec("ALTER TABLE connections RENAME TO connections_away")
        .await;
    let (s, body) = fetch.await.unwrap();
    assert!(s.is_server_error(), "{s} {body}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    t.db.exec("ALTER TABLE connections_away RENAME TO connections")
        .await;
    // The kept tokens are committed once the database answers.
    let store = t.state.store().clone();
    let c = eventually(
        || {
            let (store, id) = (store.clone(), id.clone());
            async move { store.get_connection(&id).await.unwrap().unwrap() }
        },
        |c| c.version > before.version,
    )
    .await;
    assert_eq!(c.refresh_started_at, None, "the intent is cleared");
    idp.knobs().token_mode = TokenMode::Normal;
    let (s, tok) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(s, StatusCode::OK, "{tok}");
    assert_eq!(tok["access_token"], "access-2");
    assert_eq!(idp.counters().refresh_requests, 1, "no second refresh");
    // The next refresh sends the rotated refresh token, not the old one.
    idp.knobs().refresh_token = "refresh-3".into();
    let (s, tok) = t
        .post(&format!("/connections/{id}/refresh"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{tok}");
    assert_eq!(idp.counters().refresh_requests, 2);
    assert_eq!(idp.counters().last_token_form["refresh_token"], "refresh-2");
    t.finish().await;
}

/// A broker took the lease, sent the refresh token and died before storing
/// the answer: the next replica waits out the commit grace, and when the
/// provider refuses the (spent) refresh token, says the refresh was
/// interrupted instead of blaming the person.
async fn a_refresh_cut_off_after_the_call_is_reported_as_interrupted(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |s| {
        s.refresh_lease_secs = Some("3".into());
        s.refresh_commit_grace_secs = Some("1".into());
    })
    .await;
    let now = nexus_broker::store::now_ms();
    let until = now + 500;
    t.db.exec(&format!(
        "UPDATE connections SET lease_owner = 'killed-broker', lease_until = {until}, refresh_started_at = {} WHERE id = '{id}'",
        now - 100
    ))
    .await;
    // The provider rotated the refresh token for the killed broker and now
    // refuses the old one (strict reuse detection).
    idp.knobs().token_mode = TokenMode::Error("invalid_grant");
    let (s, body) = t.get(&format!("/connections/{id}/token")).await;
    assert_json_error(s, &body, 409, "attention_required");
    assert!(
        idp.counters().last_refresh_at >= until + 1000,
        "the provider was called only after the lease and the commit grace"
    );
    let (_, c) = t.get(&format!("/connections/{id}")).await;
    assert_eq!(c["status"], "attention_required", "{c}");
    assert_eq!(c["error_code"], "refresh_interrupted", "{c}");
    // Recorded through the audit writer, a moment after the transition.
    let path = format!("/audit?event_type=connection.refresh_interrupted&connection_id={id}");
    let (_, audit) = eventually(|| t.get(&path), |(_, a)| a["count"] == 1).await;
    assert_eq!(audit["count"], 1, "{audit}");
    assert!(audit["events"][0]["detail"]["interrupted_refresh_started_at"].is_i64());
    let (_, audit) = t
        .get(&format!(
            "/audit?event_type=connection.attention_required&connection_id={id}"
        ))
        .await;
    assert_eq!(audit["count"], 1, "{audit}");
    assert_eq!(
        audit["events"][0]["detail"]["cause"], "refresh_interrupted",
        "{audit}"
    );
    assert_eq!(
        t.db.scalar("SELECT COUNT(*) FROM webhook_messages WHERE payload LIKE '%refresh_interrupted%' AND payload LIKE '%consent-spec%'")
            .await,
        Some(1),
        "one webhook event, with the reconsent hint"
    );
    t.finish().await;
}

/// The cut-off holder is still alive and commits late (its database came
/// back): the replica that took over its lease takes that result and never
/// calls the provider with the spent refresh token.
async fn a_late_commit_within_the_grace_wins_over_a_takeover(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |s| {
        s.refresh_lease_secs = Some("3".into());
        s.refresh_commit_grace_secs = Some("5".into());
    })
    .await;
    let now = nexus_broker::store::now_ms();
    t.db.exec(&format!(
        "UPDATE connections SET lease_owner = 'cut-off-broker', lease_until = {}, refresh_started_at = {} WHERE id = '{id}'",
        now - 1, now - 100
    ))
    .await;
    let fetch = t.spawn_call(Method::GET, &format!("/connections/{id}/token"));
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The holder's late commit: a new version, the token an hour long.
    t.db.exec(&format!(
        "UPDATE connections SET version = version + 1, last_success_at = {now}, expires_at = {},
            refresh_started_at = NULL, lease_owner = NULL, lease_until = NULL WHERE id = '{id}'",
        now + 3_600_000
    ))
    .await;
    let (s, tok) = fetch.await.unwrap();
    assert_eq!(s, StatusCode::OK, "{tok}");
    assert_eq!(
        idp.counters().refresh_requests,
        0,
        "the spent refresh token never went out again"
    );
    t.finish().await;
}

/// A call that got no answer (timeout) may have rotated the refresh token:
/// the intent stays, and a refusal on the next attempt reads as interrupted.
async fn a_refresh_without_an_answer_keeps_its_intent(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |s| {
        s.refresh_commit_grace_secs = Some("1".into());
    })
    .await;
    idp.knobs().token_mode = TokenMode::Slow(Duration::from_millis(1500));
    let (s, tok) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(s, StatusCode::OK, "the still-valid token: {tok}");
    let c = t.state.store().get_connection(&id).await.unwrap().unwrap();
    assert!(c.refresh_started_at.is_some(), "the intent stays");
    assert_eq!(c.error_code.as_deref(), Some("provider_unavailable"));
    // A later attempt that gets an answer (a 500) learns nothing about the
    // call that got none: the intent stays.
    idp.knobs().token_mode = TokenMode::ServerError;
    t.db.exec(&format!(
        "UPDATE connections SET next_refresh_at = 0 WHERE id = '{id}'"
    ))
    .await;
    let (s, tok) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(s, StatusCode::OK, "{tok}");
    let c = t.state.store().get_connection(&id).await.unwrap().unwrap();
    assert_eq!(c.consecutive_failures, 2);
    assert!(c.refresh_started_at.is_some(), "the intent stays");
    idp.knobs().token_mode = TokenMode::Error("invalid_grant");
    t.db.exec(&format!(
        "UPDATE connections SET next_refresh_at = 0 WHERE id = '{id}'"
    ))
    .await;
    let (s, body) = t.get(&format!("/connections/{id}/token")).await;
    assert_json_error(s, &body, 409, "attention_required");
    let (_, c) = t.get(&format!("/connections/{id}")).await;
    assert_eq!(c["error_code"], "refresh_interrupted", "{c}");
    t.finish().await;
}

/// Found by the soak: with an earlier call unanswered, the intent kept that
/// call's time, older than the failure it recorded, so a replica taking
/// over while a later call was in flight (or its commit pending) took the
/// intent for settled and replayed the old refresh token. The intent must
/// say when the latest call went out.
async fn the_intent_tells_the_latest_call_not_the_first(b: Backend) {
    let (t, idp, id) = connected(&b, 60, |_| {}).await;
    idp.knobs().token_mode = TokenMode::Slow(Duration::from_millis(1500));
    let (s, _) = t.get(&format!("/connections/{id}/token")).await;
    assert_eq!(s, StatusCode::OK);
    idp.knobs().token_mode = TokenMode::Slow(Duration::from_millis(800));
    t.db.exec(&format!(
        "UPDATE connections SET next_refresh_at = 0 WHERE id = '{id}'"
    ))
    .await;
    let fetch = t.spawn_call(Method::GET, &format!("/connections/{id}/token"));
    wait_until(|| idp.counters().refresh_requests >= 2).await;
    let c = t.state.store().get_connection(&id).await.unwrap().unwrap();
    assert!(
        c.refresh_started_at > c.last_failure_at,
        "the call in flight is newer than the recorded failure: {:?} {:?}",
        c.refresh_started_at,
        c.last_failure_at
    );
    let (s, tok) = fetch.await.unwrap();
    assert_eq!(s, StatusCode::OK, "{tok}");
    assert_eq!(tok["access_token"], "access-2");
    t.finish().await;
}

/// A PostgreSQL database that stops taking sessions (restarting, or closed
/// by an operator) answers 503 `database_unavailable`, not 500 (the soak
/// found the 500). PostgreSQL only, on a database of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_refusing_sessions_is_503_on_postgres() {
    let Some(Backend::Postgres(admin_url)) = Backend::postgres() else {
        return;
    };
    let name = format!("nxt_db_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
    let run = |sql: String| {
        let admin = admin.clone();
        async move { sqlx::query(&sql).execute(&admin).await.unwrap() }
    };
    run(format!("CREATE DATABASE {name}")).await;
    let (base, query) = admin_url.split_once('?').unwrap_or((&admin_url, ""));
    let (server, _) = base.rsplit_once('/').unwrap();
    let url = if query.is_empty() {
        format!("{server}/{name}")
    } else {
        format!("{server}/{name}?{query}")
    };
    let db = crate::harness::TestDb::at(url);
    let settings = crate::harness::test_settings(&db);
    let t = TestBroker::start_on(db, settings).await;
    let (s, _) = t.get("/providers").await;
    assert_eq!(s, StatusCode::OK);
    run(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false")).await;
    run(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    ))
    .await;
    let (s, body) = t.get("/providers").await;
    assert_json_error(s, &body, 503, "database_unavailable");
    run(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).await;
    let (s, _) = t.get("/providers").await;
    assert_eq!(s, StatusCode::OK, "served again once the database is back");
    t.stop().await;
    run(format!("DROP DATABASE {name} WITH (FORCE)")).await;
    admin.close().await;
}

backend_tests!(
    background_worker_refreshes_ahead_of_expiry,
    two_replicas_refresh_once,
    a_crashed_refreshers_lease_expires,
    transient_failures_back_off_instead_of_storming,
    database_down_is_503_without_calling_the_provider,
    tokens_without_expiry_get_a_keepalive,
    a_revocation_during_a_refresh_wins,
    a_waiter_takes_the_holders_failure_instead_of_calling_again,
    a_deleted_provider_is_not_rescheduled_forever,
    retry_after_is_honoured_and_bounded,
    forced_refreshes_respect_the_cooldown,
    an_expired_token_without_refresh_token_needs_a_person,
    rotated_tokens_survive_a_database_blip_at_commit,
    a_refresh_cut_off_after_the_call_is_reported_as_interrupted,
    a_late_commit_within_the_grace_wins_over_a_takeover,
    a_refresh_without_an_answer_keeps_its_intent,
    the_intent_tells_the_latest_call_not_the_first,
);
