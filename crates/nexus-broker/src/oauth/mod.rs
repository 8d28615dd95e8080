//! The OAuth 2.0 / OpenID Connect protocol pieces: discovery and JWKS (with
//! the Redis-shared cache), PKCE, signed `state`, id_token verification, and
//! the token-endpoint client used by the handshake, refresh and revocation.

pub mod client;
pub mod discovery;
pub mod id_token;
pub mod pkce;
pub mod shared_cache;
pub mod state_token;
