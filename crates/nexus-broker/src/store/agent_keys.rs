//! Agent key rows (hashes only).

use sqlx::Row;

use super::{now_ms, on_pool, Store, StoreError};
use crate::events::audit::AuditEvent;

/// A stored agent key (never the key itself).
#[derive(Debug, Clone)]
pub struct AgentKeyRow {
    /// Id (`ak_...`).
    pub id: String,
    /// Human name.
    pub name: String,
    /// First characters of the key, for telling keys apart.
    pub prefix: String,
    /// JSON array of workspace ids; `["*"]` = every workspace.
    pub workspaces: String,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms (coalesced to about a minute).
    pub last_used_at: Option<i64>,
    /// Unix ms; revoked keys are refused.
    pub revoked_at: Option<i64>,
}

const COLUMNS: &str = "id, name, prefix, workspaces, created_at, last_used_at, revoked_at";

fn from_row<R: Row>(r: &R) -> Result<AgentKeyRow, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(AgentKeyRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        prefix: r.try_get("prefix")?,
        workspaces: r.try_get("workspaces")?,
        created_at: r.try_get("created_at")?,
        last_used_at: r.try_get("last_used_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

impl Store {
    /// Stores a new key's hash (with its audit event).
    pub async fn create_agent_key(
        &self,
        k: &AgentKeyRow,
        key_hash: &str,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO agent_keys (id, name, key_hash, prefix, workspaces, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&k.id)
            .bind(&k.name)
            .bind(key_hash)
            .bind(&k.prefix)
            .bind(&k.workspaces)
            .bind(k.created_at)
            .execute(&mut *tx)
            .await?;
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Every key, newest first (revoked ones included, marked).
    pub async fn list_agent_keys(&self) -> Result<Vec<AgentKeyRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM agent_keys ORDER BY created_at DESC, id");
        on_pool!(self, pool => {
            let rows = sqlx::query(&sql).fetch_all(pool).await?;
            Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
        })
    }

    /// Revokes a key (with its audit event). Returns whether it was live.
    pub async fn revoke_agent_key(&self, id: &str, audit: &AuditEvent) -> Result<bool, StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let res = sqlx::query("UPDATE agent_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
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

    /// The live key with this hash, noting its use (at most once a minute per key).
    pub async fn use_agent_key(&self, key_hash: &str) -> Result<Option<AgentKeyRow>, StoreError> {
        let now = now_ms();
        let sql =
            format!("SELECT {COLUMNS} FROM agent_keys WHERE key_hash = $1 AND revoked_at IS NULL");
        on_pool!(self, pool => {
            let row = sqlx::query(&sql).bind(key_hash).fetch_optional(pool).await?;
            let Some(row) = row else { return Ok(None) };
            let mut k = from_row(&row)?;
            if k.last_used_at.is_none_or(|t| now - t > 60_000) {
                sqlx::query("UPDATE agent_keys SET last_used_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(&k.id)
                    .execute(pool)
                    .await?;
                k.last_used_at = Some(now);
            }
            Ok(Some(k))
        })
    }
}
