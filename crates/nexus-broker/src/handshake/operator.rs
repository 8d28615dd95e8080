//! Operators sign in to the console through an OpenID provider (the
//! organisation's own: `CONSOLE_OIDC_ISSUER`), with the machinery the
//! connection handshakes use: discovery (issuer compared exactly), PKCE
//! S256, a signed `state`, a `nonce`, the ID token verified against the
//! provider's JWKS, RFC 9207 `iss` checked, UserInfo when the ID token
//! lacks a claim. Who may sign in is an allow-list of e-mail addresses
//! (verified ones only) or of groups.
//!
//! Nothing is stored until the sign-in succeeds: the verifier and the nonce
//! travel sealed (vault key, bound to the login id) in a short-lived,
//! `HttpOnly` cookie scoped to the callback, so the callback works on any
//! replica and only in the browser that started it (a login-CSRF defence).

use std::sync::Arc;

use serde_json::{json, Map, Value};
use url::Url;

use super::Handshakes;
use crate::oauth::client::{parse_token_response, token_request, ClientAuth};
use crate::oauth::discovery::Endpoints;
use crate::oauth::id_token::{self, Expected};
use crate::oauth::{pkce, state_token};
use crate::registry::profile::ProviderProfile;
use crate::store::now_ms;
use crate::vault::Aad;
use nexus_core::outbound;
use nexus_core::Secret;

/// How long a started sign-in may take at the provider.
pub const LOGIN_TTL_SECS: i64 = 600;

/// The console's single sign-on settings (`CONSOLE_OIDC_*`).
#[derive(Clone)]
pub struct OperatorSso {
    /// The issuer, compared exactly with the discovery document's.
    pub issuer: String,
    /// The console's client id at that provider.
    pub client_id: String,
    /// Its secret (none: a public client, PKCE alone).
    pub client_secret: Option<Arc<Secret<String>>>,
    /// Scopes asked for (`openid` among them).
    pub scopes: Vec<String>,
    /// E-mail addresses allowed in, lower-cased.
    pub operators: Vec<String>,
    /// Groups whose members are allowed in.
    pub groups: Vec<String>,
    /// The claim holding the groups.
    pub groups_claim: String,
    /// Where the provider sends the browser back (under the console's URL).
    pub redirect_uri: Url,
}

impl std::fmt::Debug for OperatorSso {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorSso")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("scopes", &self.scopes)
            .field("operators", &self.operators)
            .field("groups", &self.groups)
            .field("redirect_uri", &self.redirect_uri.as_str())
            .finish_non_exhaustive()
    }
}

/// Why a sign-in did not open a session. The messages are shown to the
/// person; none holds a code, a token or a verifier.
#[derive(Debug, thiserror::Error)]
pub enum SsoError {
    /// The state or the sign-in cookie is missing, forged or expired.
    #[error("this sign-in cannot be trusted or has expired ({0}); start again")]
    State(&'static str),
    /// The provider answered with an error (the person refused, …).
    #[error("the identity provider refused the sign-in: {0}")]
    Denied(String),
    /// The provider could not be used (discovery, token, ID token).
    #[error("the sign-in failed at the identity provider: {0}")]
    Provider(String),
    /// The person is not an operator.
    #[error("{0} is not allowed to use this console (CONSOLE_OPERATORS, CONSOLE_OPERATOR_GROUPS)")]
    NotAllowed(String),
}

impl SsoError {
    /// The error code of the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            SsoError::State(_) => "sso_state_invalid",
            SsoError::Denied(_) => "sso_denied",
            SsoError::Provider(_) => "sso_failed",
            SsoError::NotAllowed(_) => "operator_not_allowed",
        }
    }
}

/// A sign-in started: where to send the browser, and the cookie it keeps
/// until it comes back.
pub struct SsoStart {
    /// The provider's authorization URL.
    pub authorize_url: Url,
    /// The sealed verifier and nonce (the cookie's value).
    pub cookie: String,
}

/// Who signed in.
#[derive(Debug, Clone)]
pub struct SignedInOperator {
    /// Their (verified) e-mail address, lower-cased, or the subject.
    pub name: String,
    /// The provider's subject.
    pub subject: String,
    /// Why they were let in: `email` or `group:<name>`.
    pub allowed_by: String,
}

fn sealed_aad(login_id: &str) -> Aad<'_> {
    Aad::new("console_sso", login_id, "login")
}

impl OperatorSso {
    fn profile(&self) -> Result<ProviderProfile, SsoError> {
        serde_json::from_value(json!({
            "name": "console-sso",
            "auth_type": "oauth2",
            "client_id": self.client_id,
            "issuer": self.issuer,
            // Plain HTTP is accepted only on loopback (a test or a local
            // identity provider), by the egress rules discovery applies.
            "enable_discovery": true,
        }))
        .map_err(|e| SsoError::Provider(format!("CONSOLE_OIDC_ISSUER: {e}")))
    }

    /// Whether the claims name an operator, and why.
    fn allowed(&self, claims: &Map<String, Value>) -> Result<SignedInOperator, SsoError> {
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        // Only an address the provider says it verified: one a person can
        // type into their profile would let them name any operator.
        let verified = claims
            .get("email_verified")
            .is_some_and(|v| v.as_bool() == Some(true) || v.as_str() == Some("true"));
        let email = claims
            .get("email")
            .and_then(Value::as_str)
            .filter(|_| verified)
            .map(str::to_ascii_lowercase);
        let name = email.clone().unwrap_or_else(|| format!("sub:{subject}"));
        if let Some(e) = &email {
            if self.operators.iter().any(|o| o == e) {
                return Ok(SignedInOperator {
                    name,
                    subject,
                    allowed_by: "email".into(),
                });
            }
        }
        let groups: Vec<&str> = match claims.get(&self.groups_claim) {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            Some(Value::String(s)) => s.split([',', ' ']).collect(),
            _ => Vec::new(),
        };
        if let Some(g) = self.groups.iter().find(|g| groups.contains(&g.as_str())) {
            return Ok(SignedInOperator {
                name,
                subject,
                allowed_by: format!("group:{g}"),
            });
        }
        // The refusal names the address the person will recognise.
        let shown = match (email, claims.get("email").and_then(Value::as_str)) {
            (None, Some(unverified)) => {
                format!("{unverified} (an address the provider did not verify)")
            }
            _ => name,
        };
        Err(SsoError::NotAllowed(
            nexus_core::text::printable(&shown, 160).into_owned(),
        ))
    }
}

impl Handshakes {
    /// Starts an operator's sign-in: the provider's authorization URL and
    /// the sealed cookie. `login_hint` is passed on when given.
    pub async fn operator_start(
        &self,
        sso: &OperatorSso,
        login_hint: Option<&str>,
    ) -> Result<SsoStart, SsoError> {
        let endpoints = self.operator_endpoints(sso).await?;
        let login_id = uuid::Uuid::new_v4().simple().to_string();
        let verifier = pkce::verifier();
        let nonce = pkce::random_token(24);
        let exp = now_ms() / 1000 + LOGIN_TTL_SECS;
        let state = state_token::sign(self.state_key.expose(), &login_id, exp);
        let kept = Secret::new(
            json!({"login": login_id, "verifier": verifier.expose(), "nonce": nonce}).to_string(),
        );
        let cookie = format!(
            "{login_id}.{}",
            self.keys.encrypt_str(sealed_aad(&login_id), &kept)
        );
        let mut url = Url::parse(&endpoints.authorization)
            .map_err(|_| SsoError::Provider("the authorization endpoint is not a URL".into()))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("response_type", "code");
            q.append_pair("client_id", &sso.client_id);
            q.append_pair("redirect_uri", sso.redirect_uri.as_str());
            q.append_pair("scope", &sso.scopes.join(" "));
            q.append_pair("state", &state);
            q.append_pair("nonce", &nonce);
            q.append_pair("code_challenge", &pkce::challenge_s256(&verifier));
            q.append_pair("code_challenge_method", "S256");
            if let Some(hint) = login_hint.filter(|h| !h.is_empty() && h.len() <= 200) {
                q.append_pair("login_hint", hint);
            }
        }
        Ok(SsoStart {
            authorize_url: url,
            cookie,
        })
    }

    /// Finishes a sign-in from the provider's redirect (`query`: its
    /// parameters) and the cookie `operator_start` set: the operator, if
    /// the allow-list names them.
    pub async fn operator_finish(
        &self,
        sso: &OperatorSso,
        query: &std::collections::HashMap<String, String>,
        cookie: Option<&str>,
    ) -> Result<SignedInOperator, SsoError> {
        let state = query.get("state").ok_or(SsoError::State("no state"))?;
        let login_id = state_token::verify(self.state_key.expose(), state, now_ms() / 1000)
            .map_err(|_| SsoError::State("state"))?;
        let (cookie_login, sealed) = cookie
            .and_then(|c| c.split_once('.'))
            .ok_or(SsoError::State("no sign-in cookie in this browser"))?;
        if cookie_login != login_id {
            return Err(SsoError::State(
                "started in another browser or tab; one sign-in at a time",
            ));
        }
        let kept = self
            .keys
            .decrypt_str(sealed_aad(&login_id), sealed)
            .map_err(|_| SsoError::State("sign-in cookie"))?;
        let kept: Value =
            serde_json::from_str(kept.expose()).map_err(|_| SsoError::State("sign-in cookie"))?;
        let verifier = Secret::new(kept["verifier"].as_str().unwrap_or_default().to_string());
        let nonce = kept["nonce"].as_str().unwrap_or_default();
        // RFC 9207: a response from another issuer is a mix-up.
        if query.get("iss").is_some_and(|iss| *iss != sso.issuer) {
            return Err(SsoError::State("the response names another issuer"));
        }
        if let Some(error) = query.get("error") {
            let described = query
                .get("error_description")
                .map(|d| format!("{error}: {d}"))
                .unwrap_or_else(|| error.clone());
            return Err(SsoError::Denied(
                nexus_core::text::printable(&described, 200).into_owned(),
            ));
        }
        let code = query
            .get("code")
            .filter(|c| !c.is_empty())
            .ok_or(SsoError::State("no code in the response"))?;
        let endpoints = self.operator_endpoints(sso).await?;
        // As the handshakes: a provider that advertises `iss` must send it.
        if endpoints.iss_parameter_supported && !query.contains_key("iss") {
            return Err(SsoError::State(
                "the provider advertises iss in its answers but sent none",
            ));
        }
        let form = vec![
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", sso.redirect_uri.as_str()),
            ("code_verifier", verifier.expose().as_str()),
        ];
        // client_secret_basic: OpenID Connect's default.
        let client = ClientAuth {
            client_id: &sso.client_id,
            secret: sso.client_secret.as_deref(),
            basic: true,
        };
        let req = token_request(&self.http, &endpoints.token, client, form);
        let fetched = outbound::send(req)
            .await
            .map_err(|e| SsoError::Provider(format!("token endpoint: {e}")))?;
        let tokens = parse_token_response(fetched.status, &fetched.body)
            .map_err(|f| SsoError::Provider(format!("token endpoint: {}", f.description)))?;
        let id_token = tokens
            .id_token
            .as_ref()
            .ok_or_else(|| SsoError::Provider("the token answer has no id_token".into()))?;
        let mut claims = id_token::verify(
            &self.discovery,
            endpoints.jwks_uri.as_deref(),
            id_token.expose(),
            Expected {
                issuer: &sso.issuer,
                client_id: &sso.client_id,
                nonce,
            },
        )
        .await
        .map_err(|e| SsoError::Provider(format!("ID token: {e}")))?;
        let wants_userinfo = !claims.contains_key("email")
            || !claims.contains_key("email_verified")
            || (!sso.groups.is_empty() && !claims.contains_key(&sso.groups_claim));
        if let (true, Some(url)) = (wants_userinfo, endpoints.userinfo.as_deref()) {
            let info = self
                .userinfo(url, &tokens.access_token)
                .await
                .map_err(|e| SsoError::Provider(format!("UserInfo: {e}")))?;
            // OIDC Core §5.3.2: UserInfo must be about the same subject.
            if info.get("sub") != claims.get("sub") {
                return Err(SsoError::Provider(
                    "UserInfo names another subject than the ID token".into(),
                ));
            }
            for (k, v) in info {
                claims.entry(k).or_insert(v);
            }
        }
        sso.allowed(&claims)
    }

    async fn operator_endpoints(&self, sso: &OperatorSso) -> Result<Endpoints, SsoError> {
        self.discovery
            .endpoints(&sso.profile()?)
            .await
            .map_err(|e| SsoError::Provider(format!("discovery: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sso() -> OperatorSso {
        OperatorSso {
            issuer: "https://id.example.com".into(),
            client_id: "console".into(),
            client_secret: None,
            scopes: vec!["openid".into(), "email".into()],
            operators: vec!["alice@example.com".into()],
            groups: vec!["nexus-operators".into()],
            groups_claim: "groups".into(),
            redirect_uri: Url::parse("https://nexus.example.com/console/sso/callback").unwrap(),
        }
    }

    fn claims(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn the_allow_list_takes_verified_addresses_or_groups() {
        let s = sso();
        let ok = s
            .allowed(&claims(
                json!({"sub": "1", "email": "Alice@Example.com", "email_verified": true}),
            ))
            .unwrap();
        assert_eq!(
            (ok.name.as_str(), ok.allowed_by.as_str()),
            ("alice@example.com", "email")
        );
        // An unverified address is no address; nor is one nobody vouched
        // for (some providers never say).
        for unverified in [
            json!({"sub": "1", "email": "alice@example.com", "email_verified": false}),
            json!({"sub": "1", "email": "alice@example.com"}),
        ] {
            let e = s.allowed(&claims(unverified)).unwrap_err();
            assert_eq!(e.code(), "operator_not_allowed");
        }
        let g = s
            .allowed(&claims(json!({"sub": "2", "email": "bob@example.com", "email_verified": true, "groups": ["staff", "nexus-operators"]})))
            .unwrap();
        assert_eq!(g.allowed_by, "group:nexus-operators");
        let no = s
            .allowed(&claims(
                json!({"sub": "3", "email": "eve@example.com", "groups": ["staff"]}),
            ))
            .unwrap_err();
        assert!(no.to_string().contains("eve@example.com"), "{no}");
    }
}
