//! The handshake engine: how a person connects an account (SPEC §3, §6).
//!
//! `consent_spec` records a handshake (PKCE verifier sealed in the vault,
//! nonce, expiry) and returns the provider's authorize URL with a signed
//! `state`. `callback` verifies that state, consumes the handshake exactly
//! once (a replayed or racing callback never reaches the token endpoint),
//! checks `iss` (RFC 9207), exchanges the code, verifies the id_token, reads
//! UserInfo, and stores the tokens sealed, all-or-nothing.

mod callback;
pub mod capture;
pub mod operator;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use url::Url;

use crate::events::audit::Actor;
use crate::events::audit::AuditEvent;
use crate::oauth::discovery::{Discovery, DiscoveryError, Endpoints};
use crate::oauth::pkce;
use crate::oauth::state_token::{self};
use crate::registry::{Provider, Registry, RegistryError};
use crate::store::{
    json_list, now_ms, ConnectionRow, Consumed, HandshakeKind, HandshakeRow, Store, StoreError,
};
use crate::vault::{Aad, KeyRing};
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
    /// Too many handshakes started, or left pending, for the workspace.
    #[error("{message}")]
    TooMany {
        /// `too_many_handshakes` or `too_many_pending_connections`.
        code: &'static str,
        /// What to do.
        message: &'static str,
        /// When to try again.
        wait: Duration,
    },
}

/// The window of `HANDSHAKE_STARTS_PER_MINUTE`.
const START_WINDOW: Duration = Duration::from_secs(60);

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
    /// Authorization code: a `Secret`, so no `Debug` or `Display` prints it.
    pub code: Option<Secret<String>>,
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
    /// Where Nexus's client ID metadata document is served (its client id
    /// at authorization servers that take such documents).
    client_metadata_url: String,
    allowed_return_domains: Vec<String>,
    refresh: crate::tokens::RefreshSettings,
    /// Handshakes started, per workspace.
    starts: nexus_core::limit::Windows<String>,
    /// New connections a workspace may have waiting for consent (abandoned
    /// ones are removed when their handshake expires).
    max_pending: i64,
}

/// True when `host` is allowed: an exact entry, or below an entry written `.example.com`.
pub fn return_host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host.to_ascii_lowercase();
    allowed.iter().any(|d| match d.strip_prefix('.') {
        Some(parent) => host == parent || host.ends_with(&format!(".{parent}")),
        None => host == *d,
    })
}

/// A stored scope list (JSON), its malformed entries dropped: they would
/// be refused as scope tokens.
fn json_scopes(stored: &str) -> Vec<String> {
    crate::store::parse_json_list(stored)
        .into_iter()
        .filter(|s| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control()))
        .collect()
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
    /// Where the client ID metadata document is published (its URL is the
    /// client id); `None`: `BASE_URL/auth/client-metadata.json`.
    pub client_metadata_url: Option<String>,
    /// When to schedule the first refresh of the tokens a handshake stores.
    pub refresh: crate::tokens::RefreshSettings,
    /// Handshakes one workspace may start per minute.
    pub starts_per_minute: u32,
    /// New connections one workspace may have waiting for consent.
    pub max_pending: i64,
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
        let client_metadata_url = settings
            .client_metadata_url
            .unwrap_or_else(|| format!("{base}{}", nexus_core::wire::routes::CLIENT_METADATA));
        Self {
            store,
            registry,
            keys: settings.keys,
            state_key: settings.state_key,
            discovery,
            http,
            redirect_uri,
            capture_url,
            client_metadata_url,
            allowed_return_domains: settings.allowed_return_domains,
            refresh: settings.refresh,
            starts: nexus_core::limit::Windows::new(
                settings.starts_per_minute,
                START_WINDOW,
                100_000,
            ),
            max_pending: settings.max_pending,
        }
    }

    /// The shared redirect URI (`BASE_URL` + `REDIRECT_PATH`).
    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// The redirect URI of `provider`'s handshakes, to register at its IdP:
    /// its own (`.../{provider id}`), or the shared one for providers
    /// registered with it.
    pub fn redirect_uri_for(&self, provider: &Provider) -> String {
        match provider.profile.redirect {
            Some(crate::registry::profile::RedirectMode::PerProvider) => {
                format!("{}/{}", self.redirect_uri, provider.row.id)
            }
            _ => self.redirect_uri.clone(),
        }
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
        self.check_return_url(&return_url)?;
        let provider = match (req.provider_id.as_deref(), req.provider_name.as_deref()) {
            (Some(id), _) if !id.is_empty() => self.registry.get(id).await?,
            (_, Some(name)) if !name.is_empty() => self.registry.find(name).await?,
            _ => {
                return Err(HandshakeError::MissingFields(
                    "provider_id or provider_name is required".into(),
                ))
            }
        };
        let asked = req.scopes.filter(|s| !s.is_empty());
        let mut scopes = asked
            .clone()
            .unwrap_or_else(|| provider.profile.scopes.clone());
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
                // A reconnect asks again for what the connection had and
                // for what the provider refused (a step-up: a 403 naming
                // scopes it lacks), unless the caller says which scopes.
                if asked.is_none() {
                    for s in json_scopes(&conn.requested_scopes)
                        .into_iter()
                        .chain(json_scopes(&conn.failing_scopes))
                    {
                        if !scopes.contains(&s) {
                            scopes.push(s);
                        }
                    }
                }
                Some(conn)
            }
            None => None,
        };
        // One agent (or a leaked key) must not flood a workspace with
        // handshakes and pending connections.
        if let Err(wait) = self.starts.hit(workspace_id.clone()) {
            metrics::counter!("nexus_handshakes_refused_total", "reason" => "rate").increment(1);
            return Err(HandshakeError::TooMany {
                code: "too_many_handshakes",
                message: "too many handshakes started for this workspace; retry later",
                wait,
            });
        }
        if reconnect.is_none() && self.store.count_pending(&workspace_id).await? >= self.max_pending
        {
            metrics::counter!("nexus_handshakes_refused_total", "reason" => "pending").increment(1);
            return Err(HandshakeError::TooMany {
                code: "too_many_pending_connections",
                message: "this workspace has too many connections waiting for consent; finish or let them expire",
                wait: HANDSHAKE_TTL,
            });
        }
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
                self.redirect_uri_for(&provider)
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

    /// The client that calls providers (egress-checked, no redirects).
    pub fn provider_http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The redirect URI providers send people back to (the shared one).
    pub fn shared_redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// Nexus's client ID metadata document (OAuth Client ID Metadata
    /// Documents, as MCP authorization servers take them): a public client
    /// (PKCE) whose id is the document's own URL and whose one redirect URI
    /// is the shared callback.
    pub fn client_metadata(&self) -> serde_json::Value {
        serde_json::json!({
            "client_id": self.client_metadata_url,
            "client_name": "Nexus",
            "redirect_uris": [self.redirect_uri],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        })
    }

    /// The URL of that document: the client id.
    pub fn client_metadata_url(&self) -> &str {
        &self.client_metadata_url
    }

    /// The origin of `provider`'s authorization endpoint: a page whose form
    /// starts that provider's consent must allow it in `form-action` (the
    /// browser checks the redirect a form's answer makes). `None` for
    /// static providers (their form is Nexus's own) or when discovery fails
    /// now (starting would fail too, with its own error).
    pub async fn authorization_origin(&self, provider: &Provider) -> Option<String> {
        if provider.profile.auth_type.is_static() {
            return None;
        }
        let endpoints = self.discovery.endpoints(&provider.profile).await.ok()?;
        let origin = Url::parse(&endpoints.authorization).ok()?.origin();
        origin.is_tuple().then(|| origin.ascii_serialization())
    }

    /// Checks a URL people are sent back to: absolute http(s), on a host
    /// in `ALLOWED_RETURN_DOMAINS` or Nexus's own (`BASE_URL`: the connect
    /// portal).
    pub fn check_return_url(&self, return_url: &str) -> Result<Url, HandshakeError> {
        let parsed = Url::parse(return_url)
            .map_err(|_| HandshakeError::Invalid("return_url is not an absolute URL".into()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(HandshakeError::Invalid(
                "return_url must be http or https".into(),
            ));
        }
        let own = Url::parse(&self.capture_url)
            .ok()
            .is_some_and(|c| c.origin() == parsed.origin());
        let host = parsed.host_str().unwrap_or_default();
        if !own && !return_host_allowed(host, &self.allowed_return_domains) {
            return Err(HandshakeError::ReturnUrlNotAllowed);
        }
        Ok(parsed)
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
            q.append_pair("redirect_uri", &self.redirect_uri_for(provider));
            if !scopes.is_empty() {
                q.append_pair("scope", &scopes.join(provider.profile.scope_separator()));
            }
            q.append_pair("state", state);
            q.append_pair("code_challenge", &pkce::challenge_s256(verifier));
            q.append_pair("code_challenge_method", "S256");
            if let Some(n) = nonce {
                q.append_pair("nonce", n);
            }
            for (k, v) in provider.profile.authorize_params() {
                q.append_pair(k, v);
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
            .by(actor)
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
            refresh_started_at: None,
            created_at: 0,
            updated_at: 0,
        };
        self.store.create_pending(&conn, hs, &audit).await?;
        Ok(())
    }

    /// Deletes expired handshakes and abandoned pending connections.
    pub async fn cleanup(&self) -> Result<(u64, u64), StoreError> {
        self.store
            .cleanup_handshakes(now_ms() - HANDSHAKE_TTL.as_millis() as i64)
            .await
    }
}

/// Uses a handshake up for `kind`, or says why it cannot be: the one
/// reading of [`Consumed`] for the callback and the capture form.
async fn consume(
    store: &Store,
    id: &str,
    kind: HandshakeKind<'_>,
) -> Result<Box<HandshakeRow>, HandshakeError> {
    let oauth = matches!(kind, HandshakeKind::OAuth { .. });
    let rejected = |reason: &'static str| {
        if oauth {
            metrics::counter!("nexus_callback_rejected_total", "reason" => reason).increment(1);
        }
    };
    match store.consume_handshake(id, kind).await? {
        Consumed::Now(hs) => Ok(hs),
        Consumed::AlreadyUsed => {
            rejected("replayed");
            Err(HandshakeError::State("state was already used"))
        }
        Consumed::Expired => Err(HandshakeError::State(
            "state has expired; start the connection again",
        )),
        Consumed::Unknown => Err(HandshakeError::State(
            "state does not name a known handshake",
        )),
        Consumed::WrongKind => {
            rejected("wrong_kind");
            Err(HandshakeError::State(match kind {
                HandshakeKind::OAuth { .. } => {
                    "state belongs to a credential form, not an OAuth handshake"
                }
                HandshakeKind::Capture => {
                    "state belongs to an OAuth handshake, not a credential form"
                }
            }))
        }
        Consumed::WrongRedirect => {
            rejected("wrong_redirect");
            Err(HandshakeError::State(
                "the authorization response arrived at another redirect URI than its handshake's",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_params_never_print_the_code() {
        let p: CallbackParams =
            serde_json::from_value(json!({"code": "canary-code-123", "state": "s"})).unwrap();
        assert_eq!(p.code.as_ref().unwrap().expose(), "canary-code-123");
        assert!(!format!("{p:?}").contains("canary-code-123"));
        assert!(!format!("{p}").contains("canary-code-123"));
    }

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
