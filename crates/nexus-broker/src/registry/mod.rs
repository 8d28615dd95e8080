//! The provider registry: create, read, change and retire provider profiles,
//! with the client secret sealed in the vault and every change audited in the
//! same transaction.

pub mod agent_keys;
pub mod catalogue;
pub mod profile;
pub mod strategy;

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::events::audit::Actor;
use crate::registry::profile::{normalize_alias, parse_profile, ProfileError, ProviderProfile};
use crate::registry::strategy::Strategy;
use crate::store::{NewProvider, ProviderRow, ProviderUpdate, SecretUpdate, Store, StoreError};
use crate::vault::{Aad, KeyRing};
use nexus_core::Secret;

/// Registry failures.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The profile breaks a rule.
    #[error(transparent)]
    Invalid(#[from] ProfileError),
    /// No live provider with that id or name.
    #[error("provider not found")]
    NotFound,
    /// A name or alias is taken.
    #[error("{0}")]
    Conflict(String),
    /// The provider is no longer at the version the caller read (`If-Match`).
    #[error(
        "the provider changed since version {expected} (it is at version {now}); read it again"
    )]
    Changed {
        /// The version the caller read.
        expected: i64,
        /// The version stored now.
        now: i64,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => RegistryError::NotFound,
            StoreError::Conflict(m) => RegistryError::Conflict(m),
            other => RegistryError::Store(other),
        }
    }
}

/// A provider read back from the store, secret excluded.
#[derive(Debug, Clone)]
pub struct Provider {
    /// Stored row.
    pub row: ProviderRow,
    /// Parsed profile (its `client_secret` is always `None`).
    pub profile: ProviderProfile,
    /// The provider's strategy.
    pub strategy: Strategy,
}

impl Provider {
    fn from_row(row: ProviderRow) -> Result<Self, RegistryError> {
        let value: Value = serde_json::from_str(&row.profile)
            .map_err(|e| StoreError::Corrupt(format!("provider {} profile: {e}", row.id)))?;
        let profile = parse_profile(value)
            .map_err(|e| StoreError::Corrupt(format!("provider {} profile: {e}", row.id)))?;
        // Stored profiles were fully validated when written; reads only derive
        // the strategy (no schema compilation, and a rule made stricter later
        // cannot make old rows unreadable).
        let strategy = crate::registry::strategy::validate(
            profile.auth_type,
            profile.params.get("strategy"),
            None,
        )
        .map_err(|e| StoreError::Corrupt(format!("provider {} strategy: {e}", row.id)))?;
        Ok(Self {
            row,
            profile,
            strategy,
        })
    }

    /// Whether a client secret is stored.
    pub fn client_secret_set(&self) -> bool {
        self.row.client_secret.is_some()
    }
}

/// One profile field a change would alter, as a plan shows it. The client
/// secret is never shown: its values are `"(set)"`, `"(not set)"`,
/// `"(changed)"` or `"(removed)"`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FieldChange {
    /// The profile field.
    pub field: String,
    /// Its value now (`null`: absent).
    pub before: Value,
    /// Its value after the change (`null`: absent).
    pub after: Value,
}

/// What registering a profile would do, computed without changing anything.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    /// `"create"`, `"update"` or `"none"`.
    pub action: &'static str,
    /// The provider's id (update and none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The version the plan was computed from (update and none): send it
    /// back as `If-Match` so a change made since is refused, not overwritten.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// Every field that would change.
    pub changes: Vec<FieldChange>,
}

/// The secret's part of a plan.
fn secret_shown(set: bool) -> Value {
    json!(if set { "(set)" } else { "(not set)" })
}

/// Provider registry over a store and the vault.
#[derive(Clone)]
pub struct Registry {
    store: Store,
    keys: Arc<KeyRing>,
}

const SECRET_COLUMN: &str = "client_secret";

fn secret_aad(id: &str) -> Aad<'_> {
    Aad {
        table: "providers",
        row_id: id,
        column: SECRET_COLUMN,
    }
}

/// Splits a request body into the profile object and whether/how it sets the
/// client secret. Accepts `{"profile": {...}}` (the reference shape) or a bare profile.
fn unwrap_profile(body: Value) -> Result<Map<String, Value>, ProfileError> {
    let obj = match body {
        Value::Object(mut o) if o.contains_key("profile") => match o.remove("profile") {
            Some(Value::Object(p)) => p,
            _ => {
                return Err(ProfileError {
                    field: "profile".into(),
                    message: "must be a JSON object".into(),
                })
            }
        },
        Value::Object(o) => o,
        _ => {
            return Err(ProfileError {
                field: "profile".into(),
                message: "request body must be a JSON object {\"profile\": {...}}".into(),
            })
        }
    };
    Ok(obj)
}

/// A replacement of `current` by `body`: parsed and validated; one that does
/// not say keeps the redirect URI the IdP knows.
fn replacement(
    current: &Provider,
    body: Value,
) -> Result<(ProviderProfile, Map<String, Value>), RegistryError> {
    let obj = unwrap_profile(body)?;
    let mut profile = parse_profile(Value::Object(obj.clone()))?;
    profile.validate()?;
    if profile.redirect.is_none() {
        profile.redirect = current.profile.redirect;
    }
    Ok((profile, obj))
}

/// The fields whose values differ between `current` and `after`, sorted,
/// then the client secret if `secret` changes it.
fn changes(current: &Provider, after: &Value, secret: &SecretUpdate) -> Vec<FieldChange> {
    let before = current.profile.public_json();
    let empty = Map::new();
    let b = before.as_object().unwrap_or(&empty);
    let a = after.as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = b
        .keys()
        .chain(a.keys())
        .filter(|k| b.get(*k) != a.get(*k))
        .collect();
    keys.sort();
    keys.dedup();
    let mut out: Vec<FieldChange> = keys
        .into_iter()
        .map(|k| FieldChange {
            field: k.clone(),
            before: b.get(k).cloned().unwrap_or(Value::Null),
            after: a.get(k).cloned().unwrap_or(Value::Null),
        })
        .collect();
    let was = current.client_secret_set();
    let secret_after = match secret {
        SecretUpdate::Keep => None,
        SecretUpdate::Set(_) => Some(json!(if was { "(changed)" } else { "(set)" })),
        SecretUpdate::Clear if was => Some(json!("(removed)")),
        SecretUpdate::Clear => None,
    };
    if let Some(after) = secret_after {
        out.push(FieldChange {
            field: SECRET_COLUMN.into(),
            before: secret_shown(was),
            after,
        });
    }
    out
}

/// RFC 7396 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = Value::Object(Map::new());
        }
        if let Value::Object(t) = target {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
    } else {
        *target = patch.clone();
    }
}

impl Registry {
    /// A registry over `store`, sealing secrets with `keys`.
    pub fn new(store: Store, keys: Arc<KeyRing>) -> Self {
        Self { store, keys }
    }

    /// Registers a provider; returns its id.
    pub async fn create(&self, body: Value, actor: &Actor) -> Result<String, RegistryError> {
        let obj = unwrap_profile(body)?;
        let mut profile = parse_profile(Value::Object(obj))?;
        profile.validate()?;
        let id = uuid::Uuid::new_v4().to_string();
        let client_secret = profile
            .client_secret
            .as_ref()
            .map(|s| self.keys.encrypt_str(secret_aad(&id), s));
        let public = profile.public_json();
        let audit = actor.event(
            "provider.created",
            &id,
            json!({"name": profile.name, "auth_type": profile.auth_type.as_str(), "client_secret_set": client_secret.is_some()}),
        );
        self.store
            .insert_provider(
                &NewProvider {
                    id: id.clone(),
                    name: profile.name.clone(),
                    auth_type: profile.auth_type.as_str().to_string(),
                    profile: public.to_string(),
                    client_secret,
                },
                &audit,
            )
            .await?;
        Ok(id)
    }

    /// A live provider by id.
    pub async fn get(&self, id: &str) -> Result<Provider, RegistryError> {
        let row = self
            .store
            .get_provider(id)
            .await?
            .ok_or(RegistryError::NotFound)?;
        Provider::from_row(row)
    }

    /// All live providers.
    pub async fn list(&self) -> Result<Vec<Provider>, RegistryError> {
        self.store
            .list_providers()
            .await?
            .into_iter()
            .map(Provider::from_row)
            .collect()
    }

    /// A live provider by exact name or normalized alias.
    pub async fn find(&self, name_or_alias: &str) -> Result<Provider, RegistryError> {
        let alias = normalize_alias(name_or_alias);
        let row = self
            .store
            .find_provider(name_or_alias, alias.as_deref())
            .await?
            .ok_or(RegistryError::NotFound)?;
        Provider::from_row(row)
    }

    /// The decrypted client secret of a provider, for the token exchange.
    pub fn client_secret(&self, p: &Provider) -> Result<Option<Secret<String>>, RegistryError> {
        p.row
            .client_secret
            .as_deref()
            .map(|env| self.keys.decrypt_str(secret_aad(&p.row.id), env))
            .transpose()
            .map_err(|e| RegistryError::Store(StoreError::Vault(e)))
    }

    /// Replaces a provider's profile (PUT). An absent `client_secret` keeps the
    /// stored one; `"client_secret": null` removes it.
    pub async fn replace(&self, id: &str, body: Value, actor: &Actor) -> Result<(), RegistryError> {
        self.replace_if(id, body, actor, None).await
    }

    /// [`Registry::replace`], only while the provider is at version
    /// `expected` (when given): a change someone made since is refused with
    /// [`RegistryError::Changed`], not overwritten.
    pub async fn replace_if(
        &self,
        id: &str,
        body: Value,
        actor: &Actor,
        expected: Option<i64>,
    ) -> Result<(), RegistryError> {
        let current = self.get_at(id, expected).await?;
        let (profile, obj) = replacement(&current, body)?;
        self.write_update(&current, profile, &obj, actor).await
    }

    /// What registering `body` would do, changing nothing: a create when no
    /// live provider has its name (the name must be free, the profile valid),
    /// else the fields a replacement (PUT) would change. Nothing is fetched
    /// from the provider (discovery happens when the provider is used).
    pub async fn plan(&self, body: Value) -> Result<Plan, RegistryError> {
        let obj = unwrap_profile(body)?;
        let mut profile = parse_profile(Value::Object(obj.clone()))?;
        profile.validate()?;
        let current = match self.find(&profile.name).await {
            Ok(p) if p.profile.name == profile.name => p,
            // An alias of another provider: the name is taken.
            Ok(p) => {
                return Err(RegistryError::Conflict(format!(
                    "'{}' is an alias of the provider '{}'",
                    profile.name, p.profile.name
                )))
            }
            Err(RegistryError::NotFound) => {
                let after = profile.public_json();
                let mut changes: Vec<FieldChange> = after
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| FieldChange {
                        field: k.clone(),
                        before: Value::Null,
                        after: v.clone(),
                    })
                    .collect();
                if profile.client_secret.is_some() {
                    changes.push(FieldChange {
                        field: SECRET_COLUMN.into(),
                        before: Value::Null,
                        after: secret_shown(true),
                    });
                }
                return Ok(Plan {
                    action: "create",
                    id: None,
                    version: None,
                    changes,
                });
            }
            Err(e) => return Err(e),
        };
        // As a replacement would: one that does not say keeps the redirect
        // URI the IdP knows (parsed and validated once, above).
        if profile.redirect.is_none() {
            profile.redirect = current.profile.redirect;
        }
        let secret = self.secret_update(&current, &profile, &obj)?;
        let changes = changes(&current, &profile.public_json(), &secret);
        Ok(Plan {
            action: if changes.is_empty() { "none" } else { "update" },
            id: Some(current.row.id.clone()),
            version: Some(current.row.version),
            changes,
        })
    }

    /// A live provider, checked to be at version `expected` when given.
    async fn get_at(&self, id: &str, expected: Option<i64>) -> Result<Provider, RegistryError> {
        let current = self.get(id).await?;
        match expected {
            Some(v) if v != current.row.version => Err(RegistryError::Changed {
                expected: v,
                now: current.row.version,
            }),
            _ => Ok(current),
        }
    }

    /// Applies a JSON merge patch (RFC 7396) to a provider's profile (PATCH).
    pub async fn patch(&self, id: &str, body: Value, actor: &Actor) -> Result<(), RegistryError> {
        self.patch_if(id, body, actor, None).await
    }

    /// [`Registry::patch`], only while the provider is at version `expected`.
    pub async fn patch_if(
        &self,
        id: &str,
        body: Value,
        actor: &Actor,
        expected: Option<i64>,
    ) -> Result<(), RegistryError> {
        let current = self.get_at(id, expected).await?;
        let patch = unwrap_profile(body)?;
        let mut merged = current.profile.public_json();
        merge_patch(&mut merged, &Value::Object(patch.clone()));
        // merge_patch dropped a null client_secret; put a new secret back so the profile carries it.
        if let (Value::Object(m), Some(secret)) = (&mut merged, patch.get("client_secret")) {
            if !secret.is_null() {
                m.insert("client_secret".into(), secret.clone());
            }
        }
        let mut profile = parse_profile(merged)?;
        profile.validate()?;
        self.write_update(&current, profile, &patch, actor).await
    }

    /// What a change does to the stored client secret. Static providers
    /// never hold one; for OAuth an absent field keeps the stored secret, an
    /// explicit null removes it, and a value equal to the stored one keeps it.
    fn secret_update(
        &self,
        current: &Provider,
        profile: &ProviderProfile,
        raw: &Map<String, Value>,
    ) -> Result<SecretUpdate, RegistryError> {
        if profile.auth_type.is_static() {
            return Ok(SecretUpdate::Clear);
        }
        Ok(match (raw.get("client_secret"), &profile.client_secret) {
            (Some(Value::Null), _) => SecretUpdate::Clear,
            (Some(_), Some(s)) => {
                let same = self.client_secret(current)?.is_some_and(|stored| {
                    use subtle::ConstantTimeEq;
                    bool::from(stored.expose().as_bytes().ct_eq(s.expose().as_bytes()))
                });
                if same {
                    SecretUpdate::Keep
                } else {
                    SecretUpdate::Set(self.keys.encrypt_str(secret_aad(&current.row.id), s))
                }
            }
            _ => SecretUpdate::Keep,
        })
    }

    async fn write_update(
        &self,
        current: &Provider,
        profile: ProviderProfile,
        raw: &Map<String, Value>,
        actor: &Actor,
    ) -> Result<(), RegistryError> {
        let id = &current.row.id;
        let client_secret = self.secret_update(current, &profile, raw)?;
        let public = profile.public_json();
        let changed: Vec<String> = changes(current, &public, &client_secret)
            .into_iter()
            .map(|c| c.field)
            .collect();
        let audit = actor.event(
            "provider.updated",
            id,
            json!({"name": profile.name, "changed": changed}),
        );
        self.store
            .update_provider(
                id,
                &ProviderUpdate {
                    name: profile.name.clone(),
                    auth_type: profile.auth_type.as_str().to_string(),
                    profile: public.to_string(),
                    client_secret,
                    expected_version: current.row.version,
                },
                &audit,
            )
            .await?;
        Ok(())
    }

    /// Soft-deletes a provider; its name becomes free and its aliases go.
    pub async fn delete(&self, id: &str, actor: &Actor) -> Result<(), RegistryError> {
        self.delete_if(id, actor, None).await
    }

    /// [`Registry::delete`], only while the provider is at version `expected`.
    pub async fn delete_if(
        &self,
        id: &str,
        actor: &Actor,
        expected: Option<i64>,
    ) -> Result<(), RegistryError> {
        let current = self.get_at(id, expected).await?;
        let audit = actor.event(
            "provider.deleted",
            id,
            json!({"name": current.profile.name}),
        );
        self.store.delete_provider(id, &audit).await?;
        Ok(())
    }

    /// Adds an alias; returns its normalized form.
    pub async fn add_alias(
        &self,
        id: &str,
        alias: &str,
        actor: &Actor,
    ) -> Result<String, RegistryError> {
        let normalized = normalize_alias(alias).ok_or_else(|| ProfileError {
            field: "alias".into(),
            message:
                "must contain letters or digits, no control characters, at most 100 characters"
                    .into(),
        })?;
        let audit = actor.event("provider.alias_added", id, json!({"alias": normalized}));
        self.store
            .add_alias(id, &normalized, alias.trim(), &audit)
            .await?;
        Ok(normalized)
    }

    /// Aliases of a live provider as `(normalized, as given)`.
    pub async fn aliases(&self, id: &str) -> Result<Vec<(String, String)>, RegistryError> {
        self.get(id).await?;
        Ok(self.store.list_aliases(id).await?)
    }

    /// Removes an alias (given in any spelling that normalizes to it).
    pub async fn remove_alias(
        &self,
        id: &str,
        alias: &str,
        actor: &Actor,
    ) -> Result<(), RegistryError> {
        let normalized = normalize_alias(alias).ok_or(RegistryError::NotFound)?;
        let audit = actor.event("provider.alias_removed", id, json!({"alias": normalized}));
        self.store.remove_alias(id, &normalized, &audit).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc7396() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge_patch(&mut t, &json!({"a": null, "b": {"c": 5}, "e": [1]}));
        assert_eq!(t, json!({"b": {"c": 5, "d": 3}, "e": [1]}));
    }
}
