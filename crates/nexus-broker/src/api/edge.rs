//! The gateway's side channel: the change stream its token cache follows and
//! the issuances it served from that cache (see [`crate::tokens::edge`]).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::ApiJson;
use super::AppState;
use nexus_core::wire::{IssuedReport, MAX_ISSUED_ENTRIES};

/// `GET /tokens/changes`: newline-delimited JSON invalidations.
pub async fn changes(State(st): State<AppState>) -> Result<Response, ApiError> {
    let tokens = st.tokens().clone();
    tokens
        .edge()
        .stream(|| tokens.hears_every_change())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "changes_unavailable",
                "this broker cannot hear every change right now (or is shutting down); retry shortly",
            )
            .retry_after(1)
        })
}

/// `POST /tokens/issued` `{"issued": [{connection_id, count, first_at, last_at}]}`.
pub async fn issued(
    State(st): State<AppState>,
    ApiJson(IssuedReport { issued: entries }): ApiJson<IssuedReport>,
) -> Result<Json<Value>, ApiError> {
    let invalid = |m: &str| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", m);
    if entries.len() > MAX_ISSUED_ENTRIES {
        return Err(invalid("at most 10000 entries per report"));
    }
    if entries.iter().any(|e| {
        e.count == 0
            || e.count > 1_000_000_000
            || e.first_at > e.last_at
            || e.first_at <= 0
            || e.connection_id.is_empty()
            || e.connection_id.len() > 128
    }) {
        return Err(invalid(
            "each entry needs a connection_id, a count from 1 to 10^9 and first_at <= last_at (unix ms)",
        ));
    }
    let taken = st.tokens().record_gateway_issued(&entries).await?;
    Ok(Json(json!({"accepted": taken})))
}
