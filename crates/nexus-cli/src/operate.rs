//! Operator commands over the broker's admin API: connections (list, show,
//! refresh, revoke), a workspace's health, the kill switch (pause,
//! resume), webhook endpoints and the audit log. No command prints a
//! credential: a forced refresh answers with the connection's health, not
//! its tokens; a webhook's signing secret is printed once, when it is made.

use anyhow::{bail, Result};
use clap::{Subcommand, ValueEnum};
use reqwest::Method;
use serde_json::Value;

use crate::admin::{AdminArgs, AdminClient};

/// How answers are printed.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum Output {
    /// Aligned columns for a person.
    #[default]
    Table,
    /// The broker's JSON, for scripts.
    Json,
}

#[derive(Subcommand)]
pub enum ConnectionsCommand {
    /// A workspace's connections, one line each.
    #[command(after_help = "Example:\n  nexus connections list --workspace acme --output json")]
    List {
        /// The workspace.
        #[arg(long)]
        workspace: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// One connection's health: state, reason, scopes, refresh times.
    Show {
        /// Connection id.
        id: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Refresh now (its tokens are not printed), then show its health.
    Refresh {
        /// Connection id.
        id: String,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke at the provider (RFC 7009) and erase the secrets here.
    Revoke {
        /// Connection id.
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `nexus connections ...`.
pub async fn connections(command: ConnectionsCommand) -> Result<()> {
    match command {
        ConnectionsCommand::List {
            workspace,
            output,
            admin,
        } => {
            let broker = admin.client()?;
            let path = format!("/connections?workspace_id={}", encode(&workspace));
            let list = broker.ok(Method::GET, &path, None).await?;
            match output {
                Output::Json => print_json(&list),
                Output::Table => {
                    let rows = list["connections"].as_array().cloned().unwrap_or_default();
                    table(&rows);
                }
            }
        }
        ConnectionsCommand::Show { id, output, admin } => {
            let broker = admin.client()?;
            show(&broker, &id, output).await?;
        }
        ConnectionsCommand::Refresh { id, output, admin } => {
            let broker = admin.client()?;
            let path = format!("/connections/{}/refresh", encode(&id));
            let (status, body) = broker.send(Method::POST, &path, None, None).await?;
            if !status.is_success() {
                // The refusal says why (a person must reconnect, paused, ...).
                eprintln!(
                    "refresh refused ({status}): {} {}",
                    body["error"].as_str().unwrap_or(""),
                    body["message"].as_str().unwrap_or("")
                );
            }
            show(&broker, &id, output).await?;
            if !status.is_success() {
                bail!("the connection was not refreshed");
            }
        }
        ConnectionsCommand::Revoke { id, admin } => {
            let broker = admin.client()?;
            let path = format!("/connections/{}", encode(&id));
            let r = broker.ok(Method::DELETE, &path, None).await?;
            if r["already_revoked"] == true {
                println!("{id} was already revoked");
            } else {
                println!(
                    "revoked {id} (at the provider: {})",
                    r["provider_revocation"]["result"]
                        .as_str()
                        .unwrap_or("not applicable")
                );
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum WebhooksCommand {
    /// The webhook endpoints.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Add an endpoint; its signing secret is printed once.
    #[command(after_help = "Example:\n  \
        nexus webhooks add https://hooks.example.com/nexus --event connection.attention_required")]
    Add {
        /// Where events are POSTed.
        url: String,
        /// An event type to send (repeat; default: all).
        #[arg(long = "event")]
        events: Vec<String>,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Remove an endpoint (its undelivered events are cancelled).
    Remove {
        /// Endpoint id.
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Try a given-up (failed) delivery once more, now.
    #[command(
        after_help = "Example:\n  nexus webhooks retry wh_123 msg_456   (ids from `nexus webhooks deliveries`)"
    )]
    Retry {
        /// Endpoint id.
        id: String,
        /// The delivery's event id (`webhook-id`, the `message` column of `deliveries`).
        message_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// An endpoint's recent deliveries, newest first.
    Deliveries {
        /// Endpoint id.
        id: String,
        /// How many (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long, value_enum, default_value_t)]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `nexus webhooks ...`.
pub async fn webhooks(command: WebhooksCommand) -> Result<()> {
    match command {
        WebhooksCommand::List { output, admin } => {
            let list = admin.client()?.ok(Method::GET, "/webhooks", None).await?;
            match output {
                Output::Json => print_json(&list),
                Output::Table => {
                    println!("{:<38}  {:<5}  {:<40}  events", "id", "from", "url");
                    for w in list["webhooks"].as_array().into_iter().flatten() {
                        println!(
                            "{:<38}  {:<5}  {:<40}  {}",
                            cell(&w["id"]),
                            cell(&w["managed_by"]),
                            cell(&w["url"]),
                            cell(&w["events"])
                        );
                    }
                }
            }
        }
        WebhooksCommand::Add {
            url,
            events,
            description,
            admin,
        } => {
            let mut body = serde_json::json!({ "url": url, "description": description });
            if !events.is_empty() {
                body["events"] = serde_json::json!(events);
            }
            let w = admin
                .client()?
                .ok(Method::POST, "/webhooks", Some(body))
                .await?;
            println!("{}", cell(&w["secret"]));
            eprintln!(
                "webhook {} for {}: its signing secret (above) is shown once, store it now",
                cell(&w["id"]),
                cell(&w["events"])
            );
        }
        WebhooksCommand::Remove { id, admin } => {
            let path = format!("/webhooks/{}", encode(&id));
            admin.client()?.ok(Method::DELETE, &path, None).await?;
            println!("removed webhook {id}");
        }
        WebhooksCommand::Retry {
            id,
            message_id,
            admin,
        } => {
            let path = format!(
                "/webhooks/{}/deliveries/{}/retry",
                encode(&id),
                encode(&message_id)
            );
            admin.client()?.ok(Method::POST, &path, None).await?;
            println!("retrying delivery {message_id} to webhook {id} now");
        }
        WebhooksCommand::Deliveries {
            id,
            limit,
            output,
            admin,
        } => {
            let path = format!("/webhooks/{}/deliveries?limit={limit}", encode(&id));
            let d = admin.client()?.ok(Method::GET, &path, None).await?;
            match output {
                Output::Json => print_json(&d),
                Output::Table => {
                    println!(
                        "{:<20}  {:<36}  {:<36}  {:<10}  {:>8}  {:>4}  error",
                        "created", "message", "event", "status", "attempts", "http"
                    );
                    for x in d["deliveries"].as_array().into_iter().flatten() {
                        println!(
                            "{:<20}  {:<36}  {:<36}  {:<10}  {:>8}  {:>4}  {}",
                            short_time(&x["created_at"]),
                            cell(&x["message_id"]),
                            cell(&x["event_type"]),
                            cell(&x["status"]),
                            cell(&x["attempts"]),
                            cell(&x["last_status"]),
                            cell(&x["last_error"])
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// How `nexus audit` selects events.
#[derive(clap::Args)]
pub struct AuditArgs {
    /// Only this event type (e.g. `connection.revoked`).
    #[arg(long = "type")]
    event_type: Option<String>,
    /// From this time on: RFC 3339 or unix seconds.
    #[arg(long)]
    since: Option<String>,
    /// Only this connection's events.
    #[arg(long)]
    connection: Option<String>,
    /// How many (1 to 1000), newest first.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// Keep printing new events as they are written (every 2 s; Ctrl-C stops).
    #[arg(long)]
    follow: bool,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    #[command(flatten)]
    admin: AdminArgs,
}

/// `nexus audit`: the audit log, oldest of the page first; with `--follow`,
/// then every new event once.
pub async fn audit(a: &AuditArgs) -> Result<()> {
    let broker = a.admin.client()?;
    let query = |since: Option<&str>, order: &str| {
        let mut q = format!("/audit?limit={}&order={order}", a.limit);
        for (k, v) in [
            ("event_type", a.event_type.as_deref()),
            ("since", since),
            ("connection_id", a.connection.as_deref()),
        ] {
            if let Some(v) = v {
                q.push_str(&format!("&{k}={}", encode(v)));
            }
        }
        q
    };
    let page = broker
        .ok(Method::GET, &query(a.since.as_deref(), "desc"), None)
        .await?;
    let mut events = page["events"].as_array().cloned().unwrap_or_default();
    events.reverse();
    let mut seen: std::collections::HashSet<i64> = Default::default();
    let mut last: Option<String> = None;
    for e in &events {
        print_event(e, a.output);
        seen.extend(e["id"].as_i64());
        last = e["occurred_at"].as_str().map(str::to_string);
    }
    if !a.follow {
        return Ok(());
    }
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        // `since` is inclusive: events at the last time seen come again,
        // and are skipped by id.
        let page = broker
            .ok(
                Method::GET,
                &query(last.as_deref().or(a.since.as_deref()), "asc"),
                None,
            )
            .await?;
        for e in page["events"].as_array().into_iter().flatten() {
            if e["id"].as_i64().is_some_and(|id| seen.insert(id)) {
                print_event(e, a.output);
                last = e["occurred_at"].as_str().map(str::to_string);
            }
        }
    }
}

fn print_event(e: &Value, output: Output) {
    match output {
        // One JSON object per line, for `jq` and log pipelines.
        Output::Json => println!("{e}"),
        Output::Table => println!(
            "{}  {:<34}  {:<16}  {}  {}",
            short_time(&e["occurred_at"]),
            cell(&e["event_type"]),
            cell(&e["actor"]),
            cell(&e["connection_id"]),
            e["detail"]
        ),
    }
}

/// `nexus status --workspace W`: the workspace's connections and whether
/// issuance is paused for it.
pub async fn status(workspace: &str, output: Output, admin: &AdminArgs) -> Result<()> {
    let broker = admin.client()?;
    let path = format!("/workspaces/{}/connections/status", encode(workspace));
    let s = broker.ok(Method::GET, &path, None).await?;
    if let Output::Json = output {
        print_json(&s);
        return Ok(());
    }
    let rows: Vec<Value> = s["connections"]
        .as_object()
        .map(|m| m.values().cloned().collect())
        .unwrap_or_default();
    let attention = rows.iter().filter(|c| c["needs_attention"] == true).count();
    println!(
        "workspace {workspace}: {} connection(s), {attention} need(s) a person",
        rows.len()
    );
    if let Some(p) = s["issuance_paused"].as_object() {
        println!(
            "PAUSED ({}) by {} since {}: {}",
            p.get("scope").and_then(Value::as_str).unwrap_or("?"),
            p.get("paused_by").and_then(Value::as_str).unwrap_or("?"),
            p.get("paused_at").and_then(Value::as_str).unwrap_or("?"),
            p.get("reason").and_then(Value::as_str).unwrap_or("")
        );
    }
    if !rows.is_empty() {
        println!();
        table(&rows);
    }
    Ok(())
}

/// `nexus pause|resume [--workspace W]`.
pub async fn pause(workspace: Option<&str>, reason: Option<&str>, admin: &AdminArgs) -> Result<()> {
    let broker = admin.client()?;
    let body = serde_json::json!({ "reason": reason });
    let p = match workspace {
        Some(w) => {
            let path = format!("/workspaces/{}/pause", encode(w));
            broker.ok(Method::PUT, &path, Some(body)).await?
        }
        None => broker.ok(Method::POST, "/admin/pause", Some(body)).await?,
    };
    println!(
        "token issuance paused ({}): {}",
        workspace.map_or("every workspace".into(), |w| format!("workspace {w}")),
        p["pause"]["reason"].as_str().unwrap_or_default()
    );
    Ok(())
}

/// Lifts the pause `pause` set.
pub async fn resume(workspace: Option<&str>, admin: &AdminArgs) -> Result<()> {
    let broker = admin.client()?;
    match workspace {
        Some(w) => {
            let path = format!("/workspaces/{}/pause", encode(w));
            let r = broker.ok(Method::DELETE, &path, None).await?;
            println!(
                "token issuance resumed for workspace {w}{}",
                if r["was_paused"] == true {
                    ""
                } else {
                    " (it was not paused)"
                }
            );
        }
        None => {
            let r = broker.ok(Method::DELETE, "/admin/pause", None).await?;
            println!(
                "token issuance resumed (workspace pauses stay){}",
                if r["was_paused"] == true {
                    ""
                } else {
                    "; it was not paused"
                }
            );
        }
    }
    Ok(())
}

async fn show(broker: &AdminClient, id: &str, output: Output) -> Result<()> {
    let c = broker
        .ok(Method::GET, &format!("/connections/{}", encode(id)), None)
        .await?;
    match output {
        Output::Json => print_json(&c),
        Output::Table => {
            for (label, key) in [
                ("id", "id"),
                ("workspace", "workspace_id"),
                ("provider", "provider_id"),
                ("status", "status"),
                ("reason", "error_code"),
                ("detail", "error_description"),
                ("granted scopes", "granted_scopes"),
                ("failing scopes", "failing_scopes"),
                ("expires at", "expires_at"),
                ("last refresh", "last_success_at"),
                ("last failure", "last_failure_at"),
                ("next refresh", "next_refresh_at"),
            ] {
                println!("{label:<15} {}", cell(&c[key]));
            }
        }
    }
    Ok(())
}

fn table(rows: &[Value]) {
    println!(
        "{:<36}  {:<18}  {:<22}  {:<24}  {:<20}  {:<20}",
        "id", "status", "reason", "failing scopes", "last refresh", "next refresh"
    );
    for c in rows {
        println!(
            "{:<36}  {:<18}  {:<22}  {:<24}  {:<20}  {:<20}",
            cell(&c["id"]),
            cell(&c["status"]),
            cell(&c["error_code"]),
            cell(&c["failing_scopes"]),
            short_time(&c["last_success_at"]),
            short_time(&c["next_refresh_at"]),
        );
    }
}

/// A value in a column: strings bare, lists joined, absent as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

/// An RFC 3339 time to the second, without the zone letter.
fn short_time(v: &Value) -> String {
    let s = cell(v);
    s.get(..19).map_or(s.clone(), |t| t.replace('T', " "))
}

fn print_json(v: &Value) {
    // Serializing a Value cannot fail.
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A path segment or query value, percent-encoded (all but RFC 3986's
/// unreserved characters).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
