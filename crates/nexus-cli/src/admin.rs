//! How the CLI reaches the broker's admin API (`nexus agents`, `nexus
//! providers`): its URL, TLS trust, and the admin key, which comes from the
//! environment or the state folder, never from a flag.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::secret;
use crate::state::StateDir;

/// How the CLI reaches the broker's admin API. API_KEY comes from the
/// environment or the state folder, never from a flag.
#[derive(Args)]
pub struct AdminArgs {
    /// Broker URL (default: http://BROKER_ADDR from the state folder, else 127.0.0.1:8080).
    #[arg(long, env = "BROKER_URL")]
    broker_url: Option<String>,
    /// State folder whose nexus.env supplies API_KEY when it is not set.
    #[arg(long, env = "NEXUS_STATE_DIR", default_value = ".nexus")]
    state_dir: PathBuf,
    /// PEM CA the broker's certificate chains to (beside the public roots).
    #[arg(long, env = "BROKER_CA_FILE")]
    broker_ca_file: Option<PathBuf>,
    /// PEM client certificate for a broker that requires one (mutual TLS).
    #[arg(
        long,
        env = "BROKER_CLIENT_CERT_FILE",
        requires = "broker_client_key_file"
    )]
    broker_client_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(
        long,
        env = "BROKER_CLIENT_KEY_FILE",
        requires = "broker_client_cert_file"
    )]
    broker_client_key_file: Option<PathBuf>,
}

impl AdminArgs {
    /// A client for the broker these arguments name.
    pub fn client(&self) -> Result<AdminClient> {
        let state = StateDir::open_existing(&self.state_dir)?;
        let api_key = secret("API_KEY", state.as_ref())
            .context("API_KEY is not set (nor in the state folder's nexus.env)")?;
        let base = self
            .broker_url
            .clone()
            .or_else(|| {
                state
                    .as_ref()
                    .and_then(|s| s.get("BROKER_ADDR"))
                    .map(|a| format!("http://{a}"))
            })
            .unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let tls = nexus_core::mtls::ClientTls {
            ca: self.broker_ca_file.clone().map(|p| (p, "BROKER_CA_FILE")),
            identity: self
                .broker_client_cert_file
                .clone()
                .zip(self.broker_client_key_file.clone())
                .map(|(c, k)| {
                    (
                        (c, "BROKER_CLIENT_CERT_FILE"),
                        (k, "BROKER_CLIENT_KEY_FILE"),
                    )
                }),
        };
        let timeout = std::time::Duration::from_secs(15);
        let http = nexus_core::outbound::clients_with(timeout, timeout, &tls)?.0;
        Ok(AdminClient {
            base: base.trim_end_matches('/').to_string(),
            api_key,
            http,
        })
    }
}

/// The broker's admin API.
pub struct AdminClient {
    base: String,
    api_key: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// The broker's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends a request (with `If-Match` when given); the status and the JSON
    /// body (null when there is none).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<i64>,
    ) -> Result<(StatusCode, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("x-api-key", &self.api_key);
        if let Some(v) = if_match {
            req = req.header("if-match", format!("\"{v}\""));
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the broker at {}", self.base))?;
        let status = resp.status();
        Ok((status, resp.json().await.unwrap_or_default()))
    }

    /// [`AdminClient::send`] without `If-Match`, a failure status as an error
    /// carrying the broker's message.
    pub async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let (status, body) = self.send(method, path, body, None).await?;
        if !status.is_success() {
            bail!(
                "the broker answered {status}: {}",
                body["message"].as_str().unwrap_or("no message")
            );
        }
        Ok(body)
    }
}
