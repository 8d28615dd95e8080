//! `nexus providers catalogue|add`: the provider templates compiled into the
//! binary (`nexus_broker::registry::catalogue`), listed, shown, and
//! registered with the operator's client credentials; and `template:`
//! entries of a manifest.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use clap::Args;
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};

use nexus_broker::registry::catalogue::{self, Template};

use crate::admin::AdminArgs;
use crate::operate::Output;

/// `nexus providers catalogue [SEARCH]`.
#[derive(Args)]
pub struct CatalogueArgs {
    /// Words that must all appear in a template's id, name, category or
    /// description (case-insensitive); all templates without.
    search: Vec<String>,
    /// Show each match whole: placeholders, quirks, documentation, profile.
    #[arg(long)]
    full: bool,
    /// Table for a person, JSON for scripts.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

/// `nexus providers add TEMPLATE`.
#[derive(Args)]
pub struct AddArgs {
    /// The template's id (`nexus providers catalogue` lists them).
    template: String,
    /// Provider name (default: the template's id).
    #[arg(long)]
    name: Option<String>,
    /// OAuth client id registered with the provider.
    #[arg(long)]
    client_id: Option<String>,
    /// Environment variable holding the OAuth client secret (never a flag:
    /// flags end up in shell history and process lists).
    #[arg(long, value_name = "VAR")]
    client_secret_env: Option<String>,
    /// A placeholder's value, e.g. `--set tenant=contoso.onmicrosoft.com`.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Scopes instead of the template's defaults (repeat, or space-separated).
    #[arg(long)]
    scopes: Vec<String>,
    /// Print the profile that would be registered (secret shown as (set)) and
    /// register nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    admin: AdminArgs,
}

/// Lists or shows templates.
pub fn list(args: &CatalogueArgs) -> Result<()> {
    let found = catalogue::search(&args.search.join(" "))?;
    if let Output::Json = args.output {
        let v: Vec<&Template> = found;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    if found.is_empty() {
        println!(
            "No template matches '{}'. `nexus providers catalogue` lists all {}.",
            args.search.join(" "),
            catalogue::all()?.len()
        );
        return Ok(());
    }
    if args.full {
        for t in &found {
            show(t);
        }
        return Ok(());
    }
    println!(
        "{:<16}  {:<20}  {:<14}  {:<12}  {:<18}  description",
        "id", "name", "category", "auth", "placeholders"
    );
    for t in &found {
        let ph: Vec<&str> = t.placeholders.iter().map(|p| p.name.as_str()).collect();
        println!(
            "{:<16}  {:<20}  {:<14}  {:<12}  {:<18}  {}",
            t.id,
            t.name,
            t.category,
            t.auth_type(),
            if ph.is_empty() {
                "-".into()
            } else {
                ph.join(" ")
            },
            t.description
        );
    }
    println!(
        "\n{} of {} templates. `--full` shows quirks and sources; `nexus providers add ID` registers one.",
        found.len(),
        catalogue::all()?.len()
    );
    Ok(())
}

fn show(t: &Template) {
    println!("{} ({}): {}", t.id, t.name, t.description);
    println!("  category: {}   auth: {}", t.category, t.auth_type());
    for p in &t.placeholders {
        println!(
            "  placeholder {}: {}{}",
            p.name,
            p.description,
            p.default
                .as_ref()
                .map(|d| format!(" (default {d})"))
                .unwrap_or_default()
        );
    }
    println!("  quirks:");
    for q in &t.quirks {
        println!("    - {q}");
    }
    println!("  documentation:");
    for d in &t.docs {
        println!("    {d}");
    }
    // Serializing a Value cannot fail.
    let profile = serde_json::to_string_pretty(&t.profile).unwrap_or_default();
    println!("  profile:\n    {}\n", profile.replace('\n', "\n    "));
}

/// `NAME=VALUE` pairs.
fn pairs(set: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for s in set {
        let Some((k, v)) = s.split_once('=') else {
            bail!("--set {s}: expected NAME=VALUE");
        };
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// Registers a provider from a template; returns the exit code.
pub async fn add(args: AddArgs) -> Result<i32> {
    let t = catalogue::get(&args.template)?;
    let mut overrides = Map::new();
    if let Some(name) = &args.name {
        overrides.insert("name".into(), json!(name));
    }
    if !t.is_oauth() && (args.client_id.is_some() || args.client_secret_env.is_some()) {
        bail!(
            "{} is a static-credential provider: it takes no client id or secret \
             (each person enters their own key when connecting)",
            t.id
        );
    }
    if t.is_oauth() {
        let Some(id) = &args.client_id else {
            bail!(
                "{} is an OAuth provider: --client-id is required (the id of the app you registered with {})",
                t.id,
                t.name
            );
        };
        overrides.insert("client_id".into(), json!(id));
    }
    if let Some(var) = &args.client_secret_env {
        let secret = std::env::var(var)
            .with_context(|| format!("--client-secret-env {var}: the variable is not set"))?;
        if secret.trim().is_empty() {
            bail!("--client-secret-env {var}: the variable is empty");
        }
        overrides.insert("client_secret".into(), json!(secret));
    }
    if !args.scopes.is_empty() {
        let scopes: Vec<&str> = args
            .scopes
            .iter()
            .flat_map(|s| s.split_whitespace())
            .collect();
        overrides.insert("scopes".into(), json!(scopes));
    }
    let profile = t.render(&pairs(&args.set)?, &overrides)?;
    if args.dry_run {
        let mut shown = profile.clone();
        if shown.get("client_secret").is_some() {
            shown["client_secret"] = json!("(set)");
        }
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(0);
    }
    let broker = args.admin.client()?;
    let (status, body) = broker
        .send(
            Method::POST,
            "/providers",
            Some(json!({ "profile": profile })),
            None,
        )
        .await?;
    if status != StatusCode::CREATED {
        eprintln!(
            "The broker refused {} ({status}): {}",
            profile["name"].as_str().unwrap_or(&t.id),
            body["message"].as_str().unwrap_or("no message")
        );
        return Ok(1);
    }
    let id = body["id"].as_str().unwrap_or_default();
    println!(
        "Registered {} from the {} template: {id}",
        profile["name"].as_str().unwrap_or(&t.id),
        t.id
    );
    if t.is_oauth() {
        let (_, p) = broker
            .send(Method::GET, &format!("/providers/{id}"), None, None)
            .await?;
        if let Some(uri) = p["redirect_uri"].as_str() {
            println!("Redirect URI to register with {}: {uri}", t.name);
        }
    }
    println!("\nBefore connecting:");
    for q in &t.quirks {
        println!("  - {q}");
    }
    Ok(0)
}

/// A manifest entry with `template:` made into a profile: `placeholders:`
/// fill the template's placeholders, and every other field overrides the
/// template's (`params` merged key by key). Entries without `template:` are
/// returned as they are.
pub fn resolve_entry(entry: Value) -> std::result::Result<Value, String> {
    let Value::Object(mut fields) = entry else {
        return Err("must be a mapping".into());
    };
    let Some(template) = fields.remove("template") else {
        if fields.contains_key("placeholders") {
            return Err("placeholders: applies only with template:".into());
        }
        return Ok(Value::Object(fields));
    };
    let Some(template) = template.as_str() else {
        return Err("template must be a template id (a string)".into());
    };
    let t = catalogue::get(template).map_err(|e| e.to_string())?;
    let mut values = BTreeMap::new();
    match fields.remove("placeholders") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let Some(v) = v.as_str() else {
                    return Err(format!("placeholders.{k} must be a string"));
                };
                values.insert(k, v.to_string());
            }
        }
        Some(_) => return Err("placeholders must be a mapping of name: value".into()),
    }
    t.render(&values, &fields).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_entries_take_a_template_and_overrides() {
        let e = json!({"template": "google", "name": "gmail", "client_id": "c",
            "scopes": ["openid"], "params": {"hd": "example.com"}});
        let p = resolve_entry(e).unwrap();
        assert_eq!(p["name"], "gmail");
        assert_eq!(p["issuer"], "https://accounts.google.com");
        assert_eq!(p["scopes"], json!(["openid"]));
        assert_eq!(p["params"]["access_type"], "offline");
        assert_eq!(p["params"]["hd"], "example.com");
        let plain = json!({"name": "x", "auth_type": "oauth2"});
        assert_eq!(resolve_entry(plain.clone()).unwrap(), plain);
        for (bad, want) in [
            (json!({"template": "nope"}), "no template 'nope'"),
            (json!({"template": 3}), "template must be"),
            (
                json!({"template": "google", "placeholders": {"tenant": "x"}}),
                "no placeholder 'tenant'",
            ),
            (
                json!({"name": "x", "placeholders": {}}),
                "only with template",
            ),
        ] {
            let e = resolve_entry(bad).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn set_pairs_need_an_equals_sign() {
        assert_eq!(
            pairs(&["tenant=contoso".into()]).unwrap()["tenant"],
            "contoso"
        );
        assert!(pairs(&["tenant".into()]).is_err());
    }
}
