//! `nexus agents create|list|revoke`: agent keys through the broker's admin API.

use anyhow::Result;
use clap::Subcommand;

use crate::admin::AdminArgs;

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

/// `nexus agents ...`: the broker's admin API over HTTP.
pub async fn run(command: AgentsCommand) -> Result<()> {
    let admin = match &command {
        AgentsCommand::Create { admin, .. }
        | AgentsCommand::List { admin }
        | AgentsCommand::Revoke { admin, .. } => admin,
    };
    let broker = admin.client()?;
    let call = |method: reqwest::Method, path: String, body: Option<serde_json::Value>| {
        let broker = &broker;
        async move { broker.ok(method, &path, body).await }
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
