//! Health, readiness and metrics.

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{assert_json_error, backend_tests, Backend, TestBroker};
use crate::providers::oauth_profile;

async fn ready_reports_backend_and_key(b: Backend) {
    let t = TestBroker::start(&b).await;
    let (s, body) = t.get("/ready").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["database"], "ok");
    assert_eq!(body["keys"], "ok");
    assert_eq!(body["active_key_id"], "default");
    let expected = match b {
        Backend::Sqlite => "sqlite",
        Backend::Postgres(_) => "postgres",
    };
    assert_eq!(body["backend"], expected);
    t.finish().await;
}

async fn database_gone_means_503_not_500(b: Backend) {
    let t = TestBroker::start(&b).await;
    t.create_provider(oauth_profile("google")).await;
    // Close the broker's pool under it: every database call now fails.
    t.state.store().close().await;
    let (s, body) = t.get("/ready").await;
    assert_json_error(s, &body, 503, "not_ready");
    assert_eq!(body["database"], "unreachable");
    let (s, body) = t.get("/providers").await;
    assert_json_error(s, &body, 503, "database_unavailable");
    let (s, body) = t
        .post("/providers", json!({"profile": oauth_profile("github")}))
        .await;
    assert_json_error(s, &body, 503, "database_unavailable");
    let (s, _) = t.get("/health").await;
    assert_eq!(
        s,
        StatusCode::OK,
        "liveness does not depend on the database"
    );
    // Shutdown still completes; the audit writer reports what it could not write.
    t.finish().await;
}

async fn metrics_count_requests_by_route_and_status(b: Backend) {
    let t = TestBroker::start(&b).await;
    t.get("/providers").await;
    t.get("/providers/00000000-0000-0000-0000-000000000000")
        .await;
    let text = t
        .client
        .get(format!("{}/metrics", t.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(
            "nexus_http_requests_total{route=\"/providers\",method=\"GET\",status=\"200\"}"
        ),
        "{text}"
    );
    assert!(
        text.contains("route=\"/providers/{id}\",method=\"GET\",status=\"404\""),
        "{text}"
    );
    assert!(
        text.contains("nexus_http_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        !text.contains("00000000-0000-0000-0000-000000000000"),
        "ids never become label values"
    );
    t.finish().await;
}

backend_tests!(
    ready_reports_backend_and_key,
    database_gone_means_503_not_500,
    metrics_count_requests_by_route_and_status,
);

/// The OpenAPI document is valid (checked by an independent validator) and
/// every operation it lists is routed; routes come from the same tables, so
/// none is undocumented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_route() {
    let t = TestBroker::start(&Backend::Sqlite).await;
    let resp = t
        .client
        .get(format!("{}/openapi.json", t.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "served without a key");
    let doc: serde_json::Value = resp.json().await.unwrap();
    nexus_testkit::validate_openapi(&doc);
    let ops = nexus_testkit::operations(&doc);
    assert!(ops.len() > 40, "{}", ops.len());
    for (method, path) in ops {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = t
            .client
            .request(m, format!("{}{path}", t.base))
            .header("x-api-key", &t.api_key)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let streamed = resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/x-ndjson");
        // A change stream never ends: its status says enough.
        let body = if streamed {
            String::new()
        } else {
            resp.text().await.unwrap_or_default()
        };
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            !body.contains("no route for"),
            "{method} {path} is documented but not routed"
        );
    }
    assert_eq!(
        doc["paths"]["/connections/{id}"]["delete"]["security"],
        json!([{"apiKey": []}])
    );
    assert!(doc["paths"]["/health"]["get"].get("security").is_none());
    t.finish().await;
}
