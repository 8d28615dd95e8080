//! Strategies: how an agent authenticates a request with a connection's
//! usage secrets (SPEC §5). Here they are validated when a provider is
//! registered; the token API and the bridge apply them later.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::registry::profile::AuthType;

/// The strategy types the bridge and the sidecar know how to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StrategyKind {
    /// `Authorization: Bearer <access_token>`.
    Oauth2,
    /// A credential field placed in a header, with an optional prefix.
    Header,
    /// A credential field placed in a query parameter.
    QueryParam,
    /// HTTP Basic from two credential fields.
    BasicAuth,
    /// AWS Signature Version 4.
    AwsSigv4,
    /// An HMAC of the request payload placed in a header.
    HmacPayload,
}

impl StrategyKind {
    /// Every kind, for error messages.
    pub const ALL: [StrategyKind; 6] = [
        Self::Oauth2,
        Self::Header,
        Self::QueryParam,
        Self::BasicAuth,
        Self::AwsSigv4,
        Self::HmacPayload,
    ];

    /// Wire name (`"header"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Oauth2 => "oauth2",
            Self::Header => "header",
            Self::QueryParam => "query_param",
            Self::BasicAuth => "basic_auth",
            Self::AwsSigv4 => "aws_sigv4",
            Self::HmacPayload => "hmac_payload",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Config fields that must be present, non-empty strings.
    pub fn required_fields(self) -> &'static [&'static str] {
        match self {
            Self::Oauth2 => &[],
            Self::Header => &["header_name", "credential_field"],
            Self::QueryParam => &["param_name", "credential_field"],
            Self::BasicAuth => &["username_field", "password_field"],
            Self::AwsSigv4 => &["region", "service"],
            Self::HmacPayload => &["header_name", "algorithm", "credential_field", "encoding"],
        }
    }

    /// Config fields naming a field of the stored credential.
    fn credential_fields(self) -> &'static [&'static str] {
        match self {
            Self::Header | Self::QueryParam | Self::HmacPayload => &["credential_field"],
            Self::BasicAuth => &["username_field", "password_field"],
            Self::Oauth2 | Self::AwsSigv4 => &[],
        }
    }

    /// The strategy an auth type uses when the profile names none.
    pub fn default_for(auth_type: AuthType) -> Self {
        match auth_type {
            AuthType::Oauth2 => Self::Oauth2,
            AuthType::ApiKey | AuthType::Header => Self::Header,
            AuthType::QueryParam => Self::QueryParam,
            AuthType::BasicAuth => Self::BasicAuth,
            AuthType::HmacPayload => Self::HmacPayload,
            AuthType::AwsSigv4 => Self::AwsSigv4,
        }
    }

    fn allowed_for(self, auth_type: AuthType) -> bool {
        match auth_type {
            AuthType::ApiKey => matches!(self, Self::Header | Self::QueryParam),
            other => self == Self::default_for(other),
        }
    }
}

/// The reference implementation's shape of a static provider: the strategy
/// settings flat in `params` (`{"header_name": "X-Key", "credential_field":
/// "user_key", "credential_schema": {...}}`), with its defaults. Lifted into
/// the explicit `params.strategy {type, config}` Nexus stores, so both
/// shapes register the same provider and answer with the same strategy.
/// Nothing happens for OAuth providers or when `params.strategy` is given.
///
/// ```
/// use nexus_broker::registry::{profile::AuthType, strategy::lift_flat};
/// let mut params = serde_json::json!({"header_name": "X-Key", "base_url": "https://x.example"});
/// lift_flat(AuthType::Header, params.as_object_mut().unwrap());
/// assert_eq!(params, serde_json::json!({"base_url": "https://x.example", "strategy": {"type": "header",
///     "config": {"header_name": "X-Key", "credential_field": "api_key"}}}));
/// ```
pub fn lift_flat(auth_type: AuthType, params: &mut Map<String, Value>) {
    if params.contains_key("strategy") {
        return;
    }
    let kind = StrategyKind::default_for(auth_type);
    // (the reference's name, Nexus's name) and the reference's defaults.
    type Pairs = &'static [(&'static str, &'static str)];
    let (names, defaults): (Pairs, Pairs) = match kind {
        StrategyKind::Oauth2 => return,
        StrategyKind::Header => (
            &[
                ("header_name", "header_name"),
                ("credential_field", "credential_field"),
                ("value_prefix", "value_prefix"),
            ],
            &[
                ("header_name", "Authorization"),
                ("credential_field", "api_key"),
            ],
        ),
        StrategyKind::QueryParam => (
            &[
                ("param_name", "param_name"),
                ("credential_field", "credential_field"),
            ],
            &[("credential_field", "api_key")],
        ),
        StrategyKind::BasicAuth => (
            &[
                ("username_field", "username_field"),
                ("password_field", "password_field"),
            ],
            &[
                ("username_field", "username"),
                ("password_field", "password"),
            ],
        ),
        StrategyKind::AwsSigv4 => (
            &[("service", "service"), ("region", "region")],
            &[("region", "us-east-1")],
        ),
        StrategyKind::HmacPayload => (
            &[
                ("header_name", "header_name"),
                ("secret_field", "credential_field"),
                ("credential_field", "credential_field"),
                ("algo", "algorithm"),
                ("algorithm", "algorithm"),
                ("encoding", "encoding"),
            ],
            &[
                ("credential_field", "api_secret"),
                ("algorithm", "sha256"),
                ("encoding", "hex"),
            ],
        ),
    };
    let mut config = Map::new();
    for (theirs, ours) in names {
        if let Some(v) = params.remove(*theirs) {
            config.insert((*ours).to_string(), v);
        }
    }
    for (k, d) in defaults {
        config
            .entry((*k).to_string())
            .or_insert_with(|| Value::String((*d).to_string()));
    }
    let mut strategy = Map::new();
    strategy.insert("type".into(), Value::String(kind.as_str().into()));
    strategy.insert("config".into(), Value::Object(config));
    params.insert("strategy".into(), Value::Object(strategy));
}

/// A validated strategy: its kind and config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Strategy {
    /// Strategy type.
    #[serde(rename = "type")]
    pub kind: StrategyKind,
    /// Strategy parameters (header name, region, ...). Never secrets.
    pub config: Map<String, Value>,
}

/// Reads and checks `params.strategy` (`{"type": ..., "config": {...}}`) for a
/// provider of `auth_type`. `schema_fields` are the credential schema's
/// property names, when it declares any, so that a strategy cannot point at a
/// field the capture form never asks for.
pub fn validate(
    auth_type: AuthType,
    strategy: Option<&Value>,
    schema_fields: Option<&[String]>,
) -> Result<Strategy, String> {
    let (kind, config) = match strategy {
        None | Some(Value::Null) => (StrategyKind::default_for(auth_type), Map::new()),
        Some(Value::Object(obj)) => {
            for key in obj.keys() {
                if key != "type" && key != "config" {
                    return Err(format!(
                        "params.strategy has unknown field '{key}'; expected 'type' and 'config'"
                    ));
                }
            }
            let kind = match obj.get("type") {
                None | Some(Value::Null) => StrategyKind::default_for(auth_type),
                Some(Value::String(s)) => StrategyKind::parse(s).ok_or_else(|| {
                    let names: Vec<&str> = StrategyKind::ALL.iter().map(|k| k.as_str()).collect();
                    format!(
                        "params.strategy.type '{s}' is not a known strategy; expected one of {}",
                        names.join(", ")
                    )
                })?,
                Some(_) => return Err("params.strategy.type must be a string".into()),
            };
            let config = match obj.get("config") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(c)) => c.clone(),
                Some(_) => return Err("params.strategy.config must be an object".into()),
            };
            (kind, config)
        }
        Some(_) => return Err("params.strategy must be an object {type, config}".into()),
    };

    if !kind.allowed_for(auth_type) {
        return Err(format!(
            "strategy '{}' cannot be used with auth_type '{}'",
            kind.as_str(),
            auth_type.as_str()
        ));
    }
    let missing: Vec<&str> = kind
        .required_fields()
        .iter()
        .copied()
        .filter(|f| !matches!(config.get(*f), Some(Value::String(s)) if !s.trim().is_empty()))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "strategy '{}' needs params.strategy.config fields: {} (non-empty strings)",
            kind.as_str(),
            missing.join(", ")
        ));
    }
    if let Some(v) = config.get("value_prefix") {
        if !v.is_string() {
            return Err("params.strategy.config.value_prefix must be a string".into());
        }
    }
    if kind == StrategyKind::HmacPayload {
        let algorithm = config
            .get("algorithm")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !matches!(algorithm, "sha256" | "sha512") {
            return Err("hmac_payload algorithm must be 'sha256' or 'sha512'".into());
        }
        let encoding = config.get("encoding").and_then(Value::as_str).unwrap_or("");
        if !matches!(encoding, "hex" | "base64") {
            return Err("hmac_payload encoding must be 'hex' or 'base64'".into());
        }
    }
    if let Some(fields) = schema_fields {
        let mut needed: Vec<String> = kind
            .credential_fields()
            .iter()
            .filter_map(|f| config.get(*f).and_then(Value::as_str).map(str::to_string))
            .collect();
        if kind == StrategyKind::AwsSigv4 {
            needed.extend(["access_key".to_string(), "secret_key".to_string()]);
        }
        for field in needed {
            if !fields.contains(&field) {
                return Err(format!(
                    "strategy '{}' uses credential field '{field}', which params.credential_schema does not define",
                    kind.as_str()
                ));
            }
        }
    }
    Ok(Strategy { kind, config })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(f: &[&str]) -> Vec<String> {
        f.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_and_required_fields() {
        let s = validate(AuthType::Oauth2, None, None).unwrap();
        assert_eq!(s.kind, StrategyKind::Oauth2);
        let e = validate(AuthType::ApiKey, None, None).unwrap_err();
        assert!(
            e.contains("header_name") && e.contains("credential_field"),
            "{e}"
        );
        let ok = json!({"type": "header", "config": {"header_name": "X-Api-Key", "credential_field": "api_key"}});
        assert!(validate(AuthType::ApiKey, Some(&ok), Some(&fields(&["api_key"]))).is_ok());
        let qp = json!({"type": "query_param", "config": {"param_name": "key", "credential_field": "api_key"}});
        assert!(validate(AuthType::ApiKey, Some(&qp), None).is_ok());
    }

    #[test]
    fn rejects_mismatches() {
        let e = validate(
            AuthType::BasicAuth,
            Some(&json!({"type": "aws_sigv4"})),
            None,
        )
        .unwrap_err();
        assert!(e.contains("cannot be used"), "{e}");
        let e = validate(AuthType::Header, Some(&json!({"type": "nope"})), None).unwrap_err();
        assert!(e.contains("not a known strategy"), "{e}");
        let hdr = json!({"config": {"header_name": "X", "credential_field": "token"}});
        let e = validate(AuthType::Header, Some(&hdr), Some(&fields(&["api_key"]))).unwrap_err();
        assert!(e.contains("'token'"), "{e}");
        let aws = json!({"config": {"region": "us-east-1", "service": "s3"}});
        let e = validate(
            AuthType::AwsSigv4,
            Some(&aws),
            Some(&fields(&["access_key"])),
        )
        .unwrap_err();
        assert!(e.contains("secret_key"), "{e}");
        let hmac = json!({"config": {"header_name": "X-Sig", "algorithm": "md5", "credential_field": "k", "encoding": "hex"}});
        assert!(validate(AuthType::HmacPayload, Some(&hmac), None).is_err());
    }
}
