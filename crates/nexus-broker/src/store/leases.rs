//! Refresh leases: one refresher per connection across replicas
//! (`lease_owner`, `lease_until`), and the worker's claim of due connections
//! (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so replicas claim disjoint batches).

use sqlx::Row;

use super::{now_ms, on_pool, Store, StoreError};

impl Store {
    /// Takes the refresh lease of one connection for `owner` until `until`,
    /// unless another owner holds an unexpired lease. Returns whether it was taken.
    pub async fn try_lease(&self, id: &str, owner: &str, until: i64) -> Result<bool, StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let res = sqlx::query(
                "UPDATE connections SET lease_owner = $1, lease_until = $2
                 WHERE id = $3 AND (lease_until IS NULL OR lease_until < $4 OR lease_owner = $1)",
            )
            .bind(owner)
            .bind(until)
            .bind(id)
            .bind(now)
            .execute(pool)
            .await?;
            Ok(res.rows_affected() == 1)
        })
    }

    /// Records the refresh's intent (`refresh_started_at`) just before the
    /// refresh token goes to the provider, if `owner` still holds the lease.
    /// An intent already there (an earlier call whose fate is unknown) is
    /// moved to now: the column then says when the latest call went out,
    /// which is what a replica taking over must wait for, and it stays set
    /// until a refresh succeeds. Returns whether the lease was still held.
    pub async fn mark_refresh_started(&self, id: &str, owner: &str) -> Result<bool, StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let res = sqlx::query(
                "UPDATE connections SET refresh_started_at = $1
                 WHERE id = $2 AND lease_owner = $3 AND lease_until >= $1",
            )
            .bind(now)
            .bind(id)
            .bind(owner)
            .execute(pool)
            .await?;
            Ok(res.rows_affected() == 1)
        })
    }

    /// Gives a lease back without a refresh result (e.g. nothing was due after all).
    pub async fn release_lease(&self, id: &str, owner: &str) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query("UPDATE connections SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND lease_owner = $2")
                .bind(id)
                .bind(owner)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Pushes a connection that is still due (and not leased by another
    /// replica) to `retry_at` and drops `owner`'s lease. Returns whether it
    /// did: a refresh that stored a result has already moved the schedule.
    pub async fn defer_if_due(
        &self,
        id: &str,
        owner: &str,
        now: i64,
        retry_at: i64,
    ) -> Result<bool, StoreError> {
        on_pool!(self, pool => {
            let res = sqlx::query(
                "UPDATE connections SET next_refresh_at = $1, lease_owner = NULL, lease_until = NULL,
                    consecutive_failures = consecutive_failures + 1, last_failure_at = $3
                 WHERE id = $2 AND next_refresh_at <= $3
                   AND (lease_owner IS NULL OR lease_owner = $4 OR lease_until < $3)",
            )
            .bind(retry_at)
            .bind(id)
            .bind(now)
            .bind(owner)
            .execute(pool)
            .await?;
            Ok(res.rows_affected() == 1)
        })
    }

    /// Claims up to `limit` connections due for refresh, oldest due first, by
    /// leasing them to `owner` until `until`. On PostgreSQL, rows another
    /// replica is claiming right now are skipped (`FOR UPDATE SKIP LOCKED`).
    pub async fn claim_due(
        &self,
        owner: &str,
        until: i64,
        limit: i64,
    ) -> Result<Vec<String>, StoreError> {
        let now = now_ms();
        let skip_locked = match self.backend() {
            super::Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            super::Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE connections SET lease_owner = $1, lease_until = $2
             WHERE id IN (SELECT id FROM connections
                          WHERE status IN ('active', 'degraded') AND next_refresh_at IS NOT NULL AND next_refresh_at <= $3
                            AND (lease_until IS NULL OR lease_until < $3)
                          ORDER BY next_refresh_at LIMIT $4{skip_locked})
             RETURNING id"
        );
        on_pool!(self, pool => {
            let rows = sqlx::query(&sql).bind(owner).bind(until).bind(now).bind(limit).fetch_all(pool).await?;
            Ok(rows.iter().map(|r| r.try_get::<String, _>("id")).collect::<Result<_, _>>()?)
        })
    }
}
