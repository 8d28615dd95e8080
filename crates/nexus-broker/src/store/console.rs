//! Console sign-in links and sessions (token hashes only).

use sqlx::Row;

use super::connections::{connection_from_row, CONNECTION_COLUMNS};
use super::{on_pool, ConnectionRow, Store, StoreError};
use crate::events::audit::AuditEvent;

/// A console session (never its token).
#[derive(Debug, Clone)]
pub struct ConsoleSessionRow {
    /// Id (`con_...`).
    pub id: String,
    /// Who signed in.
    pub operator: String,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms of the last page (the idle expiry counts from it).
    pub last_seen_at: i64,
    /// Unix ms: the absolute end.
    pub expires_at: i64,
    /// Unix ms: signed out.
    pub ended_at: Option<i64>,
}

const INSERT_SESSION: &str = "INSERT INTO console_sessions (id, token_hash, operator, created_at, last_seen_at, expires_at) VALUES ($1, $2, $3, $4, $4, $5)";

impl Store {
    /// Stores a one-time sign-in link.
    pub async fn create_console_link(
        &self,
        token_hash: &str,
        operator: &str,
        now: i64,
        expires_at: i64,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO console_links (token_hash, operator, created_at, expires_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(token_hash)
            .bind(operator)
            .bind(now)
            .bind(expires_at)
            .execute(&mut *tx)
            .await?;
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Uses a link once and opens its session in the same transaction: the
    /// operator it was minted for, or `None` when it is unknown, used or
    /// expired.
    pub async fn use_console_link(
        &self,
        token_hash: &str,
        session: &ConsoleSessionRow,
        session_hash: &str,
        audit: &AuditEvent,
    ) -> Result<Option<String>, StoreError> {
        let now = session.created_at;
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let row = sqlx::query(
                "UPDATE console_links SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1 RETURNING operator",
            )
            .bind(now)
            .bind(token_hash)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                tx.rollback().await?;
                return Ok(None);
            };
            let operator: String = row.try_get("operator")?;
            sqlx::query(INSERT_SESSION)
                .bind(&session.id)
                .bind(session_hash)
                .bind(&operator)
                .bind(now)
                .bind(session.expires_at)
                .execute(&mut *tx)
                .await?;
            let mut audit = audit.clone();
            audit.actor = Some(format!("console:{operator}"));
            super::audit::insert_one(&mut *tx, &audit).await?;
            tx.commit().await?;
            Ok(Some(operator))
        })
    }

    /// Opens a session for an operator who signed in elsewhere (single
    /// sign-on), with its audit event, in one transaction.
    pub async fn open_console_session(
        &self,
        session: &ConsoleSessionRow,
        session_hash: &str,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(INSERT_SESSION)
                .bind(&session.id)
                .bind(session_hash)
                .bind(&session.operator)
                .bind(session.created_at)
                .bind(session.expires_at)
                .execute(&mut *tx)
                .await?;
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// The session with this token hash, live or not.
    pub async fn console_session_by_hash(
        &self,
        token_hash: &str,
    ) -> Result<Option<ConsoleSessionRow>, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query(
                "SELECT id, operator, created_at, last_seen_at, expires_at, ended_at FROM console_sessions WHERE token_hash = $1",
            )
            .bind(token_hash)
            .fetch_optional(pool)
            .await?;
            let Some(r) = row else { return Ok(None) };
            Ok(Some(ConsoleSessionRow {
                id: r.try_get("id")?,
                operator: r.try_get("operator")?,
                created_at: r.try_get("created_at")?,
                last_seen_at: r.try_get("last_seen_at")?,
                expires_at: r.try_get("expires_at")?,
                ended_at: r.try_get("ended_at")?,
            }))
        })
    }

    /// Notes a page seen now (the idle expiry restarts).
    pub async fn touch_console_session(&self, id: &str, now: i64) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query("UPDATE console_sessions SET last_seen_at = $1 WHERE id = $2")
                .bind(now)
                .bind(id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Ends a session (sign-out), with its audit event.
    pub async fn end_console_session(
        &self,
        id: &str,
        now: i64,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("UPDATE console_sessions SET ended_at = $1 WHERE id = $2 AND ended_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Connections by state, across workspaces.
    pub async fn count_connections_by_status(&self) -> Result<Vec<(String, i64)>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM connections GROUP BY status ORDER BY status")
                .fetch_all(pool)
                .await?;
            Ok(rows
                .iter()
                .map(|r| Ok((r.try_get("status")?, r.try_get("n")?)))
                .collect::<Result<_, sqlx::Error>>()?)
        })
    }

    /// Connections across workspaces, newest first, narrowed by whichever
    /// of workspace, provider and state are given; at most `limit`.
    pub async fn find_connections(
        &self,
        workspace_id: Option<&str>,
        provider_id: Option<&str>,
        status: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ConnectionRow>, StoreError> {
        // Each filter is `$n IS NULL OR column = $n`: one statement, bound values only.
        let sql = format!(
            "SELECT {CONNECTION_COLUMNS} FROM connections \
             WHERE ($1 IS NULL OR workspace_id = $1) AND ($2 IS NULL OR provider_id = $2) \
             AND ($3 IS NULL OR status = $3) ORDER BY updated_at DESC, id LIMIT $4"
        );
        on_pool!(self, pool => {
            let rows = sqlx::query(&sql)
                .bind(workspace_id)
                .bind(provider_id)
                .bind(status)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            Ok(rows.iter().map(connection_from_row).collect::<Result<_, _>>()?)
        })
    }
}
