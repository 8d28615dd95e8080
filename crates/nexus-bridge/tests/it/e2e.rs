//! End to end: the real OpenID provider (oidc-provider from npm) with its
//! scope-enforcing resource API, the broker and the gateway on loopback, and
//! an agent using the bridge's client. Skipped with one line when Node or the
//! peer's packages are missing, except under CI.

use std::time::{Duration, Instant};

use nexus_bridge::{Bridge, BridgeError, ConnectionRequest, RequiredScopes};
use nexus_broker::config::{BrokerConfig, Settings};
use nexus_broker::server::Broker;
use nexus_gateway::{GatewayConfig, GatewayServer, GatewaySettings};
use nexus_testkit::{browser, client, consent, q, OidcPeer};
use serde_json::{json, Value};

const API_KEY: &str = "bridge-e2e-admin-key-0123456789";

struct Stack {
    broker: String,
    gateway: String,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    _dir: tempfile::TempDir,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Stack {
    async fn start(gateway_port: u16) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let gateway = format!("http://127.0.0.1:{gateway_port}");
        let settings = Settings {
            database_url: Some(format!("sqlite:{}", dir.path().join("n.db").display())),
            encryption_key: Some(nexus_broker::vault::generate_key_b64().expose().clone()),
            state_key: Some(nexus_broker::vault::generate_key_b64().expose().clone()),
            api_key: Some(API_KEY.into()),
            broker_addr: Some("127.0.0.1:0".into()),
            base_url: Some(gateway.clone()),
            ..Default::default()
        };
        let broker = Broker::start(BrokerConfig::from_settings(&settings).unwrap())
            .await
            .unwrap();
        let broker_url = format!("http://{}", broker.local_addr());
        let (btx, brx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(broker.run(async {
            let _ = brx.await;
        }));
        let config = GatewayConfig::from_settings(&GatewaySettings {
            broker_url: Some(broker_url.clone()),
            broker_api_key: Some(API_KEY.into()),
            gateway_addr: Some(format!("127.0.0.1:{gateway_port}")),
            ..Default::default()
        })
        .unwrap();
        let metrics = nexus_core::telemetry::metrics_handle();
        let gw = GatewayServer::start(config, metrics.clone()).await.unwrap();
        let (gtx, grx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(gw.run(async {
            let _ = grx.await;
        }));
        Stack {
            broker: broker_url,
            gateway,
            metrics,
            _dir: dir,
            stops: vec![gtx, btx],
        }
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", self.broker))
            .header("x-api-key", API_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.unwrap()
    }

    /// Agent calls the gateway has answered so far (its request metric).
    fn gateway_calls(&self) -> u64 {
        self.metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("nexus_http_requests_total{") && l.contains("route=\"/v1/"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

use nexus_testkit::free_port;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_across_token_lifetimes_scope_loss_and_revocation() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = free_port();
    let gateway = format!("http://127.0.0.1:{port}");
    // Four-second access tokens: the agent runs through several.
    let Some(peer) = OidcPeer::start(
        json!([client(
            "nexus",
            "client_secret_post",
            &format!("{gateway}/auth/callback")
        )]),
        &[("ACCESS_TOKEN_TTL", "4")],
    )
    .await
    else {
        return;
    };
    let s = Stack::start(port).await;
    s.admin(
        reqwest::Method::POST,
        "/providers",
        Some(json!({"profile": {
            "name": "idp", "auth_type": "oauth2", "client_id": "nexus", "client_secret": "nexus-secret",
            "issuer": peer.issuer, "enable_discovery": true,
            "scopes": ["openid", "email", "calendar.read"]
        }})),
    )
    .await;
    let key = s
        .admin(
            reqwest::Method::POST,
            "/agent-keys",
            Some(json!({"name": "e2e agent", "workspaces": ["u1"]})),
        )
        .await["key"]
        .as_str()
        .unwrap()
        .to_string();

    // The agent asks for a connection; a person consents in a browser.
    let bridge = Bridge::builder(&s.gateway, &key).build().unwrap();
    let spec = bridge
        .request_connection(&ConnectionRequest {
            user_id: "u1".into(),
            provider_name: Some("idp".into()),
            return_url: "http://localhost:3000/done".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let back = consent(&browser(), &spec.auth_url, &gateway).await;
    assert_eq!(q(&back, "status").as_deref(), Some("success"), "{back}");
    let id = spec.connection_id.clone();
    bridge
        .wait_for_active(&id, Duration::from_secs(10))
        .await
        .unwrap();

    // Requests across three access-token lifetimes: never a 401.
    let api = bridge.agent_client(&id).build().unwrap();
    let resource = |scope: &str| format!("{}/api/resource?scope={scope}", peer.issuer);
    let mut tokens = std::collections::BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        let r = api
            .get(resource("calendar.read"))
            .with_extension(RequiredScopes(vec!["calendar.read".into()]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "the agent never sees a 401");
        let creds = bridge.token(&id).await.unwrap();
        tokens.insert(creds.secret("access_token").unwrap().expose().to_string());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(tokens.len() >= 3, "{} access tokens used", tokens.len());
    // The access tokens (real ones, from the provider) appear in no metric
    // and in no Debug output of the bridge.
    let metrics = s.metrics.render();
    let creds = bridge.token(&id).await.unwrap();
    let shown = format!("{bridge:?} {creds:?} {api:?}");
    for t in &tokens {
        assert!(!metrics.contains(t.as_str()), "a token in the metrics");
        assert!(!shown.contains(t.as_str()), "a token in Debug output");
    }

    // The person withdraws calendar.read at the provider: the agent's 403 is
    // reported, and the connection shows exactly that scope failing.
    let removed = peer.remove_scope("alice", "nexus", "calendar.read").await;
    assert_eq!(removed["updated"], 1);
    let r = api
        .get(resource("calendar.read"))
        .with_extension(RequiredScopes(vec!["calendar.read".into()]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "returned to the agent");
    let mut conn = Value::Null;
    for _ in 0..100 {
        conn = s
            .admin(reqwest::Method::GET, &format!("/connections/{id}"), None)
            .await;
        if conn["failing_scopes"] == json!(["calendar.read"]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(conn["failing_scopes"], json!(["calendar.read"]), "{conn}");
    assert_eq!(conn["status"], "degraded");
    let r = api.get(resource("email")).send().await.unwrap();
    assert_eq!(r.status(), 200, "other scopes still work");

    // The person revokes the grant: InteractionRequired, and no retry storm.
    peer.revoke_grant("alice", "nexus").await;
    let e = api.get(resource("email")).send().await.unwrap_err();
    assert!(
        matches!(
            BridgeError::of(&e),
            Some(BridgeError::InteractionRequired { .. })
        ),
        "{e}"
    );
    let before = s.gateway_calls();
    for _ in 0..100 {
        let e = api.get(resource("email")).send().await.unwrap_err();
        assert!(matches!(
            BridgeError::of(&e),
            Some(BridgeError::InteractionRequired { .. })
        ));
    }
    let after = s.gateway_calls();
    assert!(
        after - before <= 1,
        "{} gateway calls after revocation",
        after - before
    );
    assert_eq!(
        bridge.check_connection(&id).await.unwrap(),
        "attention_required"
    );
    for stop in s.stops {
        let _ = stop.send(());
    }
}
