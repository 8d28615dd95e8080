//! Fixed-window counters by key (a client address, a workspace, an agent
//! key), bounded in memory: the oldest keys are forgotten first. Per
//! process: with several replicas each counts its own share.

use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use hashlink::LruCache;

/// At most `max` events per `window` for each key.
pub struct Windows<K: Hash + Eq> {
    window: Duration,
    max: u32,
    /// Read (peeked) on every check, written on events.
    counts: RwLock<LruCache<K, (Instant, u32)>>,
    /// Whether anything was ever counted: checks on the hot path (every
    /// authenticated request asks whether its address is throttled) take
    /// no lock until the first event.
    touched: AtomicBool,
}

impl<K: Hash + Eq> Windows<K> {
    /// `max` events per `window` per key, tracking at most `keys` keys.
    pub fn new(max: u32, window: Duration, keys: usize) -> Self {
        Self {
            window,
            max,
            counts: RwLock::new(LruCache::new(keys)),
            touched: AtomicBool::new(false),
        }
    }

    /// How long until `key` may act again, if its window is full.
    pub fn exceeded(&self, key: &K) -> Option<Duration> {
        if !self.touched.load(Ordering::Relaxed) {
            return None;
        }
        let &(start, n) = self
            .counts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .peek(key)?;
        let left = self.window.saturating_sub(start.elapsed());
        // An ended window is replaced by the next `count`.
        (!left.is_zero() && n >= self.max).then_some(left)
    }

    /// Counts one event of `key`.
    pub fn count(&self, key: K) {
        self.touched.store(true, Ordering::Relaxed);
        let mut counts = self.counts.write().unwrap_or_else(|e| e.into_inner());
        match counts.get_mut(&key) {
            Some((start, n)) if start.elapsed() < self.window => *n += 1,
            _ => {
                counts.insert(key, (Instant::now(), 1));
            }
        }
    }

    /// Counts one event of `key` unless its window is full; then how long
    /// until it may act again.
    pub fn hit(&self, key: K) -> Result<(), Duration> {
        if let Some(wait) = self.exceeded(&key) {
            return Err(wait);
        }
        self.count(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_key_and_refuses_until_the_window_ends() {
        let w = Windows::new(2, Duration::from_millis(200), 10);
        assert!(w.hit("a").is_ok());
        assert!(w.hit("a").is_ok());
        let wait = w.hit("a").unwrap_err();
        assert!(wait <= Duration::from_millis(200));
        assert!(w.hit("b").is_ok(), "another key has its own window");
        std::thread::sleep(Duration::from_millis(250));
        assert!(w.hit("a").is_ok(), "a new window");
    }

    #[test]
    fn memory_is_bounded() {
        let w = Windows::new(1, Duration::from_secs(60), 3);
        for k in 0..100 {
            w.count(k);
        }
        assert_eq!(w.counts.read().unwrap().len(), 3);
    }
}
