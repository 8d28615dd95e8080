//! The gateway's REST API (SPEC §4) and the transport rules every call obeys.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use crate::error::BridgeError;
use crate::secret::Secret;

/// Largest gateway answer read.
const MAX_ANSWER: usize = 1024 * 1024;

/// `POST /v1/request-connection`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectionRequest {
    /// The user (workspace) the connection is for.
    pub user_id: String,
    /// Provider by id...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    /// ...or by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_name: Option<String>,
    /// Scopes to ask for (empty: the provider's defaults).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Where the browser goes when the handshake ends.
    pub return_url: String,
    /// Reconnect this existing connection instead of making a new one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<String>,
}

/// The answer to a connection request: send the person to `auth_url`.
#[derive(Debug, Clone, Deserialize)]
pub struct ConsentSpec {
    /// Where the person consents.
    #[serde(rename = "authUrl")]
    pub auth_url: String,
    /// The handshake's state.
    pub state: String,
    /// Scopes asked for.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Provider.
    pub provider_id: String,
    /// The connection (pending until the handshake completes).
    pub connection_id: String,
}

/// A scope failure (or success) seen at the provider (SPEC §8).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScopeReport {
    /// 401 or 403.
    pub status: u16,
    /// Scopes refused (else taken from `www_authenticate` by the broker).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Scopes that worked again.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ok_scopes: Vec<String>,
    /// Request method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Provider host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Route template (never a raw path: it can carry ids).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_template: Option<String>,
    /// The provider's `WWW-Authenticate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub www_authenticate: Option<String>,
}

/// Whether `host` is this machine (plaintext to it stays on the machine).
fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => IpAddr::V4(*ip).is_loopback(),
        url::Host::Ipv6(ip) => IpAddr::V6(*ip).is_loopback(),
    }
}

/// Refuses plaintext HTTP to anything but loopback unless `allow_insecure`.
pub fn check_transport(url: &Url, allow_insecure: bool) -> Result<(), BridgeError> {
    match url.scheme() {
        "https" | "wss" => Ok(()),
        "http" | "ws" => match url.host() {
            Some(h) if allow_insecure || is_loopback(&h) => Ok(()),
            Some(h) => Err(BridgeError::InsecureTransport(h.to_string())),
            None => Err(BridgeError::Config(format!("{url} has no host"))),
        },
        other => Err(BridgeError::Config(format!(
            "unsupported URL scheme '{other}'"
        ))),
    }
}

/// A rustls client configuration on the ring provider (set here, not taken
/// from a process-wide default) with the webpki roots.
pub fn tls_config() -> Result<rustls::ClientConfig, BridgeError> {
    tls_config_with(&[])
}

/// A client certificate (PEM chain) and its private key (PEM), presented to
/// a gateway that asks for one (mutual TLS).
#[derive(Clone, Debug)]
pub struct ClientIdentityPem {
    /// The certificate chain, leaf first.
    pub cert: Vec<u8>,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Secret,
}

/// [`tls_config`] trusting the CA certificates in `extra_ca_pem` too (a
/// private or development CA of the gateway).
pub fn tls_config_with(extra_ca_pem: &[u8]) -> Result<rustls::ClientConfig, BridgeError> {
    tls_config_for(extra_ca_pem, None)
}

/// [`tls_config_with`], presenting `identity` when the server asks for a
/// client certificate.
pub fn tls_config_for(
    extra_ca_pem: &[u8],
    identity: Option<&ClientIdentityPem>,
) -> Result<rustls::ClientConfig, BridgeError> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if !extra_ca_pem.is_empty() {
        let mut added = 0;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(extra_ca_pem) {
            let cert = cert.map_err(|e| BridgeError::Config(format!("gateway CA: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| BridgeError::Config(format!("gateway CA: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(BridgeError::Config(
                "gateway CA: no PEM certificate in it".into(),
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BridgeError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let Some(id) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(&id.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BridgeError::Config(format!("client certificate: {e}")))?;
    if chain.is_empty() {
        return Err(BridgeError::Config(
            "client certificate: no PEM certificate in it".into(),
        ));
    }
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(id.key.expose().as_bytes())
        .map_err(|e| BridgeError::Config(format!("client key: {e}")))?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| BridgeError::Config(format!("client certificate and key: {e}")))
}

/// An HTTP client on rustls with the ring provider (set here, not taken
/// from a process-wide default) and the webpki roots.
pub fn http_client(
    timeout: Duration,
    follow_redirects: bool,
) -> Result<reqwest::Client, BridgeError> {
    client_with(tls_config()?, timeout, follow_redirects)
}

fn client_with(
    tls: rustls::ClientConfig,
    timeout: Duration,
    follow_redirects: bool,
) -> Result<reqwest::Client, BridgeError> {
    let redirects = if follow_redirects {
        reqwest::redirect::Policy::default()
    } else {
        reqwest::redirect::Policy::none()
    };
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .redirect(redirects)
        .connect_timeout(Duration::from_secs(5).min(timeout))
        .timeout(timeout)
        // The gateway closes keep-alive connections idle for its
        // HEADER_READ_TIMEOUT_SECS (10 s by default): drop ours before.
        .pool_idle_timeout(Duration::from_secs(4))
        .user_agent(concat!("nexus-bridge/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| BridgeError::Config(e.to_string()))
}

/// Talks to the gateway with an agent key, over REST (or gRPC with the
/// `grpc` feature).
#[derive(Clone)]
pub struct GatewayClient {
    http: reqwest::Client,
    base: Url,
    key: Arc<Secret>,
    #[cfg(feature = "grpc")]
    grpc: Option<crate::grpc::GrpcClient>,
    #[cfg(feature = "grpc")]
    extra_ca_pem: Vec<u8>,
    #[cfg(feature = "grpc")]
    identity: Option<ClientIdentityPem>,
}

impl std::fmt::Debug for GatewayClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayClient")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

/// A state as the bridge reports it: `not_found` (v1 answers unknown
/// connections with a status of `failed`) becomes the typed error.
fn precise_state(state: String) -> Result<String, BridgeError> {
    if state == "not_found" {
        return Err(BridgeError::NotFound("connection not found".into()));
    }
    Ok(state)
}

impl GatewayClient {
    /// A client for the gateway at `base`.
    pub fn new(
        base: &str,
        agent_key: Secret,
        allow_insecure: bool,
        timeout: Duration,
    ) -> Result<Self, BridgeError> {
        Self::with_ca(base, agent_key, allow_insecure, timeout, &[])
    }

    /// [`GatewayClient::new`], also trusting the CA certificates in
    /// `extra_ca_pem` for the gateway's TLS.
    pub fn with_ca(
        base: &str,
        agent_key: Secret,
        allow_insecure: bool,
        timeout: Duration,
        extra_ca_pem: &[u8],
    ) -> Result<Self, BridgeError> {
        Self::with_tls(base, agent_key, allow_insecure, timeout, extra_ca_pem, None)
    }

    /// [`GatewayClient::with_ca`], presenting `identity` to a gateway that
    /// asks for a client certificate.
    pub fn with_tls(
        base: &str,
        agent_key: Secret,
        allow_insecure: bool,
        timeout: Duration,
        extra_ca_pem: &[u8],
        identity: Option<ClientIdentityPem>,
    ) -> Result<Self, BridgeError> {
        let base = Url::parse(base)
            .map_err(|e| BridgeError::Config(format!("gateway URL '{base}': {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(BridgeError::Config(
                "the gateway URL must be http(s)".into(),
            ));
        }
        check_transport(&base, allow_insecure)?;
        if agent_key.expose().is_empty() {
            return Err(BridgeError::Config("the agent key is empty".into()));
        }
        Ok(Self {
            // A redirect could carry the agent key elsewhere: never followed.
            http: client_with(
                tls_config_for(extra_ca_pem, identity.as_ref())?,
                timeout,
                false,
            )?,
            base,
            key: Arc::new(agent_key),
            #[cfg(feature = "grpc")]
            grpc: None,
            #[cfg(feature = "grpc")]
            extra_ca_pem: extra_ca_pem.to_vec(),
            #[cfg(feature = "grpc")]
            identity,
        })
    }

    /// The same gateway over gRPC (`nexus.v1.NexusService` on the same
    /// port), connected on first use.
    #[cfg(feature = "grpc")]
    pub fn over_grpc(mut self, timeout: Duration) -> Result<Self, BridgeError> {
        self.grpc = Some(crate::grpc::GrpcClient::new(
            &self.base,
            timeout,
            &self.extra_ca_pem,
            self.identity.as_ref(),
        )?);
        Ok(self)
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.base.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty();
            p.extend(segments);
        }
        u
    }

    /// One call; the body of a 2xx answer, or the error it stands for.
    async fn call(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
    ) -> Result<Vec<u8>, BridgeError> {
        let mut req = self
            .http
            .request(method, self.url(segments))
            .bearer_auth(self.key.expose());
        if let Some(b) = body {
            req = req.json(b);
        }
        let transport = |e: reqwest::Error| BridgeError::Transport(e.without_url().to_string());
        let mut resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut out = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if out.len() + chunk.len() > MAX_ANSWER {
                return Err(BridgeError::Transport(
                    "gateway answer larger than 1 MiB".into(),
                ));
            }
            out.extend_from_slice(&chunk);
        }
        if status.is_success() {
            Ok(out)
        } else {
            Err(BridgeError::from_answer(status.as_u16(), &out, retry_after))
        }
    }

    fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BridgeError> {
        serde_json::from_slice(body).map_err(|e| BridgeError::Gateway {
            status: 200,
            code: "invalid_answer".into(),
            message: format!("unreadable gateway answer: {e}"),
            retry_after: None,
        })
    }

    /// `POST /v1/request-connection`.
    pub async fn request_connection(
        &self,
        req: &ConnectionRequest,
    ) -> Result<ConsentSpec, BridgeError> {
        #[cfg(feature = "grpc")]
        if let Some(g) = &self.grpc {
            return g.request_connection(&self.key, req).await;
        }
        let body = serde_json::to_value(req).map_err(|e| BridgeError::Config(e.to_string()))?;
        let answer = self
            .call(Method::POST, &["v1", "request-connection"], Some(&body))
            .await?;
        Self::json(&answer)
    }

    /// `GET /v1/check-connection/{id}` → the precise state (`state`; a
    /// gateway that predates it sends only `status`).
    pub async fn check_connection(&self, id: &str) -> Result<String, BridgeError> {
        #[cfg(feature = "grpc")]
        if let Some(g) = &self.grpc {
            return precise_state(g.check_connection(&self.key, id).await?);
        }
        let answer = self
            .call(Method::GET, &["v1", "check-connection", id], None)
            .await?;
        let v: Value = Self::json(&answer)?;
        let state = v["state"].as_str().or(v["status"].as_str());
        precise_state(state.unwrap_or("unknown").to_string())
    }

    /// `GET /v1/token/{id}`: the raw token answer.
    pub async fn token(&self, id: &str) -> Result<Vec<u8>, BridgeError> {
        #[cfg(feature = "grpc")]
        if let Some(g) = &self.grpc {
            return g.token(&self.key, id).await;
        }
        self.call(Method::GET, &["v1", "token", id], None).await
    }

    /// `POST /v1/refresh/{id}`: refresh now, the raw token answer.
    pub async fn refresh(&self, id: &str) -> Result<Vec<u8>, BridgeError> {
        #[cfg(feature = "grpc")]
        if let Some(g) = &self.grpc {
            return g.refresh(&self.key, id).await;
        }
        self.call(
            Method::POST,
            &["v1", "refresh", id],
            Some(&Value::Object(Default::default())),
        )
        .await
    }

    /// `GET /v1/providers`: providers grouped by auth type, then name.
    pub async fn providers(&self) -> Result<Value, BridgeError> {
        let answer = self.call(Method::GET, &["v1", "providers"], None).await?;
        Self::json(&answer)
    }

    /// `GET /v1/workspaces/{id}/connections/status`: the workspace's
    /// connections and their health.
    pub async fn workspace_connections(&self, workspace: &str) -> Result<Value, BridgeError> {
        let answer = self
            .call(
                Method::GET,
                &["v1", "workspaces", workspace, "connections", "status"],
                None,
            )
            .await?;
        Self::json(&answer)
    }

    /// The connection of `workspace` to `provider` (its name, any case, or
    /// its id): one that serves (`active`, then `degraded`) before one that
    /// needs a person, the most recently updated first. `NotFound` if the
    /// workspace has none.
    pub async fn find_connection(
        &self,
        workspace: &str,
        provider: &str,
    ) -> Result<String, BridgeError> {
        let providers = self.providers().await?;
        let mut ids = vec![provider.to_string()];
        for by_name in providers.as_object().into_iter().flat_map(|m| m.values()) {
            for (name, p) in by_name.as_object().into_iter().flatten() {
                if name.eq_ignore_ascii_case(provider) {
                    if let Some(id) = p["id"].as_str() {
                        ids.push(id.to_string());
                    }
                }
            }
        }
        let status = self.workspace_connections(workspace).await?;
        let rank = |s: &str| match s {
            "active" => 0,
            "degraded" => 1,
            "pending" => 3,
            _ => 2,
        };
        status["connections"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, c)| {
                c["provider_id"]
                    .as_str()
                    .is_some_and(|p| ids.iter().any(|i| i == p))
            })
            .min_by(|(_, a), (_, b)| {
                let key = |c: &Value| rank(c["status"].as_str().unwrap_or(""));
                key(a).cmp(&key(b)).then_with(|| {
                    // RFC 3339 in UTC sorts as text; newest first.
                    b["updated_at"].as_str().cmp(&a["updated_at"].as_str())
                })
            })
            .map(|(id, _)| id.clone())
            .ok_or_else(|| {
                BridgeError::NotFound(format!(
                    "workspace {workspace} has no connection to provider {provider}"
                ))
            })
    }

    /// `POST /v1/connect-sessions`: a connect-portal link for a person of
    /// `workspace`, offering `providers` (names or ids; all when empty).
    /// The answer is `{id, url, token, expires_at, workspace_id}`.
    pub async fn connect_session(
        &self,
        workspace: &str,
        providers: &[&str],
    ) -> Result<Value, BridgeError> {
        let mut body = serde_json::json!({ "workspace_id": workspace });
        if !providers.is_empty() {
            body["providers"] = serde_json::json!(providers);
        }
        let answer = self
            .call(Method::POST, &["v1", "connect-sessions"], Some(&body))
            .await?;
        Self::json(&answer)
    }

    /// `POST /v1/connections/{id}/scope-failures`.
    pub async fn report_scope_failure(
        &self,
        id: &str,
        report: &ScopeReport,
    ) -> Result<Value, BridgeError> {
        #[cfg(feature = "grpc")]
        if let Some(g) = &self.grpc {
            return g.report_scope_failure(&self.key, id, report).await;
        }
        let body = serde_json::to_value(report).map_err(|e| BridgeError::Config(e.to_string()))?;
        let answer = self
            .call(
                Method::POST,
                &["v1", "connections", id, "scope-failures"],
                Some(&body),
            )
            .await?;
        Self::json(&answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_only_to_loopback_unless_allowed() {
        let ok = |u: &str, allow| check_transport(&Url::parse(u).unwrap(), allow);
        assert!(ok("https://gw.example.com", false).is_ok());
        assert!(ok("http://127.0.0.1:8090", false).is_ok());
        assert!(ok("http://127.9.9.9", false).is_ok());
        assert!(ok("http://[::1]:8090", false).is_ok());
        assert!(ok("http://localhost:8090", false).is_ok());
        assert_eq!(
            ok("http://gw.example.com", false),
            Err(BridgeError::InsecureTransport("gw.example.com".into()))
        );
        assert!(ok("http://10.0.0.5", false).is_err());
        assert!(ok("http://gw.example.com", true).is_ok());
        assert!(matches!(
            ok("ftp://gw.example.com", true),
            Err(BridgeError::Config(_))
        ));
        assert!(GatewayClient::new(
            "http://gw.example.com",
            Secret::new("nxa_x"),
            false,
            Duration::from_secs(1)
        )
        .is_err());
    }
}
