//! Generic access to every encrypted column, for `nexus keys rewrap`.

use sqlx::Row;

use super::{on_pool, Store, StoreError};

/// A column holding vault envelopes, and the key column its AAD names.
#[derive(Debug, Clone, Copy)]
pub struct EncryptedColumn {
    /// Table name (also the AAD's table).
    pub table: &'static str,
    /// Primary key column (its value is the AAD's row id).
    pub id_column: &'static str,
    /// The envelope column (also the AAD's column).
    pub column: &'static str,
}

/// Every encrypted column in the schema. A migration that adds a secret column
/// must add it here, or rewrap will leave it on the old key.
pub const ENCRYPTED_COLUMNS: &[EncryptedColumn] = &[
    EncryptedColumn {
        table: "providers",
        id_column: "id",
        column: "client_secret",
    },
    EncryptedColumn {
        table: "connections",
        id_column: "id",
        column: "access_token",
    },
    EncryptedColumn {
        table: "connections",
        id_column: "id",
        column: "refresh_token",
    },
    EncryptedColumn {
        table: "connections",
        id_column: "id",
        column: "id_token",
    },
    EncryptedColumn {
        table: "connections",
        id_column: "id",
        column: "credentials",
    },
    EncryptedColumn {
        table: "handshakes",
        id_column: "id",
        column: "code_verifier",
    },
    EncryptedColumn {
        table: "webhook_endpoints",
        id_column: "id",
        column: "secret",
    },
];

impl EncryptedColumn {
    fn not_on_key_clause(&self) -> String {
        // substr instead of LIKE: key ids may contain '_', a LIKE wildcard.
        format!(
            "{col} IS NOT NULL AND substr({col}, 1, CAST($1 AS INTEGER)) <> $2",
            col = self.column
        )
    }
}

impl Store {
    /// Counts envelopes in `col` written under none of the keys whose envelope
    /// prefixes are given (secrets the current key ring cannot open).
    pub async fn count_outside_keys(
        &self,
        col: &EncryptedColumn,
        prefixes: &[String],
    ) -> Result<i64, StoreError> {
        let mut sql = format!(
            "SELECT COUNT(*) AS n FROM {} WHERE {} IS NOT NULL",
            col.table, col.column
        );
        for i in 0..prefixes.len() {
            sql.push_str(&format!(
                " AND substr({c}, 1, CAST(${a} AS INTEGER)) <> ${b}",
                c = col.column,
                a = 2 * i + 1,
                b = 2 * i + 2
            ));
        }
        on_pool!(self, pool => {
            let mut q = sqlx::query(&sql);
            for p in prefixes {
                q = q.bind(p.len() as i64).bind(p.as_str());
            }
            let row = q.fetch_one(pool).await?;
            Ok(row.try_get::<i64, _>("n")?)
        })
    }

    /// Counts envelopes in `col` not written under the key whose envelope prefix is `prefix`.
    pub async fn count_not_on_key(
        &self,
        col: &EncryptedColumn,
        prefix: &str,
    ) -> Result<i64, StoreError> {
        let sql = format!(
            "SELECT COUNT(*) AS n FROM {} WHERE {}",
            col.table,
            col.not_on_key_clause()
        );
        on_pool!(self, pool => {
            let row = sqlx::query(&sql).bind(prefix.len() as i64).bind(prefix).fetch_one(pool).await?;
            Ok(row.try_get::<i64, _>("n")?)
        })
    }

    /// Next batch of `(row id, envelope)` not on the key of `prefix`, with ids after `after`.
    pub async fn envelopes_not_on_key(
        &self,
        col: &EncryptedColumn,
        prefix: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let sql = format!(
            "SELECT {id} AS id, {c} AS env FROM {t} WHERE {clause} AND {id} > $3 ORDER BY {id} LIMIT $4",
            id = col.id_column,
            c = col.column,
            t = col.table,
            clause = col.not_on_key_clause()
        );
        on_pool!(self, pool => {
            let rows = sqlx::query(&sql)
                .bind(prefix.len() as i64)
                .bind(prefix)
                .bind(after)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            Ok(rows
                .iter()
                .map(|r| Ok((r.try_get("id")?, r.try_get("env")?)))
                .collect::<Result<_, sqlx::Error>>()?)
        })
    }

    /// Replaces an envelope only if it still holds `old` (compare-and-swap), so a
    /// concurrent write by the running broker is never overwritten. Returns
    /// whether the row was updated.
    pub async fn swap_envelope(
        &self,
        col: &EncryptedColumn,
        id: &str,
        old: &str,
        new: &str,
    ) -> Result<bool, StoreError> {
        let sql = format!(
            "UPDATE {t} SET {c} = $1 WHERE {id} = $2 AND {c} = $3",
            t = col.table,
            c = col.column,
            id = col.id_column
        );
        on_pool!(self, pool => {
            let res = sqlx::query(&sql).bind(new).bind(id).bind(old).execute(pool).await?;
            Ok(res.rows_affected() == 1)
        })
    }
}
