//! The broker client: persistent keep-alive connections, timeouts, bounded
//! answers; idempotent reads are retried once on a transport failure, writes
//! never are. Inside one process (`nexus up`) it can call the broker's router
//! directly instead, with no socket and no HTTP encoding in between.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use nexus_core::Secret;
use serde_json::Value;
use tower::ServiceExt;
use url::Url;

use nexus_core::wire::fill;

use crate::error::GatewayError;

/// Largest broker answer read.
const MAX_ANSWER: usize = 1024 * 1024;

/// Longest silence on the change stream before it counts as dead (the
/// broker pings every [`nexus_core::wire::PING_EVERY`]).
pub const STREAM_IDLE: Duration = Duration::from_secs(15);

/// An open streamed answer (the broker's change stream), read chunk by chunk.
pub enum Streamed {
    /// Over the network.
    Http(reqwest::Response),
    /// From the router in this process.
    Local(axum::body::BodyDataStream),
}

impl Streamed {
    /// The next chunk; `Ok(None)` at the end. Silence longer than
    /// [`STREAM_IDLE`] is an error.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, String> {
        let next = async {
            match self {
                Streamed::Http(r) => r.chunk().await.map_err(|e| e.without_url().to_string()),
                Streamed::Local(s) => {
                    use futures_util::StreamExt;
                    s.next().await.transpose().map_err(|e| e.to_string())
                }
            }
        };
        tokio::time::timeout(STREAM_IDLE, next)
            .await
            .unwrap_or_else(|_| Err("the stream went silent".into()))
    }
}

/// An answer from the broker, body unparsed (passed through as it is). Its
/// body can hold usage secrets: `Debug` shows only the status and size.
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> Result<Value, GatewayError> {
        serde_json::from_slice(&self.body).map_err(|_| {
            GatewayError::broker_unavailable("the broker answered with a non-JSON body")
        })
    }

    /// `Ok(self)` for 2xx, the broker's error otherwise.
    pub fn ok(self) -> Result<Self, GatewayError> {
        if self.status.is_success() {
            Ok(self)
        } else {
            let mut e = GatewayError::from_broker(self.status, &self.body);
            e.retry_after = self.headers.get(axum::http::header::RETRY_AFTER).cloned();
            Err(e)
        }
    }
}

#[derive(Clone)]
enum Transport {
    /// Over the network (the second client, without an overall timeout,
    /// reads the change stream).
    Http(reqwest::Client, reqwest::Client),
    /// The broker's router in this process.
    Local(axum::Router),
}

/// A transport failure (the request may or may not have reached the broker).
struct Failed {
    /// The connection could not be made: nothing was sent, a retry is safe.
    before_sending: bool,
    why: String,
}

/// Talks to the broker's admin API.
#[derive(Clone)]
pub struct BrokerClient {
    transport: Transport,
    base: Url,
    api_key: Arc<Secret<String>>,
}

impl BrokerClient {
    /// A client for `base`: the broker crate's outbound client (rustls on
    /// ring, no redirects, timeouts), whose pool keeps connections alive.
    /// `tls`: an extra CA and a client certificate (mutual TLS), if any.
    pub fn new(
        base: Url,
        api_key: Arc<Secret<String>>,
        timeout: Duration,
        tls: &nexus_core::mtls::ClientTls,
    ) -> Result<Self, nexus_core::outbound::OutboundError> {
        let (one, streaming) = nexus_core::outbound::clients_with(timeout, STREAM_IDLE, tls)?;
        Ok(Self {
            transport: Transport::Http(one, streaming),
            base,
            api_key,
        })
    }

    /// A client calling `router` (the broker's, in this process) directly.
    pub fn local(router: axum::Router, api_key: Arc<Secret<String>>) -> Self {
        Self {
            transport: Transport::Local(router),
            // Only the path and query are used.
            base: Url::parse("http://broker.local/")
                .unwrap_or_else(|_| unreachable!("a valid literal")),
            api_key,
        }
    }

    /// The broker URL of `segments` (each percent-encoded as one path segment).
    pub fn url(&self, route: &'static str, id: &str) -> Url {
        let mut u = self.base.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty();
            p.extend(fill(route, id));
        }
        u
    }

    /// The broker URL of a path and query taken from a request to the gateway.
    pub fn url_of(&self, path: &str, query: Option<&str>) -> Url {
        let mut u = self.base.clone();
        u.set_path(path);
        u.set_query(query);
        u
    }

    /// One exchange. `admin` adds the broker's API key.
    pub async fn exchange(
        &self,
        method: Method,
        url: &Url,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
        admin: bool,
    ) -> Result<Reply, GatewayError> {
        match self
            .send(method.clone(), url, headers, body.clone(), admin)
            .await
        {
            Ok(r) => Ok(r),
            // A read that never reached the broker is safe to try once more.
            Err(f) if f.before_sending && method == Method::GET => {
                metrics::counter!("nexus_gateway_broker_retries_total").increment(1);
                self.send(method, url, headers, body, admin)
                    .await
                    .map_err(|f| GatewayError::broker_unavailable(f.why))
            }
            Err(f) => Err(GatewayError::broker_unavailable(f.why)),
        }
    }

    async fn send(
        &self,
        method: Method,
        url: &Url,
        headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
        admin: bool,
    ) -> Result<Reply, Failed> {
        match &self.transport {
            Transport::Http(http, _) => {
                let mut req = http.request(method, url.clone()).body(body);
                for (k, v) in headers {
                    req = req.header(k, v);
                }
                if admin {
                    req = req.header("x-api-key", self.api_key.expose());
                }
                let mut resp = req.send().await.map_err(|e| Failed {
                    before_sending: e.is_connect(),
                    why: e.without_url().to_string(),
                })?;
                let status = resp.status();
                let headers = resp.headers().clone();
                let mut out = Vec::new();
                while let Some(chunk) = resp.chunk().await.map_err(|e| Failed {
                    before_sending: false,
                    why: e.without_url().to_string(),
                })? {
                    if out.len() + chunk.len() > MAX_ANSWER {
                        return Err(Failed {
                            before_sending: false,
                            why: "broker answer larger than 1 MiB".into(),
                        });
                    }
                    out.extend_from_slice(&chunk);
                }
                Ok(Reply {
                    status,
                    headers,
                    body: Bytes::from(out),
                })
            }
            Transport::Local(router) => {
                let path_and_query = match url.query() {
                    Some(q) => format!("{}?{q}", url.path()),
                    None => url.path().to_string(),
                };
                let (parts, body) = self
                    .call_router(
                        router,
                        method,
                        &path_and_query,
                        headers,
                        Body::from(body),
                        admin,
                    )
                    .await
                    .map_err(|why| Failed {
                        before_sending: true,
                        why,
                    })?;
                let body = axum::body::to_bytes(body, MAX_ANSWER)
                    .await
                    .map_err(|e| Failed {
                        before_sending: false,
                        why: e.to_string(),
                    })?;
                Ok(Reply {
                    status: parts.status,
                    headers: parts.headers,
                    body,
                })
            }
        }
    }

    /// One call of the broker's router in this process (it sees a loopback peer).
    async fn call_router(
        &self,
        router: &axum::Router,
        method: Method,
        path_and_query: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Body,
        admin: bool,
    ) -> Result<(axum::http::response::Parts, Body), String> {
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .body(body)
            .map_err(|e| e.to_string())?;
        req.headers_mut().extend(headers.iter().cloned());
        if admin {
            if let Ok(v) = HeaderValue::from_str(self.api_key.expose()) {
                req.headers_mut().insert("x-api-key", v);
            }
        }
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 0))));
        let resp = match router.clone().oneshot(req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        Ok(resp.into_parts())
    }

    /// Opens a streamed GET (with the API key). A non-2xx answer is read
    /// whole and returned as the broker's error.
    pub async fn stream(&self, url: &Url) -> Result<Streamed, GatewayError> {
        match &self.transport {
            Transport::Http(_, streaming) => {
                let resp = streaming
                    .get(url.clone())
                    .header("x-api-key", self.api_key.expose())
                    .send()
                    .await
                    .map_err(|e| GatewayError::broker_unavailable(e.without_url().to_string()))?;
                if resp.status().is_success() {
                    return Ok(Streamed::Http(resp));
                }
                let status = resp.status();
                let body = resp.bytes().await.unwrap_or_default();
                Err(GatewayError::from_broker(status, &body))
            }
            Transport::Local(router) => {
                let (parts, body) = self
                    .call_router(router, Method::GET, url.path(), &[], Body::empty(), true)
                    .await
                    .map_err(GatewayError::broker_unavailable)?;
                if parts.status.is_success() {
                    return Ok(Streamed::Local(body.into_data_stream()));
                }
                let body = axum::body::to_bytes(body, MAX_ANSWER)
                    .await
                    .unwrap_or_default();
                Err(GatewayError::from_broker(parts.status, &body))
            }
        }
    }

    /// GET with the API key.
    pub async fn get(&self, url: Url) -> Result<Reply, GatewayError> {
        self.exchange(Method::GET, &url, &[], Bytes::new(), true)
            .await
    }

    /// POST a JSON body with the API key; never retried (it may have taken effect).
    pub async fn post(&self, url: Url, body: &Value) -> Result<Reply, GatewayError> {
        let body = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
        let ct = (
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        self.exchange(Method::POST, &url, &[ct], body, true).await
    }
}
