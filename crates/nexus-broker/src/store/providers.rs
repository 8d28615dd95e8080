//! Provider and alias rows.

use sqlx::Row;

use super::{now_ms, on_pool, Store, StoreError};
use crate::events::audit::AuditEvent;

/// A stored provider. `profile` is the JSON of its non-secret fields;
/// `client_secret` is a vault envelope bound to this row.
#[derive(Debug, Clone)]
pub struct ProviderRow {
    /// Stable id (UUID).
    pub id: String,
    /// Unique among live providers.
    pub name: String,
    /// `oauth2`, `api_key`, ...
    pub auth_type: String,
    /// Non-secret profile JSON.
    pub profile: String,
    /// Encrypted client secret, if any.
    pub client_secret: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
    /// Bumped on every update (optimistic concurrency).
    pub version: i64,
}

/// A provider to insert.
#[derive(Debug)]
pub struct NewProvider {
    /// Pre-generated id (the client secret's AAD names it).
    pub id: String,
    /// Name.
    pub name: String,
    /// Auth type wire name.
    pub auth_type: String,
    /// Non-secret profile JSON.
    pub profile: String,
    /// Encrypted client secret.
    pub client_secret: Option<String>,
}

/// What happens to the stored client secret on update.
#[derive(Debug)]
pub enum SecretUpdate {
    /// Leave it as it is.
    Keep,
    /// Replace it with this envelope.
    Set(String),
    /// Remove it.
    Clear,
}

/// New values for a provider.
#[derive(Debug)]
pub struct ProviderUpdate {
    /// Name.
    pub name: String,
    /// Auth type wire name.
    pub auth_type: String,
    /// Non-secret profile JSON.
    pub profile: String,
    /// Client secret change.
    pub client_secret: SecretUpdate,
    /// The version the change was computed from.
    pub expected_version: i64,
}

const PROVIDER_COLUMNS: &str =
    "id, name, auth_type, profile, client_secret, created_at, updated_at, version";

fn provider_from_row<R: Row>(row: &R) -> Result<ProviderRow, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(ProviderRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        auth_type: row.try_get("auth_type")?,
        profile: row.try_get("profile")?,
        client_secret: row.try_get("client_secret")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
    })
}

impl Store {
    /// Inserts a provider and its audit event in one transaction.
    pub async fn insert_provider(
        &self,
        p: &NewProvider,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO providers (id, name, auth_type, profile, client_secret, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $6)",
            )
            .bind(&p.id)
            .bind(&p.name)
            .bind(&p.auth_type)
            .bind(&p.profile)
            .bind(&p.client_secret)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(|e| StoreError::from_unique(e, || format!("a provider named '{}' already exists", p.name)))?;
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// A live provider by id.
    pub async fn get_provider(&self, id: &str) -> Result<Option<ProviderRow>, StoreError> {
        let sql = format!(
            "SELECT {PROVIDER_COLUMNS} FROM providers WHERE id = $1 AND deleted_at IS NULL"
        );
        on_pool!(self, pool => {
            let row = sqlx::query(&sql).bind(id).fetch_optional(pool).await?;
            Ok(row.as_ref().map(provider_from_row).transpose()?)
        })
    }

    /// All live providers, by name.
    pub async fn list_providers(&self) -> Result<Vec<ProviderRow>, StoreError> {
        let sql = format!(
            "SELECT {PROVIDER_COLUMNS} FROM providers WHERE deleted_at IS NULL ORDER BY name"
        );
        on_pool!(self, pool => {
            let rows = sqlx::query(&sql).fetch_all(pool).await?;
            Ok(rows.iter().map(provider_from_row).collect::<Result<_, _>>()?)
        })
    }

    /// A live provider by name (any case), else by normalized alias.
    pub async fn find_provider(
        &self,
        name: &str,
        normalized_alias: Option<&str>,
    ) -> Result<Option<ProviderRow>, StoreError> {
        let by_name = format!(
            "SELECT {PROVIDER_COLUMNS} FROM providers WHERE lower(name) = lower($1) AND deleted_at IS NULL"
        );
        let by_alias = format!(
            "SELECT {} FROM providers p JOIN provider_aliases a ON a.provider_id = p.id
             WHERE a.alias = $1 AND p.deleted_at IS NULL",
            PROVIDER_COLUMNS
                .split(", ")
                .map(|c| format!("p.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        on_pool!(self, pool => {
            if let Some(row) = sqlx::query(&by_name).bind(name).fetch_optional(pool).await? {
                return Ok(Some(provider_from_row(&row)?));
            }
            let Some(alias) = normalized_alias else { return Ok(None) };
            let row = sqlx::query(&by_alias).bind(alias).fetch_optional(pool).await?;
            Ok(row.as_ref().map(provider_from_row).transpose()?)
        })
    }

    /// Updates a live provider and audits it in one transaction.
    pub async fn update_provider(
        &self,
        id: &str,
        u: &ProviderUpdate,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        const SET: &str =
            "UPDATE providers SET name = $1, auth_type = $2, profile = $3, updated_at = $4, \
                           version = version + 1";
        const WHERE: &str = "WHERE id = $5 AND version = $6 AND deleted_at IS NULL";
        let (sql, secret) = match &u.client_secret {
            SecretUpdate::Keep => (format!("{SET} {WHERE}"), None),
            SecretUpdate::Set(s) => (
                format!("{SET}, client_secret = $7 {WHERE}"),
                Some(Some(s.as_str())),
            ),
            SecretUpdate::Clear => (format!("{SET}, client_secret = $7 {WHERE}"), Some(None)),
        };
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let mut q = sqlx::query(&sql)
                .bind(&u.name)
                .bind(&u.auth_type)
                .bind(&u.profile)
                .bind(now)
                .bind(id)
                .bind(u.expected_version);
            if let Some(secret) = secret {
                q = q.bind(secret);
            }
            let res = q
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_unique(e, || format!("a provider named '{}' already exists", u.name)))?;
            if res.rows_affected() == 0 {
                let live = sqlx::query("SELECT version FROM providers WHERE id = $1 AND deleted_at IS NULL")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
                return Err(match live {
                    Some(_) => StoreError::Conflict("the provider was changed by another request; read it again and retry".into()),
                    None => StoreError::NotFound,
                });
            }
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        self.publish(super::Change::Provider(id.to_string()));
        Ok(())
    }

    /// Soft-deletes a live provider, drops its aliases and audits, in one transaction.
    pub async fn delete_provider(&self, id: &str, audit: &AuditEvent) -> Result<(), StoreError> {
        let now = now_ms();
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let res = sqlx::query("UPDATE providers SET deleted_at = $1, updated_at = $1 WHERE id = $2 AND deleted_at IS NULL")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
            if res.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            sqlx::query("DELETE FROM provider_aliases WHERE provider_id = $1").bind(id).execute(&mut *tx).await?;
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        self.publish(super::Change::Provider(id.to_string()));
        Ok(())
    }

    /// Adds an alias to a live provider (audited in the same transaction).
    pub async fn add_alias(
        &self,
        provider_id: &str,
        alias: &str,
        display: &str,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        // On PostgreSQL the provider row is locked, so a concurrent soft delete
        // either finishes first (no alias is added) or waits for this insert
        // and then removes the alias with the rest.
        let lock = match self.backend() {
            super::Backend::Postgres => " FOR UPDATE",
            super::Backend::Sqlite => "",
        };
        let insert_alias = format!(
            "INSERT INTO provider_aliases (alias, display, provider_id, created_at)
             SELECT $1, $2, id, $4 FROM providers WHERE id = $3 AND deleted_at IS NULL{lock}"
        );
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            // One statement, so SQLite never has to upgrade a read lock (which
            // fails at once under concurrent writers).
            let res = sqlx::query(&insert_alias)
                .bind(alias)
                .bind(display)
                .bind(provider_id)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(|e| StoreError::from_unique(e, || format!("alias '{alias}' is already in use")))?;
            if res.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Aliases of a provider as `(normalized, display)`.
    pub async fn list_aliases(
        &self,
        provider_id: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query("SELECT alias, display FROM provider_aliases WHERE provider_id = $1 ORDER BY alias")
                .bind(provider_id)
                .fetch_all(pool)
                .await?;
            Ok(rows
                .iter()
                .map(|r| Ok((r.try_get("alias")?, r.try_get("display")?)))
                .collect::<Result<_, sqlx::Error>>()?)
        })
    }

    /// Removes an alias of a provider (audited in the same transaction).
    pub async fn remove_alias(
        &self,
        provider_id: &str,
        alias: &str,
        audit: &AuditEvent,
    ) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let res = sqlx::query("DELETE FROM provider_aliases WHERE provider_id = $1 AND alias = $2")
                .bind(provider_id)
                .bind(alias)
                .execute(&mut *tx)
                .await?;
            if res.rows_affected() == 0 {
                return Err(StoreError::NotFound);
            }
            super::audit::insert_one(&mut *tx, audit).await?;
            tx.commit().await?;
        });
        Ok(())
    }
}
