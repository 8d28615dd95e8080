//! A broker and a gateway on loopback; agent keys; a static-credential
//! connection made through the gateway's public capture route.

use std::time::Duration;

use nexus_broker::config::{BrokerConfig, Settings};
use nexus_broker::server::Broker;
use nexus_gateway::{GatewayConfig, GatewayServer, GatewaySettings};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::oneshot;

pub const RETURN_URL: &str = "http://localhost:3000/done";

pub struct Stack {
    /// Broker base URL (admin API).
    pub broker: String,
    /// Gateway base URL.
    pub gateway: String,
    pub api_key: String,
    pub client: reqwest::Client,
    pub broker_state: nexus_broker::api::AppState,
    /// The gateway's state (its token cache).
    pub gw: std::sync::Arc<nexus_gateway::core::Gateway>,
    _dir: tempfile::TempDir,
    stops: Vec<oneshot::Sender<()>>,
}

pub use nexus_testkit::free_port;

impl Stack {
    /// Starts both; `gateway_port` fixed (0 = any), CORS origins as given.
    pub async fn start(gateway_port: u16, cors: &str) -> Stack {
        Self::start_mode(gateway_port, cors, false).await
    }

    /// With `in_process`, the gateway calls the broker's router directly (as
    /// under `nexus up`) instead of over loopback HTTP.
    pub async fn start_mode(gateway_port: u16, cors: &str, in_process: bool) -> Stack {
        Self::start_tuned(gateway_port, cors, in_process, |_, _| {}).await
    }

    /// Like [`Stack::start_mode`], adjusting both configurations.
    pub async fn start_tuned(
        gateway_port: u16,
        cors: &str,
        in_process: bool,
        tune: impl FnOnce(&mut BrokerConfig, &mut GatewayConfig),
    ) -> Stack {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let gport = if gateway_port == 0 {
            free_port()
        } else {
            gateway_port
        };
        let api_key = format!("gw-test-admin-key-{}", uuid::Uuid::new_v4().simple());
        let settings = Settings {
            database_url: Some(format!("sqlite:{}", dir.path().join("n.db").display())),
            encryption_key: Some(nexus_broker::vault::generate_key_b64().expose().clone()),
            state_key: Some(nexus_broker::vault::generate_key_b64().expose().clone()),
            api_key: Some(api_key.clone()),
            broker_addr: Some("127.0.0.1:0".into()),
            // Providers send browsers to the gateway, which forwards to the broker.
            base_url: Some(format!("http://127.0.0.1:{gport}")),
            refresh_worker: Some("false".into()),
            ..Default::default()
        };
        let mut bconfig = BrokerConfig::from_settings(&settings).unwrap();
        let mut gconfig = GatewayConfig::from_settings(&GatewaySettings {
            broker_url: Some("http://127.0.0.1:1".into()),
            broker_api_key: Some(api_key.clone()),
            gateway_addr: Some(format!("127.0.0.1:{gport}")),
            cors_allowed_origins: Some(cors.into()),
            ..Default::default()
        })
        .unwrap();
        gconfig.key_cache_ttl = Duration::from_millis(300);
        tune(&mut bconfig, &mut gconfig);
        let scheme = if bconfig.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let gscheme = if gconfig.tls.is_some() {
            "https"
        } else {
            "http"
        };
        // A test acting as operator against a broker that wants client
        // certificates presents the gateway's.
        let client = if gconfig.broker_tls == nexus_core::mtls::ClientTls::default() {
            reqwest::Client::new()
        } else {
            nexus_core::outbound::clients_with(
                Duration::from_secs(10),
                Duration::from_secs(10),
                &gconfig.broker_tls,
            )
            .unwrap()
            .0
        };
        let broker = Broker::start(bconfig).await.unwrap();
        let broker_url = format!("{scheme}://{}", broker.local_addr());
        let broker_state = broker.state().clone();
        let local = in_process.then(|| {
            nexus_gateway::broker::BrokerClient::local(
                nexus_broker::api::router(broker_state.clone()),
                broker_state.config().api_key.clone(),
            )
        });
        let (btx, brx) = oneshot::channel::<()>();
        tokio::spawn(broker.run(async {
            let _ = brx.await;
        }));
        gconfig.broker_url = broker_url.parse().unwrap();
        let gw = GatewayServer::start_with(gconfig, nexus_core::telemetry::metrics_handle(), local)
            .await
            .unwrap();
        let gateway = format!("{gscheme}://{}", gw.local_addr());
        let gw_state = gw.gateway().clone();
        let (gtx, grx) = oneshot::channel::<()>();
        tokio::spawn(gw.run(async {
            let _ = grx.await;
        }));
        Stack {
            broker: broker_url,
            gateway,
            api_key,
            client,
            broker_state,
            gw: gw_state,
            _dir: dir,
            stops: vec![gtx, btx],
        }
    }

    /// Stops the broker only (the gateway goes on without it).
    pub fn stop_broker(&mut self) {
        if let Some(b) = self.stops.pop() {
            let _ = b.send(());
        }
    }

    /// The gateway's OpenAPI document.
    pub async fn openapi(&self) -> Value {
        self.client
            .get(format!("{}/openapi.json", self.gateway))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
    }

    /// A broker admin call.
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.broker))
            .header("x-api-key", &self.api_key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let s = resp.status();
        (s, resp.json().await.unwrap_or(Value::Null))
    }

    /// A new agent key for `workspaces`.
    pub async fn agent_key(&self, workspaces: &[&str]) -> (String, String) {
        let (s, k) = self
            .admin(
                Method::POST,
                "/agent-keys",
                Some(json!({"name": "test agent", "workspaces": workspaces})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{k}");
        (
            k["id"].as_str().unwrap().into(),
            k["key"].as_str().unwrap().into(),
        )
    }

    /// A gateway call with an agent key (sent as Bearer).
    pub async fn call(
        &self,
        key: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.gateway));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let s = resp.status();
        let text = resp.text().await.unwrap();
        (
            s,
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{s} not JSON: {text}")),
        )
    }

    /// Registers the static `weather` provider (header strategy).
    pub async fn weather(&self) {
        self.static_provider("weather").await;
    }

    /// A static-credential provider like `weather`, named `name`; its id.
    pub async fn static_provider(&self, name: &str) -> String {
        let (s, b) = self
            .admin(
                Method::POST,
                "/providers",
                Some(json!({"profile": {
                    "name": name, "auth_type": "api_key",
                    "params": {
                        "credential_schema": {"type": "object", "required": ["api_key"],
                            "properties": {"api_key": {"type": "string", "minLength": 8}}},
                        "strategy": {"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}}
                    }
                }})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
        b["id"].as_str().unwrap().to_string()
    }

    /// An active `weather` connection of `user`, made through the gateway
    /// (request-connection, then the public capture route).
    pub async fn connect(&self, key: &str, user: &str) -> String {
        self.connect_to(key, user, "weather").await
    }

    /// An active connection of `user` to the static provider `provider`.
    pub async fn connect_to(&self, key: &str, user: &str, provider: &str) -> String {
        let (s, spec) = self
            .call(
                Some(key),
                Method::POST,
                "/v1/request-connection",
                Some(json!({"user_id": user, "provider_name": provider, "return_url": RETURN_URL})),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{spec}");
        let resp = self
            .client
            .post(format!("{}/auth/capture-credential", self.gateway))
            .json(&json!({"state": spec["state"], "credentials": {"api_key": "weather-key-123"}}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{:?}", resp.text().await);
        spec["connection_id"].as_str().unwrap().to_string()
    }
}
