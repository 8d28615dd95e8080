//! Optional Redis cache shared by broker replicas (`REDIS_URL`).
//!
//! It is a cache, never the system of record: every failure is logged,
//! counted in `nexus_shared_cache_errors_total`, and answered as a miss, so
//! a Redis outage slows a replica down but never fails a request.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

/// Longest wait for Redis before treating the call as a miss.
const TIMEOUT: Duration = Duration::from_millis(500);

/// Redis could not be reached at start-up.
#[derive(Debug, thiserror::Error)]
#[error("REDIS_URL: cannot connect to Redis: {0}")]
pub struct SharedCacheError(String);

/// A Redis connection with a key prefix.
#[derive(Clone)]
pub struct SharedCache {
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCache")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn failed(op: &'static str, e: impl std::fmt::Display) {
    metrics::counter!("nexus_shared_cache_errors_total", "op" => op).increment(1);
    tracing::warn!(error = %e, op, "Redis cache unavailable; continuing without it");
}

impl SharedCache {
    /// Connects (once, at start-up: a configured Redis that is down is an error then).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, SharedCacheError> {
        let client = redis::Client::open(url).map_err(|e| SharedCacheError(e.to_string()))?;
        let conn = tokio::time::timeout(Duration::from_secs(5), client.get_connection_manager())
            .await
            .map_err(|_| SharedCacheError("timed out".into()))?
            .map_err(|e| SharedCacheError(e.to_string()))?;
        Ok(Self {
            conn,
            prefix: prefix.to_string(),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Reads a value; `None` on a miss or any failure.
    pub async fn get(&self, key: &str) -> Option<String> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(TIMEOUT, conn.get::<_, Option<String>>(self.key(key))).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                failed("get", e);
                None
            }
            Err(_) => {
                failed("get", "timed out");
                None
            }
        }
    }

    /// Writes a value that Redis drops after `ttl`.
    pub async fn set(&self, key: &str, value: &str, ttl: Duration) {
        let mut conn = self.conn.clone();
        let secs = ttl.as_secs().max(1);
        match tokio::time::timeout(TIMEOUT, conn.set_ex::<_, _, ()>(self.key(key), value, secs))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed("set", e),
            Err(_) => failed("set", "timed out"),
        }
    }
}
