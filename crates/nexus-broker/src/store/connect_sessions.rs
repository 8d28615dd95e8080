//! Connect session rows (token hashes only).

use sqlx::Row;

use super::{on_pool, Store, StoreError};
use crate::events::audit::AuditEvent;

/// A stored connect session (never its token).
#[derive(Debug, Clone)]
pub struct ConnectSessionRow {
    /// Id (`cs_...`).
    pub id: String,
    /// The one workspace it manages.
    pub workspace_id: String,
    /// JSON array of provider ids it may connect; `None`: every provider.
    pub providers: Option<String>,
    /// Where the person goes when done (the application's page).
    pub return_url: Option<String>,
    /// Who created it (an agent key or the admin).
    pub created_by: String,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms; refused after.
    pub expires_at: i64,
    /// Unix ms; refused once set.
    pub revoked_at: Option<i64>,
}

const COLUMNS: &str =
    "id, workspace_id, providers, return_url, created_by, created_at, expires_at, revoked_at";

fn from_row<R: Row>(r: &R) -> Result<ConnectSessionRow, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(ConnectSessionRow {
        id: r.try_get("id")?,
        workspace_id: r.try_get("workspace_id")?,
        providers: r.try_get("providers")?,
        return_url: r.try_get("return_url")?,
        created_by: r.try_get("created_by")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

impl Store {
    /// Stores a new session's token hash (with its audit event).
    pub async fn create_connect_session(
        &self,
        s: &ConnectSessionRow,
        token_hash: &str,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO connect_sessions (id, token_hash, workspace_id, providers, return_url, created_by, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&s.id)
            .bind(token_hash)
            .bind(&s.workspace_id)
            .bind(&s.providers)
            .bind(&s.return_url)
            .bind(&s.created_by)
            .bind(s.created_at)
            .bind(s.expires_at)
            .execute(&mut *tx)
            .await?;
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// The session with this token hash, live or not (the caller says why
    /// one is refused).
    pub async fn connect_session_by_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<ConnectSessionRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM connect_sessions WHERE token_hash = $1");
        on_pool!(self, pool => {
            let row = sqlx::query(&sql).bind(token_hash).fetch_optional(pool).await?;
            Ok(row.as_ref().map(from_row).transpose()?)
        })
    }

    /// Ends a session (with its audit event). Returns whether it was live.
    pub async fn revoke_connect_session(
        &self,
        id: &str,
        now: i64,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let res = sqlx::query(
                "UPDATE connect_sessions SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            if res.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(true)
    }
}
