//! The token API and the refresh engine (SPEC §2, §4, §7).
//!
//! An agent gets a strategy plus usage secrets, never a refresh token, client
//! secret or other master secret. Tokens are refreshed ahead of expiry by a
//! background worker (`next_refresh_at` = expiry − margin − jitter), and on
//! demand when a request finds a token inside the margin.
//!
//! One refresh per connection at a time: in this process, callers of the same
//! connection queue on one lock and the later ones take the result of a
//! refresh that finished after they asked; across replicas, a lease
//! (`lease_owner`, `lease_until`) is taken first, and a replica that finds the
//! lease held waits for the holder's result. A crashed holder's lease expires.
//! Rotated refresh tokens are written with a version check before the new
//! access token is served. `invalid_grant` and providers' equivalents move the
//! connection to `attention_required`; transient faults never do: they are
//! retried with capped exponential backoff and full jitter (honouring
//! `Retry-After`), and a still-valid token keeps being served meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::audit::{AuditEvent, AuditSink};
use crate::discovery::Discovery;
use crate::edge::{EdgeEvent, EdgeFeed};
use crate::handshake::{json_list, parse_list, parse_token_response, token_request};
use crate::pause::Pauses;
use crate::profile::AuthType;
use crate::registry::{Provider, Registry, RegistryError};
use crate::store::changes::Remote;
use crate::store::{
    now_ms, rfc3339, Change, ConnectionRow, PauseRow, Refreshed, Store, StoreError, TokenStamp,
    Transition,
};
use crate::strategy::StrategyKind;
use crate::token_cache::{Cached, TokenCache};
use crate::vault::{Aad, KeyRing};
use nexus_core::backoff::{full_jitter, random_below};
use nexus_core::outbound;
use nexus_core::wire::{complete, Issued as GatewayIssued};
use nexus_core::Secret;

/// Tuning of the token service and the refresh engine.
#[derive(Debug, Clone, Copy)]
pub struct RefreshSettings {
    /// Refresh this long before expiry.
    pub margin: Duration,
    /// Up to this much earlier again, at random, so tokens issued together
    /// are not refreshed together.
    pub jitter: Duration,
    /// Decrypted token responses kept in memory (0 disables the cache).
    pub cache_capacity: usize,
    /// Longest time a cached response is served without checking the
    /// database, while change notifications are being received.
    pub cache_max_age: Duration,
    /// How long a refresh lease lasts (a crashed holder blocks at most this long).
    pub lease: Duration,
    /// Refresh interval for tokens without an expiry (keeps refresh tokens alive).
    pub keepalive: Duration,
    /// First retry delay after a transient failure (doubles, with full jitter).
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_cap: Duration,
    /// How often the worker looks for due connections.
    pub tick: Duration,
    /// Connections claimed per batch.
    pub batch: i64,
    /// Refreshes in flight at once in the worker.
    pub concurrency: usize,
    /// Whether this replica runs the background worker.
    pub worker: bool,
}

impl Default for RefreshSettings {
    fn default() -> Self {
        Self {
            margin: Duration::from_secs(300),
            jitter: Duration::from_secs(60),
            cache_capacity: 10_000,
            cache_max_age: Duration::from_secs(1),
            lease: Duration::from_secs(30),
            keepalive: Duration::from_secs(24 * 3600),
            backoff_base: Duration::from_secs(10),
            backoff_cap: Duration::from_secs(900),
            tick: Duration::from_secs(1),
            batch: 100,
            concurrency: 32,
            worker: true,
        }
    }
}

/// The refresh margin (ms) of a token issued at `issued_at`: the configured
/// margin, but at most half the token's lifetime. Without the cap, a provider
/// issuing 5-minute tokens under a 5-minute margin would see a refresh on
/// every request.
pub fn effective_margin(s: &RefreshSettings, expires_at: i64, issued_at: Option<i64>) -> i64 {
    let margin = s.margin.as_millis() as i64;
    match issued_at {
        Some(i) if expires_at > i => margin.min((expires_at - i) / 2),
        _ => margin,
    }
}

/// Whether a token is inside its refresh margin at `now`.
pub fn inside_margin(
    s: &RefreshSettings,
    expires_at: Option<i64>,
    issued_at: Option<i64>,
    now: i64,
) -> bool {
    expires_at.is_some_and(|e| e - now < effective_margin(s, e, issued_at))
}

/// When the worker should next refresh a token issued now and expiring at
/// `expires_at`: the effective margin before expiry, minus a random share of
/// `jitter` (at most half that margin) so tokens issued together do not
/// refresh together. Without an expiry, a keep-alive refresh. Without a
/// refresh token, never.
pub fn next_refresh_at(
    s: &RefreshSettings,
    expires_at: Option<i64>,
    has_refresh_token: bool,
) -> Option<i64> {
    if !has_refresh_token {
        return None;
    }
    let now = now_ms();
    Some(match expires_at {
        Some(e) => {
            let margin = effective_margin(s, e, Some(now));
            let jitter = (s.jitter.as_millis() as i64).min(margin / 2);
            e - margin - random_below(jitter as u64) as i64
        }
        None => now + s.keepalive.as_millis() as i64,
    })
}

/// Delay before retry `attempt` (1-based): full jitter over a capped
/// exponential, never shorter than `Retry-After`.
pub fn backoff(s: &RefreshSettings, attempt: i64, retry_after: Option<Duration>) -> Duration {
    let jittered = full_jitter(s.backoff_base, s.backoff_cap, attempt).max(Duration::from_secs(1));
    retry_after.map_or(jittered, |r| jittered.max(r))
}

/// Why no token is served.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// No such connection.
    #[error("connection not found")]
    NotFound,
    /// Consent not finished.
    #[error("the connection is waiting for consent")]
    Pending,
    /// A person must re-consent.
    #[error("{0}")]
    AttentionRequired(String),
    /// Disconnected.
    #[error("the connection was revoked")]
    Revoked,
    /// The handshake failed.
    #[error("the connection's handshake failed")]
    Failed,
    /// The provider could not refresh and the current token has expired.
    #[error("{0}")]
    ProviderUnavailable(String),
    /// The connection has no credentials to serve.
    #[error("{0}")]
    Unusable(String),
    /// Issuance is paused (kill switch), operator-wide or for the workspace.
    #[error("token issuance is paused: {}", .0.reason)]
    Paused(PauseRow),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<RegistryError> for TokenError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound => {
                TokenError::Unusable("the connection's provider was deleted".into())
            }
            RegistryError::Store(s) => TokenError::Store(s),
            other => TokenError::Unusable(other.to_string()),
        }
    }
}

/// Who asks for a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A token request found the token inside the margin.
    Due,
    /// `POST /connections/{id}/refresh`.
    Forced,
    /// The background worker (it already holds the lease).
    Scheduled,
}

/// What a call to the token endpoint concluded.
enum Outcome {
    Refreshed(Box<ConnectionRow>),
    /// The grant is gone: a person must re-consent.
    Revoked(String, String),
    /// The provider refused our client (integration fault, not the user's).
    ClientRejected(String),
    /// Try again later (with the provider's Retry-After, if any).
    Transient(String, Option<Duration>),
}

/// Error codes by which providers say "this refresh token is dead".
const GRANT_GONE: &[&str] = &[
    "invalid_grant",
    "invalid_refresh_token",
    "bad_refresh_token",
    "token_revoked",
    "refresh_token_expired",
];

/// Token service and refresh engine.
pub struct Tokens {
    pub(crate) store: Store,
    pub(crate) registry: Registry,
    pub(crate) keys: Arc<KeyRing>,
    pub(crate) discovery: Arc<Discovery>,
    pub(crate) http: reqwest::Client,
    audit: AuditSink,
    pub(crate) settings: RefreshSettings,
    /// Lease owner id of this process.
    owner: String,
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    cache: Arc<TokenCache>,
    pauses: Arc<Pauses>,
    /// What gateways' caches must drop (see [`crate::edge`]).
    edge: Arc<EdgeFeed>,
    /// Tokens issued since the last audit flush, by connection.
    issued: Mutex<HashMap<String, Issued>>,
    /// When each provider's last `provider.unhealthy` webhook went out: one
    /// per provider per [`UNHEALTHY_EVERY`], not one per connection refreshed.
    unhealthy_sent: Mutex<HashMap<String, Instant>>,
}

/// Issuances of one connection since the last audit flush.
struct Issued {
    provider_id: String,
    workspace_id: String,
    count: u64,
    first_at: i64,
    last_at: i64,
}

/// Least time between two `provider.unhealthy` webhooks for one provider (per replica).
const UNHEALTHY_EVERY: Duration = Duration::from_secs(900);

impl Tokens {
    /// Builds the service.
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
        let owner = format!("broker-{}", uuid::Uuid::new_v4().simple());
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
        Self {
            store,
            registry,
            keys,
            discovery,
            http,
            audit,
            settings,
            owner,
            inflight: Mutex::new(HashMap::new()),
            cache,
            pauses,
            edge,
            unhealthy_sent: Mutex::new(HashMap::new()),
            issued: Mutex::new(HashMap::new()),
        }
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
    pub async fn refresh_now(self: &Arc<Self>, id: &str) -> Result<(), TokenError> {
        self.token_inner(id, true, false).await.map(|_| ())
    }

    /// The token response for a connection, refreshing first when the token
    /// is inside the margin (or always, with `force`).
    pub async fn token(self: &Arc<Self>, id: &str, force: bool) -> Result<TokenBody, TokenError> {
        let result = match self.pauses.operator() {
            Some(p) => Err(TokenError::Paused(p)),
            None => self.token_inner(id, force, true).await,
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(TokenError::Paused(_)) => "paused",
            Err(TokenError::AttentionRequired(_)) => "attention_required",
            Err(TokenError::ProviderUnavailable(_)) => "provider_unavailable",
            Err(TokenError::NotFound) => "not_found",
            Err(_) => "refused",
        };
        metrics::counter!("nexus_token_fetches_total", "outcome" => outcome).increment(1);
        result
    }

    /// `issue`: serve a token (subject to workspace pauses, audited); without
    /// it, only make sure the connection is refreshed.
    async fn token_inner(
        self: &Arc<Self>,
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
                    metrics::counter!("nexus_token_cache_total", "result" => "hit").increment(1);
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
                    metrics::counter!("nexus_token_cache_total", "result" => "validated")
                        .increment(1);
                    return Ok(self.serve_cached(id, &hit));
                }
            }
            metrics::counter!("nexus_token_cache_total", "result" => "miss").increment(1);
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
                    c = self.refresh(&provider, c, mode, asked_at, None).await?;
                    // Whatever the refresh saw, serve only a usable connection
                    // (it may have been revoked meanwhile, by any replica).
                    usable(&c)?;
                } else if c.expires_at.is_some_and(|e| e <= now_ms()) {
                    return Err(self.no_refresh_token(&c, &provider).await);
                }
                // No refresh token but still valid: serve it; nothing better exists.
            }
        }
        let body = self.response(&provider, &c)?;
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
        self.audit_issued(&c.id, &c.provider_id, &c.workspace_id);
        Ok(served)
    }

    /// The token expired and there is no refresh token: the connection needs
    /// a person. Recorded (and audited) as a transition, not only answered.
    async fn no_refresh_token(&self, c: &ConnectionRow, provider: &Provider) -> TokenError {
        let description = "the access token expired and the provider issued no refresh token; re-consent is needed";
        let ev = attention(
            c,
            provider,
            "no_refresh_token",
            json!({"cause": "expired_without_refresh_token"}),
        );
        match self
            .store
            .record_refresh_failure(
                &c.id,
                c.version,
                &self.attempt_owner(),
                "no_refresh_token",
                description,
                None,
                Some(&ev),
            )
            .await
        {
            Ok(true) => TokenError::AttentionRequired(description.into()),
            Ok(false) => TokenError::ProviderUnavailable(
                "the connection changed while it was read; retry".into(),
            ),
            Err(e) => e.into(),
        }
    }

    fn serve_cached(&self, id: &str, hit: &Cached) -> TokenBody {
        self.audit_issued(id, &hit.stamp.provider_id, &hit.stamp.workspace_id);
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

    /// Records a `provider.unhealthy` audit event; at most once per provider
    /// per [`UNHEALTHY_EVERY`] it also goes out as a webhook (one broken
    /// client would otherwise announce itself once per connection).
    async fn provider_unhealthy(&self, provider: &Provider, audit: AuditEvent) {
        let announce = {
            let mut sent = self
                .unhealthy_sent
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let due = sent
                .get(&provider.row.id)
                .is_none_or(|t| t.elapsed() >= UNHEALTHY_EVERY);
            if due {
                sent.insert(provider.row.id.clone(), Instant::now());
            }
            due
        };
        if !announce {
            if let Err(e) = self.audit.record(audit).await {
                tracing::error!(error = %e, "provider.unhealthy audit event not recorded");
            }
            return;
        }
        let t = Transition {
            audit,
            event: Some(crate::webhook::provider_event(
                &provider.row.id,
                &provider.profile.name,
                "invalid_client",
            )),
        };
        if let Err(e) = self.store.record_transition(&t).await {
            tracing::error!(error = %e, "provider.unhealthy event not recorded");
        }
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
            self.count_issued(
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

    /// Counts an issued token. Issuances are audited per connection per
    /// [`Tokens::flush_issued`] period (one `token.issued` event with the
    /// count and the first and last time), not one row per fetch: at
    /// thousands of fetches a second the audit log would otherwise be mostly
    /// identical rows, and writing them the largest cost of a fetch.
    fn audit_issued(&self, id: &str, provider_id: &str, workspace_id: &str) {
        let now = now_ms();
        self.count_issued(id, provider_id, workspace_id, 1, now, now);
    }

    /// Adds `count` issuances between `first_at` and `last_at` to a
    /// connection's tally for the next flush.
    fn count_issued(
        &self,
        id: &str,
        provider_id: &str,
        workspace_id: &str,
        count: u64,
        first_at: i64,
        last_at: i64,
    ) {
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        match issued.get_mut(id) {
            Some(n) => {
                n.count += count;
                n.first_at = n.first_at.min(first_at);
                n.last_at = n.last_at.max(last_at);
            }
            None => {
                issued.insert(
                    id.to_string(),
                    Issued {
                        provider_id: provider_id.to_string(),
                        workspace_id: workspace_id.to_string(),
                        count,
                        first_at,
                        last_at,
                    },
                );
            }
        }
    }

    /// Writes the issuances counted so far as `token.issued` audit events
    /// (through the batching writer). Called every second by the server and
    /// once more at shutdown, before the audit writer is flushed.
    pub async fn flush_issued(&self) {
        let drained = std::mem::take(&mut *self.issued.lock().unwrap_or_else(|e| e.into_inner()));
        for (id, n) in drained {
            let mut ev = AuditEvent::new("token.issued")
                .actor("agent")
                .provider(n.provider_id)
                .connection(id)
                .workspace(n.workspace_id)
                .detail(json!({"count": n.count, "first_at": rfc3339(n.first_at), "last_at": rfc3339(n.last_at)}));
            ev.occurred_at_ms = n.first_at;
            if let Err(e) = self.audit.record(ev).await {
                tracing::error!(error = %e, "token audit event not recorded");
            }
        }
    }

    /// A lease owner id for one refresh attempt (or one worker batch): a lease
    /// is only ever extended or released by the attempt that took it.
    fn attempt_owner(&self) -> String {
        format!("{}.{}", self.owner, uuid::Uuid::new_v4().simple())
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(id.to_string()).or_default().clone()
    }

    fn release(&self, id: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut map = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map and this caller hold it: nobody is waiting, drop the entry.
        if Arc::strong_count(&lock) <= 2 {
            map.remove(id);
        }
    }

    /// Refreshes under the in-process lock and the database lease. Runs in its
    /// own task: a caller going away (client disconnect, worker shutdown) must
    /// not cancel a refresh between the provider rotating the refresh token
    /// and the new one being stored, or the connection would be left holding
    /// a dead refresh token.
    async fn refresh(
        self: &Arc<Self>,
        provider: &Provider,
        seen: ConnectionRow,
        mode: Mode,
        asked_at: i64,
        claim_owner: Option<String>,
    ) -> Result<ConnectionRow, TokenError> {
        let me = self.clone();
        let provider = provider.clone();
        let task = tokio::spawn(async move {
            let id = seen.id.clone();
            let lock = me.lock_for(&id);
            let result = {
                let _guard = lock.lock().await;
                let owner = claim_owner.unwrap_or_else(|| me.attempt_owner());
                me.refresh_locked(&provider, seen, mode, asked_at, &owner)
                    .await
            };
            me.release(&id, lock);
            result
        });
        task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "refresh task failed");
            Err(TokenError::ProviderUnavailable(
                "the refresh did not complete; retry".into(),
            ))
        })
    }

    async fn refresh_locked(
        &self,
        provider: &Provider,
        seen: ConnectionRow,
        mode: Mode,
        asked_at: i64,
        owner: &str,
    ) -> Result<ConnectionRow, TokenError> {
        // Someone may have refreshed while we waited: re-read, and take the
        // result of any refresh that finished after this caller asked (so
        // concurrent forced refreshes coalesce too).
        let c = self
            .store
            .get_connection(&seen.id)
            .await?
            .ok_or(TokenError::NotFound)?;
        if let Err(e) = usable(&c) {
            self.store.release_lease(&c.id, owner).await?;
            return Err(e);
        }
        let now = now_ms();
        let refreshed_since = c.last_success_at.is_some_and(|t| t >= asked_at);
        let moved = c.version != seen.version && refreshed_since;
        let fresh = !inside_margin(&self.settings, c.expires_at, c.last_success_at, now);
        let done = match mode {
            Mode::Forced => moved,
            Mode::Due => fresh || moved,
            // The schedule decides (it includes the jitter, so the token may
            // still look fresh); a peer's refresh moves the schedule ahead.
            Mode::Scheduled => c.next_refresh_at.is_none_or(|t| t > now),
        };
        if done {
            self.store.release_lease(&c.id, owner).await?;
            return Ok(c);
        }
        // Cooldown: after a failure, requests wait for the scheduled retry
        // instead of calling the provider again (no refresh storms).
        if mode != Mode::Scheduled
            && c.consecutive_failures > 0
            && c.next_refresh_at.is_some_and(|t| t > now)
        {
            return serve_or_unavailable(c, "the provider failed recently; a retry is scheduled");
        }
        let c = match self.take_lease(c, owner).await? {
            Leased::Mine(c) => *c,
            Leased::Theirs(before, row) => return theirs(&before, *row),
        };
        let started = Instant::now();
        let outcome = self.call_provider(provider, &c, owner).await;
        metrics::histogram!("nexus_refresh_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match outcome {
            Outcome::Refreshed(row) => {
                metrics::counter!("nexus_refreshes_total", "outcome" => "success").increment(1);
                Ok(*row)
            }
            Outcome::Revoked(code, description) => {
                metrics::counter!("nexus_refreshes_total", "outcome" => "attention_required")
                    .increment(1);
                let ev = attention(
                    &c,
                    provider,
                    &code,
                    json!({"cause": "refresh_rejected", "error": code}),
                );
                let recorded = self
                    .store
                    .record_refresh_failure(
                        &c.id,
                        c.version,
                        owner,
                        &code,
                        &description,
                        None,
                        Some(&ev),
                    )
                    .await?;
                if !recorded {
                    // The row moved under us (a peer took over an expired
                    // lease, or the connection was revoked): its state wins.
                    let row = self
                        .store
                        .get_connection(&c.id)
                        .await?
                        .ok_or(TokenError::NotFound)?;
                    return theirs(&c, row);
                }
                Err(TokenError::AttentionRequired(format!(
                    "the provider rejected the refresh ({code}); re-consent is needed"
                )))
            }
            Outcome::ClientRejected(description) => {
                metrics::counter!("nexus_refreshes_total", "outcome" => "invalid_client")
                    .increment(1);
                metrics::counter!("nexus_provider_unhealthy_total", "provider" => provider.profile.name.clone()).increment(1);
                let ev = AuditEvent::new("provider.unhealthy")
                    .actor("system")
                    .provider(c.provider_id.clone())
                    .connection(c.id.clone())
                    .detail(json!({"cause": "invalid_client", "description": description}));
                self.provider_unhealthy(provider, ev).await;
                self.transient(c, owner, "invalid_client", &description, None)
                    .await
            }
            Outcome::Transient(description, retry_after) => {
                metrics::counter!("nexus_refreshes_total", "outcome" => "transient").increment(1);
                self.transient(c, owner, "provider_unavailable", &description, retry_after)
                    .await
            }
        }
    }

    /// Takes the connection's lease, or waits for the replica holding it and
    /// returns what that replica stored. An expired lease is taken over.
    async fn take_lease(&self, c: ConnectionRow, owner: &str) -> Result<Leased, TokenError> {
        let lease_ms = self.settings.lease.as_millis() as i64;
        let deadline = Instant::now() + self.settings.lease + Duration::from_secs(1);
        loop {
            if self
                .store
                .try_lease(&c.id, owner, now_ms() + lease_ms)
                .await?
            {
                // Leased: re-read, another replica may have finished (or
                // failed) just before; then its result stands.
                let now = self
                    .store
                    .get_connection(&c.id)
                    .await?
                    .ok_or(TokenError::NotFound)?;
                if changed(&c, &now) {
                    self.store.release_lease(&c.id, owner).await?;
                    return Ok(Leased::Theirs(Box::new(c), Box::new(now)));
                }
                return Ok(Leased::Mine(Box::new(now)));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let row = self
                .store
                .get_connection(&c.id)
                .await?
                .ok_or(TokenError::NotFound)?;
            if changed(&c, &row) {
                metrics::counter!("nexus_refresh_waited_for_peer_total").increment(1);
                return Ok(Leased::Theirs(Box::new(c), Box::new(row)));
            }
            if Instant::now() > deadline {
                return serve_or_unavailable(c, "another broker holds the refresh lease")
                    .map(|c| Leased::Theirs(Box::new(c.clone()), Box::new(c)));
            }
        }
    }

    /// A failed refresh that is not the user's doing: schedule a retry with
    /// backoff, and keep serving the current token while it is still valid.
    async fn transient(
        &self,
        c: ConnectionRow,
        owner: &str,
        code: &str,
        description: &str,
        retry_after: Option<Duration>,
    ) -> Result<ConnectionRow, TokenError> {
        let delay = backoff(&self.settings, c.consecutive_failures + 1, retry_after);
        tracing::warn!(connection_id = %c.id, error = code, description, retry_in_ms = delay.as_millis() as u64, "refresh failed");
        let retry_at = now_ms() + delay.as_millis() as i64;
        self.store
            .record_refresh_failure(
                &c.id,
                c.version,
                owner,
                code,
                description,
                Some(retry_at),
                None,
            )
            .await?;
        serve_or_unavailable(c, description)
    }

    async fn call_provider(&self, provider: &Provider, c: &ConnectionRow, owner: &str) -> Outcome {
        let endpoints = match self.discovery.endpoints(&provider.profile).await {
            Ok(e) => e,
            Err(e) => return Outcome::Transient(e.to_string(), None),
        };
        let refresh_token = match c.refresh_token.as_deref().map(|env| {
            self.keys
                .decrypt_str(Aad::new("connections", &c.id, "refresh_token"), env)
        }) {
            Some(Ok(rt)) => rt,
            Some(Err(e)) => {
                return Outcome::Transient(format!("stored refresh token unreadable: {e}"), None)
            }
            None => {
                return Outcome::Revoked(
                    "no_refresh_token".into(),
                    "no refresh token stored".into(),
                )
            }
        };
        let secret = match self.registry.client_secret(provider) {
            Ok(s) => s,
            Err(e) => return Outcome::Transient(e.to_string(), None),
        };
        let form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose().as_str()),
        ];
        let req = token_request(
            &self.http,
            &endpoints.token,
            provider,
            secret.as_ref(),
            form,
        );
        let fetched = match outbound::send(req).await {
            Ok(f) => f,
            Err(e) => return Outcome::Transient(e.to_string(), None),
        };
        let retry_after = fetched
            .header("retry-after")
            .and_then(|v| v.trim().parse::<u64>().ok())
            // A provider asking for more than an hour gets an hour: the
            // connection must not be parked for days by one header.
            .map(|secs| Duration::from_secs(secs.min(3600)));
        let body: Option<Map<String, Value>> = serde_json::from_slice(&fetched.body).ok();
        let error = body
            .as_ref()
            .and_then(|b| b.get("error"))
            .and_then(Value::as_str)
            .map(str::to_string);
        if let Some(code) = &error {
            if GRANT_GONE.contains(&code.as_str()) {
                return Outcome::Revoked(code.clone(), format!("token endpoint answered {code}"));
            }
            if code == "invalid_client" || code == "unauthorized_client" {
                return Outcome::ClientRejected(format!("token endpoint answered {code}"));
            }
        }
        let tokens = match parse_token_response(fetched.status, &fetched.body) {
            Ok(t) => t,
            Err(f) => return Outcome::Transient(f.description, retry_after),
        };
        let granted = match &tokens.scope {
            Some(s) => json_list(&s.split_whitespace().map(str::to_string).collect::<Vec<_>>()),
            None => c.granted_scopes.clone(),
        };
        let expires_at = tokens.expires_in.map(|s| now_ms() + s * 1000);
        let refreshed = Refreshed {
            access_token: self.keys.encrypt_str(
                Aad::new("connections", &c.id, "access_token"),
                &tokens.access_token,
            ),
            // A response without a refresh token keeps the stored one.
            refresh_token: tokens.refresh_token.as_ref().map(|rt| {
                self.keys
                    .encrypt_str(Aad::new("connections", &c.id, "refresh_token"), rt)
            }),
            token_type: tokens.token_type.clone(),
            expires_at,
            granted_scopes: granted,
            next_refresh_at: next_refresh_at(&self.settings, expires_at, true),
        };
        match self.store.store_refresh(&c.id, c.version, &refreshed).await {
            Ok(true) => {}
            // Someone stored first (it cannot normally happen under the lease): serve theirs.
            Ok(false) => {
                metrics::counter!("nexus_refresh_races_lost_total").increment(1);
                if let Err(e) = self.store.release_lease(&c.id, owner).await {
                    return Outcome::Transient(e.to_string(), None);
                }
            }
            Err(e) => {
                return Outcome::Transient(
                    format!("refreshed tokens could not be stored: {e}"),
                    None,
                )
            }
        }
        match self.store.get_connection(&c.id).await {
            Ok(Some(row)) => Outcome::Refreshed(Box::new(row)),
            Ok(None) => Outcome::Transient("connection disappeared".into(), None),
            Err(e) => Outcome::Transient(e.to_string(), None),
        }
    }

    /// Refreshes one connection the worker has claimed (leased to `owner`).
    /// Whatever happens, the connection leaves the due set: either the
    /// attempt moved its schedule, or it is deferred by a backoff, so the
    /// worker never spins on a connection it cannot refresh.
    async fn refresh_claimed(self: &Arc<Self>, id: &str, owner: String) -> Result<(), TokenError> {
        let result = self.refresh_claimed_inner(id, owner.clone()).await;
        let attempt = match self.store.get_connection(id).await {
            Ok(Some(c)) => c.consecutive_failures + 1,
            _ => 1,
        };
        let retry_at = now_ms() + backoff(&self.settings, attempt, None).as_millis() as i64;
        if self
            .store
            .defer_if_due(id, &owner, now_ms(), retry_at)
            .await?
        {
            tracing::warn!(connection_id = %id, "scheduled refresh deferred without a result");
        }
        result
    }

    async fn refresh_claimed_inner(
        self: &Arc<Self>,
        id: &str,
        owner: String,
    ) -> Result<(), TokenError> {
        let c = self
            .store
            .get_connection(id)
            .await?
            .ok_or(TokenError::NotFound)?;
        let provider = match self.registry.get(&c.provider_id).await {
            Ok(p) => p,
            Err(RegistryError::NotFound) => {
                // Nothing to refresh against until someone reconnects it to a
                // provider: stop scheduling it, and say why on the connection.
                self.store
                    .record_refresh_failure(
                        id,
                        c.version,
                        &owner,
                        "provider_deleted",
                        "the connection's provider was deleted",
                        None,
                        None,
                    )
                    .await?;
                return Err(TokenError::Unusable(
                    "the connection's provider was deleted".into(),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        if provider.profile.auth_type != AuthType::Oauth2 {
            self.store.release_lease(id, &owner).await?;
            return Ok(());
        }
        self.refresh(&provider, c, Mode::Scheduled, now_ms(), Some(owner))
            .await
            .map(|_| ())
    }

    /// The background worker: every tick, claims due connections in batches
    /// (memory stays flat however many there are) and refreshes them with
    /// bounded concurrency. When `stop` turns true (or its sender is
    /// dropped) it finishes the batch in hand and returns, so no refresh is
    /// cut off midway.
    pub async fn run_worker(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_gauge = Instant::now() - Duration::from_secs(3600);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
            }
            if last_gauge.elapsed() >= Duration::from_secs(15) {
                last_gauge = Instant::now();
                if let Ok(counts) = self.store.count_by_status().await {
                    for (status, n) in counts {
                        metrics::gauge!("nexus_connections", "status" => status).set(n as f64);
                    }
                }
            }
            while !*stop.borrow() {
                let owner = self.attempt_owner();
                let until = now_ms() + self.settings.lease.as_millis() as i64;
                let ids = match self
                    .store
                    .claim_due(&owner, until, self.settings.batch)
                    .await
                {
                    Ok(ids) => ids,
                    Err(e) => {
                        tracing::warn!(error = %e, "refresh worker cannot claim due connections");
                        break;
                    }
                };
                if ids.is_empty() {
                    break;
                }
                let full = ids.len() as i64 >= self.settings.batch;
                let me = self.clone();
                crate::batch::run_bounded(ids, self.settings.concurrency, move |id: String| {
                    let (me, owner) = (me.clone(), owner.clone());
                    async move {
                        if let Err(e) = me.refresh_claimed(&id, owner).await {
                            tracing::debug!(connection_id = %id, error = %e, "scheduled refresh did not succeed");
                        }
                    }
                })
                .await;
                if !full {
                    break;
                }
            }
        }
    }

    /// The token response, without `expires_in` (see [`finish`]).
    fn response(
        &self,
        provider: &Provider,
        c: &ConnectionRow,
    ) -> Result<Map<String, Value>, TokenError> {
        let open = |column: &str, env: &str| -> Result<Secret<String>, TokenError> {
            self.keys
                .decrypt_str(Aad::new("connections", &c.id, column), env)
                .map_err(|e| TokenError::Store(StoreError::Vault(e)))
        };
        let strategy = &provider.strategy;
        let mut out = Map::new();
        let credentials = if strategy.kind == StrategyKind::Oauth2 {
            let env = c
                .access_token
                .as_deref()
                .ok_or_else(|| TokenError::Unusable("the connection has no access token".into()))?;
            let at = open("access_token", env)?;
            out.insert("access_token".into(), json!(at.expose()));
            out.insert(
                "token_type".into(),
                json!(c.token_type.clone().unwrap_or_else(|| "Bearer".into())),
            );
            if let Some(idt) = c.id_token.as_deref() {
                out.insert("id_token".into(), json!(open("id_token", idt)?.expose()));
            }
            json!({"access_token": at.expose()})
        } else {
            let env = c.credentials.as_deref().ok_or_else(|| {
                TokenError::Unusable("the connection has no stored credentials".into())
            })?;
            let all: Map<String, Value> = serde_json::from_str(open("credentials", env)?.expose())
                .map_err(|_| TokenError::Unusable("stored credentials are unreadable".into()))?;
            // Only the fields the strategy applies: never other captured secrets.
            let cfg = |k: &str| {
                strategy
                    .config
                    .get(k)
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            let wanted: Vec<String> = match strategy.kind {
                StrategyKind::Header | StrategyKind::QueryParam | StrategyKind::HmacPayload => {
                    cfg("credential_field").into_iter().collect()
                }
                StrategyKind::BasicAuth => [cfg("username_field"), cfg("password_field")]
                    .into_iter()
                    .flatten()
                    .collect(),
                StrategyKind::AwsSigv4 => vec![
                    "access_key".into(),
                    "secret_key".into(),
                    "session_token".into(),
                ],
                StrategyKind::Oauth2 => Vec::new(),
            };
            Value::Object(
                wanted
                    .into_iter()
                    .filter_map(|k| all.get(&k).cloned().map(|v| (k, v)))
                    .collect(),
            )
        };
        out.insert("expires_at".into(), json!(c.expires_at.map(rfc3339)));
        out.insert(
            "scope".into(),
            json!(parse_list(&c.granted_scopes).join(" ")),
        );
        out.insert("strategy".into(), json!(strategy));
        out.insert("credentials".into(), credentials);
        out.insert("provider".into(), json!(provider.profile.name));
        out.insert("connection_id".into(), json!(c.id));
        out.insert("status".into(), json!(c.status));
        out.insert("degraded".into(), json!(c.status == "degraded"));
        out.insert(
            "failing_scopes".into(),
            json!(parse_list(&c.failing_scopes)),
        );
        Ok(out)
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

/// A token response: JSON text holding usage secrets (redacted in Debug).
#[derive(Debug)]
pub struct TokenBody {
    /// The JSON text.
    pub body: Secret<Vec<u8>>,
    /// How long a gateway may keep it (ms); see [`crate::edge`].
    pub keep_ms: Option<i64>,
    /// When the token expires (unix ms).
    pub expires_at: Option<i64>,
}

impl TokenBody {
    fn new(body: Vec<u8>) -> Self {
        Self {
            body: Secret::new(body),
            keep_ms: None,
            expires_at: None,
        }
    }

    /// The response as a JSON value.
    pub fn json(&self) -> Value {
        serde_json::from_slice(self.body.expose()).unwrap_or(Value::Null)
    }
}

/// Completes a (possibly cached) response with the seconds left at serve time.
fn finish(prefix: &Secret<Vec<u8>>, expires_at: Option<i64>) -> TokenBody {
    TokenBody {
        expires_at,
        ..TokenBody::new(complete(prefix.expose(), expires_at, now_ms()))
    }
}

/// The result of trying to take a lease.
enum Leased {
    /// This attempt holds it; the row as re-read after taking it.
    Mine(Box<ConnectionRow>),
    /// Another replica refreshed, failed, or still holds the lease: the row
    /// before waiting, and the row as it is now.
    Theirs(Box<ConnectionRow>, Box<ConnectionRow>),
}

/// Whether another refresher wrote a result (success or failure) or the
/// state changed since `before` was read.
fn changed(before: &ConnectionRow, now: &ConnectionRow) -> bool {
    now.version != before.version
        || now.status != before.status
        || now.last_failure_at != before.last_failure_at
}

/// What to answer with another refresher's result: its new token, or after
/// its failure the still-valid current token (else 503), never a second call
/// to the provider with the same refresh token.
fn theirs(before: &ConnectionRow, now: ConnectionRow) -> Result<ConnectionRow, TokenError> {
    usable(&now)?;
    if now.version != before.version {
        Ok(now)
    } else {
        serve_or_unavailable(now, "another broker's refresh failed; a retry is scheduled")
    }
}

/// The audit event of a connection moving to `attention_required`; `detail`
/// says why, and gains the status it leaves.
fn attention(c: &ConnectionRow, provider: &Provider, code: &str, mut detail: Value) -> Transition {
    detail["previous_status"] = json!(c.status);
    let failing = crate::store::parse_json_list(&c.failing_scopes);
    Transition {
        audit: AuditEvent::new("connection.attention_required")
            .actor("system")
            .provider(c.provider_id.clone())
            .connection(c.id.clone())
            .workspace(c.workspace_id.clone())
            .detail(detail),
        event: Some(crate::webhook::connection_event(
            crate::webhook::CONNECTION_ATTENTION_REQUIRED,
            c,
            Some(&provider.profile.name),
            "attention_required",
            Some(code),
            &failing,
        )),
    }
}

/// Whether a cached response built from `stamp` may be served now: the
/// connection is usable and its token outside the refresh margin.
fn servable(s: &RefreshSettings, stamp: &TokenStamp) -> bool {
    matches!(stamp.status.as_str(), "active" | "degraded")
        && !inside_margin(s, stamp.expires_at, stamp.last_success_at, now_ms())
}

/// Serves the current token while it is still valid; otherwise 503.
fn serve_or_unavailable(c: ConnectionRow, why: &str) -> Result<ConnectionRow, TokenError> {
    if c.expires_at.is_some_and(|e| e > now_ms()) {
        Ok(c)
    } else {
        Err(TokenError::ProviderUnavailable(format!(
            "the token could not be refreshed ({why}); retry later"
        )))
    }
}

/// Whether a connection's status lets it serve tokens (and take reports).
pub(crate) fn usable(c: &ConnectionRow) -> Result<(), TokenError> {
    match c.status.as_str() {
        "active" | "degraded" => Ok(()),
        "pending" => Err(TokenError::Pending),
        "attention_required" => Err(TokenError::AttentionRequired(
            c.error_description
                .clone()
                .unwrap_or_else(|| "a person must re-consent this connection".into()),
        )),
        "revoked" => Err(TokenError::Revoked),
        _ => Err(TokenError::Failed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RefreshSettings {
        RefreshSettings {
            margin: Duration::from_secs(300),
            jitter: Duration::from_secs(60),
            ..RefreshSettings::default()
        }
    }

    #[test]
    fn schedule_is_margin_plus_jitter_before_expiry() {
        let s = settings();
        let e = now_ms() + 3_600_000;
        for _ in 0..200 {
            let next = next_refresh_at(&s, Some(e), true).unwrap();
            assert!(next <= e - 300_000 && next > e - 360_000, "{}", e - next);
        }
        assert_eq!(next_refresh_at(&s, Some(e), false), None);
    }

    #[test]
    fn short_lived_tokens_refresh_at_half_life_not_on_every_request() {
        let s = settings();
        let now = now_ms();
        // A 2-minute token under a 5-minute margin.
        let e = now + 120_000;
        let next = next_refresh_at(&s, Some(e), true).unwrap();
        assert!(
            next > now + 29_000 && next <= now + 60_000,
            "{}",
            next - now
        );
        assert!(!inside_margin(&s, Some(e), Some(now), now + 10_000));
        assert!(inside_margin(&s, Some(e), Some(now), now + 61_000));
        // Issue time unknown: the configured margin.
        assert!(inside_margin(&s, Some(e), None, now));
    }

    #[test]
    fn backoff_is_capped_jittered_and_honours_retry_after() {
        let s = settings();
        for attempt in 1..30 {
            let d = backoff(&s, attempt, None);
            assert!(d <= s.backoff_cap.max(Duration::from_secs(1)), "{d:?}");
            assert!(d >= Duration::from_secs(1));
        }
        let first: Vec<_> = (0..50).map(|_| backoff(&s, 1, None)).collect();
        assert!(first.iter().all(|d| *d <= s.backoff_base));
        assert!(
            first.iter().any(|d| *d != first[0]),
            "full jitter varies the delay"
        );
        assert!(backoff(&s, 1, Some(Duration::from_secs(120))) >= Duration::from_secs(120));
    }
}
