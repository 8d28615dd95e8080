//! Persisted discovery documents and JWKS.

use sqlx::Row;

use super::{on_pool, Store, StoreError};

/// A cached HTTP document.
#[derive(Debug, Clone)]
pub struct CachedDoc {
    /// URL it was fetched from.
    pub url: String,
    /// JSON body.
    pub body: String,
    /// `ETag` for revalidation.
    pub etag: Option<String>,
    /// `Last-Modified` for revalidation.
    pub last_modified: Option<String>,
    /// Unix ms.
    pub fetched_at: i64,
    /// Unix ms after which it must be revalidated.
    pub expires_at: i64,
}

impl Store {
    /// Reads a cached document.
    pub async fn get_cached_doc(&self, url: &str) -> Result<Option<CachedDoc>, StoreError> {
        on_pool!(self, pool => {
            let row = sqlx::query("SELECT url, body, etag, last_modified, fetched_at, expires_at FROM http_cache WHERE url = $1")
                .bind(url)
                .fetch_optional(pool)
                .await?;
            let Some(r) = row else { return Ok(None) };
            Ok(Some(CachedDoc {
                url: r.try_get("url")?,
                body: r.try_get("body")?,
                etag: r.try_get("etag")?,
                last_modified: r.try_get("last_modified")?,
                fetched_at: r.try_get("fetched_at")?,
                expires_at: r.try_get("expires_at")?,
            }))
        })
    }

    /// Inserts or replaces a cached document.
    pub async fn put_cached_doc(&self, d: &CachedDoc) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            sqlx::query(
                "INSERT INTO http_cache (url, body, etag, last_modified, fetched_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (url) DO UPDATE SET body = excluded.body, etag = excluded.etag,
                   last_modified = excluded.last_modified, fetched_at = excluded.fetched_at, expires_at = excluded.expires_at",
            )
            .bind(&d.url)
            .bind(&d.body)
            .bind(&d.etag)
            .bind(&d.last_modified)
            .bind(d.fetched_at)
            .bind(d.expires_at)
            .execute(pool)
            .await?;
        });
        Ok(())
    }
}
