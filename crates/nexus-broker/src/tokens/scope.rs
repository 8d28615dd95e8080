//! Partial scope revocation, passively (SPEC §8).
//!
//! The broker cannot test scopes itself (it does not know which provider API
//! needs which scope), so the agents' side reports what the provider
//! refused: `POST /connections/{id}/scope-failures`. A 403 report (or a 401
//! that a forced refresh did not cure) marks the connection `degraded` and
//! records the scopes in `failing_scopes`; success reports (`ok_scopes`) and a
//! re-consent that grants the scopes clear them. Repeats inside a window are
//! only counted, and reports are rate-limited per connection.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::events::audit::Actor;
use crate::events::audit::AuditEvent;
use crate::events::webhooks;
use crate::registry::Registry;
use crate::store::{
    now_ms, ConnectionRow, ConnectionStatus, ScopeDelta, ScopeReportRow, Store, StoreError,
};
use crate::tokens::{TokenError, Tokens};

/// Tuning of scope reports.
#[derive(Debug, Clone, Copy)]
pub struct ScopeSettings {
    /// Repeats of a failing scope within this window are counted, not audited.
    pub window: Duration,
    /// After a 401 report made the broker refresh, further 401s within this
    /// long count (the refresh did not help).
    pub unauthorized_window: Duration,
    /// Reports per connection per minute (sustained).
    pub per_minute: u32,
    /// Reports per connection at once (burst).
    pub burst: u32,
    /// Most failing scopes recorded per connection.
    pub max_failing: usize,
}

impl Default for ScopeSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            unauthorized_window: Duration::from_secs(300),
            per_minute: 60,
            burst: 20,
            max_failing: 64,
        }
    }
}

/// `POST /connections/{id}/scope-failures` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeReport {
    /// 401 or 403 as the provider answered.
    pub status: Option<u16>,
    /// Scopes the call needed (from the strategy config or route hints).
    pub scopes: Option<Vec<String>>,
    /// Scopes that worked (clears them).
    pub ok_scopes: Option<Vec<String>>,
    /// HTTP method of the failed call.
    pub method: Option<String>,
    /// Host of the failed call.
    pub host: Option<String>,
    /// Path template (`/calendars/{id}/events`), not the concrete path.
    pub path_template: Option<String>,
    /// The provider's error code or a short text.
    pub provider_error: Option<String>,
    /// The provider's `WWW-Authenticate` header, to take scopes from.
    pub www_authenticate: Option<String>,
    /// When the agent saw the answer (RFC 3339; default now).
    pub observed_at: Option<String>,
}

/// What a report did.
#[derive(Debug, Serialize)]
pub struct ReportOutcome {
    /// Connection.
    pub connection_id: String,
    /// `recorded`, `duplicate` (inside the window), `cleared`, `refreshed`
    /// (a 401: the broker refreshed; report again if the new token fails
    /// too) or `stale` (the token was replaced after the failure).
    pub action: &'static str,
    /// Whether the report counted toward `failing_scopes`.
    pub counted: bool,
    /// Status after the report.
    pub status: ConnectionStatus,
    /// Failing scopes after the report.
    pub failing_scopes: Vec<String>,
}

/// Why a report was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Malformed report.
    #[error("{1}")]
    Invalid(&'static str, String),
    /// Too many reports for this connection.
    #[error("too many scope reports for this connection; retry in {0:?}")]
    RateLimited(Duration),
    /// The connection cannot take reports (unknown, pending, revoked, ...).
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl From<StoreError> for ReportError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ReportError::Token(TokenError::NotFound),
            e => ReportError::Token(TokenError::Store(e)),
        }
    }
}

fn invalid(code: &'static str, msg: impl Into<String>) -> ReportError {
    ReportError::Invalid(code, msg.into())
}

/// The scopes of a `Bearer` challenge with `error="insufficient_scope"`
/// (RFC 6750 §3), from a `WWW-Authenticate` value that may hold several
/// challenges. `None` when there is no such challenge or it names no scope.
pub fn insufficient_scopes(header: &str) -> Option<Vec<String>> {
    use nexus_core::challenge::{bearer_params, param};
    let params = bearer_params(header)?;
    if param(&params, "error") != Some("insufficient_scope") {
        return None;
    }
    let scopes: Vec<String> = param(&params, "scope")?
        .split_whitespace()
        .map(str::to_string)
        .collect();
    (!scopes.is_empty()).then_some(scopes)
}

fn check_scopes(field: &str, v: Option<Vec<String>>) -> Result<Vec<String>, ReportError> {
    let v = v.unwrap_or_default();
    if v.len() > 50 {
        return Err(invalid(
            "invalid_scopes",
            format!("{field} holds more than 50 scopes"),
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for s in v {
        if s.is_empty() || s.len() > 256 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(
                "invalid_scopes",
                format!("{field} must hold scope names of 1 to 256 characters without spaces"),
            ));
        }
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

fn check_text(
    field: &str,
    v: Option<String>,
    max: usize,
    ok: impl Fn(&str) -> bool,
) -> Result<Option<String>, ReportError> {
    match v {
        None => Ok(None),
        Some(s) if s.is_empty() || s.len() > max || s.chars().any(char::is_control) || !ok(&s) => {
            Err(invalid(
                "invalid_request",
                format!("{field} is malformed or longer than {max} characters"),
            ))
        }
        Some(s) => Ok(Some(s)),
    }
}

/// Validates a report. `now` is unix ms.
pub fn validate(
    r: ScopeReport,
    settings: &ScopeSettings,
    now: i64,
) -> Result<ScopeReportRow, ReportError> {
    let status = match r.status {
        None => None,
        Some(s @ (401 | 403)) => Some(s),
        Some(_) => {
            return Err(invalid(
                "invalid_status",
                "status must be 401 or 403 (the provider's answer)",
            ))
        }
    };
    let www = check_text("www_authenticate", r.www_authenticate, 2048, |_| true)?;
    let mut failing = check_scopes("scopes", r.scopes)?;
    if let Some(from_header) = www.as_deref().and_then(insufficient_scopes) {
        for s in check_scopes("www_authenticate scope", Some(from_header))? {
            if !failing.contains(&s) {
                failing.push(s);
            }
        }
    }
    let ok = check_scopes("ok_scopes", r.ok_scopes)?;
    if failing.is_empty() && ok.is_empty() {
        return Err(invalid(
            "missing_scopes",
            "name the failing scopes in scopes (or send the provider's WWW-Authenticate with insufficient_scope), or the working ones in ok_scopes",
        ));
    }
    if !failing.is_empty() && status.is_none() {
        return Err(invalid(
            "invalid_status",
            "status (401 or 403) is required when reporting failing scopes",
        ));
    }
    let method = check_text("method", r.method, 16, |s| {
        s.bytes().all(|b| b.is_ascii_alphabetic())
    })?
    .map(|m| m.to_ascii_uppercase());
    let host = check_text("host", r.host, 255, |s| {
        !s.contains(['/', ' ', '@', '?', '#'])
    })?;
    let path_template = check_text("path_template", r.path_template, 512, |s| {
        s.starts_with('/') && !s.contains(['?', '#', ' '])
    })?;
    let provider_error = check_text("provider_error", r.provider_error, 512, |_| true)?;
    let observed_at = match r.observed_at {
        None => now,
        Some(t) => {
            let at =
                time::OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| {
                        invalid("invalid_request", "observed_at must be an RFC 3339 time")
                    })?;
            let ms = (at.unix_timestamp_nanos() / 1_000_000) as i64;
            // Clocks drift a little; a report from the future or from
            // yesterday is a bug on the reporting side.
            if ms > now + 300_000 || ms < now - 86_400_000 {
                return Err(invalid(
                    "invalid_request",
                    "observed_at must be within the last 24 hours (and not ahead of the broker's clock)",
                ));
            }
            ms
        }
    };
    Ok(ScopeReportRow {
        failing,
        ok,
        status: status.map(i64::from).unwrap_or(0),
        method,
        host,
        path_template,
        provider_error,
        observed_at,
        window_ms: settings.window.as_millis() as i64,
        max_failing: settings.max_failing,
    })
}

/// Receives scope reports.
pub struct ScopeReports {
    store: Store,
    registry: Registry,
    tokens: Arc<Tokens>,
    settings: ScopeSettings,
    limiter: DefaultKeyedRateLimiter<String>,
}

impl ScopeReports {
    /// Builds the service.
    pub fn new(
        store: Store,
        registry: Registry,
        tokens: Arc<Tokens>,
        settings: ScopeSettings,
    ) -> Self {
        let per_minute = NonZeroU32::new(settings.per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(settings.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        Self {
            store,
            registry,
            tokens,
            settings,
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute).allow_burst(burst)),
        }
    }

    /// Handles one report for connection `id`.
    pub async fn report(
        &self,
        id: &str,
        r: ScopeReport,
        actor: &Actor,
    ) -> Result<ReportOutcome, ReportError> {
        let result = self.report_inner(id, r, actor).await;
        let label = match &result {
            Ok(o) => o.action,
            Err(ReportError::RateLimited(_)) => "rate_limited",
            Err(_) => "rejected",
        };
        metrics::counter!("nexus_scope_reports_total", "result" => label).increment(1);
        result
    }

    async fn report_inner(
        &self,
        id: &str,
        r: ScopeReport,
        actor: &Actor,
    ) -> Result<ReportOutcome, ReportError> {
        if let Err(not_until) = self.limiter.check_key(&id.to_string()) {
            // The default clock (without quanta) is std's monotonic Instant.
            let wait = not_until.wait_time_from(std::time::Instant::now());
            return Err(ReportError::RateLimited(wait.max(Duration::from_secs(1))));
        }
        // Keep the limiter's memory bounded by the connections seen lately.
        if self.limiter.len() > 10_000 {
            self.limiter.retain_recent();
        }
        let row = validate(r, &self.settings, now_ms())?;
        let c = self
            .store
            .get_connection(id)
            .await?
            .ok_or(TokenError::NotFound)?;
        crate::tokens::usable(&c)?;
        if row.status == 401 && !row.failing.is_empty() {
            if let Some(outcome) = self.unauthorized(&c, &row).await? {
                return Ok(outcome);
            }
        }
        let provider_name = self
            .registry
            .get(&c.provider_id)
            .await
            .ok()
            .map(|p| p.profile.name);
        let record = |before: &ConnectionRow, d: &ScopeDelta| {
            records(before, d, &row, provider_name.as_deref(), actor)
        };
        let (before, delta) = self.store.apply_scope_report(id, &row, &record).await?;
        let Some(d) = delta else {
            // It stopped being usable in the meantime.
            crate::tokens::usable(&before)?;
            return Err(TokenError::Unusable("the connection cannot take reports".into()).into());
        };
        let action = if !d.added.is_empty() || !d.renewed.is_empty() {
            "recorded"
        } else if !d.cleared.is_empty() {
            "cleared"
        } else if !d.repeated.is_empty() {
            "duplicate"
        } else {
            "recorded"
        };
        Ok(ReportOutcome {
            connection_id: id.to_string(),
            action,
            counted: !row.failing.is_empty(),
            status: d.status_after,
            failing_scopes: d.failing_after,
        })
    }

    /// A 401 first makes the broker refresh once: most 401s are an expired
    /// or rotated token, not a withdrawn scope. `Some` answers the report
    /// without counting it; `None` counts it (the refresh did not help).
    async fn unauthorized(
        &self,
        c: &ConnectionRow,
        row: &ScopeReportRow,
    ) -> Result<Option<ReportOutcome>, ReportError> {
        if c.refresh_token.is_none() {
            return Ok(None);
        }
        let outcome = |action| ReportOutcome {
            connection_id: c.id.clone(),
            action,
            counted: false,
            status: c.status,
            failing_scopes: crate::store::parse_json_list(&c.failing_scopes),
        };
        // The token that failed has been replaced since: try the new one first.
        if c.last_success_at.is_some_and(|t| t > row.observed_at) {
            return Ok(Some(outcome("stale")));
        }
        let window = self.settings.unauthorized_window.as_millis() as i64;
        let refreshed_for_401 = self
            .store
            .unauthorized_refresh_at(&c.id)
            .await?
            .is_some_and(|t| now_ms() - t < window && t <= row.observed_at);
        if refreshed_for_401 {
            return Ok(None);
        }
        self.tokens.refresh_now(&c.id).await?;
        self.store
            .mark_unauthorized_refresh(&c.id, now_ms())
            .await?;
        Ok(Some(outcome("refreshed")))
    }
}

/// The audit events and the webhook event of one report.
fn records(
    before: &ConnectionRow,
    d: &ScopeDelta,
    r: &ScopeReportRow,
    provider_name: Option<&str>,
    actor: &Actor,
) -> (Vec<AuditEvent>, Option<crate::store::OutboxEvent>) {
    let base = |kind: &str| {
        AuditEvent::new(kind)
            .actor(actor.name.clone())
            .by(actor)
            .provider(before.provider_id.clone())
            .connection(before.id.clone())
            .workspace(before.workspace_id.clone())
    };
    let mut audits = Vec::new();
    let fresh: Vec<&String> = d.added.iter().chain(d.renewed.iter()).collect();
    if !fresh.is_empty() {
        audits.push(base("connection.scope_failure").detail(json!({
            "scopes": fresh,
            "status": r.status,
            "method": r.method,
            "host": r.host,
            "path_template": r.path_template,
            "provider_error": r.provider_error,
        })));
    }
    let mut event = None;
    if !d.added.is_empty() {
        audits.push(base("connection.degraded").detail(json!({
            "previous_status": before.status,
            "added_scopes": d.added,
            "failing_scopes": d.failing_after,
        })));
        event = Some(webhooks::connection_event(
            webhooks::CONNECTION_DEGRADED,
            before,
            provider_name,
            ConnectionStatus::Degraded,
            Some("insufficient_scope"),
            &d.failing_after,
        ));
    }
    if !d.cleared.is_empty() {
        audits.push(base("connection.scopes_cleared").detail(json!({
            "scopes": d.cleared,
            "failing_scopes": d.failing_after,
        })));
        if d.status_after == ConnectionStatus::Active && before.status == ConnectionStatus::Degraded
        {
            audits.push(
                base("connection.recovered")
                    .detail(json!({"previous_status": before.status, "cause": "ok_scopes"})),
            );
            event = Some(webhooks::connection_event(
                webhooks::CONNECTION_RECOVERED,
                before,
                provider_name,
                ConnectionStatus::Active,
                None,
                &[],
            ));
        }
    }
    (audits, event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_insufficient_scope_is_parsed() {
        assert_eq!(
            insufficient_scopes(r#"Bearer error="insufficient_scope", scope="calendar.read""#),
            Some(vec!["calendar.read".to_string()])
        );
        assert_eq!(
            insufficient_scopes(
                r#"Basic realm="x", Bearer realm="api", error="insufficient_scope", scope="a b", error_description="need \"a\"""#
            ),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        assert_eq!(
            insufficient_scopes(r#"bearer error=insufficient_scope, scope="x""#),
            Some(vec!["x".to_string()])
        );
        assert_eq!(insufficient_scopes(r#"Bearer error="invalid_token""#), None);
        assert_eq!(
            insufficient_scopes(r#"Bearer error="insufficient_scope""#),
            None
        );
        assert_eq!(
            insufficient_scopes(r#"Basic error="insufficient_scope", scope="x""#),
            None
        );
        assert_eq!(insufficient_scopes(r#"Bearer scope="unterminated"#), None);
        assert_eq!(insufficient_scopes(""), None);
        assert_eq!(insufficient_scopes(",,,==="), None);
    }

    #[test]
    fn reports_are_validated() {
        let s = ScopeSettings::default();
        let now = now_ms();
        let ok = |r: ScopeReport| validate(r, &s, now);
        let e = ok(ScopeReport::default()).unwrap_err();
        assert!(matches!(e, ReportError::Invalid("missing_scopes", _)));
        let e = ok(ScopeReport {
            status: Some(500),
            scopes: Some(vec!["a".into()]),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, ReportError::Invalid("invalid_status", _)));
        let e = ok(ScopeReport {
            scopes: Some(vec!["a".into()]),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, ReportError::Invalid("invalid_status", _)));
        let e = ok(ScopeReport {
            status: Some(403),
            scopes: Some(vec!["has space".into()]),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, ReportError::Invalid("invalid_scopes", _)));
        let e = ok(ScopeReport {
            status: Some(403),
            scopes: Some(vec!["a".into()]),
            observed_at: Some("yesterday".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(e, ReportError::Invalid("invalid_request", _)));
        let r = ok(ScopeReport {
            status: Some(403),
            www_authenticate: Some(r#"Bearer error="insufficient_scope", scope="cal""#.into()),
            method: Some("get".into()),
            scopes: Some(vec!["x".into(), "x".into()]),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.failing, ["x", "cal"]);
        assert_eq!(r.method.as_deref(), Some("GET"));
        let r = ok(ScopeReport {
            ok_scopes: Some(vec!["cal".into()]),
            ..Default::default()
        })
        .unwrap();
        assert!(r.failing.is_empty());
        assert_eq!(r.ok, ["cal"]);
    }
}
