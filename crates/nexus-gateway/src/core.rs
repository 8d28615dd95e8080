//! What the gateway does for an agent, shared by REST and gRPC: check the
//! agent key's workspaces, then ask the broker.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use nexus_core::wire::routes;

use crate::auth::{Agent, KeyCache};
use crate::broker::{BrokerClient, Reply};
use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::token_cache::TokenCache;

/// The gateway's state.
pub struct Gateway {
    /// Broker client.
    pub broker: BrokerClient,
    /// Verified agent keys.
    pub keys: KeyCache,
    /// Validated configuration.
    pub config: GatewayConfig,
    /// Token answers kept while the broker's change stream is open.
    pub tokens: TokenCache,
    /// Connection id → workspace (a connection never changes workspace):
    /// read on every call, so behind a read lock; emptied when full.
    workspaces: RwLock<HashMap<String, Arc<str>>>,
    /// Handshakes started, per agent key id.
    starts: nexus_core::limit::Windows<String>,
}

/// Most connection → workspace entries kept.
const MAX_WORKSPACES: usize = 100_000;

/// Connection ids are broker-made; anything else is unknown without asking.
fn plausible_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Refuses (as unknown) a workspace outside the key's.
fn allowed(agent: &Agent, workspace: &str) -> Result<(), GatewayError> {
    if agent.may(workspace) {
        Ok(())
    } else {
        // No metric here: a counter of "exists elsewhere" would tell a key
        // holder what the identical 404 hides.
        Err(GatewayError::connection_not_found())
    }
}

/// A connection's standing as check-connection tells it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionCheck {
    /// The reference's v1 enum: `active` (serves tokens, perhaps for fewer
    /// scopes), `pending` (consent not finished) or `failed` (will not serve
    /// until a person or operator acts). Clients that wait for `active` or
    /// `failed` always stop.
    pub status: &'static str,
    /// The precise state: `active`, `degraded`, `pending`,
    /// `attention_required`, `revoked`, `failed`, `unusable` (the provider
    /// is gone) or `not_found`.
    pub state: String,
    /// Whether some scopes fail at the provider (`state` is `degraded`).
    pub degraded: bool,
    /// Scopes the provider refuses.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failing_scopes: Vec<String>,
    /// Why it does not serve (or serves less), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// Whether a person can fix it by consenting again (request-connection
    /// with this `connection_id`).
    pub reconsent: bool,
}

impl ConnectionCheck {
    /// From the broker's view of a connection.
    fn of(c: &Value) -> Self {
        let state = c["status"].as_str().unwrap_or("failed");
        // A connection whose provider was deleted can never serve again.
        let usable = c["usable"].as_bool().unwrap_or(true);
        let (status, state) = match state {
            _ if !usable => ("failed", "unusable"),
            "active" | "degraded" => ("active", state),
            "pending" => ("pending", state),
            _ => ("failed", state),
        };
        let failing_scopes = c["failing_scopes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let error_code = match state {
            "unusable" => Some("provider_deleted".to_string()),
            _ => c["error_code"].as_str().map(str::to_string),
        };
        Self {
            status,
            state: state.to_string(),
            degraded: state == "degraded",
            failing_scopes,
            error_code,
            reconsent: matches!(state, "degraded" | "attention_required"),
        }
    }

    /// Unknown, or another workspace's: one answer for both.
    fn not_found() -> Self {
        Self {
            status: "failed",
            state: "not_found".into(),
            degraded: false,
            failing_scopes: Vec::new(),
            error_code: Some("connection_not_found".into()),
            reconsent: false,
        }
    }
}

impl Gateway {
    /// Builds the gateway state, reaching the broker over the network.
    pub fn new(config: GatewayConfig) -> Result<Arc<Self>, nexus_core::outbound::OutboundError> {
        let broker = BrokerClient::new(
            config.broker_url.clone(),
            config.broker_api_key.clone(),
            config.broker_timeout,
            &config.broker_tls,
        )?;
        Ok(Self::with_broker(config, broker))
    }

    /// Builds the gateway state with a given broker client.
    pub fn with_broker(config: GatewayConfig, broker: BrokerClient) -> Arc<Self> {
        Arc::new(Self {
            keys: KeyCache::new(broker.clone(), config.key_cache_ttl),
            broker,
            tokens: TokenCache::new(config.token_cache_capacity),
            starts: nexus_core::limit::Windows::new(
                config.agent_handshakes_per_minute,
                std::time::Duration::from_secs(60),
                100_000,
            ),
            config,
            workspaces: RwLock::new(HashMap::new()),
        })
    }

    fn remember_workspace(&self, id: &str, workspace: &str) {
        let mut map = self.workspaces.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_WORKSPACES && !map.contains_key(id) {
            // Rebuilt from the broker on demand; no order to keep.
            map.clear();
        }
        map.insert(id.to_string(), Arc::from(workspace));
    }

    /// The broker's view of a connection (404 when unknown); its workspace
    /// is remembered.
    async fn connection(&self, id: &str) -> Result<(Value, String), GatewayError> {
        if !plausible_id(id) {
            return Err(GatewayError::connection_not_found());
        }
        let c = self
            .broker
            .get(self.broker.url(routes::CONNECTION, id))
            .await?
            .ok()?
            .json()?;
        let ws = c["workspace_id"]
            .as_str()
            .ok_or_else(|| GatewayError::broker_unavailable("connection without workspace"))?
            .to_string();
        self.remember_workspace(id, &ws);
        Ok((c, ws))
    }

    /// The workspace of a connection (404 when unknown).
    async fn workspace_of(&self, id: &str) -> Result<Arc<str>, GatewayError> {
        if !plausible_id(id) {
            return Err(GatewayError::connection_not_found());
        }
        if let Some(w) = self
            .workspaces
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            return Ok(w.clone());
        }
        Ok(Arc::from(self.connection(id).await?.1))
    }

    /// Refuses (as unknown) a connection outside the key's workspaces.
    pub async fn authorize(&self, agent: &Agent, id: &str) -> Result<(), GatewayError> {
        let ws = self.workspace_of(id).await?;
        allowed(agent, &ws)
    }

    /// `POST /v1/request-connection`.
    pub async fn request_connection(
        &self,
        agent: &Agent,
        req: Map<String, Value>,
    ) -> Result<Value, GatewayError> {
        let str_field = |k: &str| req.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
        let Some(user) = str_field("user_id").or_else(|| str_field("workspace_id")) else {
            return Err(GatewayError::new(
                StatusCode::BAD_REQUEST,
                "missing_fields",
                "user_id is required",
            ));
        };
        if !agent.may(user) {
            return Err(GatewayError::new(
                StatusCode::FORBIDDEN,
                "workspace_forbidden",
                "this agent key may not act for that user_id",
            ));
        }
        if let Some(cid) = str_field("connection_id") {
            self.authorize(agent, cid).await?;
        }
        // A leaked or runaway agent key must not flood the broker with
        // handshakes (the broker limits each workspace too).
        if let Err(wait) = self.starts.hit(agent.id.clone()) {
            metrics::counter!("nexus_gateway_handshakes_refused_total").increment(1);
            return Err(GatewayError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_handshakes",
                "this agent key started too many handshakes; retry later",
            )
            .retry_after(wait));
        }
        // Only the fields the broker knows; `metadata` (reference) is dropped.
        let mut body = Map::new();
        body.insert("workspace_id".into(), json!(user));
        for k in [
            "provider_id",
            "provider_name",
            "scopes",
            "return_url",
            "connection_id",
        ] {
            if let Some(v) = req.get(k).filter(|v| !v.is_null()) {
                body.insert(k.into(), v.clone());
            }
        }
        let reply = self
            .broker
            .post(
                self.broker.url(routes::CONSENT_SPEC, ""),
                &Value::Object(body),
            )
            .await?
            .ok()?;
        let spec = reply.json()?;
        if let Some(cid) = spec["connection_id"].as_str() {
            self.remember_workspace(cid, user);
        }
        Ok(spec)
    }

    /// `POST /v1/connect-sessions {workspace_id, providers?, return_url?,
    /// expires_in?}`: a connect-portal link for one of the key's workspaces.
    pub async fn connect_session(
        &self,
        agent: &Agent,
        req: Map<String, Value>,
    ) -> Result<Value, GatewayError> {
        let Some(ws) = req
            .get("workspace_id")
            .or_else(|| req.get("user_id"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
        else {
            return Err(GatewayError::new(
                StatusCode::BAD_REQUEST,
                "missing_fields",
                "workspace_id is required",
            ));
        };
        if !agent.may(&ws) {
            return Err(GatewayError::new(
                StatusCode::FORBIDDEN,
                "workspace_forbidden",
                "this agent key may not act for that workspace",
            ));
        }
        let mut body = Map::new();
        body.insert("workspace_id".into(), json!(ws));
        for k in ["providers", "return_url", "expires_in"] {
            if let Some(v) = req.get(k).filter(|v| !v.is_null()) {
                body.insert(k.into(), v.clone());
            }
        }
        let reply = self
            .broker
            .post(
                self.broker.url(routes::CONNECT_SESSIONS, ""),
                &Value::Object(body),
            )
            .await?
            .ok()?;
        reply.json()
    }

    /// `GET /v1/check-connection/{id}`: where the connection stands, in the
    /// v1 contract's terms and precisely. A connection that is unknown or
    /// outside the key's workspaces is `failed` / `not_found`, the same
    /// answer for both.
    pub async fn check_connection(
        &self,
        agent: &Agent,
        id: &str,
    ) -> Result<ConnectionCheck, GatewayError> {
        // The status is read fresh anyway: that one read also says the workspace.
        let found = self
            .connection(id)
            .await
            .and_then(|(c, ws)| allowed(agent, &ws).map(|()| c));
        match found {
            Ok(c) => Ok(ConnectionCheck::of(&c)),
            Err(e) if e.status == StatusCode::NOT_FOUND => Ok(ConnectionCheck::not_found()),
            Err(e) => Err(e),
        }
    }

    /// The token response (refreshing first with `refresh`), body as the broker sent it.
    pub async fn token(
        &self,
        agent: &Agent,
        id: &str,
        refresh: bool,
    ) -> Result<Reply, GatewayError> {
        self.authorize(agent, id).await?;
        if refresh {
            // Whatever the refresh does, the kept answer is old news.
            self.tokens.forget(id);
            return self
                .broker
                .post(self.broker.url(routes::CONNECTION_REFRESH, id), &json!({}))
                .await?
                .ok();
        }
        if let Some(body) = self.tokens.get(id) {
            nexus_core::static_counter!("nexus_gateway_token_cache_total", "result" => "hit")
                .increment(1);
            return Ok(Reply {
                status: StatusCode::OK,
                headers: axum::http::HeaderMap::new(),
                body,
            });
        }
        let epoch = self.tokens.epoch();
        let reply = self
            .broker
            .get(self.broker.url(routes::CONNECTION_TOKEN, id))
            .await?
            .ok()?;
        if self.tokens.is_live() {
            nexus_core::static_counter!("nexus_gateway_token_cache_total", "result" => "miss")
                .increment(1);
            self.tokens.put(id, &reply, epoch);
        }
        Ok(reply)
    }

    /// `GET /v1/providers` → `{auth_type: {name: {api_base_url, user_info_endpoint, scopes, ...}}}`.
    pub async fn providers(&self) -> Result<Reply, GatewayError> {
        self.broker
            .get(self.broker.url(routes::PROVIDERS_METADATA, ""))
            .await?
            .ok()
    }

    /// `POST /v1/connections/{id}/scope-failures`.
    pub async fn scope_failure(
        &self,
        agent: &Agent,
        id: &str,
        report: &Value,
    ) -> Result<Reply, GatewayError> {
        self.authorize(agent, id).await?;
        // A report can change the answer (a forced refresh, failing scopes).
        self.tokens.forget(id);
        self.broker
            .post(
                self.broker.url(routes::CONNECTION_SCOPE_FAILURES, id),
                report,
            )
            .await?
            .ok()
    }

    /// `GET /v1/workspaces/{id}/connections/status`.
    pub async fn workspace_status(&self, agent: &Agent, ws: &str) -> Result<Reply, GatewayError> {
        if !agent.may(ws) {
            return Err(GatewayError::new(
                StatusCode::FORBIDDEN,
                "workspace_forbidden",
                "this agent key may not read that workspace",
            ));
        }
        self.broker
            .get(self.broker.url(routes::WORKSPACE_STATUS, ws))
            .await?
            .ok()
    }
}
