//! Connect sessions: what lets a person manage one workspace's connections
//! in the connect portal (`/connect`, served through the gateway). An
//! application asks for a session (`POST /connect-sessions`, or the
//! gateway's `POST /v1/connect-sessions` with an agent key) and hands the
//! person its URL. The token is random, kept only as a hash, bound to one
//! workspace, short-lived and revocable.

use serde::Deserialize;
use serde_json::json;

use crate::browser_session;

use crate::events::audit::{Actor, AuditEvent};
use crate::store::{now_ms, rfc3339, ConnectSessionRow, Store, StoreError};
use nexus_core::Secret;

/// How long a session lives unless asked otherwise (seconds).
pub const DEFAULT_TTL_SECS: i64 = 1800;
/// The longest a session may live (seconds).
pub const MAX_TTL_SECS: i64 = 86_400;
/// The cookie that carries the session after the link is opened.
pub const COOKIE: &str = "nexus_connect";

/// `POST /connect-sessions` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSession {
    /// The one workspace the person manages.
    pub workspace_id: String,
    /// Providers (ids or names) the person may connect; all when absent.
    pub providers: Option<Vec<String>>,
    /// Where the portal's "Done" link goes (checked like a handshake's).
    pub return_url: Option<String>,
    /// Seconds the link stays usable (60 to 86,400; default 1,800).
    pub expires_in: Option<i64>,
}

/// A session just made: the token is shown this once.
#[derive(Debug)]
pub struct Created {
    /// The session's id (for revoking it).
    pub id: String,
    /// The link to give the person.
    pub url: Secret<String>,
    /// The token in the link.
    pub token: Secret<String>,
    /// RFC 3339.
    pub expires_at: String,
}

/// Why a session was refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// No session has this token.
    #[error("this connect link is not valid; ask the application for a new one")]
    Unknown,
    /// Past its expiry.
    #[error("this connect link has expired; ask the application for a new one")]
    Expired,
    /// Revoked by the application or an operator.
    #[error("this connect link was revoked; ask the application for a new one")]
    Revoked,
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Connect sessions over the store; `key` signs the pages' CSRF tokens.
pub struct Portal<'a> {
    store: &'a Store,
    key: &'a Secret<Vec<u8>>,
}

impl<'a> Portal<'a> {
    /// The sessions of `store`.
    pub fn new(store: &'a Store, key: &'a Secret<Vec<u8>>) -> Self {
        Self { store, key }
    }

    /// Makes a session. `providers` must already be resolved to ids and
    /// `return_url` checked by the caller; `base` is the public base URL.
    pub async fn create(
        &self,
        workspace_id: &str,
        providers: Option<Vec<String>>,
        return_url: Option<String>,
        expires_in: Option<i64>,
        base: &url::Url,
        actor: &Actor,
    ) -> Result<Created, PortalError> {
        if workspace_id.is_empty()
            || workspace_id.len() > 200
            || workspace_id.chars().any(char::is_control)
        {
            return Err(PortalError::Invalid(
                "workspace_id must be 1 to 200 characters without control characters".into(),
            ));
        }
        let ttl = expires_in.unwrap_or(DEFAULT_TTL_SECS);
        if !(60..=MAX_TTL_SECS).contains(&ttl) {
            return Err(PortalError::Invalid(format!(
                "expires_in must be from 60 to {MAX_TTL_SECS} seconds"
            )));
        }
        let token = browser_session::new_token("nxc_").expose().clone();
        let now = now_ms();
        let row = ConnectSessionRow {
            id: format!("cs_{}", uuid::Uuid::new_v4().simple()),
            workspace_id: workspace_id.to_string(),
            providers: providers.as_deref().map(crate::store::json_list),
            return_url,
            created_by: actor.name.clone(),
            created_at: now,
            expires_at: now + ttl * 1000,
            revoked_at: None,
        };
        let audit = AuditEvent::new("connect_session.created")
            .actor(actor.name.clone())
            .by(actor)
            .workspace(workspace_id.to_string())
            .detail(json!({"session_id": row.id, "providers": providers, "expires_in": ttl}));
        self.store
            .create_connect_session(&row, &browser_session::hash(&token), &audit)
            .await?;
        let mut url = base.clone();
        url.set_path(&format!("{}/connect", base.path().trim_end_matches('/')));
        url.query_pairs_mut().append_pair("session", &token);
        Ok(Created {
            id: row.id,
            url: Secret::new(url.to_string()),
            token: Secret::new(token),
            expires_at: rfc3339(row.expires_at),
        })
    }

    /// The live session of `token`.
    pub async fn session(&self, token: &str) -> Result<ConnectSessionRow, PortalError> {
        if !token.starts_with("nxc_") || token.len() > 100 {
            return Err(PortalError::Unknown);
        }
        let s = self
            .store
            .connect_session_by_hash(&browser_session::hash(token))
            .await?
            .ok_or(PortalError::Unknown)?;
        if s.revoked_at.is_some() {
            return Err(PortalError::Revoked);
        }
        if s.expires_at <= now_ms() {
            return Err(PortalError::Expired);
        }
        Ok(s)
    }

    /// Ends a session; false when there was no live one with this id.
    pub async fn revoke(&self, id: &str, actor: &Actor) -> Result<bool, PortalError> {
        let audit = AuditEvent::new("connect_session.revoked")
            .actor(actor.name.clone())
            .by(actor)
            .detail(json!({"session_id": id}));
        Ok(self
            .store
            .revoke_connect_session(id, now_ms(), &audit)
            .await?)
    }

    /// The CSRF token of a session's forms.
    pub fn csrf_token(&self, session_id: &str) -> String {
        browser_session::csrf_token(self.key, "nexus-connect-csrf", session_id)
    }

    /// Checks a CSRF token in constant time.
    pub fn csrf_ok(&self, session_id: &str, token: &str) -> bool {
        browser_session::csrf_ok(self.key, "nexus-connect-csrf", session_id, token)
    }
}
