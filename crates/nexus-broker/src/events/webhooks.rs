//! Webhooks (SPEC §9): events about connections and providers, signed in the
//! [Standard Webhooks](https://www.standardwebhooks.com/) format.
//!
//! An event is built here ([`connection_event`], [`provider_event`]) and
//! written to the outbox by the store method that makes the state change, in
//! the same transaction. [`Webhooks::run_worker`] claims due deliveries with a
//! lease, POSTs them signed (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`), and
//! retries failures with capped exponential backoff and full jitter until
//! the event is [`WebhookSettings::max_age`] old. Delivery is at least once:
//! a receiver de-duplicates on `webhook-id`, which is the same on every retry.

use std::sync::Arc;
use std::time::Duration;

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::OsRng;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use url::Url;

use crate::events::audit::Actor;
use crate::events::audit::AuditEvent;
use crate::store::{
    now_ms, rfc3339, ConnectionRow, ConnectionStatus, DeliveryView, EndpointRow, OutboxEvent,
    Store, StoreError,
};
use crate::vault::{Aad, KeyRing};
use nexus_core::Secret;

/// A connection became usable (first consent, or re-consent from a state that was not a failure).
pub const CONNECTION_ACTIVE: &str = "connection.active";
/// Some scopes fail at the provider.
pub const CONNECTION_DEGRADED: &str = "connection.degraded";
/// A person must re-consent.
pub const CONNECTION_ATTENTION_REQUIRED: &str = "connection.attention_required";
/// Disconnected.
pub const CONNECTION_REVOKED: &str = "connection.revoked";
/// Back to `active` from `degraded` or `attention_required`.
pub const CONNECTION_RECOVERED: &str = "connection.recovered";
/// The provider refused our client (integration fault).
pub const PROVIDER_UNHEALTHY: &str = "provider.unhealthy";

/// Every event type an endpoint can subscribe to.
pub const EVENT_TYPES: &[&str] = &[
    CONNECTION_ACTIVE,
    CONNECTION_DEGRADED,
    CONNECTION_ATTENTION_REQUIRED,
    CONNECTION_REVOKED,
    CONNECTION_RECOVERED,
    PROVIDER_UNHEALTHY,
];

/// Tuning of delivery.
#[derive(Debug, Clone, Copy)]
pub struct WebhookSettings {
    /// How often the worker looks for due deliveries.
    pub tick: Duration,
    /// Deliveries claimed at once.
    pub batch: i64,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    /// Timeout of one POST.
    pub timeout: Duration,
    /// First retry delay (doubles, full jitter).
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_cap: Duration,
    /// Give up on an event this long after it happened.
    pub max_age: Duration,
    /// Whether this replica delivers.
    pub worker: bool,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            batch: 50,
            concurrency: 8,
            timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(5),
            backoff_cap: Duration::from_secs(3600),
            max_age: Duration::from_secs(24 * 3600),
            worker: true,
        }
    }
}

/// Webhook management failures.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// No such endpoint.
    #[error("webhook endpoint not found")]
    NotFound,
    /// No given-up delivery of that event to that endpoint.
    #[error(
        "no failed delivery of that event to that endpoint (only given-up deliveries are retried)"
    )]
    NoFailedDelivery,
    /// The endpoint is managed by configuration.
    #[error("this endpoint is configured by WEBHOOK_URL; unset it and restart to remove it")]
    Managed,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A signing secret: `whsec_` + base64 of 24 to 64 random bytes.
pub struct WebhookSecret(Secret<Vec<u8>>);

impl WebhookSecret {
    /// A fresh 32-byte secret.
    pub fn generate() -> Self {
        let mut b = vec![0u8; 32];
        OsRng.fill_bytes(&mut b);
        Self(Secret::new(b))
    }

    /// Parses `whsec_<base64>` (the prefix is optional).
    pub fn parse(s: &str) -> Option<Self> {
        let b64 = s.trim().strip_prefix("whsec_").unwrap_or(s.trim());
        let bytes = STANDARD.decode(b64).ok()?;
        (24..=64)
            .contains(&bytes.len())
            .then(|| Self(Secret::new(bytes)))
    }

    /// Whether two secrets are the same bytes (in constant time).
    pub fn same_as(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.0.expose().ct_eq(other.0.expose()).into()
    }

    /// The text form (`whsec_...`), shown once at creation.
    pub fn encoded(&self) -> Secret<String> {
        Secret::new(format!("whsec_{}", STANDARD.encode(self.0.expose())))
    }

    /// `v1,<base64 HMAC-SHA256("{id}.{timestamp}.{body}")>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &str) -> String {
        // HMAC accepts keys of any length, so this cannot fail.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(self.0.expose()) else {
            unreachable!("HMAC takes any key length")
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body.as_bytes());
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

fn message_id() -> String {
    format!("msg_{}", uuid::Uuid::new_v4().simple())
}

fn envelope(event_type: &str, data: Value) -> OutboxEvent {
    let created_at = now_ms();
    OutboxEvent {
        id: message_id(),
        event_type: event_type.to_string(),
        payload: json!({"type": event_type, "timestamp": rfc3339(created_at), "data": data})
            .to_string(),
        created_at,
    }
}

/// A connection event. `c` is the row before the change; the new state and
/// failing scopes are given. States that need a person carry the
/// consent-spec call that fixes them (`return_url` is the caller's to add).
pub fn connection_event(
    event_type: &str,
    c: &ConnectionRow,
    provider_name: Option<&str>,
    new_state: ConnectionStatus,
    error_code: Option<&str>,
    failing_scopes: &[String],
) -> OutboxEvent {
    let reconsent = new_state.wants_reconsent().then(|| {
        let mut scopes = crate::store::parse_json_list(&c.requested_scopes);
        for s in failing_scopes {
            if !scopes.contains(s) {
                scopes.push(s.clone());
            }
        }
        json!({
            "method": "POST",
            "path": "/auth/consent-spec",
            "body": {
                "workspace_id": c.workspace_id,
                "provider_id": c.provider_id,
                "connection_id": c.id,
                "scopes": scopes,
            },
            "note": "add a return_url; the person who owns the connection opens the returned authUrl",
        })
    });
    envelope(
        event_type,
        json!({
            "connection_id": c.id,
            "workspace_id": c.workspace_id,
            "provider_id": c.provider_id,
            "provider_name": provider_name,
            "old_state": c.status,
            "new_state": new_state,
            "error_code": error_code,
            "failing_scopes": failing_scopes,
            "reconsent": reconsent,
        }),
    )
}

/// A provider event (`provider.unhealthy`).
pub fn provider_event(provider_id: &str, provider_name: &str, error_code: &str) -> OutboxEvent {
    envelope(
        PROVIDER_UNHEALTHY,
        json!({"provider_id": provider_id, "provider_name": provider_name, "error_code": error_code}),
    )
}

/// The event for a connection that became usable with `failing` scopes
/// still failing: `recovered` when it leaves a state that needed a person,
/// `degraded` when scopes still fail, else `active`.
pub fn activation_event(
    c: &ConnectionRow,
    provider_name: Option<&str>,
    failing: &[String],
) -> OutboxEvent {
    use ConnectionStatus::{Active, AttentionRequired, Degraded};
    let new_state = if failing.is_empty() { Active } else { Degraded };
    let kind = match (c.status, new_state) {
        (Degraded | AttentionRequired, Active) => CONNECTION_RECOVERED,
        (AttentionRequired, Degraded) => CONNECTION_RECOVERED,
        (_, Degraded) => CONNECTION_DEGRADED,
        _ => CONNECTION_ACTIVE,
    };
    connection_event(kind, c, provider_name, new_state, None, failing)
}

/// `POST /webhooks` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEndpoint {
    /// Where to POST.
    pub url: String,
    /// Event types (default: all).
    pub events: Option<Vec<String>>,
    /// Free text.
    pub description: Option<String>,
    /// The signing secret (`whsec_` + base64 of 24 to 64 bytes), for an
    /// endpoint whose receiver already has one (a manifest kept in git
    /// names it from an environment variable); generated when absent.
    #[serde(default)]
    pub secret: Option<Secret<String>>,
}

/// What `POST /webhooks/plan` says registering an endpoint would do.
#[derive(Debug, Serialize)]
pub struct EndpointPlan {
    /// `create`, `update` or `none`.
    pub action: &'static str,
    /// The live endpoint with this URL (update and none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `{field, before, after}`; the secret shows only as `(set)`,
    /// `(generated)` or `(changed)`.
    pub changes: Vec<Value>,
}

/// An endpoint as the API shows it (never the secret, except once at creation).
#[derive(Debug, Serialize)]
pub struct EndpointView {
    /// Id.
    pub id: String,
    /// URL.
    pub url: String,
    /// Subscribed event types (`["*"]` = all).
    pub events: Vec<String>,
    /// Free text.
    pub description: Option<String>,
    /// `api` or `env` (WEBHOOK_URL).
    pub managed_by: &'static str,
    /// RFC 3339.
    pub created_at: String,
}

impl From<&EndpointRow> for EndpointView {
    fn from(e: &EndpointRow) -> Self {
        Self {
            id: e.id.clone(),
            url: e.url.clone(),
            events: crate::store::parse_json_list(&e.events),
            description: e.description.clone(),
            managed_by: if e.id == "env" { "env" } else { "api" },
            created_at: rfc3339(e.created_at),
        }
    }
}

/// Checks an endpoint URL: absolute http(s), no credentials, no fragment.
pub fn validate_url(raw: &str) -> Result<Url, String> {
    if raw.len() > 2048 {
        return Err("url is longer than 2048 characters".into());
    }
    let u = Url::parse(raw).map_err(|e| format!("url is not an absolute URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return Err("url must be an http or https URL with a host".into());
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("url must not carry credentials; the signature authenticates us".into());
    }
    if u.fragment().is_some() {
        return Err("url must not have a fragment".into());
    }
    // The signature is a secret-derived value and the payload names people's
    // connections: not over plaintext, except to loopback (development).
    if nexus_core::egress::plaintext_beyond_loopback(raw) {
        return Err("url must use https (http only to loopback)".into());
    }
    Ok(u)
}

/// Checks an event list: known types or `*`, no duplicates, not empty.
pub fn validate_events(events: Option<Vec<String>>) -> Result<Vec<String>, String> {
    let Some(events) = events else {
        return Ok(vec!["*".into()]);
    };
    if events.is_empty() {
        return Err("events must name at least one event type (or \"*\" for all)".into());
    }
    let mut out: Vec<String> = Vec::new();
    for e in events {
        if e != "*" && !EVENT_TYPES.contains(&e.as_str()) {
            return Err(format!(
                "unknown event type '{}'; known: {}",
                e.chars().take(64).collect::<String>(),
                EVENT_TYPES.join(", ")
            ));
        }
        if !out.contains(&e) {
            out.push(e);
        }
    }
    if out.iter().any(|e| e == "*") {
        out = vec!["*".into()];
    }
    Ok(out)
}

/// A `NewEndpoint` after its checks.
struct Checked {
    url: Url,
    events: Vec<String>,
    description: Option<String>,
    secret: Option<WebhookSecret>,
}

impl Checked {
    fn from(req: NewEndpoint) -> Result<Self, WebhookError> {
        let url = validate_url(req.url.trim()).map_err(WebhookError::Invalid)?;
        let events = validate_events(req.events).map_err(WebhookError::Invalid)?;
        if req.description.as_ref().is_some_and(|d| d.len() > 1024) {
            return Err(WebhookError::Invalid(
                "description is longer than 1024 characters".into(),
            ));
        }
        let secret = match req.secret {
            None => None,
            Some(s) => Some(WebhookSecret::parse(s.expose()).ok_or_else(|| {
                WebhookError::Invalid(
                    "secret must be whsec_ followed by the base64 of 24 to 64 random bytes".into(),
                )
            })?),
        };
        Ok(Self {
            url,
            events,
            description: req.description,
            secret,
        })
    }
}

/// Endpoint management and the delivery worker.
pub struct Webhooks {
    pub(super) store: Store,
    pub(super) keys: Arc<KeyRing>,
    pub(super) http: reqwest::Client,
    pub(super) settings: WebhookSettings,
    pub(super) owner: String,
    /// Where deliveries may go (an address literal in a URL is checked
    /// here; names, by `http`'s resolver).
    pub(super) egress: Arc<nexus_core::egress::Egress>,
}

impl Webhooks {
    /// Builds the service; `http` must not follow redirects and should
    /// resolve names through `egress` ([`nexus_core::outbound::guarded_client`]).
    pub fn new(
        store: Store,
        keys: Arc<KeyRing>,
        http: reqwest::Client,
        settings: WebhookSettings,
        egress: Arc<nexus_core::egress::Egress>,
    ) -> Self {
        Self {
            store,
            keys,
            http,
            settings,
            egress,
            owner: format!("webhooks-{}", uuid::Uuid::new_v4().simple()),
        }
    }

    fn seal(&self, id: &str, secret: &WebhookSecret) -> String {
        self.keys.encrypt_str(
            Aad::new("webhook_endpoints", id, "secret"),
            &secret.encoded(),
        )
    }

    /// Adds an endpoint; returns it with its secret when Nexus generated it
    /// (shown this once; never when the caller supplied it).
    pub async fn create(
        &self,
        req: NewEndpoint,
        actor: &Actor,
    ) -> Result<(EndpointView, Option<Secret<String>>), WebhookError> {
        let checked = Checked::from(req)?;
        let (url, events) = (checked.url, checked.events);
        let id = format!("wh_{}", uuid::Uuid::new_v4().simple());
        let (secret, generated) = match checked.secret {
            Some(s) => (s, false),
            None => (WebhookSecret::generate(), true),
        };
        let row = EndpointRow {
            secret: self.seal(&id, &secret),
            id: id.clone(),
            url: url.to_string(),
            events: crate::store::json_list(&events),
            description: checked.description,
            created_at: now_ms(),
        };
        let audit = AuditEvent::new("webhook.created")
            .actor(actor.name.clone())
            .by(actor)
            .detail(json!({"webhook_id": id, "url": row.url, "events": events}));
        self.store.create_endpoint(&row, &audit).await?;
        Ok((
            EndpointView::from(&row),
            generated.then(|| secret.encoded()),
        ))
    }

    /// Replaces an endpoint's URL, events and description, and its secret
    /// when one is given (the current one is kept otherwise).
    pub async fn update(
        &self,
        id: &str,
        req: NewEndpoint,
        actor: &Actor,
    ) -> Result<EndpointView, WebhookError> {
        if id == "env" {
            return Err(WebhookError::Managed);
        }
        let current = self
            .store
            .get_endpoint(id)
            .await?
            .ok_or(WebhookError::NotFound)?;
        let checked = Checked::from(req)?;
        let secret_changed = checked.secret.is_some();
        let row = EndpointRow {
            id: id.to_string(),
            url: checked.url.to_string(),
            events: crate::store::json_list(&checked.events),
            secret: match &checked.secret {
                Some(s) => self.seal(id, s),
                None => current.secret.clone(),
            },
            description: checked.description,
            created_at: current.created_at,
        };
        let audit = AuditEvent::new("webhook.updated")
            .actor(actor.name.clone())
            .by(actor)
            .detail(
                json!({"webhook_id": id, "url": row.url, "events": checked.events,
                "secret_changed": secret_changed}),
            );
        match self.store.update_endpoint(&row, &audit).await {
            Err(StoreError::NotFound) => Err(WebhookError::NotFound),
            other => {
                other?;
                Ok(EndpointView::from(&row))
            }
        }
    }

    /// What registering `req` would do, matched to a live endpoint by URL;
    /// nothing is stored. A secret is compared with the stored one inside
    /// the broker and shown only as a marker.
    pub async fn plan(&self, req: NewEndpoint) -> Result<EndpointPlan, WebhookError> {
        let checked = Checked::from(req)?;
        let url = checked.url.to_string();
        let live = self.store.list_endpoints().await?;
        let same: Vec<&EndpointRow> = live.iter().filter(|e| e.url == url).collect();
        let change = |field: &str, before: Value, after: Value| json!({"field": field, "before": before, "after": after});
        let existing = match same.as_slice() {
            [] => {
                let mut changes = vec![
                    change("url", Value::Null, json!(url)),
                    change("events", Value::Null, json!(checked.events)),
                ];
                if let Some(d) = &checked.description {
                    changes.push(change("description", Value::Null, json!(d)));
                }
                let marker = if checked.secret.is_some() {
                    "(set)"
                } else {
                    "(generated)"
                };
                changes.push(change("secret", Value::Null, json!(marker)));
                return Ok(EndpointPlan {
                    action: "create",
                    id: None,
                    changes,
                });
            }
            [one] if one.id == "env" => return Err(WebhookError::Managed),
            [one] => *one,
            _ => {
                return Err(WebhookError::Invalid(format!(
                "{} endpoints have this URL; delete all but one before managing it from a manifest",
                same.len()
            )))
            }
        };
        let mut changes = Vec::new();
        let before_events = crate::store::parse_json_list(&existing.events);
        let sorted = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort();
            v
        };
        if sorted(&before_events) != sorted(&checked.events) {
            changes.push(change(
                "events",
                json!(before_events),
                json!(checked.events),
            ));
        }
        if existing.description != checked.description {
            changes.push(change(
                "description",
                json!(existing.description),
                json!(checked.description),
            ));
        }
        if let Some(new) = &checked.secret {
            let old = self
                .keys
                .decrypt_str(
                    Aad::new("webhook_endpoints", &existing.id, "secret"),
                    &existing.secret,
                )
                .ok()
                .and_then(|s| WebhookSecret::parse(s.expose()));
            if !old.is_some_and(|old| old.same_as(new)) {
                changes.push(change("secret", json!("(set)"), json!("(changed)")));
            }
        }
        Ok(EndpointPlan {
            action: if changes.is_empty() { "none" } else { "update" },
            id: Some(existing.id.clone()),
            changes,
        })
    }

    /// Live endpoints.
    pub async fn list(&self) -> Result<Vec<EndpointView>, WebhookError> {
        Ok(self
            .store
            .list_endpoints()
            .await?
            .iter()
            .map(EndpointView::from)
            .collect())
    }

    /// One endpoint.
    pub async fn get(&self, id: &str) -> Result<EndpointView, WebhookError> {
        self.store
            .get_endpoint(id)
            .await?
            .map(|e| EndpointView::from(&e))
            .ok_or(WebhookError::NotFound)
    }

    /// Deletes an endpoint; what it had not received is cancelled.
    pub async fn delete(&self, id: &str, actor: &Actor) -> Result<(), WebhookError> {
        if id == "env" {
            return Err(WebhookError::Managed);
        }
        let audit = AuditEvent::new("webhook.deleted")
            .actor(actor.name.clone())
            .by(actor)
            .detail(json!({"webhook_id": id}));
        match self.store.delete_endpoint(id, &audit).await {
            Err(StoreError::NotFound) => Err(WebhookError::NotFound),
            other => Ok(other?),
        }
    }

    /// An endpoint's recent deliveries.
    pub async fn deliveries(
        &self,
        id: &str,
        limit: i64,
    ) -> Result<Vec<DeliveryView>, WebhookError> {
        self.get(id).await?;
        Ok(self.store.list_deliveries(id, limit).await?)
    }

    /// Tries a given-up delivery once more, now (audited).
    pub async fn retry(
        &self,
        endpoint_id: &str,
        message_id: &str,
        actor: &Actor,
    ) -> Result<(), WebhookError> {
        let audit = AuditEvent::new("webhook.delivery_retried")
            .actor(actor.name.clone())
            .by(actor)
            .detail(serde_json::json!({"webhook_id": endpoint_id, "message_id": message_id}));
        match self
            .store
            .retry_delivery(endpoint_id, message_id, &audit)
            .await
        {
            Err(StoreError::NotFound) => Err(WebhookError::NoFailedDelivery),
            other => Ok(other?),
        }
    }

    /// Makes the `WEBHOOK_URL` endpoint match the configuration (or retires it).
    pub async fn sync_env(
        &self,
        url: Option<&Url>,
        secret: Option<&WebhookSecret>,
    ) -> Result<(), StoreError> {
        match (url, secret) {
            (Some(url), Some(secret)) => {
                let row = EndpointRow {
                    id: "env".into(),
                    url: url.to_string(),
                    events: r#"["*"]"#.into(),
                    secret: self.seal("env", secret),
                    description: Some("configured by WEBHOOK_URL".into()),
                    created_at: now_ms(),
                };
                self.store.sync_env_endpoint(Some(&row)).await
            }
            _ => self.store.sync_env_endpoint(None).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example in the Standard Webhooks specification's reference tests.
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_must_be_base64_of_24_to_64_bytes() {
        assert!(WebhookSecret::parse("whsec_short").is_none());
        assert!(WebhookSecret::parse("not base64 at all!!!!!!!!!!!!!!!!!!!").is_none());
        let s = WebhookSecret::generate();
        let text = s.encoded();
        assert!(text.expose().starts_with("whsec_"));
        assert!(WebhookSecret::parse(text.expose()).is_some());
    }

    #[test]
    fn events_are_checked() {
        assert_eq!(validate_events(None).unwrap(), ["*"]);
        assert!(validate_events(Some(vec![])).is_err());
        assert!(validate_events(Some(vec!["connection.nope".into()])).is_err());
        assert_eq!(
            validate_events(Some(vec![
                CONNECTION_DEGRADED.into(),
                CONNECTION_DEGRADED.into()
            ]))
            .unwrap(),
            [CONNECTION_DEGRADED]
        );
        assert!(validate_url("ftp://x").is_err());
        assert!(validate_url("http://u:p@x/").is_err());
        assert!(validate_url("https://hooks.example.com/nexus").is_ok());
    }
}
