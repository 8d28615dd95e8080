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

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::AuditConfig;
use crate::store::{now_ms, Store};

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
    shutdown: Arc<Notify>,
    task: JoinHandle<AuditWriterStats>,
}

impl AuditWriter {
    /// Starts the writer on the current runtime.
    pub fn spawn(store: Store, cfg: AuditConfig) -> Self {
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let shutdown = Arc::new(Notify::new());
        let task = tokio::spawn(run(store, cfg, rx, shutdown.clone()));
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
        self.shutdown.notify_one();
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

const SHUTDOWN_WRITE_ATTEMPTS: u32 = 5;

async fn run(
    store: Store,
    cfg: AuditConfig,
    mut rx: mpsc::Receiver<AuditEvent>,
    shutdown: Arc<Notify>,
) -> AuditWriterStats {
    let max_batch = cfg.max_batch.max(1);
    let mut stats = AuditWriterStats::default();
    let mut buf: Vec<AuditEvent> = Vec::with_capacity(max_batch);
    let mut deadline: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.notified() => break,
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
                        write(&store, &mut buf, &mut stats, None).await;
                        deadline = None;
                    } else if deadline.is_none() {
                        deadline = Some(Instant::now() + cfg.flush_interval);
                    }
                }
                None => break,
            },
            _ = sleep_until(deadline), if deadline.is_some() => {
                write(&store, &mut buf, &mut stats, None).await;
                deadline = None;
            }
        }
    }
    // Refuse new events, then drain what is already queued.
    rx.close();
    while let Some(ev) = rx.recv().await {
        buf.push(ev);
        if buf.len() >= max_batch {
            write(&store, &mut buf, &mut stats, Some(SHUTDOWN_WRITE_ATTEMPTS)).await;
        }
    }
    write(&store, &mut buf, &mut stats, Some(SHUTDOWN_WRITE_ATTEMPTS)).await;
    stats
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(d) = deadline {
        tokio::time::sleep_until(d).await;
    }
}

/// Writes `buf` as one batch, retrying with capped backoff. With
/// `max_attempts` (shutdown) it gives up after that many tries and counts the
/// loss; otherwise it keeps trying, and the full queue pushes back on callers.
async fn write(
    store: &Store,
    buf: &mut Vec<AuditEvent>,
    stats: &mut AuditWriterStats,
    max_attempts: Option<u32>,
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
                if max_attempts.is_some_and(|max| attempt >= max) {
                    stats.dropped += buf.len() as u64;
                    metrics::counter!("nexus_audit_events_dropped_total")
                        .increment(buf.len() as u64);
                    tracing::error!(error = %e, events = buf.len(), "audit events could not be written at shutdown and are lost");
                    buf.clear();
                    return;
                }
                tracing::warn!(error = %e, events = buf.len(), attempt, "audit batch write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
