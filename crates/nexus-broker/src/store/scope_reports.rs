//! Scope reports: which scopes of a connection fail, since when, how often,
//! and the move between `active` and `degraded` they cause.

use sqlx::Row;

use super::connections::{lock_connection, write_transition, ConnectionRow};
use super::webhooks::OutboxEvent;
use super::{now_ms, on_pool, Change, ConnectionStatus, Store, StoreError};
use crate::events::audit::AuditEvent;

/// What a scope report changes, decided under the connection's row lock.
#[derive(Debug, Clone, Default)]
pub struct ScopeDelta {
    /// Scopes failing for the first time.
    pub added: Vec<String>,
    /// Scopes already failing, reported again after the de-duplication window.
    pub renewed: Vec<String>,
    /// Scopes already failing, reported again inside the window (counted only).
    pub repeated: Vec<String>,
    /// Scopes that were failing and are reported working.
    pub cleared: Vec<String>,
    /// Failing scopes after the report.
    pub failing_after: Vec<String>,
    /// Status after the report (`active` or `degraded`).
    pub status_after: ConnectionStatus,
}

/// What a scope report records, given the row before it and the change it
/// makes: audit events, and the webhook event if it is one people must hear of.
pub type RecordScopeReport<'a> =
    dyn Fn(&ConnectionRow, &ScopeDelta) -> (Vec<AuditEvent>, Option<OutboxEvent>) + Sync + 'a;

/// One scope report, validated (see `crate::tokens::scope`).
#[derive(Debug, Clone)]
pub struct ScopeReportRow {
    /// Scopes that failed (empty for a success-only report).
    pub failing: Vec<String>,
    /// Scopes that worked.
    pub ok: Vec<String>,
    /// 401 or 403 (0 for a success-only report).
    pub status: i64,
    /// HTTP method of the failed call.
    pub method: Option<String>,
    /// Host of the failed call.
    pub host: Option<String>,
    /// Path template of the failed call (never a concrete path with ids).
    pub path_template: Option<String>,
    /// What the provider said (error code or short text).
    pub provider_error: Option<String>,
    /// When the agent saw it (unix ms).
    pub observed_at: i64,
    /// Repeats of a failing scope within this many ms are only counted.
    pub window_ms: i64,
    /// Most failing scopes a connection may hold (a report beyond is refused).
    pub max_failing: usize,
}

/// A failing scope, as the health API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScopeFailureView {
    /// Scope.
    pub scope: String,
    /// RFC 3339.
    pub first_seen_at: String,
    /// RFC 3339.
    pub last_seen_at: String,
    /// Reports received.
    pub reports: i64,
    /// 401 or 403.
    pub last_status: i64,
    /// Method of the last failing call.
    pub method: Option<String>,
    /// Host of the last failing call.
    pub host: Option<String>,
    /// Path template of the last failing call.
    pub path_template: Option<String>,
    /// What the provider said.
    pub provider_error: Option<String>,
}

impl Store {
    /// Applies a scope report under the connection's lock: records each
    /// failing scope (first/last seen, count), clears the ones reported
    /// working, moves the connection between `active` and `degraded`, and
    /// writes what `record` makes of the change (audit events, a webhook
    /// event) in the same transaction. A connection that is not usable is
    /// returned untouched with `None`.
    pub async fn apply_scope_report(
        &self,
        id: &str,
        r: &ScopeReportRow,
        record: &RecordScopeReport<'_>,
    ) -> Result<(ConnectionRow, Option<ScopeDelta>), StoreError> {
        let now = now_ms();
        let (before, delta, moved) = on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let before = lock_connection(&mut tx, id).await?;
            if !before.status.serves_tokens() {
                tx.rollback().await?;
                return Ok((before, None));
            }
            let rows = sqlx::query("SELECT scope, recorded_at FROM scope_failures WHERE connection_id = $1")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
            let mut recorded = std::collections::HashMap::new();
            for row in &rows {
                recorded.insert(row.try_get::<String, _>("scope")?, row.try_get::<i64, _>("recorded_at")?);
            }
            let current = super::parse_json_list(&before.failing_scopes);
            let delta = scope_delta(&current, &recorded, r, now);
            if delta.failing_after.len() > r.max_failing && !delta.added.is_empty() {
                tx.rollback().await?;
                return Err(StoreError::Conflict(format!(
                    "the connection already has {} failing scopes, the most it records; re-consent or report ok_scopes first",
                    current.len()
                )));
            }
            for scope in &r.failing {
                let fresh = !delta.repeated.contains(scope);
                sqlx::query(
                    "INSERT INTO scope_failures (connection_id, scope, first_seen_at, last_seen_at, reports, recorded_at,
                        last_status, last_method, last_host, last_path, provider_error)
                     VALUES ($1, $2, $3, $3, 1, $4, $5, $6, $7, $8, $9)
                     ON CONFLICT (connection_id, scope) DO UPDATE SET last_seen_at = $3, reports = scope_failures.reports + 1,
                        recorded_at = CASE WHEN $10 = 1 THEN $4 ELSE scope_failures.recorded_at END,
                        last_status = $5, last_method = $6, last_host = $7, last_path = $8, provider_error = $9",
                )
                .bind(id)
                .bind(scope)
                .bind(r.observed_at)
                .bind(now)
                .bind(r.status)
                .bind(&r.method)
                .bind(&r.host)
                .bind(&r.path_template)
                .bind(&r.provider_error)
                .bind(i64::from(fresh))
                .execute(&mut *tx)
                .await?;
            }
            for scope in &delta.cleared {
                sqlx::query("DELETE FROM scope_failures WHERE connection_id = $1 AND scope = $2")
                    .bind(id)
                    .bind(scope)
                    .execute(&mut *tx)
                    .await?;
            }
            let moved = delta.failing_after != current || delta.status_after != before.status;
            if moved {
                sqlx::query("UPDATE connections SET failing_scopes = $1, status = $2, updated_at = $3 WHERE id = $4")
                    .bind(super::json_list(&delta.failing_after))
                    .bind(delta.status_after.as_str())
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            let (audits, event) = record(&before, &delta);
            write_transition(&mut tx, &audits.iter().collect::<Vec<_>>(), event.as_ref()).await?;
            tx.commit().await?;
            (before, delta, moved)
        });
        if moved {
            self.publish(Change::Connection(id.to_string()));
        }
        Ok((before, Some(delta)))
    }

    /// Notes that a 401 report made the broker refresh this connection.
    pub async fn mark_unauthorized_refresh(&self, id: &str, at: i64) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query("UPDATE connections SET unauthorized_refresh_at = $1 WHERE id = $2")
                .bind(at)
                .bind(id)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// When a 401 report last made the broker refresh this connection.
    pub async fn unauthorized_refresh_at(&self, id: &str) -> Result<Option<i64>, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query("SELECT unauthorized_refresh_at FROM connections WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?;
            Ok(match row {
                Some(r) => r.try_get("unauthorized_refresh_at")?,
                None => None,
            })
        })
    }

    /// The failing scopes of a connection, with what was reported.
    pub async fn scope_failures(&self, id: &str) -> Result<Vec<ScopeFailureView>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT scope, first_seen_at, last_seen_at, reports, last_status, last_method, last_host, last_path,
                        provider_error
                   FROM scope_failures WHERE connection_id = $1 ORDER BY scope",
            )
            .bind(id)
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|r| -> Result<ScopeFailureView, sqlx::Error> {
                    Ok(ScopeFailureView {
                        scope: r.try_get("scope")?,
                        first_seen_at: super::rfc3339(r.try_get("first_seen_at")?),
                        last_seen_at: super::rfc3339(r.try_get("last_seen_at")?),
                        reports: r.try_get("reports")?,
                        last_status: r.try_get("last_status")?,
                        method: r.try_get("last_method")?,
                        host: r.try_get("last_host")?,
                        path_template: r.try_get("last_path")?,
                        provider_error: r.try_get("provider_error")?,
                    })
                })
                .collect::<Result<_, _>>()
                .map_err(StoreError::from)
        })
    }
}

/// What a report does to the failing set (pure; see [`Store::apply_scope_report`]).
fn scope_delta(
    current: &[String],
    recorded: &std::collections::HashMap<String, i64>,
    r: &ScopeReportRow,
    now: i64,
) -> ScopeDelta {
    let mut d = ScopeDelta::default();
    for s in &r.failing {
        if !current.contains(s) {
            d.added.push(s.clone());
        } else if recorded.get(s).is_some_and(|at| now - at < r.window_ms) {
            d.repeated.push(s.clone());
        } else {
            d.renewed.push(s.clone());
        }
    }
    // A scope reported both failing and working in one report stays failing.
    d.cleared =
        r.ok.iter()
            .filter(|s| current.contains(s) && !r.failing.contains(s))
            .cloned()
            .collect();
    d.failing_after = current
        .iter()
        .filter(|s| !d.cleared.contains(s))
        .cloned()
        .chain(d.added.iter().cloned())
        .collect();
    d.status_after = if d.failing_after.is_empty() {
        ConnectionStatus::Active
    } else {
        ConnectionStatus::Degraded
    };
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(failing: &[&str], ok: &[&str]) -> ScopeReportRow {
        ScopeReportRow {
            failing: failing.iter().map(|s| s.to_string()).collect(),
            ok: ok.iter().map(|s| s.to_string()).collect(),
            status: 403,
            method: None,
            host: None,
            path_template: None,
            provider_error: None,
            observed_at: 0,
            window_ms: 60_000,
            max_failing: 64,
        }
    }

    #[test]
    fn failing_scopes_are_a_union_with_repeats_and_clears() {
        let cur = vec!["a".to_string(), "b".to_string()];
        let mut rec = std::collections::HashMap::new();
        rec.insert("a".to_string(), 1_000_000);
        rec.insert("b".to_string(), 0);
        let d = scope_delta(&cur, &rec, &report(&["a", "b", "c"], &[]), 1_030_000);
        assert_eq!(d.added, ["c"]);
        assert_eq!(d.repeated, ["a"]);
        assert_eq!(d.renewed, ["b"]);
        assert_eq!(d.failing_after, ["a", "b", "c"]);
        assert_eq!(d.status_after, "degraded");

        let d = scope_delta(&cur, &rec, &report(&[], &["a", "b", "zzz"]), 0);
        assert_eq!(d.cleared, ["a", "b"]);
        assert!(d.failing_after.is_empty());
        assert_eq!(d.status_after, "active");

        let d = scope_delta(&cur, &rec, &report(&["a"], &["a"]), 0);
        assert!(d.cleared.is_empty(), "failing wins within one report");
    }
}
