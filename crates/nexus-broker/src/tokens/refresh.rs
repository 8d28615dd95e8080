//! The refresh engine: one refresh per connection at a time, the provider
//! call, and what each outcome does to the connection.
//!
//! In this process, callers of the same connection queue on one lock and the
//! later ones take the result of a refresh that finished after they asked;
//! across replicas, a lease (`lease_owner`, `lease_until`) is taken first,
//! and a replica that finds the lease held waits for the holder's result. A
//! crashed holder's lease expires. Rotated refresh tokens are written with a
//! version check before the new access token is served. `invalid_grant` and
//! providers' equivalents move the connection to `attention_required`;
//! transient faults never do: they are retried with capped exponential
//! backoff and full jitter (honouring `Retry-After`), and a still-valid
//! token keeps being served meanwhile. The background worker (`worker.rs`)
//! and revocation (`revoke.rs`) are the engine's other two callers.
//!
//! A provider that rotates refresh tokens makes the stretch between its
//! answer and our commit precious: lose the rotated token there and the next
//! refresh replays the old one, which a strict provider punishes by killing
//! the grant. So nothing runs in that stretch but parsing, sealing and one
//! UPDATE; a commit that fails (database away) keeps the rotated tokens in
//! memory and retries until the database answers, holding the connection's
//! lock; and an intent (`refresh_started_at`) is written before the call, so
//! a replica taking over a cut-off refresh waits for a late commit
//! ([`RefreshSettings::commit_grace`]) and, if the provider then refuses
//! the old refresh token, reports `refresh_interrupted` instead of blaming
//! the person.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use super::error::{usable, TokenError};
use super::schedule::{backoff, inside_margin, next_refresh_at, RefreshSettings};
use crate::events::audit::{AuditEvent, AuditSink};
use crate::events::webhooks;
use crate::oauth::client::{classify, parse_token_response, token_request, ClientAuth, Refusal};
use crate::oauth::discovery::Discovery;
use crate::registry::{Provider, Registry};
use crate::store::{
    json_list, now_ms, ConnectionRow, ConnectionStatus, Refreshed, Store, Transition,
};
use crate::vault::{Aad, KeyRing};
use nexus_core::outbound;

/// Who asks for a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
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
    Transient(Transient),
    /// The provider rotated the tokens but storing them failed: they are
    /// kept and committed later ([`Refresher::commit_late`]).
    Uncommitted(Box<Uncommitted>, crate::store::StoreError),
}

/// A transient failure.
struct Transient {
    description: String,
    retry_after: Option<Duration>,
    /// Whether the refresh's intent may be cleared: the provider answered,
    /// or was never called. False when the request went out and no answer
    /// came back: the provider may have rotated the refresh token.
    clear_intent: bool,
}

impl Transient {
    /// A failure before the refresh token left this process.
    fn before_call(description: impl Into<String>) -> Outcome {
        Outcome::Transient(Transient {
            description: description.into(),
            retry_after: None,
            clear_intent: false,
        })
    }
}

/// Rotated tokens the provider issued that are not stored yet.
pub(crate) struct Uncommitted {
    id: String,
    version: i64,
    refreshed: Refreshed,
    /// When the refresh token went to the provider.
    sent: Instant,
}

/// Longest time rotated tokens are kept for a late commit (the loop ends by
/// itself; after that the database has been away for an hour and the
/// connection's refresh token is reported lost in the log).
const LATE_COMMIT_FOR: Duration = Duration::from_secs(3600);

/// Least time between two `provider.unhealthy` webhooks for one provider (per replica).
const UNHEALTHY_EVERY: Duration = Duration::from_secs(900);

/// The refresh engine of one broker process.
pub struct Refresher {
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
    /// Refresh tasks running (waiting, calling, committing): a stopping
    /// broker lets them finish ([`Refresher::drain`]).
    running: Arc<AtomicUsize>,
    /// When each provider's last `provider.unhealthy` webhook went out: one
    /// per provider per [`UNHEALTHY_EVERY`], not one per connection refreshed.
    unhealthy_sent: Mutex<HashMap<String, Instant>>,
}

impl Refresher {
    /// Builds the engine.
    pub fn new(
        store: Store,
        registry: Registry,
        keys: Arc<KeyRing>,
        discovery: Arc<Discovery>,
        http: reqwest::Client,
        audit: AuditSink,
        settings: RefreshSettings,
    ) -> Self {
        Self {
            store,
            registry,
            keys,
            discovery,
            http,
            audit,
            settings,
            owner: format!("broker-{}", uuid::Uuid::new_v4().simple()),
            inflight: Mutex::new(HashMap::new()),
            running: Arc::new(AtomicUsize::new(0)),
            unhealthy_sent: Mutex::new(HashMap::new()),
        }
    }

    /// The token expired and there is no refresh token: the connection needs
    /// a person. Recorded (and audited) as a transition, not only answered.
    pub(crate) async fn no_refresh_token(
        &self,
        c: &ConnectionRow,
        provider: &Provider,
    ) -> TokenError {
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
                true,
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
            event: Some(webhooks::provider_event(
                &provider.row.id,
                &provider.profile.name,
                "invalid_client",
            )),
        };
        if let Err(e) = self.store.record_transition(&t).await {
            tracing::error!(error = %e, "provider.unhealthy event not recorded");
        }
    }

    /// A lease owner id for one refresh attempt (or one worker batch): a lease
    /// is only ever extended or released by the attempt that took it.
    pub(crate) fn attempt_owner(&self) -> String {
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
    pub(crate) async fn refresh(
        self: &Arc<Self>,
        provider: &Provider,
        seen: ConnectionRow,
        mode: Mode,
        asked_at: i64,
        claim_owner: Option<String>,
    ) -> Result<ConnectionRow, TokenError> {
        let me = self.clone();
        let provider = provider.clone();
        let (answer, answered) = oneshot::channel();
        let running = Running::enter(&self.running);
        tokio::spawn(async move {
            let _running = running;
            let id = seen.id.clone();
            let lock = me.lock_for(&id);
            {
                let _guard = lock.lock().await;
                let owner = claim_owner.unwrap_or_else(|| me.attempt_owner());
                let mut late = None;
                let result = me
                    .refresh_locked(&provider, seen, mode, asked_at, &owner, &mut late)
                    .await;
                // The caller has its answer now; rotated tokens the database
                // did not take are committed later, still under the lock so
                // this process starts no refresh of the connection meanwhile.
                let _ = answer.send(result);
                if let Some(u) = late {
                    me.commit_late(*u).await;
                }
            }
            me.release(&id, lock);
        });
        answered.await.unwrap_or_else(|_| {
            tracing::error!("refresh task ended without an answer");
            Err(TokenError::ProviderUnavailable(
                "the refresh did not complete; retry".into(),
            ))
        })
    }

    /// Waits until no refresh task runs (their callers may have gone, but a
    /// rotated refresh token in hand must still be stored), at most
    /// `within`. Returns how many were still running.
    pub async fn drain(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let n = self.running.load(Ordering::Acquire);
            if n == 0 || Instant::now() >= deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Commits rotated tokens whose first commit failed, retrying until the
    /// database takes them, the connection moves on without them (revoked,
    /// reconnected), or [`LATE_COMMIT_FOR`] passes.
    async fn commit_late(&self, u: Uncommitted) {
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
            match self
                .store
                .store_refresh(&u.id, u.version, &u.refreshed)
                .await
            {
                Ok(true) => {
                    metrics::counter!("nexus_refresh_late_commits_total", "outcome" => "stored")
                        .increment(1);
                    metrics::histogram!("nexus_refresh_commit_window_seconds")
                        .record(u.sent.elapsed().as_secs_f64());
                    tracing::info!(connection_id = %u.id, waited_ms = started.elapsed().as_millis() as u64, "rotated tokens stored after the database came back");
                    return;
                }
                Ok(false) => {
                    metrics::counter!("nexus_refresh_late_commits_total", "outcome" => "superseded")
                        .increment(1);
                    tracing::warn!(connection_id = %u.id, "rotated tokens not stored: the connection changed meanwhile (revoked, reconnected or refreshed elsewhere)");
                    return;
                }
                Err(e) if started.elapsed() < LATE_COMMIT_FOR => {
                    tracing::debug!(connection_id = %u.id, error = %e, "rotated tokens still waiting for the database");
                }
                Err(e) => {
                    metrics::counter!("nexus_refresh_late_commits_total", "outcome" => "lost")
                        .increment(1);
                    tracing::error!(connection_id = %u.id, error = %e, "rotated tokens given up after an hour without the database; the connection's refresh token is lost");
                    return;
                }
            }
        }
    }

    async fn refresh_locked(
        &self,
        provider: &Provider,
        seen: ConnectionRow,
        mode: Mode,
        asked_at: i64,
        owner: &str,
        late: &mut Option<Box<Uncommitted>>,
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
        let (c, interrupted) = match self.earlier_intent(c, owner).await? {
            Leased::Mine(c) => {
                let interrupted = c.refresh_started_at;
                (*c, interrupted)
            }
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
            Outcome::Uncommitted(u, e) => {
                metrics::counter!("nexus_refreshes_total", "outcome" => "uncommitted").increment(1);
                tracing::warn!(connection_id = %c.id, error = %e, "rotated tokens could not be stored; kept for a late commit");
                *late = Some(u);
                Err(e.into())
            }
            Outcome::Revoked(code, description) => {
                metrics::counter!("nexus_refreshes_total", "outcome" => "attention_required")
                    .increment(1);
                // The provider refuses a refresh token an earlier, cut-off
                // attempt may have spent: most likely the grant was lost in
                // transit, not withdrawn by the person. Said so, so nobody
                // hunts a revocation first; a revocation at the same moment
                // answers the same, so the description says that too, and
                // the provider's own words go into the audit.
                let (code, description, cause) = match interrupted {
                    Some(at) if code == "invalid_grant" => {
                        metrics::counter!("nexus_refresh_interrupted_total").increment(1);
                        let detail = json!({"cause": "refresh_interrupted", "error": code, "provider_description": description, "interrupted_refresh_started_at": at});
                        if let Err(e) = self
                            .audit
                            .record(
                                AuditEvent::new("connection.refresh_interrupted")
                                    .actor("system")
                                    .provider(c.provider_id.clone())
                                    .connection(c.id.clone())
                                    .workspace(c.workspace_id.clone())
                                    .detail(detail.clone()),
                            )
                            .await
                        {
                            tracing::error!(error = %e, "connection.refresh_interrupted audit event not recorded");
                        }
                        (
                            "refresh_interrupted".to_string(),
                            "an earlier refresh was cut off after the refresh token went to the provider (a broker stopped, or its answer was lost); the provider now refuses the refresh token, most likely because that refresh spent it (access withdrawn at the provider in the meantime would look the same); re-consent is needed".to_string(),
                            detail,
                        )
                    }
                    _ => {
                        let cause = json!({"cause": "refresh_rejected", "error": code});
                        (code, description, cause)
                    }
                };
                let ev = attention(&c, provider, &code, cause);
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
                        true,
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
                let t = Transient {
                    description,
                    retry_after: None,
                    clear_intent: interrupted.is_none(),
                };
                self.transient(c, owner, "invalid_client", t).await
            }
            Outcome::Transient(mut t) => {
                metrics::counter!("nexus_refreshes_total", "outcome" => "transient").increment(1);
                // An answer to this call says nothing of an earlier call
                // that got none: its intent stays until a refresh succeeds.
                t.clear_intent &= interrupted.is_none();
                self.transient(c, owner, "provider_unavailable", t).await
            }
        }
    }

    /// Looks at the intent an earlier attempt left on the leased row. None:
    /// the row as it is. Left by an attempt that recorded a failure since
    /// (no answer came): the row as it is, its intent still set, so a
    /// refusal that follows reads as an interrupted refresh. Left by an
    /// attempt that recorded nothing: it was cut off, or it holds rotated
    /// tokens it could not commit yet; wait up to the commit grace for that
    /// late commit, whose result then stands.
    async fn earlier_intent(&self, c: ConnectionRow, owner: &str) -> Result<Leased, TokenError> {
        let Some(started) = c.refresh_started_at else {
            return Ok(Leased::Mine(Box::new(c)));
        };
        metrics::counter!("nexus_refresh_intents_found_total").increment(1);
        if c.last_failure_at.is_some_and(|f| f >= started) {
            return Ok(Leased::Mine(Box::new(c)));
        }
        tracing::warn!(connection_id = %c.id, "an earlier refresh of this connection was cut off; waiting for its late commit");
        let deadline = Instant::now() + self.settings.commit_grace;
        let lease_ms = self.settings.lease.as_millis() as i64;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self
                .store
                .get_connection(&c.id)
                .await?
                .ok_or(TokenError::NotFound)?;
            if changed(&c, &now) {
                self.store.release_lease(&c.id, owner).await?;
                return Ok(Leased::Theirs(Box::new(c), Box::new(now)));
            }
            // Keep the lease while waiting (the grace may outlast it).
            if !self
                .store
                .try_lease(&c.id, owner, now_ms() + lease_ms)
                .await?
            {
                return Ok(Leased::Theirs(Box::new(c), Box::new(now)));
            }
        }
        Ok(Leased::Mine(Box::new(c)))
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
        t: Transient,
    ) -> Result<ConnectionRow, TokenError> {
        let description = t.description.as_str();
        let delay = backoff(&self.settings, c.consecutive_failures + 1, t.retry_after);
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
                t.clear_intent,
            )
            .await?;
        serve_or_unavailable(c, description)
    }

    async fn call_provider(&self, provider: &Provider, c: &ConnectionRow, owner: &str) -> Outcome {
        let endpoints = match self.discovery.endpoints(&provider.profile).await {
            Ok(e) => e,
            Err(e) => return Transient::before_call(e.to_string()),
        };
        let refresh_token = match c.refresh_token.as_deref().map(|env| {
            self.keys
                .decrypt_str(Aad::new("connections", &c.id, "refresh_token"), env)
        }) {
            Some(Ok(rt)) => rt,
            Some(Err(e)) => {
                return Transient::before_call(format!("stored refresh token unreadable: {e}"))
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
            Err(e) => return Transient::before_call(e.to_string()),
        };
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose().as_str()),
        ];
        // RFC 8707: a refreshed token is for the same resource.
        if let Some(r) = provider.profile.resource() {
            form.push(("resource", r));
        }
        let req = token_request(
            &self.http,
            &endpoints.token,
            ClientAuth::of(provider, secret.as_ref()),
            form,
        );
        // The intent, then the call: from here until the commit, the
        // provider may hold a rotated refresh token we do not.
        match self.store.mark_refresh_started(&c.id, owner).await {
            Ok(true) => {}
            Ok(false) => {
                return Transient::before_call("the refresh lease was lost before the call")
            }
            Err(e) => return Transient::before_call(e.to_string()),
        }
        let sent = Instant::now();
        // Expiry counts from the request (see the handshake's callback).
        let sent_at = now_ms();
        let fetched = match outbound::send(req).await {
            Ok(f) => f,
            // No answer: the request may have reached the provider.
            Err(e) => {
                return Outcome::Transient(Transient {
                    description: e.to_string(),
                    retry_after: None,
                    clear_intent: false,
                })
            }
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
            match classify(code) {
                Refusal::GrantGone => {
                    return Outcome::Revoked(
                        code.clone(),
                        format!("token endpoint answered {code}"),
                    )
                }
                Refusal::ClientRejected => {
                    return Outcome::ClientRejected(format!("token endpoint answered {code}"))
                }
                Refusal::Other => {}
            }
        }
        let tokens = match parse_token_response(fetched.status, &fetched.body) {
            Ok(t) => t,
            Err(f) => {
                return Outcome::Transient(Transient {
                    description: f.description,
                    retry_after,
                    // A success we cannot read may still have rotated.
                    clear_intent: !fetched.status.is_success(),
                });
            }
        };
        let granted = match &tokens.scope {
            Some(s) => json_list(&provider.profile.split_scopes(s)),
            None => c.granted_scopes.clone(),
        };
        let expires_at = tokens.expires_in.map(|s| sent_at + s * 1000);
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
            Ok(true) => {
                metrics::histogram!("nexus_refresh_commit_window_seconds")
                    .record(sent.elapsed().as_secs_f64());
            }
            // The connection moved on meanwhile (revoked, reconnected by its
            // person); under the lease nobody else refreshes it. Its state wins.
            Ok(false) => {
                metrics::counter!("nexus_refresh_races_lost_total").increment(1);
                tracing::warn!(connection_id = %c.id, "rotated tokens not stored: the connection changed during the refresh");
                if let Err(e) = self.store.release_lease(&c.id, owner).await {
                    return Transient::before_call(e.to_string());
                }
            }
            Err(e) => {
                return Outcome::Uncommitted(
                    Box::new(Uncommitted {
                        id: c.id.clone(),
                        version: c.version,
                        refreshed,
                        sent,
                    }),
                    e,
                )
            }
        }
        match self.store.get_connection(&c.id).await {
            Ok(Some(row)) => Outcome::Refreshed(Box::new(row)),
            Ok(None) => Transient::before_call("connection disappeared"),
            Err(e) => Transient::before_call(e.to_string()),
        }
    }
}

/// One running refresh task, counted while it lives.
struct Running(Arc<AtomicUsize>);

impl Running {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
        event: Some(webhooks::connection_event(
            webhooks::CONNECTION_ATTENTION_REQUIRED,
            c,
            Some(&provider.profile.name),
            ConnectionStatus::AttentionRequired,
            Some(code),
            &failing,
        )),
    }
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
