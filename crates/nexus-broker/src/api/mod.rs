//! The broker's HTTP API.
//!
//! Layers, outermost first: JSON errors for anything axum or tower answer on
//! their own; request metrics and logs; body size limit; then per group of
//! routes, the `ALLOWED_CIDRS` check and the `X-API-Key` check. `/health`,
//! `/ready` and `/metrics` need no key (they reveal no secret and probes rarely
//! carry one); everything else does.

use std::sync::Arc;

use axum::http::{Method, StatusCode, Uri};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::limit::RequestBodyLimitLayer;

use crate::audit::AuditSink;
use crate::config::BrokerConfig;
use crate::discovery::Discovery;
use crate::handshake::Handshakes;
use crate::outbound::{self, OutboundError};
use crate::pause::Pauses;
use crate::registry::Registry;
use crate::scope::ScopeReports;
use crate::shared_cache::SharedCache;
use crate::store::Store;
use crate::telemetry;
use crate::token::Tokens;
use crate::webhook::Webhooks;

pub mod agent_keys;
pub mod audit;
pub mod capture;
pub mod connections;
pub mod error;
pub mod extract;
pub mod guard;
pub mod handshake;
pub mod ops;
pub mod pauses;
pub mod providers;
pub mod webhooks;

use error::ApiError;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    config: BrokerConfig,
    store: Store,
    registry: Registry,
    handshakes: Handshakes,
    tokens: Arc<Tokens>,
    scopes: ScopeReports,
    webhooks: Arc<Webhooks>,
    agent_keys: crate::agent_keys::AgentKeys,
    audit: AuditSink,
    metrics: PrometheusHandle,
}

impl AppState {
    /// Builds the state.
    pub fn new(
        config: BrokerConfig,
        store: Store,
        audit: AuditSink,
        metrics: PrometheusHandle,
        shared: Option<SharedCache>,
    ) -> Result<Self, OutboundError> {
        let registry = Registry::new(store.clone(), config.keys.clone());
        let http = outbound::client(config.provider_timeout)?;
        let discovery =
            Arc::new(Discovery::new(http.clone(), store.clone()).with_shared_cache(shared));
        let agent_keys = crate::agent_keys::AgentKeys::new(store.clone());
        let pauses = Arc::new(Pauses::new(store.clone()));
        let tokens = Arc::new(Tokens::new(
            store.clone(),
            registry.clone(),
            config.keys.clone(),
            discovery.clone(),
            http.clone(),
            audit.clone(),
            config.refresh,
            pauses,
        ));
        let scopes = ScopeReports::new(
            store.clone(),
            registry.clone(),
            tokens.clone(),
            config.scope,
        );
        let webhooks = Arc::new(Webhooks::new(
            store.clone(),
            config.keys.clone(),
            outbound::client(config.webhooks.timeout)?,
            config.webhooks,
        ));
        let handshakes = Handshakes::new(&config, store.clone(), registry.clone(), discovery, http);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                store,
                registry,
                handshakes,
                tokens,
                scopes,
                webhooks,
                agent_keys,
                audit,
                metrics,
            }),
        })
    }

    /// Validated configuration.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The provider registry.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The handshake engine.
    pub fn handshakes(&self) -> &Handshakes {
        &self.inner.handshakes
    }

    /// The token service.
    pub fn tokens(&self) -> &Arc<Tokens> {
        &self.inner.tokens
    }

    /// Scope failure reports.
    pub fn scopes(&self) -> &ScopeReports {
        &self.inner.scopes
    }

    /// Webhook endpoints and delivery.
    pub fn webhooks(&self) -> &Arc<Webhooks> {
        &self.inner.webhooks
    }

    /// Agent keys.
    pub fn agent_keys(&self) -> &crate::agent_keys::AgentKeys {
        &self.inner.agent_keys
    }

    /// Issuance pauses.
    pub fn pauses(&self) -> &Arc<Pauses> {
        self.inner.tokens.pauses()
    }

    /// Queue for audit events written off the request path.
    pub fn audit(&self) -> &AuditSink {
        &self.inner.audit
    }

    /// Prometheus handle.
    pub fn metrics(&self) -> &PrometheusHandle {
        &self.inner.metrics
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    // The path only, never the query string.
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

/// The complete router with all layers.
pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/providers", post(providers::create).get(providers::list))
        .route("/providers/metadata", get(providers::metadata))
        .route(
            "/providers/by-name/{name}",
            get(providers::get_by_name).delete(providers::delete_by_name),
        )
        .route(
            "/providers/{id}",
            get(providers::get)
                .put(providers::replace)
                .patch(providers::patch)
                .delete(providers::delete),
        )
        .route(
            "/providers/{id}/aliases",
            post(providers::add_alias).get(providers::list_aliases),
        )
        .route(
            "/providers/{id}/aliases/{alias}",
            axum::routing::delete(providers::remove_alias),
        )
        .route("/audit", get(audit::list))
        .route("/auth/consent-spec", post(handshake::consent_spec))
        .route("/connections", get(connections::list))
        .route(
            "/connections/{id}",
            get(connections::get).delete(connections::revoke),
        )
        .route("/connections/{id}/token", get(connections::token))
        .route("/connections/{id}/refresh", post(connections::refresh))
        .route(
            "/connections/{id}/scope-failures",
            post(connections::scope_failures),
        )
        .route(
            "/workspaces/{id}/connections/status",
            get(connections::status),
        )
        .route(
            "/workspaces/{id}/pause",
            get(pauses::workspace_get)
                .put(pauses::workspace_pause)
                .delete(pauses::workspace_resume),
        )
        .route(
            "/admin/pause",
            get(pauses::operator_get)
                .post(pauses::operator_pause)
                .delete(pauses::operator_resume),
        )
        .route("/webhooks", post(webhooks::create).get(webhooks::list))
        .route(
            "/webhooks/{id}",
            get(webhooks::get).delete(webhooks::delete),
        )
        .route("/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .route(
            "/agent-keys",
            post(agent_keys::create).get(agent_keys::list),
        )
        .route(
            "/agent-keys/{id}",
            axum::routing::delete(agent_keys::revoke),
        )
        .route("/agent-keys/verify", post(agent_keys::verify))
        .route_layer(from_fn_with_state(state.clone(), guard::require_api_key))
        .route_layer(from_fn_with_state(state.clone(), guard::allow_cidrs));

    let ops = Router::new()
        .route("/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .route_layer(from_fn_with_state(state.clone(), guard::allow_cidrs))
        .route("/health", get(ops::health));

    // Browsers arrive here from the provider: no API key, no CIDR allowlist.
    let public = Router::new()
        .route(&state.config().redirect_path, get(handshake::callback))
        .route("/auth/capture", get(capture::form))
        .route("/auth/capture-schema", get(capture::schema))
        .route("/auth/capture-credential", post(capture::submit));

    let max_body = state.config().max_body_bytes;
    Router::new()
        .merge(admin)
        .merge(ops)
        .merge(public)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(RequestBodyLimitLayer::new(max_body))
        .layer(from_fn(error::reject_nul))
        .layer(from_fn(telemetry::track_requests))
        .layer(from_fn(error::json_errors))
        .with_state(state)
}
