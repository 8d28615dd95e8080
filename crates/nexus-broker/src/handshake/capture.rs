//! Hosted capture of static credentials (API keys, AWS keys, ...).
//!
//! For a static provider the consent URL is the broker's own form, rendered
//! from the provider's `credential_schema`. The signed state identifies the
//! handshake; the form carries a CSRF token derived from it (HMAC with
//! `STATE_KEY`) that must also come back in a `SameSite=Strict` cookie.
//! Input is validated against the schema before the handshake is consumed,
//! so a typo can be corrected; the accepted credentials are sealed in the
//! vault and the connection becomes active.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Map, Value};
use sha2::Sha256;
use url::Url;

use crate::events::audit::Actor;
use crate::events::audit::AuditEvent;
use crate::handshake::{HandshakeError, Handshakes};
use crate::oauth::state_token::{self, StateError};
use crate::registry::Provider;
use crate::store::{now_ms, Activation, HandshakeKind, HandshakeRow};
use nexus_core::Secret;

/// One input of the form, derived from the schema.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Field {
    /// Property name.
    pub name: String,
    /// Label (`title`, else the name).
    pub title: String,
    /// Help text.
    pub description: Option<String>,
    /// Listed in `required`.
    pub required: bool,
    /// Rendered as a password input (`writeOnly`, `format: password`, or a secret-sounding name).
    pub secret: bool,
    /// JSON type: string, integer, number or boolean.
    #[serde(rename = "type")]
    pub kind: String,
    /// Allowed values, when the schema has an `enum`.
    #[serde(rename = "enum", skip_serializing_if = "Option::is_none")]
    pub choices: Option<Vec<String>>,
}

/// Everything a capture page needs.
#[derive(Debug, Clone)]
pub struct CaptureForm {
    /// The handshake.
    pub handshake: HandshakeRow,
    /// The provider.
    pub provider: Provider,
    /// Its credential schema.
    pub schema: Value,
    /// Inputs, in schema order.
    pub fields: Vec<Field>,
    /// CSRF token bound to this handshake.
    pub csrf: String,
}

/// Result of a submission.
#[derive(Debug)]
pub enum CaptureOutcome {
    /// Stored; send the browser here.
    Done(String),
    /// Refused by the schema; messages name fields and never quote values.
    Invalid(Vec<String>),
}

fn is_secret_field(name: &str, prop: &Value) -> bool {
    let n = name.to_ascii_lowercase();
    prop.get("writeOnly").and_then(Value::as_bool) == Some(true)
        || prop.get("format").and_then(Value::as_str) == Some("password")
        || ["secret", "password", "token", "key"]
            .iter()
            .any(|w| n.contains(w))
}

/// The form's fields, from a credential schema's `properties`.
pub fn fields(schema: &Value) -> Vec<Field> {
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return Vec::new();
    };
    props
        .iter()
        .map(|(name, prop)| Field {
            name: name.clone(),
            title: prop
                .get("title")
                .and_then(Value::as_str)
                .unwrap_or(name)
                .to_string(),
            description: prop
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string),
            required: required.contains(&name.as_str()),
            secret: is_secret_field(name, prop),
            kind: match prop.get("type").and_then(Value::as_str) {
                Some(t @ ("integer" | "number" | "boolean")) => t.to_string(),
                _ => "string".to_string(),
            },
            choices: prop.get("enum").and_then(Value::as_array).map(|e| {
                e.iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string())
                    })
                    .collect()
            }),
        })
        .collect()
}

/// Turns form strings into the JSON types the schema asks for. Empty optional
/// inputs are left out; unparseable numbers stay strings so the schema refuses them.
pub fn typed_from_form(fields: &[Field], form: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for f in fields {
        let raw = form.get(&f.name).and_then(Value::as_str);
        let value = match (f.kind.as_str(), raw) {
            ("boolean", v) => Value::Bool(matches!(v, Some("on" | "true" | "1"))),
            (_, None) => continue,
            (_, Some("")) if !f.required => continue,
            ("integer", Some(v)) => v
                .trim()
                .parse::<i64>()
                .map(Value::from)
                .unwrap_or_else(|_| Value::String(v.into())),
            ("number", Some(v)) => v
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(|n| serde_json::Number::from_f64(n).map(Value::Number))
                .unwrap_or_else(|| Value::String(v.into())),
            (_, Some(v)) => Value::String(v.to_string()),
        };
        out.insert(f.name.clone(), value);
    }
    out
}

fn describe(err: &jsonschema::ValidationError<'_>) -> String {
    if let jsonschema::error::ValidationErrorKind::Required { property } = err.kind() {
        return format!("{}: is required", property.as_str().unwrap_or("field"));
    }
    let path = err.instance_path().as_str().trim_start_matches('/');
    let field = if path.is_empty() { "credentials" } else { path };
    let what = match err.kind().keyword() {
        "type" => "has the wrong type".to_string(),
        "minLength" => "is too short".to_string(),
        "maxLength" => "is too long".to_string(),
        "pattern" | "format" => "does not have the expected format".to_string(),
        "enum" | "const" => "is not one of the allowed values".to_string(),
        "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" | "multipleOf" => {
            "is out of range".to_string()
        }
        "additionalProperties" | "unevaluatedProperties" => {
            "has fields the provider does not accept".to_string()
        }
        other => format!("fails the '{other}' rule"),
    };
    format!("{field}: {what}")
}

impl Handshakes {
    fn csrf_mac(&self, handshake_id: &str) -> Hmac<Sha256> {
        // HMAC accepts keys of any length.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(self.state_key.expose())
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        m.update(b"nexus-capture-csrf|");
        m.update(handshake_id.as_bytes());
        m
    }

    /// The CSRF token of a capture form.
    pub fn csrf_token(&self, handshake_id: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.csrf_mac(handshake_id).finalize().into_bytes())
    }

    /// Checks a CSRF token in constant time.
    pub fn csrf_ok(&self, handshake_id: &str, token: &str) -> bool {
        URL_SAFE_NO_PAD
            .decode(token)
            .is_ok_and(|t| self.csrf_mac(handshake_id).verify_slice(&t).is_ok())
    }

    /// Loads a live static-credential handshake from its state, without consuming it.
    pub async fn capture_form(&self, state: &str) -> Result<CaptureForm, HandshakeError> {
        let id =
            state_token::verify(self.state_key.expose(), state, now_ms() / 1000).map_err(|e| {
                HandshakeError::State(match e {
                    StateError::Expired => "state has expired; start the connection again",
                    StateError::BadSignature => "state signature is invalid",
                    StateError::Malformed => "state is malformed",
                })
            })?;
        let (hs, consumed) = self
            .store
            .peek_handshake(&id)
            .await?
            .ok_or(HandshakeError::State(
                "state does not name a known handshake",
            ))?;
        if consumed {
            return Err(HandshakeError::State("state was already used"));
        }
        if hs.expires_at <= now_ms() {
            return Err(HandshakeError::State(
                "state has expired; start the connection again",
            ));
        }
        let provider = self.registry.get(&hs.provider_id).await?;
        if !provider.profile.auth_type.is_static() {
            return Err(HandshakeError::State(
                "this state belongs to an OAuth handshake",
            ));
        }
        let schema = provider
            .profile
            .params
            .get("credential_schema")
            .cloned()
            .unwrap_or(json!({"type": "object"}));
        Ok(CaptureForm {
            fields: fields(&schema),
            csrf: self.csrf_token(&hs.id),
            handshake: hs,
            provider,
            schema,
        })
    }

    /// Validates and stores submitted credentials. On success the handshake
    /// is consumed (exactly once) and the connection becomes active.
    pub async fn submit_capture(
        &self,
        form: &CaptureForm,
        credentials: Map<String, Value>,
        actor: &Actor,
    ) -> Result<CaptureOutcome, HandshakeError> {
        // An empty (or blank) field is a missing one: `required` must catch
        // it, and nothing serves "" as a credential.
        let credentials: Map<String, Value> = credentials
            .into_iter()
            .filter(|(_, v)| !v.as_str().is_some_and(|s| s.trim().is_empty()))
            .collect();
        let credentials = Value::Object(credentials);
        let validator = jsonschema::validator_for(&form.schema).map_err(|_| {
            HandshakeError::Invalid("the provider's credential schema cannot be compiled".into())
        })?;
        let mut errors: Vec<String> = validator
            .iter_errors(&credentials)
            .map(|e| describe(&e))
            .collect();
        if !errors.is_empty() {
            errors.sort();
            errors.dedup();
            return Ok(CaptureOutcome::Invalid(errors));
        }
        let hs = super::consume(&self.store, &form.handshake.id, HandshakeKind::Capture).await?;
        let cid = &hs.connection_id;
        let sealed = self.keys.encrypt_str(
            crate::vault::Aad::new("connections", cid, "credentials"),
            &Secret::new(credentials.to_string()),
        );
        let field_names: Vec<&String> = credentials
            .as_object()
            .map(|o| o.keys().collect())
            .unwrap_or_default();
        let audit = AuditEvent::new("connection.active")
            .actor(actor.name.clone())
            .by(actor)
            .provider(hs.provider_id.clone())
            .connection(cid.clone())
            .workspace(hs.workspace_id.clone())
            .detail(json!({"reconnect": hs.is_reconnect, "captured_fields": field_names}));
        // New credentials are a new grant: whatever failed before is cleared.
        let activation = Activation {
            credentials: Some(sealed),
            granted_scopes: crate::store::json_list(&[]),
            clears_failing: true,
            ..Default::default()
        };
        let transition =
            |before: &crate::store::ConnectionRow, failing: &[String]| crate::store::Transition {
                audit: audit.clone(),
                event: Some(crate::events::webhooks::activation_event(
                    before,
                    Some(&form.provider.profile.name),
                    failing,
                )),
            };
        self.store
            .activate_connection(cid, &activation, &transition)
            .await?;
        metrics::counter!("nexus_handshakes_total", "outcome" => "success").increment(1);
        let mut url = Url::parse(&hs.return_url)
            .map_err(|_| HandshakeError::Invalid("stored return_url is invalid".into()))?;
        url.query_pairs_mut()
            .append_pair("status", "success")
            .append_pair("connection_id", cid)
            .append_pair("provider", &form.provider.profile.name);
        Ok(CaptureOutcome::Done(url.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_typing() {
        let schema = json!({"type": "object", "required": ["api_key", "port"], "properties": {
            "api_key": {"type": "string", "title": "API key"},
            "region": {"type": "string", "enum": ["eu", "us"]},
            "port": {"type": "integer"},
            "sandbox": {"type": "boolean"},
            "label": {"type": "string", "writeOnly": true}
        }});
        let f = fields(&schema);
        let by = |n: &str| f.iter().find(|x| x.name == n).unwrap().clone();
        assert!(by("api_key").secret && by("api_key").required);
        assert!(by("label").secret);
        assert!(!by("region").secret);
        assert_eq!(
            by("region").choices,
            Some(vec!["eu".to_string(), "us".to_string()])
        );
        let form: Map<String, Value> = serde_json::from_value(
            json!({"api_key": "k", "port": "8080", "region": "", "sandbox": "on"}),
        )
        .unwrap();
        let typed = typed_from_form(&f, &form);
        assert_eq!(
            Value::Object(typed),
            json!({"api_key": "k", "port": 8080, "sandbox": true})
        );
    }

    #[test]
    fn messages_never_quote_values() {
        let schema = json!({"type": "object", "required": ["api_key"], "properties": {"api_key": {"type": "string", "minLength": 40}}});
        let v = jsonschema::validator_for(&schema).unwrap();
        let bad = json!({"api_key": "sk-secret-but-short"});
        let msgs: Vec<String> = v.iter_errors(&bad).map(|e| describe(&e)).collect();
        assert_eq!(msgs, vec!["api_key: is too short"]);
        let missing: Vec<String> = v.iter_errors(&json!({})).map(|e| describe(&e)).collect();
        assert_eq!(missing, vec!["api_key: is required"]);
    }
}
