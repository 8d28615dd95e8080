//! A broker and a gateway on loopback, static-credential connections made
//! through the gateway's capture route, a sidecar in front of them, and an
//! upstream that records what reaches it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use futures_util::StreamExt;
use nexus_broker::config::{BrokerConfig, Settings};
use nexus_broker::server::Broker;
use nexus_gateway::{GatewayConfig, GatewayServer, GatewaySettings};
use nexus_sidecar::{Sidecar, SidecarConfig, SidecarSettings};
use serde_json::{json, Value};
use tokio::sync::oneshot;

pub const API_KEY: &str = "sidecar-test-admin-key-0123456789";
pub const RETURN_URL: &str = "http://localhost:3000/done";

/// One stack at a time in this test binary: the metrics recorder is
/// process-wide, and tests count gateway calls from it.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Stack {
    _turn: tokio::sync::MutexGuard<'static, ()>,
    pub broker: String,
    pub gateway: String,
    pub agent_key: String,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub dir: tempfile::TempDir,
    stops: Vec<oneshot::Sender<()>>,
}

pub use nexus_testkit::free_port;

impl Stack {
    pub async fn start() -> Stack {
        Self::start_on(free_port()).await
    }

    /// With the gateway on `gateway_port` (an OpenID provider must know the
    /// callback URL before the gateway starts).
    pub async fn start_on(gateway_port: u16) -> Stack {
        let turn = ONE_AT_A_TIME.lock().await;
        let _ = rustls::crypto::ring::default_provider().install_default();
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
        let (btx, brx) = oneshot::channel::<()>();
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
        let (gtx, grx) = oneshot::channel::<()>();
        tokio::spawn(gw.run(async {
            let _ = grx.await;
        }));
        let mut s = Stack {
            _turn: turn,
            broker: broker_url,
            gateway,
            agent_key: String::new(),
            metrics,
            dir,
            stops: vec![gtx, btx],
        };
        s.agent_key = s
            .admin(
                reqwest::Method::POST,
                "/agent-keys",
                Some(json!({"name": "sidecar", "workspaces": ["*"]})),
            )
            .await["key"]
            .as_str()
            .unwrap()
            .to_string();
        s
    }

    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", self.broker))
            .header("x-api-key", API_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    /// A static provider with `strategy` whose credentials have `fields`.
    pub async fn provider(&self, name: &str, strategy: Value, fields: &[&str]) -> String {
        let props: serde_json::Map<String, Value> = fields
            .iter()
            .map(|f| (f.to_string(), json!({"type": "string"})))
            .collect();
        self.admin(
            reqwest::Method::POST,
            "/providers",
            Some(json!({"profile": {
                "name": name, "auth_type": strategy["type"],
                "params": {
                    "credential_schema": {"type": "object", "required": fields, "properties": props},
                    "strategy": strategy
                }
            }})),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string()
    }

    /// An active connection of `user` to `provider` holding `credentials`.
    pub async fn connect(&self, user: &str, provider: &str, credentials: Value) -> String {
        let http = reqwest::Client::new();
        let spec: Value = http
            .post(format!("{}/v1/request-connection", self.gateway))
            .bearer_auth(&self.agent_key)
            .json(&json!({"user_id": user, "provider_name": provider, "return_url": RETURN_URL}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let resp = http
            .post(format!("{}/auth/capture-credential", self.gateway))
            .json(&json!({"state": spec["state"], "credentials": credentials}))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{:?}", resp.text().await);
        spec["connection_id"].as_str().unwrap().to_string()
    }

    /// Gateway requests on `/v1/...` routes matching `needle` so far.
    pub fn gateway_calls(&self, needle: &str) -> u64 {
        self.metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("nexus_http_requests_total{") && l.contains(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    /// A sidecar with `routes` (TOML) and settings adjusted by `tune`.
    pub async fn sidecar_with(
        &self,
        routes: &str,
        tune: impl FnOnce(&mut SidecarSettings),
    ) -> Running {
        let file = self.dir.path().join(format!("routes-{}.toml", free_port()));
        std::fs::write(&file, routes).unwrap();
        let mut settings = SidecarSettings {
            gateway_url: Some(self.gateway.clone()),
            agent_key: Some(self.agent_key.clone()),
            sidecar_addr: Some("127.0.0.1:0".into()),
            sidecar_routes_file: Some(file.display().to_string()),
            ..Default::default()
        };
        tune(&mut settings);
        let config = SidecarConfig::from_settings(&settings).unwrap();
        let sidecar = Sidecar::start(config, self.metrics.clone()).await.unwrap();
        let addr = sidecar.local_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(sidecar.run(async {
            let _ = rx.await;
        }));
        Running {
            url: format!("http://{addr}"),
            stop: Some(tx),
            task,
        }
    }

    pub async fn sidecar(&self, routes: &str) -> Running {
        self.sidecar_with(routes, |_| {}).await
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

pub struct Running {
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    pub fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// What reached the upstream.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body_len: u64,
    pub version: axum::http::Version,
}

/// An upstream on loopback that records every request and answers by path:
/// `/status/{code}` (429 with `Retry-After: 30`, 403 with a Bearer
/// challenge), `/once401` (401 the first time), `/redirect` (302 to
/// `/steal` on another upstream given at start), `/sse` (one event, the
/// second once `release` is notified), `/upload` (counts the streamed
/// body), anything else 200.
#[derive(Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    counters: Arc<Mutex<HashMap<String, u64>>>,
    /// `/sse` sends its second event only once this is notified.
    pub release: Arc<tokio::sync::Notify>,
}

impl Upstream {
    pub async fn start(redirect_to: Option<String>) -> Upstream {
        let (listener, up) = Self::bound().await;
        let app = Router::new()
            .fallback(any(answer))
            .with_state((up.clone(), redirect_to));
        tokio::spawn(async move { axum::serve(listener, app).await });
        up
    }

    /// The same upstream over TLS (ALPN h2 and http/1.1) with a certificate
    /// for 127.0.0.1 from a CA made here; the CA's PEM file is returned.
    pub async fn start_tls(dir: &std::path::Path) -> (Upstream, std::path::PathBuf) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
        let key = KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&key, &ca).unwrap();
        let files = nexus_core::tls::TlsFiles {
            cert: dir.join("upstream.pem"),
            key: dir.join("upstream-key.pem"),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        let ca_file = dir.join("upstream-ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let tls = Arc::new(nexus_core::tls::TlsServer::load(files).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = Upstream {
            addr: listener.local_addr().unwrap(),
            seen: Default::default(),
            counters: Default::default(),
            release: Default::default(),
        };
        let app = Router::new()
            .fallback(any(answer))
            .with_state((up.clone(), None));
        tokio::spawn(nexus_core::serve::serve_with(
            listener,
            app,
            Default::default(),
            Some(tls),
            std::future::pending(),
        ));
        (up, ca_file)
    }

    async fn bound() -> (tokio::net::TcpListener, Upstream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = Upstream {
            addr: listener.local_addr().unwrap(),
            seen: Default::default(),
            counters: Default::default(),
            release: Default::default(),
        };
        (listener, up)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.requests()
            .last()
            .cloned()
            .expect("a request reached the upstream")
    }
}

async fn answer(
    State((up, redirect_to)): State<(Upstream, Option<String>)>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    // Routes may put the upstream under /base: the answers are the same.
    let path = parts.uri.path().trim_start_matches("/base").to_string();
    let mut len = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => len += c.len() as u64,
            Err(_) => return StatusCode::BAD_REQUEST.into_response(),
        }
    }
    up.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body_len: len,
        version: parts.version,
    });
    let count = {
        let mut c = up.counters.lock().unwrap();
        let n = c.entry(path.clone()).or_insert(0);
        *n += 1;
        *n
    };
    if let Some(code) = path.strip_prefix("/status/") {
        let code: u16 = code.parse().unwrap_or(500);
        let mut resp = (
            StatusCode::from_u16(code).unwrap(),
            format!("upstream said {code}"),
        )
            .into_response();
        if code == 429 {
            resp.headers_mut()
                .insert("retry-after", "30".parse().unwrap());
        }
        if code == 403 {
            resp.headers_mut().insert(
                "www-authenticate",
                r#"Bearer error="insufficient_scope", scope="files.write""#
                    .parse()
                    .unwrap(),
            );
        }
        return resp;
    }
    match path.as_str() {
        "/once401" if count == 1 => (StatusCode::UNAUTHORIZED, "expired").into_response(),
        "/redirect" => Response::builder()
            .status(302)
            .header(
                "location",
                format!("{}/steal", redirect_to.unwrap_or_default()),
            )
            .body(Body::empty())
            .unwrap(),
        "/sse" => {
            let release = up.release.clone();
            let events = futures_util::stream::iter(0..2).then(move |i| {
                let release = release.clone();
                async move {
                    if i == 1 {
                        release.notified().await;
                    }
                    Ok::<_, std::convert::Infallible>(format!("data: event {i}\n\n"))
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(events))
                .unwrap()
        }
        "/upload" => axum::Json(json!({"received": len})).into_response(),
        // An upstream pretending to be the sidecar.
        "/forged" => ([("x-nexus-error", "forged")], "forged").into_response(),
        _ => axum::Json(json!({"ok": true, "path": path})).into_response(),
    }
}
