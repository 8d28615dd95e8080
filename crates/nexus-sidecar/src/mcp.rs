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
//! person consented, its retry goes through with the new grant.
//!
//! While an elicitation is outstanding, each request on the route drops
//! the route's cached lookup and credentials and asks again, but no sooner
//! than [`RECHECK`] after the last time (it waits for that): a retry right
//! after consent is served with the new grant, while a client looping on
//! the route is slowed to a few requests a second and costs the gateway no
//! more.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderValue, Method, Response, StatusCode};
use serde_json::{json, Value};

use crate::error::{SidecarError, ERROR_HEADER};
use crate::forward::Worker;
use crate::routes::Route;

/// The JSON-RPC error code of `URLElicitationRequiredError` (MCP 2025-11-25).
pub const URL_ELICITATION_REQUIRED: i64 = -32042;

/// How often, at most, a route with an outstanding elicitation looks again
/// past the bridge's and resolver's holds.
pub const RECHECK: Duration = Duration::from_millis(250);

/// A connect link is handed out again until this long before it expires.
const LINK_MARGIN: Duration = Duration::from_secs(300);

/// A connect-portal link given to a person, and when it was last checked
/// whether they used it.
#[derive(Debug, Clone)]
struct Outstanding {
    /// The link (`None` when making one failed: the plain error is told).
    link: Option<Link>,
    connection: Option<String>,
    checked: Instant,
}

#[derive(Debug, Clone)]
struct Link {
    url: String,
    id: String,
    usable_until: SystemTime,
}

/// Elicitations outstanding, by route.
#[derive(Debug, Default)]
pub struct Elicitations {
    by_route: Mutex<HashMap<String, Outstanding>>,
}

impl Elicitations {
    /// Whether a person of `route` was sent to consent and no request has
    /// succeeded since.
    pub(crate) fn outstanding(&self, route: &str) -> bool {
        self.lock().contains_key(route)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Outstanding>> {
        // Whole values only; a panic elsewhere cannot leave half an entry.
        self.by_route.lock().unwrap_or_else(|e| e.into_inner())
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

/// Whether the server refused for want of scope (RFC 6750 §3.1
/// `error="insufficient_scope"`), as opposed to a policy refusal a new
/// consent would not change.
pub(crate) fn insufficient_scope(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("insufficient_scope"))
}

/// The JSON-RPC answer sending a person to `link`.
fn elicitation(id: Value, link: &Link, why: &str, route: &Route) -> Response<Body> {
    let message = format!(
        "{why} Open {} to connect your account, then retry.",
        link.url
    );
    let body = json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": URL_ELICITATION_REQUIRED,
            "message": message,
            "data": {
                "elicitations": [{
                    "mode": "url",
                    "elicitationId": link.id,
                    "url": link.url,
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
    resp
}

/// Why a person is needed, in words for the person, if one is.
fn person_needed(e: &SidecarError) -> Option<&'static str> {
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
        // The JSON-RPC id is needed to answer with a JSON-RPC error; MCP
        // messages are small, and the replay after a 401 keeps them anyway.
        let (id, body) = if parts.method == Method::POST {
            let max = self.proxy.replay_body_max.max(64 * 1024);
            let declared = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|l| l > max as u64) {
                (None, body)
            } else {
                let bytes: Bytes = axum::body::to_bytes(body, max).await.map_err(|e| {
                    SidecarError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!("an MCP message without Content-Length must stay under {max} bytes ({e})"),
                    )
                })?;
                (request_id(&bytes), Body::from(bytes))
            }
        } else {
            (None, body)
        };
        let req = Request::from_parts(parts, body);
        match self.relay(route, rest, req).await {
            Ok(mut resp) => {
                let status = resp.status();
                let refused = status == StatusCode::UNAUTHORIZED
                    || (status == StatusCode::FORBIDDEN && insufficient_scope(resp.headers()));
                // The MCP client must not start an OAuth flow of its own.
                resp.headers_mut().remove(header::WWW_AUTHENTICATE);
                match (refused, id) {
                    (true, Some(id)) => {
                        // Reported already (relay waits for it on mcp
                        // routes): the connection is marked, and the person's
                        // new grant must replace the cached token.
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
                            self.proxy.elicitations.lock().remove(&route.name);
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

    /// Drops the holds of a route whose person was sent to consent, no
    /// sooner than [`RECHECK`] after the last time (waiting for that).
    async fn recheck(&self, route: &Route) {
        let p = &*self.proxy;
        let last = match p.elicitations.lock().get(&route.name) {
            Some(o) => o.checked,
            None => return,
        };
        if let Some(wait) = RECHECK.checked_sub(last.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let connection = {
            let mut all = p.elicitations.lock();
            let Some(o) = all.get_mut(&route.name) else {
                // Served meanwhile: nothing is held any more.
                return;
            };
            o.checked = Instant::now();
            o.connection.clone()
        };
        p.resolver.forget(&route.name);
        if let Some(c) = connection {
            p.bridge.forget(&c);
        }
    }

    /// The elicitation answer for `id`, with the route's connect link (made
    /// through the gateway, reused while it stays usable); `None` when no
    /// link could be made (the caller tells the plain error instead).
    async fn elicit(
        &self,
        route: &Route,
        id: Value,
        why: &str,
        connection: Option<String>,
    ) -> Option<Response<Body>> {
        let crate::routes::ConnectionRef::Lookup {
            workspace,
            provider,
        } = &route.connection
        else {
            return None;
        };
        let p = &*self.proxy;
        let kept = p
            .elicitations
            .lock()
            .get(&route.name)
            .and_then(|o| o.link.clone())
            .filter(|l| SystemTime::now() < l.usable_until);
        let link = match kept {
            Some(l) => Some(l),
            None => match p
                .bridge
                .gateway()
                .connect_session(workspace, &[provider.as_str()])
                .await
            {
                Ok(v) => link_of(&v),
                Err(e) => {
                    tracing::warn!(route = %route.name, error = %e, "no connect link could be made for an MCP route");
                    None
                }
            },
        };
        p.elicitations.lock().insert(
            route.name.clone(),
            Outstanding {
                link: link.clone(),
                connection,
                checked: Instant::now(),
            },
        );
        Some(elicitation(id, &link?, why, route))
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
        url,
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
        assert!(link_of(&json!({"url": "x"})).is_none());
    }
}
