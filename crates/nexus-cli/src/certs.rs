//! `nexus certs dev`: a development CA and certificates for the broker,
//! the gateway, the sidecar and a client, in the state folder's `certs/`.
//! For a laptop or a test rig only: production brings its own certificates
//! (cert-manager, a SPIFFE issuer, a corporate CA).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// How long development certificates last.
const VALID_DAYS: i64 = 90;

/// The files of one certificate.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM, mode 0600).
    pub key: PathBuf,
}

/// What `certs dev` wrote.
#[derive(Debug, Clone)]
pub struct DevCerts {
    /// The CA certificate clients trust.
    pub ca: PathBuf,
    /// Server certificates (localhost, 127.0.0.1, ::1).
    pub broker: Pair,
    /// The gateway's server certificate.
    pub gateway: Pair,
    /// The sidecar's server certificate.
    pub sidecar: Pair,
    /// A client certificate for the gateway calling the broker
    /// (URI SAN `spiffe://nexus.local/nexus/gateway`).
    pub gateway_client: Pair,
}

impl DevCerts {
    /// The files under `dir` (whether or not they exist).
    pub fn at(dir: &Path) -> Self {
        let pair = |n: &str| Pair {
            cert: dir.join(format!("{n}.pem")),
            key: dir.join(format!("{n}-key.pem")),
        };
        Self {
            ca: dir.join("ca.pem"),
            broker: pair("broker"),
            gateway: pair("gateway"),
            sidecar: pair("sidecar"),
            gateway_client: pair("gateway-client"),
        }
    }

    /// Whether every file is there.
    pub fn exist(&self) -> bool {
        [
            &self.broker,
            &self.gateway,
            &self.sidecar,
            &self.gateway_client,
        ]
        .iter()
        .all(|p| p.cert.exists() && p.key.exists())
            && self.ca.exists()
    }
}

fn write(path: &Path, text: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let _ = secret;
    let mut f = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    // An hour back: clocks of the machines using them differ a little.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(VALID_DAYS);
}

/// Writes a fresh CA and certificates into `dir` (created if needed).
pub fn generate(dir: &Path) -> Result<DevCerts> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = DevCerts::at(dir);
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "Nexus development CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    write(&files.ca, &ca.pem(), false)?;

    let server = |name: &str, pair: &Pair| -> Result<()> {
        let mut p = CertificateParams::new(vec!["localhost".to_string()])?;
        p.subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        p.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        p.distinguished_name
            .push(DnType::CommonName, format!("nexus {name} (development)"));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut p);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca)?;
        write(&pair.cert, &cert.pem(), false)?;
        write(&pair.key, &key.serialize_pem(), true)
    };
    server("broker", &files.broker)?;
    server("gateway", &files.gateway)?;
    server("sidecar", &files.sidecar)?;

    let mut client = CertificateParams::default();
    client.subject_alt_names = vec![SanType::URI(
        "spiffe://nexus.local/nexus/gateway".try_into()?,
    )];
    client
        .distinguished_name
        .push(DnType::CommonName, "nexus gateway client (development)");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut client);
    let key = KeyPair::generate()?;
    let cert = client.signed_by(&key, &ca)?;
    write(&files.gateway_client.cert, &cert.pem(), false)?;
    write(&files.gateway_client.key, &key.serialize_pem(), true)?;
    Ok(files)
}

/// What to set to use them, one block per part.
pub fn env_lines(c: &DevCerts) -> String {
    let d = |p: &Path| p.display().to_string();
    format!(
        "# broker (mutual TLS: only the gateway's certificate gets in)\nTLS_CERT_FILE={}\nTLS_KEY_FILE={}\n\
         BROKER_CLIENT_CA_FILE={}\nBROKER_CLIENT_IDS=spiffe://nexus.local/nexus/gateway\n\
         # gateway\nTLS_CERT_FILE={}\nTLS_KEY_FILE={}\n\
         BROKER_CA_FILE={}\nBROKER_CLIENT_CERT_FILE={}\nBROKER_CLIENT_KEY_FILE={}\n\
         # sidecar\nTLS_CERT_FILE={}\nTLS_KEY_FILE={}\nGATEWAY_CA_FILE={}\n\
         # other clients (curl --cacert, the bridge's gateway_ca_pem): trust\n{}\n",
        d(&c.broker.cert),
        d(&c.broker.key),
        d(&c.ca),
        d(&c.gateway.cert),
        d(&c.gateway.key),
        d(&c.ca),
        d(&c.gateway_client.cert),
        d(&c.gateway_client.key),
        d(&c.sidecar.cert),
        d(&c.sidecar.key),
        d(&c.ca),
        d(&c.ca),
    )
}
