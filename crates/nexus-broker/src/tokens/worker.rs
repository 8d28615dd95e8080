//! The background refresh worker: every tick, claim due connections in
//! batches (memory stays flat however many there are) and refresh them with
//! bounded concurrency. Every claimed connection leaves the due set.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::TokenError;
use super::refresh::{Mode, Refresher};
use super::schedule::backoff;
use crate::registry::profile::AuthType;
use crate::registry::RegistryError;
use crate::store::now_ms;

impl Refresher {
    /// Refreshes one connection the worker has claimed (leased to `owner`).
    /// Whatever happens, the connection leaves the due set: either the
    /// attempt moved its schedule, or it is deferred by a backoff, so the
    /// worker never spins on a connection it cannot refresh.
    async fn refresh_claimed(self: &Arc<Self>, id: &str, owner: String) -> Result<(), TokenError> {
        let result = self.refresh_claimed_inner(id, owner.clone()).await;
        let attempt = match self.store.get_connection(id).await {
            Ok(Some(c)) => c.consecutive_failures + 1,
            _ => 1,
        };
        let retry_at = now_ms() + backoff(&self.settings, attempt, None).as_millis() as i64;
        if self
            .store
            .defer_if_due(id, &owner, now_ms(), retry_at)
            .await?
        {
            tracing::warn!(connection_id = %id, "scheduled refresh deferred without a result");
        }
        result
    }

    async fn refresh_claimed_inner(
        self: &Arc<Self>,
        id: &str,
        owner: String,
    ) -> Result<(), TokenError> {
        let c = self
            .store
            .get_connection(id)
            .await?
            .ok_or(TokenError::NotFound)?;
        let provider = match self.registry.get(&c.provider_id).await {
            Ok(p) => p,
            Err(RegistryError::NotFound) => {
                // Nothing to refresh against until someone reconnects it to a
                // provider: stop scheduling it, and say why on the connection.
                self.store
                    .record_refresh_failure(
                        id,
                        c.version,
                        &owner,
                        "provider_deleted",
                        "the connection's provider was deleted",
                        None,
                        None,
                        true,
                    )
                    .await?;
                return Err(TokenError::Unusable(
                    "the connection's provider was deleted".into(),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        if provider.profile.auth_type != AuthType::Oauth2 {
            self.store.release_lease(id, &owner).await?;
            return Ok(());
        }
        self.refresh(&provider, c, Mode::Scheduled, now_ms(), Some(owner))
            .await
            .map(|_| ())
    }

    /// The background worker: every tick, claims due connections in batches
    /// (memory stays flat however many there are) and refreshes them with
    /// bounded concurrency. When `stop` turns true (or its sender is
    /// dropped) it finishes the batch in hand and returns, so no refresh is
    /// cut off midway.
    pub async fn run_worker(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_gauge = Instant::now() - Duration::from_secs(3600);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = stop.changed() => if changed.is_err() || *stop.borrow() { return },
            }
            if last_gauge.elapsed() >= Duration::from_secs(15) {
                last_gauge = Instant::now();
                if let Ok(counts) = self.store.count_by_status().await {
                    for (status, n) in counts {
                        metrics::gauge!("nexus_connections", "status" => status).set(n as f64);
                    }
                }
            }
            while !*stop.borrow() {
                let owner = self.attempt_owner();
                let until = now_ms() + self.settings.lease.as_millis() as i64;
                let ids = match self
                    .store
                    .claim_due(&owner, until, self.settings.batch)
                    .await
                {
                    Ok(ids) => ids,
                    Err(e) => {
                        tracing::warn!(error = %e, "refresh worker cannot claim due connections");
                        break;
                    }
                };
                if ids.is_empty() {
                    break;
                }
                let full = ids.len() as i64 >= self.settings.batch;
                let me = self.clone();
                crate::batch::run_bounded(ids, self.settings.concurrency, move |id: String| {
                    let (me, owner) = (me.clone(), owner.clone());
                    async move {
                        if let Err(e) = me.refresh_claimed(&id, owner).await {
                            tracing::debug!(connection_id = %id, error = %e, "scheduled refresh did not succeed");
                        }
                    }
                })
                .await;
                if !full {
                    break;
                }
            }
        }
    }
}
