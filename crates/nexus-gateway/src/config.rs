//! Gateway configuration: one typed struct, validated at start-up; every
//! error names its variable.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;
use nexus_core::{ConfigError, Secret};
use url::Url;

/// Raw settings, each named after its environment variable.
#[derive(Default, Clone)]
pub struct GatewaySettings {
    /// `BROKER_URL`: the broker's base URL (private network).
    pub broker_url: Option<String>,
    /// `BROKER_API_KEY`: the broker's admin key.
    pub broker_api_key: Option<String>,
    /// `GATEWAY_ADDR`: listen address.
    pub gateway_addr: Option<String>,
    /// `CORS_ALLOWED_ORIGINS`: comma-separated exact origins.
    pub cors_allowed_origins: Option<String>,
    /// `REDIRECT_PATH`: the OAuth callback path forwarded to the broker.
    pub redirect_path: Option<String>,
    /// `METRICS_ALLOWED_CIDRS`: networks that may read `/metrics` (default loopback).
    pub metrics_allowed_cidrs: Option<String>,
    /// `GATEWAY_CACHE_CAPACITY`: token answers kept in memory (0 disables).
    pub gateway_cache_capacity: Option<String>,
}

impl std::fmt::Debug for GatewaySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewaySettings")
            .field("broker_url", &self.broker_url)
            .field(
                "broker_api_key",
                &self.broker_api_key.as_ref().map(|_| "[set]"),
            )
            .field("gateway_addr", &self.gateway_addr)
            .field("cors_allowed_origins", &self.cors_allowed_origins)
            .finish()
    }
}

/// Validated gateway configuration.
#[derive(Clone)]
pub struct GatewayConfig {
    /// Broker base URL.
    pub broker_url: Url,
    /// Broker admin key.
    pub broker_api_key: Arc<Secret<String>>,
    /// Listen address.
    pub listen_addr: SocketAddr,
    /// Origins allowed by CORS (none by default).
    pub cors_allowed_origins: Vec<HeaderValue>,
    /// Callback path forwarded to the broker.
    pub redirect_path: String,
    /// How long a verified agent key is trusted without asking the broker.
    pub key_cache_ttl: Duration,
    /// Timeout of each broker call.
    pub broker_timeout: Duration,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Networks that may read `/metrics` (the gateway faces the internet).
    pub metrics_allowed_cidrs: Vec<ipnet::IpNet>,
    /// Token answers kept while the broker's change stream is open (0: none).
    pub token_cache_capacity: usize,
    /// How often tokens served from the cache are reported to the broker.
    pub served_report_every: Duration,
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("broker_url", &self.broker_url.as_str())
            .field("listen_addr", &self.listen_addr)
            .field("cors_allowed_origins", &self.cors_allowed_origins)
            .field("redirect_path", &self.redirect_path)
            .finish_non_exhaustive()
    }
}

fn non_empty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn err(var: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        reason: reason.into(),
    }
}

impl GatewayConfig {
    /// Validates raw settings.
    pub fn from_settings(s: &GatewaySettings) -> Result<Self, ConfigError> {
        let broker_url = non_empty(&s.broker_url)
            .ok_or_else(|| err("BROKER_URL", "is not set; e.g. http://127.0.0.1:8080"))?;
        let broker_url = Url::parse(broker_url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                err(
                    "BROKER_URL",
                    "must be an http(s) URL such as http://10.0.0.5:8080",
                )
            })?;
        let broker_api_key = non_empty(&s.broker_api_key)
            .ok_or_else(|| err("BROKER_API_KEY", "is not set; use the broker's API_KEY"))?;
        let listen_addr: SocketAddr = non_empty(&s.gateway_addr)
            .unwrap_or("127.0.0.1:8090")
            .parse()
            .map_err(|_| err("GATEWAY_ADDR", "must be an IP:port such as 127.0.0.1:8090"))?;
        let mut cors_allowed_origins = Vec::new();
        for o in non_empty(&s.cors_allowed_origins)
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
        {
            let u = Url::parse(o).ok().filter(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && u.path() == "/"
                    && u.query().is_none()
                    && !o.ends_with('/')
            });
            let Some(u) = u else {
                return Err(err(
                    "CORS_ALLOWED_ORIGINS",
                    format!("'{o}' is not an origin such as https://app.example.com (scheme, host, optional port; no path)"),
                ));
            };
            let origin = u.origin().ascii_serialization();
            cors_allowed_origins.push(HeaderValue::from_str(&origin).map_err(|_| {
                err(
                    "CORS_ALLOWED_ORIGINS",
                    format!("'{o}' is not a valid origin"),
                )
            })?);
        }
        let redirect_path = non_empty(&s.redirect_path)
            .unwrap_or("/auth/callback")
            .to_string();
        // It becomes a route: plain path characters only, none of ours.
        const TAKEN: &[&str] = &[
            "/health",
            "/ready",
            "/metrics",
            "/openapi.json",
            "/auth/capture",
            "/auth/capture-schema",
            "/auth/capture-credential",
        ];
        if !redirect_path.starts_with('/')
            || redirect_path.len() < 2
            || !redirect_path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b))
            || redirect_path.starts_with("/v1/")
            || redirect_path.starts_with("/nexus.v1.")
            || TAKEN.contains(&redirect_path.as_str())
        {
            return Err(err(
                "REDIRECT_PATH",
                "must be a path like /auth/callback (letters, digits, / - _ .), not one of the gateway's own routes",
            ));
        }
        let metrics_allowed_cidrs = nexus_core::net::parse_cidrs(
            "METRICS_ALLOWED_CIDRS",
            non_empty(&s.metrics_allowed_cidrs).unwrap_or("127.0.0.0/8,::1/128"),
        )?;
        let token_cache_capacity = match non_empty(&s.gateway_cache_capacity) {
            None => 10_000,
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| *n <= 10_000_000)
                .ok_or_else(|| {
                    err(
                        "GATEWAY_CACHE_CAPACITY",
                        "must be a number of token answers from 0 (off) to 10000000",
                    )
                })?,
        };
        Ok(Self {
            broker_url,
            broker_api_key: Arc::new(Secret::new(broker_api_key.to_string())),
            listen_addr,
            cors_allowed_origins,
            redirect_path,
            key_cache_ttl: Duration::from_secs(10),
            broker_timeout: Duration::from_secs(15),
            max_body_bytes: 1024 * 1024,
            metrics_allowed_cidrs,
            token_cache_capacity,
            served_report_every: Duration::from_secs(1),
        })
    }
}
