//! Test harness: a real broker on a loopback port over a private database
//! (a fresh SQLite file, or a fresh PostgreSQL schema), plus captured logs.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use nexus_broker::api::AppState;
use nexus_broker::config::{BrokerConfig, Settings};
use nexus_broker::server::{Broker, ServeError};
use nexus_broker::store::Store;
use nexus_broker::vault::generate_key_b64;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Which database a test runs on.
#[derive(Clone, Debug)]
pub enum Backend {
    Sqlite,
    Postgres(String),
}

impl Backend {
    /// PostgreSQL from `NEXUS_TEST_DATABASE_URL`. Without it the test is
    /// skipped with one line, except under CI where a missing peer fails.
    pub fn postgres() -> Option<Backend> {
        match std::env::var("NEXUS_TEST_DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => Some(Backend::Postgres(url)),
            _ => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("CI=true but NEXUS_TEST_DATABASE_URL is not set: PostgreSQL tests must run in CI");
                }
                eprintln!("skipped: PostgreSQL test (set NEXUS_TEST_DATABASE_URL to run it)");
                None
            }
        }
    }
}

/// Redis from `NEXUS_TEST_REDIS_URL`; skipped with one line without it,
/// except under CI, where a missing peer fails.
pub fn redis_url() -> Option<String> {
    match std::env::var("NEXUS_TEST_REDIS_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but NEXUS_TEST_REDIS_URL is not set: Redis tests must run in CI");
            }
            eprintln!("skipped: Redis test (set NEXUS_TEST_REDIS_URL to run it)");
            None
        }
    }
}

/// Generates one test per backend for each listed `async fn name(Backend)`.
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::harness::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(b) = $crate::harness::Backend::postgres() {
                        super::$name(b).await
                    }
                }
            )*
        }
    };
}
pub(crate) use backend_tests;

/// A private database for one test.
pub struct TestDb {
    pub url: String,
    /// Keeps the SQLite folder alive for the test's duration.
    pub dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl TestDb {
    pub async fn new(backend: &Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("sqlite:{}", dir.path().join("nexus.db").display());
                TestDb {
                    url,
                    dir: Some(dir),
                    pg: None,
                }
            }
            Backend::Postgres(admin_url) => {
                let schema = format!("nxt_{}", uuid::Uuid::new_v4().simple());
                let admin = sqlx::PgPool::connect(admin_url)
                    .await
                    .expect("connect to NEXUS_TEST_DATABASE_URL");
                sqlx::query(&format!("CREATE SCHEMA {schema}"))
                    .execute(&admin)
                    .await
                    .expect("create schema");
                admin.close().await;
                let sep = if admin_url.contains('?') { '&' } else { '?' };
                let url = format!("{admin_url}{sep}options[search_path]={schema}");
                TestDb {
                    url,
                    dir: None,
                    pg: Some((admin_url.clone(), schema)),
                }
            }
        }
    }

    /// A handle on a database the test made and drops itself.
    pub fn at(url: String) -> TestDb {
        TestDb {
            url,
            dir: None,
            pg: None,
        }
    }

    /// Another handle on the same database (a second broker replica); dropping
    /// it removes nothing.
    pub fn share(&self) -> TestDb {
        TestDb {
            url: self.url.clone(),
            dir: None,
            pg: None,
        }
    }

    /// The SQLite database files (main, WAL, shared memory), for leak checks.
    pub fn sqlite_files(&self) -> Vec<std::path::PathBuf> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    pub async fn store(&self) -> Store {
        let s = Store::connect(&self.url).await.expect("store");
        s.migrate().await.expect("migrate");
        s
    }

    /// Runs raw SQL on this database (tests that age rows or break tables).
    pub async fn exec(&self, sql: &str) {
        if self.url.starts_with("sqlite:") {
            let pool = sqlx::SqlitePool::connect(&self.url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        } else {
            let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
            sqlx::query(sql).execute(&pool).await.unwrap();
            pool.close().await;
        }
    }

    /// Reads one integer (or NULL) with raw SQL.
    pub async fn scalar(&self, sql: &str) -> Option<i64> {
        if self.url.starts_with("sqlite:") {
            let pool = sqlx::SqlitePool::connect(&self.url).await.unwrap();
            let v = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
            pool.close().await;
            v
        } else {
            let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
            let v = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
            pool.close().await;
            v
        }
    }

    pub async fn drop_db(self) {
        if let Some((admin_url, schema)) = &self.pg {
            if let Ok(admin) = sqlx::PgPool::connect(admin_url).await {
                let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                    .execute(&admin)
                    .await;
                admin.close().await;
            }
        }
    }
}

/// Settings every test broker starts from.
pub fn test_settings(db: &TestDb) -> Settings {
    Settings {
        database_url: Some(db.url.clone()),
        encryption_key: Some(generate_key_b64().expose().clone()),
        state_key: Some(generate_key_b64().expose().clone()),
        api_key: Some(format!("test-admin-key-{}", uuid::Uuid::new_v4().simple())),
        broker_addr: Some("127.0.0.1:0".into()),
        // Tests of the background refresher turn it on; elsewhere it would
        // race the on-demand behaviour under test.
        refresh_worker: Some("false".into()),
        ..Default::default()
    }
}

/// Re-runs `step` until `done` holds for its result, at most 15 s (then the
/// caller's assertion on the returned last result fails with context).
pub async fn eventually<T, F: std::future::Future<Output = T>>(
    mut step: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let mut last = step().await;
    for _ in 0..150 {
        if done(&last) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        last = step().await;
    }
    last
}

/// Waits (at most 15 s) until `cond` holds.
pub async fn wait_until(cond: impl Fn() -> bool) {
    eventually(|| std::future::ready(()), |_| cond()).await;
}

/// One admin request; status and JSON body (a non-JSON body fails the test).
async fn send(
    client: reqwest::Client,
    url: String,
    api_key: String,
    method: Method,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = client.request(method, url).header("x-api-key", api_key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    let json =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{status} body is not JSON: {text}"));
    (status, json)
}

/// A broker serving on loopback.
pub struct TestBroker {
    pub base: String,
    pub api_key: String,
    pub client: reqwest::Client,
    pub db: TestDb,
    pub settings: Settings,
    /// The running broker's state (store, config), for tests that reach inside.
    pub state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

impl TestBroker {
    pub async fn start(backend: &Backend) -> TestBroker {
        let db = TestDb::new(backend).await;
        let settings = test_settings(&db);
        Self::start_on(db, settings).await
    }

    /// A free loopback port, for brokers whose BASE_URL must be known before they start.
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Starts on a fixed free port with BASE_URL pointing at it.
    pub async fn start_public(backend: &Backend, adjust: impl FnOnce(&mut Settings)) -> TestBroker {
        let db = TestDb::new(backend).await;
        let mut settings = test_settings(&db);
        let port = Self::free_port();
        settings.broker_addr = Some(format!("127.0.0.1:{port}"));
        settings.base_url = Some(format!("http://127.0.0.1:{port}"));
        adjust(&mut settings);
        Self::start_on(db, settings).await
    }

    pub async fn start_on(db: TestDb, settings: Settings) -> TestBroker {
        Self::start_with(db, settings, |_| {}).await
    }

    /// Like [`TestBroker::start_on`], with the validated config adjusted
    /// (tuning that has no environment variable).
    pub async fn start_with(
        db: TestDb,
        settings: Settings,
        tune: impl FnOnce(&mut BrokerConfig),
    ) -> TestBroker {
        init_logs();
        let mut config = BrokerConfig::from_settings(&settings).expect("valid test config");
        // Webhooks are delivered promptly and retried quickly in tests.
        config.webhooks.tick = std::time::Duration::from_millis(100);
        config.webhooks.backoff_base = std::time::Duration::from_millis(200);
        config.webhooks.backoff_cap = std::time::Duration::from_millis(500);
        config.webhooks.timeout = std::time::Duration::from_secs(2);
        tune(&mut config);
        let broker = Broker::start(config).await.expect("broker starts");
        let base = format!("http://{}", broker.local_addr());
        let state = broker.state().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(broker.run(async {
            let _ = rx.await;
        }));
        TestBroker {
            base,
            api_key: settings.api_key.clone().unwrap_or_default(),
            client: reqwest::Client::new(),
            db,
            settings,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Sends a request with the admin key; returns status and JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        send(
            self.client.clone(),
            format!("{}{path}", self.base),
            self.api_key.clone(),
            method,
            body,
        )
        .await
    }

    /// Like [`TestBroker::call`] without a body, on its own task (for
    /// concurrent requests).
    pub fn spawn_call(&self, method: Method, path: &str) -> JoinHandle<(StatusCode, Value)> {
        tokio::spawn(send(
            self.client.clone(),
            format!("{}{path}", self.base),
            self.api_key.clone(),
            method,
            None,
        ))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    /// Registers a provider and returns its id.
    pub async fn create_provider(&self, profile: Value) -> String {
        let (status, body) = self
            .post("/providers", serde_json::json!({"profile": profile}))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().expect("id").to_string()
    }

    /// Graceful shutdown (flushes the audit writer); returns the database.
    pub async fn stop(mut self) -> TestDb {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("broker task")
                .expect("broker ran cleanly");
        }
        self.db
    }

    /// Stops and removes the database.
    pub async fn finish(self) {
        self.stop().await.drop_db().await;
    }
}

/// The current value of a counter in the process-wide Prometheus registry.
pub fn counter(name: &str) -> f64 {
    let text = nexus_core::telemetry::metrics_handle().render();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every error response must be `{"error": code, "message": text}`.
pub fn assert_json_error(status: StatusCode, body: &Value, expected_status: u16, code: &str) {
    assert_eq!(status.as_u16(), expected_status, "{body}");
    assert_eq!(body["error"].as_str(), Some(code), "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(m) = LOGS.get() {
            m.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures every log line of the test binary at TRACE level, so secret
/// checks cover even the most verbose output.
pub fn init_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        // The test process's one rustls provider, as the binary installs at start-up.
        let _ = rustls::crypto::ring::default_provider().install_default();
        LOGS.get_or_init(|| Mutex::new(Vec::new()));
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
}

/// Everything logged so far by this test binary.
pub fn logs() -> String {
    LOGS.get()
        .map(|m| String::from_utf8_lossy(&m.lock().unwrap_or_else(|e| e.into_inner())).into_owned())
        .unwrap_or_default()
}
