//! Agent keys at the broker: shown once, stored hashed, verified, revoked,
//! validated, audited without the key.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::harness::{assert_json_error, backend_tests, Backend, TestBroker};

async fn agent_keys_are_shown_once_stored_hashed_and_verified(b: Backend) {
    let t = TestBroker::start(&b).await;
    let (s, k) = t
        .post(
            "/agent-keys",
            json!({"name": "bot", "workspaces": ["w1", "w2", "w1"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{k}");
    let key = k["key"].as_str().unwrap().to_string();
    let id = k["id"].as_str().unwrap().to_string();
    assert!(key.starts_with("nxa_") && key.len() > 40);
    assert_eq!(k["workspaces"], json!(["w1", "w2"]));
    assert!(key.starts_with(k["prefix"].as_str().unwrap()));
    // Only a hash is stored.
    let stored =
        t.db.scalar(&format!(
            "SELECT COUNT(*) FROM agent_keys WHERE key_hash = '{}'",
            nexus_broker::registry::agent_keys::hash(&key)
        ))
        .await;
    assert_eq!(stored, Some(1));
    // (No key in this SQL: statements are logged at debug level.)
    let leaked =
        t.db.scalar(
            "SELECT COUNT(*) FROM agent_keys WHERE key_hash LIKE 'nxa_%' OR length(prefix) > 10",
        )
        .await;
    assert_eq!(leaked, Some(0));

    let (s, v) = t.post("/agent-keys/verify", json!({"key": key})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["id"], id.as_str());
    assert!(v["last_used_at"].is_string(), "use is noted");
    for bad in ["nxa_nope", "", "not-a-key", &"x".repeat(500)] {
        let (s, e) = t.post("/agent-keys/verify", json!({"key": bad})).await;
        assert_json_error(s, &e, 401, "invalid_agent_key");
    }
    let (_, list) = t.get("/agent-keys").await;
    assert!(!list.to_string().contains(&key));
    assert_eq!(list["agent_keys"][0]["revoked"], false);

    let (s, _) = t
        .call(Method::DELETE, &format!("/agent-keys/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, e) = t.post("/agent-keys/verify", json!({"key": key})).await;
    assert_json_error(s, &e, 401, "invalid_agent_key");
    let (s, e) = t
        .call(Method::DELETE, &format!("/agent-keys/{id}"), None)
        .await;
    assert_json_error(s, &e, 404, "agent_key_not_found");

    for body in [
        json!({"name": "", "workspaces": ["w"]}),
        json!({"name": "x", "workspaces": []}),
        json!({"name": "x", "workspaces": [""]}),
        json!({"name": "x"}),
        json!({"name": "x", "workspaces": ["w"], "admin": true}),
        json!({"name": "x".repeat(101), "workspaces": ["w"]}),
    ] {
        let (s, e) = t.post("/agent-keys", body).await;
        assert_json_error(s, &e, 400, "invalid_request");
    }
    let (_, audit) = t.get("/audit?event_type=agent_key.created").await;
    assert_eq!(audit["events"].as_array().unwrap().len(), 1);
    let (_, all) = t.get("/audit?limit=1000").await;
    assert!(!all.to_string().contains(&key), "never audited");
    let logged = crate::harness::logs();
    let line = logged.lines().find(|l| l.contains(&key));
    assert!(line.is_none(), "never logged: {line:?}");
    t.finish().await;
}

backend_tests!(agent_keys_are_shown_once_stored_hashed_and_verified);
