//! The gateway calling a broker that requires client certificates: with its
//! certificate (BROKER_CA_FILE, BROKER_CLIENT_CERT_FILE,
//! BROKER_CLIENT_KEY_FILE) it serves agents; without one the broker refuses
//! it at the handshake and the gateway says it is not ready.

use std::path::{Path, PathBuf};

use nexus_core::mtls::{ClientAuth, ClientTls};
use nexus_core::tls::TlsFiles;
use nexus_testkit::certs::{ca, leaf, uri, Use};
use reqwest::{Method, StatusCode};

use crate::harness::Stack;

pub const GATEWAY_ID: &str = "spiffe://nexus.test/nexus/gateway";

/// A CA, the broker's server certificate and the gateway's client
/// certificate (identity [`GATEWAY_ID`]) in `dir`.
pub fn certificates(dir: &Path) -> PathBuf {
    let trusted = ca(dir, "ca");
    leaf(dir, "broker", &trusted, vec![], Use::Server);
    leaf(dir, "gateway", &trusted, vec![uri(GATEWAY_ID)], Use::Client);
    dir.to_path_buf()
}

/// Tuning for [`Stack::start_tuned`]: the broker serves TLS and requires
/// the gateway's certificate; the gateway trusts the CA and, `with_cert`,
/// presents its certificate.
pub fn mutual_tls(
    d: &Path,
    with_cert: bool,
) -> impl FnOnce(&mut nexus_broker::config::BrokerConfig, &mut nexus_gateway::GatewayConfig) {
    let d = d.to_path_buf();
    move |b, g| {
        b.tls = Some(TlsFiles {
            cert: d.join("broker.pem"),
            key: d.join("broker-key.pem"),
        });
        b.client_auth = Some(ClientAuth {
            ca: d.join("ca.pem"),
            ca_var: "BROKER_CLIENT_CA_FILE",
            allowed: vec![GATEWAY_ID.into()],
        });
        g.broker_tls = ClientTls {
            ca: Some((d.join("ca.pem"), "BROKER_CA_FILE")),
            identity: with_cert.then(|| {
                (
                    (d.join("gateway.pem"), "BROKER_CLIENT_CERT_FILE"),
                    (d.join("gateway-key.pem"), "BROKER_CLIENT_KEY_FILE"),
                )
            }),
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reaches_a_mutual_tls_broker_with_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = certificates(dir.path());
    let s = Stack::start_tuned(0, "", false, mutual_tls(&d, true)).await;
    assert!(s.broker.starts_with("https://"));
    let (status, ready) = s.call(None, Method::GET, "/ready", None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    s.weather().await;
    let (_, key) = s.agent_key(&["u1"]).await;
    let id = s.connect(&key, "u1").await;
    let (status, tok) = s
        .call(Some(&key), Method::GET, &format!("/v1/token/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{tok}");
    // The credential capture went through the gateway: the broker audited
    // the gateway's certificate identity beside the actor.
    let (_, audit) = s
        .admin(Method::GET, "/audit?event_type=connection.active", None)
        .await;
    assert_eq!(audit["events"][0]["client_identity"], GATEWAY_ID, "{audit}");
    s.stop().await;

    // Without its certificate the gateway cannot reach the broker.
    let s = Stack::start_tuned(0, "", false, mutual_tls(&d, false)).await;
    let (status, body) = s.call(None, Method::GET, "/ready", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    s.stop().await;
}

/// Agents to a gateway that requires client certificates
/// (GATEWAY_CLIENT_CA_FILE, GATEWAY_CLIENT_IDS): the bridge presents its
/// certificate over REST and gRPC and gets the gateway's answers; without
/// it, or with another identity, it is refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_present_client_certificates_to_a_gateway_that_requires_them() {
    const AGENT_ID: &str = "spiffe://nexus.test/agents/billing";
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let trusted = ca(&d, "ca");
    leaf(&d, "gateway-server", &trusted, vec![], Use::Server);
    leaf(&d, "agent", &trusted, vec![uri(AGENT_ID)], Use::Client);
    leaf(
        &d,
        "other",
        &trusted,
        vec![uri("spiffe://nexus.test/agents/other")],
        Use::Client,
    );
    let tune = {
        let d = d.clone();
        move |_: &mut nexus_broker::config::BrokerConfig, g: &mut nexus_gateway::GatewayConfig| {
            g.tls = Some(TlsFiles {
                cert: d.join("gateway-server.pem"),
                key: d.join("gateway-server-key.pem"),
            });
            g.client_auth = Some(ClientAuth {
                ca: d.join("ca.pem"),
                ca_var: "GATEWAY_CLIENT_CA_FILE",
                allowed: vec![AGENT_ID.into()],
            });
        }
    };
    let s = Stack::start_tuned(0, "", false, tune).await;
    assert!(s.gateway.starts_with("https://"), "{}", s.gateway);
    let (_, key) = s.agent_key(&["u1"]).await;
    let ca_pem = std::fs::read(d.join("ca.pem")).unwrap();
    let identity = |name: &str| nexus_bridge::gateway::ClientIdentityPem {
        cert: std::fs::read(d.join(format!("{name}.pem"))).unwrap(),
        key: nexus_bridge::Secret::new(
            std::fs::read_to_string(d.join(format!("{name}-key.pem"))).unwrap(),
        ),
    };
    let client = |id: Option<nexus_bridge::gateway::ClientIdentityPem>| {
        nexus_bridge::GatewayClient::with_tls(
            &s.gateway,
            nexus_bridge::Secret::new(key.clone()),
            false,
            std::time::Duration::from_secs(5),
            &ca_pem,
            id,
        )
        .unwrap()
    };
    // The gateway answered (an unknown connection), over REST and gRPC.
    let rest = client(Some(identity("agent")));
    let answer = rest.check_connection("no-such-connection").await;
    assert!(
        matches!(answer, Err(nexus_bridge::BridgeError::NotFound(_))),
        "{answer:?}"
    );
    let grpc = rest
        .clone()
        .over_grpc(std::time::Duration::from_secs(5))
        .unwrap();
    let answer = grpc.check_connection("no-such-connection").await;
    assert!(
        matches!(answer, Err(nexus_bridge::BridgeError::NotFound(_))),
        "{answer:?}"
    );
    // Without a certificate, or with another identity: no answer at all.
    for id in [None, Some(identity("other"))] {
        let answer = client(id).check_connection("no-such-connection").await;
        assert!(
            !matches!(answer, Err(nexus_bridge::BridgeError::NotFound(_)) | Ok(_)),
            "refused: {answer:?}"
        );
    }
    s.stop().await;
}
