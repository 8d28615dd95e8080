//! gRPC through the gateway (a tonic client): every RPC, and SPEC §4's error
//! mapping with machine-readable reasons.

use nexus_gateway::grpc::pb::nexus_service_client::NexusServiceClient;
use nexus_gateway::grpc::pb::*;
use prost_types::value::Kind;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_types::StatusExt;

use crate::harness::{Stack, RETURN_URL};

async fn client(s: &Stack) -> NexusServiceClient<Channel> {
    let ch = Channel::from_shared(s.gateway.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    NexusServiceClient::new(ch)
}

fn with_key<T>(msg: T, key: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(k) = key {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    r
}

fn text(s: &prost_types::Struct, k: &str) -> String {
    match s.fields.get(k).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(v)) => v.clone(),
        other => panic!("{k}: {other:?}"),
    }
}

fn reason(st: &tonic::Status) -> String {
    st.get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_and_the_error_mapping() {
    let s = Stack::start(0, "").await;
    s.weather().await;
    let (_, key) = s.agent_key(&["u1"]).await;
    let (_, other) = s.agent_key(&["u2"]).await;
    let mut c = client(&s).await;

    let spec = c
        .request_connection(with_key(
            RequestConnectionRequest {
                user_id: "u1".into(),
                provider_name: "weather".into(),
                return_url: RETURN_URL.into(),
                ..Default::default()
            },
            Some(&key),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(spec.auth_url.contains("/auth/capture"), "{spec:?}");
    assert!(!spec.connection_id.is_empty() && !spec.state.is_empty());
    let pending = c
        .check_connection(with_key(
            CheckConnectionRequest {
                connection_id: spec.connection_id.clone(),
            },
            Some(&key),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.status, "pending");
    let st = c
        .get_token(with_key(
            GetTokenRequest {
                connection_id: spec.connection_id.clone(),
            },
            Some(&key),
        ))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    assert_eq!(reason(&st), "connection_pending");

    let id = s.connect(&key, "u1").await;
    let tok = c
        .get_token(with_key(
            GetTokenRequest {
                connection_id: id.clone(),
            },
            Some(&key),
        ))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert_eq!(text(&tok, "provider"), "weather");
    assert!(tok.fields.contains_key("credentials"));
    assert!(!tok.fields.contains_key("refresh_token"));
    let tok = c
        .refresh_connection(with_key(
            RefreshConnectionRequest {
                connection_id: id.clone(),
            },
            Some(&key),
        ))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert_eq!(text(&tok, "status"), "active");
    let r = c
        .report_scope_failure(with_key(
            ReportScopeFailureRequest {
                connection_id: id.clone(),
                status: 403,
                scopes: vec!["forecast.read".into()],
                method: "GET".into(),
                ..Default::default()
            },
            Some(&key),
        ))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    assert_eq!(text(&r, "status"), "degraded");

    // Errors.
    let st = c
        .get_token(with_key(
            GetTokenRequest {
                connection_id: id.clone(),
            },
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated);
    assert_eq!(reason(&st), "missing_agent_key");
    let st = c
        .get_token(with_key(
            GetTokenRequest {
                connection_id: id.clone(),
            },
            Some("nxa_nope"),
        ))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated);
    let st = c
        .get_token(with_key(
            GetTokenRequest {
                connection_id: id.clone(),
            },
            Some(&other),
        ))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "another workspace = unknown");
    assert_eq!(reason(&st), "connection_not_found");
    let st = c
        .report_scope_failure(with_key(
            ReportScopeFailureRequest {
                connection_id: id.clone(),
                status: 500,
                scopes: vec!["x".into()],
                ..Default::default()
            },
            Some(&key),
        ))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert_eq!(reason(&st), "invalid_status");
    crate::rest::needs_a_person(&s, &id).await;
    let st = c
        .get_token(with_key(
            GetTokenRequest {
                connection_id: id.clone(),
            },
            Some(&key),
        ))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition);
    assert_eq!(reason(&st), "attention_required");
    s.stop().await;
}
