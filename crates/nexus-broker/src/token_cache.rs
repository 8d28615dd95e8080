//! In-memory cache of decrypted token responses, validated against the
//! database on every use.
//!
//! A cached response is served only when the connection's [`TokenStamp`], read
//! fresh from the database by primary key, equals the stamp the response was
//! built from. The stamp holds every non-secret column of the response plus
//! the connection's and provider's versions, which every credential or profile
//! write bumps. So a refresh, a state change (revoked, attention_required,
//! degraded) or a provider change made by *any* replica is seen by the next
//! request on every replica, with no pub/sub to lose messages: the cache saves
//! the decryption and the wide row read, never the freshness check.
//!
//! Entries are bounded (least recently used evicted) and the cached secrets
//! are wrapped in [`Secret`], so they never reach a log.

use std::sync::{Arc, Mutex};

use hashlink::LruCache;
use serde_json::{Map, Value};

use crate::store::TokenStamp;
use crate::Secret;

/// One cached response.
#[derive(Debug)]
pub struct Cached {
    /// What the response was built from.
    pub stamp: TokenStamp,
    /// For the audit event of a cache hit.
    pub workspace_id: String,
    /// The response without `expires_in` (computed at serve time).
    pub body: Secret<Map<String, Value>>,
}

/// Bounded LRU of token responses by connection id. Capacity 0 disables it.
pub struct TokenCache {
    map: Option<Mutex<LruCache<String, Arc<Cached>>>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("enabled", &self.map.is_some())
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    /// A cache holding at most `capacity` responses.
    pub fn new(capacity: usize) -> Self {
        Self {
            map: (capacity > 0).then(|| Mutex::new(LruCache::new(capacity))),
        }
    }

    /// The cached response of `id` if it was built from exactly `stamp`.
    /// A stale entry is dropped at once (its secrets leave memory).
    pub fn get(&self, id: &str, stamp: &TokenStamp) -> Option<Arc<Cached>> {
        let map = self.map.as_ref()?;
        // A poisoned lock only means another thread panicked mid-update of
        // the LRU order; the entries themselves are whole Arcs, safe to use.
        let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(id) {
            Some(hit) if &hit.stamp == stamp => Some(hit.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    /// Stores a freshly built response.
    pub fn put(&self, id: &str, entry: Cached) {
        if let Some(map) = &self.map {
            let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
            map.insert(id.to_string(), Arc::new(entry));
        }
    }

    /// Drops a connection's entry (this replica knows it changed).
    pub fn forget(&self, id: &str) {
        if let Some(map) = &self.map {
            map.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        }
    }

    /// Number of cached responses.
    pub fn len(&self) -> usize {
        self.map
            .as_ref()
            .map_or(0, |m| m.lock().unwrap_or_else(|e| e.into_inner()).len())
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

    fn stamp(version: i64, status: &str) -> TokenStamp {
        TokenStamp {
            status: status.into(),
            version,
            granted_scopes: "[]".into(),
            failing_scopes: "[]".into(),
            token_type: Some("Bearer".into()),
            expires_at: Some(1),
            last_success_at: None,
            provider_id: "p".into(),
            provider_version: Some(1),
        }
    }

    fn entry(s: TokenStamp) -> Cached {
        let mut body = Map::new();
        body.insert("access_token".into(), json!("secret-canary"));
        Cached {
            stamp: s,
            workspace_id: "w".into(),
            body: Secret::new(body),
        }
    }

    #[test]
    fn serves_only_the_exact_stamp() {
        let c = TokenCache::new(10);
        c.put("a", entry(stamp(1, "active")));
        assert!(c.get("a", &stamp(1, "active")).is_some());
        assert!(c.get("a", &stamp(1, "revoked")).is_none());
        // The stale entry is gone, even for its old stamp.
        assert!(c.get("a", &stamp(1, "active")).is_none());
        c.put("a", entry(stamp(1, "active")));
        assert!(c.get("a", &stamp(2, "active")).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn is_bounded_and_can_be_disabled() {
        let c = TokenCache::new(2);
        for id in ["a", "b", "c"] {
            c.put(id, entry(stamp(1, "active")));
        }
        assert_eq!(c.len(), 2);
        assert!(c.get("a", &stamp(1, "active")).is_none(), "oldest evicted");
        let off = TokenCache::new(0);
        off.put("a", entry(stamp(1, "active")));
        assert!(off.get("a", &stamp(1, "active")).is_none());
    }

    #[test]
    fn debug_never_shows_secrets() {
        let e = entry(stamp(1, "active"));
        assert!(!format!("{e:?}").contains("secret-canary"));
    }
}
