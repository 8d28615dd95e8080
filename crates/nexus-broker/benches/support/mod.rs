//! What the broker benchmarks share: the databases they run on, and seeding
//! active OAuth connections straight into the store's tables.
//!
//! Each bench is its own target and uses only part of this module.
#![allow(dead_code)]

use std::future::Future;

use nexus_broker::store::now_ms;
use nexus_broker::vault::{Aad, KeyRing};
use nexus_core::Secret;

/// Runs `bench(label, database_url)` on a fresh SQLite file, then on
/// PostgreSQL in a private schema (dropped afterwards) when
/// `NEXUS_TEST_DATABASE_URL` is set. `BENCH_BACKENDS` (default
/// `sqlite,postgres`) picks which.
pub async fn on_each_backend<F: Future<Output = ()>>(
    mut bench: impl FnMut(&'static str, String) -> F,
) {
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    if backends.contains("sqlite") {
        let dir = tempfile::tempdir().expect("tempdir");
        bench(
            "sqlite",
            format!("sqlite:{}", dir.path().join("bench.db").display()),
        )
        .await;
    }
    if !backends.contains("postgres") {
        return;
    }
    let Ok(admin_url) = std::env::var("NEXUS_TEST_DATABASE_URL") else {
        println!("postgres  skipped (set NEXUS_TEST_DATABASE_URL)");
        return;
    };
    let schema = format!("nxb_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&admin_url).await.expect("connect");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .expect("schema");
    let sep = if admin_url.contains('?') { '&' } else { '?' };
    bench(
        "postgres",
        format!("{admin_url}{sep}options[search_path]={schema}"),
    )
    .await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await
        .expect("drop");
}

/// One `SELECT COUNT(*) ...`-style number.
pub async fn scalar(url: &str, sql: &str) -> i64 {
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.expect("connect");
        sqlx::query_scalar(sql)
            .fetch_one(&pool)
            .await
            .expect("query")
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("connect");
        sqlx::query_scalar(sql)
            .fetch_one(&pool)
            .await
            .expect("query")
    }
}

/// Active OAuth connections `conn-0000000`.. of one provider, with sealed
/// tokens (`access_token(i)`, refresh token `rt-<i>`).
pub struct Seed<'a> {
    pub keys: &'a KeyRing,
    pub provider_id: &'a str,
    pub count: usize,
    pub access_token: fn(usize) -> String,
    pub expires_at: i64,
    pub next_refresh_at: i64,
    /// When the current token was issued (`None`: unknown).
    pub last_success_at: Option<i64>,
}

/// The id of seeded connection `i`.
pub fn connection_id(i: usize) -> String {
    format!("conn-{i:07}")
}

/// Inserts the connections, 1,000 rows per statement.
pub async fn seed(url: &str, s: &Seed<'_>) {
    let now = now_ms();
    let rows: Vec<(String, String, String)> = (0..s.count)
        .map(|i| {
            let id = connection_id(i);
            let aad = |column| Aad {
                table: "connections",
                row_id: &id,
                column,
            };
            let at = s
                .keys
                .encrypt_str(aad("access_token"), &Secret::new((s.access_token)(i)));
            let rt = s
                .keys
                .encrypt_str(aad("refresh_token"), &Secret::new(format!("rt-{i}")));
            (id.clone(), at, rt)
        })
        .collect();
    macro_rules! insert_all {
        ($pool:expr, $db:ty) => {{
            let pool = $pool;
            for chunk in rows.chunks(1000) {
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO connections (id, workspace_id, provider_id, status, requested_scopes, granted_scopes,
                     access_token, refresh_token, token_type, expires_at, last_success_at, next_refresh_at,
                     created_at, updated_at) ",
                );
                qb.push_values(chunk, |mut b, (id, at, rt)| {
                    b.push_bind(id)
                        .push_bind("ws-bench")
                        .push_bind(s.provider_id)
                        .push_bind("active")
                        .push_bind("[\"openid\",\"email\"]")
                        .push_bind("[\"openid\",\"email\"]")
                        .push_bind(at)
                        .push_bind(rt)
                        .push_bind("Bearer")
                        .push_bind(s.expires_at)
                        .push_bind(s.last_success_at)
                        .push_bind(s.next_refresh_at)
                        .push_bind(now)
                        .push_bind(now);
                });
                qb.build().execute(&pool).await.expect("seed");
            }
        }};
    }
    if url.starts_with("sqlite:") {
        insert_all!(
            sqlx::SqlitePool::connect(url).await.expect("connect"),
            sqlx::Sqlite
        );
    } else {
        insert_all!(
            sqlx::PgPool::connect(url).await.expect("connect"),
            sqlx::Postgres
        );
    }
}
