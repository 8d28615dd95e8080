//! Mutual TLS: a broker that requires client certificates from one CA with
//! one identity (BROKER_CLIENT_CA_FILE, BROKER_CLIENT_IDS) refuses every
//! other client at the handshake, counts each refusal by reason, and
//! records the identity of the accepted one in the audit log beside the
//! API key's actor.

use std::path::Path;

use nexus_core::mtls::ClientTls;
use nexus_testkit::certs::{ca, leaf, uri, Use};
use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{counter, test_settings, Backend, TestBroker, TestDb};

const GATEWAY_ID: &str = "spiffe://nexus.test/nexus/gateway";

fn client(dir: &Path, identity: Option<&str>) -> reqwest::Client {
    let tls = ClientTls {
        ca: Some((dir.join("ca.pem"), "TEST_CA")),
        identity: identity.map(|n| {
            (
                (dir.join(format!("{n}.pem")), "TEST_CERT"),
                (dir.join(format!("{n}-key.pem")), "TEST_KEY"),
            )
        }),
    };
    nexus_core::outbound::clients_with(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_secs(5),
        &tls,
    )
    .unwrap()
    .0
}

/// A client that presents `name`'s certificate whatever it is: our own
/// client configuration refuses to present an expired one, but a careless
/// or hostile client does.
fn unchecked_client(dir: &Path, name: &str) -> reqwest::Client {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(dir.join(format!("{name}.pem")))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}-key.pem"))).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .build()
        .unwrap()
}

fn refusals(reason: &str) -> f64 {
    counter(&format!(
        "nexus_tls_handshake_failures_total{{reason=\"{reason}\"}}"
    ))
}

async fn mutual_tls_refuses_at_the_handshake_and_audits_the_identity(b: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let trusted = ca(d, "ca");
    let other = ca(d, "other-ca");
    leaf(d, "server", &trusted, vec![], Use::Server);
    leaf(d, "gateway", &trusted, vec![uri(GATEWAY_ID)], Use::Client);
    leaf(
        d,
        "intruder",
        &trusted,
        vec![uri("spiffe://nexus.test/other")],
        Use::Client,
    );
    leaf(
        d,
        "expired",
        &trusted,
        vec![uri(GATEWAY_ID)],
        Use::ExpiredClient,
    );
    leaf(d, "foreign", &other, vec![uri(GATEWAY_ID)], Use::Client);

    let db = TestDb::new(&b).await;
    let mut settings = test_settings(&db);
    settings.tls_cert_file = Some(d.join("server.pem").display().to_string());
    settings.tls_key_file = Some(d.join("server-key.pem").display().to_string());
    settings.broker_client_ca_file = Some(d.join("ca.pem").display().to_string());
    settings.broker_client_ids = Some(format!("{GATEWAY_ID}, unused.example"));
    let t = TestBroker::start_on(db, settings).await;
    let base = t.base.replace("http://", "https://");
    let get = |c: reqwest::Client, path: &'static str| {
        let (url, key) = (format!("{base}{path}"), t.api_key.clone());
        async move { c.get(url).header("x-api-key", key).send().await }
    };

    // The gateway's certificate: served, and its identity audited.
    let gw = client(d, Some("gateway"));
    let r = get(gw.clone(), "/providers").await.expect("accepted");
    assert_eq!(r.status(), StatusCode::OK);
    let r = gw
        .post(format!("{base}/providers"))
        .header("x-api-key", &t.api_key)
        .json(&serde_json::json!({"profile": crate::providers::oauth_profile("k")}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().await.unwrap()
    );
    let path = "/audit?event_type=provider.created";
    let audit = crate::harness::eventually(
        || async {
            get(gw.clone(), path)
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        },
        |a| a["count"] == 1,
    )
    .await;
    assert_eq!(audit["events"][0]["client_identity"], GATEWAY_ID, "{audit}");
    assert_eq!(
        audit["events"][0]["actor"], "admin",
        "the key's actor stays"
    );

    // Every other client is refused during the handshake: no answer at all.
    for (who, reason) in [
        (None, "no_client_certificate"),
        (Some("foreign"), "unknown_issuer"),
        (Some("expired"), "expired"),
        (Some("intruder"), "identity_not_allowed"),
    ] {
        let before = refusals(reason);
        let c = match who {
            Some("expired") => unchecked_client(d, "expired"),
            _ => client(d, who),
        };
        let answer = get(c, "/health").await;
        assert!(answer.is_err(), "{who:?} refused, not answered: {answer:?}");
        crate::harness::wait_until(|| refusals(reason) > before).await;
        assert!(refusals(reason) > before, "{who:?} counted as {reason}");
    }
    // The key is still required with a good certificate.
    let r = gw.get(format!("{base}/providers")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    t.finish().await;
}

crate::harness::backend_tests!(mutual_tls_refuses_at_the_handshake_and_audits_the_identity);
