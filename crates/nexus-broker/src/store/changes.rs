//! Change notifications for caches of what the store holds.
//!
//! Every store method that changes what a token response shows (a
//! connection's credentials, status, scopes or expiry; a provider's profile;
//! the issuance pauses) announces a [`Change`] to this process's hooks
//! ([`Store::on_change`]) after it commits, before it returns. On
//! PostgreSQL, triggers (migration `0006_change_notify`) also `NOTIFY` every
//! such change on [`CHANNEL`], whoever made it, so other replicas hear of it
//! through [`Store::listen_remote`].

use std::sync::{Arc, RwLock};

use super::{Pool, Store, StoreError};

/// The PostgreSQL notification channel the triggers write to.
pub const CHANNEL: &str = "nexus_changes";

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A connection's row.
    Connection(String),
    /// A provider's profile (every connection of it is affected).
    Provider(String),
    /// The issuance pauses (kill switch).
    Pauses,
}

impl Change {
    /// Parses a notification payload (`c:<id>`, `p:<id>` or `w:`).
    pub fn parse(payload: &str) -> Option<Self> {
        match payload.split_once(':') {
            Some(("c", id)) => Some(Change::Connection(id.to_string())),
            Some(("p", id)) => Some(Change::Provider(id.to_string())),
            Some(("w", _)) => Some(Change::Pauses),
            _ => None,
        }
    }
}

/// Remote notifications, or the news that some may have been missed.
#[derive(Debug)]
pub enum Remote {
    /// Another process (or this one) changed something.
    Changed(Change),
    /// The listening connection was lost; notifications in the gap are gone.
    Lost,
}

/// Functions called synchronously on every committed change of this process.
pub(crate) type Hooks = Arc<RwLock<Vec<Arc<dyn Fn(&Change) + Send + Sync>>>>;

impl Store {
    /// Calls `hook` on every change this process commits, before the store
    /// method that made it returns: caches dropping entries here give this
    /// process read-your-writes.
    pub fn on_change(&self, hook: impl Fn(&Change) + Send + Sync + 'static) {
        self.hooks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::new(hook));
    }

    /// Announces a committed change to this process's hooks.
    pub(crate) fn publish(&self, change: Change) {
        let hooks = self.hooks.read().unwrap_or_else(|e| e.into_inner()).clone();
        for hook in hooks {
            hook(&change);
        }
    }

    /// Whether other processes' changes can be heard (PostgreSQL).
    pub fn has_remote_changes(&self) -> bool {
        matches!(self.pool, Pool::Postgres(_))
    }

    /// Listens for changes made by any process (PostgreSQL only; `None` on
    /// SQLite). Each call opens its own connection.
    pub async fn listen_remote(&self) -> Result<Option<RemoteListener>, StoreError> {
        match &self.pool {
            Pool::Sqlite(_) => Ok(None),
            Pool::Postgres(pool) => {
                let mut l = sqlx::postgres::PgListener::connect_with(pool).await?;
                l.listen(CHANNEL).await?;
                Ok(Some(RemoteListener { inner: l }))
            }
        }
    }
}

/// A live `LISTEN` on [`CHANNEL`].
pub struct RemoteListener {
    inner: sqlx::postgres::PgListener,
}

impl std::fmt::Debug for RemoteListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RemoteListener")
    }
}

impl RemoteListener {
    /// The next notification, or [`Remote::Lost`] when the connection broke
    /// (the caller should drop this listener and open a new one).
    pub async fn next(&mut self) -> Remote {
        loop {
            match self.inner.try_recv().await {
                Ok(Some(n)) => {
                    if let Some(c) = Change::parse(n.payload()) {
                        return Remote::Changed(c);
                    }
                }
                Ok(None) | Err(_) => return Remote::Lost,
            }
        }
    }
}
