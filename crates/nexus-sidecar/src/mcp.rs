//! Routes of kind `mcp`: an MCP client (any language) uses
//! `http://127.0.0.1:PORT/<route>` as its Streamable HTTP server URL.
//!
//! Requests, answers and streams pass through as on any route, with the
//! token applied and the protocol's headers (`Mcp-Session-Id`,
//! `MCP-Protocol-Version`, `Last-Event-ID`) untouched. What differs is what
//! the MCP client sees when the connection needs a person (none yet,
//! pending, `attention_required`, revoked, or the server asked for scopes
//! the grant lacks): never an OAuth challenge it would try to answer
//! itself (the sidecar strips `WWW-Authenticate`), but the answer the MCP
//! specification (2025-11-25) defines for URL-mode elicitation, a JSON-RPC
//! error `-32042` whose `data.elicitations` carries a connect-portal link
//! for the route's workspace. The client shows "open this link"; after the
//! person consented, its retry goes through with the new grant. (The
//! sidecar does not track sessions, so it cannot know whether the client
//! declared URL elicitation; one that did not still gets an error whose
//! message says what to do.)
//!
//! While an elicitation is outstanding, one request at a time drops the
//! route's cached lookup and held answers and asks the gateway again, no
//! sooner than [`RECHECK`] after the last time; requests arriving meanwhile
//! wait for that check. A retry right after consent is served with the new
//! grant; a client looping on the route is slowed to a few requests a
//! second and costs the gateway no more.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use nexus_core::Secret;
use serde_json::{json, Value};

use crate::error::{OwnAnswer, SidecarError, ERROR_HEADER};
use crate::forward::Worker;
use crate::routes::{ConnectionRef, Route};

/// The JSON-RPC error code of `URLElicitationRequiredError` (MCP 2025-11-25).
pub const URL_ELICITATION_REQUIRED: i64 = -32042;

/// How often, at most, a route with an outstanding elicitation looks again
/// past the bridge's and resolver's holds.
pub const RECHECK: Duration = Duration::from_millis(250);

/// A connect link is handed out again until this long before it expires.
const LINK_MARGIN: Duration = Duration::from_secs(300);

/// After a connect link could not be made, none is asked for this long.
const LINK_RETRY: Duration = Duration::from_secs(30);

/// The largest MCP message read to find its JSON-RPC id (bigger ones
/// stream through; a person-needed answer to them is the plain error).
const MESSAGE_MAX: usize = 256 * 1024;

/// A person of a route was sent to consent and no request has succeeded
/// since.
#[derive(Debug, Clone)]
struct Outstanding {
    connection: Option<String>,
    /// When the last (or the claimed next) re-check happens.
    checked: Instant,
}

/// A connect-portal link (a bearer link to the workspace's portal).
#[derive(Debug, Clone)]
struct Link {
    url: Secret<String>,
    id: String,
    usable_until: SystemTime,
}

#[derive(Debug, Default)]
struct State {
    outstanding: HashMap<String, Outstanding>,
    links: HashMap<String, Link>,
    link_failed: HashMap<String, Instant>,
}

/// Elicitations outstanding and the connect links handed out, by route.
#[derive(Debug, Default)]
pub struct Elicitations {
    state: Mutex<State>,
    /// One connect link made at a time.
    making: tokio::sync::Mutex<()>,
}

impl Elicitations {
    /// Whether a person of `route` was sent to consent and no request has
    /// succeeded since.
    pub(crate) fn outstanding(&self, route: &str) -> bool {
        self.lock().outstanding.contains_key(route)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Whole values only; a panic elsewhere cannot leave half an entry.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn usable_link(&self, route: &str) -> Option<Link> {
        self.lock()
            .links
            .get(route)
            .filter(|l| SystemTime::now() < l.usable_until)
            .cloned()
    }
}

/// The `id` of a JSON-RPC request (`None` for a notification, a response,
/// a batch or anything that is not JSON-RPC: those cannot be answered with
/// a JSON-RPC error).
pub fn request_id(body: &[u8]) -> Option<Value> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object()?;
    obj.get("method")?.as_str()?;
    match obj.get("id")? {
        id @ (Value::String(_) | Value::Number(_)) => Some(id.clone()),
        _ => None,
    }
}

/// Whether a `WWW-Authenticate` challenge's `error` parameter is
/// `insufficient_scope` (RFC 6750 §3.1): a refusal for want of scope, which
/// a new consent can fix, unlike a policy refusal.
pub(crate) fn insufficient_scope(headers: &HeaderMap) -> bool {
    use nexus_core::challenge::{bearer_params, param};
    headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(bearer_params)
        .any(|p| param(&p, "error") == Some("insufficient_scope"))
}

/// The JSON-RPC answer sending a person to `link`. The link is a bearer
/// link to the workspace's portal: it travels in `data.elicitations[].url`
/// only, where clients that implement URL elicitation show it, not in the
/// message that clients commonly log.
fn elicitation(id: Value, link: &Link, why: &str, route: &Route) -> Response<Body> {
    let body = json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": URL_ELICITATION_REQUIRED,
            "message": format!("{why} A person must open the connect link of this elicitation, then retry."),
            "data": {
                "elicitations": [{
                    "mode": "url",
                    "elicitationId": link.id,
                    "url": link.url.expose(),
                    "message": format!(
                        "Connect your account so the agent can use the MCP server of route '{}'.",
                        route.name
                    ),
                }]
            }
        }
    });
    let mut resp = Response::new(Body::from(body.to_string()));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(ERROR_HEADER, HeaderValue::from_static("url_elicitation"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.extensions_mut().insert(OwnAnswer("url_elicitation"));
    resp
}

/// Why a person is needed, in words for the person, if one is.
pub(crate) fn person_needed(e: &SidecarError) -> Option<&'static str> {
    let flagged = e.0.context.get("interaction_required") == Some(&Value::Bool(true));
    match e.code() {
        "connection_not_found" => Some("This account is not connected yet."),
        "connection_pending" => Some("Connecting this account was started but not finished."),
        "connection_revoked" => Some("Access to this account was revoked."),
        _ if flagged => Some("This account must be connected again."),
        _ => None,
    }
}

impl Worker {
    /// A request on an `mcp` route.
    pub(crate) async fn mcp(
        &self,
        route: &Route,
        rest: &str,
        req: Request,
    ) -> Result<Response<Body>, SidecarError> {
        self.recheck(route).await;
        let (parts, body) = req.into_parts();
        // The JSON-RPC id is needed to answer with a JSON-RPC error. MCP
        // messages are small; one read here is kept for the replay too.
        let (id, kept, body) = if parts.method == Method::POST {
            let declared = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|l| l > MESSAGE_MAX as u64) {
                (None, None, body)
            } else {
                let bytes: Bytes = axum::body::to_bytes(body, MESSAGE_MAX).await.map_err(|e| {
                    SidecarError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!("an MCP message without Content-Length must stay under {MESSAGE_MAX} bytes ({e})"),
                    )
                })?;
                (request_id(&bytes), Some(bytes), Body::empty())
            }
        } else {
            (None, None, body)
        };
        let req = Request::from_parts(parts, body);
        match self.relay(route, rest, req, kept).await {
            Ok(mut resp) => {
                let status = resp.status();
                // A 401 here survived the forced refresh and the replay.
                let refused = status == StatusCode::UNAUTHORIZED
                    || (status == StatusCode::FORBIDDEN && insufficient_scope(resp.headers()));
                // The MCP client must not start an OAuth flow of its own.
                resp.headers_mut().remove(header::WWW_AUTHENTICATE);
                match (refused, id) {
                    (true, Some(id)) => {
                        // Reported already (before the first elicitation,
                        // awaited): the connection is marked, and the
                        // person's new grant must replace the cached token.
                        let why = if status == StatusCode::UNAUTHORIZED {
                            "The MCP server no longer accepts this account's access."
                        } else {
                            "The MCP server needs permissions this account did not grant."
                        };
                        let connection = self.connection_of(route).await;
                        if let Some(c) = &connection {
                            self.proxy.bridge.forget(c);
                        }
                        Ok(self
                            .elicit(route, id, why, connection)
                            .await
                            .unwrap_or(resp))
                    }
                    _ => {
                        if status.is_success() {
                            self.proxy
                                .elicitations
                                .lock()
                                .outstanding
                                .remove(&route.name);
                        }
                        Ok(resp)
                    }
                }
            }
            Err(e) => match (person_needed(&e), id) {
                (Some(why), Some(id)) => {
                    let connection = self.connection_of(route).await;
                    match self.elicit(route, id, why, connection).await {
                        Some(resp) => Ok(resp),
                        None => Err(e),
                    }
                }
                _ => Err(e),
            },
        }
    }

    /// The route's connection, if the lookup finds one now.
    async fn connection_of(&self, route: &Route) -> Option<String> {
        let p = &*self.proxy;
        p.resolver
            .connection(&p.bridge, route)
            .await
            .ok()
            .map(|c| c.to_string())
    }

    /// While a person of `route` is outstanding: one request per
    /// [`RECHECK`] claims the next check, waits for its time and drops the
    /// route's held lookup and answers; the others wait for that check.
    async fn recheck(&self, route: &Route) {
        let p = &*self.proxy;
        let now = Instant::now();
        let (at, connection) = {
            let mut st = p.elicitations.lock();
            let Some(o) = st.outstanding.get_mut(&route.name) else {
                return;
            };
            if o.checked > now {
                // Another request claimed the next check: wait for it.
                (o.checked, None)
            } else {
                o.checked = (o.checked + RECHECK).max(now);
                (o.checked, Some(o.connection.clone()))
            }
        };
        tokio::time::sleep_until(at.into()).await;
        if let Some(connection) = connection {
            p.resolver.forget(&route.name);
            if let Some(c) = connection {
                p.bridge.forget(&c);
            }
        }
    }

    /// The elicitation answer for `id`, with the route's connect link (made
    /// through the gateway, one at a time, reused while it stays usable);
    /// `None` when no link can be had (the caller tells the plain error).
    async fn elicit(
        &self,
        route: &Route,
        id: Value,
        why: &str,
        connection: Option<String>,
    ) -> Option<Response<Body>> {
        let ConnectionRef::Lookup {
            workspace,
            provider,
        } = &route.connection
        else {
            return None;
        };
        let e = &self.proxy.elicitations;
        {
            let mut st = e.lock();
            let checked = st
                .outstanding
                .get(&route.name)
                .map_or_else(Instant::now, |o| o.checked);
            st.outstanding.insert(
                route.name.clone(),
                Outstanding {
                    connection,
                    checked,
                },
            );
        }
        let link = match e.usable_link(&route.name) {
            Some(l) => l,
            None => {
                let _one = e.making.lock().await;
                match e.usable_link(&route.name) {
                    Some(l) => l,
                    None => self.new_link(route, workspace, provider).await?,
                }
            }
        };
        Some(elicitation(id, &link, why, route))
    }

    /// A new connect link for `route` (kept), unless one failed lately.
    async fn new_link(&self, route: &Route, workspace: &str, provider: &str) -> Option<Link> {
        let e = &self.proxy.elicitations;
        if e.lock()
            .link_failed
            .get(&route.name)
            .is_some_and(|at| at.elapsed() < LINK_RETRY)
        {
            return None;
        }
        let made = self
            .proxy
            .bridge
            .gateway()
            .connect_session(workspace, &[provider])
            .await;
        let link = match made {
            Ok(v) => link_of(&v),
            Err(err) => {
                tracing::warn!(route = %route.name, error = %err, "no connect link could be made for an MCP route");
                None
            }
        };
        let mut st = e.lock();
        match &link {
            Some(l) => {
                st.links.insert(route.name.clone(), l.clone());
                st.link_failed.remove(&route.name);
            }
            None => {
                st.link_failed.insert(route.name.clone(), Instant::now());
            }
        }
        link
    }
}

/// The link of a `POST /v1/connect-sessions` answer.
fn link_of(v: &Value) -> Option<Link> {
    let url = v["url"].as_str()?.to_string();
    let id = v["id"].as_str()?.to_string();
    let expires = v["expires_at"]
        .as_str()
        .and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .map(SystemTime::from)
        .unwrap_or_else(|| SystemTime::now() + Duration::from_secs(600));
    Some(Link {
        url: Secret::new(url),
        id,
        usable_until: expires.checked_sub(LINK_MARGIN).unwrap_or(expires),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_requests_have_an_id_to_answer() {
        assert_eq!(
            request_id(br#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#),
            Some(json!(7))
        );
        assert_eq!(
            request_id(br#"{"jsonrpc":"2.0","id":"a","method":"initialize","params":{}}"#),
            Some(json!("a"))
        );
        assert_eq!(
            request_id(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#),
            None
        );
        assert_eq!(request_id(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#), None);
        assert_eq!(
            request_id(br#"[{"jsonrpc":"2.0","id":1,"method":"x"}]"#),
            None
        );
        assert_eq!(request_id(br#"{"id":null,"method":"x"}"#), None);
        assert_eq!(request_id(b"not json"), None);
    }

    #[test]
    fn a_connect_session_answer_becomes_a_link_used_until_shortly_before_it_expires() {
        let l = link_of(&json!({"id": "cs_1", "url": "https://n/connect/t", "expires_at": "2030-01-01T00:30:00Z"})).unwrap();
        assert_eq!(l.id, "cs_1");
        let until = time::OffsetDateTime::from(l.usable_until);
        assert_eq!(until.to_string(), "2030-01-01 0:25:00.0 +00:00:00");
        assert!(
            !format!("{l:?}").contains("connect/t"),
            "the link is a secret"
        );
        assert!(link_of(&json!({"url": "x"})).is_none());
    }

    #[test]
    fn only_the_error_parameter_says_insufficient_scope() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::WWW_AUTHENTICATE, HeaderValue::from_str(v).unwrap());
            insufficient_scope(&m)
        };
        assert!(h(r#"Bearer error="insufficient_scope", scope="a b""#));
        assert!(h(r#"Bearer realm="x, y", error=insufficient_scope"#));
        assert!(h(r#"Bearer scope="a", ERROR="insufficient_scope""#));
        assert!(!h(
            r#"Bearer error="invalid_token", error_description="not insufficient_scope""#
        ));
        assert!(!h(r#"Bearer realm="error=\"insufficient_scope\"""#));
        assert!(!h("Bearer"));
    }
}
