//! Audit rows: single inserts inside a caller's transaction, batched inserts
//! for the [`crate::events::audit::AuditWriter`], and filtered reads.

use serde::Serialize;
use serde_json::Value;
use sqlx::{Database, Executor, Row};

use super::{on_pool, rfc3339, Store, StoreError};
use crate::events::audit::AuditEvent;

/// Filters for reading the audit log.
#[derive(Debug, Default, Clone)]
pub struct AuditFilter {
    /// Exact event type.
    pub event_type: Option<String>,
    /// Events at or after this unix ms.
    pub since_ms: Option<i64>,
    /// Events of one connection.
    pub connection_id: Option<String>,
    /// Events of one provider.
    pub provider_id: Option<String>,
    /// Only events with a smaller sequence number (the next page, newest first).
    pub before_id: Option<i64>,
    /// Most rows returned.
    pub limit: i64,
    /// Oldest first instead of newest first.
    pub ascending: bool,
}

/// An audit row as the API returns it.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// Sequence number.
    pub id: i64,
    /// RFC 3339 time.
    pub occurred_at: String,
    /// Event type (`provider.created`, ...).
    pub event_type: String,
    /// Who did it (`admin`, `system`, ...).
    pub actor: Option<String>,
    /// Provider concerned.
    pub provider_id: Option<String>,
    /// Connection concerned.
    pub connection_id: Option<String>,
    /// Workspace concerned.
    pub workspace_id: Option<String>,
    /// Caller's IP address.
    pub ip: Option<String>,
    /// Caller's user agent.
    pub user_agent: Option<String>,
    /// The caller's client certificate identity (mutual TLS), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_identity: Option<String>,
    /// Event-specific details; never secrets.
    pub detail: Value,
}

const INSERT: &str = "INSERT INTO audit_events
    (occurred_at, event_type, actor, provider_id, connection_id, workspace_id, ip, user_agent, detail, client_identity)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

/// PostgreSQL `TEXT` cannot hold NUL; an audit event must never fail on
/// what a caller typed, so NUL becomes U+FFFD on both backends alike.
fn no_nul(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_string()
    }
}

/// Inserts one event on `exec` (usually the caller's transaction, so the
/// event commits or rolls back with the change it describes).
pub(crate) async fn insert_one<'e, DB, E>(exec: E, ev: &AuditEvent) -> Result<(), sqlx::Error>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sqlx::query(INSERT)
        .bind(ev.occurred_at_ms)
        .bind(no_nul(&ev.event_type))
        .bind(ev.actor.as_deref().map(no_nul))
        .bind(ev.provider_id.as_deref().map(no_nul))
        .bind(ev.connection_id.as_deref().map(no_nul))
        .bind(ev.workspace_id.as_deref().map(no_nul))
        .bind(ev.ip.as_deref().map(no_nul))
        .bind(ev.user_agent.as_deref().map(no_nul))
        .bind(no_nul(&ev.detail.to_string()))
        .bind(ev.client_identity.as_deref().map(no_nul))
        .execute(exec)
        .await?;
    Ok(())
}

impl Store {
    /// Writes a batch of events in one transaction.
    pub async fn insert_audit_batch(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        // One multi-row INSERT per chunk: one round trip instead of one per
        // event. 10 binds per row keeps a chunk far below both backends' limits.
        const ROWS_PER_STATEMENT: usize = 500;
        let details: Vec<String> = events
            .iter()
            .map(|e| no_nul(&e.detail.to_string()))
            .collect();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for (chunk, chunk_details) in events.chunks(ROWS_PER_STATEMENT).zip(details.chunks(ROWS_PER_STATEMENT)) {
                let mut qb = sqlx::QueryBuilder::new(
                    "INSERT INTO audit_events (occurred_at, event_type, actor, provider_id, connection_id, workspace_id, ip, user_agent, detail, client_identity) ",
                );
                qb.push_values(chunk.iter().zip(chunk_details), |mut row, (ev, detail)| {
                    row.push_bind(ev.occurred_at_ms)
                        .push_bind(no_nul(&ev.event_type))
                        .push_bind(ev.actor.as_deref().map(no_nul))
                        .push_bind(ev.provider_id.as_deref().map(no_nul))
                        .push_bind(ev.connection_id.as_deref().map(no_nul))
                        .push_bind(ev.workspace_id.as_deref().map(no_nul))
                        .push_bind(ev.ip.as_deref().map(no_nul))
                        .push_bind(ev.user_agent.as_deref().map(no_nul))
                        .push_bind(detail)
                        .push_bind(ev.client_identity.as_deref().map(no_nul));
                });
                qb.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Reads audit events, newest first unless `ascending`.
    pub async fn query_audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        let mut clauses = Vec::new();
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if f.event_type.is_some() {
            clauses.push(format!("event_type = {}", next()));
        }
        if f.since_ms.is_some() {
            clauses.push(format!("occurred_at >= {}", next()));
        }
        if f.connection_id.is_some() {
            clauses.push(format!("connection_id = {}", next()));
        }
        if f.provider_id.is_some() {
            clauses.push(format!("provider_id = {}", next()));
        }
        if f.before_id.is_some() {
            clauses.push(format!("id < {}", next()));
        }
        let limit_param = next();
        let where_sql = if clauses.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", clauses.join(" AND "))
        };
        let order = if f.ascending { "ASC" } else { "DESC" };
        let sql = format!(
            "SELECT id, occurred_at, event_type, actor, provider_id, connection_id, workspace_id, ip, user_agent, detail, client_identity
             FROM audit_events {where_sql} ORDER BY id {order} LIMIT {limit_param}"
        );
        on_pool!(self, pool => {
            let mut q = sqlx::query(&sql);
            if let Some(v) = &f.event_type { q = q.bind(v); }
            if let Some(v) = f.since_ms { q = q.bind(v); }
            if let Some(v) = &f.connection_id { q = q.bind(v); }
            if let Some(v) = &f.provider_id { q = q.bind(v); }
            if let Some(v) = f.before_id { q = q.bind(v); }
            let rows = q.bind(f.limit).fetch_all(pool).await?;
            rows.iter()
                .map(|r| {
                    let detail: String = r.try_get("detail")?;
                    Ok(AuditRecord {
                        id: r.try_get("id")?,
                        occurred_at: rfc3339(r.try_get("occurred_at")?),
                        event_type: r.try_get("event_type")?,
                        actor: r.try_get("actor")?,
                        provider_id: r.try_get("provider_id")?,
                        connection_id: r.try_get("connection_id")?,
                        workspace_id: r.try_get("workspace_id")?,
                        ip: r.try_get("ip")?,
                        user_agent: r.try_get("user_agent")?,
                        client_identity: r.try_get("client_identity")?,
                        detail: serde_json::from_str(&detail).unwrap_or(Value::String(detail)),
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)
        })
    }
}
