//! Audit events and the batching audit writer.
//!
//! Changes to stored state (provider mutations, later connection transitions)
//! write their audit event in the same transaction as the change. Hot paths
//! that must not wait on a database write (token fetches) hand events to the
//! [`AuditWriter`] instead: a bounded queue drained in batches, flushed on
//! graceful shutdown. A full queue makes callers wait (back-pressure) and is
//! counted in `nexus_audit_queue_full_total`; events are never dropped
//! silently: a batch that cannot be written after shutdown retries is logged
//! and counted in `nexus_audit_events_dropped_total`.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::store::{now_ms, Store};

/// Tuning of the batching audit writer.
#[derive(Debug, Clone, Copy)]
pub struct AuditConfig {
    /// Events held in memory before writers wait (back-pressure).
    pub queue_capacity: usize,
    /// Most events written in one insert batch.
    pub max_batch: usize,
    /// Longest an event waits before its batch is flushed.
    pub flush_interval: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 10_000,
            max_batch: 500,
            flush_interval: Duration::from_millis(200),
        }
    }
}

/// Who is making a change, for the audit log.
#[derive(Debug, Clone, Default)]
pub struct Actor {
    /// Actor name (`admin` for API-key callers).
    pub name: String,
    /// Caller IP.
    pub ip: Option<String>,
    /// Caller user agent.
    pub user_agent: Option<String>,
    /// The caller's client certificate identity (mutual TLS).
    pub client_identity: Option<String>,
}

impl Actor {
    pub(crate) fn event(&self, event_type: &str, provider_id: &str, detail: Value) -> AuditEvent {
        AuditEvent::new(event_type)
            .actor(self.name.clone())
            .provider(provider_id)
            .by(self)
            .detail(detail)
    }
}

/// One audit event. `detail` must never hold a secret.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    /// Unix ms.
    pub occurred_at_ms: i64,
    /// Dotted type, e.g. `provider.created`.
    pub event_type: String,
    /// Who caused it.
    pub actor: Option<String>,
    /// Provider concerned.
    pub provider_id: Option<String>,
    /// Connection concerned.
    pub connection_id: Option<String>,
    /// Workspace concerned.
    pub workspace_id: Option<String>,
    /// Caller IP.
    pub ip: Option<String>,
    /// Caller user agent.
    pub user_agent: Option<String>,
    /// The caller's client certificate identity (mutual TLS).
    pub client_identity: Option<String>,
    /// Event-specific, non-secret details.
    pub detail: Value,
}

impl AuditEvent {
    /// A new event of `event_type`, stamped now.
    pub fn new(event_type: impl Into<String>) -> Self {
        Self {
            occurred_at_ms: now_ms(),
            event_type: event_type.into(),
            actor: None,
            provider_id: None,
            connection_id: None,
            workspace_id: None,
            ip: None,
            user_agent: None,
            client_identity: None,
            detail: Value::Object(Default::default()),
        }
    }

    /// Sets the actor.
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets the provider.
    pub fn provider(mut self, id: impl Into<String>) -> Self {
        self.provider_id = Some(id.into());
        self
    }

    /// Sets the connection.
    pub fn connection(mut self, id: impl Into<String>) -> Self {
        self.connection_id = Some(id.into());
        self
    }

    /// Sets the workspace.
    pub fn workspace(mut self, id: impl Into<String>) -> Self {
        self.workspace_id = Some(id.into());
        self
    }

    /// Sets the caller's address and user agent.
    pub fn caller(mut self, ip: Option<String>, user_agent: Option<String>) -> Self {
        self.ip = ip;
        self.user_agent = user_agent;
        self
    }

    /// Sets the caller's address, user agent and client certificate
    /// identity from `actor`.
    pub fn by(mut self, actor: &Actor) -> Self {
        self.ip = actor.ip.clone();
        self.user_agent = actor.user_agent.clone();
        self.client_identity = actor.client_identity.clone();
        self
    }

    /// Sets the details.
    pub fn detail(mut self, detail: Value) -> Self {
        self.detail = detail;
        self
    }
}

/// The audit writer has shut down; the event was not queued.
#[derive(Debug, thiserror::Error)]
#[error("audit writer is shut down; event '{0}' not recorded")]
pub struct AuditClosed(pub String);

/// Cheap, cloneable handle that queues events for the [`AuditWriter`].
#[derive(Clone, Debug)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditEvent>,
}

impl AuditSink {
    /// Queues an event. Waits while the queue is full (back-pressure).
    pub async fn record(&self, ev: AuditEvent) -> Result<(), AuditClosed> {
        match self.tx.try_send(ev) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(ev)) => {
                metrics::counter!("nexus_audit_queue_full_total").increment(1);
                self.tx.send(ev).await.map_err(|e| closed(e.0))
            }
            Err(mpsc::error::TrySendError::Closed(ev)) => Err(closed(ev)),
        }
    }
}

fn closed(ev: AuditEvent) -> AuditClosed {
    metrics::counter!("nexus_audit_events_dropped_total").increment(1);
    tracing::error!(event_type = %ev.event_type, "audit event arrived after shutdown and was not recorded");
    AuditClosed(ev.event_type)
}

/// Totals reported when the writer stops.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AuditWriterStats {
    /// Events written.
    pub written: u64,
    /// Insert batches committed.
    pub batches: u64,
    /// Events that could not be written (logged and counted).
    pub dropped: u64,
}

/// Background task writing queued audit events in batches.
pub struct AuditWriter {
    sink: AuditSink,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<AuditWriterStats>,
}

impl AuditWriter {
    /// Starts the writer on the current runtime.
    pub fn spawn(store: Store, cfg: AuditConfig) -> Self {
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(run(store, cfg, rx, shutdown_rx));
        Self {
            sink: AuditSink { tx },
            shutdown,
            task,
        }
    }

    /// A handle for queueing events.
    pub fn sink(&self) -> AuditSink {
        self.sink.clone()
    }

    /// Stops accepting events, writes everything queued, and returns totals.
    pub async fn shutdown(self) -> AuditWriterStats {
        // send_replace cannot fail: it stores the value even with no receiver left.
        self.shutdown.send_replace(true);
        drop(self.sink);
        match self.task.await {
            Ok(stats) => stats,
            Err(e) => {
                tracing::error!(error = %e, "audit writer task failed");
                AuditWriterStats::default()
            }
        }
    }
}

/// Attempts at shutdown before a batch is given up (and counted as dropped).
const SHUTDOWN_WRITE_ATTEMPTS: u32 = 5;
/// Attempts before a batch that keeps failing for a reason other than an
/// unreachable database is split, so one bad event cannot wedge the queue.
const SPLIT_AFTER_ATTEMPTS: u32 = 5;

async fn run(
    store: Store,
    cfg: AuditConfig,
    mut rx: mpsc::Receiver<AuditEvent>,
    mut shutdown: watch::Receiver<bool>,
) -> AuditWriterStats {
    let max_batch = cfg.max_batch.max(1);
    let mut stats = AuditWriterStats::default();
    let mut buf: Vec<AuditEvent> = Vec::with_capacity(max_batch);
    let mut deadline: Option<Instant> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            ev = rx.recv() => match ev {
                Some(ev) => {
                    buf.push(ev);
                    while buf.len() < max_batch {
                        match rx.try_recv() {
                            Ok(ev) => buf.push(ev),
                            Err(_) => break,
                        }
                    }
                    if buf.len() >= max_batch {
                        write(&store, &mut buf, &mut stats, &mut shutdown).await;
                        deadline = None;
                    } else if deadline.is_none() {
                        deadline = Some(Instant::now() + cfg.flush_interval);
                    }
                }
                None => break,
            },
            _ = sleep_until(deadline), if deadline.is_some() => {
                write(&store, &mut buf, &mut stats, &mut shutdown).await;
                deadline = None;
            }
        }
    }
    // Refuse new events, then drain what is already queued.
    rx.close();
    while let Some(ev) = rx.recv().await {
        buf.push(ev);
        if buf.len() >= max_batch {
            write(&store, &mut buf, &mut stats, &mut shutdown).await;
        }
    }
    write(&store, &mut buf, &mut stats, &mut shutdown).await;
    stats
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d).await;
    }
}

/// Writes `buf` as one batch, retrying with capped backoff.
///
/// While the database is unreachable it keeps trying, and the full queue
/// pushes back on callers; once shutdown begins it gives up after
/// [`SHUTDOWN_WRITE_ATTEMPTS`] and counts the loss. A batch refused for any
/// other reason is retried, then written event by event so that only the
/// event the database refuses is dropped (logged and counted).
async fn write(
    store: &Store,
    buf: &mut Vec<AuditEvent>,
    stats: &mut AuditWriterStats,
    shutdown: &mut watch::Receiver<bool>,
) {
    if buf.is_empty() {
        return;
    }
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        match store.insert_audit_batch(buf).await {
            Ok(()) => {
                stats.written += buf.len() as u64;
                stats.batches += 1;
                metrics::counter!("nexus_audit_events_written_total").increment(buf.len() as u64);
                buf.clear();
                return;
            }
            Err(e) => {
                metrics::counter!("nexus_audit_write_errors_total").increment(1);
                let stopping = *shutdown.borrow();
                if stopping && attempt >= SHUTDOWN_WRITE_ATTEMPTS {
                    drop_events(buf, stats, &e, "at shutdown");
                    return;
                }
                if !e.is_unavailable() && attempt >= SPLIT_AFTER_ATTEMPTS && buf.len() > 1 {
                    write_one_by_one(store, buf, stats).await;
                    return;
                }
                if !e.is_unavailable() && attempt >= SPLIT_AFTER_ATTEMPTS {
                    drop_events(buf, stats, &e, "after retries");
                    return;
                }
                tracing::warn!(error = %e, events = buf.len(), attempt, "audit batch write failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    // Shutdown cuts the wait short and switches to bounded attempts.
                    _ = shutdown.changed(), if !stopping => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn write_one_by_one(store: &Store, buf: &mut Vec<AuditEvent>, stats: &mut AuditWriterStats) {
    for ev in buf.drain(..) {
        match store.insert_audit_batch(std::slice::from_ref(&ev)).await {
            Ok(()) => {
                stats.written += 1;
                metrics::counter!("nexus_audit_events_written_total").increment(1);
            }
            Err(e) => drop_events(&mut vec![ev], stats, &e, "refused by the database"),
        }
    }
    stats.batches += 1;
}

fn drop_events(
    buf: &mut Vec<AuditEvent>,
    stats: &mut AuditWriterStats,
    e: &crate::store::StoreError,
    when: &str,
) {
    stats.dropped += buf.len() as u64;
    metrics::counter!("nexus_audit_events_dropped_total").increment(buf.len() as u64);
    tracing::error!(error = %e, events = buf.len(), "audit events could not be written {when} and are lost");
    buf.clear();
}
