//! The token API (SPEC §2, §4): what an agent gets for a connection, a
//! strategy plus usage secrets, never a refresh token, client secret or any
//! other master secret.
//!
//! A token inside the refresh margin is refreshed before it is served. Within
//! this process one refresh runs per connection at a time (the others wait and
//! read its result); the write is guarded by the row's version, so a replica
//! that lost the race reads the winner's tokens instead of overwriting them.
//! `invalid_grant` (and providers' equivalents) moves the connection to
//! `attention_required`; transient faults never do, and a still-valid token
//! keeps being served while the provider is down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::audit::{AuditEvent, AuditSink};
use crate::discovery::Discovery;
use crate::handshake::{json_list, parse_list, parse_token_response, token_request};
use crate::outbound;
use crate::profile::AuthType;
use crate::registry::{Provider, Registry, RegistryError};
use crate::store::{now_ms, rfc3339, ConnectionRow, Refreshed, Store, StoreError};
use crate::strategy::StrategyKind;
use crate::vault::KeyRing;
use crate::Secret;

/// Why no token is served.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No such connection.
    #[error("connection not found")]
    NotFound,
    /// Consent not finished.
    #[error("the connection is waiting for consent")]
    Pending,
    /// A person must re-consent.
    #[error("{0}")]
    AttentionRequired(String),
    /// Disconnected.
    #[error("the connection was revoked")]
    Revoked,
    /// The handshake failed.
    #[error("the connection's handshake failed")]
    Failed,
    /// The provider could not refresh and the current token has expired.
    #[error("{0}")]
    ProviderUnavailable(String),
    /// The connection has no credentials to serve.
    #[error("{0}")]
    Unusable(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RegistryError> for TokenError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound => {
                TokenError::Unusable("the connection's provider was deleted".into())
            }
            RegistryError::Store(s) => TokenError::Store(s),
            other => TokenError::Unusable(other.to_string()),
        }
    }
}

/// What a refresh attempt concluded.
enum Outcome {
    /// New tokens stored (or another refresher's tokens found).
    Refreshed(Box<ConnectionRow>),
    /// The grant is gone: a person must re-consent.
    Revoked(String, String),
    /// The provider refused our client (integration fault, not the user's).
    ClientRejected(String),
    /// Try again later.
    Transient(String),
}

/// Error codes by which providers say "this refresh token is dead".
const GRANT_GONE: &[&str] = &[
    "invalid_grant",
    "invalid_refresh_token",
    "bad_refresh_token",
    "token_revoked",
    "refresh_token_expired",
];

/// Token service.
pub struct Tokens {
    store: Store,
    registry: Registry,
    keys: Arc<KeyRing>,
    discovery: Arc<Discovery>,
    http: reqwest::Client,
    audit: AuditSink,
    margin: Duration,
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn aad<'a>(row_id: &'a str, column: &'a str) -> crate::vault::Aad<'a> {
    crate::vault::Aad {
        table: "connections",
        row_id,
        column,
    }
}

impl Tokens {
    /// Builds the service.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        registry: Registry,
        keys: Arc<KeyRing>,
        discovery: Arc<Discovery>,
        http: reqwest::Client,
        audit: AuditSink,
        margin: Duration,
    ) -> Self {
        Self {
            store,
            registry,
            keys,
            discovery,
            http,
            audit,
            margin,
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// The token response for a connection, refreshing first when the token
    /// is inside the margin (or always, with `force`).
    pub async fn token(&self, id: &str, force: bool) -> Result<Value, TokenError> {
        let result = self.token_inner(id, force).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(TokenError::AttentionRequired(_)) => "attention_required",
            Err(TokenError::ProviderUnavailable(_)) => "provider_unavailable",
            Err(TokenError::NotFound) => "not_found",
            Err(_) => "refused",
        };
        metrics::counter!("nexus_token_fetches_total", "outcome" => outcome).increment(1);
        result
    }

    async fn token_inner(&self, id: &str, force: bool) -> Result<Value, TokenError> {
        let asked_at = now_ms();
        let mut c = self
            .store
            .get_connection(id)
            .await?
            .ok_or(TokenError::NotFound)?;
        usable(&c)?;
        let provider = self.registry.get(&c.provider_id).await?;
        if provider.profile.auth_type == AuthType::Oauth2 {
            let due = c
                .expires_at
                .is_some_and(|e| e - now_ms() < self.margin.as_millis() as i64);
            if force || due {
                if c.refresh_token.is_none() {
                    if force || c.expires_at.is_some_and(|e| e <= now_ms()) {
                        return Err(TokenError::AttentionRequired(
                            "the access token expired and the provider issued no refresh token; re-consent is needed".into(),
                        ));
                    }
                } else {
                    c = self.refresh(&provider, c, force, asked_at).await?;
                }
            }
        }
        let resp = self.response(&provider, &c)?;
        let ev = AuditEvent::new("token.issued")
            .actor("agent")
            .provider(c.provider_id.clone())
            .connection(c.id.clone())
            .workspace(c.workspace_id.clone());
        // Batched off the request path; waits only if the queue is full.
        if let Err(e) = self.audit.record(ev).await {
            tracing::error!(error = %e, "token audit event not recorded");
        }
        Ok(resp)
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(id.to_string()).or_default().clone()
    }

    fn release(&self, id: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map and this caller hold it: nobody is waiting, drop the entry.
        if Arc::strong_count(&lock) <= 2 {
            map.remove(id);
        }
    }

    async fn refresh(
        &self,
        provider: &Provider,
        seen: ConnectionRow,
        force: bool,
        asked_at: i64,
    ) -> Result<ConnectionRow, TokenError> {
        let id = seen.id.clone();
        let lock = self.lock_for(&id);
        let result = {
            let _guard = lock.lock().await;
            self.refresh_locked(provider, seen, force, asked_at).await
        };
        self.release(&id, lock);
        result
    }

    async fn refresh_locked(
        &self,
        provider: &Provider,
        seen: ConnectionRow,
        force: bool,
        asked_at: i64,
    ) -> Result<ConnectionRow, TokenError> {
        // Someone else may have refreshed while we waited: re-read, and skip
        // when a refresh finished after this caller asked (even a forced one:
        // concurrent forced refreshes coalesce into one).
        let c = self
            .store
            .get_connection(&seen.id)
            .await?
            .ok_or(TokenError::NotFound)?;
        usable(&c)?;
        if c.version != seen.version && c.last_success_at.is_some_and(|t| t >= asked_at) {
            return Ok(c);
        }
        let fresh = c
            .expires_at
            .is_none_or(|e| e - now_ms() >= self.margin.as_millis() as i64);
        if !force && fresh {
            return Ok(c);
        }
        let started = Instant::now();
        let outcome = self.call_provider(provider, &c).await;
        metrics::histogram!("nexus_refresh_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match outcome {
            Outcome::Refreshed(row) => {
                let row = *row;
                metrics::counter!("nexus_refreshes_total", "outcome" => "success").increment(1);
                Ok(row)
            }
            Outcome::Revoked(code, description) => {
                metrics::counter!("nexus_refreshes_total", "outcome" => "attention_required")
                    .increment(1);
                let ev = AuditEvent::new("connection.attention_required")
                    .actor("system")
                    .provider(c.provider_id.clone())
                    .connection(c.id.clone())
                    .workspace(c.workspace_id.clone())
                    .detail(json!({"cause": "refresh_rejected", "error": code, "previous_status": c.status}));
                self.store
                    .record_refresh_failure(&c.id, &code, &description, Some(&ev))
                    .await?;
                Err(TokenError::AttentionRequired(format!(
                    "the provider rejected the refresh ({code}); re-consent is needed"
                )))
            }
            Outcome::ClientRejected(description) => {
                metrics::counter!("nexus_refreshes_total", "outcome" => "invalid_client")
                    .increment(1);
                metrics::counter!("nexus_provider_unhealthy_total", "provider" => provider.profile.name.clone()).increment(1);
                let ev = AuditEvent::new("provider.unhealthy")
                    .actor("system")
                    .provider(c.provider_id.clone())
                    .connection(c.id.clone())
                    .detail(json!({"cause": "invalid_client", "description": description}));
                if let Err(e) = self.audit.record(ev).await {
                    tracing::error!(error = %e, "provider.unhealthy audit event not recorded");
                }
                self.transient(c, "invalid_client", &description).await
            }
            Outcome::Transient(description) => {
                metrics::counter!("nexus_refreshes_total", "outcome" => "transient").increment(1);
                self.transient(c, "provider_unavailable", &description)
                    .await
            }
        }
    }

    /// A failed refresh that is not the user's doing: record it, and keep
    /// serving the current token while it is still valid.
    async fn transient(
        &self,
        c: ConnectionRow,
        code: &str,
        description: &str,
    ) -> Result<ConnectionRow, TokenError> {
        tracing::warn!(connection_id = %c.id, error = code, description, "refresh failed");
        self.store
            .record_refresh_failure(&c.id, code, description, None)
            .await?;
        if c.expires_at.is_some_and(|e| e > now_ms()) {
            return Ok(c);
        }
        Err(TokenError::ProviderUnavailable(format!(
            "the provider could not refresh the token ({description}); retry later"
        )))
    }

    async fn call_provider(&self, provider: &Provider, c: &ConnectionRow) -> Outcome {
        let endpoints = match self.discovery.endpoints(&provider.profile).await {
            Ok(e) => e,
            Err(e) => return Outcome::Transient(e.to_string()),
        };
        let refresh_token = match c
            .refresh_token
            .as_deref()
            .map(|env| self.keys.decrypt_str(aad(&c.id, "refresh_token"), env))
        {
            Some(Ok(rt)) => rt,
            Some(Err(e)) => {
                return Outcome::Transient(format!("stored refresh token unreadable: {e}"))
            }
            None => {
                return Outcome::Revoked(
                    "no_refresh_token".into(),
                    "no refresh token stored".into(),
                )
            }
        };
        let secret = match self.registry.client_secret(provider) {
            Ok(s) => s,
            Err(e) => return Outcome::Transient(e.to_string()),
        };
        let form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose().as_str()),
        ];
        let req = token_request(
            &self.http,
            &endpoints.token,
            provider,
            secret.as_ref(),
            form,
        );
        let fetched = match outbound::send(req).await {
            Ok(f) => f,
            Err(e) => return Outcome::Transient(e.to_string()),
        };
        let body: Option<Map<String, Value>> = serde_json::from_slice(&fetched.body).ok();
        let error = body
            .as_ref()
            .and_then(|b| b.get("error"))
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(code) = &error {
            if GRANT_GONE.contains(&code.as_str()) {
                return Outcome::Revoked(code.clone(), format!("token endpoint answered {code}"));
            }
            if code == "invalid_client" || code == "unauthorized_client" {
                return Outcome::ClientRejected(format!("token endpoint answered {code}"));
            }
        }
        let tokens = match parse_token_response(fetched.status, &fetched.body) {
            Ok(t) => t,
            Err(f) => return Outcome::Transient(f.description),
        };
        let granted = match &tokens.scope {
            Some(s) => json_list(&s.split_whitespace().map(str::to_string).collect::<Vec<_>>()),
            None => c.granted_scopes.clone(),
        };
        let refreshed = Refreshed {
            access_token: self
                .keys
                .encrypt_str(aad(&c.id, "access_token"), &tokens.access_token),
            // A response without a refresh token keeps the stored one.
            refresh_token: tokens
                .refresh_token
                .as_ref()
                .map(|rt| self.keys.encrypt_str(aad(&c.id, "refresh_token"), rt)),
            token_type: tokens.token_type.clone(),
            expires_at: tokens.expires_in.map(|s| now_ms() + s * 1000),
            granted_scopes: granted,
        };
        match self.store.store_refresh(&c.id, c.version, &refreshed).await {
            Ok(true) => {}
            // Another replica stored first: serve what it stored.
            Ok(false) => metrics::counter!("nexus_refresh_races_lost_total").increment(1),
            Err(e) => {
                return Outcome::Transient(format!("refreshed tokens could not be stored: {e}"))
            }
        }
        match self.store.get_connection(&c.id).await {
            Ok(Some(row)) => Outcome::Refreshed(Box::new(row)),
            Ok(None) => Outcome::Transient("connection disappeared".into()),
            Err(e) => Outcome::Transient(e.to_string()),
        }
    }

    fn response(&self, provider: &Provider, c: &ConnectionRow) -> Result<Value, TokenError> {
        let open = |column: &str, env: &str| -> Result<Secret<String>, TokenError> {
            self.keys
                .decrypt_str(aad(&c.id, column), env)
                .map_err(|e| TokenError::Store(StoreError::Vault(e)))
        };
        let strategy = &provider.strategy;
        let mut out = Map::new();
        let credentials = if strategy.kind == StrategyKind::Oauth2 {
            let env = c
                .access_token
                .as_deref()
                .ok_or_else(|| TokenError::Unusable("the connection has no access token".into()))?;
            let at = open("access_token", env)?;
            out.insert("access_token".into(), json!(at.expose()));
            out.insert(
                "token_type".into(),
                json!(c.token_type.clone().unwrap_or_else(|| "Bearer".into())),
            );
            if let Some(idt) = c.id_token.as_deref() {
                out.insert("id_token".into(), json!(open("id_token", idt)?.expose()));
            }
            json!({"access_token": at.expose()})
        } else {
            let env = c.credentials.as_deref().ok_or_else(|| {
                TokenError::Unusable("the connection has no stored credentials".into())
            })?;
            let all: Map<String, Value> = serde_json::from_str(open("credentials", env)?.expose())
                .map_err(|_| TokenError::Unusable("stored credentials are unreadable".into()))?;
            // Only the fields the strategy applies: never other captured secrets.
            let cfg = |k: &str| {
                strategy
                    .config
                    .get(k)
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            let wanted: Vec<String> = match strategy.kind {
                StrategyKind::Header | StrategyKind::QueryParam | StrategyKind::HmacPayload => {
                    cfg("credential_field").into_iter().collect()
                }
                StrategyKind::BasicAuth => [cfg("username_field"), cfg("password_field")]
                    .into_iter()
                    .flatten()
                    .collect(),
                StrategyKind::AwsSigv4 => vec![
                    "access_key".into(),
                    "secret_key".into(),
                    "session_token".into(),
                ],
                StrategyKind::Oauth2 => Vec::new(),
            };
            Value::Object(
                wanted
                    .into_iter()
                    .filter_map(|k| all.get(&k).cloned().map(|v| (k, v)))
                    .collect(),
            )
        };
        out.insert("expires_at".into(), json!(c.expires_at.map(rfc3339)));
        out.insert(
            "expires_in".into(),
            json!(c.expires_at.map(|e| ((e - now_ms()) / 1000).max(0))),
        );
        out.insert(
            "scope".into(),
            json!(parse_list(&c.granted_scopes).join(" ")),
        );
        out.insert("strategy".into(), json!(strategy));
        out.insert("credentials".into(), credentials);
        out.insert("provider".into(), json!(provider.profile.name));
        out.insert("connection_id".into(), json!(c.id));
        out.insert("status".into(), json!(c.status));
        out.insert("degraded".into(), json!(c.status == "degraded"));
        out.insert(
            "failing_scopes".into(),
            json!(parse_list(&c.failing_scopes)),
        );
        Ok(Value::Object(out))
    }
}

fn usable(c: &ConnectionRow) -> Result<(), TokenError> {
    match c.status.as_str() {
        "active" | "degraded" => Ok(()),
        "pending" => Err(TokenError::Pending),
        "attention_required" => Err(TokenError::AttentionRequired(
            c.error_description
                .clone()
                .unwrap_or_else(|| "a person must re-consent this connection".into()),
        )),
        "revoked" => Err(TokenError::Revoked),
        _ => Err(TokenError::Failed),
    }
}
