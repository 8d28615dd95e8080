//! Upstream rate limits remembered: after a 429 with `Retry-After`, the
//! route's requests for that connection are answered 429 by the sidecar
//! until the time is up, without an upstream call, so an agent that loops
//! cannot get the account banned.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime};

use axum::http::HeaderValue;

/// The longest wait remembered (a provider asking for more is still
/// answered; the sidecar just stops shielding it after this).
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// Remembered waits by (route, connection).
#[derive(Debug, Default)]
pub struct RateMemory {
    until: RwLock<HashMap<(String, String), Instant>>,
    /// Whether anything is remembered: the common case takes no lock.
    any: AtomicBool,
}

impl RateMemory {
    /// The time left to wait, if any.
    pub fn wait(&self, route: &str, connection: &str) -> Option<Duration> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let now = Instant::now();
        let map = self.until.read().unwrap_or_else(|e| e.into_inner());
        map.get(&(route.to_string(), connection.to_string()))
            .and_then(|at| at.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Remembers an upstream's `Retry-After`.
    pub fn remember(&self, route: &str, connection: &str, wait: Duration) {
        let now = Instant::now();
        let mut map = self.until.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, at| *at > now);
        map.insert(
            (route.to_string(), connection.to_string()),
            now + wait.min(MAX_WAIT),
        );
        self.any.store(true, Ordering::Relaxed);
    }
}

/// A `Retry-After` value: seconds, or an HTTP date (RFC 9110 §10.2.3).
pub fn retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_remembered_per_route_and_connection() {
        let m = RateMemory::default();
        assert_eq!(m.wait("r", "c"), None);
        m.remember("r", "c", Duration::from_secs(30));
        let w = m.wait("r", "c").unwrap();
        assert!(w > Duration::from_secs(29) && w <= Duration::from_secs(30));
        assert_eq!(m.wait("r", "other"), None);
        assert_eq!(m.wait("other", "c"), None);
        m.remember("r", "c", Duration::ZERO);
        assert_eq!(m.wait("r", "c"), None);
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            retry_after(&HeaderValue::from_static("120"), now),
            Some(Duration::from_secs(120))
        );
        // RFC 9110's example date, 60 s after `now`.
        assert_eq!(
            retry_after(
                &HeaderValue::from_static("Sun, 06 Nov 1994 08:50:37 GMT"),
                now
            ),
            Some(Duration::from_secs(60))
        );
        assert_eq!(retry_after(&HeaderValue::from_static("soon"), now), None);
    }
}
