//! The gateway client over gRPC (`nexus.v1.NexusService`, feature `grpc`):
//! the same calls as REST, the same typed errors (from the status code and
//! the `google.rpc.ErrorInfo` reason the gateway attaches).

use std::time::Duration;

use prost_types::value::Kind;
use serde_json::{Map, Number, Value};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::error::BridgeError;
use crate::gateway::{ConnectionRequest, ConsentSpec, ScopeReport};
use crate::secret::Secret;

/// Generated messages and client.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("nexus.v1");
}

use pb::nexus_service_client::NexusServiceClient;

/// A lazily connected channel to the gateway's gRPC port.
#[derive(Clone, Debug)]
pub(crate) struct GrpcClient {
    client: NexusServiceClient<Channel>,
}

impl GrpcClient {
    /// Connects on first use (plaintext for `http://`, TLS for `https://`).
    pub(crate) fn new(
        url: &url::Url,
        timeout: Duration,
        extra_ca_pem: &[u8],
        identity: Option<&crate::gateway::ClientIdentityPem>,
    ) -> Result<Self, BridgeError> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| BridgeError::Config(format!("gRPC endpoint: {e}")))?
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5).min(timeout));
        if url.scheme() == "https" {
            let mut tls = ClientTlsConfig::new().with_webpki_roots();
            if !extra_ca_pem.is_empty() {
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(extra_ca_pem));
            }
            if let Some(id) = identity {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    &id.cert,
                    id.key.expose(),
                ));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| BridgeError::Config(format!("gRPC TLS: {e}")))?;
        }
        Ok(Self {
            client: NexusServiceClient::new(endpoint.connect_lazy()),
        })
    }

    fn request<T>(key: &Secret, msg: T) -> Result<Request<T>, BridgeError> {
        let mut r = Request::new(msg);
        let mut v: MetadataValue<_> = format!("Bearer {}", key.expose())
            .parse()
            .map_err(|_| BridgeError::Config("the agent key is not valid metadata".into()))?;
        v.set_sensitive(true);
        r.metadata_mut().insert("authorization", v);
        Ok(r)
    }

    pub(crate) async fn request_connection(
        &self,
        key: &Secret,
        req: &ConnectionRequest,
    ) -> Result<ConsentSpec, BridgeError> {
        let msg = pb::RequestConnectionRequest {
            user_id: req.user_id.clone(),
            provider_id: req.provider_id.clone().unwrap_or_default(),
            provider_name: req.provider_name.clone().unwrap_or_default(),
            scopes: req.scopes.clone(),
            return_url: req.return_url.clone(),
            action: String::new(),
            connection_id: req.connection_id.clone().unwrap_or_default(),
        };
        let r = self
            .client
            .clone()
            .request_connection(Self::request(key, msg)?)
            .await
            .map_err(status_error)?
            .into_inner();
        Ok(ConsentSpec {
            auth_url: r.auth_url,
            state: r.state,
            scopes: r.scopes,
            provider_id: r.provider_id,
            connection_id: r.connection_id,
        })
    }

    pub(crate) async fn check_connection(
        &self,
        key: &Secret,
        id: &str,
    ) -> Result<String, BridgeError> {
        let msg = pb::CheckConnectionRequest {
            connection_id: id.into(),
        };
        let r = self
            .client
            .clone()
            .check_connection(Self::request(key, msg)?)
            .await
            .map_err(status_error)?
            .into_inner();
        // An older gateway sends only `status`.
        Ok(if r.state.is_empty() {
            r.status
        } else {
            r.state
        })
    }

    /// The token answer as JSON text (as REST would give it).
    pub(crate) async fn token(&self, key: &Secret, id: &str) -> Result<Vec<u8>, BridgeError> {
        let msg = pb::GetTokenRequest {
            connection_id: id.into(),
        };
        let r = self
            .client
            .clone()
            .get_token(Self::request(key, msg)?)
            .await
            .map_err(status_error)?
            .into_inner();
        Ok(struct_json(r.token).to_string().into_bytes())
    }

    pub(crate) async fn refresh(&self, key: &Secret, id: &str) -> Result<Vec<u8>, BridgeError> {
        let msg = pb::RefreshConnectionRequest {
            connection_id: id.into(),
        };
        let r = self
            .client
            .clone()
            .refresh_connection(Self::request(key, msg)?)
            .await
            .map_err(status_error)?
            .into_inner();
        Ok(struct_json(r.token).to_string().into_bytes())
    }

    pub(crate) async fn report_scope_failure(
        &self,
        key: &Secret,
        id: &str,
        report: &ScopeReport,
    ) -> Result<Value, BridgeError> {
        let msg = pb::ReportScopeFailureRequest {
            connection_id: id.into(),
            status: i32::from(report.status),
            scopes: report.scopes.clone(),
            method: report.method.clone().unwrap_or_default(),
            host: report.host.clone().unwrap_or_default(),
            path_template: report.path_template.clone().unwrap_or_default(),
            provider_error: String::new(),
            www_authenticate: report.www_authenticate.clone().unwrap_or_default(),
            observed_at: String::new(),
            ok_scopes: report.ok_scopes.clone(),
        };
        let r = self
            .client
            .clone()
            .report_scope_failure(Self::request(key, msg)?)
            .await
            .map_err(status_error)?
            .into_inner();
        Ok(struct_json(r.result))
    }
}

/// The error a status stands for (the gateway puts the REST error code in
/// `ErrorInfo.reason`).
fn status_error(s: Status) -> BridgeError {
    let info = s.get_details_error_info();
    let reason = info.as_ref().map(|i| i.reason.clone()).unwrap_or_default();
    let message = s.message().to_string();
    match s.code() {
        Code::Unauthenticated => BridgeError::Unauthorized(message),
        Code::NotFound => BridgeError::NotFound(message),
        Code::FailedPrecondition if reason == "connection_pending" => BridgeError::Pending(message),
        Code::FailedPrecondition => BridgeError::InteractionRequired {
            code: if reason.is_empty() {
                "failed_precondition".into()
            } else {
                reason
            },
            message,
        },
        Code::Unavailable if reason == "issuance_paused" => BridgeError::Paused {
            reason: info
                .and_then(|i| i.metadata.get("reason").cloned())
                .unwrap_or(message),
            retry_after: None,
        },
        Code::Unavailable | Code::DeadlineExceeded if reason.is_empty() => {
            BridgeError::Transport(message)
        }
        code => BridgeError::Gateway {
            status: match code {
                Code::InvalidArgument => 400,
                Code::PermissionDenied => 403,
                Code::ResourceExhausted => 429,
                Code::Unavailable => 503,
                _ => 502,
            },
            code: if reason.is_empty() {
                format!("{code:?}")
            } else {
                reason
            },
            message,
            retry_after: None,
        },
    }
}

/// A protobuf `Struct` as JSON; whole numbers come back as integers
/// (`expires_in`), as REST sends them.
fn struct_json(s: Option<prost_types::Struct>) -> Value {
    fn value(v: prost_types::Value) -> Value {
        match v.kind {
            None | Some(Kind::NullValue(_)) => Value::Null,
            Some(Kind::BoolValue(b)) => Value::Bool(b),
            Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
                Value::from(n as i64)
            }
            Some(Kind::NumberValue(n)) => Number::from_f64(n).map_or(Value::Null, Value::Number),
            Some(Kind::StringValue(s)) => Value::String(s),
            Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(value).collect()),
            Some(Kind::StructValue(s)) => object(s),
        }
    }
    fn object(s: prost_types::Struct) -> Value {
        Value::Object(
            s.fields
                .into_iter()
                .map(|(k, v)| (k, value(v)))
                .collect::<Map<_, _>>(),
        )
    }
    s.map_or(Value::Null, object)
}
