//! Storage: one [`Store`] with SQLite (embedded default) and PostgreSQL
//! backends.
//!
//! Each query is written once and run on either backend through [`on_pool!`],
//! which expands the same code for the SQLite and the PostgreSQL pool, so the
//! two implementations cannot drift apart. SQL sticks to what both dialects
//! share (`$n` placeholders, `TEXT`, integer unix-millisecond timestamps);
//! the few differences live in the per-backend migrations under
//! `migrations/sqlite` and `migrations/postgres`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::vault::VaultError;

mod agent_keys;
mod audit;
pub mod changes;
mod connect_sessions;
mod connections;
mod console;
mod handshakes;
mod http_cache;
mod leases;
mod pauses;
mod providers;
mod scope_reports;
mod secrets;
mod status;
mod webhooks;

pub use agent_keys::AgentKeyRow;
pub use audit::{AuditFilter, AuditRecord};
pub use changes::Change;
pub use connect_sessions::ConnectSessionRow;
pub use connections::{Activation, ConnectionRow, Refreshed, TokenStamp, Transition};
pub use console::ConsoleSessionRow;
pub use handshakes::{Consumed, HandshakeKind, HandshakeRow};
pub use http_cache::CachedDoc;
pub use pauses::{PauseRow, PauseScope};
pub use providers::{NewProvider, ProviderRow, ProviderUpdate, SecretUpdate};
pub use scope_reports::{ScopeDelta, ScopeFailureView, ScopeReportRow};
pub use secrets::{EncryptedColumn, ENCRYPTED_COLUMNS};
pub use status::ConnectionStatus;
pub use webhooks::{Attempt, AttemptResult, DeliveryJob, DeliveryView, EndpointRow, OutboxEvent};

/// Runs `$body` with `$pool` bound to the concrete pool of either backend.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match &$store.pool {
            $crate::store::Pool::Sqlite($pool) => $body,
            $crate::store::Pool::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite file.
    Sqlite,
    /// PostgreSQL server.
    Postgres,
}

#[derive(Clone)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The broker's system of record.
#[derive(Clone)]
pub struct Store {
    pub(crate) pool: Pool,
    hooks: changes::Hooks,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .finish()
    }
}

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or answered with an error.
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// A migration could not be applied.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A uniqueness rule was violated (e.g. a live provider already has this name).
    #[error("{0}")]
    Conflict(String),
    /// The row does not exist (or is soft-deleted).
    #[error("not found")]
    NotFound,
    /// A stored value could not be read back.
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),
    /// A stored secret could not be decrypted.
    #[error(transparent)]
    Vault(#[from] VaultError),
}

impl StoreError {
    /// True when the database itself is unreachable (answer 503, not 500).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Db(
                sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::WorkerCrashed,
            ) => true,
            // PostgreSQL going away or not taking sessions (found by the
            // soak: a restart or a closed database was a 500): connection
            // exceptions (class 08), shutdown and "cannot connect now"
            // (57P01-57P03), too many connections (53300), and a database
            // not accepting connections (55000).
            StoreError::Db(sqlx::Error::Database(db)) => db.code().is_some_and(|c| {
                c.starts_with("08")
                    || matches!(&*c, "57P01" | "57P02" | "57P03" | "53300" | "55000")
            }),
            _ => false,
        }
    }

    /// True when the database refused text (PostgreSQL: NUL or an
    /// untranslatable character); the caller sent it, so answer 400.
    pub fn is_bad_text(&self) -> bool {
        matches!(self, StoreError::Db(sqlx::Error::Database(db)) if matches!(db.code().as_deref(), Some("22021") | Some("22P05")))
    }

    pub(crate) fn from_unique(e: sqlx::Error, what: impl FnOnce() -> String) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(what()),
            _ => StoreError::Db(e),
        }
    }
}

/// Parses a stored JSON array of strings (unreadable → empty).
pub(crate) fn parse_json_list(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_default()
}

/// A JSON array of strings, as stored.
pub(crate) fn json_list(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

pub use nexus_core::time::now_ms;

/// Formats unix milliseconds as RFC 3339 (UTC).
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl Store {
    /// Connects to `database_url` (`sqlite:path`, `postgres://...`). A SQLite
    /// file is created when missing.
    pub async fn connect(database_url: &str) -> Result<Self, StoreError> {
        if database_url.starts_with("sqlite:") {
            let in_memory =
                database_url.contains(":memory:") || database_url.contains("mode=memory");
            let opts = SqliteConnectOptions::from_str(database_url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            // Every connection to `:memory:` is its own database: keep exactly one.
            let pool_opts = if in_memory {
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
            } else {
                SqlitePoolOptions::new().max_connections(8)
            };
            let pool = pool_opts
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(opts)
                .await?;
            Ok(Self {
                pool: Pool::Sqlite(pool),
                hooks: Default::default(),
            })
        } else {
            let opts = PgConnectOptions::from_str(database_url)?;
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(opts)
                .await?;
            Ok(Self {
                pool: Pool::Postgres(pool),
                hooks: Default::default(),
            })
        }
    }

    /// Which backend this store uses.
    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Applies pending migrations for this backend.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.pool {
            Pool::Sqlite(p) => sqlx::migrate!("./migrations/sqlite").run(p).await?,
            Pool::Postgres(p) => sqlx::migrate!("./migrations/postgres").run(p).await?,
        }
        Ok(())
    }

    /// Round-trips a trivial query (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, p => { sqlx::query("SELECT 1").execute(p).await?; });
        Ok(())
    }

    /// Closes every pooled connection (graceful shutdown).
    pub async fn close(&self) {
        on_pool!(self, p => p.close().await)
    }
}
