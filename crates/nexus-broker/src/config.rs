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
use nexus_core::Secret;

/// Default limit for request bodies on the admin API.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
const MIN_API_KEY_LEN: usize = 24;
const MIN_STATE_KEY_BYTES: usize = 32;

pub use nexus_core::settings::redact_url;
pub use nexus_core::ConfigError;

/// Raw settings, each named after its environment variable. `None` means unset.
#[derive(Default, Clone)]
pub struct Settings {
    /// `DATABASE_URL`: `sqlite:path` or `postgres://...`.
    pub database_url: Option<String>,
    /// `ENCRYPTION_KEY`: one base64 32-byte key.
    pub encryption_key: Option<String>,
    /// `ENCRYPTION_KEYS`: `id:base64,...`, first active; wins over `ENCRYPTION_KEY`.
    pub encryption_keys: Option<String>,
    /// `STATE_KEY`: base64, at least 32 bytes; signs OAuth `state`.
    pub state_key: Option<String>,
    /// `API_KEY`: the admin key callers send as `X-API-Key`.
    pub api_key: Option<String>,
    /// `BASE_URL`: the public URL the provider redirects back to.
    pub base_url: Option<String>,
    /// `REDIRECT_PATH`: path of the OAuth callback under `BASE_URL`.
    pub redirect_path: Option<String>,
    /// `ALLOWED_RETURN_DOMAINS`: comma-separated hosts a handshake may return to.
    pub allowed_return_domains: Option<String>,
    /// `ALLOWED_CIDRS`: comma-separated networks allowed to call the admin API.
    pub allowed_cidrs: Option<String>,
    /// `BROKER_ADDR`: socket address to listen on.
    pub broker_addr: Option<String>,
    /// `MAX_BODY_BYTES`: request body limit.
    pub max_body_bytes: Option<String>,
    /// `PROVIDER_TIMEOUT_SECS`: timeout of each call to a provider.
    pub provider_timeout_secs: Option<String>,
    /// `REDIS_URL`: optional Redis for caches shared by replicas.
    pub redis_url: Option<String>,
    /// `REFRESH_MARGIN_SECS`: refresh tokens this long before they expire.
    pub refresh_margin_secs: Option<String>,
    /// `REFRESH_JITTER_SECS`: refresh up to this much earlier again, at random.
    pub refresh_jitter_secs: Option<String>,
    /// `REFRESH_LEASE_SECS`: how long a refresh lease lasts.
    pub refresh_lease_secs: Option<String>,
    /// `TOKEN_CACHE_CAPACITY`: decrypted token responses kept in memory (0 disables).
    pub token_cache_capacity: Option<String>,
    /// `REFRESH_WORKER`: `false` to run no background refresher on this replica.
    pub refresh_worker: Option<String>,
    /// `REDIS_KEY_PREFIX`: prefix of every Redis key (default `nexus:`).
    pub redis_key_prefix: Option<String>,
    /// `WEBHOOK_URL`: one webhook endpoint receiving every event.
    pub webhook_url: Option<String>,
    /// `WEBHOOK_SECRET`: its signing secret (`whsec_` + base64).
    pub webhook_secret: Option<String>,
    /// `NEXUS_ISSUANCE_PAUSED`: `true` pauses token issuance at start-up.
    pub issuance_paused: Option<String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys are secrets: say only whether they are set.
        f.debug_struct("Settings")
            .field(
                "database_url",
                &self.database_url.as_ref().map(|u| redact_url(u)),
            )
            .field(
                "encryption_key",
                &self.encryption_key.as_ref().map(|_| "[set]"),
            )
            .field(
                "encryption_keys",
                &self.encryption_keys.as_ref().map(|_| "[set]"),
            )
            .field("state_key", &self.state_key.as_ref().map(|_| "[set]"))
            .field("api_key", &self.api_key.as_ref().map(|_| "[set]"))
            .field("base_url", &self.base_url)
            .field("broker_addr", &self.broker_addr)
            .field("webhook_url", &self.webhook_url)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "[set]"),
            )
            .finish_non_exhaustive()
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
    /// Public base URL.
    pub base_url: Url,
    /// Callback path under `base_url`.
    pub redirect_path: String,
    /// Hosts a handshake may return the browser to.
    pub allowed_return_domains: Vec<String>,
    /// Networks allowed to call the admin API; empty means all.
    pub allowed_cidrs: Vec<IpNet>,
    /// Listen address.
    pub listen_addr: SocketAddr,
    /// Request body limit in bytes.
    pub max_body_bytes: usize,
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
            .field("allowed_cidrs", &self.allowed_cidrs)
            .field("listen_addr", &self.listen_addr)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("provider_timeout", &self.provider_timeout)
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("refresh", &self.refresh)
            .field("webhook_url", &self.webhook.as_ref().map(|w| w.0.as_str()))
            .field("issuance_paused", &self.issuance_paused)
            .finish_non_exhaustive()
    }
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Validates `DATABASE_URL` alone (for `nexus migrate`).
pub fn database_url(s: &Settings) -> Result<String, ConfigError> {
    let url = non_empty(&s.database_url).ok_or_else(|| {
        ConfigError::new(
            "DATABASE_URL",
            "is not set; use sqlite:nexus.db or postgres://user@host/db",
        )
    })?;
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://"))
    {
        return Err(ConfigError::new(
            "DATABASE_URL",
            "must start with sqlite:, postgres:// or postgresql://",
        ));
    }
    Ok(url.to_string())
}

/// Validates the key ring alone (`ENCRYPTION_KEYS`, else `ENCRYPTION_KEY`), for `nexus keys rewrap`.
pub fn key_ring(s: &Settings) -> Result<KeyRing, ConfigError> {
    let (var, result) = match (non_empty(&s.encryption_keys), non_empty(&s.encryption_key)) {
        (Some(ring), _) => ("ENCRYPTION_KEYS", KeyRing::from_keys_var(ring)),
        (None, Some(one)) => ("ENCRYPTION_KEY", KeyRing::from_single_key(one)),
        (None, None) => {
            return Err(ConfigError::new(
                "ENCRYPTION_KEY",
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
            refresh: self.refresh,
        }
    }

    /// Validates raw settings. Every error names its variable.
    pub fn from_settings(s: &Settings) -> Result<Self, ConfigError> {
        let database_url = database_url(s)?;
        let keys = key_ring(s)?;

        let state_key_b64 = non_empty(&s.state_key).ok_or_else(|| {
            ConfigError::new(
                "STATE_KEY",
                "is not set; generate one with `nexus keys generate`",
            )
        })?;
        let state_key = STANDARD.decode(state_key_b64).map_err(|_| {
            ConfigError::new(
                "STATE_KEY",
                "is not valid base64; generate one with `nexus keys generate`",
            )
        })?;
        if state_key.len() < MIN_STATE_KEY_BYTES {
            return Err(ConfigError::new(
                "STATE_KEY",
                format!(
                    "must decode to at least {MIN_STATE_KEY_BYTES} bytes (got {}); generate one with `nexus keys generate`",
                    state_key.len()
                ),
            ));
        }

        let api_key = non_empty(&s.api_key).ok_or_else(|| {
            ConfigError::new(
                "API_KEY",
                "is not set; generate one with `nexus keys generate`",
            )
        })?;
        if api_key.len() < MIN_API_KEY_LEN {
            return Err(ConfigError::new(
                "API_KEY",
                format!(
                    "must be at least {MIN_API_KEY_LEN} characters (got {})",
                    api_key.len()
                ),
            ));
        }

        let listen_addr: SocketAddr = non_empty(&s.broker_addr)
            .unwrap_or("127.0.0.1:8080")
            .parse()
            .map_err(|_| {
                ConfigError::new("BROKER_ADDR", "must be an IP:port such as 127.0.0.1:8080")
            })?;

        let base_url_raw = non_empty(&s.base_url)
            .map(str::to_string)
            .unwrap_or_else(|| format!("http://{listen_addr}"));
        let base_url = Url::parse(&base_url_raw)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                ConfigError::new(
                    "BASE_URL",
                    "must be an absolute http(s) URL such as https://nexus.example.com",
                )
            })?;

        let redirect_path = non_empty(&s.redirect_path)
            .unwrap_or("/auth/callback")
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
        ];
        if !redirect_path.starts_with('/')
            || redirect_path.len() < 2
            || !redirect_path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b))
        {
            return Err(ConfigError::new(
                "REDIRECT_PATH",
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
                "REDIRECT_PATH",
                format!("{redirect_path} is one of the broker's own routes"),
            ));
        }

        let allowed_return_domains = non_empty(&s.allowed_return_domains)
            .map(|v| {
                v.split(',')
                    .map(|d| d.trim().to_ascii_lowercase())
                    .filter(|d| !d.is_empty())
                    .collect()
            })
            .unwrap_or_else(|| vec!["localhost".to_string(), "127.0.0.1".to_string()]);

        let allowed_cidrs = match non_empty(&s.allowed_cidrs) {
            None => Vec::new(),
            Some(v) => nexus_core::net::parse_cidrs("ALLOWED_CIDRS", v)?,
        };

        let max_body_bytes = match non_empty(&s.max_body_bytes) {
            None => DEFAULT_MAX_BODY_BYTES,
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| *n >= 1024)
                .ok_or_else(|| {
                    ConfigError::new(
                        "MAX_BODY_BYTES",
                        "must be a whole number of bytes, at least 1024",
                    )
                })?,
        };

        let provider_timeout = match non_empty(&s.provider_timeout_secs) {
            None => Duration::from_secs(10),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=300).contains(n))
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    ConfigError::new(
                        "PROVIDER_TIMEOUT_SECS",
                        "must be a whole number of seconds from 1 to 300",
                    )
                })?,
        };

        let redis_url = match non_empty(&s.redis_url) {
            None => None,
            Some(u) if u.starts_with("redis://") => Some(u.to_string()),
            Some(u) if u.starts_with("rediss://") => {
                return Err(ConfigError::new("REDIS_URL", "TLS to Redis (rediss://) is not supported in this version; use redis:// on a private network"))
            }
            Some(_) => return Err(ConfigError::new("REDIS_URL", "must start with redis://")),
        };
        let refresh_lease = match non_empty(&s.refresh_lease_secs) {
            None => Duration::from_secs(30),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=600).contains(n))
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    ConfigError::new(
                        "REFRESH_LEASE_SECS",
                        "must be a whole number of seconds from 1 to 600",
                    )
                })?,
        };
        // A refresh is a discovery call plus a token call, each bounded by the
        // provider timeout; a lease that can expire mid-refresh would let a
        // second replica refresh with the same refresh token.
        if refresh_lease <= provider_timeout * 2 {
            return Err(ConfigError::new(
                "REFRESH_LEASE_SECS",
                format!(
                    "must be more than twice PROVIDER_TIMEOUT_SECS ({}s), so a lease outlasts a refresh",
                    provider_timeout.as_secs()
                ),
            ));
        }
        let refresh_worker = match non_empty(&s.refresh_worker)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("true") | Some("1") | Some("yes") => true,
            Some("false") | Some("0") | Some("no") => false,
            Some(_) => return Err(ConfigError::new("REFRESH_WORKER", "must be true or false")),
        };
        let redis_key_prefix = non_empty(&s.redis_key_prefix)
            .unwrap_or("nexus:")
            .to_string();
        let refresh_margin = match non_empty(&s.refresh_margin_secs) {
            None => Duration::from_secs(300),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= 86_400)
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    ConfigError::new(
                        "REFRESH_MARGIN_SECS",
                        "must be a whole number of seconds from 0 to 86400",
                    )
                })?,
        };
        let refresh_jitter = match non_empty(&s.refresh_jitter_secs) {
            None => Duration::from_secs(60),
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= 3_600)
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    ConfigError::new(
                        "REFRESH_JITTER_SECS",
                        "must be a whole number of seconds from 0 to 3600",
                    )
                })?,
        };
        let cache_capacity = match non_empty(&s.token_cache_capacity) {
            None => 10_000,
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= 10_000_000)
                .ok_or_else(|| {
                    ConfigError::new(
                        "TOKEN_CACHE_CAPACITY",
                        "must be a whole number from 0 (off) to 10000000",
                    )
                })?,
        };

        let webhook = match (non_empty(&s.webhook_url), non_empty(&s.webhook_secret)) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "WEBHOOK_URL",
                    "is not set but WEBHOOK_SECRET is; set both, or neither",
                ))
            }
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "WEBHOOK_SECRET",
                    "is not set but WEBHOOK_URL is; generate one with `nexus keys generate`",
                ))
            }
            (Some(url), Some(secret)) => {
                let url = crate::events::webhooks::validate_url(url)
                    .map_err(|e| ConfigError::new("WEBHOOK_URL", e))?;
                let secret = crate::events::webhooks::WebhookSecret::parse(secret).ok_or_else(|| {
                    ConfigError::new(
                        "WEBHOOK_SECRET",
                        "must be whsec_ followed by base64 of 24 to 64 random bytes; generate one with `nexus keys generate`",
                    )
                })?;
                Some((url, Arc::new(secret)))
            }
        };
        let issuance_paused = match non_empty(&s.issuance_paused)
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("false") | Some("0") | Some("no") => false,
            Some("true") | Some("1") | Some("yes") => true,
            Some(_) => {
                return Err(ConfigError::new(
                    "NEXUS_ISSUANCE_PAUSED",
                    "must be true or false",
                ))
            }
        };

        Ok(Self {
            webhook,
            webhooks: crate::events::webhooks::WebhookSettings::default(),
            scope: crate::tokens::scope::ScopeSettings::default(),
            issuance_paused,
            pause_reload: Duration::from_secs(1),
            database_url,
            keys: Arc::new(keys),
            state_key: Arc::new(Secret::new(state_key)),
            api_key: Arc::new(Secret::new(api_key.to_string())),
            base_url,
            redirect_path,
            allowed_return_domains,
            allowed_cidrs,
            listen_addr,
            max_body_bytes,
            audit: crate::events::audit::AuditConfig::default(),
            provider_timeout,
            redis_url,
            refresh: crate::tokens::RefreshSettings {
                margin: refresh_margin,
                jitter: refresh_jitter,
                cache_capacity,
                lease: refresh_lease,
                worker: refresh_worker,
                ..Default::default()
            },
            redis_key_prefix,
        })
    }
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
