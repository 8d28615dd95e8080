//! In-memory cache of decrypted token responses.
//!
//! A cached response was built from a [`TokenStamp`]: every non-secret
//! column of the response plus the connection's and provider's versions
//! (every credential or profile write bumps them). Two ways keep it correct
//! across replicas:
//!
//! * **Invalidation.** Every change to a stamp column is announced: by this
//!   process's store after commit, and on PostgreSQL by triggers that
//!   `NOTIFY` whoever made the change (see `store::changes`). The listener
//!   drops the entry (or every entry of a changed provider) at once.
//! * **Validation.** An entry is served without asking the database only
//!   while it is *trusted*: invalidation is running and connected, and the
//!   entry was checked against the database within `max_age`. Otherwise the
//!   request reads the stamp (one narrow primary-key read) and serves the
//!   entry only if it is equal. When the listener loses its connection,
//!   notifications may have been missed: the whole cache is dropped and
//!   every request validates until it is back.
//!
//! So a revocation made on any replica stops issuance everywhere within the
//! notification's delivery time, and within `max_age` even if a notification
//! were lost without the connection dropping. Entries are bounded (least
//! recently used evicted) and the secrets are wrapped in [`Secret`].

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashlink::LruCache;
use serde_json::{Map, Value};

use crate::store::{now_ms, TokenStamp};
use nexus_core::Secret;

/// One cached response.
#[derive(Debug)]
pub struct Cached {
    /// What the response was built from.
    pub stamp: TokenStamp,
    /// The response without `expires_in` (computed at serve time), as JSON
    /// text without its closing brace, so serving it is one copy and no
    /// serialisation.
    pub prefix: Secret<Vec<u8>>,
    /// When the stamp was last checked against the database (unix ms).
    validated_at: AtomicI64,
}

impl Cached {
    /// A response built just now from `stamp`.
    pub fn new(stamp: TokenStamp, body: &Map<String, Value>) -> Self {
        Self {
            stamp,
            prefix: Secret::new(open_object(body)),
            validated_at: AtomicI64::new(now_ms()),
        }
    }
}

/// `body` as JSON without the closing brace, ready for one more member.
pub fn open_object(body: &Map<String, Value>) -> Vec<u8> {
    // Serialising a map of JSON values cannot fail.
    let mut v = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    v.pop();
    if v.len() > 1 {
        v.push(b',');
    }
    v
}

/// Bounded token responses by connection id. Capacity 0 disables it.
///
/// Every warm fetch reads it, so reads take the read lock and do not reorder
/// the map: concurrent fetches never wait on each other. Eviction is
/// therefore by insertion order; an evicted hot entry costs one rebuild.
pub struct TokenCache {
    map: Option<RwLock<LruCache<String, Arc<Cached>>>>,
    /// Whether invalidation is live (set by the listener task).
    listening: AtomicBool,
    /// Bumped (under the map lock) by every invalidation, so a response
    /// built from a read older than an invalidation is not stored.
    epoch: AtomicU64,
    max_age_ms: i64,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("enabled", &self.map.is_some())
            .field("listening", &self.listening.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    /// A cache holding at most `capacity` responses, trusted for `max_age`
    /// between database checks while invalidation is live.
    pub fn new(capacity: usize, max_age: std::time::Duration) -> Self {
        Self {
            map: (capacity > 0).then(|| RwLock::new(LruCache::new(capacity))),
            listening: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            max_age_ms: max_age.as_millis() as i64,
        }
    }

    fn lock(&self) -> Option<RwLockWriteGuard<'_, LruCache<String, Arc<Cached>>>> {
        // A poisoned lock only means another thread panicked mid-update of
        // the map; the entries themselves are whole Arcs, safe to use.
        self.map
            .as_ref()
            .map(|m| m.write().unwrap_or_else(|e| e.into_inner()))
    }

    fn read(&self) -> Option<RwLockReadGuard<'_, LruCache<String, Arc<Cached>>>> {
        self.map
            .as_ref()
            .map(|m| m.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The entry of `id` if it may be served without asking the database.
    pub fn trusted(&self, id: &str) -> Option<Arc<Cached>> {
        if !self.listening.load(Ordering::Acquire) {
            return None;
        }
        let hit = self.read()?.peek(id).cloned()?;
        let age = now_ms() - hit.validated_at.load(Ordering::Relaxed);
        (age < self.max_age_ms).then_some(hit)
    }

    /// How much longer (ms) `entry` stays trusted without a database check;
    /// `None` when it is not trusted now (see [`crate::tokens::edge`]: a gateway may
    /// keep the response for at most this long).
    pub fn trust_left(&self, entry: &Cached) -> Option<i64> {
        if self.map.is_none() || !self.listening.load(Ordering::Acquire) {
            return None;
        }
        let left = self.max_age_ms - (now_ms() - entry.validated_at.load(Ordering::Relaxed));
        (left > 0).then_some(left)
    }

    /// Whether invalidation is live (every change is heard).
    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Acquire)
    }

    /// The stamp of `id`'s entry, trusted or not (for bookkeeping only,
    /// never for serving).
    pub fn peek_stamp(&self, id: &str) -> Option<TokenStamp> {
        self.read()?.peek(id).map(|c| c.stamp.clone())
    }

    /// The entry of `id` if it was built from exactly `stamp` (just read from
    /// the database); it is then trusted again for `max_age`. A stale entry is
    /// dropped at once (its secrets leave memory).
    pub fn validate(&self, id: &str, stamp: &TokenStamp) -> Option<Arc<Cached>> {
        let hit = self.read()?.peek(id).cloned()?;
        if &hit.stamp == stamp {
            hit.validated_at.store(now_ms(), Ordering::Relaxed);
            return Some(hit);
        }
        let mut map = self.lock()?;
        // Drop it unless it was replaced meanwhile.
        if map.peek(id).is_some_and(|e| Arc::ptr_eq(e, &hit)) {
            map.remove(id);
        }
        None
    }

    /// The current epoch: read it before reading what a response is built from.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Stores a response built from data read after `epoch` was taken,
    /// unless something was invalidated since (it might be that data).
    /// Says whether it was stored.
    pub fn put(&self, id: &str, entry: Cached, epoch: u64) -> bool {
        if let Some(mut map) = self.lock() {
            if self.epoch.load(Ordering::Acquire) == epoch {
                map.insert(id.to_string(), Arc::new(entry));
                return true;
            }
        }
        false
    }

    /// Drops a connection's entry.
    pub fn forget(&self, id: &str) {
        if let Some(mut map) = self.lock() {
            self.epoch.fetch_add(1, Ordering::AcqRel);
            map.remove(id);
        }
    }

    /// Drops every entry of a provider.
    pub fn forget_provider(&self, provider_id: &str) {
        if let Some(mut map) = self.lock() {
            self.epoch.fetch_add(1, Ordering::AcqRel);
            let ids: Vec<String> = map
                .iter()
                .filter(|(_, c)| c.stamp.provider_id == provider_id)
                .map(|(id, _)| id.clone())
                .collect();
            for id in ids {
                map.remove(&id);
            }
        }
    }

    /// Drops everything (notifications may have been missed).
    pub fn clear(&self) {
        if let Some(mut map) = self.lock() {
            self.epoch.fetch_add(1, Ordering::AcqRel);
            map.clear();
        }
    }

    /// Marks invalidation live (or not). Going live or dead clears the cache:
    /// nothing cached before can be trusted to have heard every change.
    pub fn set_listening(&self, live: bool) {
        self.clear();
        self.listening.store(live, Ordering::Release);
        self.clear();
    }

    /// Number of cached responses.
    pub fn len(&self) -> usize {
        self.read().map_or(0, |m| m.len())
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn stamp(version: i64, status: &str) -> TokenStamp {
        TokenStamp {
            status: crate::store::ConnectionStatus::parse(status).unwrap(),
            version,
            granted_scopes: "[]".into(),
            failing_scopes: "[]".into(),
            token_type: Some("Bearer".into()),
            expires_at: Some(1),
            last_success_at: None,
            provider_id: "p".into(),
            provider_version: Some(1),
            workspace_id: "w".into(),
        }
    }

    fn entry(s: TokenStamp) -> Cached {
        let mut body = Map::new();
        body.insert("access_token".into(), json!("secret-canary"));
        Cached::new(s, &body)
    }

    #[test]
    fn validates_only_the_exact_stamp() {
        let c = TokenCache::new(10, Duration::from_secs(1));
        c.put("a", entry(stamp(1, "active")), c.epoch());
        assert!(c.validate("a", &stamp(1, "active")).is_some());
        assert!(c.validate("a", &stamp(1, "revoked")).is_none());
        // The stale entry is gone, even for its old stamp.
        assert!(c.validate("a", &stamp(1, "active")).is_none());
        c.put("a", entry(stamp(1, "active")), c.epoch());
        assert!(c.validate("a", &stamp(2, "active")).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn trusted_only_while_listening_and_young() {
        let c = TokenCache::new(10, Duration::from_millis(50));
        c.put("a", entry(stamp(1, "active")), c.epoch());
        assert!(c.trusted("a").is_none(), "not listening yet");
        c.set_listening(true);
        assert!(c.is_empty(), "going live clears");
        c.put("a", entry(stamp(1, "active")), c.epoch());
        assert!(c.trusted("a").is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.trusted("a").is_none(), "too old: validate first");
        assert!(c.validate("a", &stamp(1, "active")).is_some());
        assert!(c.trusted("a").is_some(), "validated again");
        c.set_listening(false);
        assert!(c.trusted("a").is_none());
    }

    #[test]
    fn forgets_by_connection_and_by_provider() {
        let c = TokenCache::new(10, Duration::from_secs(1));
        c.put("a", entry(stamp(1, "active")), c.epoch());
        c.put("b", entry(stamp(1, "active")), c.epoch());
        let mut other = stamp(1, "active");
        other.provider_id = "q".into();
        c.put("c", entry(other), c.epoch());
        c.forget("a");
        assert_eq!(c.len(), 2);
        c.forget_provider("p");
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn is_bounded_and_can_be_disabled() {
        let c = TokenCache::new(2, Duration::from_secs(1));
        for id in ["a", "b", "c"] {
            c.put(id, entry(stamp(1, "active")), c.epoch());
        }
        assert_eq!(c.len(), 2);
        assert!(
            c.validate("a", &stamp(1, "active")).is_none(),
            "oldest evicted"
        );
        let off = TokenCache::new(0, Duration::from_secs(1));
        off.put("a", entry(stamp(1, "active")), off.epoch());
        assert!(off.validate("a", &stamp(1, "active")).is_none());
    }

    #[test]
    fn a_response_read_before_an_invalidation_is_not_stored() {
        let c = TokenCache::new(10, Duration::from_secs(1));
        let before = c.epoch();
        c.forget("a"); // a change lands while the response is being built
        assert!(!c.put("a", entry(stamp(1, "active")), before));
        assert!(c.is_empty());
    }

    #[test]
    fn debug_never_shows_secrets() {
        let e = entry(stamp(1, "active"));
        assert!(!format!("{e:?}").contains("secret-canary"));
    }
}
