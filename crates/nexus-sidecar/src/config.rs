//! Sidecar configuration: one typed struct, validated at start-up; every
//! error names its variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nexus_core::settings::Setting;
use nexus_core::{ConfigError, Secret};

use crate::routes::Routes;

nexus_core::declare_settings! {
    /// Raw sidecar settings, each named after its environment variable;
    /// `None` means unset. The `nexus` binary makes its flags from these.
    pub struct SidecarSettings {
        /// `GATEWAY_URL`: the gateway the sidecar fetches credentials from.
        gateway_url: GATEWAY_URL = Setting::text("GATEWAY_URL", "The Nexus gateway's base URL (credentials are fetched there)"),
        /// `AGENT_KEY`: the agent key (`nxa_...`); or `AGENT_KEY_FILE`.
        agent_key: AGENT_KEY = Setting::secret("AGENT_KEY", "The agent key (nxa_...) the sidecar presents to the gateway"),
        /// `AGENT_KEY_FILE`: a file holding the agent key (a mounted secret).
        agent_key_file: AGENT_KEY_FILE = Setting::text("AGENT_KEY_FILE", "A file holding the agent key (e.g. a mounted Kubernetes secret); instead of AGENT_KEY"),
        /// `SIDECAR_ADDR`: listen address (loopback unless allowed).
        sidecar_addr: SIDECAR_ADDR = Setting::text("SIDECAR_ADDR", "Sidecar listen address; loopback unless SIDECAR_ALLOW_NON_LOOPBACK").or("127.0.0.1:8070"),
        /// `SIDECAR_ALLOW_NON_LOOPBACK`: permit a non-loopback listen address.
        sidecar_allow_non_loopback: SIDECAR_ALLOW_NON_LOOPBACK = Setting::boolean("SIDECAR_ALLOW_NON_LOOPBACK", "Allow listening beyond loopback (anyone who reaches the port uses the credentials)", false),
        /// `SIDECAR_ROUTES_FILE`: the routes (TOML).
        sidecar_routes_file: SIDECAR_ROUTES_FILE = Setting::text("SIDECAR_ROUTES_FILE", "The routes file (TOML): route name -> upstream URL and connection").or("nexus-routes.toml"),
        /// `SIDECAR_CA_FILE`: extra CA certificates (PEM) trusted for upstreams.
        sidecar_ca_file: SIDECAR_CA_FILE = Setting::text("SIDECAR_CA_FILE", "Extra CA certificates (PEM) trusted for upstreams, besides the platform's"),
        /// `GATEWAY_CA_FILE`: extra CA certificates (PEM) trusted for the gateway.
        gateway_ca_file: GATEWAY_CA_FILE = Setting::text("GATEWAY_CA_FILE", "Extra CA certificates (PEM) trusted for the gateway's TLS, e.g. .nexus/certs/ca.pem of `nexus certs dev`"),
        /// `GATEWAY_CLIENT_CERT_FILE`: a client certificate (PEM) for a gateway that asks for one.
        gateway_client_cert_file: GATEWAY_CLIENT_CERT_FILE = Setting::text("GATEWAY_CLIENT_CERT_FILE", "PEM client certificate chain presented to a gateway that requires one (mutual TLS; with GATEWAY_CLIENT_KEY_FILE)"),
        /// `GATEWAY_CLIENT_KEY_FILE`: its private key.
        gateway_client_key_file: GATEWAY_CLIENT_KEY_FILE = Setting::text("GATEWAY_CLIENT_KEY_FILE", "PEM private key of GATEWAY_CLIENT_CERT_FILE"),
        /// `SIDECAR_ALLOW_PLAINTEXT_GATEWAY`: plaintext HTTP to a gateway beyond loopback.
        sidecar_allow_plaintext_gateway: SIDECAR_ALLOW_PLAINTEXT_GATEWAY = Setting::boolean("SIDECAR_ALLOW_PLAINTEXT_GATEWAY", "Allow plaintext HTTP to a gateway that is not on loopback (credentials cross in clear)", false),
        /// `SIDECAR_REPLAY_BODY_MAX_BYTES`: bodies kept for the replay after a 401.
        sidecar_replay_body_max_bytes: SIDECAR_REPLAY_BODY_MAX_BYTES = Setting::number("SIDECAR_REPLAY_BODY_MAX_BYTES", "Request bodies up to this size are kept so a 401 can be replayed after a refresh; larger ones stream through", "65536", 0, 16_777_216, "bytes"),
        /// `SIDECAR_SIGNED_BODY_MAX_BYTES`: bodies a strategy must hash.
        sidecar_signed_body_max_bytes: SIDECAR_SIGNED_BODY_MAX_BYTES = Setting::number("SIDECAR_SIGNED_BODY_MAX_BYTES", "Largest body hmac_payload or aws_sigv4 (not S3) may sign; larger requests get 413", "8388608", 0, 1_073_741_824, "bytes"),
        /// `SIDECAR_UPSTREAM_TIMEOUT_SECS`: time for an upstream to answer (the head).
        sidecar_upstream_timeout_secs: SIDECAR_UPSTREAM_TIMEOUT_SECS = Setting::number("SIDECAR_UPSTREAM_TIMEOUT_SECS", "How long an upstream may take to start answering (bodies stream without a limit)", "60", 1, 3600, "s"),
        /// `SIDECAR_RECHECK_SECS`: how often credentials are asked for again.
        sidecar_recheck_secs: SIDECAR_RECHECK_SECS = Setting::number("SIDECAR_RECHECK_SECS", "Credentials are asked of the gateway again at least this often, so an operator's pause or a revocation reaches the sidecar within it", "30", 1, 3600, "s"),
        /// `SIDECAR_WORKERS`: worker threads (0: one per CPU).
        sidecar_workers: SIDECAR_WORKERS = Setting::number("SIDECAR_WORKERS", "Worker threads, each with its own runtime, listener (SO_REUSEPORT) and upstream connections; 0: one per CPU", "0", 0, 256, ""),
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

/// Validated sidecar configuration.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// The gateway's base URL.
    pub gateway_url: String,
    /// The agent key.
    pub agent_key: Secret<String>,
    /// Plaintext to a gateway beyond loopback.
    pub allow_plaintext_gateway: bool,
    /// Extra CA certificates (PEM) for the gateway.
    pub gateway_ca_pem: Vec<u8>,
    /// Client certificate and key (PEM) for a gateway that asks for one.
    pub gateway_identity: Option<nexus_bridge::gateway::ClientIdentityPem>,
    /// Listen address.
    pub listen_addr: SocketAddr,
    /// The routes.
    pub routes: Routes,
    /// Extra CA certificates for upstreams.
    pub ca_file: Option<PathBuf>,
    /// Bodies kept for a replay after a 401.
    pub replay_body_max: usize,
    /// Bodies a strategy may hash.
    pub signed_body_max: usize,
    /// Time to an upstream's response head.
    pub upstream_timeout: Duration,
    /// Longest time credentials are used without asking the gateway again.
    pub recheck: Duration,
    /// Worker threads.
    pub workers: usize,
    /// Server limits.
    pub limits: nexus_core::serve::Limits,
    /// The certificate and key it serves TLS with (none: plaintext).
    pub tls: Option<nexus_core::tls::TlsFiles>,
}

impl SidecarConfig {
    /// Validates raw settings (reads the routes file and the key file).
    pub fn from_settings(s: &SidecarSettings) -> Result<Self, ConfigError> {
        let v = s.values();
        let gateway_url = v
            .required(&GATEWAY_URL, "e.g. http://127.0.0.1:8090")?
            .to_string();
        let parsed = url::Url::parse(&gateway_url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| {
                ConfigError::new(
                    GATEWAY_URL.name,
                    "must be an http(s) URL such as https://nexus-gateway:8090",
                )
            })?;
        let allow_plaintext_gateway = v.boolean(&SIDECAR_ALLOW_PLAINTEXT_GATEWAY)?;
        nexus_bridge::gateway::check_transport(&parsed, allow_plaintext_gateway).map_err(|_| {
            ConfigError::new(
                GATEWAY_URL.name,
                "plaintext HTTP beyond loopback: use https, or set SIDECAR_ALLOW_PLAINTEXT_GATEWAY=true",
            )
        })?;
        let agent_key = match (v.given(&AGENT_KEY), v.given(&AGENT_KEY_FILE)) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    AGENT_KEY_FILE.name,
                    "set AGENT_KEY or AGENT_KEY_FILE, not both",
                ))
            }
            (Some(k), None) => k.trim().to_string(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| {
                    ConfigError::new(AGENT_KEY_FILE.name, format!("cannot read {path}: {e}"))
                })?
                .trim()
                .to_string(),
            (None, None) => {
                return Err(ConfigError::new(
                    AGENT_KEY.name,
                    "is required (or AGENT_KEY_FILE): create one with `nexus agents create`",
                ))
            }
        };
        if agent_key.is_empty() {
            return Err(ConfigError::new(AGENT_KEY.name, "is empty"));
        }
        let listen_addr: SocketAddr = v
            .required(&SIDECAR_ADDR, "use an IP:port such as 127.0.0.1:8070")?
            .parse()
            .map_err(|_| {
                ConfigError::new(
                    SIDECAR_ADDR.name,
                    "must be an IP:port such as 127.0.0.1:8070",
                )
            })?;
        if !listen_addr.ip().is_loopback() && !v.boolean(&SIDECAR_ALLOW_NON_LOOPBACK)? {
            return Err(ConfigError::new(
                SIDECAR_ADDR.name,
                "is not a loopback address: whoever reaches the port uses the credentials; \
                 set SIDECAR_ALLOW_NON_LOOPBACK=true if the network around it is yours alone",
            ));
        }
        let routes_path =
            v.required(&SIDECAR_ROUTES_FILE, "a TOML file of [routes.NAME] tables")?;
        let text = std::fs::read_to_string(routes_path).map_err(|e| {
            ConfigError::new(
                SIDECAR_ROUTES_FILE.name,
                format!("cannot read {routes_path}: {e}"),
            )
        })?;
        let routes = Routes::parse(&text).map_err(|e| {
            ConfigError::new(SIDECAR_ROUTES_FILE.name, format!("{routes_path}: {e}"))
        })?;
        Ok(Self {
            gateway_url,
            agent_key: Secret::new(agent_key),
            allow_plaintext_gateway,
            gateway_ca_pem: match v.given(&GATEWAY_CA_FILE) {
                Some(path) => std::fs::read(path).map_err(|e| {
                    ConfigError::new(GATEWAY_CA_FILE.name, format!("cannot read {path}: {e}"))
                })?,
                None => Vec::new(),
            },
            gateway_identity: gateway_identity(&v)?,
            listen_addr,
            routes,
            ca_file: v.given(&SIDECAR_CA_FILE).map(PathBuf::from),
            replay_body_max: v.count(&SIDECAR_REPLAY_BODY_MAX_BYTES)?,
            signed_body_max: v.count(&SIDECAR_SIGNED_BODY_MAX_BYTES)?,
            upstream_timeout: v.secs(&SIDECAR_UPSTREAM_TIMEOUT_SECS)?,
            recheck: v.secs(&SIDECAR_RECHECK_SECS)?,
            workers: match v.count(&SIDECAR_WORKERS)? {
                0 => std::thread::available_parallelism().map_or(1, usize::from),
                n => n,
            },
            limits: nexus_core::serve::Limits::from_values(&v)?,
            tls: nexus_core::tls::TlsFiles::from_values(&v)?,
        })
    }
}

/// The client certificate for the gateway: both files or neither, read now
/// (and checked by the bridge at start) so a bad file names its variable.
fn gateway_identity(
    v: &nexus_core::settings::Values,
) -> Result<Option<nexus_bridge::gateway::ClientIdentityPem>, ConfigError> {
    let read = |s: &nexus_core::settings::Setting, path: &str| {
        std::fs::read(path)
            .map_err(|e| ConfigError::new(s.name, format!("cannot read {path}: {e}")))
    };
    let Some((cert, key)) = v.pair(&GATEWAY_CLIENT_CERT_FILE, &GATEWAY_CLIENT_KEY_FILE)? else {
        return Ok(None);
    };
    let cert = read(&GATEWAY_CLIENT_CERT_FILE, cert)?;
    let key = String::from_utf8(read(&GATEWAY_CLIENT_KEY_FILE, key)?)
        .map_err(|_| ConfigError::new(GATEWAY_CLIENT_KEY_FILE.name, "is not a PEM (text) file"))?;
    Ok(Some(nexus_bridge::gateway::ClientIdentityPem {
        cert,
        key: nexus_bridge::Secret::new(key),
    }))
}
