//! `DELETE /connections/{id}`: RFC 7009 at the provider (retried on 503),
//! secrets erased here whatever the provider said, 410 afterwards.

use reqwest::{Method, StatusCode};

use crate::harness::{assert_json_error, backend_tests, Backend};
use crate::tokens::connected;

async fn revocation_reaches_the_provider_and_erases_every_secret(b: Backend) {
    let (t, idp, id) = connected(&b, 3600, |_| {}).await;
    // A re-consent started before the revocation...
    let pending =
        crate::handshake::start(&t, &idp, "fake", serde_json::json!({"connection_id": id})).await;
    idp.knobs().revocation_unavailable = 2;
    let (s, out) = t
        .call(Method::DELETE, &format!("/connections/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{out}");
    assert_eq!(out["status"], "revoked");
    assert_eq!(out["already_revoked"], false);
    let pr = &out["provider_revocation"];
    assert_eq!(pr["result"], "revoked", "{out}");
    assert_eq!(pr["attempts"], 3, "two 503s, then success");
    assert_eq!(pr["token_type_hint"], "refresh_token");
    {
        let c = idp.counters();
        assert_eq!(c.revocation_requests, 3);
        assert_eq!(c.last_revocation_form["token"], "refresh-1");
        assert_eq!(c.last_revocation_form["token_type_hint"], "refresh_token");
        assert_eq!(c.last_revocation_form["client_id"], "fake-client");
    }
    let row = t.state.store().get_connection(&id).await.unwrap().unwrap();
    assert_eq!(row.status, "revoked");
    assert!(row.access_token.is_none() && row.refresh_token.is_none());
    assert!(row.id_token.is_none() && row.credentials.is_none());
    assert!(row.next_refresh_at.is_none());
    let (s, e) = t.get(&format!("/connections/{id}/token")).await;
    assert_json_error(s, &e, 410, "connection_revoked");
    let (s, e) = t
        .call(Method::POST, &format!("/connections/{id}/refresh"), None)
        .await;
    assert_json_error(s, &e, 410, "connection_revoked");
    // Idempotent: nothing more happens.
    let (s, again) = t
        .call(Method::DELETE, &format!("/connections/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["already_revoked"], true);
    assert_eq!(idp.counters().revocation_requests, 3);
    let (_, audit) = t
        .get(&format!(
            "/audit?event_type=connection.revoked&connection_id={id}"
        ))
        .await;
    let events = audit["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{audit}");
    assert_eq!(events[0]["detail"]["previous_status"], "active");
    assert_eq!(
        events[0]["detail"]["provider_revocation"]["result"],
        "revoked"
    );
    assert!(!audit.to_string().contains("refresh-1"));
    // ...cannot bring the connection back afterwards.
    let (s, _, _) = crate::handshake::callback(
        &t,
        &[("code", "c"), ("state", &pending.state), ("iss", &idp.base)],
    )
    .await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "the handshake was consumed by the revocation"
    );
    assert_eq!(
        t.state
            .store()
            .get_connection(&id)
            .await
            .unwrap()
            .unwrap()
            .status,
        "revoked"
    );
    let (s, e) = t.call(Method::DELETE, "/connections/nope", None).await;
    assert_json_error(s, &e, 404, "connection_not_found");
    t.finish().await;
}

async fn a_provider_that_keeps_failing_does_not_stop_local_erasure(b: Backend) {
    let (t, idp, id) = connected(&b, 3600, |_| {}).await;
    idp.knobs().revocation_unavailable = 100;
    let (s, out) = t
        .call(Method::DELETE, &format!("/connections/{id}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{out}");
    assert_eq!(out["provider_revocation"]["result"], "failed");
    assert_eq!(out["provider_revocation"]["http_status"], 503);
    assert_eq!(out["provider_revocation"]["attempts"], 3, "bounded retries");
    let row = t.state.store().get_connection(&id).await.unwrap().unwrap();
    assert_eq!(row.status, "revoked");
    assert!(row.access_token.is_none() && row.refresh_token.is_none());
    let (s, e) = t.get(&format!("/connections/{id}/token")).await;
    assert_json_error(s, &e, 410, "connection_revoked");
    // A wrong client secret is a failure too (no retry), still erased.
    let (t2, idp2, id2) = connected(&b, 3600, |_| {}).await;
    t2.db
        .exec("UPDATE providers SET client_secret = NULL")
        .await;
    let (s, out) = t2
        .call(Method::DELETE, &format!("/connections/{id2}"), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{out}");
    assert_eq!(out["provider_revocation"]["result"], "failed", "{out}");
    assert_eq!(idp2.counters().revocation_requests, 1);
    assert_eq!(
        t2.state
            .store()
            .get_connection(&id2)
            .await
            .unwrap()
            .unwrap()
            .status,
        "revoked"
    );
    t.finish().await;
    t2.finish().await;
}

backend_tests!(
    revocation_reaches_the_provider_and_erases_every_secret,
    a_provider_that_keeps_failing_does_not_stop_local_erasure,
);
