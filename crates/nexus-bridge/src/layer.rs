//! A tower layer that puts a connection's credentials on every request of a
//! hyper or tonic client. Each call takes the credentials from the bridge's
//! cache, so a long-lived gRPC channel stays authenticated across token
//! lifetimes without being re-dialled. Bodies are not read (they may be
//! streams): strategies that sign the payload cannot be used here
//! (`aws_sigv4` signs `UNSIGNED-PAYLOAD`, `hmac_payload` is refused).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower::{Layer, Service};

use crate::Bridge;

/// Boxed errors, as tonic and hyper clients take them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The layer of one connection; see [`Bridge::layer`].
#[derive(Clone, Debug)]
pub struct NexusAuthLayer {
    bridge: Bridge,
    connection: Arc<str>,
}

impl NexusAuthLayer {
    pub(crate) fn new(bridge: Bridge, connection: &str) -> Self {
        Self {
            bridge,
            connection: connection.into(),
        }
    }
}

impl<S> Layer<S> for NexusAuthLayer {
    type Service = NexusAuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        NexusAuthService {
            inner,
            bridge: self.bridge.clone(),
            connection: self.connection.clone(),
        }
    }
}

/// A service adding credentials to each request before `S` sends it.
#[derive(Clone, Debug)]
pub struct NexusAuthService<S> {
    inner: S,
    bridge: Bridge,
    connection: Arc<str>,
}

impl<S, B> Service<http::Request<B>> for NexusAuthService<S>
where
    S: Service<http::Request<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // The service that was polled ready goes with this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (bridge, connection) = (self.bridge.clone(), self.connection.clone());
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            if let Ok(url) = url::Url::parse(&parts.uri.to_string()) {
                crate::gateway::check_transport(&url, bridge.allows_insecure())?;
            }
            let creds = bridge.token(&connection).await?;
            crate::strategy::apply_parts(&creds, &mut parts)?;
            inner
                .call(http::Request::from_parts(parts, body))
                .await
                .map_err(Into::into)
        })
    }
}
