//! The issuance tally: tokens served (here or from a gateway's cache) are
//! audited per connection per flush period, as one `token.issued` event with
//! the count and the first and last time, not one row per fetch. At
//! thousands of fetches a second the audit log would otherwise be mostly
//! identical rows, and writing them the largest cost of a fetch.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

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

/// Issuances counted since the last flush, by connection, in shards so that
/// concurrent fetches of different connections rarely wait on each other.
#[derive(Default)]
pub struct Tally {
    shards: [Mutex<HashMap<String, Issued>>; SHARDS],
}

const SHARDS: usize = 16;

impl Tally {
    fn shard(&self, id: &str) -> MutexGuard<'_, HashMap<String, Issued>> {
        // FNV-1a: cheap, and spread enough for random connection ids.
        let mut h: u32 = 0x811c_9dc5;
        for b in id.bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        self.shards[h as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
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
        let mut issued = self.shard(id);
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
        let mut drained = HashMap::new();
        for shard in &self.shards {
            drained.extend(std::mem::take(
                &mut *shard.lock().unwrap_or_else(|e| e.into_inner()),
            ));
        }
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
