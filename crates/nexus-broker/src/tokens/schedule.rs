//! Refresh scheduling maths: when a token is due, when the worker should
//! refresh it next, and how long to wait after a failure.

use std::time::Duration;

use crate::store::now_ms;
use nexus_core::backoff::{full_jitter, random_below};

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
    /// How long a replica that took over a lease from a cut-off refresh
    /// waits for that refresh's late commit before calling the provider
    /// itself (a holder that lost the database keeps retrying its commit).
    pub commit_grace: Duration,
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
            commit_grace: Duration::from_secs(10),
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
