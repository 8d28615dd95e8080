//! Webhook delivery: every replica's worker claims due deliveries with a
//! lease (`FOR UPDATE SKIP LOCKED` on PostgreSQL), POSTs them signed in the
//! Standard Webhooks format, records each attempt, and retries with capped
//! exponential backoff and full jitter until the event is 24 hours old.

use super::webhooks::{WebhookSecret, Webhooks};
use crate::store::{now_ms, Attempt, AttemptResult, DeliveryJob};
use crate::vault::Aad;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Webhooks {
    /// The delivery worker: every tick, claims due deliveries and sends them
    /// with bounded concurrency. When `stop` turns true it finishes the batch
    /// in hand and returns.
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
                if let Ok(n) = self.store.count_pending_deliveries().await {
                    metrics::gauge!("nexus_webhook_pending").set(n as f64);
                }
            }
            while !*stop.borrow() {
                // Long enough for the whole batch: `batch / concurrency` rounds
                // of POSTs, each bounded by the timeout. A lease that ran out
                // mid-batch would let another replica send the same rows.
                let rounds = (self.settings.batch.max(1) as u32)
                    .div_ceil(self.settings.concurrency.max(1) as u32);
                let lease = self.settings.timeout * (rounds + 1) + Duration::from_secs(5);
                let until = now_ms() + lease.as_millis() as i64;
                let jobs = match self
                    .store
                    .claim_deliveries(&self.owner, until, self.settings.batch)
                    .await
                {
                    Ok(j) => j,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook worker cannot claim deliveries");
                        break;
                    }
                };
                if jobs.is_empty() {
                    break;
                }
                let full = jobs.len() as i64 >= self.settings.batch;
                let me = self.clone();
                crate::batch::run_bounded(jobs, self.settings.concurrency, move |job| {
                    let me = me.clone();
                    async move { me.deliver(job).await }
                })
                .await;
                if !full {
                    break;
                }
            }
        }
    }

    async fn deliver(&self, job: DeliveryJob) {
        let started = Instant::now();
        let (http_status, error) = match (&job.url, &job.secret) {
            (Some(url), Some(env)) => self.post(&job, url, env).await,
            _ => {
                self.finish(&job, None, Some("endpoint deleted".into()), started, true)
                    .await;
                return;
            }
        };
        self.finish(&job, http_status, error, started, false).await;
    }

    /// POSTs one event; returns the status (if any) and an error text.
    async fn post(&self, job: &DeliveryJob, url: &str, env: &str) -> (Option<u16>, Option<String>) {
        let secret = match self
            .keys
            .decrypt_str(
                Aad::new("webhook_endpoints", &job.endpoint_id, "secret"),
                env,
            )
            .ok()
            .and_then(|s| WebhookSecret::parse(s.expose()))
        {
            Some(s) => s,
            None => return (None, Some("endpoint secret unreadable".into())),
        };
        if let Err(e) = self.egress.check_url("webhook url", url, false) {
            return (None, Some(e.to_string()));
        }
        let ts = now_ms() / 1000;
        let signature = secret.sign(&job.message_id, ts, &job.payload);
        let sent = self
            .http
            .post(url)
            .timeout(self.settings.timeout)
            .header("content-type", "application/json")
            .header("webhook-id", &job.message_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(job.payload.clone())
            .send()
            .await;
        match sent {
            // The body is not read: receivers' answers are not ours to keep.
            Ok(resp) if resp.status().is_success() => (Some(resp.status().as_u16()), None),
            Ok(resp) => (
                Some(resp.status().as_u16()),
                Some(format!("receiver answered {}", resp.status().as_u16())),
            ),
            Err(e) => (
                None,
                Some(nexus_core::outbound::failure_kind(&e).to_string()),
            ),
        }
    }

    async fn finish(
        &self,
        job: &DeliveryJob,
        http_status: Option<u16>,
        error: Option<String>,
        started: Instant,
        cancelled: bool,
    ) {
        let now = now_ms();
        let result = if cancelled {
            AttemptResult::Cancelled
        } else if error.is_none() {
            AttemptResult::Delivered
        } else {
            let delay = nexus_core::backoff::full_jitter(
                self.settings.backoff_base,
                self.settings.backoff_cap,
                job.attempts + 1,
            );
            let next = now + delay.as_millis() as i64;
            if next - job.created_at > self.settings.max_age.as_millis() as i64 {
                AttemptResult::Failed
            } else {
                AttemptResult::Retry(next)
            }
        };
        let outcome = match result {
            AttemptResult::Delivered => "delivered",
            AttemptResult::Retry(_) => "retry",
            AttemptResult::Failed => "failed",
            AttemptResult::Cancelled => "cancelled",
        };
        metrics::counter!("nexus_webhook_deliveries_total", "outcome" => outcome).increment(1);
        if let Some(e) = &error {
            tracing::warn!(message_id = %job.message_id, endpoint_id = %job.endpoint_id, event_type = %job.event_type, attempt = job.attempts + 1, error = %e, outcome, "webhook delivery failed");
        }
        let attempt = Attempt {
            http_status,
            error,
            duration_ms: started.elapsed().as_millis() as i64,
            result,
        };
        match self.store.record_attempt(job, &self.owner, &attempt).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(message_id = %job.message_id, "webhook delivery lease lost; another replica owns it now")
            }
            Err(e) => {
                tracing::warn!(message_id = %job.message_id, error = %e, "webhook attempt not recorded; it will be retried")
            }
        }
    }
}
