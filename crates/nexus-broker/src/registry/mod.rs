//! The provider registry: create, read, change and retire provider profiles,
//! with the client secret sealed in the vault and every change audited in the
//! same transaction.

pub mod agent_keys;
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

fn changed_fields(before: &Value, after: &Value) -> Vec<String> {
    let empty = Map::new();
    let b = before.as_object().unwrap_or(&empty);
    let a = after.as_object().unwrap_or(&empty);
    let mut keys: Vec<String> = b
        .keys()
        .chain(a.keys())
        .filter(|k| b.get(*k) != a.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
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
        let current = self.get(id).await?;
        let obj = unwrap_profile(body)?;
        let mut profile = parse_profile(Value::Object(obj.clone()))?;
        profile.validate()?;
        // A replacement that does not say keeps the redirect URI the IdP knows.
        if profile.redirect.is_none() {
            profile.redirect = current.profile.redirect;
        }
        self.write_update(&current, profile, &obj, actor).await
    }

    /// Applies a JSON merge patch (RFC 7396) to a provider's profile (PATCH).
    pub async fn patch(&self, id: &str, body: Value, actor: &Actor) -> Result<(), RegistryError> {
        let current = self.get(id).await?;
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

    async fn write_update(
        &self,
        current: &Provider,
        profile: ProviderProfile,
        raw: &Map<String, Value>,
        actor: &Actor,
    ) -> Result<(), RegistryError> {
        let id = &current.row.id;
        // Static providers never hold a client secret; for OAuth an absent field
        // keeps the stored secret and an explicit null removes it.
        let client_secret = if profile.auth_type.is_static() {
            SecretUpdate::Clear
        } else {
            match (raw.get("client_secret"), &profile.client_secret) {
                (Some(Value::Null), _) => SecretUpdate::Clear,
                (Some(_), Some(s)) => SecretUpdate::Set(self.keys.encrypt_str(secret_aad(id), s)),
                _ => SecretUpdate::Keep,
            }
        };
        let public = profile.public_json();
        let mut changed = changed_fields(&current.profile.public_json(), &public);
        let secret_changed = match &client_secret {
            SecretUpdate::Keep => false,
            SecretUpdate::Set(_) => true,
            SecretUpdate::Clear => current.client_secret_set(),
        };
        if secret_changed {
            changed.push("client_secret".into());
        }
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
        let current = self.get(id).await?;
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
