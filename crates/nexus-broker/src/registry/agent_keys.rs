//! Agent keys: what agents present to the gateway (`nxa_...`), each bound to
//! one or more workspaces. The broker stores only a SHA-256 of each key and
//! answers the gateway's `verify` calls; keys are shown once, at creation.

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::OsRng;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::events::audit::Actor;
use crate::events::audit::AuditEvent;
use crate::store::{now_ms, rfc3339, AgentKeyRow, Store, StoreError};
use nexus_core::Secret;

/// Every agent key starts with this.
pub const PREFIX: &str = "nxa_";

/// Agent key failures.
#[derive(Debug, thiserror::Error)]
pub enum AgentKeyError {
    /// Malformed request.
    #[error("{0}")]
    Invalid(String),
    /// No such live key.
    #[error("agent key not found")]
    NotFound,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `POST /agent-keys` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAgentKey {
    /// Human name (who uses it).
    pub name: String,
    /// Workspaces it may reach; `["*"]` for all.
    pub workspaces: Vec<String>,
}

/// A key as the API shows it (never the key, except once at creation).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentKeyView {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// `nxa_` and the key's first characters.
    pub prefix: String,
    /// Workspaces it may reach (`*` = all).
    pub workspaces: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub last_used_at: Option<String>,
    /// Whether it was revoked.
    pub revoked: bool,
}

impl From<&AgentKeyRow> for AgentKeyView {
    fn from(k: &AgentKeyRow) -> Self {
        Self {
            id: k.id.clone(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            workspaces: crate::store::parse_json_list(&k.workspaces),
            created_at: rfc3339(k.created_at),
            last_used_at: k.last_used_at.map(rfc3339),
            revoked: k.revoked_at.is_some(),
        }
    }
}

/// SHA-256 of a key, hex.
pub fn hash(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Agent key management.
#[derive(Debug, Clone)]
pub struct AgentKeys {
    store: Store,
}

impl AgentKeys {
    /// Builds the service.
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Creates a key; returns it once, with its description.
    pub async fn create(
        &self,
        req: NewAgentKey,
        actor: &Actor,
    ) -> Result<(AgentKeyView, Secret<String>), AgentKeyError> {
        let name = req.name.trim().to_string();
        if name.is_empty() || name.chars().count() > 100 {
            return Err(AgentKeyError::Invalid(
                "name must be 1 to 100 characters".into(),
            ));
        }
        if req.workspaces.is_empty() || req.workspaces.len() > 100 {
            return Err(AgentKeyError::Invalid(
                "workspaces must list 1 to 100 workspace ids (or \"*\" for all)".into(),
            ));
        }
        let mut workspaces: Vec<String> = Vec::new();
        for w in req.workspaces {
            if w.is_empty() || w.len() > 256 || w.chars().any(char::is_control) {
                return Err(AgentKeyError::Invalid(
                    "each workspace id must be 1 to 256 characters".into(),
                ));
            }
            if !workspaces.contains(&w) {
                workspaces.push(w);
            }
        }
        let mut bytes = [0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        let key = Secret::new(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes)));
        let row = AgentKeyRow {
            id: format!("ak_{}", uuid::Uuid::new_v4().simple()),
            name,
            prefix: key.expose().chars().take(PREFIX.len() + 6).collect(),
            workspaces: crate::store::json_list(&workspaces),
            created_at: now_ms(),
            last_used_at: None,
            revoked_at: None,
        };
        let audit = AuditEvent::new("agent_key.created")
            .actor(actor.name.clone())
            .by(actor)
            .detail(json!({"agent_key_id": row.id, "name": row.name, "workspaces": workspaces}));
        self.store
            .create_agent_key(&row, &hash(key.expose()), &audit)
            .await?;
        Ok((AgentKeyView::from(&row), key))
    }

    /// Every key.
    pub async fn list(&self) -> Result<Vec<AgentKeyView>, AgentKeyError> {
        Ok(self
            .store
            .list_agent_keys()
            .await?
            .iter()
            .map(AgentKeyView::from)
            .collect())
    }

    /// Revokes a live key.
    pub async fn revoke(&self, id: &str, actor: &Actor) -> Result<(), AgentKeyError> {
        let audit = AuditEvent::new("agent_key.revoked")
            .actor(actor.name.clone())
            .by(actor)
            .detail(json!({"agent_key_id": id}));
        if self.store.revoke_agent_key(id, &audit).await? {
            Ok(())
        } else {
            Err(AgentKeyError::NotFound)
        }
    }

    /// The live key matching `key`, if any (its use is noted).
    pub async fn verify(&self, key: &str) -> Result<Option<AgentKeyView>, AgentKeyError> {
        if !key.starts_with(PREFIX) || key.len() > 128 {
            return Ok(None);
        }
        Ok(self
            .store
            .use_agent_key(&hash(key))
            .await?
            .as_ref()
            .map(AgentKeyView::from))
    }
}
