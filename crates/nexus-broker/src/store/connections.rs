//! Connection and handshake rows.

use sqlx::Row;

use super::webhooks::{insert_outbox, OutboxEvent};
use super::{now_ms, on_pool, Change, Store, StoreError};
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
    pub status_after: String,
}

/// What a scope report records, given the row before it and the change it
/// makes: audit events, and the webhook event if it is one people must hear of.
pub type RecordScopeReport<'a> =
    dyn Fn(&ConnectionRow, &ScopeDelta) -> (Vec<AuditEvent>, Option<OutboxEvent>) + Sync + 'a;

/// What an activation records, given the row before it and the scopes
/// still failing after it: its audit event and webhook event.
pub type ActivationRecord<'a> = dyn Fn(&ConnectionRow, &[String]) -> Transition + Sync + 'a;

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
    pub status: String,
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
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
}

/// A stored handshake.
#[derive(Debug, Clone)]
pub struct HandshakeRow {
    /// Id carried in the signed state.
    pub id: String,
    /// Connection being created or reconnected.
    pub connection_id: String,
    /// Provider.
    pub provider_id: String,
    /// Workspace.
    pub workspace_id: String,
    /// JSON array of requested scopes.
    pub scopes: String,
    /// Where the browser goes afterwards.
    pub return_url: String,
    /// The redirect_uri sent at the authorize step (reused at the token step).
    pub redirect_uri: String,
    /// Envelope of the PKCE verifier.
    pub code_verifier: Option<String>,
    /// OIDC nonce.
    pub nonce: Option<String>,
    /// Reconnect of an existing connection.
    pub is_reconnect: bool,
    /// Unix ms.
    pub expires_at: i64,
}

/// Result of trying to consume a handshake.
#[derive(Debug)]
pub enum Consumed {
    /// This caller consumed it; nobody else will.
    Now(Box<HandshakeRow>),
    /// Someone consumed it before.
    AlreadyUsed,
    /// Past its expiry.
    Expired,
    /// No such handshake.
    Unknown,
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
    pub status: String,
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
            status: c.status.clone(),
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

const CONNECTION_COLUMNS: &str = "id, workspace_id, provider_id, status, requested_scopes, granted_scopes, access_token, \
    refresh_token, id_token, credentials, token_type, expires_at, identity, version, last_success_at, last_failure_at, \
    error_code, error_description, consecutive_failures, failing_scopes, next_refresh_at, created_at, updated_at";

fn connection_from_row<R: Row>(r: &R) -> Result<ConnectionRow, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(ConnectionRow {
        id: r.try_get("id")?,
        workspace_id: r.try_get("workspace_id")?,
        provider_id: r.try_get("provider_id")?,
        status: r.try_get("status")?,
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
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

fn handshake_from_row<R: Row>(r: &R) -> Result<HandshakeRow, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(HandshakeRow {
        id: r.try_get("id")?,
        connection_id: r.try_get("connection_id")?,
        provider_id: r.try_get("provider_id")?,
        workspace_id: r.try_get("workspace_id")?,
        scopes: r.try_get("scopes")?,
        return_url: r.try_get("return_url")?,
        redirect_uri: r.try_get("redirect_uri")?,
        code_verifier: r.try_get("code_verifier")?,
        nonce: r.try_get("nonce")?,
        is_reconnect: r.try_get::<i64, _>("is_reconnect")? != 0,
        expires_at: r.try_get("expires_at")?,
    })
}

const INSERT_HANDSHAKE: &str = "INSERT INTO handshakes
    (id, connection_id, provider_id, workspace_id, scopes, return_url, redirect_uri, code_verifier, nonce, is_reconnect, expires_at, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

impl Store {
    /// Creates a pending connection with its first handshake (one transaction).
    pub async fn create_pending(
        &self,
        conn: &ConnectionRow,
        hs: &HandshakeRow,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO connections (id, workspace_id, provider_id, status, requested_scopes, created_at, updated_at)
                 VALUES ($1, $2, $3, 'pending', $4, $5, $5)",
            )
            .bind(&conn.id)
            .bind(&conn.workspace_id)
            .bind(&conn.provider_id)
            .bind(&conn.requested_scopes)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            bind_handshake(sqlx::query(INSERT_HANDSHAKE), hs, now).execute(&mut *tx).await?;
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Adds a handshake to re-consent an existing connection; its state is unchanged.
    pub async fn add_handshake(
        &self,
        hs: &HandshakeRow,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            bind_handshake(sqlx::query(INSERT_HANDSHAKE), hs, now).execute(&mut *tx).await?;
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Consumes a handshake exactly once: of any number of concurrent callers,
    /// only one gets [`Consumed::Now`].
    pub async fn consume_handshake(&self, id: &str) -> Result<Consumed, StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let res = sqlx::query("UPDATE handshakes SET consumed_at = $1 WHERE id = $2 AND consumed_at IS NULL AND expires_at > $1")
                .bind(now)
                .bind(id)
                .execute(pool)
                .await?;
            let row = sqlx::query(
                "SELECT id, connection_id, provider_id, workspace_id, scopes, return_url, redirect_uri, code_verifier, nonce,
                        is_reconnect, expires_at, consumed_at
                 FROM handshakes WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?;
            let Some(row) = row else { return Ok(Consumed::Unknown) };
            if res.rows_affected() == 1 {
                return Ok(Consumed::Now(Box::new(handshake_from_row(&row)?)));
            }
            let consumed: Option<i64> = row.try_get("consumed_at")?;
            Ok(if consumed.is_some() { Consumed::AlreadyUsed } else { Consumed::Expired })
        })
    }

    /// Reads a handshake without consuming it; also says whether it was consumed.
    pub async fn peek_handshake(
        &self,
        id: &str,
    ) -> Result<Option<(HandshakeRow, bool)>, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query(
                "SELECT id, connection_id, provider_id, workspace_id, scopes, return_url, redirect_uri, code_verifier, nonce,
                        is_reconnect, expires_at, consumed_at
                 FROM handshakes WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let consumed: Option<i64> = row.try_get("consumed_at")?;
            Ok(Some((handshake_from_row(&row)?, consumed.is_some())))
        })
    }

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
                    status: r.try_get("status")?,
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
                    lease_owner = NULL, lease_until = NULL
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
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let status_sql = if attention.is_some() { ", status = 'attention_required'" } else { "" };
            // Guarded like a refresh: only the row this attempt read, still
            // usable, and not leased to another attempt (whose result wins).
            let res = sqlx::query(&format!(
                "UPDATE connections SET error_code = $1, error_description = $2, last_failure_at = $3,
                    consecutive_failures = consecutive_failures + 1, updated_at = $3, next_refresh_at = $5,
                    lease_owner = NULL, lease_until = NULL{status_sql}
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
                    lease_owner = NULL, lease_until = NULL, unauthorized_refresh_at = NULL
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
            if before.status == "revoked" {
                tx.rollback().await?;
                return Ok(None);
            }
            sqlx::query(
                "UPDATE connections SET status = 'revoked', access_token = NULL, refresh_token = NULL, id_token = NULL,
                    credentials = NULL, next_refresh_at = NULL, lease_owner = NULL, lease_until = NULL,
                    version = version + 1, updated_at = $1, unauthorized_refresh_at = NULL
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
            if !matches!(before.status.as_str(), "active" | "degraded") {
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
                    .bind(&delta.status_after)
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

    /// Takes the refresh lease of one connection for `owner` until `until`,
    /// unless another owner holds an unexpired lease. Returns whether it was taken.
    pub async fn try_lease(&self, id: &str, owner: &str, until: i64) -> Result<bool, StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let res = sqlx::query(
                "UPDATE connections SET lease_owner = $1, lease_until = $2
                 WHERE id = $3 AND (lease_until IS NULL OR lease_until < $4 OR lease_owner = $1)",
            )
            .bind(owner)
            .bind(until)
            .bind(id)
            .bind(now)
            .execute(pool)
            .await?;
            Ok(res.rows_affected() == 1)
        })
    }

    /// Gives a lease back without a refresh result (e.g. nothing was due after all).
    pub async fn release_lease(&self, id: &str, owner: &str) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query("UPDATE connections SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND lease_owner = $2")
                .bind(id)
                .bind(owner)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Pushes a connection that is still due (and not leased by another
    /// replica) to `retry_at` and drops `owner`'s lease. Returns whether it
    /// did: a refresh that stored a result has already moved the schedule.
    pub async fn defer_if_due(
        &self,
        id: &str,
        owner: &str,
        now: i64,
        retry_at: i64,
    ) -> Result<bool, StoreError> {
        on_pool!(self, pool => {
            let res = sqlx::query(
                "UPDATE connections SET next_refresh_at = $1, lease_owner = NULL, lease_until = NULL,
                    consecutive_failures = consecutive_failures + 1, last_failure_at = $3
                 WHERE id = $2 AND next_refresh_at <= $3
                   AND (lease_owner IS NULL OR lease_owner = $4 OR lease_until < $3)",
            )
            .bind(retry_at)
            .bind(id)
            .bind(now)
            .bind(owner)
            .execute(pool)
            .await?;
            Ok(res.rows_affected() == 1)
        })
    }

    /// Claims up to `limit` connections due for refresh, oldest due first, by
    /// leasing them to `owner` until `until`. On PostgreSQL, rows another
    /// replica is claiming right now are skipped (`FOR UPDATE SKIP LOCKED`).
    pub async fn claim_due(
        &self,
        owner: &str,
        until: i64,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let now = now_ms();
        let skip_locked = match self.backend() {
            super::Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            super::Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE connections SET lease_owner = $1, lease_until = $2
             WHERE id IN (SELECT id FROM connections
                          WHERE status IN ('active', 'degraded') AND next_refresh_at IS NOT NULL AND next_refresh_at <= $3
                            AND (lease_until IS NULL OR lease_until < $3)
                          ORDER BY next_refresh_at LIMIT $4{skip_locked})
             RETURNING id"
        );
        on_pool!(self, pool => {
            let rows = sqlx::query(&sql).bind(owner).bind(until).bind(now).bind(limit).fetch_all(pool).await?;
            Ok(rows.iter().map(|r| r.try_get::<String, _>("id")).collect::<Result<_, _>>()?)
        })
    }

    /// Counts connections by status (for the `nexus_connections` gauge).
    pub async fn count_by_status(&self) -> Result<Vec<(String, i64)>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM connections GROUP BY status").fetch_all(pool).await?;
            Ok(rows.iter().map(|r| Ok((r.try_get("status")?, r.try_get("n")?))).collect::<Result<_, sqlx::Error>>()?)
        })
    }

    /// Records a failed handshake. A new connection becomes `failed`; a
    /// reconnect keeps its state (and its old credentials) and records the error.
    pub async fn fail_handshake(
        &self,
        connection_id: &str,
        is_reconnect: bool,
        code: &str,
        description: &str,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let sql = if is_reconnect {
            "UPDATE connections SET error_code = $1, error_description = $2, last_failure_at = $3, updated_at = $3 WHERE id = $4"
        } else {
            "UPDATE connections SET status = 'failed', error_code = $1, error_description = $2, last_failure_at = $3, updated_at = $3
             WHERE id = $4 AND status = 'pending'"
        };
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(sql).bind(code).bind(description).bind(now).bind(connection_id).execute(&mut *tx).await?;
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        self.publish(Change::Connection(connection_id.to_string()));
        Ok(())
    }

    /// Removes handshakes past their expiry and pending connections older than
    /// `pending_before_ms` that have no live handshake. Returns (handshakes, connections) removed.
    pub async fn cleanup_handshakes(
        &self,
        pending_before_ms: i64,
    ) -> Result<(u64, u64), StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let h = sqlx::query("DELETE FROM handshakes WHERE expires_at < $1").bind(now).execute(&mut *tx).await?;
            let c = sqlx::query(
                "DELETE FROM connections WHERE status = 'pending' AND created_at < $1
                 AND NOT EXISTS (SELECT 1 FROM handshakes h WHERE h.connection_id = connections.id)",
            )
            .bind(pending_before_ms)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok((h.rows_affected(), c.rows_affected()))
        })
    }
}

/// Locks a connection's row inside `tx` and reads it. The lock is taken by a
/// write first (the row lock on PostgreSQL, the database write lock on
/// SQLite) so nothing changes between this read and the transaction's
/// writes; a read first would let SQLite fail the later write instead.
async fn lock_connection<DB>(
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
async fn write_transition<DB>(
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

fn bind_handshake<'q, DB: sqlx::Database>(
    q: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>,
    hs: &'q HandshakeRow,
    now: i64,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    &'q String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    q.bind(&hs.id)
        .bind(&hs.connection_id)
        .bind(&hs.provider_id)
        .bind(&hs.workspace_id)
        .bind(&hs.scopes)
        .bind(&hs.return_url)
        .bind(&hs.redirect_uri)
        .bind(&hs.code_verifier)
        .bind(&hs.nonce)
        .bind(i64::from(hs.is_reconnect))
        .bind(hs.expires_at)
        .bind(now)
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
        "active".into()
    } else {
        "degraded".into()
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
