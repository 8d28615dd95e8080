//! Certificates for TLS tests (rcgen): CAs and leaves written as PEM files.

use std::path::Path;

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};

pub use rcgen::SanType as San;

/// A CA, written to `<dir>/<name>.pem`.
pub type Ca = CertifiedIssuer<'static, KeyPair>;

/// A new CA written to `<dir>/<name>.pem`.
pub fn ca(dir: &Path, name: &str) -> Ca {
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name.push(DnType::CommonName, name);
    let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), ca.pem()).unwrap();
    ca
}

/// What a leaf certificate is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// A server on 127.0.0.1.
    Server,
    /// A client.
    Client,
    /// A client whose certificate expired in 2021.
    ExpiredClient,
}

/// A leaf signed by `ca` into `<dir>/<name>.pem` and `<dir>/<name>-key.pem`.
pub fn leaf(dir: &Path, name: &str, ca: &Ca, sans: Vec<SanType>, usage: Use) {
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans;
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![if usage == Use::Server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    if usage == Use::Server {
        p.subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
    }
    if usage == Use::ExpiredClient {
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2021, 1, 1);
    }
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, ca).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
}

/// A URI SAN (e.g. a SPIFFE ID).
pub fn uri(u: &str) -> SanType {
    SanType::URI(u.try_into().unwrap())
}
