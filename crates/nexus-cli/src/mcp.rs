//! `nexus mcp`: OAuth-protected MCP servers registered by their URL (the
//! broker's `/providers/mcp`).

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Value};

use crate::admin::AdminArgs;

/// `nexus mcp ...`.
#[derive(Subcommand)]
pub enum McpCommand {
    /// What an MCP server's metadata says, checked; nothing is registered.
    #[command(after_help = "Example:\n  nexus mcp plan https://mcp.example.com/mcp")]
    Plan {
        /// The server's URL (its Streamable HTTP endpoint).
        url: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Register an MCP server as a provider; people then connect it like
    /// any provider. Without --client-id, Nexus registers itself at the
    /// server's authorization server when it allows that.
    #[command(
        after_help = "Example:\n  nexus mcp add https://mcp.example.com/mcp --name example-mcp"
    )]
    Add {
        /// The server's URL.
        url: String,
        /// Provider name.
        #[arg(long)]
        name: String,
        /// A client registered in advance at the server's authorization server.
        #[arg(long)]
        client_id: Option<String>,
        /// Environment variable holding that client's secret (never a flag).
        #[arg(long, value_name = "VAR", requires = "client_id")]
        client_secret_env: Option<String>,
        /// Scopes instead of those the server asks for (repeat, or space-separated).
        #[arg(long)]
        scopes: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

fn show(server: &Value) {
    let s = |k: &str| server[k].as_str().unwrap_or("-").to_string();
    println!("resource                {}", s("resource"));
    println!("authorization server    {}", s("issuer"));
    println!("token endpoint          {}", s("token_endpoint"));
    println!(
        "scopes                  {}",
        server["scopes"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "))
            .unwrap_or_default()
    );
    println!(
        "dynamic registration    {}",
        server["registration_endpoint"]
            .as_str()
            .unwrap_or("not offered")
    );
}

/// Runs `nexus mcp ...`.
pub async fn run(command: McpCommand) -> Result<()> {
    match command {
        McpCommand::Plan { url, admin } => {
            let plan = admin
                .client()?
                .ok(
                    Method::POST,
                    "/providers/mcp/plan",
                    Some(json!({ "url": url })),
                )
                .await?;
            show(&plan["server"]);
            let client = &plan["client"];
            match client["method"].as_str() {
                Some("dynamic_registration") => println!(
                    "client                  Nexus would register itself (redirect URI {})",
                    plan["redirect_uri"].as_str().unwrap_or("-")
                ),
                _ => println!(
                    "client                  {}",
                    client["message"].as_str().unwrap_or("-")
                ),
            }
        }
        McpCommand::Add {
            url,
            name,
            client_id,
            client_secret_env,
            scopes,
            admin,
        } => {
            let mut body = json!({ "url": url, "name": name, "client_id": client_id });
            if let Some(var) = &client_secret_env {
                let secret = std::env::var(var).with_context(|| {
                    format!("--client-secret-env {var}: the variable is not set")
                })?;
                if secret.trim().is_empty() {
                    bail!("--client-secret-env {var}: the variable is empty");
                }
                body["client_secret"] = json!(secret);
            }
            if !scopes.is_empty() {
                let list: Vec<&str> = scopes.iter().flat_map(|s| s.split_whitespace()).collect();
                body["scopes"] = json!(list);
            }
            let made = admin
                .client()?
                .ok(Method::POST, "/providers/mcp", Some(body))
                .await?;
            show(&made["server"]);
            let registered = made["name"].as_str().unwrap_or(&name);
            println!(
                "registered {} ({}); people connect it like any provider",
                registered,
                made["id"].as_str().unwrap_or("-")
            );
            // What agents need next: a sidecar route their MCP client uses.
            let route: String = registered
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            println!(
                "\nfor agents, a sidecar route (their MCP client's URL: http://127.0.0.1:8070/{route}):\n\n[routes.{route}]\nkind = \"mcp\"\nupstream = \"{}\"\nworkspace = \"<workspace id>\"\nprovider = \"{registered}\"",
                made["server"]["url"].as_str().unwrap_or(&url)
            );
        }
    }
    Ok(())
}
