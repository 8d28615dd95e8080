//! Per-connection credentials: fetched once and shared, refreshed before they
//! expire, never served expired.
//!
//! * **Single flight.** One fetch per connection at a time; callers arriving
//!   meanwhile wait for it (a thousand tasks, one fetch), or take the current
//!   credentials if they still work.
//! * **Ahead of expiry.** Credentials are re-fetched from `expires_at -
//!   margin - jitter` on, with the margin at most a quarter of the lifetime
//!   left, so the fetch lands inside the broker's own (larger) refresh margin
//!   and brings a new token. Credentials without expiry are re-fetched every
//!   `static_ttl` (they may have been rotated or revoked).
//! * **Failures.** Gateway unreachable or 5xx: capped exponential backoff
//!   with full jitter; until the next attempt the current credentials are
//!   served while they work, else the error. A connection that needs a person
//!   (`InteractionRequired`) or a refused agent key is not asked about again
//!   for `interaction_hold`: no retry storm. A pause drops the credentials.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::credentials::Credentials;
use crate::error::BridgeError;
use crate::gateway::GatewayClient;

/// How the cache times its fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// Re-fetch this long before expiry (at most a quarter of the lifetime left).
    pub margin: Duration,
    /// Up to this much earlier still, at random (at most half the margin).
    pub jitter: Duration,
    /// Re-fetch credentials without expiry this often.
    pub static_ttl: Duration,
    /// Least time between two fetches of one connection.
    pub min_refetch: Duration,
    /// First backoff after a failure (doubling, full jitter).
    pub backoff_base: Duration,
    /// Longest backoff.
    pub backoff_cap: Duration,
    /// How long a connection that needs a person is not asked about again.
    pub interaction_hold: Duration,
    /// Re-fetch at least this often, whatever the expiry, so that a pause
    /// or a revocation reaches this cache within it (`None`: by expiry and
    /// `static_ttl` only). A proxy serving many requests sets it.
    pub recheck: Option<Duration>,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            margin: Duration::from_secs(30),
            jitter: Duration::from_secs(10),
            static_ttl: Duration::from_secs(300),
            min_refetch: Duration::from_secs(1),
            backoff_base: Duration::from_millis(250),
            backoff_cap: Duration::from_secs(30),
            interaction_hold: Duration::from_secs(30),
            recheck: None,
        }
    }
}

#[derive(Default)]
struct State {
    creds: Option<Arc<Credentials>>,
    refresh_at: Option<SystemTime>,
    generation: u64,
    failures: u32,
    retry_at: Option<SystemTime>,
    error: Option<BridgeError>,
}

struct Slot {
    state: Mutex<State>,
    /// Held by the one fetch in flight.
    flight: tokio::sync::Mutex<()>,
}

impl Slot {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic mid-update leaves whole values behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current credentials if they still work at `now`.
    fn usable(&self, now: SystemTime) -> Option<Arc<Credentials>> {
        self.state().creds.clone().filter(|c| c.usable_at(now))
    }

    /// An answer without fetching, if there is one: fresh credentials, or
    /// inside a backoff window the current credentials or the last error.
    fn decide(&self, now: SystemTime) -> Option<Result<Arc<Credentials>, BridgeError>> {
        let st = self.state();
        let usable = st.creds.clone().filter(|c| c.usable_at(now));
        if let (Some(c), Some(at)) = (&usable, st.refresh_at) {
            if now < at {
                return Some(Ok(c.clone()));
            }
        }
        match st.retry_at {
            Some(at) if now < at => Some(match (usable, &st.error) {
                (Some(c), Some(e)) if e.is_retryable() => Ok(c),
                (_, Some(e)) => Err(e.clone()),
                (Some(c), None) => Ok(c),
                (None, None) => return None,
            }),
            _ => None,
        }
    }
}

enum Fetch {
    Token,
    Refresh,
}

/// The credential cache of one [`crate::Bridge`].
pub(crate) struct CredentialCache {
    gateway: GatewayClient,
    settings: CacheSettings,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl CredentialCache {
    pub(crate) fn new(gateway: GatewayClient, settings: CacheSettings) -> Self {
        Self {
            gateway,
            settings,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, id: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .entry(id.to_string())
            .or_insert_with(|| {
                Arc::new(Slot {
                    state: Mutex::new(State::default()),
                    flight: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// Credentials for `id` that work now.
    pub(crate) async fn get(&self, id: &str) -> Result<Arc<Credentials>, BridgeError> {
        let slot = self.slot(id);
        if let Some(answer) = slot.decide(SystemTime::now()) {
            return answer;
        }
        let _flight = match slot.flight.try_lock() {
            Ok(g) => g,
            Err(_) => {
                // A fetch is in flight: what still works is good meanwhile.
                if let Some(c) = slot.usable(SystemTime::now()) {
                    return Ok(c);
                }
                let g = slot.flight.lock().await;
                if let Some(answer) = slot.decide(SystemTime::now()) {
                    return answer;
                }
                g
            }
        };
        // Boxed: a gateway call is a large future, and every lookup's
        // future (most answered from the cache above) would carry it.
        Box::pin(self.fetch(&slot, id, Fetch::Token)).await
    }

    /// Drops the credentials of `id` and an answer held because a person
    /// must act: the next [`Self::get`] asks the gateway. For when a person
    /// has just been sent to consent again, so their new grant is used at
    /// once instead of after a hold. A passing failure (the gateway
    /// unreachable) keeps its backoff.
    pub(crate) fn forget(&self, id: &str) {
        let slot = self.slot(id);
        let mut st = slot.state();
        st.creds = None;
        st.refresh_at = None;
        if !st.error.as_ref().is_some_and(BridgeError::is_retryable) {
            st.failures = 0;
            st.retry_at = None;
            st.error = None;
        }
    }

    /// Which fetch the current credentials of `id` came from (0: none yet).
    pub(crate) fn generation(&self, id: &str) -> u64 {
        self.slot(id).state().generation
    }

    /// New credentials for `id` after the provider refused those of
    /// `generation`; if they were replaced meanwhile, the replacement.
    pub(crate) async fn refreshed(
        &self,
        id: &str,
        generation: u64,
    ) -> Result<Arc<Credentials>, BridgeError> {
        let slot = self.slot(id);
        let _flight = slot.flight.lock().await;
        let now = SystemTime::now();
        {
            let st = slot.state();
            if st.generation != generation {
                if let Some(c) = st.creds.clone().filter(|c| c.usable_at(now)) {
                    return Ok(c);
                }
            }
            if let (Some(at), Some(e)) = (st.retry_at, &st.error) {
                if now < at {
                    return Err(e.clone());
                }
            }
        }
        self.fetch(&slot, id, Fetch::Refresh).await
    }

    /// One gateway call (the caller holds the slot's flight lock).
    async fn fetch(
        &self,
        slot: &Slot,
        id: &str,
        kind: Fetch,
    ) -> Result<Arc<Credentials>, BridgeError> {
        let (answer, label) = match kind {
            Fetch::Token => (self.gateway.token(id).await, "token"),
            Fetch::Refresh => (self.gateway.refresh(id).await, "refresh"),
        };
        let now = SystemTime::now();
        let parsed = answer.and_then(|body| Credentials::from_answer(id, &body, now));
        let outcome = match &parsed {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        metrics::counter!("nexus_bridge_fetches_total", "kind" => label, "outcome" => outcome)
            .increment(1);
        let mut st = slot.state();
        match parsed {
            Ok(mut c) => {
                st.generation += 1;
                c.generation = st.generation;
                let c = Arc::new(c);
                st.refresh_at = Some(self.refresh_at(&c, now));
                st.creds = Some(c.clone());
                st.failures = 0;
                st.retry_at = None;
                st.error = None;
                Ok(c)
            }
            Err(e) => {
                metrics::counter!("nexus_bridge_errors_total", "kind" => e.kind()).increment(1);
                st.failures = st.failures.saturating_add(1);
                let backoff = full_jitter(&self.settings, st.failures);
                let wait = match &e {
                    BridgeError::InteractionRequired { .. }
                    | BridgeError::Unauthorized(_)
                    | BridgeError::NotFound(_) => {
                        st.creds = None;
                        self.settings.interaction_hold
                    }
                    BridgeError::Paused { retry_after, .. } => {
                        // The operator stopped issuance: stop using what was issued.
                        st.creds = None;
                        retry_after
                            .unwrap_or(backoff)
                            .min(self.settings.backoff_cap)
                    }
                    BridgeError::Gateway {
                        retry_after: Some(r),
                        ..
                    } => (*r).min(self.settings.backoff_cap),
                    _ => backoff,
                };
                st.retry_at = Some(now + wait);
                st.error = Some(e.clone());
                match st.creds.clone().filter(|c| c.usable_at(now)) {
                    // Still valid and the failure is passing: keep serving.
                    Some(c) if e.is_retryable() && matches!(kind, Fetch::Token) => Ok(c),
                    _ => Err(e),
                }
            }
        }
    }

    fn refresh_at(&self, c: &Credentials, now: SystemTime) -> SystemTime {
        let s = &self.settings;
        let by_expiry = self.by_expiry(c, now);
        match s.recheck {
            Some(r) => by_expiry.min(now + r.max(s.min_refetch)),
            None => by_expiry,
        }
    }

    fn by_expiry(&self, c: &Credentials, now: SystemTime) -> SystemTime {
        let s = &self.settings;
        let Some(expires_at) = c.expires_at else {
            return now + s.static_ttl;
        };
        let left = expires_at.duration_since(now).unwrap_or_default();
        let margin = s.margin.min(left / 4);
        let jitter_cap = s.jitter.min(margin / 2);
        let jitter = Duration::from_millis(fastrand::u64(0..=jitter_cap.as_millis() as u64));
        let at = expires_at.checked_sub(margin + jitter).unwrap_or(now);
        at.max(now + s.min_refetch)
    }
}

/// Capped exponential backoff with full jitter for the `failures`-th failure.
fn full_jitter(s: &CacheSettings, failures: u32) -> Duration {
    backoff(s.backoff_base, s.backoff_cap, failures)
}

/// A random wait up to `base` doubled for each failure after the first,
/// capped at `cap` (exponential backoff with full jitter).
pub(crate) fn backoff(base: Duration, cap: Duration, failures: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << failures.min(16).saturating_sub(1))
        .min(cap);
    Duration::from_millis(fastrand::u64(0..=exp.as_millis() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let s = CacheSettings::default();
        for _ in 0..100 {
            assert!(full_jitter(&s, 1) <= s.backoff_base);
            assert!(full_jitter(&s, 3) <= s.backoff_base * 4);
            assert!(full_jitter(&s, 40) <= s.backoff_cap);
        }
    }
}
