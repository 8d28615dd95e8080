//! The handshake engine: how a person connects an account (SPEC §3, §6).
//!
//! `consent_spec` records a handshake (PKCE verifier sealed in the vault,
//! nonce, expiry) and returns the provider's authorize URL with a signed
//! `state`. `callback` verifies that state, consumes the handshake exactly
//! once (a replayed or racing callback never reaches the token endpoint),
//! checks `iss` (RFC 9207), exchanges the code, verifies the id_token, reads
//! UserInfo, and stores the tokens sealed, all-or-nothing.

pub mod capture;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use url::Url;

use crate::events::audit::Actor;
use crate::events::audit::AuditEvent;
use crate::oauth::client::{fail, parse_token_response, token_request, Failure, TokenSet};
use crate::oauth::discovery::{Discovery, DiscoveryError, Endpoints};
use crate::oauth::id_token::{self, IdTokenError};
use crate::oauth::pkce;
use crate::oauth::state_token::{self, StateError};
use crate::registry::{Provider, Registry, RegistryError};
use crate::store::{
    now_ms, Activation, ConnectionRow, Consumed, HandshakeRow, Store, StoreError, Transition,
};
use crate::vault::{Aad, KeyRing};
use nexus_core::outbound::{self, OutboundError};
use nexus_core::Secret;

/// How long a handshake (and a pending connection) lives.
pub const HANDSHAKE_TTL: Duration = Duration::from_secs(600);

/// Handshake failures. Those before a handshake is identified are answered
/// directly; later ones are recorded on the connection and sent to the return URL.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// A required field is missing.
    #[error("{0}")]
    MissingFields(String),
    /// A field has a wrong value.
    #[error("{0}")]
    Invalid(String),
    /// The provider is unknown.
    #[error("provider not found")]
    ProviderNotFound,
    /// The connection to reconnect is unknown (or belongs to another workspace or provider).
    #[error("connection not found")]
    ConnectionNotFound,
    /// The return URL's host is not in `ALLOWED_RETURN_DOMAINS`.
    #[error("return_url host is not in ALLOWED_RETURN_DOMAINS")]
    ReturnUrlNotAllowed,
    /// The provider's configuration or discovery failed.
    #[error("provider configuration: {0}")]
    Provider(#[from] DiscoveryError),
    /// State missing, forged, expired, replayed or unknown.
    #[error("{0}")]
    State(&'static str),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Registry failed.
    #[error(transparent)]
    Registry(RegistryError),
}

impl From<RegistryError> for HandshakeError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound => HandshakeError::ProviderNotFound,
            other => HandshakeError::Registry(other),
        }
    }
}

/// Body of `POST /auth/consent-spec` (the gateway sends `user_id`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsentRequest {
    /// Workspace.
    #[serde(alias = "user_id")]
    pub workspace_id: Option<String>,
    /// Provider by id.
    pub provider_id: Option<String>,
    /// Provider by name or alias.
    pub provider_name: Option<String>,
    /// Scopes (default: the provider's).
    pub scopes: Option<Vec<String>>,
    /// Where the browser returns afterwards.
    pub return_url: Option<String>,
    /// Reconnect this connection instead of creating one.
    pub connection_id: Option<String>,
    /// Accepted for wire compatibility with the reference gateway; unused.
    #[serde(default)]
    pub metadata: Option<Value>,
}

/// Answer of `POST /auth/consent-spec`.
#[derive(Debug, serde::Serialize)]
pub struct ConsentSpec {
    /// Where to send the person's browser.
    #[serde(rename = "authUrl")]
    pub auth_url: String,
    /// Signed state.
    pub state: String,
    /// Scopes requested.
    pub scopes: Vec<String>,
    /// Provider id.
    pub provider_id: String,
    /// Connection id (new, or the one reconnected).
    pub connection_id: String,
}

/// Query of `GET /auth/callback`. Everything optional: a callback can be anything.
#[derive(Debug, Default, Deserialize)]
pub struct CallbackParams {
    /// Authorization code.
    pub code: Option<String>,
    /// Signed state.
    pub state: Option<String>,
    /// RFC 9207 issuer.
    pub iss: Option<String>,
    /// Error from the provider.
    pub error: Option<String>,
    /// Error description from the provider.
    pub error_description: Option<String>,
}

impl std::fmt::Display for CallbackParams {
    // Never print the code.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "callback(code: {}, error: {:?})",
            if self.code.is_some() {
                "[REDACTED]"
            } else {
                "none"
            },
            self.error
        )
    }
}

/// The handshake engine.
pub struct Handshakes {
    pub(crate) store: Store,
    pub(crate) registry: Registry,
    pub(crate) keys: Arc<KeyRing>,
    pub(crate) state_key: Arc<Secret<Vec<u8>>>,
    discovery: Arc<Discovery>,
    http: reqwest::Client,
    redirect_uri: String,
    pub(crate) capture_url: String,
    allowed_return_domains: Vec<String>,
    refresh: crate::tokens::RefreshSettings,
}

pub(crate) use crate::store::{json_list, parse_json_list as parse_list};

/// True when `host` is allowed: an exact entry, or below an entry written `.example.com`.
pub fn return_host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host.to_ascii_lowercase();
    allowed.iter().any(|d| match d.strip_prefix('.') {
        Some(parent) => host == parent || host.ends_with(&format!(".{parent}")),
        None => host == *d,
    })
}

/// What the handshake engine needs of the broker's configuration.
#[derive(Clone)]
pub struct HandshakeSettings {
    /// The vault's keys (PKCE verifiers, tokens and credentials are sealed).
    pub keys: Arc<KeyRing>,
    /// Signs `state`.
    pub state_key: Arc<Secret<Vec<u8>>>,
    /// Public base URL (`BASE_URL`).
    pub base_url: Url,
    /// Callback path under `base_url` (`REDIRECT_PATH`).
    pub redirect_path: String,
    /// Hosts a handshake may return the browser to.
    pub allowed_return_domains: Vec<String>,
    /// When to schedule the first refresh of the tokens a handshake stores.
    pub refresh: crate::tokens::RefreshSettings,
}

impl Handshakes {
    /// Builds the engine.
    pub fn new(
        settings: HandshakeSettings,
        store: Store,
        registry: Registry,
        discovery: Arc<Discovery>,
        http: reqwest::Client,
    ) -> Self {
        let base = settings.base_url.as_str().trim_end_matches('/');
        let redirect_uri = format!("{base}{}", settings.redirect_path);
        let capture_url = format!("{base}/auth/capture");
        Self {
            store,
            registry,
            keys: settings.keys,
            state_key: settings.state_key,
            discovery,
            http,
            redirect_uri,
            capture_url,
            allowed_return_domains: settings.allowed_return_domains,
            refresh: settings.refresh,
        }
    }

    /// The redirect_uri registered with providers.
    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// Starts a handshake.
    pub async fn consent_spec(
        &self,
        req: ConsentRequest,
        actor: &Actor,
    ) -> Result<ConsentSpec, HandshakeError> {
        let workspace_id = req
            .workspace_id
            .filter(|w| !w.trim().is_empty())
            .ok_or_else(|| {
                HandshakeError::MissingFields("workspace_id (or user_id) is required".into())
            })?;
        if workspace_id.len() > 200 {
            return Err(HandshakeError::Invalid(
                "workspace_id is longer than 200 characters".into(),
            ));
        }
        let return_url = req
            .return_url
            .filter(|r| !r.trim().is_empty())
            .ok_or_else(|| HandshakeError::MissingFields("return_url is required".into()))?;
        let parsed = Url::parse(&return_url)
            .map_err(|_| HandshakeError::Invalid("return_url is not an absolute URL".into()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(HandshakeError::Invalid(
                "return_url must be http or https".into(),
            ));
        }
        let host = parsed.host_str().unwrap_or_default();
        if !return_host_allowed(host, &self.allowed_return_domains) {
            return Err(HandshakeError::ReturnUrlNotAllowed);
        }
        let provider = match (req.provider_id.as_deref(), req.provider_name.as_deref()) {
            (Some(id), _) if !id.is_empty() => self.registry.get(id).await?,
            (_, Some(name)) if !name.is_empty() => self.registry.find(name).await?,
            _ => {
                return Err(HandshakeError::MissingFields(
                    "provider_id or provider_name is required".into(),
                ))
            }
        };
        let scopes = match req.scopes {
            Some(s) if !s.is_empty() => s,
            _ => provider.profile.scopes.clone(),
        };
        if let Some(bad) = scopes
            .iter()
            .find(|s| s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(HandshakeError::Invalid(format!(
                "scope '{bad}' is not a valid scope token"
            )));
        }
        let reconnect = match req.connection_id.filter(|c| !c.is_empty()) {
            Some(cid) => {
                let conn = self
                    .store
                    .get_connection(&cid)
                    .await?
                    .ok_or(HandshakeError::ConnectionNotFound)?;
                // Another workspace's connection answers exactly like an unknown one.
                if conn.workspace_id != workspace_id || conn.provider_id != provider.row.id {
                    return Err(HandshakeError::ConnectionNotFound);
                }
                Some(conn)
            }
            None => None,
        };
        let handshake_id = uuid::Uuid::new_v4().simple().to_string();
        let connection_id = reconnect
            .as_ref()
            .map(|c| c.id.clone())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let expires_at = now_ms() + HANDSHAKE_TTL.as_millis() as i64;
        let state = state_token::sign(self.state_key.expose(), &handshake_id, expires_at / 1000);
        let is_static = provider.profile.auth_type.is_static();
        let verifier = pkce::verifier();
        let oidc = !is_static && scopes.iter().any(|s| s == "openid");
        let nonce = oidc.then(|| pkce::random_token(24));

        let auth_url = if is_static {
            // A person types the credentials into the broker's own hosted form.
            let mut u = Url::parse(&self.capture_url).map_err(|_| {
                HandshakeError::Invalid("BASE_URL does not form a capture URL".into())
            })?;
            u.query_pairs_mut().append_pair("state", &state);
            u
        } else {
            let endpoints = self.discovery.endpoints(&provider.profile).await?;
            self.authorize_url(
                &endpoints,
                &provider,
                &scopes,
                &state,
                &verifier,
                nonce.as_deref(),
            )?
        };
        let hs = HandshakeRow {
            id: handshake_id.clone(),
            connection_id: connection_id.clone(),
            provider_id: provider.row.id.clone(),
            workspace_id: workspace_id.clone(),
            scopes: json_list(&scopes),
            return_url,
            redirect_uri: if is_static {
                self.capture_url.clone()
            } else {
                self.redirect_uri.clone()
            },
            code_verifier: (!is_static).then(|| {
                self.keys.encrypt_str(
                    Aad::new("handshakes", &handshake_id, "code_verifier"),
                    &verifier,
                )
            }),
            nonce,
            is_reconnect: reconnect.is_some(),
            expires_at,
        };
        self.record_start(&hs, reconnect.is_some(), &scopes, actor)
            .await?;
        Ok(ConsentSpec {
            auth_url: auth_url.to_string(),
            state,
            scopes,
            provider_id: provider.row.id,
            connection_id,
        })
    }

    fn authorize_url(
        &self,
        endpoints: &Endpoints,
        provider: &Provider,
        scopes: &[String],
        state: &str,
        verifier: &Secret<String>,
        nonce: Option<&str>,
    ) -> Result<Url, HandshakeError> {
        let mut auth_url = Url::parse(&endpoints.authorization).map_err(|_| {
            HandshakeError::Invalid("provider authorization endpoint is not a URL".into())
        })?;
        {
            let mut q = auth_url.query_pairs_mut();
            q.append_pair("response_type", "code");
            q.append_pair(
                "client_id",
                provider.profile.client_id.as_deref().unwrap_or_default(),
            );
            q.append_pair("redirect_uri", &self.redirect_uri);
            if !scopes.is_empty() {
                q.append_pair("scope", &scopes.join(" "));
            }
            q.append_pair("state", state);
            q.append_pair("code_challenge", &pkce::challenge_s256(verifier));
            q.append_pair("code_challenge_method", "S256");
            if let Some(n) = nonce {
                q.append_pair("nonce", n);
            }
            for (k, v) in &provider.profile.params {
                if let Some(v) = v.as_str() {
                    q.append_pair(k, v);
                }
            }
        }
        Ok(auth_url)
    }

    /// Stores the handshake (and, for a new connection, the pending connection) with its audit event.
    async fn record_start(
        &self,
        hs: &HandshakeRow,
        reconnect: bool,
        scopes: &[String],
        actor: &Actor,
    ) -> Result<(), HandshakeError> {
        let audit = AuditEvent::new("handshake.started")
            .actor(actor.name.clone())
            .caller(actor.ip.clone(), actor.user_agent.clone())
            .provider(hs.provider_id.clone())
            .connection(hs.connection_id.clone())
            .workspace(hs.workspace_id.clone())
            .detail(json!({"scopes": scopes, "reconnect": reconnect}));
        if reconnect {
            self.store.add_handshake(hs, &audit).await?;
            return Ok(());
        }
        let conn = ConnectionRow {
            id: hs.connection_id.clone(),
            workspace_id: hs.workspace_id.clone(),
            provider_id: hs.provider_id.clone(),
            status: crate::store::ConnectionStatus::Pending,
            requested_scopes: json_list(scopes),
            granted_scopes: "[]".into(),
            access_token: None,
            refresh_token: None,
            id_token: None,
            credentials: None,
            token_type: None,
            expires_at: None,
            identity: None,
            version: 0,
            last_success_at: None,
            last_failure_at: None,
            error_code: None,
            error_description: None,
            consecutive_failures: 0,
            failing_scopes: "[]".into(),
            next_refresh_at: None,
            created_at: 0,
            updated_at: 0,
        };
        self.store.create_pending(&conn, hs, &audit).await?;
        Ok(())
    }

    /// Handles the provider's redirect. `Ok` is where to send the browser (the
    /// return URL with `status=success` or `status=error`); `Err` means the
    /// state could not be trusted, so there is no return URL to use.
    pub async fn callback(
        &self,
        p: CallbackParams,
        actor: &Actor,
    ) -> Result<String, HandshakeError> {
        let state = p
            .state
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or(HandshakeError::State("state is missing"))?;
        let handshake_id = state_token::verify(self.state_key.expose(), state, now_ms() / 1000)
            .map_err(|e| {
                metrics::counter!("nexus_callback_rejected_total", "reason" => state_reason(e))
                    .increment(1);
                HandshakeError::State(match e {
                    StateError::Expired => "state has expired; start the connection again",
                    StateError::BadSignature => "state signature is invalid",
                    StateError::Malformed => "state is malformed",
                })
            })?;
        let hs = match self.store.consume_handshake(&handshake_id).await? {
            Consumed::Now(hs) => hs,
            Consumed::AlreadyUsed => {
                metrics::counter!("nexus_callback_rejected_total", "reason" => "replayed")
                    .increment(1);
                return Err(HandshakeError::State("state was already used"));
            }
            Consumed::Expired => {
                return Err(HandshakeError::State(
                    "state has expired; start the connection again",
                ))
            }
            Consumed::Unknown => {
                return Err(HandshakeError::State(
                    "state does not name a known handshake",
                ))
            }
        };
        let provider = self.registry.get(&hs.provider_id).await;
        let outcome = match &provider {
            Ok(provider) => self.complete(&hs, provider, &p, actor).await,
            Err(_) => Err(fail(
                "provider_not_found",
                "the provider was deleted during the handshake",
            )),
        };
        let provider_name = provider
            .as_ref()
            .map(|p| p.profile.name.clone())
            .unwrap_or_default();
        let mut url = Url::parse(&hs.return_url)
            .map_err(|_| HandshakeError::Invalid("stored return_url is invalid".into()))?;
        match outcome {
            Ok(()) => {
                metrics::counter!("nexus_handshakes_total", "outcome" => "success").increment(1);
                url.query_pairs_mut()
                    .append_pair("status", "success")
                    .append_pair("connection_id", &hs.connection_id)
                    .append_pair("provider", &provider_name);
            }
            Err(f) => {
                metrics::counter!("nexus_handshakes_total", "outcome" => f.code).increment(1);
                tracing::warn!(connection_id = %hs.connection_id, error = f.code, description = %f.description, "handshake failed");
                let audit = AuditEvent::new("connection.handshake_failed")
                    .actor(actor.name.clone())
                    .caller(actor.ip.clone(), actor.user_agent.clone())
                    .provider(hs.provider_id.clone())
                    .connection(hs.connection_id.clone())
                    .workspace(hs.workspace_id.clone())
                    .detail(json!({"error": f.code, "description": f.description, "reconnect": hs.is_reconnect}));
                self.store
                    .fail_handshake(
                        &hs.connection_id,
                        hs.is_reconnect,
                        f.code,
                        &f.description,
                        &audit,
                    )
                    .await?;
                url.query_pairs_mut()
                    .append_pair("status", "error")
                    .append_pair("error", f.code)
                    .append_pair("connection_id", &hs.connection_id);
            }
        }
        Ok(url.to_string())
    }

    async fn complete(
        &self,
        hs: &HandshakeRow,
        provider: &Provider,
        p: &CallbackParams,
        actor: &Actor,
    ) -> Result<(), Failure> {
        if let Some(err) = &p.error {
            // Providers' error codes are short ASCII tokens; anything else is not echoed.
            let code = match err.as_str() {
                "access_denied" => "access_denied",
                "invalid_scope" => "invalid_scope",
                "consent_required" | "interaction_required" | "login_required" => {
                    "consent_required"
                }
                "temporarily_unavailable" | "server_error" => "provider_unavailable",
                _ => "provider_error",
            };
            let desc = p
                .error_description
                .as_deref()
                .unwrap_or(err)
                .chars()
                .take(300)
                .collect::<String>();
            return Err(fail(code, desc));
        }
        let code = p
            .code
            .as_deref()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| fail("invalid_callback", "callback has neither code nor error"))?;
        let endpoints = self
            .discovery
            .endpoints(&provider.profile)
            .await
            .map_err(|e| fail("provider_discovery_failed", e.to_string()))?;
        // RFC 9207: a provider that advertises iss must send it, and it must match.
        match (&p.iss, &endpoints.issuer) {
            (Some(iss), Some(expected)) if iss != expected => {
                return Err(fail(
                    "iss_mismatch",
                    "the authorization response came from another issuer",
                ))
            }
            (Some(_), None) => {}
            (None, Some(_)) if endpoints.iss_parameter_supported => {
                return Err(fail(
                    "iss_missing",
                    "the provider advertises iss in authorization responses but none was sent",
                ))
            }
            _ => {}
        }
        let verifier = match &hs.code_verifier {
            Some(env) => Some(
                self.keys
                    .decrypt_str(Aad::new("handshakes", &hs.id, "code_verifier"), env)
                    .map_err(|e| {
                        fail(
                            "internal_error",
                            format!("handshake verifier unreadable: {e}"),
                        )
                    })?,
            ),
            None => None,
        };
        let client_secret = self
            .registry
            .client_secret(provider)
            .map_err(|e| fail("internal_error", e.to_string()))?;
        let tokens = self
            .exchange(
                &endpoints,
                provider,
                client_secret.as_ref(),
                code,
                &hs.redirect_uri,
                verifier.as_ref(),
            )
            .await?;

        let requested = parse_list(&hs.scopes);
        let mut identity = Map::new();
        let client_id = provider.profile.client_id.clone().unwrap_or_default();
        if let Some(idt) = &tokens.id_token {
            let issuer = endpoints.issuer.as_deref().ok_or_else(|| {
                fail(
                    "invalid_id_token",
                    "provider has no issuer; cannot verify the id_token",
                )
            })?;
            let nonce = hs.nonce.as_deref().unwrap_or_default();
            let claims = id_token::verify(
                &self.discovery,
                endpoints.jwks_uri.as_deref(),
                idt.expose(),
                id_token::Expected {
                    issuer,
                    client_id: &client_id,
                    nonce,
                },
            )
            .await
            .map_err(|e: IdTokenError| fail("invalid_id_token", e.to_string()))?;
            for k in ["sub", "email", "name", "picture"] {
                if let Some(v) = claims.get(k) {
                    identity.insert(k.into(), v.clone());
                }
            }
        } else if requested.iter().any(|s| s == "openid") {
            return Err(fail(
                "invalid_id_token",
                "scope openid was requested but the token response has no id_token",
            ));
        }
        if let Some(userinfo) = &endpoints.userinfo {
            match self.userinfo(userinfo, &tokens.access_token).await {
                // OIDC Core §5.3.2: a UserInfo sub that differs from the id_token's must not be used.
                Ok(info)
                    if identity
                        .get("sub")
                        .is_some_and(|s| info.get("sub") != Some(s)) =>
                {
                    return Err(fail(
                        "userinfo_mismatch",
                        "UserInfo sub differs from the id_token sub",
                    ))
                }
                Ok(info) => {
                    for k in ["sub", "email", "name", "picture"] {
                        if let Some(v) = info.get(k) {
                            identity.insert(k.into(), v.clone());
                        }
                    }
                }
                // UserInfo is enrichment; the connection works without it.
                Err(e) => {
                    tracing::warn!(connection_id = %hs.connection_id, error = %e, "UserInfo request failed; identity from id_token only")
                }
            }
        }

        let granted: Vec<String> = match &tokens.scope {
            Some(s) => s.split_whitespace().map(str::to_string).collect(),
            None => requested.clone(),
        };
        let previous = self
            .store
            .get_connection(&hs.connection_id)
            .await
            .map_err(|e| fail("internal_error", e.to_string()))?;
        let cid = &hs.connection_id;
        let seal = |col: &'static str, s: &Secret<String>| {
            self.keys.encrypt_str(Aad::new("connections", cid, col), s)
        };
        // A re-consent that returns no refresh token keeps the one we have
        // (`None` here: the store keeps the column as it is at write time, so
        // a refresh that rotated it meanwhile is not undone).
        let refresh_token = tokens
            .refresh_token
            .as_ref()
            .map(|rt| seal("refresh_token", rt));
        let has_refresh_token =
            refresh_token.is_some() || previous.as_ref().is_some_and(|c| c.refresh_token.is_some());
        let expires_at = tokens.expires_in.map(|s| now_ms() + s * 1000);
        let activation = Activation {
            access_token: Some(seal("access_token", &tokens.access_token)),
            next_refresh_at: crate::tokens::schedule::next_refresh_at(
                &self.refresh,
                expires_at,
                has_refresh_token,
            ),
            refresh_token,
            id_token: tokens.id_token.as_ref().map(|t| seal("id_token", t)),
            credentials: None,
            token_type: Some(tokens.token_type.clone()),
            expires_at,
            granted_scopes: json_list(&granted),
            clears_failing: false,
            identity: (!identity.is_empty()).then(|| Value::Object(identity).to_string()),
        };
        // Decided under the row's lock (scope reports may land meanwhile).
        let transition = |before: &ConnectionRow, failing: &[String]| Transition {
            audit: AuditEvent::new("connection.active")
                .actor(actor.name.clone())
                .caller(actor.ip.clone(), actor.user_agent.clone())
                .provider(hs.provider_id.clone())
                .connection(cid.clone())
                .workspace(hs.workspace_id.clone())
                .detail(json!({
                    "reconnect": hs.is_reconnect,
                    "previous_status": before.status,
                    "granted_scopes": granted,
                    "failing_scopes": failing,
                    "refresh_token": tokens.refresh_token.is_some(),
                })),
            event: Some(crate::events::webhooks::activation_event(
                before,
                Some(&provider.profile.name),
                failing,
            )),
        };
        self.store
            .activate_connection(cid, &activation, &transition)
            .await
            .map_err(|e| fail("internal_error", e.to_string()))
    }

    async fn exchange(
        &self,
        endpoints: &Endpoints,
        provider: &Provider,
        client_secret: Option<&Secret<String>>,
        code: &str,
        redirect_uri: &str,
        verifier: Option<&Secret<String>>,
    ) -> Result<TokenSet, Failure> {
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
        ];
        if let Some(v) = verifier {
            form.push(("code_verifier", v.expose()));
        }
        let fetched = outbound::send(token_request(
            &self.http,
            &endpoints.token,
            provider,
            client_secret,
            form,
        ))
        .await
        .map_err(|e| match e {
            OutboundError::TooLarge => fail(
                "token_exchange_failed",
                "token endpoint response is too large",
            ),
            other => fail("token_exchange_failed", other.to_string()),
        })?;
        parse_token_response(fetched.status, &fetched.body)
    }

    async fn userinfo(
        &self,
        url: &str,
        access_token: &Secret<String>,
    ) -> Result<Map<String, Value>, String> {
        let f = outbound::send(
            self.http
                .get(url)
                .bearer_auth(access_token.expose())
                .header("accept", "application/json"),
        )
        .await
        .map_err(|e| e.to_string())?;
        if !f.status.is_success() {
            return Err(format!("UserInfo answered HTTP {}", f.status.as_u16()));
        }
        match serde_json::from_slice::<Value>(&f.body) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err("UserInfo answered a non-JSON body (signed UserInfo is not supported)".into()),
        }
    }

    /// Deletes expired handshakes and abandoned pending connections.
    pub async fn cleanup(&self) -> Result<(u64, u64), StoreError> {
        self.store
            .cleanup_handshakes(now_ms() - HANDSHAKE_TTL.as_millis() as i64)
            .await
    }
}

fn state_reason(e: StateError) -> &'static str {
    match e {
        StateError::Expired => "expired",
        StateError::BadSignature => "bad_signature",
        StateError::Malformed => "malformed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_domains() {
        let allowed = vec!["app.example.com".to_string(), ".example.org".to_string()];
        assert!(return_host_allowed("app.example.com", &allowed));
        assert!(return_host_allowed("APP.example.com", &allowed));
        assert!(!return_host_allowed("evil.app.example.com", &allowed));
        assert!(!return_host_allowed("example.com", &allowed));
        assert!(return_host_allowed("example.org", &allowed));
        assert!(return_host_allowed("a.b.example.org", &allowed));
        assert!(!return_host_allowed("badexample.org", &allowed));
    }
}
