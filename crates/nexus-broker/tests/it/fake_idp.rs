//! A programmable fake OpenID provider on loopback, for the faults a real
//! provider will not produce on demand: tampered id_tokens, HTML or huge token
//! responses, issuer mismatches. It verifies PKCE for real and counts calls.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// How the token endpoint answers.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenMode {
    Normal,
    Html,
    ServerError,
    Huge,
    NoAccessToken,
    Slow(Duration),
    /// A JSON error body with status 400.
    Error(&'static str),
    /// Any status with a raw JSON body (e.g. 200 `{"ok":false,...}`).
    Raw(u16, &'static str),
}

/// How the id_token is made.
#[derive(Clone, Debug, PartialEq)]
pub enum IdTokenMode {
    Good,
    AlgNone,
    Hs256,
    UnknownKid,
    Absent,
}

pub struct Knobs {
    pub token_mode: TokenMode,
    pub id_token_mode: IdTokenMode,
    /// Claims merged over the defaults (iss, aud, sub, exp, iat, nonce).
    pub claim_overrides: Map<String, Value>,
    /// The nonce to put in the next id_token (tests copy it from the authorize URL).
    pub nonce: String,
    /// The S256 challenge the next code was issued for (from the authorize URL).
    pub challenge: String,
    pub discovery_issuer: Option<String>,
    pub iss_parameter_supported: bool,
    pub refresh_token: String,
    pub access_token: String,
    pub granted_scope: Option<String>,
    pub userinfo_sub: Option<String>,
    pub expires_in: i64,
    /// Whether refresh responses carry a (rotated) refresh token.
    pub rotate: bool,
    /// Leave `expires_in` out of token responses (a token without expiry).
    pub omit_expiry: bool,
    /// `Retry-After` header value on `Raw` answers.
    pub retry_after: Option<&'static str>,
    /// The revocation endpoint answers 503 this many times before 200.
    pub revocation_unavailable: usize,
    /// The token endpoint the discovery document names, instead of its own.
    pub token_endpoint: Option<String>,
}

#[derive(Default)]
pub struct Counters {
    pub token_requests: usize,
    pub discovery_requests: usize,
    pub conditional_discovery_requests: usize,
    pub jwks_requests: usize,
    pub userinfo_requests: usize,
    pub last_token_form: Map<String, Value>,
    pub refresh_requests: usize,
    /// Unix ms of the last refresh request.
    pub last_refresh_at: i64,
    pub last_token_auth: Option<String>,
    pub revocation_requests: usize,
    pub last_revocation_form: Map<String, Value>,
}

pub struct FakeIdp {
    pub base: String,
    pub knobs: Mutex<Knobs>,
    pub counters: Mutex<Counters>,
    key_pkcs8: Vec<u8>,
    public: Vec<u8>,
    pub client_id: String,
}

pub const KID: &str = "fake-key-1";

impl FakeIdp {
    pub async fn start() -> Arc<FakeIdp> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let idp = Arc::new(FakeIdp {
            base: base.clone(),
            knobs: Mutex::new(Knobs {
                token_endpoint: None,
                token_mode: TokenMode::Normal,
                id_token_mode: IdTokenMode::Good,
                claim_overrides: Map::new(),
                nonce: String::new(),
                challenge: String::new(),
                discovery_issuer: None,
                iss_parameter_supported: true,
                refresh_token: "fake-refresh-token".into(),
                access_token: "fake-access-token".into(),
                granted_scope: None,
                userinfo_sub: None,
                expires_in: 3600,
                rotate: true,
                omit_expiry: false,
                retry_after: None,
                revocation_unavailable: 0,
            }),
            counters: Mutex::new(Counters::default()),
            key_pkcs8: pkcs8.as_ref().to_vec(),
            public: pair.public_key().as_ref().to_vec(),
            client_id: "fake-client".into(),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/token", post(token))
            .route("/userinfo", get(userinfo))
            .route("/revoke", post(revoke))
            .with_state(idp.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        idp
    }

    pub fn knobs(&self) -> std::sync::MutexGuard<'_, Knobs> {
        self.knobs.lock().unwrap()
    }

    pub fn counters(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap()
    }

    /// A provider profile pointing at this fake through discovery.
    pub fn profile(&self, name: &str) -> Value {
        json!({
            "name": name,
            "auth_type": "oauth2",
            "client_id": self.client_id,
            "client_secret": "fake-client-secret",
            "issuer": self.base,
            "enable_discovery": true,
            "scopes": ["openid", "email", "calendar.read"],
            "params": {"access_type": "offline"}
        })
    }

    fn id_token(&self, k: &Knobs) -> Option<String> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut claims = json!({
            "iss": self.base, "aud": self.client_id, "sub": "alice", "exp": now + 300, "iat": now,
            "nonce": k.nonce, "email": "alice@example.test", "name": "Alice"
        });
        for (key, v) in &k.claim_overrides {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(key);
            } else {
                claims[key] = v.clone();
            }
        }
        let es256 = |kid: &str| {
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some(kid.into());
            jsonwebtoken::encode(&h, &claims, &EncodingKey::from_ec_der(&self.key_pkcs8)).unwrap()
        };
        match k.id_token_mode {
            IdTokenMode::Absent => None,
            IdTokenMode::Good => Some(es256(KID)),
            IdTokenMode::UnknownKid => Some(es256("rotated-away")),
            IdTokenMode::AlgNone => {
                let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
                let p = URL_SAFE_NO_PAD.encode(claims.to_string());
                Some(format!("{h}.{p}."))
            }
            IdTokenMode::Hs256 => {
                let mut h = Header::new(Algorithm::HS256);
                h.kid = Some(KID.into());
                // HS256 keyed with the public key bytes: the classic algorithm-confusion attack.
                Some(
                    jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(&self.public))
                        .unwrap(),
                )
            }
        }
    }
}

async fn discovery(State(idp): State<Arc<FakeIdp>>, headers: HeaderMap) -> Response {
    {
        let mut c = idp.counters();
        c.discovery_requests += 1;
        if headers.contains_key("if-none-match") {
            c.conditional_discovery_requests += 1;
        }
    }
    if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some("\"v1\"") {
        return (StatusCode::NOT_MODIFIED, [("etag", "\"v1\"")]).into_response();
    }
    let k = idp.knobs();
    let b = &idp.base;
    let doc = json!({
        "issuer": k.discovery_issuer.clone().unwrap_or_else(|| b.clone()),
        "authorization_endpoint": format!("{b}/authorize"),
        "token_endpoint": k.token_endpoint.clone().unwrap_or_else(|| format!("{b}/token")),
        "userinfo_endpoint": format!("{b}/userinfo"),
        "jwks_uri": format!("{b}/jwks"),
        "revocation_endpoint": format!("{b}/revoke"),
        "authorization_response_iss_parameter_supported": k.iss_parameter_supported,
        "code_challenge_methods_supported": ["S256"],
    });
    (
        [("etag", "\"v1\""), ("cache-control", "max-age=600")],
        Json(doc),
    )
        .into_response()
}

/// RFC 7009: 200 for any token of an authenticated client; 503 (with
/// Retry-After) while `revocation_unavailable` lasts.
async fn revoke(State(idp): State<Arc<FakeIdp>>, Form(form): Form<Map<String, Value>>) -> Response {
    {
        let mut c = idp.counters();
        c.revocation_requests += 1;
        c.last_revocation_form = form.clone();
    }
    let mut k = idp.knobs();
    if k.revocation_unavailable > 0 {
        k.revocation_unavailable -= 1;
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "0")],
            "busy",
        )
            .into_response();
    }
    if form.get("client_secret").and_then(Value::as_str) != Some("fake-client-secret") {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    StatusCode::OK.into_response()
}

async fn jwks(State(idp): State<Arc<FakeIdp>>) -> Json<Value> {
    idp.counters().jwks_requests += 1;
    let p = &idp.public;
    Json(json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": KID, "alg": "ES256", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])
    }]}))
}

async fn token(
    State(idp): State<Arc<FakeIdp>>,
    headers: HeaderMap,
    Form(form): Form<Map<String, Value>>,
) -> Response {
    {
        let mut c = idp.counters();
        c.token_requests += 1;
        c.last_token_form = form.clone();
        c.last_token_auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if form.get("grant_type").and_then(Value::as_str) == Some("refresh_token") {
            c.refresh_requests += 1;
            c.last_refresh_at = nexus_broker::store::now_ms();
        }
    }
    let (mode, challenge) = {
        let k = idp.knobs();
        (k.token_mode.clone(), k.challenge.clone())
    };
    match mode {
        TokenMode::Raw(status, body) => {
            let mut resp = (
                StatusCode::from_u16(status).unwrap(),
                [("content-type", "application/json")],
                body,
            )
                .into_response();
            if let Some(ra) = idp.knobs().retry_after {
                resp.headers_mut()
                    .insert("retry-after", ra.parse().unwrap());
            }
            return resp;
        }
        TokenMode::Html => {
            return (
                [("content-type", "text/html")],
                "<html><body>Sign in</body></html>",
            )
                .into_response()
        }
        TokenMode::ServerError => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded").into_response()
        }
        TokenMode::Huge => {
            return (
                [("content-type", "application/json")],
                vec![b' '; 10 * 1024 * 1024],
            )
                .into_response()
        }
        TokenMode::Slow(d) => tokio::time::sleep(d).await,
        TokenMode::Error(code) => {
            return (StatusCode::BAD_REQUEST, Json(json!({"error": code}))).into_response()
        }
        TokenMode::NoAccessToken | TokenMode::Normal => {}
    }
    if form.get("grant_type").and_then(Value::as_str) == Some("refresh_token") {
        let k = idp.knobs();
        let mut body = json!({"token_type": "Bearer", "expires_in": k.expires_in, "access_token": k.access_token});
        if k.rotate {
            body["refresh_token"] = json!(k.refresh_token);
        }
        if k.omit_expiry {
            body.as_object_mut().unwrap().remove("expires_in");
        }
        return Json(body).into_response();
    }
    // Real PKCE: the verifier must hash to the challenge of the authorize request.
    let verifier = form
        .get("code_verifier")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) != challenge {
        return (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": "invalid_grant", "error_description": "PKCE verification failed"}),
            ),
        )
            .into_response();
    }
    let k = idp.knobs();
    let mut body = json!({
        "token_type": "Bearer", "expires_in": k.expires_in,
        "access_token": k.access_token, "refresh_token": k.refresh_token,
    });
    if k.refresh_token.is_empty() {
        // A provider that issues no refresh token.
        body.as_object_mut().unwrap().remove("refresh_token");
    }
    if let Some(s) = &k.granted_scope {
        body["scope"] = json!(s);
    }
    if k.omit_expiry {
        body.as_object_mut().unwrap().remove("expires_in");
    }
    if mode == TokenMode::NoAccessToken {
        body.as_object_mut().unwrap().remove("access_token");
    }
    if let Some(t) = idp.id_token(&k) {
        body["id_token"] = json!(t);
    }
    Json(body).into_response()
}

async fn userinfo(State(idp): State<Arc<FakeIdp>>, headers: HeaderMap) -> Response {
    idp.counters().userinfo_requests += 1;
    let k = idp.knobs();
    let expected = format!("Bearer {}", k.access_token);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let sub = k.userinfo_sub.clone().unwrap_or_else(|| "alice".into());
    Json(json!({"sub": sub, "email": "alice@example.test", "name": "Alice A.", "picture": "https://example.test/alice.png"})).into_response()
}
