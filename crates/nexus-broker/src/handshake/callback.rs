//! The callback half of a handshake: the provider sends the browser back
//! with a code (or an error); the state is verified, the handshake consumed
//! exactly once, `iss` checked (RFC 9207), the code exchanged, the id_token
//! verified, UserInfo read, and the tokens stored sealed, all-or-nothing.

use super::{CallbackParams, HandshakeError, Handshakes};
use crate::events::audit::Actor;
use crate::events::audit::AuditEvent;
use crate::oauth::client::{
    fail, parse_token_response, token_request, ClientAuth, Failure, TokenSet,
};
use crate::oauth::discovery::Endpoints;
use crate::oauth::id_token::{self, IdTokenError};
use crate::oauth::state_token::{self, StateError};
use crate::registry::Provider;
use crate::store::{json_list, parse_json_list as parse_list};
use crate::store::{now_ms, Activation, ConnectionRow, HandshakeKind, HandshakeRow, Transition};
use crate::vault::Aad;
use nexus_core::outbound::{self, OutboundError};
use nexus_core::Secret;
use serde_json::{json, Map, Value};
use url::Url;

impl Handshakes {
    /// Handles the provider's redirect. `Ok` is where to send the browser (the
    /// return URL with `status=success` or `status=error`); `Err` means the
    /// state could not be trusted, so there is no return URL to use.
    ///
    /// `via` is the provider id in the path the browser came to (`None`:
    /// the shared redirect path). It must be the redirect URI the handshake
    /// was started with, or the response is refused without using the
    /// handshake up: an authorization response that arrives at another
    /// provider's redirect URI is the mark of a mix-up attack.
    pub async fn callback(
        &self,
        p: CallbackParams,
        via: Option<&str>,
        actor: &Actor,
    ) -> Result<String, HandshakeError> {
        let state = p
            .state
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or(HandshakeError::State("state is missing"))?;
        let handshake_id = state_token::verify(self.state_key.expose(), state, now_ms() / 1000)
            .map_err(|e| {
                metrics::counter!("nexus_callback_rejected_total", "reason" => state_reason(e))
                    .increment(1);
                HandshakeError::State(match e {
                    StateError::Expired => "state has expired; start the connection again",
                    StateError::BadSignature => "state signature is invalid",
                    StateError::Malformed => "state is malformed",
                })
            })?;
        let arrived_at = match via {
            Some(id) => format!("{}/{id}", self.redirect_uri),
            None => self.redirect_uri.clone(),
        };
        let kind = HandshakeKind::OAuth {
            redirect_uri: &arrived_at,
        };
        let hs = super::consume(&self.store, &handshake_id, kind).await?;
        let provider = self.registry.get(&hs.provider_id).await;
        let outcome = match &provider {
            Ok(provider) => self.complete(&hs, provider, &p, actor).await,
            Err(_) => Err(fail(
                "provider_not_found",
                "the provider was deleted during the handshake",
            )),
        };
        let provider_name = provider
            .as_ref()
            .map(|p| p.profile.name.clone())
            .unwrap_or_default();
        let mut url = Url::parse(&hs.return_url)
            .map_err(|_| HandshakeError::Invalid("stored return_url is invalid".into()))?;
        match outcome {
            Ok(()) => {
                metrics::counter!("nexus_handshakes_total", "outcome" => "success").increment(1);
                url.query_pairs_mut()
                    .append_pair("status", "success")
                    .append_pair("connection_id", &hs.connection_id)
                    .append_pair("provider", &provider_name);
            }
            Err(f) => {
                metrics::counter!("nexus_handshakes_total", "outcome" => f.code).increment(1);
                tracing::warn!(connection_id = %hs.connection_id, error = f.code, description = %f.description, "handshake failed");
                let audit = AuditEvent::new("connection.handshake_failed")
                    .actor(actor.name.clone())
                    .by(actor)
                    .provider(hs.provider_id.clone())
                    .connection(hs.connection_id.clone())
                    .workspace(hs.workspace_id.clone())
                    .detail(json!({"error": f.code, "description": f.description, "reconnect": hs.is_reconnect}));
                self.store
                    .fail_handshake(
                        &hs.connection_id,
                        hs.is_reconnect,
                        f.code,
                        &f.description,
                        &audit,
                    )
                    .await?;
                url.query_pairs_mut()
                    .append_pair("status", "error")
                    .append_pair("error", f.code)
                    .append_pair("connection_id", &hs.connection_id);
            }
        }
        Ok(url.to_string())
    }

    async fn complete(
        &self,
        hs: &HandshakeRow,
        provider: &Provider,
        p: &CallbackParams,
        actor: &Actor,
    ) -> Result<(), Failure> {
        if let Some(err) = &p.error {
            // Providers' error codes are short ASCII tokens; anything else is not echoed.
            let code = match err.as_str() {
                "access_denied" => "access_denied",
                "invalid_scope" => "invalid_scope",
                "consent_required" | "interaction_required" | "login_required" => {
                    "consent_required"
                }
                "temporarily_unavailable" | "server_error" => "provider_unavailable",
                _ => "provider_error",
            };
            // Anyone holding a consent URL controls this text: `fail` escapes it.
            let desc = p.error_description.as_deref().unwrap_or(err);
            return Err(fail(code, desc));
        }
        let code = p
            .code
            .as_ref()
            .map(|c| c.expose().as_str())
            .filter(|c| !c.is_empty())
            .ok_or_else(|| fail("invalid_callback", "callback has neither code nor error"))?;
        let endpoints = self
            .discovery
            .endpoints(&provider.profile)
            .await
            .map_err(|e| fail("provider_discovery_failed", e.to_string()))?;
        // RFC 9207: a provider that advertises iss must send it, and it must match.
        match (&p.iss, &endpoints.issuer) {
            (Some(iss), Some(expected)) if iss != expected => {
                return Err(fail(
                    "iss_mismatch",
                    "the authorization response came from another issuer",
                ))
            }
            (Some(_), None) => {}
            (None, Some(_)) if endpoints.iss_parameter_supported => {
                return Err(fail(
                    "iss_missing",
                    "the provider advertises iss in authorization responses but none was sent",
                ))
            }
            _ => {}
        }
        let verifier = match &hs.code_verifier {
            Some(env) => Some(
                self.keys
                    .decrypt_str(Aad::new("handshakes", &hs.id, "code_verifier"), env)
                    .map_err(|e| {
                        fail(
                            "internal_error",
                            format!("handshake verifier unreadable: {e}"),
                        )
                    })?,
            ),
            None => None,
        };
        let client_secret = self
            .registry
            .client_secret(provider)
            .map_err(|e| fail("internal_error", e.to_string()))?;
        // Expiry counts from the request, not the answer: the provider's
        // clock started before ours, and a token must never look valid
        // here after it has expired there.
        let asked_at = now_ms();
        let tokens = self
            .exchange(
                &endpoints,
                provider,
                client_secret.as_ref(),
                code,
                &hs.redirect_uri,
                verifier.as_ref(),
            )
            .await?;

        let requested = parse_list(&hs.scopes);
        let mut identity = Map::new();
        let client_id = provider.profile.client_id.clone().unwrap_or_default();
        if let Some(idt) = &tokens.id_token {
            let issuer = endpoints.issuer.as_deref().ok_or_else(|| {
                fail(
                    "invalid_id_token",
                    "provider has no issuer; cannot verify the id_token",
                )
            })?;
            let nonce = hs.nonce.as_deref().unwrap_or_default();
            let claims = id_token::verify(
                &self.discovery,
                endpoints.jwks_uri.as_deref(),
                idt.expose(),
                id_token::Expected {
                    issuer,
                    client_id: &client_id,
                    nonce,
                },
            )
            .await
            .map_err(|e: IdTokenError| fail("invalid_id_token", e.to_string()))?;
            for k in ["sub", "email", "name", "picture"] {
                if let Some(v) = claims.get(k) {
                    identity.insert(k.into(), v.clone());
                }
            }
        } else if requested.iter().any(|s| s == "openid") {
            return Err(fail(
                "invalid_id_token",
                "scope openid was requested but the token response has no id_token",
            ));
        }
        if let Some(userinfo) = &endpoints.userinfo {
            match self.userinfo(userinfo, &tokens.access_token).await {
                // OIDC Core §5.3.2: a UserInfo sub that differs from the id_token's must not be used.
                Ok(info)
                    if identity
                        .get("sub")
                        .is_some_and(|s| info.get("sub") != Some(s)) =>
                {
                    return Err(fail(
                        "userinfo_mismatch",
                        "UserInfo sub differs from the id_token sub",
                    ))
                }
                Ok(info) => {
                    for k in ["sub", "email", "name", "picture"] {
                        if let Some(v) = info.get(k) {
                            identity.insert(k.into(), v.clone());
                        }
                    }
                }
                // UserInfo is enrichment; the connection works without it.
                Err(e) => {
                    tracing::warn!(connection_id = %hs.connection_id, error = %e, "UserInfo request failed; identity from id_token only")
                }
            }
        }

        let granted: Vec<String> = match &tokens.scope {
            Some(s) => provider.profile.split_scopes(s),
            None => requested.clone(),
        };
        let previous = self
            .store
            .get_connection(&hs.connection_id)
            .await
            .map_err(|e| fail("internal_error", e.to_string()))?;
        let cid = &hs.connection_id;
        let seal = |col: &'static str, s: &Secret<String>| {
            self.keys.encrypt_str(Aad::new("connections", cid, col), s)
        };
        // A re-consent that returns no refresh token keeps the one we have
        // (`None` here: the store keeps the column as it is at write time, so
        // a refresh that rotated it meanwhile is not undone).
        let refresh_token = tokens
            .refresh_token
            .as_ref()
            .map(|rt| seal("refresh_token", rt));
        let has_refresh_token =
            refresh_token.is_some() || previous.as_ref().is_some_and(|c| c.refresh_token.is_some());
        let expires_at = tokens.expires_in.map(|s| asked_at + s * 1000);
        let activation = Activation {
            access_token: Some(seal("access_token", &tokens.access_token)),
            next_refresh_at: crate::tokens::schedule::next_refresh_at(
                &self.refresh,
                expires_at,
                has_refresh_token,
            ),
            refresh_token,
            id_token: tokens.id_token.as_ref().map(|t| seal("id_token", t)),
            credentials: None,
            token_type: Some(tokens.token_type.clone()),
            expires_at,
            granted_scopes: json_list(&granted),
            clears_failing: false,
            identity: (!identity.is_empty()).then(|| Value::Object(identity).to_string()),
        };
        // Decided under the row's lock (scope reports may land meanwhile).
        let transition = |before: &ConnectionRow, failing: &[String]| Transition {
            audit: AuditEvent::new("connection.active")
                .actor(actor.name.clone())
                .by(actor)
                .provider(hs.provider_id.clone())
                .connection(cid.clone())
                .workspace(hs.workspace_id.clone())
                .detail(json!({
                    "reconnect": hs.is_reconnect,
                    "previous_status": before.status,
                    "granted_scopes": granted,
                    "failing_scopes": failing,
                    "refresh_token": tokens.refresh_token.is_some(),
                })),
            event: Some(crate::events::webhooks::activation_event(
                before,
                Some(&provider.profile.name),
                failing,
            )),
        };
        self.store
            .activate_connection(cid, &activation, &transition)
            .await
            .map_err(|e| fail("internal_error", e.to_string()))
    }

    async fn exchange(
        &self,
        endpoints: &Endpoints,
        provider: &Provider,
        client_secret: Option<&Secret<String>>,
        code: &str,
        redirect_uri: &str,
        verifier: Option<&Secret<String>>,
    ) -> Result<TokenSet, Failure> {
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
        ];
        if let Some(v) = verifier {
            form.push(("code_verifier", v.expose()));
        }
        if let Some(r) = provider.profile.resource() {
            form.push(("resource", r));
        }
        let fetched = outbound::send(token_request(
            &self.http,
            &endpoints.token,
            ClientAuth::of(provider, client_secret),
            form,
        ))
        .await
        .map_err(|e| match e {
            OutboundError::TooLarge => fail(
                "token_exchange_failed",
                "token endpoint response is too large",
            ),
            other => fail("token_exchange_failed", other.to_string()),
        })?;
        parse_token_response(fetched.status, &fetched.body)
    }

    pub(super) async fn userinfo(
        &self,
        url: &str,
        access_token: &Secret<String>,
    ) -> Result<Map<String, Value>, String> {
        let f = outbound::send(
            self.http
                .get(url)
                .bearer_auth(access_token.expose())
                .header("accept", "application/json"),
        )
        .await
        .map_err(|e| e.to_string())?;
        if !f.status.is_success() {
            return Err(format!("UserInfo answered HTTP {}", f.status.as_u16()));
        }
        match serde_json::from_slice::<Value>(&f.body) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err("UserInfo answered a non-JSON body (signed UserInfo is not supported)".into()),
        }
    }
}

fn state_reason(e: StateError) -> &'static str {
    match e {
        StateError::Expired => "expired",
        StateError::BadSignature => "bad_signature",
        StateError::Malformed => "malformed",
    }
}
