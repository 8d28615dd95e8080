//! Retry pauses: capped exponential backoff with full jitter.

use std::time::Duration;

/// A uniformly random number in `0..n` (0 when `n` is 0). Jitter needs
/// spread, not unpredictability, so a fast non-cryptographic generator does.
pub fn random_below(n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        fastrand::u64(0..n)
    }
}

/// A random delay up to `base × 2^(attempt−1)`, capped at `cap` ("full
/// jitter"): retries of many clients spread out instead of arriving together.
///
/// ```
/// use std::time::Duration;
/// let d = nexus_core::backoff::full_jitter(Duration::from_millis(500), Duration::from_secs(30), 3);
/// assert!(d <= Duration::from_secs(2));
/// ```
pub fn full_jitter(base: Duration, cap: Duration, attempt: i64) -> Duration {
    let exp = (base.as_millis() as u64)
        .saturating_mul(2u64.saturating_pow((attempt.max(1) - 1).min(20) as u32));
    let capped = exp.min(cap.as_millis() as u64);
    Duration::from_millis(random_below(capped + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_under_the_cap_and_the_exponential() {
        for attempt in 1..40 {
            let d = full_jitter(Duration::from_secs(1), Duration::from_secs(60), attempt);
            assert!(d <= Duration::from_secs(60));
            if attempt <= 3 {
                assert!(d <= Duration::from_secs(1 << (attempt - 1)));
            }
        }
        assert_eq!(random_below(0), 0);
    }
}
