//! The bridge talking to this gateway over gRPC (its `grpc` feature): every
//! call, and the typed errors it makes of the gateway's statuses.

use nexus_bridge::{Bridge, BridgeError, ConnectionRequest, ScopeReport};
use reqwest::Method;
use serde_json::json;

use crate::harness::{Stack, RETURN_URL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_over_grpc() {
    let s = Stack::start(0, "").await;
    s.weather().await;
    let (_, key) = s.agent_key(&["u1"]).await;
    let bridge = Bridge::builder(&s.gateway, &key)
        .grpc(true)
        .build()
        .unwrap();

    let spec = bridge
        .request_connection(&ConnectionRequest {
            user_id: "u1".into(),
            provider_name: Some("weather".into()),
            return_url: RETURN_URL.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let id = spec.connection_id.clone();
    assert_eq!(bridge.check_connection(&id).await.unwrap(), "pending");
    assert!(matches!(
        bridge.token(&id).await,
        Err(BridgeError::Pending(_))
    ));
    let resp = s
        .client
        .post(format!("{}/auth/capture-credential", s.gateway))
        .json(&json!({"state": spec.state, "credentials": {"api_key": "weather-key-123"}}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());
    bridge
        .wait_for_active(&id, std::time::Duration::from_secs(10))
        .await
        .unwrap();

    // Another bridge (no cached pending answer): the token over gRPC.
    let bridge = Bridge::builder(&s.gateway, &key)
        .grpc(true)
        .build()
        .unwrap();
    let creds = bridge.token(&id).await.unwrap();
    assert_eq!(creds.strategy.kind, "header");
    assert_eq!(creds.strategy.field("header_name"), Some("X-Api-Key"));
    assert_eq!(creds.secret("api_key").unwrap().expose(), "weather-key-123");
    assert_eq!(creds.expires_at, None, "expires_in null stays null");
    let again = bridge.refresh(&id).await.unwrap();
    assert_eq!(again.generation, creds.generation + 1);

    let report = bridge
        .report_scope_failure(
            &id,
            &ScopeReport {
                status: 403,
                scopes: vec!["forecast.read".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        report["failing_scopes"],
        json!(["forecast.read"]),
        "{report}"
    );

    // Typed errors from gRPC statuses and their ErrorInfo reasons.
    assert!(matches!(
        bridge.check_connection("no-such-connection").await,
        Err(BridgeError::NotFound(_))
    ));
    let stranger = Bridge::builder(&s.gateway, format!("nxa_{}", "x".repeat(43)))
        .grpc(true)
        .build()
        .unwrap();
    assert!(matches!(
        stranger.token(&id).await,
        Err(BridgeError::Unauthorized(_))
    ));
    let (st, _) = s
        .admin(
            Method::PUT,
            "/workspaces/u1/pause",
            Some(json!({"reason": "incident 9"})),
        )
        .await;
    assert!(st.is_success());
    let fresh = Bridge::builder(&s.gateway, &key)
        .grpc(true)
        .build()
        .unwrap();
    assert_eq!(
        fresh.token(&id).await.unwrap_err(),
        BridgeError::Paused {
            reason: "incident 9".into(),
            retry_after: None
        }
    );
    s.admin(Method::DELETE, "/workspaces/u1/pause", None).await;
    crate::rest::needs_a_person(&s, &id).await;
    let fresh = Bridge::builder(&s.gateway, &key)
        .grpc(true)
        .build()
        .unwrap();
    assert!(matches!(
        fresh.token(&id).await,
        Err(BridgeError::InteractionRequired { ref code, .. }) if code == "attention_required"
    ));
    s.stop().await;
}
