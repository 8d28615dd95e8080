//! Webhook endpoints, the outbox and delivery bookkeeping.
//!
//! An event enters the outbox with [`insert_outbox`] inside the transaction
//! of the state change it describes, so a change is never committed without
//! its event nor an event without its change. The same statement pair fans it
//! out to one delivery row per endpoint subscribed at that moment; the
//! delivery worker (`crate::events::webhooks`) claims due rows with a lease, like the
//! refresh engine, so replicas never send the same row at once.

use sqlx::{Database, Executor, Row};

use super::{now_ms, on_pool, Store, StoreError};
use crate::events::audit::AuditEvent;

/// An event on its way to the outbox.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    /// `msg_<uuid>`: the `webhook-id` header, stable across retries.
    pub id: String,
    /// `connection.degraded`, ...
    pub event_type: String,
    /// The JSON body sent (Standard Webhooks `{type, timestamp, data}`).
    pub payload: String,
    /// Unix ms.
    pub created_at: i64,
}

/// A stored endpoint (the secret stays an envelope).
#[derive(Debug, Clone)]
pub struct EndpointRow {
    /// Id (`env` for the one configured by `WEBHOOK_URL`).
    pub id: String,
    /// Where events are POSTed.
    pub url: String,
    /// JSON array of event types (`["*"]` = all).
    pub events: String,
    /// Vault envelope of the signing secret.
    pub secret: String,
    /// Free text.
    pub description: Option<String>,
    /// Unix ms.
    pub created_at: i64,
}

/// One delivery the worker has claimed.
#[derive(Debug, Clone)]
pub struct DeliveryJob {
    /// The event's id.
    pub message_id: String,
    /// Endpoint.
    pub endpoint_id: String,
    /// Event type.
    pub event_type: String,
    /// Body to send.
    pub payload: String,
    /// Endpoint URL; `None` once the endpoint is deleted.
    pub url: Option<String>,
    /// Endpoint secret envelope; `None` once the endpoint is deleted.
    pub secret: Option<String>,
    /// Attempts made before this one.
    pub attempts: i64,
    /// When the event happened (unix ms): deliveries give up a fixed time after.
    pub created_at: i64,
}

/// What one attempt concluded.
#[derive(Debug, Clone)]
pub enum AttemptResult {
    /// 2xx.
    Delivered,
    /// Try again at this time (unix ms).
    Retry(i64),
    /// Gave up (too old).
    Failed,
    /// The endpoint is gone.
    Cancelled,
}

/// One attempt, as recorded.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// HTTP status, when the receiver answered.
    pub http_status: Option<u16>,
    /// Transport error or a short reason; never a secret.
    pub error: Option<String>,
    /// How long it took.
    pub duration_ms: i64,
    /// What happens next.
    pub result: AttemptResult,
}

/// A delivery as the API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeliveryView {
    /// The event's id (`webhook-id`).
    pub message_id: String,
    /// Event type.
    pub event_type: String,
    /// pending | delivered | failed | cancelled.
    pub status: String,
    /// Attempts so far.
    pub attempts: i64,
    /// HTTP status of the last attempt.
    pub last_status: Option<i64>,
    /// Error of the last attempt.
    pub last_error: Option<String>,
    /// RFC 3339.
    pub next_attempt_at: Option<String>,
    /// RFC 3339.
    pub delivered_at: Option<String>,
    /// RFC 3339.
    pub created_at: String,
}

/// Writes an event to the outbox and fans it out to the subscribed
/// endpoints, on the caller's transaction.
pub(crate) async fn insert_outbox<DB>(
    tx: &mut sqlx::Transaction<'_, DB>,
    ev: &OutboxEvent,
) -> Result<(), sqlx::Error>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sqlx::query(
        "INSERT INTO webhook_messages (id, event_type, payload, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(ev.id.clone())
    .bind(ev.event_type.clone())
    .bind(ev.payload.clone())
    .bind(ev.created_at)
    .execute(&mut **tx)
    .await?;
    // Event types are fixed names with no quote in them, so the quoted name
    // matches exactly one JSON array element.
    sqlx::query(
        "INSERT INTO webhook_deliveries (message_id, endpoint_id, status, attempts, next_attempt_at, created_at)
         SELECT $1, id, 'pending', 0, $2, $2 FROM webhook_endpoints
          WHERE deleted_at IS NULL AND (events LIKE '%\"*\"%' OR events LIKE $3)",
    )
    .bind(ev.id.clone())
    .bind(ev.created_at)
    .bind(format!("%\"{}\"%", ev.event_type))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn endpoint_from_row<R: Row>(r: &R) -> Result<EndpointRow, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(EndpointRow {
        id: r.try_get("id")?,
        url: r.try_get("url")?,
        events: r.try_get("events")?,
        secret: r.try_get("secret")?,
        description: r.try_get("description")?,
        created_at: r.try_get("created_at")?,
    })
}

impl Store {
    /// Adds an endpoint (with its audit event).
    pub async fn create_endpoint(
        &self,
        e: &EndpointRow,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO webhook_endpoints (id, url, events, secret, description, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $6)",
            )
            .bind(&e.id)
            .bind(&e.url)
            .bind(&e.events)
            .bind(&e.secret)
            .bind(&e.description)
            .bind(e.created_at)
            .execute(&mut *tx)
            .await?;
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Replaces a live endpoint's URL, events, secret and description.
    pub async fn update_endpoint(
        &self,
        e: &EndpointRow,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let res = sqlx::query(
                "UPDATE webhook_endpoints SET url = $1, events = $2, secret = $3, description = $4, updated_at = $5
                 WHERE id = $6 AND deleted_at IS NULL",
            )
            .bind(&e.url)
            .bind(&e.events)
            .bind(&e.secret)
            .bind(&e.description)
            .bind(now)
            .bind(&e.id)
            .execute(&mut *tx)
            .await?;
            if res.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Creates or replaces the endpoint configured by `WEBHOOK_URL` (id `env`),
    /// or retires it (`None`) when the variable is no longer set.
    pub async fn sync_env_endpoint(&self, e: Option<&EndpointRow>) -> Result<(), StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            match e {
                Some(e) => {
                    sqlx::query(
                        "INSERT INTO webhook_endpoints (id, url, events, secret, description, created_at, updated_at)
                         VALUES ('env', $1, $2, $3, $4, $5, $5)
                         ON CONFLICT (id) DO UPDATE SET url = $1, events = $2, secret = $3, description = $4,
                            updated_at = $5, deleted_at = NULL",
                    )
                    .bind(&e.url)
                    .bind(&e.events)
                    .bind(&e.secret)
                    .bind(&e.description)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                }
                None => {
                    let res = sqlx::query("UPDATE webhook_endpoints SET deleted_at = $1 WHERE id = 'env' AND deleted_at IS NULL")
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    if res.rows_affected() > 0 {
                        cancel_pending(&mut *tx, "env").await?;
                    }
                }
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Live endpoints, oldest first.
    pub async fn list_endpoints(&self) -> Result<Vec<EndpointRow>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT id, url, events, secret, description, created_at FROM webhook_endpoints
                  WHERE deleted_at IS NULL ORDER BY created_at, id",
            )
            .fetch_all(pool)
            .await?;
            Ok(rows.iter().map(endpoint_from_row).collect::<Result<_, _>>()?)
        })
    }

    /// One live endpoint.
    pub async fn get_endpoint(&self, id: &str) -> Result<Option<EndpointRow>, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query(
                "SELECT id, url, events, secret, description, created_at FROM webhook_endpoints
                  WHERE id = $1 AND deleted_at IS NULL",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?;
            Ok(row.as_ref().map(endpoint_from_row).transpose()?)
        })
    }

    /// Deletes an endpoint (soft: past deliveries keep their history) and
    /// cancels what it had not received yet.
    pub async fn delete_endpoint(&self, id: &str, audit: &AuditEvent) -> Result<(), StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let res = sqlx::query("UPDATE webhook_endpoints SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            if res.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            cancel_pending(&mut *tx, id).await?;
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Makes a delivery that was given up (`failed`) due again now, with
    /// its audit event: one more attempt, on the usual schedule after it
    /// (so an old event gets that one). `NotFound` when the endpoint has no
    /// such failed delivery (delivered, pending or unknown).
    pub async fn retry_delivery(
        &self,
        endpoint_id: &str,
        message_id: &str,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let res = sqlx::query(
                "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $1, lease_owner = NULL, lease_until = NULL
                  WHERE endpoint_id = $2 AND message_id = $3 AND status = 'failed'
                    AND endpoint_id IN (SELECT id FROM webhook_endpoints WHERE deleted_at IS NULL)",
            )
            .bind(now)
            .bind(endpoint_id)
            .bind(message_id)
            .execute(&mut *tx)
            .await?;
            if res.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Leases up to `limit` due deliveries to `owner` until `until`, oldest
    /// first (PostgreSQL skips rows another replica is claiming).
    pub async fn claim_deliveries(
        &self,
        owner: &str,
        until: i64,
        limit: i64,
    ) -> Result<Vec<DeliveryJob>, StoreError> {
        let now = now_ms();
        let skip_locked = match self.backend() {
            super::Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            super::Backend::Sqlite => "",
        };
        let claim = format!(
            "UPDATE webhook_deliveries SET lease_owner = $1, lease_until = $2
              WHERE (message_id, endpoint_id) IN (
                    SELECT message_id, endpoint_id FROM webhook_deliveries
                     WHERE status = 'pending' AND next_attempt_at <= $3
                       AND (lease_until IS NULL OR lease_until < $3)
                     ORDER BY next_attempt_at LIMIT $4{skip_locked})"
        );
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(&claim).bind(owner).bind(until).bind(now).bind(limit).execute(&mut *tx).await?;
            let rows = sqlx::query(
                "SELECT d.message_id, d.endpoint_id, d.attempts, m.event_type, m.payload, m.created_at,
                        e.url, e.secret
                   FROM webhook_deliveries d
                   JOIN webhook_messages m ON m.id = d.message_id
                   LEFT JOIN webhook_endpoints e ON e.id = d.endpoint_id AND e.deleted_at IS NULL
                  WHERE d.lease_owner = $1 AND d.status = 'pending'
                  ORDER BY d.next_attempt_at",
            )
            .bind(owner)
            .fetch_all(&mut *tx)
            .await?;
            tx.commit().await?;
            rows.iter()
                .map(|r| -> Result<DeliveryJob, sqlx::Error> {
                    Ok(DeliveryJob {
                        message_id: r.try_get("message_id")?,
                        endpoint_id: r.try_get("endpoint_id")?,
                        attempts: r.try_get("attempts")?,
                        event_type: r.try_get("event_type")?,
                        payload: r.try_get("payload")?,
                        created_at: r.try_get("created_at")?,
                        url: r.try_get("url")?,
                        secret: r.try_get("secret")?,
                    })
                })
                .collect::<Result<_, _>>()
                .map_err(StoreError::from)
        })
    }

    /// Records one attempt and its consequence, if `owner` still holds the
    /// delivery's lease. Returns whether it did.
    pub async fn record_attempt(
        &self,
        job: &DeliveryJob,
        owner: &str,
        a: &Attempt,
    ) -> Result<bool, StoreError> {
        let now = now_ms();
        let (status, next, delivered) = match a.result {
            AttemptResult::Delivered => ("delivered", None, Some(now)),
            AttemptResult::Retry(at) => ("pending", Some(at), None),
            AttemptResult::Failed => ("failed", None, None),
            AttemptResult::Cancelled => ("cancelled", None, None),
        };
        let attempt = job.attempts + 1;
        let http_status = a.http_status.map(i64::from);
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let res = sqlx::query(
                "UPDATE webhook_deliveries SET status = $1, attempts = $2, next_attempt_at = $3, last_attempt_at = $4,
                    last_status = $5, last_error = $6, delivered_at = $7, lease_owner = NULL, lease_until = NULL
                  WHERE message_id = $8 AND endpoint_id = $9 AND lease_owner = $10 AND status = 'pending'",
            )
            .bind(status)
            .bind(attempt)
            .bind(next)
            .bind(now)
            .bind(http_status)
            .bind(&a.error)
            .bind(delivered)
            .bind(&job.message_id)
            .bind(&job.endpoint_id)
            .bind(owner)
            .execute(&mut *tx)
            .await?;
            if res.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            if !matches!(a.result, AttemptResult::Cancelled) {
                sqlx::query(
                    "INSERT INTO webhook_attempts (message_id, endpoint_id, attempt, attempted_at, http_status, error, duration_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&job.message_id)
                .bind(&job.endpoint_id)
                .bind(attempt)
                .bind(now)
                .bind(http_status)
                .bind(&a.error)
                .bind(a.duration_ms)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(true)
    }

    /// An endpoint's deliveries, newest first.
    pub async fn list_deliveries(
        &self,
        endpoint_id: &str,
        limit: i64,
    ) -> Result<Vec<DeliveryView>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT d.message_id, m.event_type, d.status, d.attempts, d.last_status, d.last_error,
                        d.next_attempt_at, d.delivered_at, d.created_at
                   FROM webhook_deliveries d JOIN webhook_messages m ON m.id = d.message_id
                  WHERE d.endpoint_id = $1
                  ORDER BY d.created_at DESC, d.message_id LIMIT $2",
            )
            .bind(endpoint_id)
            .bind(limit)
            .fetch_all(pool)
            .await?;
            rows.iter()
                .map(|r| -> Result<DeliveryView, sqlx::Error> {
                    let status: String = r.try_get("status")?;
                    let next: Option<i64> = r.try_get("next_attempt_at")?;
                    Ok(DeliveryView {
                        message_id: r.try_get("message_id")?,
                        event_type: r.try_get("event_type")?,
                        next_attempt_at: next.filter(|_| status == "pending").map(super::rfc3339),
                        status,
                        attempts: r.try_get("attempts")?,
                        last_status: r.try_get("last_status")?,
                        last_error: r.try_get("last_error")?,
                        delivered_at: r.try_get::<Option<i64>, _>("delivered_at")?.map(super::rfc3339),
                        created_at: super::rfc3339(r.try_get("created_at")?),
                    })
                })
                .collect::<Result<_, _>>()
                .map_err(StoreError::from)
        })
    }

    /// Removes events older than `before` (unix ms) whose deliveries are all
    /// finished (delivered, failed or cancelled), with their attempts.
    /// Returns how many events went.
    pub async fn prune_webhooks(&self, before: i64) -> Result<u64, StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let done = "SELECT id FROM webhook_messages m WHERE m.created_at < $1
                 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.message_id = m.id AND d.status = 'pending')";
            sqlx::query(&format!("DELETE FROM webhook_attempts WHERE message_id IN ({done})"))
                .bind(before)
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!("DELETE FROM webhook_deliveries WHERE message_id IN ({done})"))
                .bind(before)
                .execute(&mut *tx)
                .await?;
            let res = sqlx::query("DELETE FROM webhook_messages WHERE created_at < $1
                 AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.message_id = webhook_messages.id)")
                .bind(before)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(res.rows_affected())
        })
    }

    /// Deliveries not yet made (for the `nexus_webhook_pending` gauge).
    pub async fn count_pending_deliveries(&self) -> Result<i64, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query("SELECT COUNT(*) AS n FROM webhook_deliveries WHERE status = 'pending'")
                .fetch_one(pool)
                .await?;
            Ok(row.try_get("n")?)
        })
    }
}

async fn cancel_pending<'e, DB, E>(exec: E, endpoint_id: &str) -> Result<(), sqlx::Error>
where
    DB: Database,
    E: Executor<'e, Database = DB>,
    for<'q> <DB as Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'q> String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    sqlx::query(
        "UPDATE webhook_deliveries SET status = 'cancelled', next_attempt_at = NULL
          WHERE endpoint_id = $1 AND status = 'pending'",
    )
    .bind(endpoint_id.to_string())
    .execute(exec)
    .await?;
    Ok(())
}
