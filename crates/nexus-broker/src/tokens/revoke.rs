//! Revocation: `DELETE /connections/{id}` (SPEC §3).
//!
//! The broker asks the provider to revoke the grant (RFC 7009, with the
//! refresh token and the client's authentication; retried on 503 and on
//! transport errors, a few times), then erases every local secret and marks
//! the connection `revoked` whatever the provider said: a person who
//! disconnects must never find the broker still holding their tokens.
//! A refresh in flight is waited for first (its lease), so the token sent to
//! the provider is the current one and no refresh lands after the erasure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::error::TokenError;
use super::refresh::Refresher;
use crate::events::audit::Actor;
use crate::events::audit::AuditEvent;
use crate::events::webhooks;
use crate::oauth::client::{token_request, ClientAuth};
use crate::registry::profile::AuthType;
use crate::registry::Provider;
use crate::store::{now_ms, ConnectionRow, ConnectionStatus, Transition};
use crate::vault::Aad;
use nexus_core::outbound;

/// Tries at the revocation endpoint before giving up on it.
const ATTEMPTS: u32 = 3;

/// What the provider said.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderRevocation {
    /// `revoked`, `failed`, `unsupported` (no revocation endpoint),
    /// `not_applicable` (static credentials, or nothing to revoke) or
    /// `provider_deleted`.
    pub result: &'static str,
    /// Which token was sent (`refresh_token` or `access_token`).
    pub token_type_hint: Option<&'static str>,
    /// HTTP status of the last attempt.
    pub http_status: Option<u16>,
    /// Attempts made.
    pub attempts: u32,
    /// Why it failed (never a secret).
    pub error: Option<String>,
}

impl ProviderRevocation {
    fn skipped(result: &'static str) -> Self {
        Self {
            result,
            token_type_hint: None,
            http_status: None,
            attempts: 0,
            error: None,
        }
    }
}

/// The answer to a revocation.
#[derive(Debug, Serialize)]
pub struct Revoked {
    /// Connection.
    pub connection_id: String,
    /// Always `revoked`.
    pub status: ConnectionStatus,
    /// It was revoked before this call (nothing was done).
    pub already_revoked: bool,
    /// What the provider said.
    pub provider_revocation: Option<ProviderRevocation>,
}

impl Refresher {
    /// Revokes a connection at the provider and here. Runs in its own task:
    /// a caller going away must not leave the grant revoked at the provider
    /// but the connection still `active` here.
    pub async fn revoke(self: &Arc<Self>, id: &str, actor: &Actor) -> Result<Revoked, TokenError> {
        let (me, id, actor) = (self.clone(), id.to_string(), actor.clone());
        tokio::spawn(async move { me.revoke_inner(&id, &actor).await })
            .await
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "revocation task failed");
                Err(TokenError::ProviderUnavailable(
                    "the revocation did not complete; retry".into(),
                ))
            })
    }

    async fn revoke_inner(
        self: &Arc<Self>,
        id: &str,
        actor: &Actor,
    ) -> Result<Revoked, TokenError> {
        let c = self
            .store
            .get_connection(id)
            .await?
            .ok_or(TokenError::NotFound)?;
        if c.status == ConnectionStatus::Revoked {
            return Ok(Revoked {
                connection_id: id.to_string(),
                status: ConnectionStatus::Revoked,
                already_revoked: true,
                provider_revocation: None,
            });
        }
        // Wait for a refresh in flight (any replica) and keep new ones out
        // until the row is revoked (which drops the lease).
        let owner = format!("revoke-{}", uuid::Uuid::new_v4().simple());
        let lease_ms = self.settings.lease.as_millis() as i64;
        let deadline = Instant::now() + self.settings.lease + Duration::from_secs(1);
        while !self
            .store
            .try_lease(id, &owner, now_ms() + lease_ms)
            .await?
        {
            if Instant::now() > deadline {
                // The holder's lease is about to expire; revoking now only
                // risks sending a token it is replacing. Erasure still wins.
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let c = self
            .store
            .get_connection(id)
            .await?
            .ok_or(TokenError::NotFound)?;
        let provider = self.registry.get(&c.provider_id).await.ok();
        let at_provider = match &provider {
            None => ProviderRevocation::skipped("provider_deleted"),
            Some(p) => self.revoke_at_provider(p, &c, &owner).await,
        };
        metrics::counter!("nexus_revocations_total", "provider_result" => at_provider.result)
            .increment(1);
        let provider_name = provider.as_ref().map(|p| p.profile.name.clone());
        let detail = json!({"provider_revocation": at_provider});
        let transition = |before: &ConnectionRow| Transition {
            audit: AuditEvent::new("connection.revoked")
                .actor(actor.name.clone())
                .by(actor)
                .provider(before.provider_id.clone())
                .connection(before.id.clone())
                .workspace(before.workspace_id.clone())
                .detail({
                    let mut d = detail.clone();
                    d["previous_status"] = json!(before.status);
                    d
                }),
            event: Some(webhooks::connection_event(
                webhooks::CONNECTION_REVOKED,
                before,
                provider_name.as_deref(),
                ConnectionStatus::Revoked,
                None,
                &[],
            )),
        };
        let already = self
            .store
            .revoke_connection(id, &transition)
            .await?
            .is_none();
        Ok(Revoked {
            connection_id: id.to_string(),
            status: ConnectionStatus::Revoked,
            already_revoked: already,
            provider_revocation: (!already).then_some(at_provider),
        })
    }

    /// Renews the revocation's hold on the refresh lease before a provider
    /// call, so no refresh can rotate the token being revoked.
    async fn renew(&self, id: &str, owner: &str) {
        let until = now_ms() + self.settings.lease.as_millis() as i64;
        if let Ok(false) | Err(_) = self.store.try_lease(id, owner, until).await {
            tracing::warn!(connection_id = %id, "revocation could not renew the refresh lease");
        }
    }

    async fn revoke_at_provider(
        &self,
        p: &Provider,
        c: &ConnectionRow,
        owner: &str,
    ) -> ProviderRevocation {
        if p.profile.auth_type != AuthType::Oauth2 {
            return ProviderRevocation::skipped("not_applicable");
        }
        // The refresh token revokes the grant (RFC 7009 §2.1); without one,
        // the access token is all there is.
        let (column, hint) = match (&c.refresh_token, &c.access_token) {
            (Some(_), _) => ("refresh_token", "refresh_token"),
            (None, Some(_)) => ("access_token", "access_token"),
            (None, None) => return ProviderRevocation::skipped("not_applicable"),
        };
        let env = if column == "refresh_token" {
            c.refresh_token.as_deref()
        } else {
            c.access_token.as_deref()
        };
        let mut out = ProviderRevocation {
            result: "failed",
            token_type_hint: Some(hint),
            http_status: None,
            attempts: 0,
            error: None,
        };
        let token = match env.map(|e| {
            self.keys
                .decrypt_str(Aad::new("connections", &c.id, column), e)
        }) {
            Some(Ok(t)) => t,
            _ => {
                out.error = Some("stored token unreadable".into());
                return out;
            }
        };
        self.renew(&c.id, owner).await;
        let endpoint = match self.discovery.endpoints(&p.profile).await {
            Ok(e) => e.revocation,
            Err(e) => {
                out.error = Some(e.to_string());
                return out;
            }
        };
        let Some(endpoint) = endpoint else {
            return ProviderRevocation::skipped("unsupported");
        };
        let secret = match self.registry.client_secret(p) {
            Ok(s) => s,
            Err(e) => {
                out.error = Some(e.to_string());
                return out;
            }
        };
        while out.attempts < ATTEMPTS {
            out.attempts += 1;
            self.renew(&c.id, owner).await;
            let form = vec![
                ("token", token.expose().as_str()),
                ("token_type_hint", hint),
            ];
            let req = token_request(
                &self.http,
                &endpoint,
                ClientAuth::of(p, secret.as_ref()),
                form,
            );
            let retry_after = match outbound::send(req).await {
                Ok(f) if f.status.is_success() => {
                    out.result = "revoked";
                    out.http_status = Some(f.status.as_u16());
                    out.error = None;
                    return out;
                }
                Ok(f) => {
                    out.http_status = Some(f.status.as_u16());
                    let code = serde_json::from_slice::<serde_json::Value>(&f.body)
                        .ok()
                        .and_then(|b| b.get("error").and_then(|e| e.as_str()).map(str::to_string));
                    out.error = Some(match code {
                        Some(code) => format!(
                            "revocation endpoint answered {} ({code})",
                            f.status.as_u16()
                        ),
                        None => format!("revocation endpoint answered {}", f.status.as_u16()),
                    });
                    // RFC 7009 §2.2.1: 503 means try again later.
                    if f.status != reqwest::StatusCode::SERVICE_UNAVAILABLE {
                        return out;
                    }
                    f.header("retry-after")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs)
                }
                Err(e) => {
                    out.error = Some(e.to_string());
                    None
                }
            };
            if out.attempts < ATTEMPTS {
                // The person is waiting: a short pause, whatever Retry-After asks.
                let wait = retry_after
                    .unwrap_or(Duration::from_millis(250 * u64::from(out.attempts)))
                    .min(Duration::from_secs(2));
                tokio::time::sleep(wait).await;
            }
        }
        out
    }
}
