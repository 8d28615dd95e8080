//! id_token verification (OIDC Core §3.1.3.7): signature through the issuer's
//! JWKS, an algorithm allowlist (never `none`, never HS*), exact `iss`, `aud`
//! containing our client id, `azp` when there are several audiences,
//! `exp`/`iat` with a small leeway, and the handshake's `nonce`.

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::oauth::discovery::{Discovery, DiscoveryError};
use crate::store::now_ms;

/// Asymmetric algorithms accepted for id_tokens.
pub const ALLOWED_ALGS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Clock skew tolerated on `exp` and `iat`, in seconds.
pub const LEEWAY_SECS: u64 = 60;

/// Why an id_token was refused. Never carries the token itself.
#[derive(Debug, thiserror::Error)]
pub enum IdTokenError {
    /// Not a JWS, or an algorithm jsonwebtoken does not know (such as `none`).
    #[error("id_token is malformed or uses an unknown algorithm")]
    Malformed,
    /// A known but refused algorithm (HS*).
    #[error("id_token algorithm {0:?} is not allowed")]
    AlgorithmNotAllowed(Algorithm),
    /// No key in the JWKS matches the token's `kid`, even after a refetch.
    #[error("id_token is signed with an unknown key (kid {0:?})")]
    UnknownKey(Option<String>),
    /// The provider has no JWKS URL.
    #[error("provider publishes no jwks_uri; cannot verify id_tokens")]
    NoJwks,
    /// Fetching the JWKS failed.
    #[error("JWKS: {0}")]
    Jwks(#[from] DiscoveryError),
    /// Signature, `iss`, `aud`, `exp` or another standard claim failed.
    #[error("id_token rejected: {0}")]
    Invalid(String),
    /// `nonce` missing or different from the handshake's.
    #[error("id_token nonce does not match the handshake")]
    Nonce,
    /// `azp` missing with several audiences, or naming another client.
    #[error("id_token azp does not name this client")]
    Azp,
    /// `iat` is in the future.
    #[error("id_token issued in the future")]
    IssuedInFuture,
}

impl IdTokenError {
    /// Short reason for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::AlgorithmNotAllowed(_) => "algorithm",
            Self::UnknownKey(_) => "unknown_kid",
            Self::NoJwks | Self::Jwks(_) => "jwks",
            Self::Invalid(_) => "claims",
            Self::Nonce => "nonce",
            Self::Azp => "azp",
            Self::IssuedInFuture => "iat",
        }
    }
}

/// What the token must match.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// Issuer, compared exactly.
    pub issuer: &'a str,
    /// Our client id.
    pub client_id: &'a str,
    /// The handshake's nonce.
    pub nonce: &'a str,
}

fn find_key<'a>(set: &'a JwkSet, kid: Option<&str>, alg: Algorithm) -> Option<&'a Jwk> {
    let usable = |k: &&Jwk| {
        k.common
            .public_key_use
            .as_ref()
            .is_none_or(|u| *u == jsonwebtoken::jwk::PublicKeyUse::Signature)
            && k.common
                .key_algorithm
                .is_none_or(|a| format!("{a:?}") == format!("{alg:?}"))
    };
    match kid {
        Some(kid) => set
            .keys
            .iter()
            .filter(usable)
            .find(|k| k.common.key_id.as_deref() == Some(kid)),
        // Without a kid, only an unambiguous single usable key is acceptable.
        None => {
            let mut keys = set.keys.iter().filter(usable);
            match (keys.next(), keys.next()) {
                (Some(k), None) => Some(k),
                _ => None,
            }
        }
    }
}

/// Verifies `token` and returns its claims.
pub async fn verify(
    discovery: &Discovery,
    jwks_uri: Option<&str>,
    token: &str,
    expected: Expected<'_>,
) -> Result<Map<String, Value>, IdTokenError> {
    let result = verify_inner(discovery, jwks_uri, token, expected).await;
    if let Err(e) = &result {
        metrics::counter!("nexus_id_token_verification_failures_total", "reason" => e.reason())
            .increment(1);
    }
    result
}

async fn verify_inner(
    discovery: &Discovery,
    jwks_uri: Option<&str>,
    token: &str,
    expected: Expected<'_>,
) -> Result<Map<String, Value>, IdTokenError> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| IdTokenError::Malformed)?;
    if !ALLOWED_ALGS.contains(&header.alg) {
        return Err(IdTokenError::AlgorithmNotAllowed(header.alg));
    }
    let jwks_uri = jwks_uri.ok_or(IdTokenError::NoJwks)?;
    let kid = header.kid.as_deref();
    let parse = |v: &Value| {
        serde_json::from_value::<JwkSet>(v.clone()).map_err(|_| DiscoveryError::NotJson("jwks"))
    };
    let mut set = parse(&*discovery.jwks(jwks_uri, false).await?)?;
    if find_key(&set, kid, header.alg).is_none() {
        // Keys rotate: one (rate-limited) refetch before giving up.
        set = parse(&*discovery.jwks(jwks_uri, true).await?)?;
    }
    let jwk = find_key(&set, kid, header.alg)
        .ok_or_else(|| IdTokenError::UnknownKey(header.kid.clone()))?;
    let key = DecodingKey::from_jwk(jwk)
        .map_err(|e| IdTokenError::Invalid(format!("unusable JWK: {e}")))?;

    let mut v = Validation::new(header.alg);
    v.algorithms = vec![header.alg];
    v.leeway = LEEWAY_SECS;
    v.set_issuer(&[expected.issuer]);
    v.set_audience(&[expected.client_id]);
    v.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v)
        .map_err(|e| IdTokenError::Invalid(e.to_string()))?;
    let claims = data.claims;

    let iat = claims
        .get("iat")
        .and_then(Value::as_i64)
        .ok_or_else(|| IdTokenError::Invalid("iat is not a number".into()))?;
    if iat > now_ms() / 1000 + LEEWAY_SECS as i64 {
        return Err(IdTokenError::IssuedInFuture);
    }
    match claims.get("nonce").and_then(Value::as_str) {
        Some(n) if n == expected.nonce => {}
        _ => return Err(IdTokenError::Nonce),
    }
    let several_audiences = claims
        .get("aud")
        .and_then(Value::as_array)
        .is_some_and(|a| a.len() > 1);
    match claims.get("azp").and_then(Value::as_str) {
        Some(azp) if azp != expected.client_id => return Err(IdTokenError::Azp),
        None if several_audiences => return Err(IdTokenError::Azp),
        _ => {}
    }
    Ok(claims)
}
