//! `nexus agents create|list|revoke`: agent keys through the broker's admin API.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::secret;
use crate::state::StateDir;

#[derive(Subcommand)]
pub enum AgentsCommand {
    /// Create an agent key (printed once).
    Create {
        /// Workspace the key may reach (repeat for several; `*` for all).
        #[arg(long = "workspace", required = true)]
        workspaces: Vec<String>,
        /// Who uses it.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List agent keys (never the keys themselves).
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke an agent key by id.
    Revoke {
        /// Key id (`ak_...`).
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

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

/// `nexus agents ...`: the broker's admin API over HTTP.
pub async fn run(command: AgentsCommand) -> Result<()> {
    let admin = match &command {
        AgentsCommand::Create { admin, .. }
        | AgentsCommand::List { admin }
        | AgentsCommand::Revoke { admin, .. } => admin,
    };
    let state = StateDir::open_existing(&admin.state_dir)?;
    let api_key = secret("API_KEY", state.as_ref())
        .context("API_KEY is not set (nor in the state folder's nexus.env)")?;
    let base = admin
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
        ca: admin.broker_ca_file.clone().map(|p| (p, "BROKER_CA_FILE")),
        identity: admin
            .broker_client_cert_file
            .clone()
            .zip(admin.broker_client_key_file.clone())
            .map(|(c, k)| {
                (
                    (c, "BROKER_CLIENT_CERT_FILE"),
                    (k, "BROKER_CLIENT_KEY_FILE"),
                )
            }),
    };
    let timeout = std::time::Duration::from_secs(15);
    let http = nexus_core::outbound::clients_with(timeout, timeout, &tls)?.0;
    let call = |method: reqwest::Method, path: String, body: Option<serde_json::Value>| {
        let mut req = http
            .request(method, format!("{}{path}", base.trim_end_matches('/')))
            .header("x-api-key", &api_key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let resp = req
                .send()
                .await
                .with_context(|| format!("cannot reach the broker at {base}"))?;
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            if !status.is_success() {
                bail!(
                    "the broker answered {status}: {}",
                    body["message"].as_str().unwrap_or("no message")
                );
            }
            Ok(body)
        }
    };
    match command {
        AgentsCommand::Create {
            workspaces, name, ..
        } => {
            let k = call(
                reqwest::Method::POST,
                "/agent-keys".into(),
                Some(serde_json::json!({"name": name, "workspaces": workspaces})),
            )
            .await?;
            println!("{}", k["key"].as_str().unwrap_or_default());
            eprintln!(
                "agent key {} for {}: shown once, store it now",
                k["id"].as_str().unwrap_or_default(),
                k["workspaces"]
            );
        }
        AgentsCommand::List { .. } => {
            let list = call(reqwest::Method::GET, "/agent-keys".into(), None).await?;
            println!(
                "{:<36} {:<12} {:<8} {:<25} name / workspaces",
                "id", "prefix", "revoked", "last used"
            );
            for k in list["agent_keys"].as_array().into_iter().flatten() {
                println!(
                    "{:<36} {:<12} {:<8} {:<25} {} / {}",
                    k["id"].as_str().unwrap_or_default(),
                    k["prefix"].as_str().unwrap_or_default(),
                    k["revoked"],
                    k["last_used_at"].as_str().unwrap_or("never"),
                    k["name"].as_str().unwrap_or_default(),
                    k["workspaces"]
                );
            }
        }
        AgentsCommand::Revoke { id, .. } => {
            call(reqwest::Method::DELETE, format!("/agent-keys/{id}"), None).await?;
            println!("revoked {id}");
        }
    }
    Ok(())
}
