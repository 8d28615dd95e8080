//! Provider profiles: what an operator registers, and the rules a profile must
//! meet before it is stored (SPEC §3, §5, §6).

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use url::Url;

use crate::registry::strategy::{self, Strategy};
use nexus_core::Secret;

/// How a provider authenticates connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthType {
    /// OAuth 2.0 / OpenID Connect.
    Oauth2,
    /// A static API key.
    ApiKey,
    /// HTTP Basic credentials.
    BasicAuth,
    /// A static secret sent in a header.
    Header,
    /// A static secret sent in a query parameter.
    QueryParam,
    /// A shared secret used to sign payloads.
    HmacPayload,
    /// AWS access keys, applied with SigV4.
    AwsSigv4,
}

impl AuthType {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Oauth2 => "oauth2",
            Self::ApiKey => "api_key",
            Self::BasicAuth => "basic_auth",
            Self::Header => "header",
            Self::QueryParam => "query_param",
            Self::HmacPayload => "hmac_payload",
            Self::AwsSigv4 => "aws_sigv4",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Oauth2,
            Self::ApiKey,
            Self::BasicAuth,
            Self::Header,
            Self::QueryParam,
            Self::HmacPayload,
            Self::AwsSigv4,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
    }

    /// True for every type whose secrets a person types in rather than consents to.
    pub fn is_static(self) -> bool {
        self != Self::Oauth2
    }
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthHeader {
    /// `client_id` and `client_secret` in the form body.
    ClientSecretPost,
    /// HTTP Basic with `client_id:client_secret`.
    ClientSecretBasic,
}

/// A provider profile as registered. `client_secret` is accepted on input and
/// never serialized.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderProfile {
    /// Unique among live providers.
    pub name: String,
    /// Authentication type.
    pub auth_type: AuthType,
    /// Token endpoint client authentication (OAuth only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_header: Option<AuthHeader>,
    /// OAuth client id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// OAuth client secret: stored encrypted, never returned.
    #[serde(default, skip_serializing)]
    pub client_secret: Option<Secret<String>>,
    /// Authorization endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_url: Option<String>,
    /// Token endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_url: Option<String>,
    /// OpenID issuer identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Fetch endpoints from `issuer`'s discovery document.
    #[serde(default)]
    pub enable_discovery: bool,
    /// Which redirect URI this provider's handshakes use: its own
    /// (`per_provider`, `REDIRECT_PATH/{provider id}`: the mix-up defence
    /// RFC 9700 recommends for providers that do not send `iss`) or the one
    /// all share (`shared`, the default: known before the provider is
    /// registered, and what providers registered before know).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RedirectMode>,
    /// Development only: let this provider's endpoints use plaintext
    /// `http` beyond loopback (tokens and secrets then cross the network
    /// unencrypted).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_plaintext: bool,
    /// Explicit discovery document URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub well_known_url: Option<String>,
    /// OpenID UserInfo endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_info_endpoint: Option<String>,
    /// Base URL of the provider's API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_base_url: Option<String>,
    /// RFC 7009 revocation endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_url: Option<String>,
    /// Default scopes; accepts a list or one space-separated string.
    #[serde(default, deserialize_with = "scopes_list")]
    pub scopes: Vec<String>,
    /// Extra authorize parameters, `credential_schema`, `strategy`.
    #[serde(default)]
    pub params: Map<String, Value>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Free text grouping (e.g. "productivity").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}

/// See [`ProviderProfile::redirect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedirectMode {
    /// `REDIRECT_PATH`, shared by every provider so registered.
    Shared,
    /// `REDIRECT_PATH/{provider id}`.
    PerProvider,
}

fn scopes_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scopes {
        List(Vec<String>),
        Spaced(String),
        Null(()),
    }
    Ok(match Scopes::deserialize(d)? {
        Scopes::List(v) => v,
        Scopes::Spaced(s) => s.split_whitespace().map(str::to_string).collect(),
        Scopes::Null(()) => Vec::new(),
    })
}

/// Fields that responses carry but that are not part of a profile; clients that
/// send back what they read (GET, edit, PUT) must not be refused for them.
const READ_ONLY_FIELDS: &[&str] = &[
    "id",
    "client_secret_set",
    "aliases",
    "created_at",
    "updated_at",
    "deleted_at",
    "strategy",
    "redirect_uri",
    "version",
];

/// Authorize parameters Nexus sets itself; `params` may not override them.
const RESERVED_AUTHORIZE_PARAMS: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
];

/// Keys of `params` that are configuration, not authorize parameters.
const CONFIG_PARAMS: &[&str] = &["credential_schema", "strategy", "scope_separator"];

/// A profile failed validation: which field, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ProfileError {
    /// The offending field (dotted path).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn perr(field: impl Into<String>, message: impl Into<String>) -> ProfileError {
    ProfileError {
        field: field.into(),
        message: message.into(),
    }
}

/// Deserializes a profile from JSON, tolerating read-only response fields.
pub fn parse_profile(mut value: Value) -> Result<ProviderProfile, ProfileError> {
    let Value::Object(obj) = &mut value else {
        return Err(perr("profile", "must be a JSON object"));
    };
    for f in READ_ONLY_FIELDS {
        obj.remove(*f);
    }
    // serde's type errors quote the offending value; for the secret, say less.
    if obj
        .get("client_secret")
        .is_some_and(|v| !v.is_string() && !v.is_null())
    {
        return Err(perr("client_secret", "must be a string"));
    }
    serde_json::from_value(value).map_err(|e| perr("profile", e.to_string()))
}

impl ProviderProfile {
    /// Serializes the profile without its secret, for storage and responses.
    pub fn public_json(&self) -> Value {
        // Serializing a struct of strings, bools and JSON values cannot fail.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// How scopes are joined on the authorize request: a space (RFC 6749
    /// §3.3), or a comma for providers whose documentation asks for one
    /// (`params.scope_separator`).
    pub fn scope_separator(&self) -> &str {
        match self.params.get("scope_separator").and_then(Value::as_str) {
            Some(",") => ",",
            _ => " ",
        }
    }

    /// A granted `scope` from a token answer as a list: space-separated, and
    /// also comma-separated when the provider's separator is a comma.
    pub fn split_scopes(&self, scope: &str) -> Vec<String> {
        let comma = self.scope_separator() == ",";
        scope
            .split(|c: char| c.is_whitespace() || (comma && c == ','))
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The extra authorize parameters: `params` without the configuration
    /// keys (`credential_schema`, `strategy`, `scope_separator`).
    pub fn authorize_params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params.iter().filter_map(|(k, v)| {
            (!CONFIG_PARAMS.contains(&k.as_str()))
                .then(|| v.as_str().map(|v| (k.as_str(), v)))
                .flatten()
        })
    }

    /// The RFC 8707 resource indicator (`params.resource`): sent on the
    /// authorization request (as any extra parameter) and on every token
    /// request (code and refresh), so the tokens are for that resource
    /// (an MCP server, an API with its own audience).
    pub fn resource(&self) -> Option<&str> {
        self.params.get("resource").and_then(Value::as_str)
    }

    /// Checks every rule a stored profile must meet and returns the provider's strategy.
    /// `client_secret` stays optional for oauth2: public clients using PKCE alone are legitimate.
    pub fn validate(&mut self) -> Result<Strategy, ProfileError> {
        self.name = self.name.trim().to_string();
        if self.name.is_empty() || self.name.len() > 100 {
            return Err(perr("name", "must be 1 to 100 characters"));
        }
        if self.name.chars().any(char::is_control) {
            return Err(perr("name", "must not contain control characters"));
        }
        for (field, value) in [
            ("auth_url", &self.auth_url),
            ("token_url", &self.token_url),
            ("issuer", &self.issuer),
            ("well_known_url", &self.well_known_url),
            ("user_info_endpoint", &self.user_info_endpoint),
            ("api_base_url", &self.api_base_url),
            ("revocation_url", &self.revocation_url),
        ] {
            if let Some(v) = value {
                check_url(field, v)?;
                // Everything but the API's base URL carries a secret or leads
                // to the endpoints that do.
                // (Addresses are checked when used, against the configured
                // egress policy.)
                if field != "api_base_url"
                    && !self.allow_plaintext
                    && nexus_core::egress::plaintext_beyond_loopback(v)
                {
                    return Err(perr(
                        field,
                        "must use https (http only to loopback, or set allow_plaintext for development)",
                    ));
                }
            }
        }
        for (i, s) in self.scopes.iter().enumerate() {
            if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(perr(
                    format!("scopes[{i}]"),
                    "must be a non-empty scope token without spaces",
                ));
            }
        }

        if self.auth_type == AuthType::Oauth2 {
            if self
                .client_id
                .as_deref()
                .is_none_or(|c| c.trim().is_empty())
            {
                return Err(perr("client_id", "is required for oauth2 providers"));
            }
            let discovers =
                self.well_known_url.is_some() || (self.enable_discovery && self.issuer.is_some());
            if self.enable_discovery && self.issuer.is_none() && self.well_known_url.is_none() {
                return Err(perr(
                    "issuer",
                    "enable_discovery needs issuer (or well_known_url)",
                ));
            }
            if !discovers {
                if self.auth_url.is_none() {
                    return Err(perr(
                        "auth_url",
                        "is required unless discovery is enabled (issuer + enable_discovery, or well_known_url)",
                    ));
                }
                if self.token_url.is_none() {
                    return Err(perr(
                        "token_url",
                        "is required unless discovery is enabled (issuer + enable_discovery, or well_known_url)",
                    ));
                }
            }
            if self.auth_header.is_none() {
                self.auth_header = Some(AuthHeader::ClientSecretPost);
            }
            for (k, v) in &self.params {
                if CONFIG_PARAMS.contains(&k.as_str()) {
                    continue;
                }
                if RESERVED_AUTHORIZE_PARAMS.contains(&k.as_str()) {
                    return Err(perr(
                        format!("params.{k}"),
                        "is set by Nexus on every authorize request and cannot be overridden",
                    ));
                }
                if !v.is_string() {
                    return Err(perr(
                        format!("params.{k}"),
                        "extra authorize parameters must be strings",
                    ));
                }
            }
            if let Some(r) = self.params.get("resource") {
                check_resource(r)?;
            }
            match self.params.get("scope_separator") {
                None => {}
                Some(Value::String(s)) if s == " " || s == "," => {}
                Some(_) => {
                    return Err(perr(
                        "params.scope_separator",
                        "must be \" \" (the standard) or \",\" (providers that document comma-separated scopes)",
                    ))
                }
            }
            if self.params.contains_key("credential_schema") {
                return Err(perr(
                    "params.credential_schema",
                    "applies to static-credential providers only",
                ));
            }
            strategy::validate(self.auth_type, self.params.get("strategy"), None)
                .map_err(|m| perr("params.strategy", m))
        } else {
            if self.client_secret.is_some() {
                return Err(perr(
                    "client_secret",
                    "applies to oauth2 providers only; static credentials are captured per connection",
                ));
            }
            // The reference's shape (strategy settings flat in `params`,
            // `base_url`) is stored as Nexus's one form.
            strategy::lift_flat(self.auth_type, &mut self.params);
            if self.api_base_url.is_none() {
                if let Some(Value::String(base)) = self.params.get("base_url") {
                    check_url("params.base_url", base)?;
                    self.api_base_url = Some(base.clone());
                }
            }
            let schema = self.params.get("credential_schema").ok_or_else(|| {
                perr(
                    "params.credential_schema",
                    "is required for static-credential providers: a JSON Schema of the fields a person enters",
                )
            })?;
            let fields = check_credential_schema(schema)?;
            strategy::validate(
                self.auth_type,
                self.params.get("strategy"),
                fields.as_deref(),
            )
            .map_err(|m| perr("params.strategy", m))
        }
    }
}

fn check_url(field: &str, value: &str) -> Result<(), ProfileError> {
    let url = Url::parse(value).map_err(|e| perr(field, format!("is not a valid URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(perr(field, "must be an http or https URL"));
    }
    if url.host().is_none() {
        return Err(perr(field, "must include a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(perr(field, "must not carry credentials"));
    }
    Ok(())
}

/// Checks a credential schema: a valid JSON Schema, no `$ref` outside the
/// document (Nexus never fetches schemas over the network or from files), and
/// an object schema. Returns its property names when it declares any.
pub fn check_credential_schema(schema: &Value) -> Result<Option<Vec<String>>, ProfileError> {
    const FIELD: &str = "params.credential_schema";
    if !schema.is_object() {
        return Err(perr(FIELD, "must be a JSON Schema object"));
    }
    if let Some(r) = find_external_ref(schema) {
        return Err(perr(
            FIELD,
            format!(
                "$ref '{r}' points outside the schema; only local references ('#...') are allowed"
            ),
        ));
    }
    if let Err(e) = jsonschema::meta::validate(schema) {
        return Err(perr(FIELD, format!("is not a valid JSON Schema: {e}")));
    }
    if let Err(e) = jsonschema::validator_for(schema) {
        return Err(perr(FIELD, format!("cannot be compiled: {e}")));
    }
    if let Some(t) = schema.get("type") {
        if t != "object" {
            return Err(perr(
                FIELD,
                "must describe an object (\"type\": \"object\")",
            ));
        }
    }
    Ok(schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect()))
}

fn find_external_ref(v: &Value) -> Option<String> {
    match v {
        Value::Object(map) => {
            for (k, val) in map {
                if (k == "$ref" || k == "$dynamicRef" || k == "$recursiveRef")
                    && val.as_str().is_some_and(|r| !r.starts_with('#'))
                {
                    return val.as_str().map(str::to_string);
                }
                if let Some(r) = find_external_ref(val) {
                    return Some(r);
                }
            }
            None
        }
        Value::Array(items) => items.iter().find_map(find_external_ref),
        _ => None,
    }
}

/// Normalizes an alias for lookup: lower case, runs of anything but letters and
/// digits become one `-`. `"Google Prod"`, `"google_prod"` and `"google-prod"`
/// all resolve alike.
///
/// ```
/// use nexus_broker::registry::profile::normalize_alias;
/// assert_eq!(normalize_alias(" Google  Prod ").as_deref(), Some("google-prod"));
/// assert_eq!(normalize_alias("--").as_deref(), None);
/// ```
pub fn normalize_alias(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    for c in raw.trim().chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    if raw.chars().any(char::is_control) {
        return None;
    }
    let out = out.trim_matches('-').to_string();
    (!out.is_empty() && out.len() <= 100).then_some(out)
}

/// RFC 8707 §2: an absolute URI without a fragment (https, or http to a
/// development host on loopback).
fn check_resource(v: &Value) -> Result<(), ProfileError> {
    let bad = |m: &str| perr("params.resource", m);
    let s = v
        .as_str()
        .ok_or_else(|| bad("must be a string (an absolute URI)"))?;
    if s.len() > 2048 {
        return Err(bad("must be at most 2048 characters"));
    }
    let u = url::Url::parse(s)
        .map_err(|_| bad("must be an absolute URI (https://api.example.com/mcp)"))?;
    if u.fragment().is_some() {
        return Err(bad("must not have a fragment (RFC 8707)"));
    }
    if !matches!(u.scheme(), "https" | "http") || nexus_core::egress::plaintext_beyond_loopback(s) {
        return Err(bad("must be an https URI (http only on loopback)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn oauth() -> Value {
        json!({"name": "google", "auth_type": "oauth2", "client_id": "cid",
               "auth_url": "https://a.example/auth", "token_url": "https://a.example/token",
               "scopes": "openid email"})
    }

    #[test]
    fn a_comma_scope_separator_joins_and_splits_with_commas() {
        let mut p = parse_profile(oauth()).unwrap();
        p.validate().unwrap();
        assert_eq!(p.scope_separator(), " ");
        assert_eq!(p.split_scopes("a b,c"), ["a", "b,c"]);
        let mut v = oauth();
        v["params"] = json!({"scope_separator": ",", "user_scope": "chat:write"});
        let mut p = parse_profile(v).unwrap();
        p.validate().unwrap();
        assert_eq!(p.scope_separator(), ",");
        assert_eq!(p.split_scopes("a,b c,,"), ["a", "b", "c"]);
        let extra: Vec<_> = p.authorize_params().collect();
        assert_eq!(
            extra,
            [("user_scope", "chat:write")],
            "not an authorize parameter"
        );
        for bad in [json!(";"), json!(1)] {
            let mut v = oauth();
            v["params"] = json!({ "scope_separator": bad });
            let e = parse_profile(v).unwrap().validate().unwrap_err();
            assert_eq!(e.field, "params.scope_separator");
        }
    }

    #[test]
    fn oauth_profile_validates_and_defaults_auth_header() {
        let mut p = parse_profile(oauth()).unwrap();
        p.validate().unwrap();
        assert_eq!(p.auth_header, Some(AuthHeader::ClientSecretPost));
        assert_eq!(p.scopes, vec!["openid", "email"]);
    }

    #[test]
    fn rules_name_the_field() {
        let cases = [
            (json!({"token_url": "ftp://x/y"}), "token_url"),
            (json!({"auth_url": "not a url"}), "auth_url"),
            (json!({"client_id": ""}), "client_id"),
            (
                json!({"params": {"redirect_uri": "https://evil"}}),
                "params.redirect_uri",
            ),
            (json!({"params": {"prompt": 1}}), "params.prompt"),
            (json!({"auth_url": null}), "auth_url"),
        ];
        for (patch, field) in cases {
            let mut v = oauth();
            for (k, val) in patch.as_object().unwrap() {
                v[k] = val.clone();
            }
            let err = parse_profile(v)
                .and_then(|mut p| p.validate().map(|_| ()))
                .unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn unknown_fields_and_bad_enums_are_refused_but_read_only_fields_pass() {
        let mut v = oauth();
        v["tokne_url"] = json!("https://x");
        assert!(parse_profile(v).is_err());
        let mut v = oauth();
        v["auth_type"] = json!("kerberos");
        assert!(parse_profile(v)
            .unwrap_err()
            .message
            .contains("unknown variant"));
        let mut v = oauth();
        v["id"] = json!("abc");
        v["client_secret_set"] = json!(true);
        v["version"] = json!(3);
        assert!(parse_profile(v).is_ok());
    }

    #[test]
    fn credential_schema_rules() {
        assert!(check_credential_schema(
            &json!({"type": "object", "properties": {"api_key": {"type": "string"}}})
        )
        .is_ok());
        let remote =
            json!({"type": "object", "properties": {"k": {"$ref": "https://evil.example/s.json"}}});
        assert!(check_credential_schema(&remote)
            .unwrap_err()
            .message
            .contains("$ref"));
        let file = json!({"$ref": "file:///etc/passwd"});
        assert!(check_credential_schema(&file).is_err());
        let local = json!({"type": "object", "$defs": {"k": {"type": "string"}}, "properties": {"k": {"$ref": "#/$defs/k"}}});
        assert!(check_credential_schema(&local).is_ok());
        assert!(check_credential_schema(&json!({"type": "nonsense"})).is_err());
        assert!(check_credential_schema(&json!({"type": "string"})).is_err());
        assert!(check_credential_schema(&json!("x")).is_err());
    }

    #[test]
    fn aliases_normalize() {
        assert_eq!(
            normalize_alias("Google_Prod").as_deref(),
            Some("google-prod")
        );
        assert_eq!(
            normalize_alias("google--prod!").as_deref(),
            Some("google-prod")
        );
        assert_eq!(normalize_alias("   "), None);
    }
}
