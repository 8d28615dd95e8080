//! Random values for a handshake: PKCE verifier and S256 challenge (RFC 7636),
//! OIDC nonce.

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::OsRng;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use nexus_core::Secret;

/// `n` random bytes, URL-safe base64 without padding.
pub fn random_token(n: usize) -> String {
    let mut buf = vec![0u8; n];
    OsRng.fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// A fresh code verifier: 32 random bytes → 43 characters, within RFC 7636's 43..128.
pub fn verifier() -> Secret<String> {
    Secret::new(random_token(32))
}

/// The S256 challenge of a verifier.
///
/// ```
/// use nexus_broker::oauth::pkce::challenge_s256;
/// use nexus_core::Secret;
/// // RFC 7636 appendix B.
/// let v = Secret::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".to_string());
/// assert_eq!(challenge_s256(&v), "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
/// ```
pub fn challenge_s256(verifier: &Secret<String>) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.expose().as_bytes()))
}
