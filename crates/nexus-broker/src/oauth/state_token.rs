//! Signed OAuth `state`: `<handshake id>.<expiry unix s>.<HMAC-SHA256>`.
//!
//! The signature (keyed with `STATE_KEY`) lets the callback refuse forged or
//! expired states before touching the database; the handshake row it names
//! is then consumed exactly once.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a state was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Not in the expected shape.
    #[error("state is malformed")]
    Malformed,
    /// Signature does not verify (tampered, or signed with another key).
    #[error("state signature is invalid")]
    BadSignature,
    /// Past its expiry.
    #[error("state has expired")]
    Expired,
}

fn mac(key: &[u8], id: &str, exp: i64) -> HmacSha256 {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(b"nexus-state-v1|");
    m.update(id.as_bytes());
    m.update(b"|");
    m.update(exp.to_string().as_bytes());
    m
}

/// Signs a state for handshake `id` expiring at `exp` (unix seconds).
pub fn sign(key: &[u8], id: &str, exp: i64) -> String {
    let tag = mac(key, id, exp).finalize().into_bytes();
    format!("{id}.{exp}.{}", URL_SAFE_NO_PAD.encode(tag))
}

/// Verifies a state and returns the handshake id.
pub fn verify(key: &[u8], state: &str, now: i64) -> Result<String, StateError> {
    let mut parts = state.split('.');
    let (Some(id), Some(exp), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(StateError::Malformed);
    };
    if id.is_empty() || id.len() > 64 {
        return Err(StateError::Malformed);
    }
    let exp: i64 = exp.parse().map_err(|_| StateError::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| StateError::Malformed)?;
    // verify_slice compares in constant time.
    mac(key, id, exp)
        .verify_slice(&sig)
        .map_err(|_| StateError::BadSignature)?;
    if now > exp {
        return Err(StateError::Expired);
    }
    Ok(id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn round_trip_and_refusals() {
        let s = sign(KEY, "h1", 1000);
        assert_eq!(verify(KEY, &s, 999).unwrap(), "h1");
        assert_eq!(verify(KEY, &s, 1001), Err(StateError::Expired));
        assert_eq!(
            verify(b"another-key-another-key-another!", &s, 0),
            Err(StateError::BadSignature)
        );
        let tampered = s.replacen("h1", "h2", 1);
        assert_eq!(verify(KEY, &tampered, 0), Err(StateError::BadSignature));
        let later = s.replacen(".1000.", ".9999.", 1);
        assert_eq!(verify(KEY, &later, 0), Err(StateError::BadSignature));
        for bad in ["", "a.b", "a.1.!!", "a.x.AAAA", "a.1.AAAA.b"] {
            assert!(verify(KEY, bad, 0).is_err(), "{bad}");
        }
    }
}
