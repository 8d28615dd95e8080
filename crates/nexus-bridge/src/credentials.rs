//! A connection's strategy and usage secrets, as the gateway's token answer
//! gives them (SPEC §4, §5).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use crate::error::BridgeError;
use crate::secret::Secret;

/// How a request is authenticated with the usage secrets.
#[derive(Debug, Clone, PartialEq)]
pub struct Strategy {
    /// `oauth2`, `header`, `query_param`, `basic_auth`, `aws_sigv4`, `hmac_payload`.
    pub kind: String,
    /// Its parameters (header name, region, ...); never secrets.
    pub config: Map<String, Value>,
}

impl Strategy {
    /// A config field as text.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.config
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }
}

/// What one token answer gave: the strategy, the usage secrets, and when
/// they stop working. `Debug` never shows a secret.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The connection.
    pub connection_id: String,
    /// How to apply them. Not to be changed once a request was
    /// authenticated with them: the header it sets is kept from then on.
    pub strategy: Strategy,
    secrets: HashMap<String, Secret>,
    /// When they expire (`None`: no expiry, e.g. an API key).
    pub expires_at: Option<SystemTime>,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Scopes the provider refused lately (the connection is `degraded`).
    pub failing_scopes: Vec<String>,
    /// Which fetch of this connection these came from (1, 2, ...): a forced
    /// refresh only happens if nobody replaced the credentials meanwhile.
    pub generation: u64,
    /// When they were fetched.
    pub fetched_at: SystemTime,
    /// The header a header-setting strategy adds, made on first use.
    pub(crate) prepared: Prepared,
}

/// The header (name and sensitive value) an `oauth2`, `header` or
/// `basic_auth` strategy sets, made once per credentials rather than per
/// request; or why it cannot be made. `Debug` shows nothing of it.
#[derive(Clone, Default)]
pub(crate) struct Prepared(
    pub(crate) std::sync::OnceLock<Result<(http::HeaderName, http::HeaderValue), String>>,
);

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Prepared")
    }
}

impl Credentials {
    /// Reads a token answer received at `now`.
    pub fn from_answer(
        connection_id: &str,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Self, BridgeError> {
        let bad = |m: &str| BridgeError::Gateway {
            status: 200,
            code: "invalid_token_answer".into(),
            message: m.into(),
            retry_after: None,
        };
        let v: Value =
            serde_json::from_slice(body).map_err(|_| bad("the token answer is not JSON"))?;
        let strategy = Strategy {
            kind: v["strategy"]["type"]
                .as_str()
                .ok_or_else(|| bad("the token answer has no strategy.type"))?
                .to_string(),
            config: v["strategy"]["config"]
                .as_object()
                .cloned()
                .unwrap_or_default(),
        };
        let mut secrets = HashMap::new();
        if let Some(obj) = v["credentials"].as_object() {
            for (k, val) in obj {
                if let Some(s) = val.as_str() {
                    secrets.insert(k.clone(), Secret::new(s));
                }
            }
        }
        if let Some(at) = v["access_token"].as_str() {
            secrets
                .entry("access_token".into())
                .or_insert_with(|| Secret::new(at));
        }
        let expires_at = v["expires_in"]
            .as_i64()
            .map(|s| now + Duration::from_secs(s.max(0) as u64));
        let list = |k: &str| -> Vec<String> {
            match &v[k] {
                Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
                Value::Array(a) => a
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect(),
                _ => Vec::new(),
            }
        };
        Ok(Self {
            connection_id: connection_id.to_string(),
            strategy,
            secrets,
            expires_at,
            scopes: list("scope"),
            failing_scopes: list("failing_scopes"),
            generation: 0,
            fetched_at: now,
            prepared: Prepared::default(),
        })
    }

    /// Credentials built by hand (tests, or an agent with its own source).
    pub fn new(strategy: Strategy, secrets: HashMap<String, Secret>) -> Self {
        Self {
            connection_id: String::new(),
            strategy,
            secrets,
            expires_at: None,
            scopes: Vec::new(),
            failing_scopes: Vec::new(),
            generation: 0,
            fetched_at: SystemTime::now(),
            prepared: Prepared::default(),
        }
    }

    /// A usage secret by name (`access_token`, or a credential field).
    pub fn secret(&self, name: &str) -> Option<&Secret> {
        self.secrets.get(name)
    }

    /// Whether they still work at `now`.
    pub fn usable_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|e| e > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_token_answer_without_showing_secrets() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let body = br#"{"access_token":"canary-at","token_type":"Bearer","expires_in":60,
            "scope":"openid email","strategy":{"type":"oauth2","config":{}},
            "credentials":{"access_token":"canary-at"},"failing_scopes":["calendar.read"]}"#;
        let c = Credentials::from_answer("c1", body, now).unwrap();
        assert_eq!(c.strategy.kind, "oauth2");
        assert_eq!(c.secret("access_token").unwrap().expose(), "canary-at");
        assert_eq!(c.expires_at, Some(now + Duration::from_secs(60)));
        assert_eq!(c.scopes, ["openid", "email"]);
        assert_eq!(c.failing_scopes, ["calendar.read"]);
        assert!(!format!("{c:?}").contains("canary-at"));
        assert!(c.usable_at(now + Duration::from_secs(59)));
        assert!(!c.usable_at(now + Duration::from_secs(60)));
        assert!(Credentials::from_answer("c1", b"{}", now).is_err());
    }
}
