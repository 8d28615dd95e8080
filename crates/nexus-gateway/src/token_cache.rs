//! The gateway's copy of token responses, so a warm fetch costs no broker
//! round trip.
//!
//! The broker decides what may be kept and for how long (see
//! `nexus_core::wire`): an answer is kept only when it carries
//! `x-nexus-cacheable-ms`, for at most that long, and only while the
//! broker's change stream is open and has said ready ([`TokenCache::set_live`]).
//! Every change the stream announces drops the entry (or everything); losing
//! the stream drops everything. Entries are bounded (the oldest
//! evicted) and held in [`Secret`]. Tokens served from here are counted and
//! reported back to the broker for its audit log ([`TokenCache::take_served`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use hashlink::LruCache;
use nexus_core::time::now_ms;
use nexus_core::wire::{CACHEABLE_HEADER, EXPIRES_AT_HEADER};
use nexus_core::Secret;

use crate::broker::Reply;

/// The longest any entry is kept, whatever the broker says.
const MAX_KEEP: Duration = Duration::from_secs(60);

struct Entry {
    /// The answer up to (not including) `"expires_in":`, which is computed
    /// when served.
    prefix: Secret<Vec<u8>>,
    expires_at: Option<i64>,
    until: Instant,
}

/// Tokens served from the cache for one connection, not yet reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// How many.
    pub count: u64,
    /// First (unix ms).
    pub first_at: i64,
    /// Last (unix ms).
    pub last_at: i64,
}

/// Bounded token responses by connection id. Capacity 0 disables it.
///
/// Reads (every warm fetch) take the map's read lock and do not reorder it,
/// so concurrent fetches never wait on each other; eviction is therefore by
/// insertion order, which costs nothing here: an entry lives a second or so.
/// Served counts are kept in shards by connection, so two fetches contend
/// only when they are for connections of the same shard.
pub struct TokenCache {
    map: Option<RwLock<LruCache<String, Arc<Entry>>>>,
    live: AtomicBool,
    /// Bumped by every drop, so an answer fetched before a drop is not kept.
    epoch: AtomicU64,
    served: [Mutex<HashMap<String, Served>>; SHARDS],
}

/// Shards of the served counts.
const SHARDS: usize = 16;

fn shard_of(id: &str) -> usize {
    // FNV-1a: cheap, and spread enough for random connection ids.
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h as usize % SHARDS
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere mid-update leaves whole entries; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

impl TokenCache {
    /// A cache of at most `capacity` answers; not live until the change
    /// stream says ready.
    pub fn new(capacity: usize) -> Self {
        Self {
            map: (capacity > 0).then(|| RwLock::new(LruCache::new(capacity))),
            live: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            served: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    /// The answer for `id`, if one may be served now. Counts it as served.
    pub fn get(&self, id: &str) -> Option<Bytes> {
        if !self.live.load(Ordering::Acquire) {
            return None;
        }
        let map = self.map.as_ref()?;
        let entry = read(map).peek(id)?.clone();
        if entry.until <= Instant::now() {
            // Expired (once per entry): drop it unless it was replaced meanwhile.
            let mut map = write(map);
            if map.peek(id).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                map.remove(id);
            }
            return None;
        }
        let now = now_ms();
        let body = Bytes::from(nexus_core::wire::complete(
            entry.prefix.expose(),
            entry.expires_at,
            now,
        ));
        add_served(
            &mut lock(&self.served[shard_of(id)]),
            id,
            Served {
                count: 1,
                first_at: now,
                last_at: now,
            },
        );
        Some(body)
    }

    /// The current epoch: take it before asking the broker.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Keeps a broker answer fetched after `epoch` was taken, if the broker
    /// allows it, the cache is live, and nothing was dropped since.
    pub fn put(&self, id: &str, reply: &Reply, epoch: u64) {
        let Some(map) = self.map.as_ref() else { return };
        let header = |name: &str| {
            reply
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i64>().ok())
        };
        let Some(keep) = header(CACHEABLE_HEADER).filter(|ms| *ms > 0) else {
            return;
        };
        let expires_at = header(EXPIRES_AT_HEADER);
        let Some(prefix) = prefix_of(&reply.body, expires_at.is_some()) else {
            return;
        };
        let keep = Duration::from_millis(keep as u64).min(MAX_KEEP);
        let entry = Arc::new(Entry {
            prefix: Secret::new(prefix),
            expires_at,
            until: Instant::now() + keep,
        });
        let mut map = write(map);
        if self.live.load(Ordering::Acquire) && self.epoch.load(Ordering::Acquire) == epoch {
            map.insert(id.to_string(), entry);
        }
    }

    /// Drops one connection's answer.
    pub fn forget(&self, id: &str) {
        if let Some(m) = &self.map {
            let mut map = write(m);
            self.epoch.fetch_add(1, Ordering::AcqRel);
            map.remove(id);
        }
    }

    /// Drops everything.
    pub fn clear(&self) {
        if let Some(m) = &self.map {
            let mut map = write(m);
            self.epoch.fetch_add(1, Ordering::AcqRel);
            map.clear();
        }
    }

    /// Marks the change stream open and ready (or not); either way the
    /// cache starts empty: nothing kept before heard every change since.
    pub fn set_live(&self, live: bool) {
        self.clear();
        self.live.store(live, Ordering::Release);
        self.clear();
    }

    /// Whether answers are being kept.
    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Number of answers held.
    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| read(m).len())
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tokens served since the last call, by connection.
    pub fn take_served(&self) -> HashMap<String, Served> {
        let mut all = HashMap::new();
        for shard in &self.served {
            all.extend(std::mem::take(&mut *lock(shard)));
        }
        all
    }

    /// Puts back counts that could not be reported (the broker was away).
    pub fn restore_served(&self, back: HashMap<String, Served>) {
        for (id, b) in back {
            add_served(&mut lock(&self.served[shard_of(&id)]), &id, b);
        }
    }
}

/// Adds `more` to a connection's tally.
fn add_served(served: &mut HashMap<String, Served>, id: &str, more: Served) {
    match served.get_mut(id) {
        Some(s) => {
            s.count += more.count;
            s.first_at = s.first_at.min(more.first_at);
            s.last_at = s.last_at.max(more.last_at);
        }
        None => {
            served.insert(id.to_string(), more);
        }
    }
}

/// The broker's token answer as a prefix [`nexus_core::wire::complete`]
/// closes again: without its closing `"expires_in":N}` (the broker writes
/// that member last) when the token expires, else without its closing `}`.
/// `None` if the answer is not in that form.
fn prefix_of(body: &[u8], expires: bool) -> Option<Vec<u8>> {
    const KEY: &[u8] = b"\"expires_in\":";
    let tail = body
        .windows(KEY.len())
        .rposition(|w| w == KEY)
        .and_then(|at| Some((at, body[at + KEY.len()..].strip_suffix(b"}")?)));
    match tail {
        Some((at, rest)) if !rest.is_empty() && rest.iter().all(u8::is_ascii_digit) => {
            expires.then(|| body[..at].to_vec())
        }
        // An older broker wrote null without expiry.
        Some((at, b"null")) => (!expires).then(|| body[..at].to_vec()),
        Some(_) => None,
        None if expires => None,
        None => {
            let mut prefix = body.strip_suffix(b"}")?.to_vec();
            if prefix.last() != Some(&b'{') {
                prefix.push(b',');
            }
            Some(prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue, StatusCode};

    fn reply(keep_ms: Option<i64>, expires_at: Option<i64>, body: &str) -> Reply {
        let mut headers = HeaderMap::new();
        if let Some(k) = keep_ms {
            headers.insert(CACHEABLE_HEADER, HeaderValue::from(k));
        }
        if let Some(e) = expires_at {
            headers.insert(EXPIRES_AT_HEADER, HeaderValue::from(e));
        }
        Reply {
            status: StatusCode::OK,
            headers,
            body: Bytes::from(body.to_string()),
        }
    }

    const BODY: &str = r#"{"access_token":"canary-at","expires_in":99}"#;
    /// A static credential's answer: no expiry, no `expires_in`.
    const STATIC: &str = r#"{"credentials":{"api_key":"canary-key"}}"#;

    #[test]
    fn keeps_only_what_the_broker_allows_while_live() {
        let c = TokenCache::new(10);
        c.put("a", &reply(Some(1000), None, STATIC), c.epoch());
        assert!(c.is_empty(), "not live yet");
        c.set_live(true);
        c.put("b", &reply(None, None, STATIC), c.epoch());
        assert!(c.is_empty(), "no header, not kept");
        c.put(
            "b",
            &reply(Some(1000), Some(now_ms() + 60_000), r#"{"x":1}"#),
            c.epoch(),
        );
        assert!(c.is_empty(), "an expiry but no expires_in member, not kept");
        let before = c.epoch();
        c.forget("z");
        c.put("b", &reply(Some(1000), None, STATIC), before);
        assert!(c.is_empty(), "fetched before a drop, not kept");
        c.put("b", &reply(Some(1000), None, STATIC), c.epoch());
        assert_eq!(c.len(), 1);
        c.set_live(false);
        assert!(c.get("b").is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn serves_with_expires_in_computed_now_and_counts() {
        let c = TokenCache::new(10);
        c.set_live(true);
        let exp = now_ms() + 3_600_000;
        c.put("a", &reply(Some(1000), Some(exp), BODY), c.epoch());
        let body: serde_json::Value = serde_json::from_slice(&c.get("a").unwrap()).unwrap();
        assert_eq!(body["access_token"], "canary-at");
        let left = body["expires_in"].as_i64().unwrap();
        assert!((3595..=3600).contains(&left), "{left}");
        c.get("a").unwrap();
        let served = c.take_served();
        assert_eq!(served["a"].count, 2);
        assert!(c.take_served().is_empty());
        c.restore_served(served);
        assert_eq!(c.take_served()["a"].count, 2);
        // Without expiry: served as the broker sent it, no `expires_in`.
        c.put("n", &reply(Some(1000), None, STATIC), c.epoch());
        assert_eq!(&c.get("n").unwrap()[..], STATIC.as_bytes());
    }

    #[test]
    fn entries_end_when_the_broker_said() {
        let c = TokenCache::new(10);
        c.set_live(true);
        c.put("a", &reply(Some(30), None, STATIC), c.epoch());
        assert!(c.get("a").is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(c.get("a").is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn drops_one_or_all_and_is_bounded() {
        let c = TokenCache::new(2);
        c.set_live(true);
        for id in ["a", "b", "c"] {
            c.put(id, &reply(Some(1000), None, STATIC), c.epoch());
        }
        assert_eq!(c.len(), 2);
        c.forget("c");
        assert_eq!(c.len(), 1);
        c.clear();
        assert!(c.is_empty());
        let off = TokenCache::new(0);
        off.set_live(true);
        off.put("a", &reply(Some(1000), None, STATIC), off.epoch());
        assert!(off.get("a").is_none());
    }

    #[test]
    fn prefixes_close_again_into_the_same_answer() {
        let p = |body: &[u8], expires| prefix_of(body, expires);
        assert_eq!(
            p(br#"{"a":"\"expires_in\":1","expires_in":5}"#, true).as_deref(),
            Some(&br#"{"a":"\"expires_in\":1","#[..])
        );
        assert_eq!(
            p(br#"{"expires_in":null}"#, false).as_deref(),
            Some(&b"{"[..])
        );
        assert_eq!(p(br#"{"expires_in":5,"x":1}"#, true), None);
        assert_eq!(p(br#"{"expires_in":-5}"#, true), None);
        assert_eq!(p(br#"{"a":1}"#, true), None, "expiry without expires_in");
        assert_eq!(
            p(br#"{"expires_in":5}"#, false),
            None,
            "expires_in without expiry"
        );
        for body in [&br#"{"a":1,"b":"x"}"#[..], b"{}"] {
            let prefix = p(body, false).unwrap();
            assert_eq!(nexus_core::wire::complete(&prefix, None, 0), body);
        }
    }
}
