//! Mutual TLS: a server that requires client certificates from one CA
//! (optionally with one of a list of identities), the identity a client
//! proved (for the audit), and client configurations that trust an extra CA
//! and present a certificate.
//!
//! An identity is a certificate's URI SAN (a SPIFFE ID such as
//! `spiffe://example.org/nexus/gateway`) or DNS SAN. A client refused for
//! any reason (no certificate, another CA, expired, an identity not
//! allowed) is refused during the handshake, before any request is read,
//! and counted in `nexus_tls_handshake_failures_total{reason}`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

/// What is wrong with a CA file or a client identity.
#[derive(Debug, thiserror::Error)]
#[error("{var} {path}: {reason}")]
pub struct MtlsError {
    /// The setting that names the file.
    pub var: &'static str,
    /// The file.
    pub path: String,
    /// What is wrong.
    pub reason: String,
}

impl MtlsError {
    /// A certificate-and-key error in this shape (`cert_var` for errors
    /// that name no setting).
    fn from_tls(e: crate::tls::TlsError, cert_var: &'static str) -> Self {
        use crate::tls::TlsError;
        match e {
            TlsError::File { var, path, reason } => Self { var, path, reason },
            TlsError::Mismatch {
                cert_var,
                cert,
                key_var,
                key,
            } => Self {
                var: key_var,
                path: key,
                reason: format!("not the key of the certificate in {cert_var} {cert}"),
            },
            TlsError::Validity { var, path, what } => Self {
                var,
                path,
                reason: format!("the certificate {what}"),
            },
            TlsError::Rustls(e) => Self {
                var: cert_var,
                path: String::new(),
                reason: e.to_string(),
            },
            TlsError::ClientCa(e) => e,
        }
    }

    fn new(var: &'static str, path: &Path, reason: impl Into<String>) -> Self {
        Self {
            var,
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// Client certificates a server requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    /// PEM file of the CA(s) that issue client certificates.
    pub ca: PathBuf,
    /// The setting naming `ca`, for errors.
    pub ca_var: &'static str,
    /// Identities (URI or DNS SANs) allowed; empty: any certificate the CA issued.
    pub allowed: Vec<String>,
}

impl ClientAuth {
    /// The client certificates a server requires, from its CA setting and
    /// its identities setting (comma-separated): neither given is `None`;
    /// identities need the CA, and the CA needs `TLS_CERT_FILE`.
    pub fn from_values(
        v: &crate::settings::Values,
        ca: &crate::settings::Setting,
        ids: &crate::settings::Setting,
    ) -> Result<Option<Self>, crate::ConfigError> {
        let allowed: Vec<String> = v
            .given(ids)
            .map(|l| {
                l.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        match v.given(ca) {
            None if !allowed.is_empty() => Err(crate::ConfigError::new(
                ids.name,
                format!("needs {} (the CA that issues those certificates)", ca.name),
            )),
            None => Ok(None),
            Some(_) if v.given(&crate::tls::TLS_CERT_FILE).is_none() => Err(crate::ConfigError::new(
                ca.name,
                "needs TLS_CERT_FILE and TLS_KEY_FILE: client certificates are asked for in a TLS handshake",
            )),
            Some(path) => Ok(Some(Self {
                ca: path.into(),
                ca_var: ca.name,
                allowed,
            })),
        }
    }
}

/// Reads every certificate of a PEM file (at least one).
pub fn read_certs(
    path: &Path,
    var: &'static str,
) -> Result<Vec<CertificateDer<'static>>, MtlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| MtlsError::new(var, path, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| MtlsError::new(var, path, e.to_string()))?;
    if certs.is_empty() {
        return Err(MtlsError::new(var, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn roots(
    path: &Path,
    var: &'static str,
    start: rustls::RootCertStore,
) -> Result<rustls::RootCertStore, MtlsError> {
    let mut roots = start;
    for cert in read_certs(path, var)? {
        roots
            .add(cert)
            .map_err(|e| MtlsError::new(var, path, format!("not a usable CA certificate ({e})")))?;
    }
    Ok(roots)
}

/// The verifier a server uses for [`ClientAuth`].
pub fn client_verifier(auth: &ClientAuth) -> Result<Arc<dyn ClientCertVerifier>, MtlsError> {
    let roots = roots(&auth.ca, auth.ca_var, rustls::RootCertStore::empty())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| MtlsError::new(auth.ca_var, &auth.ca, e.to_string()))?;
    Ok(Arc::new(IdentityVerifier {
        inner,
        allowed: auth.allowed.clone(),
    }))
}

/// The CA's chain check, then the identity check.
#[derive(Debug)]
struct IdentityVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for IdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed.is_empty()
            || identities(end_entity)
                .iter()
                .any(|id| self.allowed.contains(id))
        {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A certificate's identities: URI SANs first, then DNS SANs.
pub fn identities(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let Ok(cert) = x509_cert::Certificate::from_der(cert) else {
        return Vec::new();
    };
    let Ok(Some((_, san))) = cert.tbs_certificate.get::<SubjectAltName>() else {
        return Vec::new();
    };
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    for name in san.0 {
        match name {
            GeneralName::UniformResourceIdentifier(u) => uris.push(u.as_str().to_string()),
            GeneralName::DnsName(d) => dns.push(d.as_str().to_string()),
            _ => {}
        }
    }
    uris.extend(dns);
    uris
}

/// The identity a client proved on a connection (its certificate's first
/// URI SAN, else first DNS SAN), put in each request's extensions by the
/// serving loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub Arc<str>);

/// Why a handshake failed, as a metric label.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::NoCertificatesPresented) => "no_client_certificate",
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_issuer",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::ApplicationVerificationFailure => "identity_not_allowed",
            _ => "bad_certificate",
        },
        Some(_) => "protocol",
        None => "io",
    }
}

/// A file and the setting that names it (for errors).
pub type NamedFile = (PathBuf, &'static str);

/// What a client trusts and presents.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// An extra CA (PEM) trusted beside the public roots, and its setting.
    pub ca: Option<NamedFile>,
    /// A certificate chain and key to present: paths and their settings.
    pub identity: Option<(NamedFile, NamedFile)>,
}

impl ClientTls {
    /// A rustls client configuration: public roots plus the extra CA, TLS
    /// 1.2+, and the client certificate if any (checked: readable, and the
    /// key is the certificate's).
    pub fn config(&self) -> Result<rustls::ClientConfig, MtlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut store = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some((path, var)) = &self.ca {
            store = roots(path, var, store)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| MtlsError::new("TLS", Path::new("-"), e.to_string()))?
            .with_root_certificates(store);
        let Some(((cert, cert_var), (key, key_var))) = &self.identity else {
            return Ok(builder.with_no_client_auth());
        };
        let identity = ReloadingIdentity::load(
            crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            },
            (cert_var, key_var),
        )?;
        let mut config = builder.with_client_cert_resolver(Arc::new(identity));
        // A resumed session presents no certificate: the server would see
        // the one the first session proved, not a replacement (servers that
        // require client certificates refuse resumption anyway, see
        // `tls::TlsServer::load_with`).
        config.resumption = rustls::client::Resumption::disabled();
        Ok(config)
    }
}

/// How often, at most, a client certificate's files are looked at (on a new
/// handshake; pooled connections keep the certificate they started with).
const IDENTITY_RECHECK: Duration = Duration::from_secs(1);

/// A client certificate and key, read again when their files change: short-lived
/// certificates (a SPIFFE SVID lasts an hour) are replaced on disk by their
/// issuer while the process runs. The files are looked at on a new TLS
/// handshake, at most once a second; a bad new pair is refused (logged and
/// counted in `nexus_tls_client_reloads_total{outcome}`) and the old one kept.
#[derive(Debug)]
struct ReloadingIdentity {
    files: crate::tls::TlsFiles,
    vars: (&'static str, &'static str),
    state: Mutex<IdentityState>,
}

#[derive(Debug)]
struct IdentityState {
    current: Arc<CertifiedKey>,
    stamp: Option<crate::tls::Stamp>,
    checked: Instant,
}

impl ReloadingIdentity {
    /// Reads and checks the pair (readable, matching, valid now).
    fn load(
        files: crate::tls::TlsFiles,
        vars: (&'static str, &'static str),
    ) -> Result<Self, MtlsError> {
        let stamp = crate::tls::stamp(&files);
        let pair = crate::tls::load_pair_as(&files, vars, SystemTime::now())
            .map_err(|e| MtlsError::from_tls(e, vars.0))?;
        Ok(Self {
            files,
            vars,
            state: Mutex::new(IdentityState {
                current: Arc::new(pair),
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    /// The pair to present now, reloaded first if the files changed.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.checked.elapsed() >= IDENTITY_RECHECK {
            st.checked = Instant::now();
            let stamp = crate::tls::stamp(&self.files);
            if stamp != st.stamp {
                // Remembered either way: a bad pair is reported once.
                st.stamp = stamp;
                match crate::tls::load_pair_as(&self.files, self.vars, SystemTime::now()) {
                    Ok(pair) => {
                        st.current = Arc::new(pair);
                        crate::static_counter!("nexus_tls_client_reloads_total", "outcome" => "reloaded")
                            .increment(1);
                        tracing::info!(cert = %self.files.cert.display(), "client certificate reloaded");
                    }
                    Err(e) => {
                        crate::static_counter!("nexus_tls_client_reloads_total", "outcome" => "refused")
                            .increment(1);
                        tracing::error!(error = %e, "new client certificate refused; still presenting the previous one");
                    }
                }
            }
        }
        st.current.clone()
    }
}

impl rustls::client::ResolvesClientCert for ReloadingIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        let pair = self.current();
        // Presented only if the server accepts a signature this key makes.
        pair.key.choose_scheme(sigschemes).map(|_| pair)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_testkit::certs::{ca, leaf, uri, Use};

    fn copy_pair(d: &Path, from: &str, to: &str) {
        // Key first, then the certificate, as an issuer rewriting files does.
        std::fs::copy(
            d.join(format!("{from}-key.pem")),
            d.join(format!("{to}-key.pem")),
        )
        .unwrap();
        std::fs::copy(d.join(format!("{from}.pem")), d.join(format!("{to}.pem"))).unwrap();
    }

    /// A client certificate replaced on disk is presented on the next new
    /// connection without a restart; an expired replacement is refused and
    /// the previous certificate kept.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_certificate_follows_its_files() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let issuer = ca(d, "ca");
        leaf(d, "server", &issuer, vec![], Use::Server);
        leaf(
            d,
            "first",
            &issuer,
            vec![uri("spiffe://t/first")],
            Use::Client,
        );
        leaf(
            d,
            "second",
            &issuer,
            vec![uri("spiffe://t/second")],
            Use::Client,
        );
        leaf(
            d,
            "expired",
            &issuer,
            vec![uri("spiffe://t/expired")],
            Use::ExpiredClient,
        );
        let auth = ClientAuth {
            ca: d.join("ca.pem"),
            ca_var: "CA",
            allowed: vec![],
        };
        let server = Arc::new(
            crate::tls::TlsServer::load_with(
                crate::tls::TlsFiles {
                    cert: d.join("server.pem"),
                    key: d.join("server-key.pem"),
                },
                Some(&auth),
            )
            .unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}/",
            listener.local_addr().unwrap().port()
        );
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(|req: axum::extract::Request| async move {
                req.extensions()
                    .get::<PeerIdentity>()
                    .map(|p| p.0.to_string())
                    .unwrap_or_default()
            }),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(crate::serve::serve_with(
            listener,
            app,
            crate::serve::Limits::default(),
            Some(server),
            async {
                let _ = stopped.await;
            },
        ));
        copy_pair(d, "first", "presented");
        let tls = ClientTls {
            ca: Some((d.join("ca.pem"), "CA")),
            identity: Some((
                (d.join("presented.pem"), "CERT"),
                (d.join("presented-key.pem"), "KEY"),
            )),
        };
        let client =
            crate::outbound::clients_with(Duration::from_secs(5), Duration::from_secs(5), &tls)
                .unwrap()
                .0;
        // `Connection: close`: every call is a new connection, a new handshake.
        let who = || async {
            let r = client
                .get(&url)
                .header("connection", "close")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        };
        assert_eq!(who().await, "spiffe://t/first");

        copy_pair(d, "second", "presented");
        tokio::time::sleep(IDENTITY_RECHECK + Duration::from_millis(200)).await;
        assert_eq!(
            who().await,
            "spiffe://t/second",
            "the new certificate is presented"
        );

        copy_pair(d, "expired", "presented");
        tokio::time::sleep(IDENTITY_RECHECK + Duration::from_millis(200)).await;
        assert_eq!(
            who().await,
            "spiffe://t/second",
            "an expired replacement is refused, the previous certificate kept"
        );

        // At start, the same expired pair is a configuration error naming
        // the setting.
        let e = tls.config().unwrap_err();
        assert_eq!(e.var, "CERT");
        assert!(e.reason.contains("expired"), "{e}");
        let _ = stop.send(());
        serving.await.unwrap().unwrap();
    }
}
