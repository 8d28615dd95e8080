//! OpenID discovery documents and JWKS, cached.
//!
//! Lookups go memory → database (`http_cache`, so a restart does not refetch)
//! → network. A cached document lives as long as its `Cache-Control: max-age`
//! says (clamped to 1 min..24 h; 1 h when absent) and is then revalidated with
//! `If-None-Match` / `If-Modified-Since`. A stale document is served when the
//! provider is unreachable, so a provider blip does not break handshakes.
//! An id_token signed with an unknown `kid` forces one JWKS refetch, at most
//! once per [`Discovery::with_jwks_refetch_interval`] per JWKS URL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::oauth::shared_cache::SharedCache;
use crate::registry::profile::ProviderProfile;
use crate::store::{now_ms, CachedDoc, Store};
use nexus_core::outbound::{self, OutboundError};

const DEFAULT_TTL_MS: i64 = 3_600_000;
const MIN_TTL_MS: i64 = 60_000;
const MAX_TTL_MS: i64 = 86_400_000;

/// Discovery and JWKS failures.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The provider could not be reached.
    #[error(transparent)]
    Fetch(#[from] OutboundError),
    /// The provider answered with an error status.
    #[error("{what} answered HTTP {status}")]
    Status {
        /// Which document.
        what: &'static str,
        /// HTTP status.
        status: u16,
    },
    /// The document is not JSON.
    #[error("{0} is not a JSON document")]
    NotJson(&'static str),
    /// The discovery document names another issuer than configured.
    #[error("discovery document issuer '{got}' differs from the configured issuer '{expected}'")]
    IssuerMismatch {
        /// Configured.
        expected: String,
        /// Found in the document.
        got: String,
    },
    /// A required endpoint is unknown.
    #[error("provider has no {0} (configure it or enable discovery)")]
    Missing(&'static str),
    /// Reading or writing the cache table failed.
    #[error("discovery cache: {0}")]
    Store(String),
    /// An endpoint would send secrets over plaintext or to a forbidden address.
    #[error("refused by the egress policy: {0}")]
    Egress(String),
}

/// A provider's effective endpoints.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    /// Issuer identifier, when known.
    pub issuer: Option<String>,
    /// Authorization endpoint.
    pub authorization: String,
    /// Token endpoint.
    pub token: String,
    /// UserInfo endpoint.
    pub userinfo: Option<String>,
    /// JWKS URL.
    pub jwks_uri: Option<String>,
    /// RFC 7009 revocation endpoint.
    pub revocation: Option<String>,
    /// RFC 9207: the provider puts `iss` in authorization responses.
    pub iss_parameter_supported: bool,
}

#[derive(Clone)]
struct Cached {
    body: Arc<Value>,
    etag: Option<String>,
    last_modified: Option<String>,
    expires_at: i64,
}

/// Cache of discovery documents and JWKS.
pub struct Discovery {
    http: reqwest::Client,
    store: Store,
    mem: Mutex<HashMap<String, Cached>>,
    last_forced: Mutex<HashMap<String, Instant>>,
    refetch_interval: Duration,
    shared: Option<SharedCache>,
    /// Where the endpoints it hands out may point.
    egress: Arc<nexus_core::egress::Egress>,
}

/// How long Redis keeps an entry past its freshness, so a stale entry can
/// still be revalidated (or served while the provider is down).
const SHARED_GRACE: Duration = Duration::from_secs(86_400);

fn shared_key(url: &str) -> String {
    format!("httpcache:{url}")
}

fn ttl_ms(cache_control: Option<&str>) -> i64 {
    let Some(cc) = cache_control else {
        return DEFAULT_TTL_MS;
    };
    let mut ttl = DEFAULT_TTL_MS;
    for d in cc.split(',').map(|d| d.trim().to_ascii_lowercase()) {
        if d == "no-store" || d == "no-cache" {
            return MIN_TTL_MS;
        }
        if let Some(v) = d.strip_prefix("max-age=") {
            if let Ok(secs) = v.trim_matches('"').parse::<i64>() {
                ttl = secs.saturating_mul(1000);
            }
        }
    }
    ttl.clamp(MIN_TTL_MS, MAX_TTL_MS)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the maps inconsistent
    // (single inserts), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn from_shared(raw: &str) -> Option<Cached> {
    let v: Value = serde_json::from_str(raw).ok()?;
    let body: Value = serde_json::from_str(v.get("body")?.as_str()?).ok()?;
    Some(Cached {
        body: Arc::new(body),
        etag: v.get("etag").and_then(Value::as_str).map(str::to_string),
        last_modified: v
            .get("last_modified")
            .and_then(Value::as_str)
            .map(str::to_string),
        expires_at: v.get("expires_at")?.as_i64()?,
    })
}

impl Discovery {
    /// A cache using `http` for fetches and `store` for persistence.
    pub fn new(http: reqwest::Client, store: Store) -> Self {
        Self {
            http,
            store,
            mem: Mutex::new(HashMap::new()),
            last_forced: Mutex::new(HashMap::new()),
            refetch_interval: Duration::from_secs(60),
            shared: None,
            egress: Arc::default(),
        }
    }

    /// Checks every endpoint against `egress` (the default permits public
    /// and loopback addresses only).
    pub fn with_egress(mut self, egress: Arc<nexus_core::egress::Egress>) -> Self {
        self.egress = egress;
        self
    }

    /// Endpoints as configured or discovered, refused when one would send a
    /// secret over plaintext or to an address outside the egress policy: a
    /// discovery document is data from the network, not configuration.
    fn checked(&self, e: Endpoints, p: &ProviderProfile) -> Result<Endpoints, DiscoveryError> {
        let plaintext_ok = p.allow_plaintext;
        for (what, url) in [
            ("token endpoint", Some(&e.token)),
            ("authorization endpoint", Some(&e.authorization)),
            ("userinfo endpoint", e.userinfo.as_ref()),
            ("jwks_uri", e.jwks_uri.as_ref()),
            ("revocation endpoint", e.revocation.as_ref()),
        ] {
            if let Some(url) = url {
                self.egress
                    .check_url(what, url, plaintext_ok)
                    .map_err(|err| {
                        metrics::counter!("nexus_egress_refused_total").increment(1);
                        DiscoveryError::Egress(err.to_string())
                    })?;
            }
        }
        Ok(e)
    }

    /// Also caches in Redis, shared with other replicas (checked after memory, before the database).
    pub fn with_shared_cache(mut self, shared: Option<SharedCache>) -> Self {
        self.shared = shared;
        self
    }

    /// Sets the minimum time between two forced JWKS refetches of one URL.
    pub fn with_jwks_refetch_interval(mut self, d: Duration) -> Self {
        self.refetch_interval = d;
        self
    }

    async fn persist(&self, url: &str, c: &Cached) {
        let doc = CachedDoc {
            url: url.to_string(),
            body: c.body.to_string(),
            etag: c.etag.clone(),
            last_modified: c.last_modified.clone(),
            fetched_at: now_ms(),
            expires_at: c.expires_at,
        };
        if let Some(shared) = &self.shared {
            let ttl = Duration::from_millis((c.expires_at - now_ms()).max(0) as u64) + SHARED_GRACE;
            let value = serde_json::json!({
                "body": doc.body, "etag": doc.etag, "last_modified": doc.last_modified, "expires_at": doc.expires_at
            });
            shared.set(&shared_key(url), &value.to_string(), ttl).await;
        }
        if let Err(e) = self.store.put_cached_doc(&doc).await {
            // The memory cache still works; the next restart refetches.
            tracing::warn!(error = %e, url, "could not persist discovery cache entry");
        }
    }

    async fn cached(&self, url: &str) -> Option<Cached> {
        if let Some(c) = lock(&self.mem).get(url).cloned() {
            return Some(c);
        }
        if let Some(shared) = &self.shared {
            if let Some(c) = shared
                .get(&shared_key(url))
                .await
                .and_then(|raw| from_shared(&raw))
            {
                lock(&self.mem).insert(url.to_string(), c.clone());
                return Some(c);
            }
        }
        let doc = self.store.get_cached_doc(url).await.ok().flatten()?;
        let body: Value = serde_json::from_str(&doc.body).ok()?;
        let c = Cached {
            body: Arc::new(body),
            etag: doc.etag,
            last_modified: doc.last_modified,
            expires_at: doc.expires_at,
        };
        lock(&self.mem).insert(url.to_string(), c.clone());
        Some(c)
    }

    /// A JSON document from cache or network. `force` skips a fresh cache entry.
    async fn get(
        &self,
        url: &str,
        what: &'static str,
        force: bool,
    ) -> Result<Arc<Value>, DiscoveryError> {
        let now = now_ms();
        let cached = self.cached(url).await;
        if let Some(c) = &cached {
            if !force && c.expires_at > now {
                metrics::counter!("nexus_discovery_cache_total", "kind" => what, "outcome" => "hit").increment(1);
                return Ok(c.body.clone());
            }
        }
        let mut req = self.http.get(url).header("accept", "application/json");
        if let Some(c) = &cached {
            if let Some(etag) = &c.etag {
                req = req.header("if-none-match", etag);
            }
            if let Some(lm) = &c.last_modified {
                req = req.header("if-modified-since", lm);
            }
        }
        let fetched = match outbound::send(req).await {
            Ok(f) => f,
            Err(e) => {
                if let Some(c) = cached {
                    tracing::warn!(error = %e, url, "provider unreachable; serving stale {what}");
                    metrics::counter!("nexus_discovery_cache_total", "kind" => what, "outcome" => "stale").increment(1);
                    return Ok(c.body);
                }
                return Err(e.into());
            }
        };
        let ttl = ttl_ms(fetched.header("cache-control"));
        if fetched.status == reqwest::StatusCode::NOT_MODIFIED {
            if let Some(mut c) = cached {
                c.expires_at = now_ms() + ttl;
                lock(&self.mem).insert(url.to_string(), c.clone());
                self.persist(url, &c).await;
                metrics::counter!("nexus_discovery_cache_total", "kind" => what, "outcome" => "revalidated").increment(1);
                return Ok(c.body);
            }
        }
        if !fetched.status.is_success() {
            return Err(DiscoveryError::Status {
                what,
                status: fetched.status.as_u16(),
            });
        }
        let body: Value =
            serde_json::from_slice(&fetched.body).map_err(|_| DiscoveryError::NotJson(what))?;
        if !body.is_object() {
            return Err(DiscoveryError::NotJson(what));
        }
        let c = Cached {
            body: Arc::new(body),
            etag: fetched.header("etag").map(str::to_string),
            last_modified: fetched.header("last-modified").map(str::to_string),
            expires_at: now_ms() + ttl,
        };
        lock(&self.mem).insert(url.to_string(), c.clone());
        self.persist(url, &c).await;
        metrics::counter!("nexus_discovery_cache_total", "kind" => what, "outcome" => "miss")
            .increment(1);
        Ok(c.body)
    }

    /// The endpoints of a provider: discovered when it uses discovery, else
    /// from its profile. A discovery document naming another issuer is refused.
    pub async fn endpoints(&self, p: &ProviderProfile) -> Result<Endpoints, DiscoveryError> {
        let well_known = match (&p.well_known_url, p.enable_discovery, &p.issuer) {
            (Some(url), _, _) => Some(url.clone()),
            (None, true, Some(iss)) => Some(format!(
                "{}/.well-known/openid-configuration",
                iss.trim_end_matches('/')
            )),
            _ => None,
        };
        let Some(url) = well_known else {
            return self.checked(
                Endpoints {
                    issuer: p.issuer.clone(),
                    authorization: p
                        .auth_url
                        .clone()
                        .ok_or(DiscoveryError::Missing("auth_url"))?,
                    token: p
                        .token_url
                        .clone()
                        .ok_or(DiscoveryError::Missing("token_url"))?,
                    userinfo: p.user_info_endpoint.clone(),
                    jwks_uri: None,
                    revocation: p.revocation_url.clone(),
                    iss_parameter_supported: false,
                },
                p,
            );
        };
        self.egress
            .check_url("discovery document", &url, p.allow_plaintext)
            .map_err(|err| DiscoveryError::Egress(err.to_string()))?;
        let doc = self.get(&url, "discovery", false).await?;
        let s = |k: &str| doc.get(k).and_then(Value::as_str).map(str::to_string);
        let doc_issuer =
            s("issuer").ok_or(DiscoveryError::Missing("issuer in the discovery document"))?;
        if let Some(expected) = &p.issuer {
            // Exact comparison (OIDC Discovery §4.3); no normalization.
            if *expected != doc_issuer {
                metrics::counter!("nexus_discovery_issuer_mismatch_total").increment(1);
                return Err(DiscoveryError::IssuerMismatch {
                    expected: expected.clone(),
                    got: doc_issuer,
                });
            }
        }
        self.checked(
            Endpoints {
                issuer: Some(doc_issuer),
                authorization: s("authorization_endpoint")
                    .or_else(|| p.auth_url.clone())
                    .ok_or(DiscoveryError::Missing("authorization_endpoint"))?,
                token: s("token_endpoint")
                    .or_else(|| p.token_url.clone())
                    .ok_or(DiscoveryError::Missing("token_endpoint"))?,
                userinfo: s("userinfo_endpoint").or_else(|| p.user_info_endpoint.clone()),
                jwks_uri: s("jwks_uri"),
                revocation: s("revocation_endpoint").or_else(|| p.revocation_url.clone()),
                iss_parameter_supported: doc
                    .get("authorization_response_iss_parameter_supported")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            },
            p,
        )
    }

    /// The JWKS at `url`; with `force`, refetched (rate-limited per URL).
    pub async fn jwks(&self, url: &str, force: bool) -> Result<Arc<Value>, DiscoveryError> {
        let force = force && {
            let mut last = lock(&self.last_forced);
            let allowed = last
                .get(url)
                .is_none_or(|t| t.elapsed() >= self.refetch_interval);
            if allowed {
                last.insert(url.to_string(), Instant::now());
            }
            allowed
        };
        self.get(url, "jwks", force).await
    }
}

#[cfg(test)]
mod tests {
    use super::ttl_ms;

    #[test]
    fn cache_lifetimes() {
        assert_eq!(ttl_ms(None), 3_600_000);
        assert_eq!(ttl_ms(Some("public, max-age=600")), 600_000);
        assert_eq!(ttl_ms(Some("max-age=1")), 60_000);
        assert_eq!(ttl_ms(Some("max-age=99999999")), 86_400_000);
        assert_eq!(ttl_ms(Some("no-cache")), 60_000);
    }
}
