//! Serving TLS (rustls): a certificate and key from PEM files, checked at
//! start-up (readable, matching, in their validity period), TLS 1.2 and
//! 1.3 only, ALPN `h2` and `http/1.1` (gRPC and REST keep sharing a port),
//! and reloaded when the files change (polled) or on SIGHUP: new
//! connections get the new pair, open ones keep theirs. A bad new pair is
//! refused and the old one kept (logged and counted).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::ring::sign::any_supported_type;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::settings::{Setting, Values};
use crate::ConfigError;

/// `TLS_CERT_FILE`: the certificate chain (PEM) a server presents.
pub const TLS_CERT_FILE: Setting = Setting::text(
    "TLS_CERT_FILE",
    "PEM certificate chain this server presents (with TLS_KEY_FILE); unset: plaintext HTTP",
);
/// `TLS_KEY_FILE`: the private key (PEM) of `TLS_CERT_FILE`.
pub const TLS_KEY_FILE: Setting = Setting::text(
    "TLS_KEY_FILE",
    "PEM private key of TLS_CERT_FILE (PKCS#8, PKCS#1 or SEC1)",
);

/// How often the files are looked at for a change.
pub const RELOAD_POLL: Duration = Duration::from_secs(10);

/// A certificate and key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// Both settings, or neither (plaintext); one without the other is an error.
    pub fn from_values(v: &Values) -> Result<Option<Self>, ConfigError> {
        match (v.given(&TLS_CERT_FILE), v.given(&TLS_KEY_FILE)) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => Ok(Some(Self {
                cert: cert.into(),
                key: key.into(),
            })),
            (Some(_), None) => Err(ConfigError::new(
                TLS_KEY_FILE.name,
                "is required when TLS_CERT_FILE is set",
            )),
            (None, Some(_)) => Err(ConfigError::new(
                TLS_CERT_FILE.name,
                "is required when TLS_KEY_FILE is set",
            )),
        }
    }
}

/// What is wrong with a certificate and key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read or holds no PEM object of the kind needed.
    #[error("{var} {path}: {reason}")]
    File {
        /// `TLS_CERT_FILE` or `TLS_KEY_FILE`.
        var: &'static str,
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The key does not belong to the certificate.
    #[error("{key_var} {key} is not the key of the certificate in {cert_var} {cert}")]
    Mismatch {
        /// The certificate's setting (`TLS_CERT_FILE`, ...).
        cert_var: &'static str,
        /// The certificate file.
        cert: String,
        /// The key's setting.
        key_var: &'static str,
        /// The key file.
        key: String,
    },
    /// The certificate is outside its validity period.
    #[error("{var} {path}: the certificate {what}")]
    Validity {
        /// The certificate's setting.
        var: &'static str,
        /// The file.
        path: String,
        /// "expired at ..." or "is not valid before ...".
        what: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA file is unusable.
    #[error(transparent)]
    ClientCa(#[from] crate::mtls::MtlsError),
}

impl TlsError {
    /// The setting to name in a start-up error.
    pub fn var(&self) -> &'static str {
        match self {
            Self::File { var, .. } | Self::Validity { var, .. } => var,
            Self::Mismatch { key_var, .. } => key_var,
            Self::Rustls(_) => TLS_CERT_FILE.name,
            Self::ClientCa(e) => e.var,
        }
    }
}

fn unix(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

/// Reads and checks a pair: the chain, a key that signs for its leaf, the
/// leaf inside its validity period at `now`.
pub fn load_pair(files: &TlsFiles, now: SystemTime) -> Result<CertifiedKey, TlsError> {
    load_pair_as(files, (TLS_CERT_FILE.name, TLS_KEY_FILE.name), now)
}

/// [`load_pair`] for files other settings name (a client certificate):
/// errors name `vars` (certificate, key).
pub fn load_pair_as(
    files: &TlsFiles,
    vars: (&'static str, &'static str),
    now: SystemTime,
) -> Result<CertifiedKey, TlsError> {
    let (cert_var, key_var) = vars;
    let shown = |p: &Path| p.display().to_string();
    let file_err = |var, path: &Path, reason: String| TlsError::File {
        var,
        path: shown(path),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| file_err(cert_var, &files.cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert_var, &files.cert, e.to_string()))?;
    let Some(leaf) = chain.first() else {
        return Err(file_err(
            cert_var,
            &files.cert,
            "holds no PEM certificate".into(),
        ));
    };
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| file_err(key_var, &files.key, e.to_string()))?;
    let signing = any_supported_type(&key).map_err(|e| {
        file_err(
            key_var,
            &files.key,
            format!("not a usable private key ({e})"),
        )
    })?;
    {
        use x509_cert::der::Decode;
        let cert = x509_cert::Certificate::from_der(leaf).map_err(|e| {
            file_err(
                cert_var,
                &files.cert,
                format!("not an X.509 certificate ({e})"),
            )
        })?;
        let validity = &cert.tbs_certificate.validity;
        let not_before = validity.not_before.to_system_time();
        let not_after = validity.not_after.to_system_time();
        if now > not_after {
            return Err(TlsError::Validity {
                var: cert_var,
                path: shown(&files.cert),
                what: format!("expired at {}", unix(not_after)),
            });
        }
        if now < not_before {
            return Err(TlsError::Validity {
                var: cert_var,
                path: shown(&files.cert),
                what: format!("is not valid before {}", unix(not_before)),
            });
        }
    }
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        // A key rustls cannot compare (no public key to read) is accepted;
        // a mismatch is refused.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(_) => Err(TlsError::Mismatch {
            cert_var,
            cert: shown(&files.cert),
            key_var,
            key: shown(&files.key),
        }),
    }
}

/// The pair in use, swapped on reload.
#[derive(Debug)]
struct Current {
    pair: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pair.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// A server's TLS: the rustls configuration and the pair it serves.
#[derive(Debug)]
pub struct TlsServer {
    files: TlsFiles,
    current: Arc<Current>,
    config: Arc<rustls::ServerConfig>,
    /// What the files looked like when last loaded (length, modified time).
    seen: RwLock<Option<Stamp>>,
}

/// What a pair's files look like (lengths, modified times): a change means
/// a reload is due.
pub(crate) type Stamp = (u64, SystemTime, u64, SystemTime);

/// The [`Stamp`] of a pair's files now (`None` if one is missing).
pub(crate) fn stamp(files: &TlsFiles) -> Option<Stamp> {
    let c = std::fs::metadata(&files.cert).ok()?;
    let k = std::fs::metadata(&files.key).ok()?;
    Some((c.len(), c.modified().ok()?, k.len(), k.modified().ok()?))
}

impl TlsServer {
    /// Loads and checks the pair (see [`load_pair`]).
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Self::load_with(files, None)
    }

    /// Like [`TlsServer::load`], requiring client certificates as `client`
    /// says (mutual TLS).
    pub fn load_with(
        files: TlsFiles,
        client: Option<&crate::mtls::ClientAuth>,
    ) -> Result<Self, TlsError> {
        let seen = stamp(&files);
        let pair = load_pair(&files, SystemTime::now())?;
        let current = Arc::new(Current {
            pair: RwLock::new(Arc::new(pair)),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
        let builder = match client {
            Some(auth) => builder.with_client_cert_verifier(crate::mtls::client_verifier(auth)?),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        if client.is_some() {
            // No session resumption when client certificates are required: a
            // resumed session keeps the certificate it was opened with and
            // skips its checks, so a client whose certificate has since
            // expired (or been replaced) would still get in, under the old
            // identity. Every connection proves what it holds now.
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        }
        Ok(Self {
            files,
            current,
            config: Arc::new(config),
            seen: RwLock::new(seen),
        })
    }

    /// The rustls configuration (its certificate follows reloads).
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }

    /// The leaf certificate served now.
    pub fn leaf(&self) -> CertificateDer<'static> {
        let pair = self.current.pair.read().unwrap_or_else(|e| e.into_inner());
        pair.cert[0].clone()
    }

    /// Loads the files again if they changed (or `force`): a good new pair
    /// replaces the old for new connections; a bad one is refused, the old
    /// one kept. `Ok(true)` when swapped.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let now_seen = stamp(&self.files);
        if !force && now_seen == *self.seen.read().unwrap_or_else(|e| e.into_inner()) {
            return Ok(false);
        }
        let pair = load_pair(&self.files, SystemTime::now());
        // Remembered either way: a bad pair is reported once, not every poll.
        *self.seen.write().unwrap_or_else(|e| e.into_inner()) = now_seen;
        let pair = pair?;
        *self.current.pair.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pair);
        Ok(true)
    }

    /// Reloads on every change seen by polling and on SIGHUP, until the
    /// runtime stops. Outcomes are logged and counted
    /// (`nexus_tls_reloads_total{outcome}`).
    pub fn spawn_reloader(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                #[cfg(unix)]
                let forced = match hup.as_mut() {
                    Some(h) => tokio::select! {
                        _ = h.recv() => true,
                        () = tokio::time::sleep(RELOAD_POLL) => false,
                    },
                    None => {
                        tokio::time::sleep(RELOAD_POLL).await;
                        false
                    }
                };
                #[cfg(not(unix))]
                let forced = {
                    tokio::time::sleep(RELOAD_POLL).await;
                    false
                };
                let Some(server) = me.upgrade() else { return };
                match server.reload(forced) {
                    Ok(true) => {
                        crate::static_counter!("nexus_tls_reloads_total", "outcome" => "reloaded")
                            .increment(1);
                        tracing::info!(cert = %server.files.cert.display(), "TLS certificate reloaded");
                    }
                    Ok(false) => {}
                    Err(e) => {
                        crate::static_counter!("nexus_tls_reloads_total", "outcome" => "refused")
                            .increment(1);
                        tracing::error!(error = %e, "new TLS certificate refused; still serving the previous one");
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_testkit::certs::{ca, leaf, Use};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Certificates replaced on disk and reloaded while clients keep
    /// fetching, over kept-alive and over new connections: no request
    /// fails, and new connections get the new certificate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotation_under_load_fails_no_request() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let issuer = ca(d, "ca");
        leaf(d, "old", &issuer, vec![], Use::Server);
        leaf(d, "new", &issuer, vec![], Use::Server);
        let files = TlsFiles {
            cert: d.join("served.pem"),
            key: d.join("served-key.pem"),
        };
        std::fs::copy(d.join("old.pem"), &files.cert).unwrap();
        std::fs::copy(d.join("old-key.pem"), &files.key).unwrap();
        let server = Arc::new(TlsServer::load(files.clone()).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(crate::serve::serve_with(
            listener,
            app,
            crate::serve::Limits::default(),
            Some(server.clone()),
            async {
                let _ = stopped.await;
            },
        ));
        let tls = crate::mtls::ClientTls {
            ca: Some((d.join("ca.pem"), "CA")),
            identity: None,
        };
        let kept =
            crate::outbound::clients_with(Duration::from_secs(5), Duration::from_secs(5), &tls)
                .unwrap()
                .0;
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        let mut load = Vec::new();
        for worker in 0..4 {
            let (ok, failed, kept, tls) = (ok.clone(), failed.clone(), kept.clone(), tls.clone());
            load.push(tokio::spawn(async move {
                while tokio::time::Instant::now() < until {
                    // Half the workers open a connection per request.
                    let client = if worker % 2 == 0 {
                        kept.clone()
                    } else {
                        crate::outbound::clients_with(
                            Duration::from_secs(5),
                            Duration::from_secs(5),
                            &tls,
                        )
                        .unwrap()
                        .0
                    };
                    match client
                        .get(format!("https://127.0.0.1:{}/", addr.port()))
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        std::fs::copy(d.join("new.pem"), &files.cert).unwrap();
        std::fs::copy(d.join("new-key.pem"), &files.key).unwrap();
        assert!(server.reload(true).unwrap(), "the new pair is taken");
        for w in load {
            w.await.unwrap();
        }
        assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed");
        assert!(ok.load(Ordering::Relaxed) > 20, "load ran: {ok:?}");
        let new_leaf = CertificateDer::pem_file_iter(d.join("new.pem"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            server.leaf(),
            new_leaf,
            "new connections get the new certificate"
        );
        // And a new connection is indeed handed it.
        let config = Arc::new(tls.config().unwrap());
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .unwrap();
        let presented = conn.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_eq!(presented, new_leaf);
        let _ = stop.send(());
        let _ = serving.await;
    }
}
