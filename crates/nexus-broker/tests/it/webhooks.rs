//! Webhooks: endpoints API, Standard Webhooks signatures (checked with the
//! `standardwebhooks` crate, the specification's own Rust library, not our
//! signer), retries while the receiver is down, delivery after a restart,
//! at-least-once with a stable id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxStatus};
use axum::routing::post;
use axum::Router;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::harness::{assert_json_error, backend_tests, eventually, Backend, TestBroker};
use crate::tokens::connected;

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub id: String,
    pub body: Value,
    pub verified: bool,
    pub answered: u16,
}

/// A webhook receiver on loopback that verifies every request with the
/// Standard Webhooks library and can be made to fail or go away.
pub struct Receiver {
    pub url: String,
    port: u16,
    secret: Mutex<Option<String>>,
    got: Mutex<Vec<Received>>,
    fail_next: AtomicUsize,
    server: Mutex<Option<oneshot::Sender<()>>>,
}

async fn receive(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> AxStatus {
    let verified = r
        .secret
        .lock()
        .unwrap()
        .as_deref()
        .map(|s| {
            standardwebhooks::Webhook::new(s)
                .unwrap()
                .verify(&body, &headers)
                .is_ok()
        })
        .unwrap_or(false);
    let failing = r
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let answered = if failing {
        AxStatus::SERVICE_UNAVAILABLE
    } else {
        AxStatus::NO_CONTENT
    };
    r.got.lock().unwrap().push(Received {
        id: headers
            .get("webhook-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        verified,
        answered: answered.as_u16(),
    });
    answered
}

impl Receiver {
    pub async fn start() -> Arc<Receiver> {
        let port = TestBroker::free_port();
        let r = Arc::new(Receiver {
            url: format!("http://127.0.0.1:{port}/hooks"),
            port,
            secret: Mutex::new(None),
            got: Mutex::new(Vec::new()),
            fail_next: AtomicUsize::new(0),
            server: Mutex::new(None),
        });
        r.clone().up().await;
        r
    }

    /// (Re)binds the port and serves.
    pub async fn up(self: Arc<Self>) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let app = Router::new()
            .route("/hooks", post(receive))
            .with_state(self.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        *self.server.lock().unwrap() = Some(tx);
    }

    /// Closes the port: connections are refused until [`Receiver::up`].
    pub async fn down(&self) {
        if let Some(tx) = self.server.lock().unwrap().take() {
            let _ = tx.send(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    pub fn set_secret(&self, s: &str) {
        *self.secret.lock().unwrap() = Some(s.to_string());
    }

    /// Answer 503 to the next `n` requests.
    pub fn fail_next(&self, n: usize) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    pub fn all(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// Requests answered 2xx, of one event type.
    pub fn delivered(&self, event_type: &str) -> Vec<Received> {
        self.all()
            .into_iter()
            .filter(|r| r.answered < 300 && r.body["type"] == event_type)
            .collect()
    }
}

/// Registers the receiver for `events` and teaches it the secret.
pub async fn subscribe(t: &TestBroker, r: &Receiver, events: Value) -> String {
    let (s, body) = t
        .post("/webhooks", json!({"url": r.url, "events": events}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    r.set_secret(body["secret"].as_str().unwrap());
    body["id"].as_str().unwrap().to_string()
}

async fn endpoints_api_shows_the_secret_once_and_validates(b: Backend) {
    let t = TestBroker::start(&b).await;
    let (s, created) = t
        .post(
            "/webhooks",
            json!({"url": "https://hooks.example.test/nexus", "events": ["connection.degraded", "connection.recovered"], "description": "ops"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    let id = created["id"].as_str().unwrap();
    let secret = created["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"), "{created}");
    assert_eq!(
        created["events"],
        json!(["connection.degraded", "connection.recovered"])
    );
    assert_eq!(created["managed_by"], "api");

    let (s, list) = t.get("/webhooks").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list["webhooks"].as_array().unwrap().len(), 1);
    assert!(!list.to_string().contains(secret), "secret shown once only");
    let (s, one) = t.get(&format!("/webhooks/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(one.get("secret").is_none());
    // Stored sealed, not in clear.
    let stored = t.state.store().get_endpoint(id).await.unwrap().unwrap();
    assert!(stored.secret.starts_with("nxv1."), "sealed in the vault");
    assert!(!stored.secret.contains(&secret[6..]));

    for (body, code) in [
        (json!({"url": "ftp://x/y"}), "invalid_request"),
        (json!({"url": "http://u:p@x/"}), "invalid_request"),
        (json!({"url": "not a url"}), "invalid_request"),
        (
            json!({"url": "https://x/", "events": ["connection.nope"]}),
            "invalid_request",
        ),
        (
            json!({"url": "https://x/", "events": []}),
            "invalid_request",
        ),
        (
            json!({"url": "https://x/", "colour": "red"}),
            "invalid_request",
        ),
        (json!({"events": ["*"]}), "invalid_request"),
        (json!({"url": 7}), "invalid_request"),
    ] {
        let (s, e) = t.post("/webhooks", body.clone()).await;
        assert_json_error(s, &e, 400, code);
    }
    let (s, e) = t.get("/webhooks/wh_nope").await;
    assert_json_error(s, &e, 404, "webhook_not_found");
    let (s, e) = t.get(&format!("/webhooks/{id}/deliveries?limit=0")).await;
    assert_json_error(s, &e, 400, "invalid_request");
    let (s, e) = t.call(Method::DELETE, "/webhooks/env", None).await;
    assert_json_error(s, &e, 409, "managed_by_config");

    let (s, _) = t
        .call(Method::DELETE, &format!("/webhooks/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, e) = t
        .call(Method::DELETE, &format!("/webhooks/{id}"), None)
        .await;
    assert_json_error(s, &e, 404, "webhook_not_found");
    let (_, list) = t.get("/webhooks").await;
    assert_eq!(list["webhooks"], json!([]));
    let (_, audit) = t.get("/audit?event_type=webhook.created").await;
    assert_eq!(audit["events"].as_array().unwrap().len(), 1, "{audit}");
    assert!(!audit.to_string().contains(secret));
    t.finish().await;
}

async fn events_are_signed_in_the_standard_webhooks_format(b: Backend) {
    let r = Receiver::start().await;
    let idp = crate::fake_idp::FakeIdp::start().await;
    let t = TestBroker::start_public(&b, |_| {}).await;
    subscribe(&t, &r, json!(["*"])).await;
    // A second endpoint that wants only degraded events gets none of these.
    let other = Receiver::start().await;
    subscribe(&t, &other, json!(["connection.degraded"])).await;

    t.create_provider(idp.profile("fake")).await;
    {
        let mut k = idp.knobs();
        k.access_token = "canary-access-wh".into();
        k.refresh_token = "canary-refresh-wh".into();
    }
    let flow = crate::handshake::start(&t, &idp, "fake", json!({})).await;
    let (s, _, _) = crate::handshake::callback(
        &t,
        &[("code", "c"), ("state", &flow.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(s, StatusCode::SEE_OTHER);

    let got = eventually(
        || std::future::ready(r.delivered("connection.active")),
        |v| !v.is_empty(),
    )
    .await;
    assert_eq!(got.len(), 1, "{got:?}");
    let ev = &got[0];
    assert!(
        ev.verified,
        "signature verifies with the standardwebhooks library"
    );
    assert!(ev.id.starts_with("msg_"));
    assert_eq!(ev.body["type"], "connection.active");
    assert!(ev.body["timestamp"].as_str().unwrap().ends_with('Z'));
    let d = &ev.body["data"];
    assert_eq!(d["connection_id"], flow.connection_id.as_str());
    assert_eq!(d["workspace_id"], "ws-1");
    assert_eq!(d["provider_name"], "fake");
    assert_eq!(d["old_state"], "pending");
    assert_eq!(d["new_state"], "active");
    assert_eq!(d["reconsent"], Value::Null);
    let all = serde_json::to_string(&r.all().iter().map(|x| &x.body).collect::<Vec<_>>()).unwrap();
    assert!(!all.contains("canary-access-wh") && !all.contains("canary-refresh-wh"));

    // A forged signature does not verify (the receiver's check is real).
    let forged = standardwebhooks::Webhook::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .unwrap()
        .sign(
            &ev.id,
            time::OffsetDateTime::now_utc().unix_timestamp(),
            ev.body.to_string().as_bytes(),
        )
        .unwrap();
    let resp = reqwest::Client::new()
        .post(&r.url)
        .header("webhook-id", &ev.id)
        .header(
            "webhook-timestamp",
            time::OffsetDateTime::now_utc().unix_timestamp().to_string(),
        )
        .header("webhook-signature", forged)
        .body(ev.body.to_string())
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    assert!(!r.all().last().unwrap().verified);

    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert!(other.all().is_empty(), "filtered by event type");
    let (s, deliveries) = t
        .get(&format!(
            "/webhooks/{}/deliveries",
            t.state.webhooks().list().await.unwrap()[0].id
        ))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        deliveries["deliveries"][0]["status"], "delivered",
        "{deliveries}"
    );
    assert_eq!(deliveries["deliveries"][0]["attempts"], 1);
    t.finish().await;
}

async fn receiver_down_for_a_while_gets_the_event_later_with_the_same_id(b: Backend) {
    let r = Receiver::start().await;
    let (t, _idp, id) = connected(&b, 3600, |_| {}).await;
    let wh = subscribe(&t, &r, json!(["connection.revoked"])).await;
    let path = format!("/webhooks/{wh}/deliveries");
    // 503s first, then the port closed for a while.
    r.fail_next(1_000);
    let (s, _) = t
        .call(Method::DELETE, &format!("/connections/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let failures = eventually(|| std::future::ready(r.all()), |v| v.len() >= 2).await;
    assert!(failures.iter().all(|x| x.answered == 503), "{failures:?}");
    r.down().await;
    let (_, pending) = eventually(
        || t.get(&path),
        |(_, d)| {
            d["deliveries"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("connection failed"))
        },
    )
    .await;
    assert_eq!(pending["deliveries"][0]["status"], "pending", "{pending}");
    assert!(pending["deliveries"][0]["last_error"]
        .as_str()
        .unwrap()
        .contains("connection failed"));
    r.fail_next(0);
    r.clone().up().await;
    let got = eventually(
        || std::future::ready(r.delivered("connection.revoked")),
        |v| !v.is_empty(),
    )
    .await;
    assert_eq!(got.len(), 1);
    assert!(got[0].verified);
    // Every attempt carried the same id: receivers can de-duplicate.
    let ids: std::collections::HashSet<String> = r.all().into_iter().map(|x| x.id).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(got[0].body["data"]["connection_id"], id.as_str());
    assert_eq!(got[0].body["data"]["old_state"], "active");
    assert_eq!(got[0].body["data"]["new_state"], "revoked");
    let (_, done) = eventually(
        || t.get(&path),
        |(_, d)| d["deliveries"][0]["status"] == "delivered",
    )
    .await;
    assert_eq!(done["deliveries"][0]["status"], "delivered", "{done}");
    // Nothing more arrives once delivered.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(r.delivered("connection.revoked").len(), 1);
    // History goes once every delivery of an event has ended (here: pruning
    // everything older than now; the live broker keeps a week).
    let store = t.state.store();
    let pruned = store
        .prune_webhooks(nexus_broker::store::now_ms() + 1)
        .await
        .unwrap();
    assert!(pruned >= 1, "{pruned}");
    assert_eq!(
        t.db.scalar("SELECT COUNT(*) FROM webhook_attempts").await,
        Some(0)
    );
    assert_eq!(
        t.db.scalar("SELECT COUNT(*) FROM webhook_deliveries").await,
        Some(0)
    );
    t.finish().await;
}

async fn undelivered_events_are_delivered_after_a_restart(b: Backend) {
    let r = Receiver::start().await;
    r.down().await;
    let (t, _idp, id) = connected(&b, 3600, |_| {}).await;
    subscribe(&t, &r, json!(["*"])).await;
    let (s, _) = t
        .call(Method::DELETE, &format!("/connections/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    // Stopped with the event undelivered.
    let settings = t.settings.clone();
    let db = t.stop().await;
    let pending = db
        .scalar("SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'pending'")
        .await;
    assert_eq!(pending, Some(1));
    r.clone().up().await;
    let t = TestBroker::start_on(db, settings).await;
    let got = eventually(
        || std::future::ready(r.delivered("connection.revoked")),
        |v| !v.is_empty(),
    )
    .await;
    assert_eq!(got.len(), 1, "{:?}", r.all());
    assert!(got[0].verified);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for x in r.all().into_iter().filter(|x| x.answered < 300) {
        *per_id.entry(x.id).or_default() += 1;
    }
    assert!(
        per_id.values().all(|n| *n == 1),
        "no duplicates: {per_id:?}"
    );
    t.finish().await;
}

async fn webhook_url_from_the_environment_gets_every_event(b: Backend) {
    let r = Receiver::start().await;
    let secret = nexus_broker::events::webhooks::WebhookSecret::generate().encoded();
    r.set_secret(secret.expose());
    let url = r.url.clone();
    let s2 = secret.expose().clone();
    let (t, _idp, id) = connected(&b, 3600, move |s| {
        s.webhook_url = Some(url);
        s.webhook_secret = Some(s2);
    })
    .await;
    let active = eventually(
        || std::future::ready(r.delivered("connection.active")),
        |v| !v.is_empty(),
    )
    .await;
    assert_eq!(active.len(), 1);
    assert!(active[0].verified);
    assert_eq!(active[0].body["data"]["connection_id"], id.as_str());
    let (_, list) = t.get("/webhooks").await;
    assert_eq!(list["webhooks"][0]["id"], "env");
    assert_eq!(list["webhooks"][0]["managed_by"], "env");
    assert!(!list.to_string().contains(secret.expose().as_str()));
    assert!(!crate::harness::logs().contains(secret.expose().as_str()));
    t.finish().await;
}

/// What a manifest kept in git needs: an endpoint registered with the
/// receiver's own secret, planned by URL (the secret compared inside the
/// broker), updated in place, and the new secret used for signing.
async fn endpoints_take_a_given_secret_and_are_planned_by_url(b: Backend) {
    use nexus_broker::events::webhooks::WebhookSecret;
    let r = Receiver::start().await;
    let (t, _idp, id) = connected(&b, 3600, |_| {}).await;
    let s1 = WebhookSecret::generate().encoded();
    let s2 = WebhookSecret::generate().encoded();
    let endpoint = |events: Value, secret: &str, description: Option<&str>| json!({"url": r.url, "events": events, "secret": secret, "description": description});

    let (s, plan) = t
        .post(
            "/webhooks/plan",
            endpoint(json!(["connection.revoked"]), s1.expose(), None),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{plan}");
    assert_eq!(plan["action"], "create");
    let fields: Vec<&str> = plan["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["url", "events", "secret"], "{plan}");
    assert_eq!(plan["changes"][2]["after"], "(set)");
    let (_, e) = t.get("/webhooks").await;
    assert_eq!(e["webhooks"], json!([]), "a plan stores nothing");

    let (s, created) = t
        .post(
            "/webhooks",
            endpoint(json!(["connection.revoked"]), s1.expose(), None),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{created}");
    assert!(
        created.get("secret").is_none(),
        "a given secret is not echoed"
    );
    let wh = created["id"].as_str().unwrap().to_string();

    let (_, plan) = t
        .post(
            "/webhooks/plan",
            endpoint(json!(["connection.revoked"]), s1.expose(), None),
        )
        .await;
    assert_eq!(plan["action"], "none", "{plan}");
    assert_eq!(plan["id"], wh.as_str());
    let (_, plan) = t
        .post(
            "/webhooks/plan",
            endpoint(
                json!(["connection.revoked", "connection.degraded"]),
                s2.expose(),
                Some("ops"),
            ),
        )
        .await;
    assert_eq!(plan["action"], "update", "{plan}");
    let changes = plan["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 3, "{plan}");
    assert_eq!(
        changes[2],
        json!({"field": "secret", "before": "(set)", "after": "(changed)"})
    );
    for secret in [&s1, &s2] {
        let raw = &secret.expose()[6..];
        assert!(!plan.to_string().contains(raw), "no secret in a plan");
    }

    // Replaced: the events and the secret; the receiver knows only the new one.
    let (s, updated) = t
        .call(
            Method::PUT,
            &format!("/webhooks/{wh}"),
            Some(endpoint(
                json!(["connection.revoked", "connection.degraded"]),
                s2.expose(),
                Some("ops"),
            )),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{updated}");
    assert_eq!(updated["description"], "ops");
    assert!(updated.get("secret").is_none());
    r.set_secret(s2.expose());
    let (_, plan) = t
        .post(
            "/webhooks/plan",
            endpoint(
                json!(["connection.degraded", "connection.revoked"]),
                s2.expose(),
                Some("ops"),
            ),
        )
        .await;
    assert_eq!(
        plan["action"], "none",
        "event order does not matter: {plan}"
    );
    // Without a secret the stored one stays.
    let (s, _) = t
        .call(
            Method::PUT,
            &format!("/webhooks/{wh}"),
            Some(json!({"url": r.url, "events": ["connection.revoked"]})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = t
        .call(Method::DELETE, &format!("/connections/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let got = eventually(
        || std::future::ready(r.delivered("connection.revoked")),
        |v| !v.is_empty(),
    )
    .await;
    assert!(got[0].verified, "signed with the secret given by PUT");

    let (s, e) = t
        .post(
            "/webhooks",
            json!({"url": "https://h.example.test/", "secret": "whsec_short"}),
        )
        .await;
    assert_json_error(s, &e, 400, "invalid_request");
    assert!(!e.to_string().contains("whsec_short"), "{e}");
    let (s, e) = t
        .call(
            Method::PUT,
            "/webhooks/wh_nope",
            Some(json!({"url": "https://h.example.test/"})),
        )
        .await;
    assert_json_error(s, &e, 404, "webhook_not_found");
    let (s, e) = t
        .call(
            Method::PUT,
            "/webhooks/env",
            Some(json!({"url": "https://h.example.test/"})),
        )
        .await;
    assert_json_error(s, &e, 409, "managed_by_config");
    let (s, e) = t
        .call(
            Method::PUT,
            &format!("/webhooks/{wh}"),
            Some(json!({"url": "ftp://x/"})),
        )
        .await;
    assert_json_error(s, &e, 400, "invalid_request");
    // Two endpoints with one URL cannot be matched by URL.
    let (s, _) = t.post("/webhooks", json!({"url": r.url})).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, e) = t.post("/webhooks/plan", json!({"url": r.url})).await;
    assert_json_error(s, &e, 400, "invalid_request");
    let (_, audit) = t.get("/audit?event_type=webhook.updated").await;
    let events = audit["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "{audit}");
    assert!(!audit.to_string().contains(&s2.expose()[6..]));
    assert!(!crate::harness::logs().contains(&s2.expose()[6..]));
    t.finish().await;
}

backend_tests!(
    endpoints_take_a_given_secret_and_are_planned_by_url,
    endpoints_api_shows_the_secret_once_and_validates,
    events_are_signed_in_the_standard_webhooks_format,
    receiver_down_for_a_while_gets_the_event_later_with_the_same_id,
    undelivered_events_are_delivered_after_a_restart,
    webhook_url_from_the_environment_gets_every_event,
);

#[test]
fn webhook_settings_are_validated_at_start_up() {
    use nexus_broker::config::{BrokerConfig, Settings};
    let base = Settings {
        database_url: Some("sqlite::memory:".into()),
        encryption_key: Some(nexus_broker::vault::generate_key_b64().expose().clone()),
        state_key: Some(nexus_broker::vault::generate_key_b64().expose().clone()),
        api_key: Some("a".repeat(32)),
        ..Default::default()
    };
    let err = |s: Settings| BrokerConfig::from_settings(&s).unwrap_err().to_string();
    let e = err(Settings {
        webhook_url: Some("https://hooks.example.test/x".into()),
        ..base.clone()
    });
    assert!(e.starts_with("WEBHOOK_SECRET:"), "{e}");
    let e = err(Settings {
        webhook_url: Some("https://hooks.example.test/x".into()),
        webhook_secret: Some("whsec_short".into()),
        ..base.clone()
    });
    assert!(
        e.starts_with("WEBHOOK_SECRET:") && e.contains("base64"),
        "{e}"
    );
    let e = err(Settings {
        webhook_url: Some("gopher://x".into()),
        webhook_secret: Some(
            nexus_broker::events::webhooks::WebhookSecret::generate()
                .encoded()
                .expose()
                .clone(),
        ),
        ..base.clone()
    });
    assert!(e.starts_with("WEBHOOK_URL:"), "{e}");
    let e = err(Settings {
        issuance_paused: Some("maybe".into()),
        ..base
    });
    assert!(e.starts_with("NEXUS_ISSUANCE_PAUSED:"), "{e}");
}
