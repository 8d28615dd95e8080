//! The kill switch: issuance pauses, operator-wide or per workspace.
//!
//! Under a pause, token requests answer 423 while refreshes and handshakes go
//! on, so resuming is instant. Pauses live in the database (so every replica
//! obeys them and they survive restarts) and in memory (so the token path
//! reads no table): the in-memory copy is reloaded when a change is announced
//! (this process at once; other replicas through PostgreSQL `NOTIFY`) and
//! every second in any case, which bounds staleness if a notification is lost.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::json;

use crate::events::audit::Actor;
use crate::events::audit::AuditEvent;
use crate::store::{now_ms, rfc3339, PauseRow, PauseScope, Store, StoreError};
use crate::tokens::edge::{EdgeEvent, EdgeFeed};

#[derive(Debug, Default, PartialEq)]
struct Snapshot {
    operator: Option<PauseRow>,
    workspaces: HashMap<String, PauseRow>,
}

/// The pauses in force, kept in memory.
#[derive(Debug)]
pub struct Pauses {
    store: Store,
    now: RwLock<Arc<Snapshot>>,
    wake: tokio::sync::Notify,
    /// Gateways' caches to clear when the pauses in force change.
    edge: std::sync::OnceLock<Arc<EdgeFeed>>,
}

impl Pauses {
    /// An empty set; call [`Pauses::reload`] before serving.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            now: RwLock::new(Arc::new(Snapshot::default())),
            wake: tokio::sync::Notify::new(),
            edge: std::sync::OnceLock::new(),
        }
    }

    /// Tells `edge` (gateways' caches) whenever the pauses in force change.
    pub fn announce_to(&self, edge: Arc<EdgeFeed>) {
        let _ = self.edge.set(edge);
    }

    /// The pause that applies to `workspace` (the operator's wins), if any.
    pub fn check(&self, workspace: Option<&str>) -> Option<PauseRow> {
        let snap = self.now.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(p) = &snap.operator {
            return Some(p.clone());
        }
        workspace.and_then(|w| snap.workspaces.get(w).cloned())
    }

    /// Every pause in force: the operator's first, then workspaces' by name.
    pub fn all(&self) -> Vec<PauseRow> {
        let snap = self.now.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut workspaces: Vec<&PauseRow> = snap.workspaces.values().collect();
        workspaces.sort_by(|a, b| match (&a.scope, &b.scope) {
            (PauseScope::Workspace(x), PauseScope::Workspace(y)) => x.cmp(y),
            _ => std::cmp::Ordering::Equal,
        });
        snap.operator.iter().chain(workspaces).cloned().collect()
    }

    /// Whether an operator-wide pause is in force.
    pub fn operator(&self) -> Option<PauseRow> {
        self.check(None)
    }

    /// Re-reads the pauses from the store.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let rows = self.store.list_pauses().await?;
        let mut snap = Snapshot::default();
        for p in rows {
            match &p.scope {
                PauseScope::Operator => snap.operator = Some(p),
                PauseScope::Workspace(w) => {
                    snap.workspaces.insert(w.clone(), p);
                }
            }
        }
        metrics::gauge!("nexus_issuance_paused", "scope" => "operator")
            .set(if snap.operator.is_some() { 1.0 } else { 0.0 });
        metrics::gauge!("nexus_issuance_paused", "scope" => "workspace")
            .set(snap.workspaces.len() as f64);
        let changed = {
            let mut now = self.now.write().unwrap_or_else(|e| e.into_inner());
            let changed = **now != snap;
            *now = Arc::new(snap);
            changed
        };
        // After the swap: a gateway refetching on this news meets the new pauses.
        if changed {
            if let Some(edge) = self.edge.get() {
                edge.announce(EdgeEvent::All);
            }
        }
        Ok(())
    }

    /// Asks the reload loop to reload now (a change was announced).
    pub fn changed(&self) {
        self.wake.notify_one();
    }

    /// Reloads on every announcement and every `every`; runs until aborted.
    pub async fn run(self: Arc<Self>, every: Duration) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.wake.notified() => {}
            }
            if let Err(e) = self.reload().await {
                // Keep the last known pauses: failing open or closed on a
                // database blip would both surprise the operator.
                tracing::warn!(error = %e, "issuance pauses not reloaded; keeping the last known");
            }
        }
    }

    /// Sets a pause and applies it here before returning (other replicas
    /// follow on the change notification).
    pub async fn pause(
        &self,
        scope: PauseScope,
        reason: String,
        actor: &Actor,
    ) -> Result<PauseRow, StoreError> {
        let row = PauseRow {
            scope,
            reason,
            paused_by: Some(actor.name.clone()),
            paused_at: now_ms(),
        };
        let audit = audit("issuance.paused", &row.scope, actor)
            .detail(json!({"scope": scope_name(&row.scope), "reason": row.reason}));
        self.store.set_pause(&row, &audit).await?;
        self.reload().await?;
        Ok(row)
    }

    /// Lifts a pause; returns whether one was in force.
    pub async fn resume(&self, scope: PauseScope, actor: &Actor) -> Result<bool, StoreError> {
        let audit =
            audit("issuance.resumed", &scope, actor).detail(json!({"scope": scope_name(&scope)}));
        let was = self.store.clear_pause(&scope, &audit).await?;
        self.reload().await?;
        Ok(was)
    }
}

fn audit(kind: &str, scope: &PauseScope, actor: &Actor) -> AuditEvent {
    let ev = AuditEvent::new(kind).actor(actor.name.clone()).by(actor);
    match scope {
        PauseScope::Operator => ev,
        PauseScope::Workspace(w) => ev.workspace(w.clone()),
    }
}

/// `operator` or `workspace`.
pub fn scope_name(s: &PauseScope) -> &'static str {
    match s {
        PauseScope::Operator => "operator",
        PauseScope::Workspace(_) => "workspace",
    }
}

/// A pause as the API shows it.
pub fn view(p: &PauseRow) -> serde_json::Value {
    json!({
        "scope": scope_name(&p.scope),
        "workspace_id": match &p.scope { PauseScope::Workspace(w) => Some(w.as_str()), PauseScope::Operator => None },
        "reason": p.reason,
        "paused_by": p.paused_by,
        "paused_at": rfc3339(p.paused_at),
    })
}
