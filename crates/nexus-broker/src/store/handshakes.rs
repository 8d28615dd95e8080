//! Handshake rows: a pending connection and its handshakes, consumed exactly
//! once, failed, and cleaned up when abandoned.

use sqlx::Row;

use super::connections::ConnectionRow;
use super::{now_ms, on_pool, Change, Store, StoreError};
use crate::events::audit::AuditEvent;

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
    /// A handshake of the other kind (a capture form's state sent to the
    /// OAuth callback, or the other way round); left as it was.
    WrongKind,
    /// An OAuth handshake whose response arrived at another redirect URI
    /// than the one it was started with (a mix-up); left as it was.
    WrongRedirect,
}

/// Which path may finish a handshake: the OAuth callback (handshakes with
/// a PKCE verifier) or the capture form (static credentials, none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeKind<'a> {
    /// Finished by the provider's redirect to the callback at
    /// `redirect_uri`, which must be the one the handshake started with.
    OAuth {
        /// Where the authorization response arrived.
        redirect_uri: &'a str,
    },
    /// Finished by the hosted credential form.
    Capture,
}

/// The columns [`handshake_from_row`] reads, plus `consumed_at`.
const HANDSHAKE_COLUMNS: &str =
    "id, connection_id, provider_id, workspace_id, scopes, return_url, \
    redirect_uri, code_verifier, nonce, is_reconnect, expires_at, consumed_at";

pub(super) fn handshake_from_row<R: Row>(r: &R) -> Result<HandshakeRow, sqlx::Error>
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

pub(super) const INSERT_HANDSHAKE: &str = "INSERT INTO handshakes
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
    pub async fn consume_handshake(
        &self,
        id: &str,
        kind: HandshakeKind<'_>,
    ) -> Result<Consumed, StoreError> {
        let now = now_ms();
        // The kind (and, for OAuth, the redirect URI) is part of the guard:
        // a state sent to the wrong path must not use the handshake up (nor
        // fail its connection).
        let (guard, redirect_uri) = match kind {
            HandshakeKind::OAuth { redirect_uri } => (
                "code_verifier IS NOT NULL AND redirect_uri = $3",
                Some(redirect_uri),
            ),
            HandshakeKind::Capture => ("code_verifier IS NULL", None),
        };
        let sql = format!("UPDATE handshakes SET consumed_at = $1 WHERE id = $2 AND consumed_at IS NULL AND expires_at > $1 AND {guard}");
        on_pool!(self, pool => {
            let mut update = sqlx::query(&sql).bind(now).bind(id);
            if let Some(r) = redirect_uri {
                update = update.bind(r);
            }
            let res = update.execute(pool).await?;
            let row = sqlx::query(&format!("SELECT {HANDSHAKE_COLUMNS} FROM handshakes WHERE id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await?;
            let Some(row) = row else { return Ok(Consumed::Unknown) };
            if res.rows_affected() == 1 {
                return Ok(Consumed::Now(Box::new(handshake_from_row(&row)?)));
            }
            let verifier: Option<String> = row.try_get("code_verifier")?;
            if verifier.is_some() != redirect_uri.is_some() {
                return Ok(Consumed::WrongKind);
            }
            if let Some(arrived) = redirect_uri {
                let started: String = row.try_get("redirect_uri")?;
                if started != arrived {
                    return Ok(Consumed::WrongRedirect);
                }
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
            let row = sqlx::query(&format!("SELECT {HANDSHAKE_COLUMNS} FROM handshakes WHERE id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await?;
            let Some(row) = row else { return Ok(None) };
            let consumed: Option<i64> = row.try_get("consumed_at")?;
            Ok(Some((handshake_from_row(&row)?, consumed.is_some())))
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
        // A browser's or provider's words are stored as printable text only.
        let code = &*nexus_core::text::printable(code, 100);
        let description = &*nexus_core::text::printable(description, 300);
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

pub(super) fn bind_handshake<'q, DB: sqlx::Database>(
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
