//! Why a token is not served, and which connection states serve one.

use crate::registry::RegistryError;
use crate::store::{ConnectionRow, ConnectionStatus, PauseRow, StoreError};

/// Why no token is served.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No such connection.
    #[error("connection not found")]
    NotFound,
    /// Consent not finished.
    #[error("the connection is waiting for consent")]
    Pending,
    /// A person must re-consent.
    #[error("{0}")]
    AttentionRequired(String),
    /// Disconnected.
    #[error("the connection was revoked")]
    Revoked,
    /// The handshake failed.
    #[error("the connection's handshake failed")]
    Failed,
    /// The provider could not refresh and the current token has expired.
    #[error("{0}")]
    ProviderUnavailable(String),
    /// The connection has no credentials to serve.
    #[error("{0}")]
    Unusable(String),
    /// Issuance is paused (kill switch), operator-wide or for the workspace.
    #[error("token issuance is paused: {}", .0.reason)]
    Paused(PauseRow),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RegistryError> for TokenError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound => {
                TokenError::Unusable("the connection's provider was deleted".into())
            }
            RegistryError::Store(s) => TokenError::Store(s),
            other => TokenError::Unusable(other.to_string()),
        }
    }
}

/// Whether a connection's status lets it serve tokens (and take reports).
pub fn usable(c: &ConnectionRow) -> Result<(), TokenError> {
    match c.status {
        ConnectionStatus::Active | ConnectionStatus::Degraded => Ok(()),
        ConnectionStatus::Pending => Err(TokenError::Pending),
        ConnectionStatus::AttentionRequired => Err(TokenError::AttentionRequired(
            c.error_description
                .clone()
                .unwrap_or_else(|| "a person must re-consent this connection".into()),
        )),
        ConnectionStatus::Revoked => Err(TokenError::Revoked),
        ConnectionStatus::Failed => Err(TokenError::Failed),
    }
}
