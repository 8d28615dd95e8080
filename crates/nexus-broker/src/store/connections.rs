//! Connection rows: reading them, the token stamp the token cache checks,
//! and the writes that move a connection between states (each with its
//! [`Transition`]: audit event and webhook event in the same transaction).

use sqlx::Row;

use super::webhooks::{insert_outbox, OutboxEvent};
use super::{now_ms, on_pool, Change, ConnectionStatus, Store, StoreError};
use crate::events::audit::AuditEvent;

/// A state change's record: its audit event and, for the transitions people
/// must hear about, its webhook event. Both commit with the change.
#[derive(Debug, Clone)]
pub struct Transition {
    /// Audit event.
    pub audit: AuditEvent,
    /// Outbox event, when the transition is one webhooks announce.
    pub event: Option<OutboxEvent>,
}

/// What an activation records, given the row before it and the scopes
/// still failing after it: its audit event and webhook event.
pub type ActivationRecord<'a> = dyn Fn(&ConnectionRow, &[String]) -> Transition + Sync + 'a;

/// A stored connection. Token columns are vault envelopes bound to this row.
#[derive(Debug, Clone)]
pub struct ConnectionRow {
    /// Stable id.
    pub id: String,
    /// Workspace (the gateway calls it user_id).
    pub workspace_id: String,
    /// Provider.
    pub provider_id: String,
    /// `pending`, `active`, `degraded`, `attention_required`, `revoked`, `failed`.
    pub status: ConnectionStatus,
    /// JSON array of scopes asked for.
    pub requested_scopes: String,
    /// JSON array of scopes the provider granted.
    pub granted_scopes: String,
    /// Envelope.
    pub access_token: Option<String>,
    /// Envelope.
    pub refresh_token: Option<String>,
    /// Envelope.
    pub id_token: Option<String>,
    /// Envelope of static credentials (JSON object).
    pub credentials: Option<String>,
    /// Token type from the token response.
    pub token_type: Option<String>,
    /// Access token expiry, unix ms.
    pub expires_at: Option<i64>,
    /// JSON `{sub, email, name, picture}`.
    pub identity: Option<String>,
    /// Bumped on every credential write (optimistic concurrency).
    pub version: i64,
    /// Unix ms.
    pub last_success_at: Option<i64>,
    /// Unix ms.
    pub last_failure_at: Option<i64>,
    /// Last error code (`invalid_grant`, `access_denied`, ...).
    pub error_code: Option<String>,
    /// Last error description.
    pub error_description: Option<String>,
    /// Failures since the last success.
    pub consecutive_failures: i64,
    /// JSON array of failing scopes.
    pub failing_scopes: String,
    /// Unix ms.
    pub next_refresh_at: Option<i64>,
    /// When a refresh token last went to the provider without its outcome
    /// being stored yet (unix ms): set, it means a refresh is in flight or
    /// was cut off and the provider may have rotated the refresh token.
    pub refresh_started_at: Option<i64>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
}

/// Tokens written by a successful refresh (envelopes).
#[derive(Debug)]
pub struct Refreshed {
    /// Envelope.
    pub access_token: String,
    /// Envelope of a rotated refresh token; `None` keeps the stored one.
    pub refresh_token: Option<String>,
    /// Token type.
    pub token_type: String,
    /// Unix ms.
    pub expires_at: Option<i64>,
    /// JSON array.
    pub granted_scopes: String,
    /// When the refresh engine should next refresh it (unix ms).
    pub next_refresh_at: Option<i64>,
}

/// The non-secret columns a token response is built from, plus the versions
/// guarding the secret ones (every credential write bumps the connection's
/// `version`, every profile change the provider's). Two equal stamps mean an
/// equal token response, which is what lets decrypted responses be cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStamp {
    /// Connection status.
    pub status: ConnectionStatus,
    /// Connection version.
    pub version: i64,
    /// JSON array.
    pub granted_scopes: String,
    /// JSON array.
    pub failing_scopes: String,
    /// Token type.
    pub token_type: Option<String>,
    /// Unix ms.
    pub expires_at: Option<i64>,
    /// When the current token was issued (unix ms): it sets the refresh margin.
    pub last_success_at: Option<i64>,
    /// Provider id.
    pub provider_id: String,
    /// The live provider's version; `None` once it is deleted.
    pub provider_version: Option<i64>,
    /// Workspace (never changes; here so a workspace pause needs no other read).
    pub workspace_id: String,
}

impl TokenStamp {
    /// The stamp of a row read in full.
    pub fn of(c: &ConnectionRow, provider_version: i64) -> Self {
        Self {
            status: c.status,
            version: c.version,
            granted_scopes: c.granted_scopes.clone(),
            failing_scopes: c.failing_scopes.clone(),
            token_type: c.token_type.clone(),
            expires_at: c.expires_at,
            last_success_at: c.last_success_at,
            provider_id: c.provider_id.clone(),
            provider_version: Some(provider_version),
            workspace_id: c.workspace_id.clone(),
        }
    }
}

/// Credentials written when a handshake succeeds.
#[derive(Debug, Default)]
pub struct Activation {
    /// Envelope.
    pub access_token: Option<String>,
    /// Envelope; `None` keeps the stored refresh token, if any.
    pub refresh_token: Option<String>,
    /// Envelope.
    pub id_token: Option<String>,
    /// Envelope.
    pub credentials: Option<String>,
    /// Token type.
    pub token_type: Option<String>,
    /// Unix ms.
    pub expires_at: Option<i64>,
    /// JSON array.
    pub granted_scopes: String,
    /// Clear every failing scope (new static credentials); otherwise the
    /// failing scopes this consent granted are cleared and the rest stay.
    pub clears_failing: bool,
    /// JSON identity.
    pub identity: Option<String>,
    /// When the refresh engine should first refresh it (unix ms).
    pub next_refresh_at: Option<i64>,
}

/// The `status` column, checked.
pub(super) fn status_of<R: Row>(r: &R) -> Result<ConnectionStatus, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let s: String = r.try_get("status")?;
    ConnectionStatus::parse(&s).ok_or_else(|| sqlx::Error::ColumnDecode {
        index: "status".into(),
        source: format!("unknown connection status '{s}'").into(),
    })
}

pub(super) const CONNECTION_COLUMNS: &str = "id, workspace_id, provider_id, status, requested_scopes, granted_scopes, access_token, \
    refresh_token, id_token, credentials, token_type, expires_at, identity, version, last_success_at, last_failure_at, \
    error_code, error_description, consecutive_failures, failing_scopes, next_refresh_at, refresh_started_at, created_at, updated_at";

pub(super) fn connection_from_row<R: Row>(r: &R) -> Result<ConnectionRow, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(ConnectionRow {
        id: r.try_get("id")?,
        workspace_id: r.try_get("workspace_id")?,
        provider_id: r.try_get("provider_id")?,
        status: status_of(r)?,
        requested_scopes: r.try_get("requested_scopes")?,
        granted_scopes: r.try_get("granted_scopes")?,
        access_token: r.try_get("access_token")?,
        refresh_token: r.try_get("refresh_token")?,
        id_token: r.try_get("id_token")?,
        credentials: r.try_get("credentials")?,
        token_type: r.try_get("token_type")?,
        expires_at: r.try_get("expires_at")?,
        identity: r.try_get("identity")?,
        version: r.try_get("version")?,
        last_success_at: r.try_get("last_success_at")?,
        last_failure_at: r.try_get("last_failure_at")?,
        error_code: r.try_get("error_code")?,
        error_description: r.try_get("error_description")?,
        consecutive_failures: r.try_get("consecutive_failures")?,
        failing_scopes: r.try_get("failing_scopes")?,
        next_refresh_at: r.try_get("next_refresh_at")?,
        refresh_started_at: r.try_get("refresh_started_at")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

impl Store {
    /// A connection by id.
    pub async fn get_connection(&self, id: &str) -> Result<Option<ConnectionRow>, StoreError> {
        let sql = format!("SELECT {CONNECTION_COLUMNS} FROM connections WHERE id = $1");
        on_pool!(self, pool => {
            let row = sqlx::query(&sql).bind(id).fetch_optional(pool).await?;
            Ok(row.as_ref().map(connection_from_row).transpose()?)
        })
    }

    /// Connections of a workspace, newest first.
    pub async fn list_connections(
        &self,
        workspace_id: &str,
    ) -> Result<Vec<ConnectionRow>, StoreError> {
        let sql = format!("SELECT {CONNECTION_COLUMNS} FROM connections WHERE workspace_id = $1 ORDER BY created_at DESC, id");
        on_pool!(self, pool => {
            let rows = sqlx::query(&sql).bind(workspace_id).fetch_all(pool).await?;
            Ok(rows.iter().map(connection_from_row).collect::<Result<_, _>>()?)
        })
    }

    /// The token stamp of a connection: one primary-key read of narrow,
    /// non-secret columns (no envelopes), for the token cache.
    pub async fn token_stamp(&self, id: &str) -> Result<Option<TokenStamp>, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query(
                "SELECT c.status, c.version, c.granted_scopes, c.failing_scopes, c.token_type, c.expires_at,
                        c.last_success_at, c.provider_id, p.version AS provider_version, c.workspace_id
                   FROM connections c
                   LEFT JOIN providers p ON p.id = c.provider_id AND p.deleted_at IS NULL
                  WHERE c.id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?;
            row.map(|r| -> Result<TokenStamp, sqlx::Error> {
                Ok(TokenStamp {
                    status: status_of(&r)?,
                    version: r.try_get("version")?,
                    granted_scopes: r.try_get("granted_scopes")?,
                    failing_scopes: r.try_get("failing_scopes")?,
                    token_type: r.try_get("token_type")?,
                    expires_at: r.try_get("expires_at")?,
                    last_success_at: r.try_get("last_success_at")?,
                    provider_id: r.try_get("provider_id")?,
                    provider_version: r.try_get("provider_version")?,
                    workspace_id: r.try_get("workspace_id")?,
                })
            })
            .transpose()
            .map_err(StoreError::from)
        })
    }

    /// Stores refreshed tokens if the row is still at `expected_version`
    /// (another refresher may have won). Returns whether this write won.
    pub async fn store_refresh(
        &self,
        id: &str,
        expected_version: i64,
        r: &Refreshed,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let res = sqlx::query(
                "UPDATE connections SET access_token = $1, refresh_token = COALESCE($2, refresh_token), token_type = $3,
                    expires_at = $4, granted_scopes = $5, last_success_at = $6, error_code = NULL, error_description = NULL,
                    consecutive_failures = 0, version = version + 1, updated_at = $6, next_refresh_at = $9,
                    lease_owner = NULL, lease_until = NULL, refresh_started_at = NULL
                 WHERE id = $7 AND version = $8 AND status IN ('active', 'degraded')",
            )
            .bind(&r.access_token)
            .bind(&r.refresh_token)
            .bind(&r.token_type)
            .bind(r.expires_at)
            .bind(&r.granted_scopes)
            .bind(now)
            .bind(id)
            .bind(expected_version)
            .bind(r.next_refresh_at)
            .execute(pool)
            .await?;
            let won = res.rows_affected() == 1;
            if won {
                self.publish(Change::Connection(id.to_string()));
            }
            Ok(won)
        })
    }

    /// Records a failed refresh. With `attention`, the connection needs a person
    /// (status `attention_required`, audited and announced in the same transaction).
    /// `clear_intent`: true when the provider answered (it cannot have
    /// rotated the refresh token unseen) or was never called; false after a
    /// call without an answer (timeout, connection lost after sending): the
    /// refresh's intent stays, so the next attempt knows the stored refresh
    /// token may be spent.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_refresh_failure(
        &self,
        id: &str,
        expected_version: i64,
        owner: &str,
        code: &str,
        description: &str,
        retry_at: Option<i64>,
        attention: Option<&Transition>,
        clear_intent: bool,
    ) -> Result<bool, StoreError> {
        // A provider's words (its error code and text) are stored as
        // printable text only: they reach logs, agents and consoles.
        let code = &*nexus_core::text::printable(code, 100);
        let description = &*nexus_core::text::printable(description, 300);
        let now = now_ms();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let status_sql = if attention.is_some() { ", status = 'attention_required'" } else { "" };
            // Guarded like a refresh: only the row this attempt read, still
            // usable, and not leased to another attempt (whose result wins).
            let res = sqlx::query(&format!(
                "UPDATE connections SET error_code = $1, error_description = $2, last_failure_at = $3,
                    consecutive_failures = consecutive_failures + 1, updated_at = $3, next_refresh_at = $5,
                    lease_owner = NULL, lease_until = NULL,
                    refresh_started_at = CASE WHEN $8 THEN NULL ELSE refresh_started_at END{status_sql}
                 WHERE id = $4 AND version = $6 AND status IN ('active', 'degraded')
                   AND (lease_owner IS NULL OR lease_owner = $7 OR lease_until < $3)"
            ))
            .bind(code)
            .bind(description)
            .bind(now)
            .bind(id)
            .bind(retry_at)
            .bind(expected_version)
            .bind(owner)
            .bind(clear_intent)
            .execute(&mut *tx)
            .await?;
            if res.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            if let Some(t) = attention {
                write_transition(&mut tx, &[&t.audit], t.event.as_ref()).await?;
            }
            tx.commit().await?;
        });
        if attention.is_some() {
            self.publish(Change::Connection(id.to_string()));
        }
        Ok(true)
    }

    /// Marks a connection active with fresh credentials (one transaction with its audit).
    pub async fn activate_connection(
        &self,
        id: &str,
        a: &Activation,
        t: &ActivationRecord<'_>,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let granted = super::parse_json_list(&a.granted_scopes);
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            // Locked: a scope report landing meanwhile is merged before this
            // or applied after it, never lost.
            let before = lock_connection(&mut tx, id).await?;
            let still_failing: Vec<String> = if a.clears_failing {
                Vec::new()
            } else {
                super::parse_json_list(&before.failing_scopes)
                    .into_iter()
                    .filter(|s| !granted.contains(s))
                    .collect()
            };
            // Scopes still failing after this consent keep the connection degraded.
            let res = sqlx::query(
                "UPDATE connections SET status = CASE WHEN $9 = '[]' THEN 'active' ELSE 'degraded' END, access_token = $1, refresh_token = COALESCE($2, refresh_token), id_token = $3,
                    credentials = $4, token_type = $5, expires_at = $6, granted_scopes = $7, identity = $8,
                    failing_scopes = $9, last_success_at = $10, error_code = NULL, error_description = NULL,
                    consecutive_failures = 0, version = version + 1, updated_at = $10, next_refresh_at = $12,
                    lease_owner = NULL, lease_until = NULL, unauthorized_refresh_at = NULL, refresh_started_at = NULL
                 WHERE id = $11",
            )
            .bind(&a.access_token)
            .bind(&a.refresh_token)
            .bind(&a.id_token)
            .bind(&a.credentials)
            .bind(&a.token_type)
            .bind(a.expires_at)
            .bind(&a.granted_scopes)
            .bind(&a.identity)
            .bind(super::json_list(&still_failing))
            .bind(now)
            .bind(id)
            .bind(a.next_refresh_at)
            .execute(&mut *tx)
            .await?;
            if res.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            // The consent fixed every failing scope it granted: their details go too.
            let rows = sqlx::query("SELECT scope FROM scope_failures WHERE connection_id = $1")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
            for row in &rows {
                let scope: String = row.try_get("scope")?;
                if !still_failing.contains(&scope) {
                    sqlx::query("DELETE FROM scope_failures WHERE connection_id = $1 AND scope = $2")
                        .bind(id)
                        .bind(&scope)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            let t = t(&before, &still_failing);
            write_transition(&mut tx, &[&t.audit], t.event.as_ref()).await?;
            tx.commit().await?;
        });
        self.publish(Change::Connection(id.to_string()));
        Ok(())
    }

    /// Records an event that changes no row (e.g. `provider.unhealthy`): its
    /// audit event and webhook event, in one transaction.
    pub async fn record_transition(&self, t: &Transition) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            write_transition(&mut tx, &[&t.audit], t.event.as_ref()).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Revokes a connection: status `revoked`, every secret erased, nothing
    /// scheduled; with its audit and webhook events. Returns the row as it
    /// was, or `None` when it was already revoked (nothing written).
    pub async fn revoke_connection(
        &self,
        id: &str,
        t: &(dyn Fn(&ConnectionRow) -> Transition + Sync),
    ) -> Result<Option<ConnectionRow>, StoreError> {
        let now = now_ms();
        let before = on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let before = lock_connection(&mut tx, id).await?;
            if before.status == ConnectionStatus::Revoked {
                tx.rollback().await?;
                return Ok(None);
            }
            sqlx::query(
                "UPDATE connections SET status = 'revoked', access_token = NULL, refresh_token = NULL, id_token = NULL,
                    credentials = NULL, next_refresh_at = NULL, lease_owner = NULL, lease_until = NULL,
                    version = version + 1, updated_at = $1, unauthorized_refresh_at = NULL, refresh_started_at = NULL
                 WHERE id = $2",
            )
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
            // A consent started before the revocation must not bring it back.
            sqlx::query("UPDATE handshakes SET consumed_at = $1 WHERE connection_id = $2 AND consumed_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            let t = t(&before);
            write_transition(&mut tx, &[&t.audit], t.event.as_ref()).await?;
            tx.commit().await?;
            before
        });
        self.publish(Change::Connection(id.to_string()));
        Ok(Some(before))
    }

    /// New connections of a workspace waiting for consent.
    pub async fn count_pending(&self, workspace_id: &str) -> Result<i64, StoreError> {
        on_pool!(self, pool => {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM connections WHERE workspace_id = $1 AND status = 'pending'")
                .bind(workspace_id)
                .fetch_one(pool)
                .await?;
            Ok(n)
        })
    }

    /// Counts connections by status (for the `nexus_connections` gauge).
    pub async fn count_by_status(&self) -> Result<Vec<(String, i64)>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM connections GROUP BY status").fetch_all(pool).await?;
            Ok(rows.iter().map(|r| Ok((r.try_get("status")?, r.try_get("n")?))).collect::<Result<_, sqlx::Error>>()?)
        })
    }
}

/// Locks a connection's row inside `tx` and reads it. The lock is taken by a
/// write first (the row lock on PostgreSQL, the database write lock on
/// SQLite) so nothing changes between this read and the transaction's
/// writes; a read first would let SQLite fail the later write instead.
pub(super) async fn lock_connection<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    id: &str,
) -> Result<ConnectionRow, StoreError>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'a> &'a str: sqlx::ColumnIndex<DB::Row>,
    String: for<'a> sqlx::Decode<'a, DB> + sqlx::Type<DB>,
    i64: for<'a> sqlx::Decode<'a, DB> + sqlx::Type<DB>,
    Option<String>: for<'a> sqlx::Decode<'a, DB>,
    Option<i64>: for<'a> sqlx::Decode<'a, DB>,
{
    let locked =
        sqlx::query("UPDATE connections SET updated_at = updated_at WHERE id = $1 RETURNING id")
            .bind(id.to_string())
            .fetch_optional(&mut **tx)
            .await?;
    if locked.is_none() {
        return Err(StoreError::NotFound);
    }
    let row = sqlx::query(&format!(
        "SELECT {CONNECTION_COLUMNS} FROM connections WHERE id = $1"
    ))
    .bind(id.to_string())
    .fetch_one(&mut **tx)
    .await?;
    Ok(connection_from_row(&row)?)
}

/// Writes a transition's audit event and, if any, its webhook event in `tx`.
pub(super) async fn write_transition<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    audits: &[&AuditEvent],
    event: Option<&OutboxEvent>,
) -> Result<(), sqlx::Error>
where
    DB: sqlx::Database,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    for a in audits {
        super::audit::insert_one(&mut **tx, a).await?;
    }
    if let Some(ev) = event {
        insert_outbox(tx, ev).await?;
    }
    Ok(())
}
