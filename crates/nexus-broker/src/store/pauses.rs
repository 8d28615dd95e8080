//! Issuance pauses (the kill switch). Each change is announced like a token
//! change, because every replica keeps the pauses in memory for the token path.

use sqlx::Row;

use super::{on_pool, Change, Store, StoreError};
use crate::events::audit::AuditEvent;

/// Which pause.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PauseScope {
    /// Every workspace.
    Operator,
    /// One workspace.
    Workspace(String),
}

impl PauseScope {
    fn columns(&self) -> (&'static str, &str) {
        match self {
            PauseScope::Operator => ("operator", ""),
            PauseScope::Workspace(w) => ("workspace", w.as_str()),
        }
    }
}

/// A pause in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseRow {
    /// Operator-wide or one workspace.
    pub scope: PauseScope,
    /// Why (shown to callers in the 423).
    pub reason: String,
    /// Who set it.
    pub paused_by: Option<String>,
    /// Unix ms.
    pub paused_at: i64,
}

impl Store {
    /// Every pause in force.
    pub async fn list_pauses(&self) -> Result<Vec<PauseRow>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query("SELECT kind, workspace_id, reason, paused_by, paused_at FROM issuance_pauses")
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|r| -> Result<PauseRow, sqlx::Error> {
                    let kind: String = r.try_get("kind")?;
                    let ws: String = r.try_get("workspace_id")?;
                    Ok(PauseRow {
                        scope: if kind == "operator" { PauseScope::Operator } else { PauseScope::Workspace(ws) },
                        reason: r.try_get("reason")?,
                        paused_by: r.try_get("paused_by")?,
                        paused_at: r.try_get("paused_at")?,
                    })
                })
                .collect::<Result<_, _>>()
                .map_err(StoreError::from)
        })
    }

    /// Sets (or re-sets, with a new reason) a pause, with its audit event.
    pub async fn set_pause(&self, p: &PauseRow, audit: &AuditEvent) -> Result<(), StoreError> {
        let (kind, ws) = p.scope.columns();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO issuance_pauses (kind, workspace_id, reason, paused_by, paused_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (kind, workspace_id) DO UPDATE SET reason = $3, paused_by = $4, paused_at = $5",
            )
            .bind(kind)
            .bind(ws)
            .bind(&p.reason)
            .bind(&p.paused_by)
            .bind(p.paused_at)
            .execute(&mut *tx)
            .await?;
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        self.publish(Change::Pauses);
        Ok(())
    }

    /// Lifts a pause, with its audit event. Returns whether one was in force
    /// (nothing is written or audited otherwise).
    pub async fn clear_pause(
        &self,
        scope: &PauseScope,
        audit: &AuditEvent,
    ) -> Result<bool, StoreError> {
        let (kind, ws) = scope.columns();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let res = sqlx::query("DELETE FROM issuance_pauses WHERE kind = $1 AND workspace_id = $2")
                .bind(kind)
                .bind(ws)
                .execute(&mut *tx)
                .await?;
            if res.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        self.publish(Change::Pauses);
        Ok(true)
    }
}
