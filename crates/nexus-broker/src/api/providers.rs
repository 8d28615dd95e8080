//! `/providers`: the provider registry API (SPEC §3, §12), wire-compatible
//! with the reference broker.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::extract::{ApiJson, Caller};
use super::AppState;
use crate::registry::Provider;
use crate::store::rfc3339;

type ApiResult<T> = Result<T, ApiError>;

fn view(p: &Provider, aliases: Vec<String>, redirect_uri: String) -> Value {
    let mut obj = match p.profile.public_json() {
        Value::Object(o) => o,
        _ => Map::new(),
    };
    obj.insert("id".into(), json!(p.row.id));
    obj.insert("client_secret_set".into(), json!(p.client_secret_set()));
    obj.insert("strategy".into(), json!(p.strategy));
    obj.insert("aliases".into(), json!(aliases));
    if !p.profile.auth_type.is_static() {
        // What to register at the IdP.
        obj.insert("redirect_uri".into(), json!(redirect_uri));
    }
    obj.insert("created_at".into(), json!(rfc3339(p.row.created_at)));
    obj.insert("updated_at".into(), json!(rfc3339(p.row.updated_at)));
    obj.insert("version".into(), json!(p.row.version));
    Value::Object(obj)
}

/// The version an `If-Match` header names: the provider's ETag (`"3"`,
/// also `W/"3"` or `3`). None, or `*`: any version.
fn if_match(headers: &HeaderMap) -> ApiResult<Option<i64>> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "invalid_if_match",
            "If-Match must be the provider's ETag (its version, e.g. \"3\") or *",
        )
    };
    let s = v.to_str().map_err(|_| bad())?.trim();
    if s == "*" {
        return Ok(None);
    }
    let s = s.strip_prefix("W/").unwrap_or(s);
    s.trim_matches('"')
        .parse::<i64>()
        .map(Some)
        .map_err(|_| bad())
}

/// `POST /providers/plan` (body as `POST /providers`) → `{action, id?,
/// version?, changes: [{field, before, after}]}`: what registering the
/// profile would do, changing nothing. `action` is `create` (no provider
/// has the name), `update` or `none`; the secret shows only as set,
/// changed or removed. Send `version` back as `If-Match` with the `PUT`.
pub async fn plan(
    State(st): State<AppState>,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Json<crate::registry::Plan>> {
    Ok(Json(st.registry().plan(body).await?))
}

/// `POST /providers` → 201 `{id, message}`.
pub async fn create(
    State(st): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<impl IntoResponse> {
    let id = st.registry().create(body, &caller.admin()).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "message": "provider created"})),
    ))
}

/// `GET /providers` → `[{id, name, auth_type}]`.
pub async fn list(State(st): State<AppState>) -> ApiResult<Json<Value>> {
    let providers = st.registry().list().await?;
    Ok(Json(Value::Array(
        providers
            .iter()
            .map(|p| json!({"id": p.row.id, "name": p.profile.name, "auth_type": p.profile.auth_type.as_str()}))
            .collect(),
    )))
}

/// `GET /providers/metadata` → `{auth_type: {name: {id, api_base_url, user_info_endpoint, scopes, description, category}}}`.
pub async fn metadata(State(st): State<AppState>) -> ApiResult<Json<Value>> {
    let providers = st.registry().list().await?;
    let mut grouped: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
    for p in &providers {
        grouped
            .entry(p.profile.auth_type.as_str())
            .or_default()
            .insert(
                p.profile.name.clone(),
                // Strings, never null: the reference's clients (and its v1
                // contract) type these fields as strings.
                json!({
                    "id": p.row.id,
                    "api_base_url": p.profile.api_base_url.as_deref().unwrap_or_default(),
                    "user_info_endpoint": p.profile.user_info_endpoint.as_deref().unwrap_or_default(),
                    "scopes": p.profile.scopes,
                    "description": p.profile.description.as_deref().unwrap_or_default(),
                    "category": p.profile.category.as_deref().unwrap_or_default(),
                }),
            );
    }
    Ok(Json(json!(grouped)))
}

/// `GET /providers/{id}`: the profile without its secret.
pub async fn get(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let reg = st.registry();
    let p = reg.get(&id).await?;
    let aliases = reg
        .aliases(&id)
        .await?
        .into_iter()
        .map(|(_, display)| display)
        .collect();
    let redirect_uri = st.handshakes().redirect_uri_for(&p);
    // Digits in quotes: always a valid header value.
    let etag = HeaderValue::from_str(&format!("\"{}\"", p.row.version))
        .unwrap_or(HeaderValue::from_static("\"0\""));
    Ok((
        [(header::ETAG, etag)],
        Json(view(&p, aliases, redirect_uri)),
    ))
}

/// `PUT /providers/{id}`: replace the profile (with `If-Match`: only if
/// still at that version, else 412 `provider_changed`).
pub async fn replace(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Json<Value>> {
    let expected = if_match(&headers)?;
    st.registry()
        .replace_if(&id, body, &caller.admin(), expected)
        .await?;
    Ok(Json(json!({"id": id, "message": "provider updated"})))
}

/// `PATCH /providers/{id}`: JSON merge patch of the profile (`If-Match`
/// as for `PUT`).
pub async fn patch(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> ApiResult<Json<Value>> {
    let expected = if_match(&headers)?;
    st.registry()
        .patch_if(&id, body, &caller.admin(), expected)
        .await?;
    Ok(Json(json!({"id": id, "message": "provider updated"})))
}

/// `DELETE /providers/{id}`: soft delete (`If-Match` as for `PUT`).
pub async fn delete(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let expected = if_match(&headers)?;
    st.registry()
        .delete_if(&id, &caller.admin(), expected)
        .await?;
    Ok(Json(json!({"id": id, "message": "provider deleted"})))
}

/// `GET /providers/by-name/{name}` → `{id}` (name, or any alias spelling).
pub async fn get_by_name(
    State(st): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let p = st.registry().find(&name).await?;
    Ok(Json(json!({"id": p.row.id, "name": p.profile.name})))
}

/// `DELETE /providers/by-name/{name}`.
pub async fn delete_by_name(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let reg = st.registry();
    let p = reg.find(&name).await?;
    reg.delete(&p.row.id, &caller.admin()).await?;
    Ok(Json(json!({"id": p.row.id, "message": "provider deleted"})))
}

/// Body of `POST /providers/{id}/aliases`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasBody {
    alias: String,
}

/// `POST /providers/{id}/aliases` → 201 `{provider_id, alias}`.
pub async fn add_alias(
    State(st): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<AliasBody>,
) -> ApiResult<impl IntoResponse> {
    let alias = st
        .registry()
        .add_alias(&id, &body.alias, &caller.admin())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"provider_id": id, "alias": alias})),
    ))
}

/// `GET /providers/{id}/aliases` → `[{alias, display}]`.
pub async fn list_aliases(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let aliases = st.registry().aliases(&id).await?;
    Ok(Json(Value::Array(
        aliases
            .into_iter()
            .map(|(alias, display)| json!({"alias": alias, "display": display}))
            .collect(),
    )))
}

/// `DELETE /providers/{id}/aliases/{alias}`.
pub async fn remove_alias(
    State(st): State<AppState>,
    caller: Caller,
    Path((id, alias)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    st.registry()
        .remove_alias(&id, &alias, &caller.admin())
        .await?;
    Ok(Json(json!({"provider_id": id, "message": "alias removed"})))
}
