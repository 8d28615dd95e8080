//! What the pages' sessions share (the connect portal's and the console's):
//! random tokens kept only as hashes, and CSRF tokens bound to a session.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use aes_gcm::aead::rand_core::RngCore as _;
use aes_gcm::aead::OsRng;
use nexus_core::Secret;

/// A new random token: `prefix` + 32 random bytes, base64url.
pub fn new_token(prefix: &str) -> Secret<String> {
    let mut raw = [0u8; 32];
    OsRng.fill_bytes(&mut raw);
    Secret::new(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(raw)))
}

/// What is stored of a token (SHA-256, hex).
pub fn hash(token: &str) -> String {
    crate::registry::agent_keys::hash(token)
}

fn csrf_mac(key: &Secret<Vec<u8>>, purpose: &str, session_id: &str) -> Hmac<Sha256> {
    // HMAC accepts keys of any length.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key.expose())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(purpose.as_bytes());
    m.update(b"|");
    m.update(session_id.as_bytes());
    m
}

/// The CSRF token of a session's forms (`purpose` keeps the portal's and
/// the console's apart).
pub fn csrf_token(key: &Secret<Vec<u8>>, purpose: &str, session_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(csrf_mac(key, purpose, session_id).finalize().into_bytes())
}

/// Checks a CSRF token in constant time.
pub fn csrf_ok(key: &Secret<Vec<u8>>, purpose: &str, session_id: &str, token: &str) -> bool {
    URL_SAFE_NO_PAD
        .decode(token)
        .is_ok_and(|t| csrf_mac(key, purpose, session_id).verify_slice(&t).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_are_bound_to_purpose_and_session() {
        let key = Secret::new(vec![7u8; 32]);
        let t = csrf_token(&key, "console", "s1");
        assert!(csrf_ok(&key, "console", "s1", &t));
        assert!(!csrf_ok(&key, "connect", "s1", &t));
        assert!(!csrf_ok(&key, "console", "s2", &t));
        assert!(!csrf_ok(&key, "console", "s1", "not-base64!"));
        let a = new_token("nxs_");
        assert!(a.expose().starts_with("nxs_") && a.expose().len() > 40);
        assert_ne!(a.expose(), new_token("nxs_").expose());
    }
}
