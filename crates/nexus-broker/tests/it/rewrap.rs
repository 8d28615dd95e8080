//! Key rotation: a new active key, old rows still readable, rewrap moves every
//! row to the new key, resumes after an interruption, and never overwrites a
//! concurrent write.

use std::ops::ControlFlow;
use std::sync::Arc;

use nexus_broker::config::{BrokerConfig, Settings};
use nexus_broker::registry::Registry;
use nexus_broker::store::{Store, ENCRYPTED_COLUMNS};
use nexus_broker::vault::rewrap::rewrap;
use nexus_broker::vault::{envelope_key_id, generate_key_b64, KeyRing};
use serde_json::json;

use crate::harness::{backend_tests, Backend, TestBroker};
use crate::providers::oauth_profile;

async fn secrets_by_id(store: &Store, keys: Arc<KeyRing>) -> Vec<(String, Option<String>, String)> {
    let registry = Registry::new(store.clone(), keys);
    let mut out = Vec::new();
    for p in registry.list().await.unwrap() {
        let secret = registry
            .client_secret(&p)
            .unwrap()
            .map(|s| s.expose().clone());
        let key_id = p
            .row
            .client_secret
            .as_deref()
            .and_then(envelope_key_id)
            .unwrap_or("-")
            .to_string();
        out.push((p.profile.name.clone(), secret, key_id));
    }
    out
}

async fn rotation_and_resumable_rewrap(b: Backend) {
    let t = TestBroker::start(&b).await;
    for i in 0..7 {
        let mut p = oauth_profile(&format!("p{i}"));
        p["client_secret"] = json!(format!("secret-{i}"));
        t.create_provider(p).await;
    }
    let mut public = oauth_profile("public-client");
    public.as_object_mut().unwrap().remove("client_secret");
    t.create_provider(public).await;
    let old_settings = t.settings.clone();
    let db = t.stop().await;

    let old_key = old_settings.encryption_key.clone().unwrap();
    let new_key = generate_key_b64().expose().clone();
    let rotated = Settings {
        encryption_key: None,
        encryption_keys: Some(format!("k2:{new_key},default:{old_key}")),
        ..old_settings.clone()
    };
    let ring = BrokerConfig::from_settings(&rotated).unwrap().keys;
    assert_eq!(ring.active_id(), "k2");
    let store = db.store().await;

    // Old rows still decrypt with the new key active.
    let before = secrets_by_id(&store, ring.clone()).await;
    assert_eq!(before.len(), 8);
    assert!(before
        .iter()
        .filter(|(_, s, _)| s.is_some())
        .all(|(_, _, k)| k == "default"));

    // Interrupted after 3 rows...
    let report = rewrap(&store, &ring, |p| {
        if p.done >= 3 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await
    .unwrap();
    assert!(report.interrupted);
    assert_eq!(report.rewrapped, 3);
    let prefix = "nxv1.k2.";
    assert_eq!(
        store
            .count_not_on_key(&ENCRYPTED_COLUMNS[0], prefix)
            .await
            .unwrap(),
        4
    );

    // ... and resumed: only the rest is touched.
    let mut totals = Vec::new();
    let report = rewrap(&store, &ring, |p| {
        totals.push(p.total);
        ControlFlow::Continue(())
    })
    .await
    .unwrap();
    assert!(!report.interrupted);
    assert_eq!(report.rewrapped, 4);
    assert!(report.failed.is_empty());
    assert_eq!(totals.first(), Some(&4));
    assert_eq!(
        store
            .count_not_on_key(&ENCRYPTED_COLUMNS[0], prefix)
            .await
            .unwrap(),
        0
    );

    // With the old key gone, every secret still reads back, identical.
    let only_new = Arc::new(KeyRing::from_keys_var(&format!("k2:{new_key}")).unwrap());
    let after = secrets_by_id(&store, only_new).await;
    let strip = |v: &Vec<(String, Option<String>, String)>| {
        v.iter()
            .map(|(n, s, _)| (n.clone(), s.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&before), strip(&after));
    assert!(after
        .iter()
        .filter(|(_, s, _)| s.is_some())
        .all(|(_, _, k)| k == "k2"));

    // A rerun has nothing to do.
    let report = rewrap(&store, &ring, |_| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert_eq!(report.rewrapped, 0);

    // The broker restarted on the rotated ring serves and writes with the new key.
    store.close().await;
    let t = TestBroker::start_on(db, rotated).await;
    let mut p = oauth_profile("after-rotation");
    p["client_secret"] = json!("fresh");
    let id = t.create_provider(p).await;
    let db = t.stop().await;
    let store = db.store().await;
    let row = store.get_provider(&id).await.unwrap().unwrap();
    assert_eq!(
        row.client_secret.as_deref().and_then(envelope_key_id),
        Some("k2")
    );
    store.close().await;
    db.drop_db().await;
}

async fn rewrap_never_overwrites_a_concurrent_write(b: Backend) {
    let t = TestBroker::start(&b).await;
    let mut p = oauth_profile("raced");
    p["client_secret"] = json!("v1");
    let id = t.create_provider(p).await;
    let settings = t.settings.clone();
    let db = t.stop().await;
    let store = db.store().await;
    let col = &ENCRYPTED_COLUMNS[0];
    let old = store
        .get_provider(&id)
        .await
        .unwrap()
        .unwrap()
        .client_secret
        .unwrap();
    let keys = BrokerConfig::from_settings(&settings).unwrap().keys;

    // The broker writes a new secret after rewrap read the row: the swap must lose.
    let registry = Registry::new(store.clone(), keys.clone());
    let current = registry.get(&id).await.unwrap();
    let mut profile = current.profile.public_json();
    profile["client_secret"] = json!("v2");
    registry
        .replace(&id, json!({"profile": profile}), &Default::default())
        .await
        .unwrap();
    assert!(!store
        .swap_envelope(
            col,
            &id,
            &old,
            "nxv1.x.AAAAAAAAAAAAAAAA.AAAAAAAAAAAAAAAAAAAAAA"
        )
        .await
        .unwrap());
    let after = registry.get(&id).await.unwrap();
    assert_eq!(
        registry.client_secret(&after).unwrap().unwrap().expose(),
        "v2"
    );

    // A row no key can open is reported, not skipped silently and not fatal.
    let other_ring =
        Arc::new(KeyRing::from_keys_var(&format!("k9:{}", generate_key_b64().expose())).unwrap());
    let report = rewrap(&store, &other_ring, |_| ControlFlow::Continue(()))
        .await
        .unwrap();
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].row_id, id);
    assert!(!report.failed[0].reason.contains("v2"));
    store.close().await;
    db.drop_db().await;
}

async fn rewrap_racing_the_broker_keeps_the_newer_secret(b: Backend) {
    let t = TestBroker::start(&b).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let mut p = oauth_profile(&format!("r{i}"));
        p["client_secret"] = json!(format!("old-{i}"));
        ids.push(t.create_provider(p).await);
    }
    let old_settings = t.settings.clone();
    let db = t.stop().await;
    let rotated = Settings {
        encryption_key: None,
        encryption_keys: Some(format!(
            "k2:{},default:{}",
            generate_key_b64().expose(),
            old_settings.encryption_key.clone().unwrap()
        )),
        ..old_settings
    };
    let ring = BrokerConfig::from_settings(&rotated).unwrap().keys;
    let store = db.store().await;
    let registry = Registry::new(store.clone(), ring.clone());
    let mut sorted = ids.clone();
    sorted.sort();
    let last = sorted.last().unwrap().clone();

    // While rewrap works through its batch, the broker writes a new secret
    // for a row rewrap has already read but not yet swapped.
    let mut injected = false;
    let report = rewrap(&store, &ring, |_| {
        if !injected {
            injected = true;
            tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    let cur = registry.get(&last).await.unwrap();
                    let mut profile = cur.profile.public_json();
                    profile["client_secret"] = json!("written-during-rewrap");
                    registry
                        .replace(&last, json!({"profile": profile}), &Default::default())
                        .await
                        .unwrap();
                })
            });
        }
        ControlFlow::Continue(())
    })
    .await
    .unwrap();
    assert_eq!(report.raced, 1, "{report:?}");
    assert_eq!(report.rewrapped, 2);
    let p = registry.get(&last).await.unwrap();
    assert_eq!(
        registry.client_secret(&p).unwrap().unwrap().expose(),
        "written-during-rewrap"
    );
    assert_eq!(
        store
            .count_not_on_key(&ENCRYPTED_COLUMNS[0], "nxv1.k2.")
            .await
            .unwrap(),
        0
    );
    store.close().await;

    // A ring that lost the key still in use refuses to start, naming the problem.
    let lost = Settings {
        encryption_keys: Some(format!("k9:{}", generate_key_b64().expose())),
        ..rotated
    };
    let err = nexus_broker::server::Broker::start(BrokerConfig::from_settings(&lost).unwrap())
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("3 stored secret(s)") && msg.contains("k9"),
        "{msg}"
    );
    db.drop_db().await;
}

backend_tests!(
    rewrap_racing_the_broker_keeps_the_newer_secret,
    rotation_and_resumable_rewrap,
    rewrap_never_overwrites_a_concurrent_write
);
