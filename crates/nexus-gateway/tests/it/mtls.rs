//! The gateway calling a broker that requires client certificates: with its
//! certificate (BROKER_CA_FILE, BROKER_CLIENT_CERT_FILE,
//! BROKER_CLIENT_KEY_FILE) it serves agents; without one the broker refuses
//! it at the handshake and the gateway says it is not ready.

use nexus_core::mtls::{ClientAuth, ClientTls};
use nexus_core::tls::TlsFiles;
use nexus_testkit::certs::{ca, leaf, uri, Use};
use reqwest::{Method, StatusCode};

use crate::harness::Stack;

const GATEWAY_ID: &str = "spiffe://nexus.test/nexus/gateway";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reaches_a_mutual_tls_broker_with_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let trusted = ca(&d, "ca");
    leaf(&d, "broker", &trusted, vec![], Use::Server);
    leaf(&d, "gateway", &trusted, vec![uri(GATEWAY_ID)], Use::Client);
    let mtls = |with_cert: bool| {
        let d = d.clone();
        move |b: &mut nexus_broker::config::BrokerConfig, g: &mut nexus_gateway::GatewayConfig| {
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
    };
    let s = Stack::start_tuned(0, "", false, mtls(true)).await;
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
    let s = Stack::start_tuned(0, "", false, mtls(false)).await;
    let (status, body) = s.call(None, Method::GET, "/ready", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    s.stop().await;
}
