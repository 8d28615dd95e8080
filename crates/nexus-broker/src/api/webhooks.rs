//! Webhook endpoints: `POST|GET /webhooks`, `GET|DELETE /webhooks/{id}`,
//! `GET /webhooks/{id}/deliveries`.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::events::webhooks::{NewEndpoint, WebhookError};

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> Self {
        let msg = e.to_string();
        match e {
            WebhookError::Invalid(m) => ApiError::bad_request("invalid_request", m),
            WebhookError::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "webhook_not_found", msg)
            }
            WebhookError::Managed => ApiError::new(StatusCode::CONFLICT, "managed_by_config", msg),
            WebhookError::NoFailedDelivery => {
                ApiError::new(StatusCode::NOT_FOUND, "delivery_not_found", msg)
            }
            WebhookError::Store(s) => s.into(),
        }
    }
}

/// `POST /webhooks {url, events?, description?, secret?}` → 201, with the
/// signing secret (shown this once) when Nexus generated it.
pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<NewEndpoint>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (view, secret) = st.webhooks().create(req, &caller.admin()).await?;
    let mut body = json!(view);
    if let Some(secret) = secret {
        body["secret"] = json!(secret.expose());
    }
    Ok((StatusCode::CREATED, Json(body)))
}

/// `PUT /webhooks/{id} {url, events?, description?, secret?}`: replaces the
/// endpoint; its secret stays unless one is given.
pub async fn replace(
    State(st): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
    ApiJson(req): ApiJson<NewEndpoint>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(
        st.webhooks().update(&id, req, &caller.admin()).await?
    )))
}

/// `POST /webhooks/plan {url, events?, description?, secret?}`: what
/// registering this endpoint would change (matched by URL; nothing stored).
pub async fn plan(
    State(st): State<AppState>,
    ApiJson(req): ApiJson<NewEndpoint>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(st.webhooks().plan(req).await?)))
}

/// `GET /webhooks`.
pub async fn list(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"webhooks": st.webhooks().list().await?})))
}

/// `GET /webhooks/{id}`.
pub async fn get(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(st.webhooks().get(&id).await?)))
}

/// `DELETE /webhooks/{id}`: undelivered events to it are cancelled.
pub async fn delete(
    State(st): State<AppState>,
    Path(id): Path<String>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    st.webhooks().delete(&id, &caller.admin()).await?;
    Ok(Json(json!({"id": id, "deleted": true})))
}

/// `?limit=`.
#[derive(Deserialize)]
pub struct Limit {
    limit: Option<String>,
}

/// `GET /webhooks/{id}/deliveries?limit=` (default 50, at most 500), newest first.
pub async fn deliveries(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<Limit>,
) -> Result<Json<Value>, ApiError> {
    let limit = match q.limit.as_deref() {
        None => 50,
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=500).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_request",
                    "limit must be a whole number from 1 to 500",
                )
            })?,
    };
    Ok(Json(
        json!({"webhook_id": id, "deliveries": st.webhooks().deliveries(&id, limit).await?}),
    ))
}

/// `POST /webhooks/{id}/deliveries/{message_id}/retry`: a given-up
/// delivery is tried once more, now.
pub async fn retry(
    State(st): State<AppState>,
    Path((id, message_id)): Path<(String, String)>,
    caller: Caller,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    st.webhooks()
        .retry(&id, &message_id, &caller.admin())
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"webhook_id": id, "message_id": message_id, "status": "pending"})),
    ))
}
