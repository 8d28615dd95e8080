//! The broker client: persistent keep-alive connections, timeouts, bounded
//! answers; idempotent reads are retried once on a transport failure, writes
//! never are.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use nexus_broker::Secret;
use serde_json::Value;
use url::Url;

use crate::error::GatewayError;

/// Largest broker answer read.
const MAX_ANSWER: usize = 1024 * 1024;

/// An answer from the broker, body unparsed (passed through as it is).
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// JSON body.
    pub body: Bytes,
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
            Err(GatewayError::from_broker(self.status, &self.body))
        }
    }
}

/// Talks to the broker's admin API.
#[derive(Clone)]
pub struct BrokerClient {
    http: reqwest::Client,
    base: Url,
    api_key: Arc<Secret<String>>,
}

impl BrokerClient {
    /// A client for `base`: the broker crate's outbound client (rustls on
    /// ring, no redirects, timeouts), whose pool keeps connections alive.
    pub fn new(
        base: Url,
        api_key: Arc<Secret<String>>,
        timeout: Duration,
    ) -> Result<Self, nexus_broker::outbound::OutboundError> {
        Ok(Self {
            http: nexus_broker::outbound::client(timeout)?,
            base,
            api_key,
        })
    }

    /// The broker URL of `segments` (each percent-encoded as one path segment).
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut u = self.base.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty();
            p.extend(segments);
        }
        u
    }

    /// The plain HTTP client (for forwarding public pages).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Reply, reqwest::Error> {
        let mut resp = req
            .header("x-api-key", self.api_key.expose())
            .send()
            .await?;
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            if body.len() + chunk.len() > MAX_ANSWER {
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Reply {
            status: StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
            body: Bytes::from(body),
        })
    }

    /// GET, retried once if the connection failed (a read is safe to repeat).
    pub async fn get(&self, url: Url) -> Result<Reply, GatewayError> {
        match self.send(self.http.get(url.clone())).await {
            Ok(r) => Ok(r),
            Err(e) if e.is_connect() || e.is_request() => {
                metrics::counter!("nexus_gateway_broker_retries_total").increment(1);
                self.send(self.http.get(url))
                    .await
                    .map_err(|e| GatewayError::broker_unavailable(e.without_url()))
            }
            Err(e) => Err(GatewayError::broker_unavailable(e.without_url())),
        }
    }

    /// POST a JSON body; never retried (it may have taken effect).
    pub async fn post(&self, url: Url, body: &Value) -> Result<Reply, GatewayError> {
        self.send(self.http.post(url).json(body))
            .await
            .map_err(|e| GatewayError::broker_unavailable(e.without_url()))
    }
}
