//! Keeping the gateway's token cache honest: follow the broker's change
//! stream (drop what it announces; keep nothing while it is not open), and
//! report the tokens served from the cache so the broker audits them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use nexus_core::wire::{routes, ChangeLine, Issued, IssuedReport};

use crate::core::Gateway;
use crate::token_cache::Served;

/// Follows the change stream until aborted, reconnecting with capped,
/// jittered backoff. The cache is live only between the stream's `ready`
/// and its end.
pub async fn follow(g: Arc<Gateway>) {
    let mut failures: i64 = 0;
    loop {
        let ended = match g
            .broker
            .stream(&g.broker.url(routes::TOKEN_CHANGES, ""))
            .await
        {
            Ok(mut stream) => {
                let why = read(&g, &mut stream).await;
                if g.tokens.is_live() {
                    failures = 0;
                }
                g.tokens.set_live(false);
                why
            }
            Err(e) => e.message,
        };
        metrics::counter!("nexus_gateway_change_stream_lost_total").increment(1);
        tracing::warn!(reason = %ended, "broker change stream closed; token cache off until it is back");
        failures += 1;
        let pause = nexus_core::backoff::full_jitter(
            Duration::from_millis(500),
            Duration::from_secs(30),
            failures,
        )
        .max(Duration::from_millis(100));
        tokio::time::sleep(pause).await;
    }
}

/// Applies the stream's lines until it ends; says why it ended.
async fn read(g: &Gateway, stream: &mut crate::broker::Streamed) -> String {
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let chunk = match stream.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => return "the broker ended the stream".into(),
            Err(e) => return e,
        };
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            let line = &line[..line.len() - 1];
            if line.is_empty() {
                continue;
            }
            match ChangeLine::parse(line) {
                Some(ChangeLine::Ready) => {
                    g.tokens.set_live(true);
                    tracing::info!("broker change stream ready; token cache on");
                }
                Some(ChangeLine::Connection(id)) => g.tokens.forget(&id),
                Some(ChangeLine::Ping) => {}
                // An unknown line could be an invalidation of a kind this
                // gateway does not know: drop everything to be safe.
                Some(ChangeLine::All) | None => g.tokens.clear(),
            }
        }
        if pending.len() > 64 * 1024 {
            return "an over-long line on the change stream".into();
        }
    }
}

/// Reports the tokens served from the cache every `every` until aborted.
pub async fn report(g: Arc<Gateway>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        report_once(&g).await;
    }
}

/// Most entries in one report (the broker takes up to 10 000).
const REPORT_BATCH: usize = 5_000;

/// Reports what was served since the last report. Counts the broker did not
/// take because it was away are kept for the next report.
pub async fn report_once(g: &Gateway) {
    let served: Vec<(String, Served)> = g.tokens.take_served().into_iter().collect();
    for batch in served.chunks(REPORT_BATCH) {
        let report = IssuedReport {
            issued: batch
                .iter()
                .map(|(id, s)| Issued {
                    connection_id: id.clone(),
                    count: s.count,
                    first_at: s.first_at,
                    last_at: s.last_at,
                })
                .collect(),
        };
        let url = g.broker.url(routes::TOKENS_ISSUED, "");
        // Plain strings and numbers: serialising cannot fail.
        let body = serde_json::to_value(&report).unwrap_or_default();
        match g.broker.post(url, &body).await {
            Ok(r) if r.status.is_success() => {}
            Ok(r) if r.status.is_server_error() => keep(g, batch, r.status.as_str()),
            Ok(r) => {
                // The broker refused the report itself: retrying cannot help.
                metrics::counter!("nexus_gateway_issued_reports_dropped_total").increment(1);
                tracing::error!(status = %r.status, "the broker refused a report of served tokens");
            }
            Err(e) => keep(g, batch, &e.message),
        }
    }
}

fn keep(g: &Gateway, batch: &[(String, Served)], why: &str) {
    tracing::warn!(reason = %why, "served tokens not reported yet; kept for the next report");
    g.tokens
        .restore_served(batch.iter().cloned().collect::<HashMap<_, _>>());
}
