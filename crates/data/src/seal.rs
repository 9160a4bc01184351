//! Envelope encryption for the encrypted sharing classes.
//!
//! - The **platform key** (32 bytes, `platform.key` in the data directory,
//!   mode 0600) seals every user's keys at rest.
//! - Each user has one **data key** (XChaCha20-Poly1305). It seals their
//!   personal and private records; the repository holds the sealed block,
//!   so the tree and the commit log carry the ciphertext's CID and a
//!   low-entropy value cannot be guessed from a hash. Destroying the data
//!   key makes every copy of those records unreadable (crypto-shredding).
//! - Indexed fields of encrypted records are stored as a keyed hash under
//!   the data key (a blind index): equality queries work, the values do not
//!   appear in the database.

use std::collections::BTreeMap;
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};

use crate::model::Ipld;

/// The `$type` of a sealed record block.
pub const SEALED_TYPE: &str = "app.commons.data.sealed";

/// A 32-byte symmetric key. Never printed.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// Sealing or opening failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("cannot read or create the platform key {path}: {reason}")]
    PlatformKey { path: String, reason: String },
    #[error("the ciphertext does not open with this key (wrong key, or tampered)")]
    Open,
    #[error("not a sealed record")]
    NotSealed,
}

impl Key {
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        OsRng.fill_bytes(&mut key);
        Self(key)
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// Loads the platform key at `path`, creating it (0600) the first time.
    pub fn platform(path: &Path) -> Result<Self, SealError> {
        let fail = |reason: String| SealError::PlatformKey {
            path: path.display().to_string(),
            reason,
        };
        match std::fs::read(path) {
            Ok(bytes) => Self::from_bytes(&bytes)
                .ok_or_else(|| fail("it is not 32 bytes; restore it from a backup".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
                }
                write_private(path, &key.0).map_err(|e| fail(e.to_string()))?;
                Ok(key)
            }
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// `nonce || ciphertext` of `plaintext`, bound to `context`.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Vec<u8> {
        let cipher = XChaCha20Poly1305::new((&self.0).into());
        let mut nonce = [0u8; 24];
        OsRng.fill_bytes(&mut nonce);
        let ciphertext = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            .expect("XChaCha20-Poly1305 encryption does not fail");
        let mut out = nonce.to_vec();
        out.extend(ciphertext);
        out
    }

    /// Opens what [`Key::seal`] made with the same `context`.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < 24 {
            return Err(SealError::Open);
        }
        let (nonce, ciphertext) = sealed.split_at(24);
        XChaCha20Poly1305::new((&self.0).into())
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context,
                },
            )
            .map_err(|_| SealError::Open)
    }

    /// A keyed hash of an indexed value (hex), for blind equality lookups.
    pub fn blind(&self, field: &str, value: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.0);
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field.as_bytes());
        hasher.update(value.as_bytes());
        hasher.update(self.0);
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// A record sealed under a user's data key, as the repository stores it.
pub fn seal_record(key: &Key, path: &str, record: &[u8]) -> Ipld {
    let mut map = BTreeMap::new();
    map.insert("$type".into(), Ipld::String(SEALED_TYPE.into()));
    map.insert(
        "ciphertext".into(),
        Ipld::Bytes(key.seal(record, path.as_bytes())),
    );
    Ipld::Map(map)
}

/// The DAG-CBOR record inside a sealed block.
pub fn open_record(key: &Key, path: &str, block: &Ipld) -> Result<Vec<u8>, SealError> {
    let Ipld::Map(map) = block else {
        return Err(SealError::NotSealed);
    };
    match (map.get("$type"), map.get("ciphertext")) {
        (Some(Ipld::String(t)), Some(Ipld::Bytes(c))) if t == SEALED_TYPE => {
            key.open(c, path.as_bytes())
        }
        _ => Err(SealError::NotSealed),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_records_open_only_with_their_key_and_path() {
        let key = Key::generate();
        let block = seal_record(&key, "a.b.c/1", b"secret");
        assert_eq!(open_record(&key, "a.b.c/1", &block).unwrap(), b"secret");
        assert_eq!(open_record(&key, "a.b.c/2", &block), Err(SealError::Open));
        assert_eq!(
            open_record(&Key::generate(), "a.b.c/1", &block),
            Err(SealError::Open)
        );
        // The same value sealed twice gives different blocks (and CIDs).
        assert_ne!(
            crate::model::encode(&block),
            crate::model::encode(&seal_record(&key, "a.b.c/1", b"secret"))
        );
        assert_ne!(key.blind("f", "v"), Key::generate().blind("f", "v"));
        assert_eq!(format!("{key:?}"), "Key(..)");
    }
}
