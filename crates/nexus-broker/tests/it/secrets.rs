//! Secrets stay secret: a canary client secret is stored (it decrypts back)
//! but appears nowhere in plaintext: not in the database files, not in any
//! response, not in logs at TRACE level, not in metrics.

use std::sync::Arc;

use nexus_broker::config::BrokerConfig;
use nexus_broker::registry::{Registry, RegistryError};
use nexus_broker::store::StoreError;
use nexus_broker::vault::VaultError;
use reqwest::Method;
use serde_json::json;

use crate::harness::{backend_tests, logs, Backend, TestBroker};
use crate::providers::oauth_profile;

async fn canary_client_secret_never_leaks(b: Backend) {
    let canary = format!("canary-client-secret-{}", uuid::Uuid::new_v4().simple());
    let rotated = format!("canary-rotated-secret-{}", uuid::Uuid::new_v4().simple());
    let t = TestBroker::start(&b).await;
    let mut profile = oauth_profile("leaky");
    profile["client_secret"] = json!(canary);
    let id = t.create_provider(profile.clone()).await;

    let mut bodies = Vec::new();
    for path in [
        format!("/providers/{id}"),
        "/providers".into(),
        "/providers/metadata".into(),
        "/providers/by-name/leaky".into(),
        "/audit?limit=1000".into(),
    ] {
        bodies.push(t.get(&path).await.1.to_string());
    }
    // Errors that echo input must not echo the secret either.
    let (_, dup) = t.post("/providers", json!({"profile": profile})).await;
    bodies.push(dup.to_string());
    let mut broken = profile.clone();
    broken["token_url"] = json!("not a url");
    bodies.push(
        t.post("/providers", json!({"profile": broken}))
            .await
            .1
            .to_string(),
    );
    let (_, upd) = t
        .call(
            Method::PATCH,
            &format!("/providers/{id}"),
            Some(json!({"profile": {"client_secret": rotated}})),
        )
        .await;
    bodies.push(upd.to_string());
    bodies.push(t.get(&format!("/providers/{id}")).await.1.to_string());
    let metrics = t
        .client
        .get(format!("{}/metrics", t.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    for secret in [&canary, &rotated] {
        for body in &bodies {
            assert!(
                !body.contains(secret.as_str()),
                "secret in a response: {body}"
            );
        }
        assert!(!metrics.contains(secret.as_str()), "secret in /metrics");
    }

    let db = t.stop().await;
    // Stored, and only as ciphertext: the rotated secret decrypts back.
    let store = db.store().await;
    let rows = store.list_providers().await.unwrap();
    let row = rows.iter().find(|r| r.id == id).unwrap();
    let envelope = row.client_secret.clone().expect("secret stored");
    assert!(envelope.starts_with("nxv1.default."), "{envelope}");
    for secret in [&canary, &rotated] {
        assert!(!row.profile.contains(secret.as_str()));
        assert!(!envelope.contains(secret.as_str()));
    }
    for file in db.sqlite_files() {
        let bytes = std::fs::read(&file).unwrap();
        for secret in [&canary, &rotated] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "secret in plaintext in {}",
                file.display()
            );
        }
    }
    store.close().await;
    db.drop_db().await;

    let logged = logs();
    assert!(logged.contains("provider"), "logs were captured");
    for secret in [&canary, &rotated] {
        assert!(!logged.contains(secret.as_str()), "secret in the logs");
    }
}

async fn stored_secret_decrypts_and_is_bound_to_its_row(b: Backend) {
    let t = TestBroker::start(&b).await;
    let mut a = oauth_profile("a");
    a["client_secret"] = json!("secret-of-a");
    let a_id = t.create_provider(a).await;
    let mut bp = oauth_profile("b");
    bp["client_secret"] = json!("secret-of-b");
    let b_id = t.create_provider(bp).await;
    let settings = t.settings.clone();
    let db = t.stop().await;

    let config = BrokerConfig::from_settings(&settings).unwrap();
    let store = db.store().await;
    let registry = Registry::new(store.clone(), Arc::clone(&config.keys));
    let pa = registry.get(&a_id).await.unwrap();
    assert_eq!(
        registry.client_secret(&pa).unwrap().unwrap().expose(),
        "secret-of-a"
    );

    // Copy a's ciphertext into b's row: it must not decrypt as b's secret.
    let env_a = pa.row.client_secret.clone().unwrap();
    let col = &nexus_broker::store::ENCRYPTED_COLUMNS[0];
    let env_b = registry
        .get(&b_id)
        .await
        .unwrap()
        .row
        .client_secret
        .unwrap();
    assert!(store
        .swap_envelope(col, &b_id, &env_b, &env_a)
        .await
        .unwrap());
    let pb = registry.get(&b_id).await.unwrap();
    assert!(matches!(
        registry.client_secret(&pb),
        Err(RegistryError::Store(StoreError::Vault(VaultError::Decrypt)))
    ));
    store.close().await;
    db.drop_db().await;
}

backend_tests!(
    canary_client_secret_never_leaks,
    stored_secret_decrypts_and_is_bound_to_its_row
);
