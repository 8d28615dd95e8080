//! Gateway configuration: one typed struct, validated at start-up; every
//! error names its variable.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;
use nexus_core::settings::Setting;
use nexus_core::{ConfigError, Secret};
use url::Url;

nexus_core::declare_settings! {
    /// Raw gateway settings, each named after its environment variable;
    /// `None` means unset. Each is declared once here: the `nexus` binary
    /// makes its flags and `--help` from these declarations.
    pub struct GatewaySettings {
        /// `BROKER_URL`: the broker's base URL (private network).
        broker_url: BROKER_URL = Setting::text("BROKER_URL", "The broker's base URL (private network)"),
        /// `BROKER_API_KEY`: the broker's `GATEWAY_API_KEY` (or, without one, its `API_KEY`).
        broker_api_key: BROKER_API_KEY = Setting::secret("BROKER_API_KEY", "The broker's GATEWAY_API_KEY (least privilege), or its API_KEY"),
        /// `BROKER_CA_FILE`: an extra CA (PEM) the broker's certificate may chain to.
        broker_ca_file: BROKER_CA_FILE = Setting::text("BROKER_CA_FILE", "PEM CA the broker's TLS certificate chains to (beside the public roots)"),
        /// `BROKER_CLIENT_CERT_FILE`: the client certificate presented to the broker (mutual TLS).
        broker_client_cert_file: BROKER_CLIENT_CERT_FILE = Setting::text("BROKER_CLIENT_CERT_FILE", "PEM client certificate chain presented to the broker (mutual TLS; with BROKER_CLIENT_KEY_FILE)"),
        /// `BROKER_CLIENT_KEY_FILE`: its private key.
        broker_client_key_file: BROKER_CLIENT_KEY_FILE = Setting::text("BROKER_CLIENT_KEY_FILE", "PEM private key of BROKER_CLIENT_CERT_FILE"),
        /// `GATEWAY_CLIENT_CA_FILE`: require client certificates from this CA (mutual TLS).
        gateway_client_ca_file: GATEWAY_CLIENT_CA_FILE = Setting::text("GATEWAY_CLIENT_CA_FILE", "PEM CA whose client certificates agents must present (mutual TLS; needs TLS_CERT_FILE); agent keys are still required"),
        /// `GATEWAY_CLIENT_IDS`: client certificate identities allowed.
        gateway_client_ids: GATEWAY_CLIENT_IDS = Setting::text("GATEWAY_CLIENT_IDS", "Comma-separated identities (URI SAN such as a SPIFFE ID, or DNS SAN) an agent's certificate must carry one of (default: any the CA issued)"),
        /// `GATEWAY_ADDR`: listen address.
        gateway_addr: GATEWAY_ADDR = Setting::text("GATEWAY_ADDR", "Gateway listen address (agents and browsers come here)").or("127.0.0.1:8090"),
        /// `CORS_ALLOWED_ORIGINS`: comma-separated exact origins.
        cors_allowed_origins: CORS_ALLOWED_ORIGINS = Setting::text("CORS_ALLOWED_ORIGINS", "Comma-separated origins allowed by CORS (exact; none by default)"),
        /// `REDIRECT_PATH`: the OAuth callback path forwarded to the broker.
        redirect_path: REDIRECT_PATH = Setting::text("REDIRECT_PATH", "Path of the OAuth callback under BASE_URL").or("/auth/callback"),
        /// `METRICS_ALLOWED_CIDRS`: networks that may read `/metrics` (default loopback).
        metrics_allowed_cidrs: METRICS_ALLOWED_CIDRS = Setting::text("METRICS_ALLOWED_CIDRS", "Comma-separated networks that may read the gateway's /metrics").or("127.0.0.0/8,::1/128"),
        /// `GATEWAY_CACHE_CAPACITY`: token answers kept in memory (0 disables).
        gateway_cache_capacity: GATEWAY_CACHE_CAPACITY = Setting::number("GATEWAY_CACHE_CAPACITY", "Token answers the gateway keeps while the broker's change stream is open; 0 disables", "10000", 0, 10_000_000, ""),
        /// `AGENT_HANDSHAKES_PER_MINUTE`: handshakes one agent key may start per minute.
        agent_handshakes_per_minute: AGENT_HANDSHAKES_PER_MINUTE = Setting::number("AGENT_HANDSHAKES_PER_MINUTE", "Handshakes one agent key may start per minute through this gateway (more get 429)", "60", 1, 1_000_000, ""),
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
    /// Connection limits and timeouts of the server.
    pub limits: nexus_core::serve::Limits,
    /// The certificate and key it serves TLS with (none: plaintext).
    pub tls: Option<nexus_core::tls::TlsFiles>,
    /// What the gateway trusts and presents when it calls the broker.
    pub broker_tls: nexus_core::mtls::ClientTls,
    /// Client certificates agents must present (mutual TLS), if any.
    pub client_auth: Option<nexus_core::mtls::ClientAuth>,
    /// Handshakes one agent key may start per minute.
    pub agent_handshakes_per_minute: u32,
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

fn err(var: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        reason: reason.into(),
    }
}

/// The gateway's TLS as a client of the broker; checked here (files
/// readable, key matching) so a bad file stops the start with its name.
fn broker_tls(
    v: &nexus_core::settings::Values,
    broker_url: &Url,
) -> Result<nexus_core::mtls::ClientTls, ConfigError> {
    let ca = v
        .given(&BROKER_CA_FILE)
        .map(|p| (p.into(), BROKER_CA_FILE.name));
    let identity = v
        .pair(&BROKER_CLIENT_CERT_FILE, &BROKER_CLIENT_KEY_FILE)?
        .map(|(c, k)| {
            (
                (c.into(), BROKER_CLIENT_CERT_FILE.name),
                (k.into(), BROKER_CLIENT_KEY_FILE.name),
            )
        });
    if identity.is_some() && broker_url.scheme() != "https" {
        return Err(err(
            BROKER_CLIENT_CERT_FILE.name,
            "needs an https BROKER_URL: a client certificate is presented in a TLS handshake",
        ));
    }
    let tls = nexus_core::mtls::ClientTls { ca, identity };
    tls.config()
        .map_err(|e| err(e.var, format!("{}: {}", e.path, e.reason)))?;
    Ok(tls)
}

impl GatewayConfig {
    /// Validates raw settings.
    pub fn from_settings(s: &GatewaySettings) -> Result<Self, ConfigError> {
        let v = s.values();
        let broker_url = v.required(&BROKER_URL, "e.g. http://127.0.0.1:8080")?;
        let broker_url = Url::parse(broker_url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                err(
                    BROKER_URL.name,
                    "must be an http(s) URL such as http://10.0.0.5:8080",
                )
            })?;
        let broker_api_key = v.required(&BROKER_API_KEY, "use the broker's API_KEY")?;
        let broker_tls = broker_tls(&v, &broker_url)?;
        let listen_addr: SocketAddr = v
            .required(&GATEWAY_ADDR, "use an IP:port such as 127.0.0.1:8090")?
            .parse()
            .map_err(|_| {
                err(
                    GATEWAY_ADDR.name,
                    "must be an IP:port such as 127.0.0.1:8090",
                )
            })?;
        let mut cors_allowed_origins = Vec::new();
        for o in v
            .given(&CORS_ALLOWED_ORIGINS)
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
                    CORS_ALLOWED_ORIGINS.name,
                    format!("'{o}' is not an origin such as https://app.example.com (scheme, host, optional port; no path)"),
                ));
            };
            let origin = u.origin().ascii_serialization();
            cors_allowed_origins.push(HeaderValue::from_str(&origin).map_err(|_| {
                err(
                    CORS_ALLOWED_ORIGINS.name,
                    format!("'{o}' is not a valid origin"),
                )
            })?);
        }
        let redirect_path = v
            .required(&REDIRECT_PATH, "use a path such as /auth/callback")?
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
            nexus_core::wire::routes::CLIENT_METADATA,
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
                REDIRECT_PATH.name,
                "must be a path like /auth/callback (letters, digits, / - _ .), not one of the gateway's own routes",
            ));
        }
        let metrics_allowed_cidrs = nexus_core::net::parse_cidrs(
            METRICS_ALLOWED_CIDRS.name,
            v.text(&METRICS_ALLOWED_CIDRS).unwrap_or_default(),
        )?;
        let token_cache_capacity = v.count(&GATEWAY_CACHE_CAPACITY)?;
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
            limits: nexus_core::serve::Limits::from_values(&v)?,
            client_auth: nexus_core::mtls::ClientAuth::from_values(
                &v,
                &GATEWAY_CLIENT_CA_FILE,
                &GATEWAY_CLIENT_IDS,
            )?,
            tls: nexus_core::tls::TlsFiles::from_values(&v)?,
            broker_tls,
            agent_handshakes_per_minute: u32::try_from(v.number(&AGENT_HANDSHAKES_PER_MINUTE)?)
                .unwrap_or(u32::MAX),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_are_consistent() {
        nexus_core::settings::check_declarations(GatewaySettings::ALL).unwrap();
    }

    fn with(f: impl FnOnce(&mut GatewaySettings)) -> String {
        let mut s = GatewaySettings {
            broker_url: Some("https://broker.internal:8080".into()),
            broker_api_key: Some("k".repeat(32)),
            ..Default::default()
        };
        f(&mut s);
        GatewayConfig::from_settings(&s).unwrap_err().to_string()
    }

    #[test]
    fn a_client_certificate_needs_its_key_an_https_broker_and_readable_files() {
        let e = with(|s| s.broker_client_cert_file = Some("/c.pem".into()));
        assert!(e.starts_with("BROKER_CLIENT_KEY_FILE"), "{e}");
        let e = with(|s| s.broker_client_key_file = Some("/k.pem".into()));
        assert!(e.starts_with("BROKER_CLIENT_CERT_FILE"), "{e}");
        let e = with(|s| {
            s.broker_url = Some("http://broker.internal:8080".into());
            s.broker_client_cert_file = Some("/c.pem".into());
            s.broker_client_key_file = Some("/k.pem".into());
        });
        assert!(e.contains("https"), "{e}");
        let e = with(|s| {
            s.broker_client_cert_file = Some("/nonexistent/c.pem".into());
            s.broker_client_key_file = Some("/nonexistent/k.pem".into());
        });
        assert!(
            e.starts_with("BROKER_CLIENT_CERT_FILE: /nonexistent/c.pem"),
            "{e}"
        );
        let e = with(|s| s.broker_ca_file = Some("/nonexistent/ca.pem".into()));
        assert!(e.starts_with("BROKER_CA_FILE"), "{e}");
    }
}
