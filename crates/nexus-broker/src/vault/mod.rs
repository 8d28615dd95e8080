//! The vault: AES-256-GCM encryption of every secret at rest.
//!
//! A stored secret is an *envelope*, a printable string
//! `nxv1.<key id>.<nonce>.<ciphertext+tag>` (URL-safe base64, no padding).
//! The key id picks the key from the [`KeyRing`], so keys rotate online: a new
//! key becomes active for writes while older keys still decrypt until
//! `nexus keys rewrap` has moved every row over.
//!
//! Every envelope is bound with AAD to the table, row id and column it was
//! written for ([`Aad`]); a ciphertext copied into another row or column fails
//! to decrypt instead of silently yielding another row's secret.

pub mod rewrap;

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;

use nexus_core::Secret;

/// Prefix and version of the envelope format.
pub const ENVELOPE_VERSION: &str = "nxv1";
/// Key id given to a key supplied alone through `ENCRYPTION_KEY`.
pub const DEFAULT_KEY_ID: &str = "default";

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Errors from building a key ring or opening an envelope.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// A key in the configuration is not usable; the message says which and why.
    #[error("{0}")]
    BadKey(String),
    /// The envelope names a key id that the ring does not hold.
    #[error("no key with id '{0}' in the key ring (was it removed before `nexus keys rewrap` finished?)")]
    UnknownKey(String),
    /// The envelope is not in the `nxv1.` format.
    #[error("stored secret is not a valid vault envelope")]
    Malformed,
    /// Authentication failed: wrong key, tampered bytes or a ciphertext moved to another row.
    #[error("stored secret failed authentication (tampered, or bound to another row)")]
    Decrypt,
}

/// What an envelope is bound to: the table, the row's id and the column.
#[derive(Debug, Clone, Copy)]
pub struct Aad<'a> {
    /// Table name, e.g. `providers`.
    pub table: &'a str,
    /// Primary key of the row.
    pub row_id: &'a str,
    /// Column holding the envelope.
    pub column: &'a str,
}

impl<'a> Aad<'a> {
    /// Binds an envelope to `table`, `row_id` and `column`.
    pub const fn new(table: &'a str, row_id: &'a str, column: &'a str) -> Self {
        Self {
            table,
            row_id,
            column,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        // Length-prefix each part so "a|b" + "c" and "a" + "b|c" cannot collide.
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(b"nexus-vault-v1");
        for part in [self.table, self.row_id, self.column] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
        out
    }
}

struct RingKey {
    id: String,
    cipher: Aes256Gcm,
}

/// The set of encryption keys; the first is active for new encryptions.
pub struct KeyRing {
    keys: Vec<RingKey>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("KeyRing").field("key_ids", &ids).finish()
    }
}

/// Generates a fresh random 32-byte key, base64 encoded (for `ENCRYPTION_KEY`, `STATE_KEY`).
pub fn generate_key_b64() -> Secret<String> {
    let key = Aes256Gcm::generate_key(OsRng);
    Secret::new(STANDARD.encode(key))
}

/// Generates an admin API key: `nxk_` and 32 random bytes, URL-safe base64.
pub fn generate_api_key() -> Secret<String> {
    let key = Aes256Gcm::generate_key(OsRng);
    Secret::new(format!("nxk_{}", URL_SAFE_NO_PAD.encode(key)))
}

/// Decodes a base64 key of exactly 32 bytes, naming `var` in any error.
pub fn decode_key(var: &str, b64: &str) -> Result<Secret<[u8; 32]>, VaultError> {
    let raw = STANDARD.decode(b64.trim()).map_err(|_| {
        VaultError::BadKey(format!(
            "{var} is not valid base64; generate one with `nexus keys generate`"
        ))
    })?;
    let arr: [u8; 32] = raw.as_slice().try_into().map_err(|_| {
        VaultError::BadKey(format!(
            "{var} must decode to exactly 32 bytes (got {}); generate one with `nexus keys generate`",
            raw.len()
        ))
    })?;
    Ok(Secret::new(arr))
}

fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl KeyRing {
    /// Builds a ring from `(key id, 32-byte key)` pairs; the first is active.
    pub fn new(keys: Vec<(String, Secret<[u8; 32]>)>) -> Result<Self, VaultError> {
        if keys.is_empty() {
            return Err(VaultError::BadKey(
                "the key ring is empty: set ENCRYPTION_KEY or ENCRYPTION_KEYS".into(),
            ));
        }
        let mut ring = Vec::with_capacity(keys.len());
        for (id, key) in keys {
            if !valid_key_id(&id) {
                return Err(VaultError::BadKey(format!(
                    "ENCRYPTION_KEYS: key id '{id}' must be 1-32 characters of A-Z a-z 0-9 - _"
                )));
            }
            if ring.iter().any(|k: &RingKey| k.id == id) {
                return Err(VaultError::BadKey(format!(
                    "ENCRYPTION_KEYS: key id '{id}' appears twice"
                )));
            }
            let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key.expose()));
            ring.push(RingKey { id, cipher });
        }
        Ok(Self { keys: ring })
    }

    /// Parses `ENCRYPTION_KEYS` (`id1:base64,id2:base64`, first active).
    pub fn from_keys_var(value: &str) -> Result<Self, VaultError> {
        let mut keys = Vec::new();
        for (i, item) in value.split(',').map(str::trim).enumerate() {
            if item.is_empty() {
                continue;
            }
            let (id, b64) = item.split_once(':').ok_or_else(|| {
                VaultError::BadKey(format!(
                    "ENCRYPTION_KEYS entry {} must look like id:base64key (ids and keys separated by ':', entries by ',')",
                    i + 1
                ))
            })?;
            let key = decode_key(&format!("ENCRYPTION_KEYS (key '{}')", id.trim()), b64)?;
            keys.push((id.trim().to_string(), key));
        }
        Self::new(keys)
    }

    /// Builds a one-key ring from `ENCRYPTION_KEY` (key id [`DEFAULT_KEY_ID`]).
    pub fn from_single_key(b64: &str) -> Result<Self, VaultError> {
        let key = decode_key("ENCRYPTION_KEY", b64)?;
        Self::new(vec![(DEFAULT_KEY_ID.to_string(), key)])
    }

    /// Id of the key used for new encryptions.
    pub fn active_id(&self) -> &str {
        // `new` refuses an empty ring, so index 0 exists.
        &self.keys[0].id
    }

    /// Ids of every key in the ring, active first.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    /// Encrypts `plaintext` under the active key, bound to `aad`.
    pub fn encrypt(&self, aad: Aad<'_>, plaintext: &[u8]) -> String {
        let key = &self.keys[0];
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad_bytes = aad.bytes();
        // AES-GCM encryption only fails for plaintexts beyond ~64 GiB; secrets are tiny.
        let ct = key
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad_bytes,
                },
            )
            .unwrap_or_default();
        format!(
            "{ENVELOPE_VERSION}.{}.{}.{}",
            key.id,
            URL_SAFE_NO_PAD.encode(nonce),
            URL_SAFE_NO_PAD.encode(ct)
        )
    }

    /// Encrypts a UTF-8 secret.
    pub fn encrypt_str(&self, aad: Aad<'_>, plaintext: &Secret<String>) -> String {
        self.encrypt(aad, plaintext.expose().as_bytes())
    }

    /// Decrypts an envelope written for `aad`.
    pub fn decrypt(&self, aad: Aad<'_>, envelope: &str) -> Result<Secret<Vec<u8>>, VaultError> {
        let (key_id, nonce, ct) = split_envelope(envelope)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .ok_or_else(|| VaultError::UnknownKey(key_id.to_string()))?;
        let aad_bytes = aad.bytes();
        key.cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ct,
                    aad: &aad_bytes,
                },
            )
            .map(Secret::new)
            .map_err(|_| VaultError::Decrypt)
    }

    /// Decrypts an envelope holding a UTF-8 secret.
    pub fn decrypt_str(&self, aad: Aad<'_>, envelope: &str) -> Result<Secret<String>, VaultError> {
        let bytes = self.decrypt(aad, envelope)?.into_inner();
        String::from_utf8(bytes)
            .map(Secret::new)
            .map_err(|_| VaultError::Malformed)
    }

    /// Checks that the active key encrypts and decrypts (used by `/ready`).
    pub fn self_test(&self) -> bool {
        let aad = Aad {
            table: "self_test",
            row_id: "0",
            column: "probe",
        };
        let env = self.encrypt(aad, b"probe");
        matches!(self.decrypt(aad, &env), Ok(p) if p.expose() == b"probe")
    }
}

/// Returns the key id an envelope was written with, if it is well formed.
pub fn envelope_key_id(envelope: &str) -> Option<&str> {
    split_envelope(envelope).ok().map(|(id, _, _)| id)
}

fn split_envelope(envelope: &str) -> Result<(&str, Vec<u8>, Vec<u8>), VaultError> {
    let mut parts = envelope.split('.');
    let (Some(ver), Some(key_id), Some(nonce), Some(ct), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(VaultError::Malformed);
    };
    if ver != ENVELOPE_VERSION {
        return Err(VaultError::Malformed);
    }
    let nonce = URL_SAFE_NO_PAD
        .decode(nonce)
        .map_err(|_| VaultError::Malformed)?;
    let ct = URL_SAFE_NO_PAD
        .decode(ct)
        .map_err(|_| VaultError::Malformed)?;
    if nonce.len() != NONCE_LEN || ct.len() < TAG_LEN {
        return Err(VaultError::Malformed);
    }
    Ok((key_id, nonce, ct))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[&str]) -> KeyRing {
        KeyRing::new(
            ids.iter()
                .map(|id| {
                    let k = decode_key("K", generate_key_b64().expose()).unwrap();
                    (id.to_string(), k)
                })
                .collect(),
        )
        .unwrap()
    }

    const AAD: Aad<'static> = Aad {
        table: "providers",
        row_id: "p1",
        column: "client_secret",
    };

    fn reassemble(key_id: &str, nonce: &[u8], ct: &[u8]) -> String {
        format!(
            "nxv1.{key_id}.{}.{}",
            URL_SAFE_NO_PAD.encode(nonce),
            URL_SAFE_NO_PAD.encode(ct)
        )
    }

    #[test]
    fn round_trip_and_fresh_nonce() {
        let r = ring(&["a"]);
        let e1 = r.encrypt(AAD, b"s3cret");
        let e2 = r.encrypt(AAD, b"s3cret");
        assert_ne!(e1, e2, "every encryption uses a fresh nonce");
        assert_eq!(r.decrypt(AAD, &e1).unwrap().expose(), b"s3cret");
        assert_eq!(envelope_key_id(&e1), Some("a"));
    }

    #[test]
    fn flipped_byte_in_nonce_ciphertext_or_tag_fails() {
        let r = ring(&["a"]);
        let env = r.encrypt(AAD, b"s3cret-value");
        let (_, nonce, ct) = split_envelope(&env).unwrap();
        // nonce
        let mut n = nonce.clone();
        n[0] ^= 1;
        assert!(matches!(
            r.decrypt(AAD, &reassemble("a", &n, &ct)),
            Err(VaultError::Decrypt)
        ));
        // ciphertext body
        let mut c = ct.clone();
        c[0] ^= 1;
        assert!(matches!(
            r.decrypt(AAD, &reassemble("a", &nonce, &c)),
            Err(VaultError::Decrypt)
        ));
        // tag (last 16 bytes)
        let mut t = ct.clone();
        let last = t.len() - 1;
        t[last] ^= 0x80;
        assert!(matches!(
            r.decrypt(AAD, &reassemble("a", &nonce, &t)),
            Err(VaultError::Decrypt)
        ));
    }

    #[test]
    fn ciphertext_bound_to_its_row_and_column() {
        let r = ring(&["a"]);
        let env = r.encrypt(AAD, b"s3cret");
        let other_row = Aad {
            row_id: "p2",
            ..AAD
        };
        let other_col = Aad {
            column: "refresh_token",
            ..AAD
        };
        let other_table = Aad {
            table: "connections",
            ..AAD
        };
        for aad in [other_row, other_col, other_table] {
            assert!(matches!(r.decrypt(aad, &env), Err(VaultError::Decrypt)));
        }
    }

    #[test]
    fn old_keys_decrypt_after_rotation_and_unknown_key_is_named() {
        let old = ring(&["old"]);
        let env = old.encrypt(AAD, b"v");
        let old_key = old.keys.into_iter().next().unwrap();
        let new_key = decode_key("K", generate_key_b64().expose()).unwrap();
        let rotated = KeyRing {
            keys: vec![
                RingKey {
                    id: "new".into(),
                    cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(new_key.expose())),
                },
                old_key,
            ],
        };
        assert_eq!(rotated.active_id(), "new");
        assert_eq!(rotated.decrypt(AAD, &env).unwrap().expose(), b"v");
        assert_eq!(envelope_key_id(&rotated.encrypt(AAD, b"v")), Some("new"));
        let only_new = ring(&["new"]);
        assert!(
            matches!(only_new.decrypt(AAD, &env), Err(VaultError::UnknownKey(id)) if id == "old")
        );
    }

    #[test]
    fn bad_keys_are_explained() {
        let short = STANDARD.encode([0u8; 16]);
        let e = KeyRing::from_single_key(&short).unwrap_err().to_string();
        assert!(
            e.contains("ENCRYPTION_KEY") && e.contains("32 bytes"),
            "{e}"
        );
        let e = KeyRing::from_single_key("not base64!!")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ENCRYPTION_KEY") && e.contains("base64"), "{e}");
        let e = KeyRing::from_keys_var("nocolon").unwrap_err().to_string();
        assert!(e.contains("ENCRYPTION_KEYS"), "{e}");
        let k = generate_key_b64();
        let dup = format!("a:{},a:{}", k.expose(), k.expose());
        let e = KeyRing::from_keys_var(&dup).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
        let e = KeyRing::from_keys_var(&format!("bad.id:{}", k.expose()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("key id"), "{e}");
    }

    #[test]
    fn malformed_envelopes_are_rejected() {
        let r = ring(&["a"]);
        for bad in [
            "",
            "nxv1",
            "nxv2.a.AAAA.AAAA",
            "nxv1.a.!!.AAAA",
            "nxv1.a.AAAA.AAAA.x",
        ] {
            assert!(
                matches!(r.decrypt(AAD, bad), Err(VaultError::Malformed)),
                "{bad}"
            );
        }
    }
}
