//! The token API (SPEC §2, §4, §7): an agent gets a strategy plus usage
//! secrets, never a refresh token, client secret or other master secret.
//!
//! The serve path lives here: a trusted cached answer costs no database
//! access; otherwise one narrow read decides; a token inside its refresh
//! margin is refreshed first by the [`Refresher`] (`refresh.rs`, with its
//! worker and revocation). Around it: the answer cache and its invalidation
//! (`cache.rs`, and `edge.rs` for gateways), the kill switch (`pause.rs`),
//! scope reports (`scope.rs`), the issuance tally (`tally.rs`), the
//! schedule maths (`schedule.rs`) and the answer itself (`response.rs`).

pub mod cache;
pub mod edge;
pub mod error;
pub mod pause;
pub mod refresh;
pub mod response;
pub mod revoke;
pub mod schedule;
pub mod scope;
pub mod tally;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use crate::events::audit::AuditSink;
use crate::oauth::discovery::Discovery;
use crate::registry::profile::AuthType;
use crate::registry::Registry;
use crate::store::changes::Remote;
use crate::store::{now_ms, Change, Store, TokenStamp};
use crate::vault::KeyRing;
use cache::{Cached, TokenCache};
use edge::{EdgeEvent, EdgeFeed};
use nexus_core::wire::Issued as GatewayIssued;
use pause::Pauses;
use refresh::Mode;
use response::{finish, servable};
use schedule::{effective_margin, inside_margin};
use tally::Tally;

pub use error::{usable, TokenError};
pub use refresh::Refresher;
pub use response::TokenBody;
pub use schedule::RefreshSettings;

/// The token service: serves answers, keeps its cache honest, counts issuances.
pub struct Tokens {
    store: Store,
    registry: Registry,
    keys: Arc<KeyRing>,
    settings: RefreshSettings,
    cache: Arc<TokenCache>,
    pauses: Arc<Pauses>,
    /// What gateways' caches must drop (see [`edge`]).
    edge: Arc<EdgeFeed>,
    tally: Tally,
    audit: AuditSink,
    refresher: Arc<Refresher>,
}

impl Tokens {
    /// Builds the service and its refresh engine.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        registry: Registry,
        keys: Arc<KeyRing>,
        discovery: Arc<Discovery>,
        http: reqwest::Client,
        audit: AuditSink,
        settings: RefreshSettings,
        pauses: Arc<Pauses>,
    ) -> Self {
        let cache = Arc::new(TokenCache::new(
            settings.cache_capacity,
            settings.cache_max_age,
        ));
        let edge = Arc::new(EdgeFeed::new());
        pauses.announce_to(edge.clone());
        {
            // This process's own writes drop entries before they return, so
            // a read right after a write never sees the old response.
            let (cache, pauses, edge) = (cache.clone(), pauses.clone(), edge.clone());
            store.on_change(move |c| apply(&cache, &pauses, &edge, c.clone()));
        }
        let refresher = Arc::new(Refresher::new(
            store.clone(),
            registry.clone(),
            keys.clone(),
            discovery,
            http,
            audit.clone(),
            settings,
        ));
        Self {
            store,
            registry,
            keys,
            settings,
            cache,
            pauses,
            edge,
            tally: Tally::default(),
            audit,
            refresher,
        }
    }

    /// The refresh engine (worker, revocation).
    pub fn refresher(&self) -> &Arc<Refresher> {
        &self.refresher
    }

    /// The issuance pauses this service obeys.
    pub fn pauses(&self) -> &Arc<Pauses> {
        &self.pauses
    }

    /// The invalidations gateways' caches follow.
    pub fn edge(&self) -> &Arc<EdgeFeed> {
        &self.edge
    }

    /// Whether this replica hears every change now (a gateway may cache
    /// only while it does).
    pub fn hears_every_change(&self) -> bool {
        self.cache.is_listening()
    }

    /// Refreshes a connection now without issuing its token (a 401 report
    /// asks for this). Not subject to issuance pauses: refreshes go on.
    pub async fn refresh_now(&self, id: &str) -> Result<(), TokenError> {
        self.token_inner(id, true, false).await.map(|_| ())
    }

    /// The token response for a connection, refreshing first when the token
    /// is inside the margin (or always, with `force`).
    pub async fn token(&self, id: &str, force: bool) -> Result<TokenBody, TokenError> {
        let result = match self.pauses.operator() {
            Some(p) => Err(TokenError::Paused(p)),
            None => self.token_inner(id, force, true).await,
        };
        use nexus_core::static_counter;
        match &result {
            Ok(_) => static_counter!("nexus_token_fetches_total", "outcome" => "ok"),
            Err(TokenError::Paused(_)) => {
                static_counter!("nexus_token_fetches_total", "outcome" => "paused")
            }
            Err(TokenError::AttentionRequired(_)) => {
                static_counter!("nexus_token_fetches_total", "outcome" => "attention_required")
            }
            Err(TokenError::ProviderUnavailable(_)) => {
                static_counter!("nexus_token_fetches_total", "outcome" => "provider_unavailable")
            }
            Err(TokenError::NotFound) => {
                static_counter!("nexus_token_fetches_total", "outcome" => "not_found")
            }
            Err(_) => static_counter!("nexus_token_fetches_total", "outcome" => "refused"),
        }
        .increment(1);
        result
    }

    /// `issue`: serve a token (subject to workspace pauses, audited); without
    /// it, only make sure the connection is refreshed.
    async fn token_inner(
        &self,
        id: &str,
        force: bool,
        issue: bool,
    ) -> Result<TokenBody, TokenError> {
        let asked_at = now_ms();
        let paused = |ws: &str| match self.pauses.check(Some(ws)) {
            Some(p) if issue => Err(TokenError::Paused(p)),
            _ => Ok(()),
        };
        if !force {
            // Warm path: a trusted entry (invalidation live, checked within
            // max age) is served with no database access and no decryption.
            if let Some(hit) = self.cache.trusted(id) {
                paused(&hit.stamp.workspace_id)?;
                if servable(&self.settings, &hit.stamp) {
                    nexus_core::static_counter!("nexus_token_cache_total", "result" => "hit")
                        .increment(1);
                    return Ok(self.serve_cached(id, &hit));
                }
            }
            // Otherwise one narrow primary-key read decides.
            let stamp = self
                .store
                .token_stamp(id)
                .await?
                .ok_or(TokenError::NotFound)?;
            paused(&stamp.workspace_id)?;
            if servable(&self.settings, &stamp) {
                if let Some(hit) = self.cache.validate(id, &stamp) {
                    nexus_core::static_counter!("nexus_token_cache_total", "result" => "validated")
                        .increment(1);
                    return Ok(self.serve_cached(id, &hit));
                }
            }
            nexus_core::static_counter!("nexus_token_cache_total", "result" => "miss").increment(1);
        }
        let epoch = self.cache.epoch();
        let mut c = self
            .store
            .get_connection(id)
            .await?
            .ok_or(TokenError::NotFound)?;
        paused(&c.workspace_id)?;
        usable(&c)?;
        let provider = self.registry.get(&c.provider_id).await?;
        if provider.profile.auth_type == AuthType::Oauth2 {
            let due = inside_margin(&self.settings, c.expires_at, c.last_success_at, now_ms());
            if force || due {
                if c.refresh_token.is_some() {
                    let mode = if force { Mode::Forced } else { Mode::Due };
                    c = self
                        .refresher
                        .refresh(&provider, c, mode, asked_at, None)
                        .await?;
                    // Whatever the refresh saw, serve only a usable connection
                    // (it may have been revoked meanwhile, by any replica).
                    usable(&c)?;
                } else if c.expires_at.is_some_and(|e| e <= now_ms()) {
                    return Err(self.refresher.no_refresh_token(&c, &provider).await);
                }
                // No refresh token but still valid: serve it; nothing better exists.
            }
        }
        let body = response::build(&self.keys, &provider, &c)?;
        if !issue {
            return Ok(TokenBody::new(Vec::new()));
        }
        let cached = Cached::new(TokenStamp::of(&c, provider.row.version), &body);
        let mut served = finish(&cached.prefix, c.expires_at);
        let keep_ms = self.keep_for(&cached);
        // A gateway may keep only what this replica keeps too.
        if self.cache.put(&c.id, cached, epoch) {
            served.keep_ms = keep_ms;
        }
        self.tally.one(&c.id, &c.provider_id, &c.workspace_id);
        Ok(served)
    }

    fn serve_cached(&self, id: &str, hit: &Cached) -> TokenBody {
        self.tally
            .one(id, &hit.stamp.provider_id, &hit.stamp.workspace_id);
        let mut served = finish(&hit.prefix, hit.stamp.expires_at);
        served.keep_ms = self.keep_for(hit);
        served
    }

    /// How long a gateway may keep a response built from `entry`: while this
    /// replica itself would serve the entry unchecked, and never into the
    /// token's refresh margin (the broker would refresh it there).
    fn keep_for(&self, entry: &Cached) -> Option<i64> {
        let trust = self.cache.trust_left(entry)?;
        let st = &entry.stamp;
        let until_due = match st.expires_at {
            Some(e) => e - effective_margin(&self.settings, e, st.last_success_at) - now_ms(),
            None => i64::MAX,
        };
        let keep = trust.min(until_due);
        (keep > 0).then_some(keep)
    }

    /// Keeps the token cache in step with other replicas: on PostgreSQL,
    /// drops entries as their changes are announced and marks the cache
    /// trusted only while no announcement can be missed (runs until aborted).
    /// On SQLite, where this process's own changes are all, it marks the
    /// cache trusted and returns.
    pub async fn run_invalidation(self: Arc<Self>) {
        // This process's own changes are applied by the store hook
        // registered in `new`, before the writing call returns.
        if !self.store.has_remote_changes() {
            // SQLite: one process serves the file; its own changes are all.
            self.cache.set_listening(true);
            return;
        }
        loop {
            let mut remote = match self.store.listen_remote().await {
                Ok(Some(l)) => l,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for changes; token cache validates every request");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            self.cache.set_listening(true);
            while let Remote::Changed(change) = remote.next().await {
                self.apply(change);
            }
            self.cache.set_listening(false);
            self.edge.announce(EdgeEvent::Lost);
            metrics::counter!("nexus_token_cache_listener_lost_total").increment(1);
            tracing::warn!(
                "change notifications lost; token cache cleared and validating until they are back"
            );
        }
    }

    /// How many token responses this replica holds in memory.
    pub fn cached_responses(&self) -> usize {
        self.cache.len()
    }

    fn apply(&self, change: Change) {
        apply(&self.cache, &self.pauses, &self.edge, change)
    }

    /// Counts issuances a gateway served from its cache (`POST
    /// /tokens/issued`); they are audited with this replica's own. Unknown
    /// connections are skipped. Returns how many entries were taken.
    pub async fn record_gateway_issued(
        &self,
        served: &[GatewayIssued],
    ) -> Result<usize, TokenError> {
        let mut taken = 0;
        for g in served {
            let stamp = match self.cache.peek_stamp(&g.connection_id) {
                Some(s) => s,
                None => match self.store.token_stamp(&g.connection_id).await? {
                    Some(s) => s,
                    None => continue,
                },
            };
            self.tally.add(
                &g.connection_id,
                &stamp.provider_id,
                &stamp.workspace_id,
                g.count,
                g.first_at,
                g.last_at,
            );
            taken += 1;
        }
        Ok(taken)
    }

    /// Writes the issuances counted so far as `token.issued` audit events
    /// (through the batching writer). Called every second by the server and
    /// once more at shutdown, before the audit writer is flushed.
    pub async fn flush_issued(&self) {
        self.tally.flush(&self.audit).await;
    }
}

/// Drops what a change makes stale, here and in gateways' caches.
fn apply(cache: &TokenCache, pauses: &Pauses, edge: &EdgeFeed, change: Change) {
    match change {
        Change::Connection(id) => {
            cache.forget(&id);
            edge.announce(EdgeEvent::Connection(id.into()));
        }
        Change::Provider(id) => {
            cache.forget_provider(&id);
            edge.announce(EdgeEvent::All);
        }
        // Pauses announce to gateways themselves, once reloaded: until then
        // this replica would serve (and let gateways keep) unpaused answers.
        Change::Pauses => pauses.changed(),
    }
}
