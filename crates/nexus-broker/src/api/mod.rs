//! The broker's HTTP API.
//!
//! Layers, outermost first: JSON errors for anything axum or tower answer on
//! their own; request metrics and logs; body size limit; then per group of
//! routes, the `ALLOWED_CIDRS` check and the `X-API-Key` check. `/health`,
//! `/ready` and `/metrics` need no key (they reveal no secret and probes rarely
//! carry one); everything else does.

use std::sync::Arc;

use axum::http::{Method, StatusCode, Uri};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::limit::RequestBodyLimitLayer;

use crate::config::BrokerConfig;
use crate::events::audit::AuditSink;
use crate::events::webhooks::Webhooks;
use crate::handshake::Handshakes;
use crate::oauth::discovery::Discovery;
use crate::oauth::shared_cache::SharedCache;
use crate::registry::Registry;
use crate::store::Store;
use crate::tokens::pause::Pauses;
use crate::tokens::scope::ScopeReports;
use crate::tokens::Tokens;
use nexus_core::outbound::{self, OutboundError};

pub mod agent_keys;
pub mod audit;
pub mod capture;
pub mod connections;
pub mod console;
pub mod edge;
pub mod error;
pub mod extract;
pub mod guard;
pub mod handshake;
pub mod mcp;
pub mod ops;
mod pages;
pub mod pauses;
pub mod portal;
pub mod providers;
pub mod webhooks;

use error::ApiError;
use nexus_core::openapi::{doc, mount, Kind, Route, RouteDoc};
use nexus_core::wire::routes;

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
    agent_keys: crate::registry::agent_keys::AgentKeys,
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
        // Provider calls carry client secrets, codes and tokens: only to
        // addresses the egress policy permits, checked after DNS resolution.
        let http = outbound::guarded_client(config.provider_timeout, config.egress.clone())?;
        let discovery = Arc::new(
            Discovery::new(http.clone(), store.clone())
                .with_shared_cache(shared)
                .with_egress(config.egress.clone()),
        );
        let agent_keys = crate::registry::agent_keys::AgentKeys::new(store.clone());
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
            outbound::guarded_client(config.webhooks.timeout, config.egress.clone())?,
            config.webhooks,
            config.egress.clone(),
        ));
        let handshakes = Handshakes::new(
            config.handshake_settings(),
            store.clone(),
            registry.clone(),
            discovery,
            http,
        );
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
    pub fn agent_keys(&self) -> &crate::registry::agent_keys::AgentKeys {
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

/// The admin API: API key and `ALLOWED_CIDRS`.
fn admin_routes() -> Vec<Route<AppState>> {
    use axum::routing::{delete, patch, put};
    vec![
        (
            doc("POST", routes::PROVIDERS, "Register a provider").status(201),
            post(providers::create),
        ),
        (
            doc(
                "POST",
                "/providers/mcp",
                "Register an OAuth-protected MCP server by its URL (metadata discovered and checked)",
            )
            .status(201)
            .fails(502, "the server's metadata is missing, inconsistent or unsafe"),
            post(mcp::create),
        ),
        (
            doc(
                "POST",
                "/providers/mcp/plan",
                "What an MCP server's metadata says, checked (nothing is stored)",
            )
            .fails(502, "the server's metadata is missing, inconsistent or unsafe"),
            post(mcp::plan),
        ),
        (
            doc(
                "POST",
                "/providers/plan",
                "What registering a profile would change (nothing is stored)",
            )
            .fails(409, "the name is an alias of another provider"),
            post(providers::plan),
        ),
        (
            doc("GET", routes::PROVIDERS, "List providers ({id, name})")
                .returns(serde_json::json!({"type": "array", "items": {"type": "object"}})),
            get(providers::list),
        ),
        (
            doc(
                "GET",
                routes::PROVIDERS_METADATA,
                "Providers grouped by auth type",
            ),
            get(providers::metadata),
        ),
        (
            doc(
                "GET",
                "/providers/by-name/{name}",
                "A provider's id by name",
            ),
            get(providers::get_by_name),
        ),
        (
            doc(
                "DELETE",
                "/providers/by-name/{name}",
                "Delete a provider by name (soft)",
            ),
            delete(providers::delete_by_name),
        ),
        (
            doc("GET", "/providers/{id}", "A provider (no secret)"),
            get(providers::get),
        ),
        (
            doc("PUT", "/providers/{id}", "Replace a provider's profile")
                .fails(412, "If-Match names a version the provider has left"),
            put(providers::replace),
        ),
        (
            doc("PATCH", "/providers/{id}", "Change some profile fields")
                .fails(412, "If-Match names a version the provider has left"),
            patch(providers::patch),
        ),
        (
            doc("DELETE", "/providers/{id}", "Delete a provider (soft)")
                .fails(412, "If-Match names a version the provider has left"),
            delete(providers::delete),
        ),
        (
            doc("POST", "/providers/{id}/aliases", "Add an alias").status(201),
            post(providers::add_alias),
        ),
        (
            doc("GET", "/providers/{id}/aliases", "A provider's aliases")
                .returns(serde_json::json!({"type": "array", "items": {"type": "object"}})),
            get(providers::list_aliases),
        ),
        (
            doc(
                "DELETE",
                "/providers/{id}/aliases/{alias}",
                "Remove an alias",
            ),
            delete(providers::remove_alias),
        ),
        (
            doc(
                "GET",
                "/audit",
                "Audit events (event_type, since, connection_id, provider_id, limit)",
            ),
            get(audit::list),
        ),
        (
            doc(
                "POST",
                routes::CONSENT_SPEC,
                "Start a consent or capture handshake",
            )
            .fails(
                429,
                "too_many_handshakes or too_many_pending_connections for the workspace, with Retry-After",
            ),
            post(handshake::consent_spec),
        ),
        (
            doc(
                "GET",
                "/connections",
                "Connections of a workspace (?workspace_id=)",
            )
            .query("workspace_id", true, "the workspace"),
            get(connections::list),
        ),
        (
            doc(
                "GET",
                routes::CONNECTION,
                "A connection's health, with its failing scopes",
            ),
            get(connections::get),
        ),
        (
            doc(
                "DELETE",
                routes::CONNECTION,
                "Revoke: RFC 7009 at the provider, secrets erased",
            ),
            delete(connections::revoke),
        ),
        (
            doc(
                "GET",
                routes::CONNECTION_TOKEN,
                "Strategy and usage secrets",
            ),
            get(connections::token),
        ),
        (
            doc(
                "POST",
                routes::CONNECTION_REFRESH,
                "Refresh now, then the token response",
            )
            .no_body(),
            post(connections::refresh),
        ),
        (
            doc(
                "POST",
                routes::CONNECTION_SCOPE_FAILURES,
                "Report scopes the provider refused (or that work again)",
            )
            .status(202),
            post(connections::scope_failures),
        ),
        (
            doc(
                "GET",
                routes::TOKEN_CHANGES,
                "Invalidations a gateway's token cache follows (newline-delimited JSON stream)",
            )
            .answers(Kind::Stream),
            get(edge::changes),
        ),
        (
            doc(
                "POST",
                routes::TOKENS_ISSUED,
                "Tokens a gateway served from its cache, for the audit log",
            ),
            post(edge::issued),
        ),
        (
            doc(
                "GET",
                routes::WORKSPACE_STATUS,
                "A workspace's connections' health",
            ),
            get(connections::status),
        ),
        (
            doc(
                "GET",
                "/workspaces/{id}/pause",
                "The pause that applies to a workspace",
            ),
            get(pauses::workspace_get),
        ),
        (
            doc(
                "PUT",
                "/workspaces/{id}/pause",
                "Pause token issuance for a workspace ({reason})",
            ),
            put(pauses::workspace_pause),
        ),
        (
            doc("DELETE", "/workspaces/{id}/pause", "Resume a workspace"),
            delete(pauses::workspace_resume),
        ),
        (
            doc("GET", "/admin/pause", "The operator pause, if any"),
            get(pauses::operator_get),
        ),
        (
            doc(
                "POST",
                "/admin/pause",
                "Pause token issuance everywhere ({reason?})",
            )
            .optional_body(),
            post(pauses::operator_pause),
        ),
        (
            doc(
                "DELETE",
                "/admin/pause",
                "Resume issuance (workspace pauses stay)",
            ),
            delete(pauses::operator_resume),
        ),
        (
            doc(
                "POST",
                "/webhooks",
                "Add a webhook endpoint (secret shown once)",
            )
            .status(201),
            post(webhooks::create),
        ),
        (
            doc("GET", "/webhooks", "Webhook endpoints"),
            get(webhooks::list),
        ),
        (
            doc(
                "POST",
                "/webhooks/plan",
                "What registering an endpoint would change, matched by URL (nothing is stored)",
            )
            .fails(409, "the URL is the endpoint configured by WEBHOOK_URL"),
            post(webhooks::plan),
        ),
        (
            doc(
                "PUT",
                "/webhooks/{id}",
                "Replace an endpoint (its secret stays unless one is given)",
            )
            .fails(409, "the endpoint is configured by WEBHOOK_URL"),
            put(webhooks::replace),
        ),
        (
            doc("GET", "/webhooks/{id}", "A webhook endpoint"),
            get(webhooks::get),
        ),
        (
            doc("DELETE", "/webhooks/{id}", "Delete a webhook endpoint"),
            delete(webhooks::delete),
        ),
        (
            doc(
                "GET",
                "/webhooks/{id}/deliveries",
                "An endpoint's recent deliveries",
            ),
            get(webhooks::deliveries),
        ),
        (
            doc(
                "POST",
                "/webhooks/{id}/deliveries/{message_id}/retry",
                "Try a given-up delivery once more, now",
            )
            .status(202)
            .no_body()
            .fails(404, "no failed delivery of that event to that endpoint"),
            post(webhooks::retry),
        ),
        (
            doc("POST", "/console/links", "A one-time console sign-in link (10 min)")
                .status(201)
                .optional_body(),
            post(console::create_link),
        ),
        (
            doc(
                "POST",
                routes::CONNECT_SESSIONS,
                "A connect-portal link for one workspace (token shown once)",
            )
            .status(201),
            post(portal::create),
        ),
        (
            doc("DELETE", "/connect-sessions/{id}", "End a connect-portal link"),
            delete(portal::revoke),
        ),
        (
            doc("POST", "/agent-keys", "Create an agent key (shown once)").status(201),
            post(agent_keys::create),
        ),
        (
            doc("GET", "/agent-keys", "Agent keys (never the keys)"),
            get(agent_keys::list),
        ),
        (
            doc("DELETE", "/agent-keys/{id}", "Revoke an agent key"),
            delete(agent_keys::revoke),
        ),
        (
            doc(
                "POST",
                routes::AGENT_KEY_VERIFY,
                "Verify an agent key (for the gateway)",
            ),
            post(agent_keys::verify),
        ),
    ]
}

/// Probes and documents: no key; `/ready` and `/metrics` behind `ALLOWED_CIDRS`.
fn ops_routes() -> (Vec<Route<AppState>>, Vec<Route<AppState>>) {
    (
        vec![
            (
                doc("GET", "/ready", "Database reachable and vault self-test").open(),
                get(ops::ready),
            ),
            (
                doc("GET", "/metrics", "Prometheus metrics")
                    .open()
                    .answers(Kind::Text),
                get(ops::metrics),
            ),
            (
                doc(
                    "GET",
                    "/console/sign-in",
                    "Console: a one-time sign-in link opens a session (?token=)",
                )
                .open()
                .answers(Kind::Redirect),
                get(console::sign_in),
            ),
            (
                doc(
                    "GET",
                    "/console/sso",
                    "Console: sign in through the organisation's OpenID provider (CONSOLE_OIDC_ISSUER; ?login_hint=)",
                )
                .open()
                .answers(Kind::Redirect),
                get(console::sso_start),
            ),
            (
                doc(
                    "GET",
                    "/console/sso/callback",
                    "Console: the OpenID provider's answer; an allowed operator gets a session",
                )
                .open()
                .answers(Kind::Html),
                get(console::sso_callback),
            ),
            (
                doc(
                    "GET",
                    "/console/events",
                    "Console: server-sent events (changed connection rows, banners, counts) while the session stands",
                )
                .open()
                .answers(Kind::EventStream),
                get(console::events),
            ),
            (
                doc("GET", "/console/live.js", "Console: the pages' script (live updates)")
                    .open()
                    .answers(Kind::Script),
                get(console::script),
            ),
            (
                doc("GET", "/console", "Console: overview (session cookie)")
                    .open()
                    .answers(Kind::Html),
                get(console::overview),
            ),
            (
                doc(
                    "GET",
                    "/console/connections",
                    "Console: connections (filters)",
                )
                .open()
                .answers(Kind::Html),
                get(console::connections),
            ),
            (
                doc("GET", "/console/connections/{id}", "Console: a connection")
                    .open()
                    .answers(Kind::Html),
                get(console::connection),
            ),
            (
                doc(
                    "POST",
                    "/console/connections/{id}/{action}",
                    "Console: refresh, revoke or reconnect-link (form)",
                )
                .open()
                .answers(Kind::Html),
                post(console::connection_action),
            ),
            (
                doc(
                    "GET",
                    "/console/audit",
                    "Console: the audit log (filters, pages)",
                )
                .open()
                .answers(Kind::Html),
                get(console::audit),
            ),
            (
                doc("GET", "/console/agent-keys", "Console: agent keys")
                    .open()
                    .answers(Kind::Html),
                get(console::agent_keys),
            ),
            (
                doc(
                    "POST",
                    "/console/agent-keys",
                    "Console: create an agent key (form; shown once)",
                )
                .open()
                .answers(Kind::Html),
                post(console::create_agent_key),
            ),
            (
                doc(
                    "POST",
                    "/console/agent-keys/{id}/revoke",
                    "Console: revoke an agent key (form)",
                )
                .open()
                .answers(Kind::Redirect),
                post(console::revoke_agent_key),
            ),
            (
                doc(
                    "GET",
                    "/console/providers",
                    "Console: providers and the catalogue form",
                )
                .open()
                .answers(Kind::Html),
                get(console::providers),
            ),
            (
                doc(
                    "POST",
                    "/console/providers",
                    "Console: add a provider from a catalogue template (form)",
                )
                .open()
                .answers(Kind::Html),
                post(console::add_provider),
            ),
            (
                doc(
                    "POST",
                    "/console/providers/new",
                    "Console: add a provider from a typed profile (form)",
                )
                .open()
                .answers(Kind::Redirect),
                post(console::add_profile),
            ),
            (
                doc("GET", "/console/providers/{id}", "Console: a provider and its profile to edit")
                    .open()
                    .answers(Kind::Html),
                get(console::provider),
            ),
            (
                doc(
                    "POST",
                    "/console/providers/{id}",
                    "Console: save a provider's profile (form; version-checked, secret write-only)",
                )
                .open()
                .answers(Kind::Redirect),
                post(console::edit_provider),
            ),
            (
                doc("GET", "/console/webhooks", "Console: webhook endpoints and recent deliveries")
                    .open()
                    .answers(Kind::Html),
                get(console::webhooks),
            ),
            (
                doc(
                    "POST",
                    "/console/webhooks/{id}/retry",
                    "Console: try a given-up delivery once more (form)",
                )
                .open()
                .answers(Kind::Redirect),
                post(console::retry_delivery),
            ),
            (
                doc(
                    "POST",
                    "/console/pause",
                    "Console: the operator pause (form)",
                )
                .open()
                .answers(Kind::Redirect),
                post(console::pause),
            ),
            (
                doc(
                    "POST",
                    "/console/sign-out",
                    "Console: end the session (form)",
                )
                .open()
                .answers(Kind::Html),
                post(console::sign_out),
            ),
        ],
        vec![(
            doc("GET", routes::HEALTH, "Liveness").open(),
            get(ops::health),
        )],
    )
}

/// Browsers arrive here from the provider: no API key, no CIDR allowlist.
fn public_routes(redirect_path: &str) -> Vec<Route<AppState>> {
    vec![
        (
            doc(
                "GET",
                redirect_path,
                "OAuth callback (the provider redirects the browser here)",
            )
            .oauth_callback(),
            get(handshake::callback),
        ),
        (
            doc(
                "GET",
                &format!("{redirect_path}/{{provider_id}}"),
                "A provider's own OAuth callback (providers registered with per-provider redirect URIs)",
            )
            .oauth_callback(),
            get(handshake::provider_callback),
        ),
        (
            doc("GET", "/connect", "The connect portal (?session= from a connect link)")
                .open()
                .answers(Kind::Html),
            get(portal::page),
        ),
        (
            doc("POST", "/connect/start", "Portal: connect or reconnect (form)")
                .open()
                .answers(Kind::Redirect),
            post(portal::start),
        ),
        (
            doc("POST", "/connect/disconnect", "Portal: disconnect (form)")
                .open()
                .answers(Kind::Redirect),
            post(portal::disconnect),
        ),
        (
            doc("POST", "/connect/pause", "Portal: pause or resume the workspace (form)")
                .open()
                .answers(Kind::Redirect),
            post(portal::pause),
        ),
        (
            doc("GET", nexus_core::pages::SCRIPT_PATH, "The connect portal's script")
                .open()
                .answers(Kind::Script),
            get(nexus_core::pages::script),
        ),
        (
            doc("GET", nexus_core::pages::STYLESHEET_PATH, "The pages' stylesheet")
                .open()
                .answers(Kind::Css),
            get(nexus_core::pages::stylesheet),
        ),
        (
            doc(
                "GET",
                "/auth/capture",
                "Hosted form for static credentials (?state=)",
            )
            .open()
            .query("state", true, "the signed state of the handshake")
            .answers(Kind::Html),
            get(capture::form),
        ),
        (
            doc(
                "GET",
                nexus_core::wire::routes::CLIENT_METADATA,
                "Nexus's client ID metadata document (its client id at MCP authorization servers)",
            )
            .open(),
            get(mcp::client_metadata),
        ),
        (
            doc(
                "GET",
                "/auth/capture-schema",
                "The credential schema of a capture (?state=)",
            )
            .open()
            .query("state", true, "the signed state of the handshake"),
            get(capture::schema),
        ),
        (
            doc(
                "POST",
                "/auth/capture-credential",
                "Submit static credentials (form or JSON)",
            )
            .open(),
            post(capture::submit),
        ),
    ]
}

/// The broker's OpenAPI document, from the same tables as [`router`].
pub fn openapi(redirect_path: &str) -> serde_json::Value {
    let (guarded, open) = ops_routes();
    let mut docs: Vec<RouteDoc> = admin_routes()
        .into_iter()
        .chain(guarded)
        .chain(open)
        .chain(public_routes(redirect_path))
        .map(|(d, _)| d)
        .collect();
    docs.push(doc("GET", "/openapi.json", "This document").open());
    nexus_core::openapi::document(
        "Nexus broker",
        "The broker's internal API: providers, connections, tokens, audit, webhooks, pauses, agent keys. Send the admin key as X-API-Key.",
        &docs,
        "apiKey",
        serde_json::json!({"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}),
    )
}

/// The complete router with all layers.
pub fn router(state: AppState) -> Router {
    let redirect_path = state.config().redirect_path.clone();
    let document = std::sync::Arc::new(openapi(&redirect_path));
    let admin =
        mount(Router::new(), admin_routes()).route_layer(guard::Guard::admin(state.config()));
    let (guarded, open) = ops_routes();
    let ops = mount(Router::new(), guarded).route_layer(guard::Guard::network(state.config()));
    let ops = mount(ops, open).route(
        "/openapi.json",
        get(move || std::future::ready(axum::Json((*document).clone()))),
    );
    let public = mount(Router::new(), public_routes(&redirect_path));

    let max_body = state.config().max_body_bytes;
    Router::new()
        .merge(admin)
        .merge(ops)
        .merge(public)
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(RequestBodyLimitLayer::new(max_body))
        .layer(nexus_core::middleware::Edge)
        .with_state(state)
}
