//! What a gateway in front of this broker may cache, and when it must drop it.
//!
//! Most token fetches are for a response the broker already holds in its own
//! cache (`token_cache`). A gateway may keep such a response too, under the
//! same rules, so a warm fetch costs it no broker round trip:
//!
//! * **How long.** A token answer that may be kept says so in
//!   [`CACHEABLE_HEADER`]: milliseconds, never more than the broker's own
//!   remaining trust in its entry and never past the token's refresh margin.
//!   Without the header (the broker cannot hear every change right now, the
//!   cache is off, the token is due) the answer must not be kept.
//!   [`EXPIRES_AT_HEADER`] lets the gateway recompute `expires_in` at serve time.
//! * **Until what.** Every change the broker's cache hears is announced on a
//!   newline-delimited JSON stream, `GET /tokens/changes`: first
//!   `{"type":"ready"}`, then `{"type":"connection","id":"..."}` (drop that
//!   entry), `{"type":"all"}` (a provider or a pause changed, or the stream
//!   fell behind: drop everything) and `{"type":"ping"}` every
//!   [`PING_EVERY`]. The stream ends when this broker can no longer hear every
//!   change (its notification listener dropped) or shuts down; a gateway then
//!   drops everything and keeps nothing until a new stream says ready.
//! * **Audit.** Tokens served from a gateway's cache are reported back,
//!   `POST /tokens/issued`, and audited like the broker's own (`token.issued`
//!   with a count per connection per second).
//!
//! So a revocation or a pause reaches a gateway's cache in the time the
//! announcement takes to cross one connection, and within the broker's own
//! `max_age` even if one were lost without the stream noticing.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, StatusCode};
use axum::response::Response;
use tokio::sync::{broadcast, watch};

/// Response header: how long (ms) a gateway may keep this token answer.
pub const CACHEABLE_HEADER: &str = "x-nexus-cacheable-ms";
/// Response header: when the served token expires (unix ms), so a kept answer
/// can state `expires_in` correctly later. Absent for tokens without expiry.
pub const EXPIRES_AT_HEADER: &str = "x-nexus-expires-at-ms";
/// How often the change stream says it is alive.
pub const PING_EVERY: Duration = Duration::from_secs(5);

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
            return Some(Bytes::from_static(b"{\"type\":\"ready\"}\n"));
        }
        tokio::select! {
            _ = self.closing.wait_for(|c| *c) => None,
            _ = self.ping.tick() => Some(Bytes::from_static(b"{\"type\":\"ping\"}\n")),
            got = self.rx.recv() => match got {
                Ok(EdgeEvent::Connection(id)) => {
                    let line = serde_json::json!({"type": "connection", "id": &*id});
                    Some(Bytes::from(format!("{line}\n")))
                }
                Ok(EdgeEvent::All) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    Some(Bytes::from_static(b"{\"type\":\"all\"}\n"))
                }
                Ok(EdgeEvent::Lost) | Err(broadcast::error::RecvError::Closed) => None,
            },
        }
    }
}

/// One line of the change stream, as a gateway reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeLine {
    /// The stream hears every change from now on.
    Ready,
    /// Drop this connection's entry.
    Connection(String),
    /// Drop everything.
    All,
    /// Still alive.
    Ping,
}

impl ChangeLine {
    /// Parses one line; `None` for a line this version does not know.
    /// Callers treat that as [`ChangeLine::All`]: an unknown event could be
    /// an invalidation.
    pub fn parse(line: &[u8]) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_slice(line).ok()?;
        Some(match v.get("type")?.as_str()? {
            "ready" => Self::Ready,
            "connection" => Self::Connection(v.get("id")?.as_str()?.to_string()),
            "all" => Self::All,
            "ping" => Self::Ping,
            _ => return None,
        })
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

    #[test]
    fn unknown_lines_do_not_parse() {
        assert_eq!(ChangeLine::parse(b"{\"type\":\"later\"}"), None);
        assert_eq!(ChangeLine::parse(b"garbage"), None);
        assert_eq!(
            ChangeLine::parse(b"{\"type\":\"ping\"}"),
            Some(ChangeLine::Ping)
        );
    }
}
