//! `POST /auth/consent-spec` (admin) and the public OAuth callback.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;

use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::events::audit::Actor;
use crate::handshake::{CallbackParams, ConsentRequest, ConsentSpec, HandshakeError};

impl From<HandshakeError> for ApiError {
    fn from(e: HandshakeError) -> Self {
        match e {
            HandshakeError::MissingFields(m) => ApiError::bad_request("missing_fields", m),
            HandshakeError::Invalid(m) => ApiError::bad_request("invalid_request", m),
            HandshakeError::ProviderNotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "provider_not_found",
                "provider not found",
            ),
            HandshakeError::ConnectionNotFound => ApiError::new(
                StatusCode::NOT_FOUND,
                "connection_not_found",
                "connection not found",
            ),
            e @ HandshakeError::ReturnUrlNotAllowed => {
                ApiError::bad_request("return_url_not_allowed", e.to_string())
            }
            HandshakeError::Provider(d) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "provider_discovery_failed",
                d.to_string(),
            ),
            HandshakeError::State(m) => ApiError::bad_request("invalid_state", m),
            HandshakeError::Store(s) => s.into(),
            HandshakeError::Registry(r) => r.into(),
            HandshakeError::TooMany {
                code,
                message,
                wait,
            } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message)
                .retry_after(wait.as_secs().max(1)),
        }
    }
}

/// `POST /auth/consent-spec` → `{authUrl, state, scopes, provider_id, connection_id}`.
pub async fn consent_spec(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<ConsentRequest>,
) -> Result<Json<ConsentSpec>, ApiError> {
    Ok(Json(
        st.handshakes().consent_spec(req, &caller.admin()).await?,
    ))
}

/// `GET /auth/callback`: the provider sends the browser here. Answers 303 to
/// the return URL, or 400 JSON when the state cannot be trusted.
pub async fn callback(
    State(st): State<AppState>,
    caller: Caller,
    Query(params): Query<CallbackParams>,
) -> Response {
    finish(st, caller, params, None).await
}

/// `GET /auth/callback/{provider_id}`: a provider's own redirect URI.
pub async fn provider_callback(
    State(st): State<AppState>,
    caller: Caller,
    Path(provider_id): Path<String>,
    Query(params): Query<CallbackParams>,
) -> Response {
    finish(st, caller, params, Some(&provider_id)).await
}

async fn finish(
    st: AppState,
    caller: Caller,
    params: CallbackParams,
    via: Option<&str>,
) -> Response {
    let actor = Actor {
        name: "user".into(),
        ip: caller.ip,
        user_agent: caller.user_agent,
        client_identity: caller.client_identity,
    };
    let mut resp = match st.handshakes().callback(params, via, &actor).await {
        Ok(url) => Redirect::to(&url).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    };
    // The callback URL carried a code: keep it out of caches and Referer headers.
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}
