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
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

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
        let chain = read_certs(cert, cert_var)?;
        let private = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| MtlsError::new(key_var, key, e.to_string()))?;
        builder
            .with_client_auth_cert(chain, private)
            .map_err(|e| MtlsError::new(key_var, key, format!("not the key of {cert_var} ({e})")))
    }
}
