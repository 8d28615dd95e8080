//! The issuance tally: tokens served (here or from a gateway's cache) are
//! audited per connection per flush period, as one `token.issued` event with
//! the count and the first and last time, not one row per fetch. At
//! thousands of fetches a second the audit log would otherwise be mostly
//! identical rows, and writing them the largest cost of a fetch.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::json;

use crate::events::audit::{AuditEvent, AuditSink};
use crate::store::{now_ms, rfc3339};

/// Issuances of one connection since the last flush.
struct Issued {
    provider_id: String,
    workspace_id: String,
    count: u64,
    first_at: i64,
    last_at: i64,
}

/// Issuances counted since the last flush, by connection.
#[derive(Default)]
pub struct Tally {
    issued: Mutex<HashMap<String, Issued>>,
}

impl Tally {
    /// Counts one token issued now.
    pub fn one(&self, id: &str, provider_id: &str, workspace_id: &str) {
        let now = now_ms();
        self.add(id, provider_id, workspace_id, 1, now, now);
    }

    /// Adds `count` issuances between `first_at` and `last_at` to a
    /// connection's tally for the next flush.
    pub fn add(
        &self,
        id: &str,
        provider_id: &str,
        workspace_id: &str,
        count: u64,
        first_at: i64,
        last_at: i64,
    ) {
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        match issued.get_mut(id) {
            Some(n) => {
                n.count += count;
                n.first_at = n.first_at.min(first_at);
                n.last_at = n.last_at.max(last_at);
            }
            None => {
                issued.insert(
                    id.to_string(),
                    Issued {
                        provider_id: provider_id.to_string(),
                        workspace_id: workspace_id.to_string(),
                        count,
                        first_at,
                        last_at,
                    },
                );
            }
        }
    }

    /// Writes the issuances counted so far as `token.issued` audit events
    /// (through the batching writer).
    pub async fn flush(&self, audit: &AuditSink) {
        let drained = std::mem::take(&mut *self.issued.lock().unwrap_or_else(|e| e.into_inner()));
        for (id, n) in drained {
            let mut ev = AuditEvent::new("token.issued")
                .actor("agent")
                .provider(n.provider_id)
                .connection(id)
                .workspace(n.workspace_id)
                .detail(json!({"count": n.count, "first_at": rfc3339(n.first_at), "last_at": rfc3339(n.last_at)}));
            ev.occurred_at_ms = n.first_at;
            if let Err(e) = audit.record(ev).await {
                tracing::error!(error = %e, "token audit event not recorded");
            }
        }
    }
}
