//! Broker configuration: one typed struct, validated once at start-up.
//!
//! [`Settings`] is the raw layer (strings as they came from flags, the
//! environment or the state folder); [`BrokerConfig::from_settings`] turns it
//! into checked values and names the variable in every error.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ipnet::IpNet;
use url::Url;

use crate::vault::KeyRing;
use nexus_core::settings::Setting;
use nexus_core::Secret;

const MIN_API_KEY_LEN: usize = 24;
const MIN_STATE_KEY_BYTES: usize = 32;

pub use nexus_core::settings::redact_url;
pub use nexus_core::ConfigError;

nexus_core::declare_settings! {
    /// Raw broker settings, each named after its environment variable;
    /// `None` means unset. Each is declared once here: the `nexus` binary
    /// makes its flags and `--help` from these declarations.
    pub struct Settings {
        /// `DATABASE_URL`: `sqlite:path` or `postgres://...`.
        database_url: DATABASE_URL = Setting::text("DATABASE_URL", "Database: sqlite:PATH or postgres://..."),
        /// `ENCRYPTION_KEY`: one base64 32-byte key.
        encryption_key: ENCRYPTION_KEY = Setting::secret("ENCRYPTION_KEY", "The vault key: base64 of 32 random bytes (nexus keys generate)"),
        /// `ENCRYPTION_KEYS`: `id:base64,...`, first active; wins over `ENCRYPTION_KEY`.
        encryption_keys: ENCRYPTION_KEYS = Setting::secret("ENCRYPTION_KEYS", "Several vault keys, id:base64,... (the first is active); wins over ENCRYPTION_KEY"),
        /// `STATE_KEY`: base64, at least 32 bytes; signs OAuth `state`.
        state_key: STATE_KEY = Setting::secret("STATE_KEY", "Signs OAuth state: base64 of at least 32 random bytes"),
        /// `API_KEY`: the admin key callers send as `X-API-Key`.
        api_key: API_KEY = Setting::secret("API_KEY", "The admin key operators send as X-API-Key"),
        /// `GATEWAY_API_KEY`: the gateway's credential (only the routes a gateway calls).
        gateway_api_key: GATEWAY_API_KEY = Setting::secret("GATEWAY_API_KEY", "The gateway's key (X-API-Key): reaches only the routes a gateway calls; give it to the gateway as BROKER_API_KEY instead of API_KEY"),
        /// `BASE_URL`: the public URL the provider redirects back to.
        base_url: BASE_URL = Setting::text("BASE_URL", "Public base URL providers redirect back to (default: http://BROKER_ADDR)"),
        /// `REDIRECT_PATH`: path of the OAuth callback under `BASE_URL`.
        redirect_path: REDIRECT_PATH = Setting::text("REDIRECT_PATH", "Path of the OAuth callback under BASE_URL").or("/auth/callback"),
        /// `ALLOWED_RETURN_DOMAINS`: comma-separated hosts a handshake may return to.
        allowed_return_domains: ALLOWED_RETURN_DOMAINS = Setting::text("ALLOWED_RETURN_DOMAINS", "Comma-separated hosts a handshake may return the browser to (.example.com: and below)").or("localhost,127.0.0.1"),
        /// `CONNECT_EMBED_ORIGINS`: origins that may frame the connect portal.
        connect_embed_origins: CONNECT_EMBED_ORIGINS = Setting::text("CONNECT_EMBED_ORIGINS", "Comma-separated origins (https://app.example.com) that may show the connect portal in a frame or open it in a popup, and receive its completion message (none by default: no framing)"),
        /// `MCP_CLIENT_METADATA_URL`: where Nexus's client ID metadata document is published.
        mcp_client_metadata_url: MCP_CLIENT_METADATA_URL = Setting::text("MCP_CLIENT_METADATA_URL", "The https URL where Nexus's OAuth client ID metadata document is published, if not BASE_URL/auth/client-metadata.json; it is Nexus's client_id at MCP authorization servers that take such documents, so publish there exactly what BASE_URL/auth/client-metadata.json serves"),
        /// `CONSOLE_URL`: the console's base URL as operators' browsers reach the broker.
        console_url: CONSOLE_URL = Setting::text("CONSOLE_URL", "The broker's URL as operators' browsers reach it, for the console's single sign-on redirect (default: http://BROKER_ADDR, https with TLS)"),
        /// `CONSOLE_OIDC_ISSUER`: the OpenID provider operators sign in with.
        console_oidc_issuer: CONSOLE_OIDC_ISSUER = Setting::text("CONSOLE_OIDC_ISSUER", "OpenID provider (issuer URL) operators sign in to the console with; its redirect URI is CONSOLE_URL/console/sso/callback"),
        /// `CONSOLE_OIDC_CLIENT_ID`: the console's client id there.
        console_oidc_client_id: CONSOLE_OIDC_CLIENT_ID = Setting::text("CONSOLE_OIDC_CLIENT_ID", "The console's client id at CONSOLE_OIDC_ISSUER"),
        /// `CONSOLE_OIDC_CLIENT_SECRET`: its secret (none: a public client).
        console_oidc_client_secret: CONSOLE_OIDC_CLIENT_SECRET = Setting::secret("CONSOLE_OIDC_CLIENT_SECRET", "The console's client secret at CONSOLE_OIDC_ISSUER (sent with HTTP Basic; none: a public client with PKCE)"),
        /// `CONSOLE_OIDC_SCOPES`: scopes asked for at sign-in.
        console_oidc_scopes: CONSOLE_OIDC_SCOPES = Setting::text("CONSOLE_OIDC_SCOPES", "Scopes asked for at sign-in, space-separated (openid among them; add the one that releases groups if you allow groups)").or("openid email profile"),
        /// `CONSOLE_OPERATORS`: e-mail addresses allowed into the console.
        console_operators: CONSOLE_OPERATORS = Setting::text("CONSOLE_OPERATORS", "Comma-separated e-mail addresses (verified by the provider) allowed to sign in to the console"),
        /// `CONSOLE_OPERATOR_GROUPS`: groups whose members are allowed in.
        console_operator_groups: CONSOLE_OPERATOR_GROUPS = Setting::text("CONSOLE_OPERATOR_GROUPS", "Comma-separated groups (in the CONSOLE_OIDC_GROUPS_CLAIM claim) whose members may sign in to the console"),
        /// `CONSOLE_OIDC_GROUPS_CLAIM`: the claim holding groups.
        console_oidc_groups_claim: CONSOLE_OIDC_GROUPS_CLAIM = Setting::text("CONSOLE_OIDC_GROUPS_CLAIM", "The ID token or UserInfo claim that lists a person's groups").or("groups"),
        /// `ALLOWED_CIDRS`: comma-separated networks allowed to call the admin API.
        allowed_cidrs: ALLOWED_CIDRS = Setting::text("ALLOWED_CIDRS", "Comma-separated networks allowed to call the admin API (default: any)"),
        /// `EGRESS_ALLOWED_CIDRS`: private networks providers and webhooks may be reached at.
        egress_allowed_cidrs: EGRESS_ALLOWED_CIDRS = Setting::text("EGRESS_ALLOWED_CIDRS", "Comma-separated private networks that provider and webhook calls may reach (private addresses are refused otherwise)"),
        /// `EGRESS_DENIED_CIDRS`: networks provider and webhook calls may never reach.
        egress_denied_cidrs: EGRESS_DENIED_CIDRS = Setting::text("EGRESS_DENIED_CIDRS", "Comma-separated networks that provider and webhook calls may never reach (besides link-local and metadata addresses)"),
        /// `BROKER_ADDR`: socket address to listen on.
        broker_addr: BROKER_ADDR = Setting::text("BROKER_ADDR", "Broker listen address").or("127.0.0.1:8080"),
        /// `MAX_BODY_BYTES`: request body limit.
        max_body_bytes: MAX_BODY_BYTES = Setting::number("MAX_BODY_BYTES", "Request body limit", "1048576", 1024, u64::MAX, "bytes"),
        /// `HEADER_READ_TIMEOUT_SECS`: see [`nexus_core::serve`].
        header_read_timeout_secs: HEADER_READ_TIMEOUT_SECS = nexus_core::serve::HEADER_READ_TIMEOUT_SECS,
        /// `BODY_READ_TIMEOUT_SECS`: see [`nexus_core::serve`].
        body_read_timeout_secs: BODY_READ_TIMEOUT_SECS = nexus_core::serve::BODY_READ_TIMEOUT_SECS,
        /// `MAX_CONNECTIONS`: see [`nexus_core::serve`].
        max_connections: MAX_CONNECTIONS = nexus_core::serve::MAX_CONNECTIONS,
        /// `SHUTDOWN_GRACE_SECS`: see [`nexus_core::serve`].
        shutdown_grace_secs: SHUTDOWN_GRACE_SECS = nexus_core::serve::SHUTDOWN_GRACE_SECS,
        /// `TLS_CERT_FILE`: see [`nexus_core::tls`].
        tls_cert_file: TLS_CERT_FILE = nexus_core::tls::TLS_CERT_FILE,
        /// `TLS_KEY_FILE`: see [`nexus_core::tls`].
        tls_key_file: TLS_KEY_FILE = nexus_core::tls::TLS_KEY_FILE,
        /// `BROKER_CLIENT_CA_FILE`: require client certificates issued by this CA (mutual TLS).
        broker_client_ca_file: BROKER_CLIENT_CA_FILE = Setting::text("BROKER_CLIENT_CA_FILE", "PEM CA whose client certificates callers must present (mutual TLS; needs TLS_CERT_FILE); API keys are still required"),
        /// `BROKER_CLIENT_IDS`: client certificate identities allowed.
        broker_client_ids: BROKER_CLIENT_IDS = Setting::text("BROKER_CLIENT_IDS", "Comma-separated identities (URI SAN such as spiffe://example.org/nexus/gateway, or DNS SAN) a client certificate must carry one of (default: any the CA issued)"),
        /// `PROVIDER_TIMEOUT_SECS`: timeout of each call to a provider.
        provider_timeout_secs: PROVIDER_TIMEOUT_SECS = Setting::number("PROVIDER_TIMEOUT_SECS", "Timeout of each call to a provider", "10", 1, 300, "seconds"),
        /// `REDIS_URL`: optional Redis for caches shared by replicas.
        redis_url: REDIS_URL = Setting::text("REDIS_URL", "Redis for caches shared by broker replicas (redis://...)"),
        /// `REDIS_KEY_PREFIX`: prefix of every Redis key.
        redis_key_prefix: REDIS_KEY_PREFIX = Setting::text("REDIS_KEY_PREFIX", "Prefix of every Redis key").or("nexus:"),
        /// `REFRESH_MARGIN_SECS`: refresh tokens this long before they expire.
        refresh_margin_secs: REFRESH_MARGIN_SECS = Setting::number("REFRESH_MARGIN_SECS", "Refresh tokens this long before they expire (at most half their lifetime)", "300", 0, 86_400, "seconds"),
        /// `REFRESH_JITTER_SECS`: refresh up to this much earlier again, at random.
        refresh_jitter_secs: REFRESH_JITTER_SECS = Setting::number("REFRESH_JITTER_SECS", "Refresh up to this much earlier again, at random", "60", 0, 3_600, "seconds"),
        /// `REFRESH_LEASE_SECS`: how long a refresh lease lasts.
        refresh_lease_secs: REFRESH_LEASE_SECS = Setting::number("REFRESH_LEASE_SECS", "How long a refresh lease lasts (more than twice PROVIDER_TIMEOUT_SECS)", "30", 1, 600, "seconds"),
        /// `REFRESH_COMMIT_GRACE_SECS`: how long a replica taking over a cut-off refresh waits for its late commit.
        refresh_commit_grace_secs: REFRESH_COMMIT_GRACE_SECS = Setting::number("REFRESH_COMMIT_GRACE_SECS", "How long a replica that takes over a cut-off refresh waits for that refresh's late commit before calling the provider (more than the database's acquire timeout, 5 s)", "10", 0, 600, "seconds"),
        /// `TOKEN_CACHE_CAPACITY`: decrypted token responses kept in memory (0 disables).
        token_cache_capacity: TOKEN_CACHE_CAPACITY = Setting::number("TOKEN_CACHE_CAPACITY", "Token answers kept in memory; 0 disables the cache", "10000", 0, 10_000_000, ""),
        /// `REFRESH_WORKER`: `false` to run no background refresher on this replica.
        refresh_worker: REFRESH_WORKER = Setting::boolean("REFRESH_WORKER", "Run the background refresher on this replica", true),
        /// `HANDSHAKE_STARTS_PER_MINUTE`: handshakes one workspace may start per minute.
        handshake_starts_per_minute: HANDSHAKE_STARTS_PER_MINUTE = Setting::number("HANDSHAKE_STARTS_PER_MINUTE", "Handshakes one workspace may start per minute on this replica (more get 429)", "30", 1, 1_000_000, ""),
        /// `MAX_PENDING_PER_WORKSPACE`: new connections one workspace may have waiting for consent.
        max_pending_per_workspace: MAX_PENDING_PER_WORKSPACE = Setting::number("MAX_PENDING_PER_WORKSPACE", "New connections one workspace may have waiting for consent (more get 429)", "100", 1, 1_000_000, ""),
        /// `WEBHOOK_URL`: one webhook endpoint receiving every event.
        webhook_url: WEBHOOK_URL = Setting::text("WEBHOOK_URL", "One webhook endpoint for every event (its secret: WEBHOOK_SECRET)"),
        /// `WEBHOOK_SECRET`: its signing secret (`whsec_` + base64).
        webhook_secret: WEBHOOK_SECRET = Setting::secret("WEBHOOK_SECRET", "The webhook signing secret, whsec_ + base64 (nexus keys generate)"),
        /// `WEBHOOK_MAX_AGE_SECS`: how long a delivery is retried before it is given up.
        webhook_max_age_secs: WEBHOOK_MAX_AGE_SECS = Setting::number("WEBHOOK_MAX_AGE_SECS", "How long a webhook delivery is retried (backing off) before it is given up as failed; a failed one can be retried from the console or the API", "86400", 1, 604_800, "seconds"),
        /// `NEXUS_ISSUANCE_PAUSED`: `true` pauses token issuance at start-up.
        issuance_paused: NEXUS_ISSUANCE_PAUSED = Setting::boolean("NEXUS_ISSUANCE_PAUSED", "Start with token issuance paused; lift with DELETE /admin/pause", false).flag_as("issuance-paused"),
    }
}

/// Validated broker configuration. `Debug` hides the database password;
/// keys are `Secret`s or a `KeyRing`, which print no key material.
#[derive(Clone)]
pub struct BrokerConfig {
    /// Where the store lives.
    pub database_url: String,
    /// The vault's keys.
    pub keys: Arc<KeyRing>,
    /// Key for signing handshake state.
    pub state_key: Arc<Secret<Vec<u8>>>,
    /// Admin API key.
    pub api_key: Arc<Secret<String>>,
    /// Handshakes one workspace may start per minute.
    pub handshake_starts_per_minute: u32,
    /// New connections one workspace may have waiting for consent.
    pub max_pending_per_workspace: i64,
    /// The gateway's key: only the routes in `wire::routes::GATEWAY_USES`.
    pub gateway_api_key: Option<Arc<Secret<String>>>,
    /// Public base URL.
    pub base_url: Url,
    /// Callback path under `base_url`.
    pub redirect_path: String,
    /// Hosts a handshake may return the browser to.
    pub allowed_return_domains: Vec<String>,
    /// Origins that may frame the connect portal and get its messages.
    pub connect_embed_origins: Vec<String>,
    /// Where the client ID metadata document is published, when not under
    /// `base_url`.
    pub mcp_client_metadata_url: Option<String>,
    /// Operators' single sign-on to the console, when configured.
    pub console_sso: Option<crate::handshake::operator::OperatorSso>,
    /// The console's cookies carry `Secure`: `CONSOLE_URL` is https, or
    /// the broker serves TLS itself.
    pub console_secure_cookies: bool,
    /// Networks allowed to call the admin API; empty means all.
    pub allowed_cidrs: Vec<IpNet>,
    /// Where calls carrying secrets (providers, webhooks) may go.
    pub egress: Arc<nexus_core::egress::Egress>,
    /// Listen address.
    pub listen_addr: SocketAddr,
    /// Request body limit in bytes.
    pub max_body_bytes: usize,
    /// Connection limits and timeouts of the server.
    pub limits: nexus_core::serve::Limits,
    /// The certificate and key it serves TLS with (none: plaintext).
    pub tls: Option<nexus_core::tls::TlsFiles>,
    /// Client certificates required (mutual TLS), if any.
    pub client_auth: Option<nexus_core::mtls::ClientAuth>,
    /// Audit writer tuning.
    pub audit: crate::events::audit::AuditConfig,
    /// Timeout of each call to a provider (token, discovery, JWKS, UserInfo).
    pub provider_timeout: Duration,
    /// Redis for shared caches, when configured.
    pub redis_url: Option<String>,
    /// Refresh engine tuning (margin from `REFRESH_MARGIN_SECS`).
    pub refresh: crate::tokens::RefreshSettings,
    /// Prefix of every Redis key.
    pub redis_key_prefix: String,
    /// The endpoint configured by `WEBHOOK_URL`, with its secret.
    pub webhook: Option<(Url, Arc<crate::events::webhooks::WebhookSecret>)>,
    /// Webhook delivery tuning.
    pub webhooks: crate::events::webhooks::WebhookSettings,
    /// Scope report tuning.
    pub scope: crate::tokens::scope::ScopeSettings,
    /// `NEXUS_ISSUANCE_PAUSED`: set the operator pause at start-up.
    pub issuance_paused: bool,
    /// How often each replica re-reads the issuance pauses (besides notifications).
    pub pause_reload: Duration,
}

impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerConfig")
            .field("database_url", &redact_url(&self.database_url))
            .field("keys", &self.keys)
            .field("base_url", &self.base_url.as_str())
            .field("redirect_path", &self.redirect_path)
            .field("allowed_return_domains", &self.allowed_return_domains)
            .field("connect_embed_origins", &self.connect_embed_origins)
            .field("mcp_client_metadata_url", &self.mcp_client_metadata_url)
            .field("allowed_cidrs", &self.allowed_cidrs)
            .field("listen_addr", &self.listen_addr)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("provider_timeout", &self.provider_timeout)
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("refresh", &self.refresh)
            .field("webhook_url", &self.webhook.as_ref().map(|w| w.0.as_str()))
            .field("issuance_paused", &self.issuance_paused)
            .field("console_sso", &self.console_sso)
            .finish_non_exhaustive()
    }
}

/// Validates `DATABASE_URL` alone (for `nexus migrate`).
pub fn database_url(s: &Settings) -> Result<String, ConfigError> {
    let v = s.values();
    let url = v.required(
        &DATABASE_URL,
        "use sqlite:nexus.db or postgres://user@host/db",
    )?;
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://"))
    {
        return Err(ConfigError::new(
            DATABASE_URL.name,
            "must start with sqlite:, postgres:// or postgresql://",
        ));
    }
    Ok(url.to_string())
}

/// Validates the key ring alone (`ENCRYPTION_KEYS`, else `ENCRYPTION_KEY`), for `nexus keys rewrap`.
pub fn key_ring(s: &Settings) -> Result<KeyRing, ConfigError> {
    let v = s.values();
    let (var, result) = match (v.given(&ENCRYPTION_KEYS), v.given(&ENCRYPTION_KEY)) {
        (Some(ring), _) => (ENCRYPTION_KEYS.name, KeyRing::from_keys_var(ring)),
        (None, Some(one)) => (ENCRYPTION_KEY.name, KeyRing::from_single_key(one)),
        (None, None) => {
            return Err(ConfigError::new(
                ENCRYPTION_KEY.name,
                "is not set (nor ENCRYPTION_KEYS); generate one with `nexus keys generate`",
            ))
        }
    };
    result.map_err(|e| {
        // The vault's message already names the variable; do not say it twice.
        let msg = e.to_string();
        let reason = msg
            .strip_prefix(&format!("{var} "))
            .map(str::to_string)
            .unwrap_or(msg);
        ConfigError::new(var, reason)
    })
}

impl BrokerConfig {
    /// What the handshake engine needs of this configuration.
    pub fn handshake_settings(&self) -> crate::handshake::HandshakeSettings {
        crate::handshake::HandshakeSettings {
            keys: self.keys.clone(),
            state_key: self.state_key.clone(),
            base_url: self.base_url.clone(),
            redirect_path: self.redirect_path.clone(),
            allowed_return_domains: self.allowed_return_domains.clone(),
            client_metadata_url: self.mcp_client_metadata_url.clone(),
            refresh: self.refresh,
            starts_per_minute: self.handshake_starts_per_minute,
            max_pending: self.max_pending_per_workspace,
        }
    }

    /// Validates raw settings. Every error names its variable.
    pub fn from_settings(s: &Settings) -> Result<Self, ConfigError> {
        let database_url = database_url(s)?;
        let keys = key_ring(s)?;
        let v = s.values();

        let state_key_b64 = v.required(&STATE_KEY, "generate one with `nexus keys generate`")?;
        let state_key = STANDARD.decode(state_key_b64).map_err(|_| {
            ConfigError::new(
                STATE_KEY.name,
                "is not valid base64; generate one with `nexus keys generate`",
            )
        })?;
        if state_key.len() < MIN_STATE_KEY_BYTES {
            return Err(ConfigError::new(
                STATE_KEY.name,
                format!(
                    "must decode to at least {MIN_STATE_KEY_BYTES} bytes (got {}); generate one with `nexus keys generate`",
                    state_key.len()
                ),
            ));
        }

        let api_key = v.required(&API_KEY, "generate one with `nexus keys generate`")?;
        if api_key.len() < MIN_API_KEY_LEN {
            return Err(ConfigError::new(
                API_KEY.name,
                format!(
                    "must be at least {MIN_API_KEY_LEN} characters (got {})",
                    api_key.len()
                ),
            ));
        }

        let gateway_api_key = match v.text(&GATEWAY_API_KEY) {
            None => None,
            Some(k) if k.len() < MIN_API_KEY_LEN => {
                return Err(ConfigError::new(
                    GATEWAY_API_KEY.name,
                    format!(
                        "must be at least {MIN_API_KEY_LEN} characters (got {})",
                        k.len()
                    ),
                ))
            }
            Some(k) if k == api_key => {
                return Err(ConfigError::new(
                    GATEWAY_API_KEY.name,
                    "must differ from API_KEY (the gateway must not hold the admin key)",
                ))
            }
            Some(k) => Some(Arc::new(Secret::new(k.to_string()))),
        };

        let listen_addr: SocketAddr = v
            .required(&BROKER_ADDR, "use an IP:port such as 127.0.0.1:8080")?
            .parse()
            .map_err(|_| {
                ConfigError::new(
                    BROKER_ADDR.name,
                    "must be an IP:port such as 127.0.0.1:8080",
                )
            })?;

        let base_url_raw = v
            .given(&BASE_URL)
            .map(str::to_string)
            .unwrap_or_else(|| format!("http://{listen_addr}"));
        let base_url = Url::parse(&base_url_raw)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                ConfigError::new(
                    BASE_URL.name,
                    "must be an absolute http(s) URL such as https://nexus.example.com",
                )
            })?;

        let redirect_path = v
            .required(&REDIRECT_PATH, "use a path such as /auth/callback")?
            .to_string();
        // It becomes a route: only plain path characters, and none of the broker's own routes.
        const TAKEN: &[&str] = &[
            "/health",
            "/ready",
            "/metrics",
            "/audit",
            "/auth/consent-spec",
            "/auth/capture",
            "/auth/capture-schema",
            "/auth/capture-credential",
            nexus_core::wire::routes::CLIENT_METADATA,
        ];
        if !redirect_path.starts_with('/')
            || redirect_path.len() < 2
            || !redirect_path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b))
        {
            return Err(ConfigError::new(
                REDIRECT_PATH.name,
                "must be a path like /auth/callback (letters, digits, / - _ .)",
            ));
        }
        const TAKEN_PREFIXES: &[&str] = &[
            "/providers",
            "/connections",
            "/workspaces",
            "/webhooks",
            "/agent-keys",
            "/admin",
            "/openapi.json",
            "/v1/",
        ];
        if TAKEN.contains(&redirect_path.as_str())
            || TAKEN_PREFIXES.iter().any(|p| redirect_path.starts_with(p))
        {
            return Err(ConfigError::new(
                REDIRECT_PATH.name,
                format!("{redirect_path} is one of the broker's own routes"),
            ));
        }

        let allowed_return_domains = v
            .text(&ALLOWED_RETURN_DOMAINS)
            .unwrap_or_default()
            .split(',')
            .map(|d| d.trim().to_ascii_lowercase())
            .filter(|d| !d.is_empty())
            .collect();

        let mut connect_embed_origins = Vec::new();
        for o in v
            .text(&CONNECT_EMBED_ORIGINS)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
        {
            let bad = || {
                ConfigError::new(
                    CONNECT_EMBED_ORIGINS.name,
                    format!("{o} is not an origin (scheme://host[:port], http or https, no path)"),
                )
            };
            let u = Url::parse(o).map_err(|_| bad())?;
            let origin = u.origin().ascii_serialization();
            if !matches!(u.scheme(), "http" | "https") || origin != o.trim_end_matches('/') {
                return Err(bad());
            }
            connect_embed_origins.push(origin);
        }

        // An authorization server fetches the document by its URL, which is
        // also the client id: https, a path, nothing else (CIMD §3).
        let mcp_client_metadata_url = match v.given(&MCP_CLIENT_METADATA_URL) {
            None => None,
            Some(u) => {
                let ok = Url::parse(u).ok().filter(|p| {
                    p.scheme() == "https"
                        && p.host().is_some()
                        && p.path() != "/"
                        && p.query().is_none()
                        && p.fragment().is_none()
                        && p.username().is_empty()
                        && p.password().is_none()
                });
                if ok.is_none() {
                    return Err(ConfigError::new(
                        MCP_CLIENT_METADATA_URL.name,
                        "is not an https URL with a path and no query, fragment or credentials (https://nexus.example.com/client-metadata.json)",
                    ));
                }
                Some(u.to_string())
            }
        };

        let allowed_cidrs = match v.given(&ALLOWED_CIDRS) {
            None => Vec::new(),
            Some(c) => nexus_core::net::parse_cidrs(ALLOWED_CIDRS.name, c)?,
        };

        let egress = Arc::new(nexus_core::egress::Egress {
            allow: nexus_core::net::parse_cidrs(
                EGRESS_ALLOWED_CIDRS.name,
                v.given(&EGRESS_ALLOWED_CIDRS).unwrap_or_default(),
            )?,
            deny: nexus_core::net::parse_cidrs(
                EGRESS_DENIED_CIDRS.name,
                v.given(&EGRESS_DENIED_CIDRS).unwrap_or_default(),
            )?,
        });

        let max_body_bytes = v.count(&MAX_BODY_BYTES)?;
        let limits = nexus_core::serve::Limits::from_values(&v)?;
        let tls = nexus_core::tls::TlsFiles::from_values(&v)?;
        let client_auth = nexus_core::mtls::ClientAuth::from_values(
            &v,
            &BROKER_CLIENT_CA_FILE,
            &BROKER_CLIENT_IDS,
        )?;
        let provider_timeout = v.secs(&PROVIDER_TIMEOUT_SECS)?;

        let redis_url = match v.given(&REDIS_URL) {
            None => None,
            Some(u) if u.starts_with("redis://") => Some(u.to_string()),
            Some(u) if u.starts_with("rediss://") => {
                return Err(ConfigError::new(REDIS_URL.name, "TLS to Redis (rediss://) is not supported in this version; use redis:// on a private network"))
            }
            Some(_) => return Err(ConfigError::new(REDIS_URL.name, "must start with redis://")),
        };
        let refresh_lease = v.secs(&REFRESH_LEASE_SECS)?;
        let commit_grace = v.secs(&REFRESH_COMMIT_GRACE_SECS)?;
        // A refresh is a discovery call plus a token call, each bounded by the
        // provider timeout; a lease that can expire mid-refresh would let a
        // second replica refresh with the same refresh token.
        if refresh_lease <= provider_timeout * 2 {
            return Err(ConfigError::new(
                REFRESH_LEASE_SECS.name,
                format!(
                    "must be more than twice PROVIDER_TIMEOUT_SECS ({}s), so a lease outlasts a refresh",
                    provider_timeout.as_secs()
                ),
            ));
        }
        let refresh_worker = v.boolean(&REFRESH_WORKER)?;
        let redis_key_prefix = v.text(&REDIS_KEY_PREFIX).unwrap_or_default().to_string();
        let refresh_margin = v.secs(&REFRESH_MARGIN_SECS)?;
        let refresh_jitter = v.secs(&REFRESH_JITTER_SECS)?;
        let cache_capacity = v.count(&TOKEN_CACHE_CAPACITY)?;

        let console_sso = console_sso(&v, listen_addr, tls.is_some())?;
        let console_secure_cookies = match v.given(&CONSOLE_URL) {
            Some(u) => u.starts_with("https://"),
            None => tls.is_some(),
        };

        let webhook = match (v.given(&WEBHOOK_URL), v.given(&WEBHOOK_SECRET)) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    WEBHOOK_URL.name,
                    "is not set but WEBHOOK_SECRET is; set both, or neither",
                ))
            }
            (Some(_), None) => {
                return Err(ConfigError::new(
                    WEBHOOK_SECRET.name,
                    "is not set but WEBHOOK_URL is; generate one with `nexus keys generate`",
                ))
            }
            (Some(url), Some(secret)) => {
                let url = crate::events::webhooks::validate_url(url)
                    .map_err(|e| ConfigError::new(WEBHOOK_URL.name, e))?;
                let secret = crate::events::webhooks::WebhookSecret::parse(secret).ok_or_else(|| {
                    ConfigError::new(
                        WEBHOOK_SECRET.name,
                        "must be whsec_ followed by base64 of 24 to 64 random bytes; generate one with `nexus keys generate`",
                    )
                })?;
                Some((url, Arc::new(secret)))
            }
        };
        let issuance_paused = v.boolean(&NEXUS_ISSUANCE_PAUSED)?;

        Ok(Self {
            webhook,
            webhooks: crate::events::webhooks::WebhookSettings {
                max_age: v.secs(&WEBHOOK_MAX_AGE_SECS)?,
                ..Default::default()
            },
            scope: crate::tokens::scope::ScopeSettings::default(),
            issuance_paused,
            pause_reload: Duration::from_secs(1),
            console_sso,
            console_secure_cookies,
            database_url,
            keys: Arc::new(keys),
            state_key: Arc::new(Secret::new(state_key)),
            api_key: Arc::new(Secret::new(api_key.to_string())),
            handshake_starts_per_minute: u32::try_from(v.number(&HANDSHAKE_STARTS_PER_MINUTE)?)
                .unwrap_or(u32::MAX),
            max_pending_per_workspace: i64::try_from(v.number(&MAX_PENDING_PER_WORKSPACE)?)
                .unwrap_or(i64::MAX),
            gateway_api_key,
            base_url,
            redirect_path,
            allowed_return_domains,
            connect_embed_origins,
            mcp_client_metadata_url,
            allowed_cidrs,
            egress,
            listen_addr,
            max_body_bytes,
            limits,
            tls,
            client_auth,
            audit: crate::events::audit::AuditConfig::default(),
            provider_timeout,
            redis_url,
            refresh: crate::tokens::RefreshSettings {
                margin: refresh_margin,
                jitter: refresh_jitter,
                cache_capacity,
                lease: refresh_lease,
                commit_grace,
                worker: refresh_worker,
                ..Default::default()
            },
            redis_key_prefix,
        })
    }
}

/// The console's single sign-on (`CONSOLE_OIDC_*`), when an issuer is set.
fn console_sso(
    v: &nexus_core::settings::Values,
    listen_addr: SocketAddr,
    tls: bool,
) -> Result<Option<crate::handshake::operator::OperatorSso>, ConfigError> {
    let list = |s: &Setting| -> Vec<String> {
        v.given(s)
            .unwrap_or_default()
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect()
    };
    let Some(issuer) = v.given(&CONSOLE_OIDC_ISSUER) else {
        for s in [
            &CONSOLE_OIDC_CLIENT_ID,
            &CONSOLE_OIDC_CLIENT_SECRET,
            &CONSOLE_OPERATORS,
            &CONSOLE_OPERATOR_GROUPS,
        ] {
            if v.given(s).is_some() {
                return Err(ConfigError::new(
                    s.name,
                    "is set but CONSOLE_OIDC_ISSUER is not; set the issuer too, or neither",
                ));
            }
        }
        return Ok(None);
    };
    let parsed = Url::parse(issuer).map_err(|_| {
        ConfigError::new(
            CONSOLE_OIDC_ISSUER.name,
            "is not a URL (https://id.example.com)",
        )
    })?;
    if !matches!(parsed.scheme(), "https" | "http")
        || nexus_core::egress::plaintext_beyond_loopback(issuer)
    {
        return Err(ConfigError::new(
            CONSOLE_OIDC_ISSUER.name,
            "must be https (plain http only for a provider on this machine)",
        ));
    }
    let client_id = v.given(&CONSOLE_OIDC_CLIENT_ID).ok_or_else(|| {
        ConfigError::new(
            CONSOLE_OIDC_CLIENT_ID.name,
            "is not set but CONSOLE_OIDC_ISSUER is: register the console at the provider",
        )
    })?;
    let scopes: Vec<String> = v
        .text(&CONSOLE_OIDC_SCOPES)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    if !scopes.iter().any(|s| s == "openid") {
        return Err(ConfigError::new(
            CONSOLE_OIDC_SCOPES.name,
            "must include openid (sign-in needs an ID token)",
        ));
    }
    let operators: Vec<String> = list(&CONSOLE_OPERATORS)
        .into_iter()
        .map(|o| o.to_ascii_lowercase())
        .collect();
    if let Some(bad) = operators.iter().find(|o| !o.contains('@')) {
        return Err(ConfigError::new(
            CONSOLE_OPERATORS.name,
            format!("{bad} is not an e-mail address"),
        ));
    }
    let groups = list(&CONSOLE_OPERATOR_GROUPS);
    if operators.is_empty() && groups.is_empty() {
        return Err(ConfigError::new(
            CONSOLE_OPERATORS.name,
            "names nobody (nor does CONSOLE_OPERATOR_GROUPS): with CONSOLE_OIDC_ISSUER set, say who may sign in",
        ));
    }
    let console_url = match v.given(&CONSOLE_URL) {
        Some(u) => u.trim_end_matches('/').to_string(),
        None if listen_addr.ip().is_unspecified() => {
            return Err(ConfigError::new(
                CONSOLE_URL.name,
                format!(
                    "is not set and BROKER_ADDR ({listen_addr}) names no host a browser can reach: set the URL operators open the console at"
                ),
            ))
        }
        None => format!("{}://{listen_addr}", if tls { "https" } else { "http" }),
    };
    // The console's cookies are scoped to /console: it must be at the root.
    let redirect_uri = Url::parse(&format!("{console_url}/console/sso/callback"))
        .ok()
        .filter(|u| {
            matches!(u.scheme(), "http" | "https")
                && u.query().is_none()
                && u.path() == "/console/sso/callback"
        })
        .ok_or_else(|| {
            ConfigError::new(
                CONSOLE_URL.name,
                "is not an http(s) URL with no path or query (https://nexus-admin.example.com)",
            )
        })?;
    Ok(Some(crate::handshake::operator::OperatorSso {
        issuer: issuer.to_string(),
        client_id: client_id.to_string(),
        client_secret: v
            .given(&CONSOLE_OIDC_CLIENT_SECRET)
            .map(|s| Arc::new(Secret::new(s.to_string()))),
        scopes,
        operators,
        groups,
        groups_claim: v
            .text(&CONSOLE_OIDC_GROUPS_CLAIM)
            .unwrap_or("groups")
            .to_string(),
        redirect_uri,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::generate_key_b64;

    fn good() -> Settings {
        Settings {
            database_url: Some("sqlite::memory:".into()),
            encryption_key: Some(generate_key_b64().expose().clone()),
            state_key: Some(generate_key_b64().expose().clone()),
            api_key: Some("a".repeat(32)),
            ..Default::default()
        }
    }

    fn err(s: Settings) -> String {
        BrokerConfig::from_settings(&s).unwrap_err().to_string()
    }

    #[test]
    fn declarations_are_consistent() {
        nexus_core::settings::check_declarations(Settings::ALL).unwrap();
        let mut s = Settings::default();
        assert!(s.set("REFRESH_JITTER_SECS", Some("5".into())));
        assert_eq!(s.refresh_jitter_secs.as_deref(), Some("5"));
        assert!(!s.set("NO_SUCH_SETTING", None));
    }

    #[test]
    fn client_certificates_need_tls_and_a_ca() {
        let e = err(Settings {
            broker_client_ca_file: Some("/ca.pem".into()),
            ..good()
        });
        assert!(e.starts_with("BROKER_CLIENT_CA_FILE"), "{e}");
        assert!(e.contains("TLS_CERT_FILE"), "{e}");
        let e = err(Settings {
            broker_client_ids: Some("spiffe://x/gw".into()),
            ..good()
        });
        assert!(e.starts_with("BROKER_CLIENT_IDS"), "{e}");
    }

    #[test]
    fn the_client_metadata_document_url_is_https_with_a_path() {
        let with = |u: &str| Settings {
            mcp_client_metadata_url: Some(u.into()),
            ..good()
        };
        let c = BrokerConfig::from_settings(&with("https://nexus.example.com/cimd.json")).unwrap();
        assert_eq!(
            c.handshake_settings().client_metadata_url.as_deref(),
            Some("https://nexus.example.com/cimd.json")
        );
        for bad in [
            "http://nexus.example.com/cimd.json",
            "https://nexus.example.com",
            "https://nexus.example.com/c.json?x=1",
            "not a url",
        ] {
            let e = err(with(bad));
            assert!(e.starts_with("MCP_CLIENT_METADATA_URL"), "{bad}: {e}");
        }
        assert!(BrokerConfig::from_settings(&good())
            .unwrap()
            .handshake_settings()
            .client_metadata_url
            .is_none());
    }

    #[test]
    fn console_single_sign_on_is_checked_at_start() {
        let sso = || Settings {
            console_oidc_issuer: Some("https://id.example.com".into()),
            console_oidc_client_id: Some("console".into()),
            console_operators: Some("Alice@Example.com".into()),
            ..good()
        };
        let c = BrokerConfig::from_settings(&sso()).unwrap();
        let s = c.console_sso.unwrap();
        assert_eq!(s.operators, ["alice@example.com"]);
        assert_eq!(
            s.redirect_uri.as_str(),
            "http://127.0.0.1:8080/console/sso/callback"
        );
        for (settings, var, words) in [
            (
                Settings {
                    console_oidc_client_id: None,
                    ..sso()
                },
                "CONSOLE_OIDC_CLIENT_ID",
                "register the console",
            ),
            (
                Settings {
                    console_operators: None,
                    ..sso()
                },
                "CONSOLE_OPERATORS",
                "names nobody",
            ),
            (
                Settings {
                    console_oidc_issuer: Some("http://id.example.com".into()),
                    ..sso()
                },
                "CONSOLE_OIDC_ISSUER",
                "must be https",
            ),
            (
                Settings {
                    console_oidc_issuer: Some("http://10.0.0.1".into()),
                    ..sso()
                },
                "CONSOLE_OIDC_ISSUER",
                "must be https",
            ),
            (
                Settings {
                    console_oidc_scopes: Some("email".into()),
                    ..sso()
                },
                "CONSOLE_OIDC_SCOPES",
                "openid",
            ),
            (
                Settings {
                    console_oidc_issuer: None,
                    ..sso()
                },
                "CONSOLE_OIDC_CLIENT_ID",
                "CONSOLE_OIDC_ISSUER is not",
            ),
            (
                Settings {
                    console_url: Some("ftp://x".into()),
                    ..sso()
                },
                "CONSOLE_URL",
                "http(s)",
            ),
            (
                Settings {
                    console_url: Some("https://admin.example.com/nexus".into()),
                    ..sso()
                },
                "CONSOLE_URL",
                "no path",
            ),
            (
                Settings {
                    broker_addr: Some("0.0.0.0:8080".into()),
                    ..sso()
                },
                "CONSOLE_URL",
                "no host a browser can reach",
            ),
        ] {
            let e = err(settings);
            assert!(e.starts_with(var) && e.contains(words), "{e}");
        }
        // A provider on this machine may speak plain HTTP.
        let local = Settings {
            console_oidc_issuer: Some("http://127.0.0.1:9000".into()),
            ..sso()
        };
        assert!(BrokerConfig::from_settings(&local).is_ok());
    }

    #[test]
    fn good_settings_validate() {
        let c = BrokerConfig::from_settings(&good()).unwrap();
        assert_eq!(c.listen_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.redirect_path, "/auth/callback");
        assert_eq!(c.keys.active_id(), "default");
    }

    #[test]
    fn each_error_names_its_variable() {
        let e = err(Settings {
            encryption_key: None,
            ..good()
        });
        assert!(
            e.starts_with("ENCRYPTION_KEY:") && e.contains("nexus keys generate"),
            "{e}"
        );
        let e = err(Settings {
            encryption_key: Some(STANDARD.encode([1u8; 8])),
            ..good()
        });
        assert!(
            e.starts_with("ENCRYPTION_KEY:") && e.contains("32 bytes"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        let e = err(Settings {
            encryption_keys: Some("x".into()),
            ..good()
        });
        assert!(e.starts_with("ENCRYPTION_KEYS:"), "{e}");
        let e = err(Settings {
            state_key: Some("%%%".into()),
            ..good()
        });
        assert!(e.starts_with("STATE_KEY:") && e.contains("base64"), "{e}");
        let e = err(Settings {
            state_key: Some(STANDARD.encode([1u8; 16])),
            ..good()
        });
        assert!(e.starts_with("STATE_KEY:") && e.contains("32 bytes"), "{e}");
        let e = err(Settings {
            api_key: Some("short".into()),
            ..good()
        });
        assert!(e.starts_with("API_KEY:"), "{e}");
        let e = err(Settings {
            api_key: None,
            ..good()
        });
        assert!(e.starts_with("API_KEY:"), "{e}");
        let e = err(Settings {
            database_url: Some("mysql://x".into()),
            ..good()
        });
        assert!(e.starts_with("DATABASE_URL:"), "{e}");
        let e = err(Settings {
            allowed_cidrs: Some("10.0.0.0/8, nope".into()),
            ..good()
        });
        assert!(e.starts_with("ALLOWED_CIDRS:") && e.contains("nope"), "{e}");
        let e = err(Settings {
            base_url: Some("ftp://x".into()),
            ..good()
        });
        assert!(e.starts_with("BASE_URL:"), "{e}");
        let e = err(Settings {
            broker_addr: Some("localhost".into()),
            ..good()
        });
        assert!(e.starts_with("BROKER_ADDR:"), "{e}");
    }

    #[test]
    fn debug_never_prints_keys() {
        let s = good();
        let key = s.encryption_key.clone().unwrap();
        let dbg = format!("{s:?} {:?}", BrokerConfig::from_settings(&s).unwrap());
        assert!(!dbg.contains(&key));
        assert!(!dbg.contains(&"a".repeat(32)));
    }

    #[test]
    fn database_password_is_redacted() {
        assert_eq!(
            redact_url("postgres://u:pw@h/db"),
            "postgres://u:REDACTED@h/db"
        );
    }
}
