//! What a gateway's token cache relies on: token answers say how long they
//! may be kept, the change stream announces what to drop, and issuances a
//! gateway served are audited.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::harness::{assert_json_error, backend_tests, Backend, TestBroker};

/// The change stream, read line by line.
struct Changes(reqwest::Response, Vec<u8>);

impl Changes {
    /// Opens it once the broker hears every change (on PostgreSQL, once its
    /// listener is connected: 503 `changes_unavailable` until then).
    async fn open(t: &TestBroker) -> Changes {
        let resp = crate::harness::eventually(
            || {
                t.client
                    .get(format!("{}/tokens/changes", t.base))
                    .header("x-api-key", &t.api_key)
                    .send()
            },
            |r| {
                r.as_ref()
                    .is_ok_and(|r| r.status() != StatusCode::SERVICE_UNAVAILABLE)
            },
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
        Changes(resp, Vec::new())
    }

    /// The first of the next 20 lines equal to `want`, if any. Other lines
    /// may come first (on PostgreSQL the setup's own writes are announced
    /// asynchronously).
    async fn expect(&mut self, want: Value) -> Option<Value> {
        for _ in 0..20 {
            let line = self.next().await?;
            if line == want {
                return Some(line);
            }
        }
        None
    }

    /// The next line that is not a ping (bounded wait).
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(nl) = self.1.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.1.drain(..=nl).collect();
                let v: Value = serde_json::from_slice(&line).unwrap();
                if v["type"] != "ping" {
                    return Some(v);
                }
                continue;
            }
            let chunk = tokio::time::timeout(std::time::Duration::from_secs(15), self.0.chunk())
                .await
                .expect("a line within 15 s")
                .unwrap()?;
            self.1.extend_from_slice(&chunk);
        }
    }
}

async fn announces_changes_and_says_what_may_be_kept(b: Backend) {
    let (t, _idp, id) = crate::tokens::connected(&b, 3600, |_| {}).await;
    let mut changes = Changes::open(&t).await;
    assert_eq!(changes.next().await, Some(json!({"type": "ready"})));

    let resp = t
        .client
        .get(format!("{}/connections/{id}/token", t.base))
        .header("x-api-key", &t.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let keep: i64 = resp.headers()["x-nexus-cacheable-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // Never longer than the broker's own trust in its entry (1 s).
    assert!((1..=1000).contains(&keep), "{keep}");
    let expires_at: i64 = resp.headers()["x-nexus-expires-at-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    let left = (expires_at - nexus_broker::store::now_ms()) / 1000;
    assert!((body["expires_in"].as_i64().unwrap() - left).abs() <= 1);

    // A pause (workspace or operator) drops everything; so does its end.
    let (s, _) = t
        .call(
            Method::PUT,
            "/workspaces/ws-1/pause",
            Some(json!({"reason": "r"})),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let all = json!({"type": "all"});
    assert_eq!(changes.expect(all.clone()).await, Some(all.clone()));
    t.call(Method::DELETE, "/workspaces/ws-1/pause", None).await;
    assert_eq!(changes.expect(all.clone()).await, Some(all));

    // A connection's change drops that connection.
    let (s, _) = t
        .call(Method::DELETE, &format!("/connections/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let dropped = json!({"type": "connection", "id": id});
    assert_eq!(changes.expect(dropped.clone()).await, Some(dropped));
    // A revoked connection's answer is an error, never cacheable.
    let resp = t
        .client
        .get(format!("{}/connections/{id}/token", t.base))
        .header("x-api-key", &t.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::GONE);
    assert!(resp.headers().get("x-nexus-cacheable-ms").is_none());
    t.finish().await;
}

async fn the_stream_ends_when_the_broker_stops(b: Backend) {
    let t = TestBroker::start(&b).await;
    let mut changes = Changes::open(&t).await;
    assert_eq!(changes.next().await, Some(json!({"type": "ready"})));
    // The broker's graceful shutdown ends the stream instead of waiting on it.
    let stopped = tokio::spawn(async move { t.stop().await });
    assert_eq!(changes.next().await, None, "the stream ended");
    let db = stopped.await.unwrap();
    db.drop_db().await;
}

async fn issuances_served_by_a_gateway_are_audited(b: Backend) {
    let (t, _idp, id) = crate::tokens::connected(&b, 3600, |_| {}).await;
    let now = nexus_broker::store::now_ms();
    let (s, r) = t
        .post(
            "/tokens/issued",
            json!({"issued": [
                {"connection_id": id, "count": 40, "first_at": now - 900, "last_at": now - 100},
                {"connection_id": "no-such-connection", "count": 3, "first_at": now, "last_at": now},
            ]}),
        )
        .await;
    assert_eq!((s, &r), (StatusCode::OK, &json!({"accepted": 1})));
    let path = format!("/audit?event_type=token.issued&connection_id={id}");
    let (_, audit) = crate::harness::eventually(
        || t.get(&path),
        |(_, a)| {
            a["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["detail"]["count"] == 40))
        },
    )
    .await;
    let ev = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["detail"]["count"] == 40)
        .unwrap_or_else(|| panic!("{audit}"));
    assert_eq!(ev["workspace_id"], "ws-1");

    for bad in [
        json!({}),
        json!({"issued": "x"}),
        json!({"issued": [{"connection_id": id, "count": 0, "first_at": now, "last_at": now}]}),
        json!({"issued": [{"connection_id": id, "count": 1, "first_at": now, "last_at": now - 5}]}),
        json!({"issued": [{"connection_id": "", "count": 1, "first_at": now, "last_at": now}]}),
        json!({"issued": [{"connection_id": id, "count": -1, "first_at": now, "last_at": now}]}),
    ] {
        let (s, body) = t.post("/tokens/issued", bad.clone()).await;
        assert_json_error(s, &body, 400, "invalid_request");
    }
    t.finish().await;
}

backend_tests!(
    announces_changes_and_says_what_may_be_kept,
    the_stream_ends_when_the_broker_stops,
    issuances_served_by_a_gateway_are_audited,
);
