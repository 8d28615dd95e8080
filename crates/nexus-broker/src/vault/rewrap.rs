//! `nexus keys rewrap`: re-encrypt every stored secret under the active key.
//!
//! Safe while the broker serves traffic: each row is swapped with a
//! compare-and-swap on its old envelope, so a concurrent write (which already
//! uses the active key) is never overwritten. Resumable: only rows still on an
//! older key are selected, so a rerun after a crash picks up where the last
//! run stopped.

use std::ops::ControlFlow;

use crate::store::{Store, StoreError, ENCRYPTED_COLUMNS};
use crate::vault::{Aad, KeyRing, ENVELOPE_VERSION};

const BATCH: i64 = 200;

/// Progress after each row.
#[derive(Debug, Clone, Copy)]
pub struct RewrapProgress {
    /// Rows on an old key when the run started.
    pub total: u64,
    /// Rows handled so far.
    pub done: u64,
}

/// A row that could not be rewrapped.
#[derive(Debug, Clone)]
pub struct RewrapFailure {
    /// Table.
    pub table: &'static str,
    /// Column.
    pub column: &'static str,
    /// Row id.
    pub row_id: String,
    /// Why (never the secret).
    pub reason: String,
}

/// Outcome of a rewrap run.
#[derive(Debug, Default, Clone)]
pub struct RewrapReport {
    /// Rows re-encrypted under the active key.
    pub rewrapped: u64,
    /// Rows that changed under us (already rewritten by the broker).
    pub raced: u64,
    /// Rows that could not be decrypted with any key of the ring.
    pub failed: Vec<RewrapFailure>,
    /// The progress callback asked to stop early.
    pub interrupted: bool,
}

/// Rewraps every encrypted column. `on_progress` runs after each row; return
/// `ControlFlow::Break(())` to stop cleanly (e.g. on Ctrl-C).
pub async fn rewrap(
    store: &Store,
    keys: &KeyRing,
    mut on_progress: impl FnMut(RewrapProgress) -> ControlFlow<()>,
) -> Result<RewrapReport, StoreError> {
    let prefix = format!("{ENVELOPE_VERSION}.{}.", keys.active_id());
    let mut total = 0u64;
    for col in ENCRYPTED_COLUMNS {
        total += store.count_not_on_key(col, &prefix).await?.max(0) as u64;
    }
    let mut report = RewrapReport::default();
    let mut done = 0u64;
    for col in ENCRYPTED_COLUMNS {
        let mut after = String::new();
        loop {
            let batch = store
                .envelopes_not_on_key(col, &prefix, &after, BATCH)
                .await?;
            let Some((last_id, _)) = batch.last() else {
                break;
            };
            after = last_id.clone();
            for (id, old) in batch {
                let aad = Aad {
                    table: col.table,
                    row_id: &id,
                    column: col.column,
                };
                match keys.decrypt(aad, &old) {
                    Ok(plain) => {
                        let new = keys.encrypt(aad, plain.expose());
                        if store.swap_envelope(col, &id, &old, &new).await? {
                            report.rewrapped += 1;
                        } else {
                            report.raced += 1;
                        }
                    }
                    Err(e) => report.failed.push(RewrapFailure {
                        table: col.table,
                        column: col.column,
                        row_id: id.clone(),
                        reason: e.to_string(),
                    }),
                }
                done += 1;
                if on_progress(RewrapProgress { total, done }).is_break() {
                    report.interrupted = true;
                    return Ok(report);
                }
            }
        }
    }
    Ok(report)
}
