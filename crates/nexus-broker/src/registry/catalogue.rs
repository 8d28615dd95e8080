//! The provider catalogue: templates for the providers people connect agents
//! to, with the endpoints, scopes, authorize parameters and quirks their own
//! documentation states. The templates are data files
//! (`crates/nexus-broker/catalogue/<id>.toml`, format in the README beside
//! them) compiled into the binary, so the catalogue works offline and a
//! change to a provider is reviewed like code.
//!
//! A template becomes a provider profile by [`Template::render`]: its
//! placeholders filled in (a tenant, a shop, a My Domain host), then the
//! operator's overrides (client id and secret, scopes, name) laid over it.
//! The result still goes through the registry's validation when registered.
//!
//! ```
//! use std::collections::BTreeMap;
//! use nexus_broker::registry::catalogue;
//! let google = catalogue::get("google").unwrap();
//! let overrides = serde_json::json!({"client_id": "my-client"});
//! let profile = google.render(&BTreeMap::new(), overrides.as_object().unwrap()).unwrap();
//! assert_eq!(profile["name"], "google");
//! assert_eq!(profile["params"]["access_type"], "offline");
//! ```

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The template files, by id. A test checks this list against the folder.
const FILES: &[(&str, &str)] = &[
    ("airtable", include_str!("../../catalogue/airtable.toml")),
    ("anthropic", include_str!("../../catalogue/anthropic.toml")),
    ("asana", include_str!("../../catalogue/asana.toml")),
    ("atlassian", include_str!("../../catalogue/atlassian.toml")),
    ("aws", include_str!("../../catalogue/aws.toml")),
    ("box", include_str!("../../catalogue/box.toml")),
    (
        "brave-search",
        include_str!("../../catalogue/brave-search.toml"),
    ),
    ("calendly", include_str!("../../catalogue/calendly.toml")),
    (
        "cloudflare",
        include_str!("../../catalogue/cloudflare.toml"),
    ),
    ("cohere", include_str!("../../catalogue/cohere.toml")),
    ("datadog", include_str!("../../catalogue/datadog.toml")),
    ("discord", include_str!("../../catalogue/discord.toml")),
    ("docusign", include_str!("../../catalogue/docusign.toml")),
    ("dropbox", include_str!("../../catalogue/dropbox.toml")),
    ("gemini", include_str!("../../catalogue/gemini.toml")),
    ("github", include_str!("../../catalogue/github.toml")),
    ("gitlab", include_str!("../../catalogue/gitlab.toml")),
    ("google", include_str!("../../catalogue/google.toml")),
    ("groq", include_str!("../../catalogue/groq.toml")),
    ("hubspot", include_str!("../../catalogue/hubspot.toml")),
    (
        "hugging-face",
        include_str!("../../catalogue/hugging-face.toml"),
    ),
    ("linear", include_str!("../../catalogue/linear.toml")),
    ("mailgun", include_str!("../../catalogue/mailgun.toml")),
    (
        "microsoft-entra",
        include_str!("../../catalogue/microsoft-entra.toml"),
    ),
    ("miro", include_str!("../../catalogue/miro.toml")),
    ("mistral", include_str!("../../catalogue/mistral.toml")),
    ("monday", include_str!("../../catalogue/monday.toml")),
    ("notion", include_str!("../../catalogue/notion.toml")),
    ("okta", include_str!("../../catalogue/okta.toml")),
    ("openai", include_str!("../../catalogue/openai.toml")),
    ("pagerduty", include_str!("../../catalogue/pagerduty.toml")),
    ("pinecone", include_str!("../../catalogue/pinecone.toml")),
    ("pipedrive", include_str!("../../catalogue/pipedrive.toml")),
    ("postmark", include_str!("../../catalogue/postmark.toml")),
    (
        "quickbooks",
        include_str!("../../catalogue/quickbooks.toml"),
    ),
    ("resend", include_str!("../../catalogue/resend.toml")),
    (
        "salesforce",
        include_str!("../../catalogue/salesforce.toml"),
    ),
    ("sendgrid", include_str!("../../catalogue/sendgrid.toml")),
    ("sentry", include_str!("../../catalogue/sentry.toml")),
    ("shopify", include_str!("../../catalogue/shopify.toml")),
    ("slack", include_str!("../../catalogue/slack.toml")),
    ("spotify", include_str!("../../catalogue/spotify.toml")),
    ("stripe", include_str!("../../catalogue/stripe.toml")),
    ("todoist", include_str!("../../catalogue/todoist.toml")),
    ("twilio", include_str!("../../catalogue/twilio.toml")),
    ("x", include_str!("../../catalogue/x.toml")),
    ("xero", include_str!("../../catalogue/xero.toml")),
    ("zendesk", include_str!("../../catalogue/zendesk.toml")),
    ("zoom", include_str!("../../catalogue/zoom.toml")),
];

/// A value the operator supplies for `{name}` in a template's strings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placeholder {
    /// Written `{name}` in the profile's strings.
    pub name: String,
    /// What to put there.
    pub description: String,
    /// Used when the operator gives no value; without one a value is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
}

/// One provider template.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// The file name and the default provider name.
    pub id: String,
    /// The provider's name as people know it.
    pub name: String,
    /// A grouping such as "productivity" or "ai".
    pub category: String,
    /// One line on what the provider gives agents.
    pub description: String,
    /// The documentation pages the template was taken from.
    pub docs: Vec<String>,
    /// What an operator must know about the provider.
    pub quirks: Vec<String>,
    /// Values to fill in before the profile is usable.
    #[serde(default)]
    pub placeholders: Vec<Placeholder>,
    /// A `POST /providers` profile without name, client id or secret.
    pub profile: Value,
}

/// A template could not be found or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogueError {
    /// No template has this id.
    #[error("no template '{0}' in the catalogue (`nexus providers catalogue` lists them)")]
    Unknown(String),
    /// Placeholders without a value or a default.
    #[error("template '{template}' needs a value for {}: {}", .missing.join(", "), .hints.join("; "))]
    Missing {
        /// The template.
        template: String,
        /// Placeholder names.
        missing: Vec<String>,
        /// `name: description` for each.
        hints: Vec<String>,
    },
    /// A value for a placeholder the template does not have.
    #[error("template '{template}' has no placeholder '{name}' ({known})")]
    UnknownPlaceholder {
        /// The template.
        template: String,
        /// The name given.
        name: String,
        /// What it has, in words.
        known: String,
    },
    /// A placeholder value that could change a URL around it.
    #[error("placeholder '{name}' must be 1 to 253 letters, digits, '.' or '-' (starting with a letter or digit)")]
    BadValue {
        /// The placeholder.
        name: String,
    },
    /// An override that is not a JSON object where one is needed.
    #[error("{0}")]
    BadOverride(String),
    /// A compiled-in file does not parse (caught by the catalogue's tests).
    #[error("catalogue file {file}.toml is malformed: {message}")]
    Malformed {
        /// The template id.
        file: String,
        /// The parser's message.
        message: String,
    },
}

fn parse_all() -> Result<Vec<Template>, CatalogueError> {
    let mut out = Vec::with_capacity(FILES.len());
    for (id, text) in FILES {
        let t: Template = toml::from_str(text).map_err(|e| CatalogueError::Malformed {
            file: (*id).to_string(),
            message: e.to_string(),
        })?;
        if t.id != *id {
            return Err(CatalogueError::Malformed {
                file: (*id).to_string(),
                message: format!("id is '{}', not the file name", t.id),
            });
        }
        out.push(t);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Every template, sorted by id (parsed once).
pub fn all() -> Result<&'static [Template], CatalogueError> {
    static CATALOGUE: OnceLock<Result<Vec<Template>, CatalogueError>> = OnceLock::new();
    match CATALOGUE.get_or_init(parse_all) {
        Ok(v) => Ok(v),
        Err(e) => Err(e.clone()),
    }
}

/// The template with this id (case-insensitive).
pub fn get(id: &str) -> Result<&'static Template, CatalogueError> {
    let id = id.trim().to_ascii_lowercase();
    all()?
        .iter()
        .find(|t| t.id == id)
        .ok_or(CatalogueError::Unknown(id))
}

/// Templates whose id, name, category or description contain every word of
/// `query` (case-insensitive); all of them for an empty query.
pub fn search(query: &str) -> Result<Vec<&'static Template>, CatalogueError> {
    let words: Vec<String> = query.split_whitespace().map(str::to_lowercase).collect();
    Ok(all()?
        .iter()
        .filter(|t| {
            let hay =
                format!("{} {} {} {}", t.id, t.name, t.category, t.description).to_lowercase();
            words.iter().all(|w| hay.contains(w.as_str()))
        })
        .collect())
}

/// A placeholder value must stay inside the URL component it fills: a host
/// label, a domain or a tenant id, never a `/`, `@`, `:` or `?`.
fn value_ok(v: &str) -> bool {
    (1..=253).contains(&v.len())
        && v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
}

fn fill(value: &mut Value, values: &BTreeMap<&str, &str>) {
    match value {
        Value::String(s) => {
            for (name, v) in values {
                let mark = format!("{{{name}}}");
                if s.contains(&mark) {
                    *s = s.replace(&mark, v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| fill(i, values)),
        Value::Object(map) => map.values_mut().for_each(|i| fill(i, values)),
        _ => {}
    }
}

impl Template {
    /// True for templates whose connections are made by consent (OAuth).
    pub fn is_oauth(&self) -> bool {
        self.auth_type() == "oauth2"
    }

    /// The profile's `auth_type`.
    pub fn auth_type(&self) -> &str {
        self.profile
            .get("auth_type")
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// The profile this template gives with these placeholder `values` and
    /// `overrides` laid over it: top-level fields replace the template's
    /// (`null` removes one), and `params` is merged key by key. The name
    /// defaults to the template's id.
    pub fn render(
        &self,
        values: &BTreeMap<String, String>,
        overrides: &Map<String, Value>,
    ) -> Result<Value, CatalogueError> {
        let names: Vec<&str> = self.placeholders.iter().map(|p| p.name.as_str()).collect();
        if let Some(unknown) = values.keys().find(|k| !names.contains(&k.as_str())) {
            return Err(CatalogueError::UnknownPlaceholder {
                template: self.id.clone(),
                name: unknown.clone(),
                known: if names.is_empty() {
                    "it has none".into()
                } else {
                    format!("it has: {}", names.join(", "))
                },
            });
        }
        let mut filled: BTreeMap<&str, &str> = BTreeMap::new();
        let (mut missing, mut hints) = (Vec::new(), Vec::new());
        for p in &self.placeholders {
            match values.get(&p.name).or(p.default.as_ref()) {
                Some(v) if value_ok(v) => {
                    filled.insert(&p.name, v);
                }
                Some(_) => {
                    return Err(CatalogueError::BadValue {
                        name: p.name.clone(),
                    })
                }
                None => {
                    missing.push(p.name.clone());
                    hints.push(format!("{}: {}", p.name, p.description));
                }
            }
        }
        if !missing.is_empty() {
            return Err(CatalogueError::Missing {
                template: self.id.clone(),
                missing,
                hints,
            });
        }
        let mut profile = self.profile.clone();
        fill(&mut profile, &filled);
        let Value::Object(obj) = &mut profile else {
            return Err(CatalogueError::Malformed {
                file: self.id.clone(),
                message: "profile is not a table".into(),
            });
        };
        obj.insert("name".into(), Value::String(self.id.clone()));
        obj.entry("description")
            .or_insert_with(|| Value::String(self.description.clone()));
        obj.entry("category")
            .or_insert_with(|| Value::String(self.category.clone()));
        for (k, v) in overrides {
            match (k.as_str(), v) {
                ("params", Value::Object(extra)) => {
                    let params = obj
                        .entry("params")
                        .or_insert_with(|| Value::Object(Map::new()));
                    let Value::Object(params) = params else {
                        return Err(CatalogueError::Malformed {
                            file: self.id.clone(),
                            message: "params is not a table".into(),
                        });
                    };
                    for (pk, pv) in extra {
                        if pv.is_null() {
                            params.remove(pk);
                        } else {
                            params.insert(pk.clone(), pv.clone());
                        }
                    }
                }
                ("params", Value::Null) => {
                    obj.remove("params");
                }
                ("params", _) => {
                    return Err(CatalogueError::BadOverride(
                        "params must be a mapping (its keys are merged into the template's)".into(),
                    ))
                }
                (_, Value::Null) => {
                    obj.remove(k);
                }
                _ => {
                    obj.insert(k.clone(), v.clone());
                }
            }
        }
        Ok(profile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::profile::parse_profile;
    use serde_json::json;

    fn example_values(t: &Template) -> BTreeMap<String, String> {
        t.placeholders
            .iter()
            .filter(|p| p.default.is_none())
            .map(|p| (p.name.clone(), "example".to_string()))
            .collect()
    }

    #[test]
    fn every_file_in_the_folder_is_compiled_in() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/catalogue");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter_map(|n| n.strip_suffix(".toml").map(str::to_string))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = FILES.iter().map(|(id, _)| id.to_string()).collect();
        listed.sort();
        assert_eq!(
            on_disk, listed,
            "FILES in catalogue.rs and the folder differ"
        );
    }

    #[test]
    fn every_template_passes_the_registry_validation_and_cites_its_sources() {
        let all = all().unwrap();
        assert!(all.len() >= 2);
        for t in all {
            assert!(!t.docs.is_empty(), "{}: no docs", t.id);
            for d in &t.docs {
                let u = url::Url::parse(d).unwrap_or_else(|e| panic!("{}: {d}: {e}", t.id));
                assert_eq!(u.scheme(), "https", "{}: {d}", t.id);
            }
            assert!(!t.quirks.is_empty(), "{}: no quirks", t.id);
            assert!(
                t.id.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{}",
                t.id
            );
            for field in ["name", "client_id", "client_secret"] {
                assert!(t.profile.get(field).is_none(), "{}: sets {field}", t.id);
            }
            let mut overrides = Map::new();
            if t.is_oauth() {
                overrides.insert("client_id".into(), json!("catalogue-test-client"));
            }
            let rendered = t
                .render(&example_values(t), &overrides)
                .unwrap_or_else(|e| panic!("{}: {e}", t.id));
            let text = rendered.to_string();
            for p in &t.placeholders {
                assert!(
                    !text.contains(&format!("{{{}}}", p.name)),
                    "{}: {{{}}} left after rendering",
                    t.id,
                    p.name
                );
            }
            let mut profile = parse_profile(rendered).unwrap_or_else(|e| panic!("{}: {e}", t.id));
            profile
                .validate()
                .unwrap_or_else(|e| panic!("{}: {e}", t.id));
        }
    }

    #[test]
    fn placeholders_are_required_checked_and_confined() {
        let mut t = get("google").unwrap().clone();
        t.placeholders.push(Placeholder {
            name: "tenant".into(),
            description: "the directory".into(),
            default: None,
        });
        t.profile["auth_url"] = json!("https://login.example.com/{tenant}/authorize");
        let e = t.render(&BTreeMap::new(), &Map::new()).unwrap_err();
        assert!(
            matches!(&e, CatalogueError::Missing { missing, .. } if missing == &["tenant"]),
            "{e}"
        );
        assert!(e.to_string().contains("the directory"), "{e}");
        for bad in ["evil.com/x", "a@b", "x:1", "", "-x", "a?b", "a b"] {
            let v = BTreeMap::from([("tenant".to_string(), bad.to_string())]);
            assert!(
                matches!(
                    t.render(&v, &Map::new()),
                    Err(CatalogueError::BadValue { .. })
                ),
                "{bad:?} accepted"
            );
        }
        let v = BTreeMap::from([("tenant".to_string(), "contoso.onmicrosoft.com".to_string())]);
        let p = t.render(&v, &Map::new()).unwrap();
        assert_eq!(
            p["auth_url"],
            "https://login.example.com/contoso.onmicrosoft.com/authorize"
        );
        let v = BTreeMap::from([("shop".to_string(), "x".to_string())]);
        assert!(matches!(
            t.render(&v, &Map::new()),
            Err(CatalogueError::UnknownPlaceholder { .. })
        ));
    }

    #[test]
    fn overrides_replace_fields_and_merge_params() {
        let t = get("google").unwrap();
        let overrides = json!({
            "name": "gmail",
            "client_id": "cid",
            "scopes": ["openid", "https://www.googleapis.com/auth/gmail.readonly"],
            "params": {"prompt": null, "hd": "example.com"},
            "revocation_url": null,
        });
        let p = t
            .render(&BTreeMap::new(), overrides.as_object().unwrap())
            .unwrap();
        assert_eq!(p["name"], "gmail");
        assert_eq!(p["client_id"], "cid");
        assert_eq!(
            p["scopes"][1],
            "https://www.googleapis.com/auth/gmail.readonly"
        );
        assert_eq!(p["params"]["access_type"], "offline");
        assert_eq!(p["params"]["hd"], "example.com");
        assert!(p["params"].get("prompt").is_none());
        assert!(p.get("revocation_url").is_none());
        let bad = json!({"params": "x"});
        assert!(matches!(
            t.render(&BTreeMap::new(), bad.as_object().unwrap()),
            Err(CatalogueError::BadOverride(_))
        ));
    }

    #[test]
    fn search_matches_every_word() {
        assert!(search("").unwrap().len() >= 2);
        let ids: Vec<&str> = search("GOOGLE gmail")
            .unwrap()
            .iter()
            .map(|t| t.id.as_str())
            .collect();
        assert_eq!(ids, ["google"]);
        assert!(search("no such provider anywhere").unwrap().is_empty());
        assert!(matches!(get("nope"), Err(CatalogueError::Unknown(_))));
        assert_eq!(get(" Google ").unwrap().id, "google");
    }
}
