//! The broker's side of the gateway contract ([`nexus_core::wire`]): the
//! feed that fans this broker's cache invalidations out to change streams.
//!
//! So a revocation or a pause reaches a gateway's cache in the time the
//! announcement takes to cross one connection, and within the broker's own
//! `max_age` even if one were lost without the stream noticing.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::Response;
use nexus_core::wire::{ChangeLine, PING_EVERY};
use tokio::sync::{broadcast, watch};

/// Something a gateway's cache must drop.
#[derive(Debug, Clone)]
pub enum EdgeEvent {
    /// One connection's response.
    Connection(Arc<str>),
    /// Everything (a provider or a pause changed).
    All,
    /// This broker may miss changes from now on: streams end.
    Lost,
}

/// Fans the broker's cache invalidations out to change streams.
#[derive(Debug)]
pub struct EdgeFeed {
    tx: broadcast::Sender<EdgeEvent>,
    closing: watch::Sender<bool>,
}

impl Default for EdgeFeed {
    fn default() -> Self {
        Self::new()
    }
}

impl EdgeFeed {
    /// A feed with no subscribers yet.
    pub fn new() -> Self {
        // A subscriber that falls this far behind gets `all` instead.
        let (tx, _) = broadcast::channel(4096);
        Self {
            tx,
            closing: watch::Sender::new(false),
        }
    }

    /// Announces an event to every stream (none listening is fine).
    pub fn announce(&self, event: EdgeEvent) {
        let _ = self.tx.send(event);
    }

    /// The events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<EdgeEvent> {
        self.tx.subscribe()
    }

    /// Becomes `true` when the broker shuts down: other long-lived streams
    /// (the console's) end with the change streams.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Ends every stream (the broker is shutting down; open streams would
    /// otherwise hold its graceful shutdown forever).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// The change stream's response. `live` says whether the broker's cache
    /// hears every change now; it is read after subscribing, so a loss
    /// between the two still ends the stream.
    pub fn stream(&self, live: impl Fn() -> bool) -> Option<Response> {
        let rx = self.subscribe();
        let closing = self.closing.subscribe();
        if !live() || *closing.borrow() {
            return None;
        }
        let ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        let state = Stream {
            rx,
            closing,
            ping,
            ready_sent: false,
        };
        let body = futures_util::stream::unfold(state, |mut s| async move {
            let line = s.next().await?;
            Some((Ok::<Bytes, std::convert::Infallible>(line), s))
        });
        Some(
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/x-ndjson")
                .header(header::CACHE_CONTROL, "no-store")
                .body(Body::from_stream(body))
                // Static status and header values: building cannot fail.
                .unwrap_or_else(|_| Response::new(Body::empty())),
        )
    }
}

struct Stream {
    rx: broadcast::Receiver<EdgeEvent>,
    closing: watch::Receiver<bool>,
    ping: tokio::time::Interval,
    ready_sent: bool,
}

impl Stream {
    /// The next line, or `None` when the stream must end.
    async fn next(&mut self) -> Option<Bytes> {
        if !self.ready_sent {
            self.ready_sent = true;
            return Some(Bytes::from(ChangeLine::Ready.encode()));
        }
        tokio::select! {
            _ = self.closing.wait_for(|c| *c) => None,
            _ = self.ping.tick() => Some(Bytes::from(ChangeLine::Ping.encode())),
            got = self.rx.recv() => match got {
                Ok(EdgeEvent::Connection(id)) => {
                    Some(Bytes::from(ChangeLine::Connection(id.to_string()).encode()))
                }
                Ok(EdgeEvent::All) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    Some(Bytes::from(ChangeLine::All.encode()))
                }
                Ok(EdgeEvent::Lost) | Err(broadcast::error::RecvError::Closed) => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::BodyDataStream;
    use futures_util::StreamExt;

    async fn line(body: &mut BodyDataStream) -> Option<ChangeLine> {
        let data = body.next().await?.ok()?;
        ChangeLine::parse(data.strip_suffix(b"\n").unwrap_or(&data))
    }

    fn open(feed: &EdgeFeed) -> BodyDataStream {
        feed.stream(|| true)
            .expect("live")
            .into_body()
            .into_data_stream()
    }

    #[tokio::test]
    async fn streams_ready_then_events_and_ends_on_loss() {
        let feed = EdgeFeed::new();
        let mut body = open(&feed);
        assert_eq!(line(&mut body).await, Some(ChangeLine::Ready));
        feed.announce(EdgeEvent::Connection("c1".into()));
        feed.announce(EdgeEvent::All);
        assert_eq!(
            line(&mut body).await,
            Some(ChangeLine::Connection("c1".into()))
        );
        assert_eq!(line(&mut body).await, Some(ChangeLine::All));
        feed.announce(EdgeEvent::Lost);
        assert!(body.next().await.is_none(), "the stream ends");
    }

    #[tokio::test]
    async fn refuses_when_not_live_and_ends_on_close() {
        let feed = EdgeFeed::new();
        assert!(feed.stream(|| false).is_none());
        let mut body = open(&feed);
        assert_eq!(line(&mut body).await, Some(ChangeLine::Ready));
        feed.close();
        assert!(body.next().await.is_none());
        assert!(feed.stream(|| true).is_none(), "closed for good");
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_to_drop_everything() {
        let feed = EdgeFeed::new();
        let mut body = open(&feed);
        assert_eq!(line(&mut body).await, Some(ChangeLine::Ready));
        for i in 0..5000 {
            feed.announce(EdgeEvent::Connection(format!("c{i}").into()));
        }
        assert_eq!(line(&mut body).await, Some(ChangeLine::All));
    }
}
