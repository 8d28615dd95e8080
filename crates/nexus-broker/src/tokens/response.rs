//! Token answers: built from a connection row (decrypting only what the
//! strategy serves), kept as JSON text, completed with `expires_in` at serve
//! time.

use serde_json::{json, Map, Value};

use super::error::TokenError;
use super::schedule::{inside_margin, RefreshSettings};
use crate::registry::strategy::StrategyKind;
use crate::registry::Provider;
use crate::store::{
    now_ms, parse_json_list as parse_list, rfc3339, ConnectionRow, ConnectionStatus, StoreError,
    TokenStamp,
};
use crate::vault::{Aad, KeyRing};
use nexus_core::wire::complete;
use nexus_core::Secret;

/// A token response: JSON text holding usage secrets (redacted in Debug).
#[derive(Debug)]
pub struct TokenBody {
    /// The JSON text.
    pub body: Secret<Vec<u8>>,
    /// How long a gateway may keep it (ms); see [`crate::tokens::edge`].
    pub keep_ms: Option<i64>,
    /// When the token expires (unix ms).
    pub expires_at: Option<i64>,
}

impl TokenBody {
    pub(crate) fn new(body: Vec<u8>) -> Self {
        Self {
            body: Secret::new(body),
            keep_ms: None,
            expires_at: None,
        }
    }

    /// The response as a JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_slice(self.body.expose()).unwrap_or(Value::Null)
    }
}

/// Completes a (possibly cached) response with the seconds left at serve time.
pub(crate) fn finish(prefix: &Secret<Vec<u8>>, expires_at: Option<i64>) -> TokenBody {
    TokenBody {
        expires_at,
        ..TokenBody::new(complete(prefix.expose(), expires_at, now_ms()))
    }
}

/// The token response, without `expires_in` (see [`finish`]): the
/// strategy and the credentials it applies, never a refresh token or
/// another captured secret.
pub fn build(
    keys: &KeyRing,
    provider: &Provider,
    c: &ConnectionRow,
) -> Result<Map<String, Value>, TokenError> {
    let open = |column: &str, env: &str| -> Result<Secret<String>, TokenError> {
        keys.decrypt_str(Aad::new("connections", &c.id, column), env)
            .map_err(|e| TokenError::Store(StoreError::Vault(e)))
    };
    let strategy = &provider.strategy;
    let mut out = Map::new();
    let credentials = if strategy.kind == StrategyKind::Oauth2 {
        let env = c
            .access_token
            .as_deref()
            .ok_or_else(|| TokenError::Unusable("the connection has no access token".into()))?;
        let at = open("access_token", env)?;
        out.insert("access_token".into(), json!(at.expose()));
        out.insert(
            "token_type".into(),
            json!(c.token_type.clone().unwrap_or_else(|| "Bearer".into())),
        );
        if let Some(idt) = c.id_token.as_deref() {
            out.insert("id_token".into(), json!(open("id_token", idt)?.expose()));
        }
        json!({"access_token": at.expose()})
    } else {
        let env = c.credentials.as_deref().ok_or_else(|| {
            TokenError::Unusable("the connection has no stored credentials".into())
        })?;
        let all: Map<String, Value> = serde_json::from_str(open("credentials", env)?.expose())
            .map_err(|_| TokenError::Unusable("stored credentials are unreadable".into()))?;
        // Only the fields the strategy applies: never other captured secrets.
        let cfg = |k: &str| {
            strategy
                .config
                .get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let wanted: Vec<String> = match strategy.kind {
            StrategyKind::Header | StrategyKind::QueryParam | StrategyKind::HmacPayload => {
                cfg("credential_field").into_iter().collect()
            }
            StrategyKind::BasicAuth => [cfg("username_field"), cfg("password_field")]
                .into_iter()
                .flatten()
                .collect(),
            StrategyKind::AwsSigv4 => vec![
                "access_key".into(),
                "secret_key".into(),
                "session_token".into(),
            ],
            StrategyKind::Oauth2 => Vec::new(),
        };
        Value::Object(
            wanted
                .into_iter()
                .filter_map(|k| all.get(&k).cloned().map(|v| (k, v)))
                .collect(),
        )
    };
    // Absent, not null, without expiry: the v1 contract types it as a string.
    if let Some(at) = c.expires_at {
        out.insert("expires_at".into(), json!(rfc3339(at)));
    }
    out.insert(
        "scope".into(),
        json!(parse_list(&c.granted_scopes).join(" ")),
    );
    out.insert("strategy".into(), json!(strategy));
    out.insert("credentials".into(), credentials);
    out.insert("provider".into(), json!(provider.profile.name));
    out.insert("connection_id".into(), json!(c.id));
    out.insert("status".into(), json!(c.status));
    out.insert(
        "degraded".into(),
        json!(c.status == ConnectionStatus::Degraded),
    );
    out.insert(
        "failing_scopes".into(),
        json!(parse_list(&c.failing_scopes)),
    );
    Ok(out)
}

/// Whether a cached response built from `stamp` may be served now: the
/// connection is usable and its token outside the refresh margin.
pub(crate) fn servable(s: &RefreshSettings, stamp: &TokenStamp) -> bool {
    stamp.status.serves_tokens()
        && !inside_margin(s, stamp.expires_at, stamp.last_success_at, now_ms())
}
