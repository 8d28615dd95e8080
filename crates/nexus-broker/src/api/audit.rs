//! `GET /audit`.

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::error::ApiError;
use super::AppState;
use crate::store::AuditFilter;

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 1000;

/// Query parameters; all optional. Kept as strings so bad values get our own messages.
#[derive(Deserialize)]
pub struct AuditQuery {
    event_type: Option<String>,
    since: Option<String>,
    connection_id: Option<String>,
    provider_id: Option<String>,
    limit: Option<String>,
    order: Option<String>,
}

fn parse_since(raw: &str) -> Result<i64, ApiError> {
    if let Ok(t) = OffsetDateTime::parse(raw, &Rfc3339) {
        return Ok((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    if let Ok(secs) = raw.parse::<i64>() {
        if let Some(ms) = secs.checked_mul(1000) {
            return Ok(ms);
        }
    }
    Err(ApiError::bad_request(
        "invalid_query",
        "since must be an RFC 3339 time (2026-01-31T12:00:00Z) or unix seconds",
    ))
}

/// `GET /audit?event_type=&since=&connection_id=&provider_id=&limit=&order=asc|desc`
/// → `{events: [...]}`, newest first unless `order=asc`.
pub async fn list(
    State(st): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = match q.limit.as_deref() {
        None | Some("") => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("limit must be a whole number from 1 to {MAX_LIMIT}"),
                )
            })?,
    };
    let ascending = match q.order.as_deref() {
        None | Some("") | Some("desc") => false,
        Some("asc") => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "order must be 'asc' or 'desc'",
            ))
        }
    };
    let since_ms = q
        .since
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(parse_since)
        .transpose()?;
    let filter = AuditFilter {
        event_type: q.event_type.filter(|s| !s.is_empty()),
        since_ms,
        connection_id: q.connection_id.filter(|s| !s.is_empty()),
        provider_id: q.provider_id.filter(|s| !s.is_empty()),
        before_id: None,
        limit,
        ascending,
    };
    let events = st.store().query_audit(&filter).await?;
    Ok(Json(json!({"events": events, "count": events.len()})))
}
