//! The gRPC API: `nexus.v1.NexusService` (proto/nexus/v1/nexus.proto), the
//! same operations as REST, with SPEC §4's error mapping.

use std::sync::Arc;

use prost_types::value::Kind;
use serde_json::{json, Map, Value};
use tonic::{Request, Response, Status};

use crate::auth::Agent;
use crate::core::Gateway;
use crate::error::GatewayError;

/// Generated code.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("nexus.v1");
}

use pb::nexus_service_server::NexusService;
use pb::*;

/// The service.
pub struct Service {
    gateway: Arc<Gateway>,
}

impl Service {
    /// A service over the gateway state.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }

    async fn agent<T>(&self, req: &Request<T>) -> Result<Arc<Agent>, Status> {
        let m = req.metadata();
        let value = |name: &str| m.get(name).and_then(|v| v.to_str().ok());
        let key = crate::auth::presented_key(value("authorization"), || value("x-api-key"));
        let peer = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        self.gateway
            .keys
            .verify(key, peer)
            .await
            .map_err(|e| e.to_status())
    }
}

/// JSON → `google.protobuf.Value`.
fn to_value(v: Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A JSON object → `google.protobuf.Struct`.
pub fn to_struct(o: Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: o.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(o) => o,
        _ => Map::new(),
    }
}

fn err(e: GatewayError) -> Status {
    e.to_status()
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[tonic::async_trait]
impl NexusService for Service {
    async fn request_connection(
        &self,
        req: Request<RequestConnectionRequest>,
    ) -> Result<Response<RequestConnectionResponse>, Status> {
        let agent = self.agent(&req).await?;
        let r = req.into_inner();
        let mut body = Map::new();
        body.insert("user_id".into(), json!(r.user_id));
        if let Some(p) = non_empty(r.provider_id) {
            body.insert("provider_id".into(), json!(p));
        }
        if let Some(p) = non_empty(r.provider_name) {
            body.insert("provider_name".into(), json!(p));
        }
        if !r.scopes.is_empty() {
            body.insert("scopes".into(), json!(r.scopes));
        }
        body.insert("return_url".into(), json!(r.return_url));
        if let Some(c) = non_empty(r.connection_id) {
            body.insert("connection_id".into(), json!(c));
        }
        let spec = self
            .gateway
            .request_connection(&agent, body)
            .await
            .map_err(err)?;
        let s = |k: &str| spec[k].as_str().unwrap_or_default().to_string();
        Ok(Response::new(RequestConnectionResponse {
            auth_url: s("authUrl"),
            state: s("state"),
            scopes: spec["scopes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default(),
            provider_id: s("provider_id"),
            connection_id: s("connection_id"),
        }))
    }

    async fn check_connection(
        &self,
        req: Request<CheckConnectionRequest>,
    ) -> Result<Response<CheckConnectionResponse>, Status> {
        let agent = self.agent(&req).await?;
        let id = req.into_inner().connection_id;
        let check = self
            .gateway
            .check_connection(&agent, &id)
            .await
            .map_err(err)?;
        Ok(Response::new(CheckConnectionResponse {
            status: check.status.to_string(),
            state: check.state,
        }))
    }

    async fn get_token(
        &self,
        req: Request<GetTokenRequest>,
    ) -> Result<Response<GetTokenResponse>, Status> {
        let agent = self.agent(&req).await?;
        let id = req.into_inner().connection_id;
        let reply = self.gateway.token(&agent, &id, false).await.map_err(err)?;
        let token = to_struct(object(reply.json().map_err(err)?));
        Ok(Response::new(GetTokenResponse { token: Some(token) }))
    }

    async fn refresh_connection(
        &self,
        req: Request<RefreshConnectionRequest>,
    ) -> Result<Response<RefreshConnectionResponse>, Status> {
        let agent = self.agent(&req).await?;
        let id = req.into_inner().connection_id;
        let reply = self.gateway.token(&agent, &id, true).await.map_err(err)?;
        let token = to_struct(object(reply.json().map_err(err)?));
        Ok(Response::new(RefreshConnectionResponse {
            token: Some(token),
        }))
    }

    async fn report_scope_failure(
        &self,
        req: Request<ReportScopeFailureRequest>,
    ) -> Result<Response<ReportScopeFailureResponse>, Status> {
        let agent = self.agent(&req).await?;
        let r = req.into_inner();
        let mut body = Map::new();
        if r.status != 0 {
            body.insert("status".into(), json!(r.status));
        }
        if !r.scopes.is_empty() {
            body.insert("scopes".into(), json!(r.scopes));
        }
        if !r.ok_scopes.is_empty() {
            body.insert("ok_scopes".into(), json!(r.ok_scopes));
        }
        for (k, v) in [
            ("method", r.method),
            ("host", r.host),
            ("path_template", r.path_template),
            ("provider_error", r.provider_error),
            ("www_authenticate", r.www_authenticate),
            ("observed_at", r.observed_at),
        ] {
            if let Some(v) = non_empty(v) {
                body.insert(k.into(), json!(v));
            }
        }
        let reply = self
            .gateway
            .scope_failure(&agent, &r.connection_id, &Value::Object(body))
            .await
            .map_err(err)?;
        let result = to_struct(object(reply.json().map_err(err)?));
        Ok(Response::new(ReportScopeFailureResponse {
            result: Some(result),
        }))
    }
}
