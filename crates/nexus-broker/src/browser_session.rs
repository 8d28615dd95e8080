//! What the pages' sessions share (the connect portal's, the console's and
//! the capture form's): random tokens kept only as hashes, CSRF tokens bound
//! to a session, and the cookies that carry them.

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

/// How a cookie travels with requests other sites start.
#[derive(Debug, Clone, Copy)]
pub enum SameSite {
    /// Never: for pages reached only from Nexus's own.
    Strict,
    /// With top-level navigations: for cookies that must survive the way
    /// back from a provider's page.
    Lax,
}

/// A `Set-Cookie` value for a page's cookie: always `HttpOnly`, scoped to
/// `path`, `Secure` when the pages are served over https. `max_age_secs` 0
/// removes the cookie. `None` if the value is not header-safe.
pub fn set_cookie(
    name: &str,
    value: &str,
    path: &str,
    same_site: SameSite,
    max_age_secs: i64,
    secure: bool,
) -> Option<axum::http::HeaderValue> {
    let same_site = match same_site {
        SameSite::Strict => "Strict",
        SameSite::Lax => "Lax",
    };
    axum::http::HeaderValue::from_str(&format!(
        "{name}={value}; Path={path}; HttpOnly; SameSite={same_site}; Max-Age={max_age_secs}{}",
        if secure { "; Secure" } else { "" }
    ))
    .ok()
}

/// The value of the cookie `name` the request carries.
pub fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
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

    #[test]
    fn cookies_are_written_and_read_back() {
        let v = set_cookie("c", "v1", "/console", SameSite::Strict, 60, true).unwrap();
        assert_eq!(
            v.to_str().unwrap(),
            "c=v1; Path=/console; HttpOnly; SameSite=Strict; Max-Age=60; Secure"
        );
        let mut h = axum::http::HeaderMap::new();
        h.insert(axum::http::header::COOKIE, "a=1; c=v1".parse().unwrap());
        assert_eq!(cookie(&h, "c").as_deref(), Some("v1"));
        assert_eq!(cookie(&h, "b"), None);
    }
}
