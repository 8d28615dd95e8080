//! `nexus providers plan|apply`: provider registrations kept in a manifest
//! and reconciled with a broker, like a Terraform plan.
//!
//! The manifest is the reference implementation's `nexus-providers.yaml` as
//! it is: a `providers:` list of profiles (the shapes `POST /providers`
//! takes), with `${VAR}` replaced from the environment. An entry may start
//! from a catalogue template (`template: google` plus overrides), and an
//! optional `webhooks:` list manages webhook endpoints the same way
//! (matched by URL; the broker compares their secrets). The broker computes
//! every field change itself (`POST /providers/plan`), with its own
//! normalisation and the client secret compared in its vault, so a plan
//! shows exactly what the broker would store and never a secret. `apply`
//! sends each update and deletion with `If-Match` set to the version the
//! plan read: a provider someone changed in between is reported, not
//! overwritten.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::admin::{AdminArgs, AdminClient};
use crate::catalogue::{self, AddArgs, CatalogueArgs};

#[derive(Subcommand)]
pub enum ProvidersCommand {
    /// The provider templates built into this binary: endpoints, scopes and
    /// quirks from each provider's documentation, with the pages cited.
    #[command(after_help = "Examples:\n  \
        nexus providers catalogue\n  \
        nexus providers catalogue crm\n  \
        nexus providers catalogue microsoft --full")]
    Catalogue(CatalogueArgs),
    /// Register a provider from a catalogue template.
    #[command(after_help = "Examples:\n  \
        GOOGLE_SECRET=... nexus providers add google --client-id 123.apps.googleusercontent.com --client-secret-env GOOGLE_SECRET\n  \
        nexus providers add microsoft-entra --set tenant=contoso.onmicrosoft.com --client-id ... --client-secret-env ENTRA_SECRET\n  \
        nexus providers add openai --name openai-prod\n  \
        nexus providers add shopify --set shop=my-store --client-id ... --dry-run")]
    Add(AddArgs),
    /// Show what `apply` would change: each provider to create, to update
    /// (field by field), to delete (with --prune) or unchanged. Secrets show
    /// only as (set), (changed) or (removed).
    #[command(after_help = "Examples:\n  \
        nexus providers plan -f nexus-providers.yaml\n  \
        nexus providers plan --prune --detailed-exitcode   # exit 2 when there are changes")]
    Plan {
        #[command(flatten)]
        manifest: ManifestArgs,
        /// Exit 0 without changes, 2 with changes, 1 on an error.
        #[arg(long)]
        detailed_exitcode: bool,
        /// Save the plan (each provider's action and the version read) for
        /// `apply --plan`, which then refuses to run if anything moved.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Make the plan's changes: creations, then updates, then deletions
    /// (--prune). Asks first when run at a terminal.
    #[command(after_help = "Examples:\n  \
        nexus providers apply -f nexus-providers.yaml\n  \
        nexus providers apply --prune --auto-approve")]
    Apply {
        #[command(flatten)]
        manifest: ManifestArgs,
        /// Apply without asking.
        #[arg(long)]
        auto_approve: bool,
        /// Apply only if the broker and the manifest still give the plan
        /// saved by `plan --out` (a provider changed since is reported and
        /// nothing is changed).
        #[arg(long, value_name = "FILE")]
        plan: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct ManifestArgs {
    /// The manifest: a `providers:` list of provider profiles; `${VAR}` is
    /// replaced by the environment variable VAR.
    #[arg(short = 'f', long = "file", default_value = "nexus-providers.yaml")]
    file: PathBuf,
    /// Also delete the live providers the manifest does not list.
    #[arg(long)]
    prune: bool,
    #[command(flatten)]
    admin: AdminArgs,
}

/// What happens to one provider.
#[derive(Debug)]
enum Action {
    Create,
    Update {
        id: String,
        version: i64,
    },
    Unchanged,
    Delete {
        id: String,
        version: i64,
    },
    /// Live, not in the manifest, and no --prune.
    Orphan,
}

/// What a step manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Provider,
    Webhook,
}

#[derive(Debug)]
struct Step {
    kind: Kind,
    /// The provider's name, or `webhook <url>`.
    name: String,
    action: Action,
    /// `{field, before, after}` as the broker computed them.
    changes: Vec<Value>,
    /// The profile (or endpoint) to send (create and update).
    profile: Value,
}

/// One provider in a saved plan: what the plan does and the version it read.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Saved {
    name: String,
    action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<i64>,
}

impl Step {
    fn saved(&self) -> Saved {
        let (action, version) = match &self.action {
            Action::Create => ("create", None),
            Action::Update { version, .. } => ("update", Some(*version)),
            Action::Unchanged => ("none", None),
            Action::Delete { version, .. } => ("delete", Some(*version)),
            Action::Orphan => ("orphan", None),
        };
        Saved {
            name: self.name.clone(),
            action: action.into(),
            version,
        }
    }
}

/// The differences between a saved plan and the plan computed now.
fn stale(saved: &[Saved], now: &[Step]) -> Vec<String> {
    let now: Vec<Saved> = now.iter().map(Step::saved).collect();
    let mut out = Vec::new();
    for n in &now {
        match saved.iter().find(|s| s.name == n.name) {
            None => out.push(format!(
                "{}: not in the saved plan (now: {})",
                n.name, n.action
            )),
            Some(s) if s != n => out.push(format!(
                "{}: planned {}{}, now {}{}",
                n.name,
                s.action,
                s.version
                    .map(|v| format!(" at version {v}"))
                    .unwrap_or_default(),
                n.action,
                n.version
                    .map(|v| format!(" at version {v}"))
                    .unwrap_or_default(),
            )),
            Some(_) => {}
        }
    }
    for s in saved {
        if !now.iter().any(|n| n.name == s.name) {
            out.push(format!("{}: planned {}, now gone", s.name, s.action));
        }
    }
    out
}

/// `nexus providers ...`; returns the process's exit code.
pub async fn run(command: ProvidersCommand) -> Result<i32> {
    match command {
        ProvidersCommand::Catalogue(args) => {
            catalogue::list(&args)?;
            Ok(0)
        }
        ProvidersCommand::Add(args) => catalogue::add(args).await,
        ProvidersCommand::Plan {
            manifest,
            detailed_exitcode,
            out,
        } => {
            let (_, steps) = prepare(&manifest).await?;
            let changes = print_plan(&steps);
            if let Some(path) = out {
                let saved: Vec<Saved> = steps.iter().map(Step::saved).collect();
                let text = serde_json::to_string_pretty(&json!({ "providers": saved }))?;
                std::fs::write(&path, text + "\n")
                    .with_context(|| format!("writing the plan to {}", path.display()))?;
                println!("\nPlan saved to {} (apply it with --plan).", path.display());
            }
            if changes == 0 {
                println!("\nNo changes: the broker matches the manifest.");
            } else {
                println!("\nRun `nexus providers apply` to make these changes.");
            }
            Ok(if detailed_exitcode && changes > 0 {
                2
            } else {
                0
            })
        }
        ProvidersCommand::Apply {
            manifest,
            auto_approve,
            plan,
        } => {
            let (broker, steps) = prepare(&manifest).await?;
            let changes = print_plan(&steps);
            if let Some(path) = plan {
                #[derive(serde::Deserialize)]
                struct File {
                    providers: Vec<Saved>,
                }
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read the plan {}", path.display()))?;
                let file: File = serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a saved plan", path.display()))?;
                let moved = stale(&file.providers, &steps);
                if !moved.is_empty() {
                    println!(
                        "\nThe broker or the manifest changed since the plan in {} was made; \
                         nothing was changed (plan again):\n  {}",
                        path.display(),
                        moved.join("\n  ")
                    );
                    return Ok(1);
                }
            }
            if changes == 0 {
                println!("\nNo changes: the broker matches the manifest.");
                return Ok(0);
            }
            if !auto_approve && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                print!("\nMake these changes? Only 'yes' is accepted: ");
                std::io::Write::flush(&mut std::io::stdout())?;
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if answer.trim() != "yes" {
                    println!("Nothing changed.");
                    return Ok(1);
                }
            }
            apply(&broker, &steps).await
        }
    }
}

/// Reads the manifest and the broker's state and computes the steps.
async fn prepare(args: &ManifestArgs) -> Result<(AdminClient, Vec<Step>)> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read the manifest {}", args.file.display()))?;
    let Manifest {
        providers: entries,
        webhooks,
    } = manifest(&text, &args.file, &|name| std::env::var(name).ok())?;
    let broker = args.admin.client()?;
    let live = broker.ok(Method::GET, "/providers", None).await?;
    let live: BTreeMap<String, String> = live
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["name"].as_str()?.into(), p["id"].as_str()?.into())))
        .collect();
    println!(
        "Read {} providers from {}; the broker has {}.\n",
        entries.len(),
        args.file.display(),
        live.len()
    );
    let mut steps = Vec::new();
    let mut refused = Vec::new();
    for (name, profile) in &entries {
        let (status, plan) = broker
            .send(
                Method::POST,
                "/providers/plan",
                Some(json!({ "profile": profile })),
                None,
            )
            .await?;
        if status != StatusCode::OK {
            refused.push(format!(
                "  {name}: {}",
                plan["message"].as_str().unwrap_or("refused by the broker")
            ));
            continue;
        }
        let changes = plan["changes"].as_array().cloned().unwrap_or_default();
        let action = match plan["action"].as_str() {
            Some("create") => Action::Create,
            Some("update") => Action::Update {
                id: plan["id"].as_str().unwrap_or_default().into(),
                version: plan["version"].as_i64().unwrap_or_default(),
            },
            _ => Action::Unchanged,
        };
        steps.push(Step {
            kind: Kind::Provider,
            name: name.clone(),
            action,
            changes,
            profile: profile.clone(),
        });
    }
    if !refused.is_empty() {
        bail!(
            "the broker refuses {} of the manifest's providers (nothing was changed):\n{}",
            refused.len(),
            refused.join("\n")
        );
    }
    let listed: BTreeSet<&String> = entries.iter().map(|(n, _)| n).collect();
    for (name, id) in &live {
        if listed.contains(name) {
            continue;
        }
        let action = if args.prune {
            let (status, p) = broker
                .send(Method::GET, &format!("/providers/{id}"), None, None)
                .await?;
            if status != StatusCode::OK {
                bail!("reading the provider {name}: the broker answered {status}");
            }
            Action::Delete {
                id: id.clone(),
                version: p["version"].as_i64().unwrap_or_default(),
            }
        } else {
            Action::Orphan
        };
        steps.push(Step {
            kind: Kind::Provider,
            name: name.clone(),
            action,
            changes: Vec::new(),
            profile: Value::Null,
        });
    }
    if let Some(webhooks) = webhooks {
        webhook_steps(&broker, &webhooks, args.prune, &mut steps).await?;
    }
    Ok((broker, steps))
}

/// The steps for a manifest's `webhooks:` list: each endpoint planned by the
/// broker (matched by URL), and the API-made endpoints the list does not
/// name deleted with --prune. The one `WEBHOOK_URL` configures is left alone.
async fn webhook_steps(
    broker: &AdminClient,
    webhooks: &[(String, Value)],
    prune: bool,
    steps: &mut Vec<Step>,
) -> Result<()> {
    let mut refused = Vec::new();
    for (url, body) in webhooks {
        let (status, plan) = broker
            .send(Method::POST, "/webhooks/plan", Some(body.clone()), None)
            .await?;
        if status != StatusCode::OK {
            refused.push(format!(
                "  webhook {url}: {}",
                plan["message"].as_str().unwrap_or("refused by the broker")
            ));
            continue;
        }
        let id = plan["id"].as_str().unwrap_or_default().to_string();
        let action = match plan["action"].as_str() {
            Some("create") => Action::Create,
            Some("update") => Action::Update { id, version: 0 },
            _ => Action::Unchanged,
        };
        steps.push(Step {
            kind: Kind::Webhook,
            name: format!("webhook {url}"),
            action,
            changes: plan["changes"].as_array().cloned().unwrap_or_default(),
            profile: body.clone(),
        });
    }
    if !refused.is_empty() {
        bail!(
            "the broker refuses {} of the manifest's webhooks (nothing was changed):\n{}",
            refused.len(),
            refused.join("\n")
        );
    }
    let live = broker.ok(Method::GET, "/webhooks", None).await?;
    let listed: BTreeSet<&str> = webhooks.iter().map(|(u, _)| u.as_str()).collect();
    for w in live["webhooks"].as_array().into_iter().flatten() {
        let (Some(id), Some(url)) = (w["id"].as_str(), w["url"].as_str()) else {
            continue;
        };
        if w["managed_by"] == "env" || listed.contains(url) {
            continue;
        }
        steps.push(Step {
            kind: Kind::Webhook,
            name: format!("webhook {url}"),
            action: if prune {
                Action::Delete {
                    id: id.to_string(),
                    version: 0,
                }
            } else {
                Action::Orphan
            },
            changes: Vec::new(),
            profile: Value::Null,
        });
    }
    Ok(())
}

/// A manifest after `${VAR}` expansion and templates.
struct Manifest {
    /// Profiles by name.
    providers: Vec<(String, Value)>,
    /// Endpoints by URL, as `POST /webhooks` takes them; `None` when the
    /// manifest has no `webhooks:` key (then webhooks are not managed).
    webhooks: Option<Vec<(String, Value)>>,
}

/// The manifest's providers by name, `${VAR}` replaced through `lookup`.
/// Every unset variable is named at once, before anything is done.
fn manifest(text: &str, file: &Path, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Manifest> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Parsed {
        #[serde(default)]
        providers: Vec<Value>,
        #[serde(default)]
        webhooks: Option<Vec<Value>>,
    }
    let parsed: Parsed = serde_yaml_ng::from_str(text).map_err(|e| match e.location() {
        Some(at) => anyhow::anyhow!("{}:{}:{}: {e}", file.display(), at.line(), at.column()),
        None => anyhow::anyhow!("{}: {e}", file.display()),
    })?;
    let mut unset = Vec::new();
    let mut out: Vec<(String, Value)> = Vec::new();
    for (i, mut entry) in parsed.providers.into_iter().enumerate() {
        // A template entry is named after its template unless it says otherwise.
        let Some(name) = entry
            .get("name")
            .or_else(|| entry.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string)
        else {
            bail!(
                "{}: providers[{i}] has no name (a string): the name is how a provider is matched",
                file.display()
            );
        };
        if out.iter().any(|(n, _)| *n == name) {
            bail!("{}: the provider {name} is listed twice", file.display());
        }
        expand(&mut entry, &name, lookup, &mut unset);
        out.push((name, entry));
    }
    // `webhooks: []` manages endpoints too: with --prune it deletes those the
    // API made. Without the key, webhooks are left alone.
    let mut webhooks: Option<Vec<(String, Value)>> = parsed.webhooks.as_ref().map(|_| Vec::new());
    for (i, mut entry) in parsed.webhooks.into_iter().flatten().enumerate() {
        let Some(list) = webhooks.as_mut() else { break };
        let Some(url) = entry.get("url").and_then(Value::as_str).map(str::to_string) else {
            bail!(
                "{}: webhooks[{i}] has no url (a string): the URL is how an endpoint is matched",
                file.display()
            );
        };
        if list.iter().any(|(u, _)| *u == url) {
            bail!("{}: the webhook {url} is listed twice", file.display());
        }
        expand(&mut entry, &format!("webhook {url}"), lookup, &mut unset);
        list.push((url, entry));
    }
    if !unset.is_empty() {
        bail!(
            "{}: {} unset environment variable(s), nothing was done:\n{}",
            file.display(),
            unset.len(),
            unset
                .iter()
                .map(|(var, at)| format!("  {var} (in {at})"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let mut providers = Vec::with_capacity(out.len());
    for (i, (name, entry)) in out.into_iter().enumerate() {
        let profile = catalogue::resolve_entry(entry)
            .map_err(|e| anyhow::anyhow!("{}: providers[{i}] ({name}): {e}", file.display()))?;
        providers.push((name, profile));
    }
    Ok(Manifest {
        providers,
        webhooks,
    })
}

/// Replaces `${VAR}` in every string of `v`; records unset variables with
/// where they are (`provider.field`).
fn expand(
    v: &mut Value,
    at: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    unset: &mut Vec<(String, String)>,
) {
    match v {
        Value::String(s) => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let Some(end) = after.find('}') else {
                    out.push_str(&rest[start..]);
                    rest = "";
                    break;
                };
                let var = &after[..end];
                let valid = !var.is_empty()
                    && !var.starts_with(|c: char| c.is_ascii_digit())
                    && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    // Not a variable reference: kept as written.
                    out.push_str(&rest[start..start + 2 + end + 1]);
                } else if let Some(value) = lookup(var) {
                    out.push_str(&value);
                } else {
                    unset.push((var.to_string(), at.to_string()));
                }
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        Value::Array(items) => {
            for item in items {
                expand(item, at, lookup, unset);
            }
        }
        Value::Object(fields) => {
            for (k, item) in fields.iter_mut() {
                expand(item, &format!("{at}.{k}"), lookup, unset);
            }
        }
        _ => {}
    }
}

/// A value as a plan line shows it: the secret markers bare, the rest JSON.
fn shown(v: &Value) -> String {
    match v.as_str() {
        Some(s) if s.starts_with('(') && s.ends_with(')') => s.to_string(),
        _ => v.to_string(),
    }
}

/// Prints the plan; returns how many changes it holds.
fn print_plan(steps: &[Step]) -> usize {
    let (mut create, mut update, mut delete, mut same) = (0, 0, 0, 0);
    for s in steps {
        match &s.action {
            Action::Create => {
                create += 1;
                println!("+ create {}", s.name);
                for c in &s.changes {
                    println!(
                        "    {}: {}",
                        c["field"].as_str().unwrap_or("?"),
                        shown(&c["after"])
                    );
                }
            }
            Action::Update { .. } => {
                update += 1;
                println!("~ update {}", s.name);
                for c in &s.changes {
                    println!(
                        "    {}: {} -> {}",
                        c["field"].as_str().unwrap_or("?"),
                        shown(&c["before"]),
                        shown(&c["after"])
                    );
                }
            }
            Action::Unchanged => {
                same += 1;
                println!("= unchanged {}", s.name);
            }
            Action::Delete { .. } => {
                delete += 1;
                println!("- delete {}", s.name);
            }
            Action::Orphan => {
                println!(
                    "! orphan {} (not in the manifest; --prune deletes it)",
                    s.name
                );
            }
        }
    }
    println!(
        "\nPlan: {create} to create, {update} to update, {delete} to delete, {same} unchanged."
    );
    create + update + delete
}

/// Makes the changes; 0 when all were made, 1 otherwise.
async fn apply(broker: &AdminClient, steps: &[Step]) -> Result<i32> {
    println!();
    let mut failed = 0;
    let order = |a: &Action| match a {
        Action::Create => 0,
        Action::Update { .. } => 1,
        Action::Delete { .. } => 2,
        _ => 3,
    };
    let mut todo: Vec<&Step> = steps.iter().filter(|s| order(&s.action) < 3).collect();
    todo.sort_by_key(|s| order(&s.action));
    for s in todo {
        if s.kind == Kind::Webhook {
            failed += apply_webhook(broker, s).await?;
            continue;
        }
        let (verb, result) = match &s.action {
            Action::Create => (
                "created",
                broker
                    .send(
                        Method::POST,
                        "/providers",
                        Some(json!({"profile": s.profile})),
                        None,
                    )
                    .await?,
            ),
            Action::Update { id, version } => (
                "updated",
                broker
                    .send(
                        Method::PUT,
                        &format!("/providers/{id}"),
                        Some(json!({"profile": s.profile})),
                        Some(*version),
                    )
                    .await?,
            ),
            Action::Delete { id, version } => (
                "deleted",
                broker
                    .send(
                        Method::DELETE,
                        &format!("/providers/{id}"),
                        None,
                        Some(*version),
                    )
                    .await?,
            ),
            Action::Unchanged | Action::Orphan => continue,
        };
        match result {
            (status, _) if status.is_success() => println!("{verb} {}", s.name),
            (StatusCode::PRECONDITION_FAILED, body) => {
                failed += 1;
                println!(
                    "NOT {verb} {}: someone changed it since this plan read it (now version {}); \
                     it was not overwritten. Plan again.",
                    s.name, body["version"]
                );
            }
            (status, body) => {
                failed += 1;
                println!(
                    "NOT {verb} {}: the broker answered {status}: {}",
                    s.name,
                    body["message"].as_str().unwrap_or("no message")
                );
            }
        }
    }
    if failed > 0 {
        println!("\n{failed} change(s) not made; the others were.");
        return Ok(1);
    }
    println!("\nApply complete.");
    Ok(0)
}

/// One webhook step; returns 1 when it was not made.
async fn apply_webhook(broker: &AdminClient, s: &Step) -> Result<usize> {
    let (verb, (status, body)) = match &s.action {
        Action::Create => (
            "created",
            broker
                .send(Method::POST, "/webhooks", Some(s.profile.clone()), None)
                .await?,
        ),
        Action::Update { id, .. } => (
            "updated",
            broker
                .send(
                    Method::PUT,
                    &format!("/webhooks/{id}"),
                    Some(s.profile.clone()),
                    None,
                )
                .await?,
        ),
        Action::Delete { id, .. } => (
            "deleted",
            broker
                .send(Method::DELETE, &format!("/webhooks/{id}"), None, None)
                .await?,
        ),
        Action::Unchanged | Action::Orphan => return Ok(0),
    };
    if !status.is_success() {
        println!(
            "NOT {verb} {}: the broker answered {status}: {}",
            s.name,
            body["message"].as_str().unwrap_or("no message")
        );
        return Ok(1);
    }
    println!("{verb} {}", s.name);
    // The manifest gave no secret: the broker made one, shown this once.
    if let Some(secret) = body["secret"].as_str() {
        println!("  signing secret (shown once; give it to the receiver): {secret}");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(name: &str) -> Option<String> {
        match name {
            "ID" => Some("client-1".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn variables_are_expanded_and_every_unset_one_named() {
        let text = "providers:\n  - name: a\n    client_id: \"${ID}\"\n    client_secret: \"pre-${EMPTY}-${ID}\"\n    params: {note: \"cost: ${ not a var } $ID ${1X}\"}\n";
        let got = manifest(text, Path::new("m.yaml"), &vars)
            .unwrap()
            .providers;
        assert_eq!(got[0].1["client_id"], "client-1");
        assert_eq!(got[0].1["client_secret"], "pre--client-1");
        assert_eq!(
            got[0].1["params"]["note"], "cost: ${ not a var } $ID ${1X}",
            "only ${{NAME}} is a reference"
        );
        let text = "providers:\n  - name: a\n    client_id: \"${A_ID}\"\n  - name: b\n    client_secret: \"${B_SECRET}\"\n    scopes: [\"${ID}\", \"${B_SCOPE}\"]\n";
        let e = manifest(text, Path::new("m.yaml"), &vars)
            .err()
            .expect("refused")
            .to_string();
        for want in [
            "3 unset",
            "A_ID (in a.client_id)",
            "B_SECRET (in b.client_secret)",
            "B_SCOPE (in b.scopes)",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn malformed_manifests_are_refused_with_where() {
        let e = manifest(
            "providers:\n  - name: a\n   auth_type: x\n",
            Path::new("m.yaml"),
            &vars,
        )
        .err()
        .expect("refused")
        .to_string();
        assert!(e.starts_with("m.yaml:3:"), "{e}");
        let e = manifest("provider:\n  - name: a\n", Path::new("m.yaml"), &vars)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("unknown field `provider`"), "{e}");
        let e = manifest(
            "providers:\n  - name: a\n  - name: a\n",
            Path::new("m.yaml"),
            &vars,
        )
        .err()
        .expect("refused")
        .to_string();
        assert!(e.contains("listed twice"), "{e}");
        let e = manifest(
            "providers:\n  - auth_type: oauth2\n",
            Path::new("m.yaml"),
            &vars,
        )
        .err()
        .expect("refused")
        .to_string();
        assert!(e.contains("providers[0] has no name"), "{e}");
        let e = manifest(
            "webhooks:\n  - events: [\"*\"]\n",
            Path::new("m.yaml"),
            &vars,
        )
        .err()
        .expect("refused")
        .to_string();
        assert!(e.contains("webhooks[0] has no url"), "{e}");
        let e = manifest(
            "providers:\n  - template: google\n    placeholders: {tenant: x}\n",
            Path::new("m.yaml"),
            &vars,
        )
        .err()
        .expect("refused")
        .to_string();
        assert!(
            e.contains("providers[0] (google): template 'google' has no placeholder 'tenant'"),
            "{e}"
        );
    }

    #[test]
    fn webhooks_are_managed_only_when_the_manifest_has_the_key() {
        let m = manifest("providers: []\n", Path::new("m.yaml"), &vars).unwrap();
        assert!(m.webhooks.is_none());
        let m = manifest("webhooks: []\n", Path::new("m.yaml"), &vars).unwrap();
        assert_eq!(m.webhooks.unwrap().len(), 0);
        let m = manifest(
            "webhooks:\n  - url: https://hooks.example.com/n\n    secret: \"${ID}\"\n",
            Path::new("m.yaml"),
            &vars,
        )
        .unwrap();
        let w = m.webhooks.unwrap();
        assert_eq!(w[0].0, "https://hooks.example.com/n");
        assert_eq!(w[0].1["secret"], "client-1");
        let e = manifest(
            "webhooks:\n  - url: https://h.example.com/\n    secret: \"${HOOK_SECRET}\"\n",
            Path::new("m.yaml"),
            &vars,
        )
        .err()
        .expect("refused")
        .to_string();
        assert!(
            e.contains("HOOK_SECRET (in webhook https://h.example.com/.secret)"),
            "{e}"
        );
    }
}
