//! Secret values, kept apart from records and encrypted at rest.
//!
//! Each deployment's secrets are one XChaCha20-Poly1305 sealed JSON map in
//! `secrets/NAME.enc`, under a key made on first use in `secrets/key`
//! (mode 0600) — or, when the platform's state is on a database its
//! instances share, in the state store's shared entries, sealed the same
//! way (the instances share the key), so that a redeploy through any
//! instance keeps the values another made. Change detection uses a keyed BLAKE3 fingerprint, so the state
//! store can tell that a secret changed without holding it.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use commons_blueprint::SecretSpec;
use commons_runtime::layout::private_dir;

use crate::EngineError;

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A random string of `len` characters from [A-Za-z0-9], without modulo bias.
pub fn generate(len: usize) -> String {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::getrandom(&mut buf).expect("the OS random number generator works");
        for &b in &buf {
            // 248 = 62 * 4: bytes past it would favour the first letters.
            if b < 248 && out.len() < len {
                out.push(ALPHABET[(b % 62) as usize] as char);
            }
        }
    }
    out
}

/// A random token for recognising one start of a process.
pub fn token() -> String {
    generate(20)
}

/// The sealed secrets of the platform's deployments.
pub struct SecretBox {
    key: [u8; 32],
    dir: PathBuf,
    /// Where they are kept instead of files, when instances share it.
    shared: Option<std::sync::Arc<dyn commons_store::StateStore>>,
}

/// The shared entries' kind for sites' secrets.
const SHARED_KIND: &str = "site-secrets";

impl SecretBox {
    /// Opens the key at `key_path`, creating it if it does not exist yet.
    pub fn open(key_path: &Path) -> Result<SecretBox, EngineError> {
        let dir = key_path
            .parent()
            .expect("key lives in a directory")
            .to_path_buf();
        private_dir(&dir).map_err(EngineError::io(format!("creating {}", dir.display())))?;
        let key = match std::fs::read(key_path) {
            Ok(bytes) if bytes.len() == 32 => bytes.try_into().expect("32 bytes"),
            Ok(_) => {
                return Err(EngineError::Internal(format!(
                    "secret key {} is damaged (not 32 bytes); restore it from a backup",
                    key_path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key(key_path)?,
            Err(e) => {
                return Err(EngineError::io(format!("reading {}", key_path.display()))(
                    e,
                ))
            }
        };
        Ok(SecretBox {
            key,
            dir,
            shared: None,
        })
    }

    /// Keeps secrets in `store`'s shared entries from now on (those still
    /// in files are read from them until saved again).
    pub fn share_through(&mut self, store: std::sync::Arc<dyn commons_store::StateStore>) {
        self.shared = Some(store);
    }

    fn shared_purpose(deployment: &str) -> String {
        format!("{SHARED_KIND}/{deployment}")
    }
    fn file(&self, deployment: &str) -> PathBuf {
        self.dir.join(format!("{deployment}.enc"))
    }

    /// The stored secrets of a deployment (empty if none).
    pub fn load(&self, deployment: &str) -> Result<BTreeMap<String, String>, EngineError> {
        if let Some(store) = &self.shared {
            if let Some(sealed) = store.shared(SHARED_KIND, deployment)? {
                let plain = self
                    .open_sealed(&Self::shared_purpose(deployment), &sealed)
                    .ok_or_else(|| {
                        EngineError::Internal(format!(
                            "the secrets of {deployment} in the shared store cannot be \
                             decrypted with this instance's key"
                        ))
                    })?;
                return serde_json::from_slice(&plain)
                    .map_err(|e| EngineError::Internal(format!("secrets of {deployment}: {e}")));
            }
        }
        let path = self.file(deployment);
        let sealed = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(EngineError::io(format!("reading {}", path.display()))(e)),
        };
        if sealed.len() < 24 {
            return Err(EngineError::Internal(format!(
                "{} is damaged",
                path.display()
            )));
        }
        let (nonce, body) = sealed.split_at(24);
        let cipher = XChaCha20Poly1305::new(&self.key.into());
        let plain = cipher
            .decrypt(XNonce::from_slice(nonce), body)
            .map_err(|_| {
                EngineError::Internal(format!(
                    "{} cannot be decrypted with this key",
                    path.display()
                ))
            })?;
        serde_json::from_slice(&plain)
            .map_err(|e| EngineError::Internal(format!("{}: {e}", path.display())))
    }

    /// Seals and stores a deployment's secrets (atomically: write, then rename).
    pub fn save(
        &self,
        deployment: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        let path = self.file(deployment);
        let plain = serde_json::to_vec(values).expect("a map of strings serialises");
        if let Some(store) = &self.shared {
            store.put_shared(
                SHARED_KIND,
                deployment,
                &self.seal(&Self::shared_purpose(deployment), &plain),
            )?;
            // The file, if an earlier version kept one, is out of date now.
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        let mut nonce = [0u8; 24];
        getrandom::getrandom(&mut nonce).expect("the OS random number generator works");
        let cipher = XChaCha20Poly1305::new(&self.key.into());
        let body = cipher
            .encrypt(XNonce::from_slice(&nonce), plain.as_slice())
            .map_err(|_| EngineError::Internal("encryption failed".into()))?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&body);
        commons_runtime::layout::write_durable(&path, &sealed)
            .map_err(EngineError::io(format!("writing {}", path.display())))
    }

    pub fn delete(&self, deployment: &str) {
        let _ = std::fs::remove_file(self.file(deployment));
        if let Some(store) = &self.shared {
            if let Err(e) = store.delete_shared(SHARED_KIND, deployment) {
                eprintln!(
                    "{:>12} the shared secrets of {deployment} may be left: {e}",
                    "Warning"
                );
            }
        }
    }

    /// `plain` sealed under a key for `purpose` alone (derived from the
    /// platform's key): nonce, then ciphertext and tag.
    pub fn seal(&self, purpose: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        getrandom::getrandom(&mut nonce).expect("the OS random number generator works");
        let body = self
            .purpose_cipher(purpose)
            .encrypt(XNonce::from_slice(&nonce), plain)
            .expect("sealing in memory does not fail");
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&body);
        sealed
    }

    /// What [`SecretBox::seal`] sealed for `purpose`; `None` when it was
    /// sealed with another key or for another purpose, or was altered.
    pub fn open_sealed(&self, purpose: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 24 {
            return None;
        }
        let (nonce, body) = sealed.split_at(24);
        self.purpose_cipher(purpose)
            .decrypt(XNonce::from_slice(nonce), body)
            .ok()
    }

    fn purpose_cipher(&self, purpose: &str) -> XChaCha20Poly1305 {
        let mut material = self.key.to_vec();
        material.extend_from_slice(purpose.as_bytes());
        let key = blake3::derive_key("onecommons sealed value v1", &material);
        XChaCha20Poly1305::new(&key.into())
    }

    /// A password for `purpose` (e.g. `postgres/site/db`), derived from the
    /// key: the same every time, never stored, 32 hexadecimal characters.
    pub fn derive(&self, purpose: &str) -> String {
        let key = blake3::derive_key("onecommons derived credential v1", &self.key);
        blake3::keyed_hash(&key, purpose.as_bytes()).to_hex()[..32].to_string()
    }

    /// A keyed fingerprint of a secret value: equal values, equal prints; the
    /// print reveals nothing of the value without the key.
    pub fn fingerprint(&self, value: &str) -> String {
        let key = blake3::derive_key("onecommons secret fingerprint v1", &self.key);
        blake3::keyed_hash(&key, value.as_bytes()).to_hex()[..24].to_string()
    }

    /// The values for a blueprint's secrets: stored ones kept, new generated
    /// ones made, `from_env` ones read now. Returns the values and whether the
    /// stored set changed.
    pub fn resolve(
        &self,
        deployment: &str,
        specs: &indexmap::IndexMap<String, SecretSpec>,
        fresh: bool,
    ) -> Result<(BTreeMap<String, String>, bool), EngineError> {
        let stored = if fresh {
            BTreeMap::new()
        } else {
            self.load(deployment)?
        };
        let mut out = BTreeMap::new();
        let mut missing = Vec::new();
        for (name, spec) in specs {
            match spec {
                SecretSpec::Generate(len) => {
                    let v = stored
                        .get(name)
                        .filter(|v| v.chars().count() == *len)
                        .cloned()
                        .unwrap_or_else(|| generate(*len));
                    out.insert(name.clone(), v);
                }
                SecretSpec::FromEnv(var) => match std::env::var(var) {
                    Ok(v) if !v.is_empty() => {
                        out.insert(name.clone(), v);
                    }
                    _ => missing.push(format!("secret \"{name}\" reads ${var}, which is not set")),
                },
            }
        }
        if !missing.is_empty() {
            return Err(EngineError::Input(format!(
                "{} (set the variable{} and run again)",
                missing.join("; "),
                if missing.len() > 1 { "s" } else { "" }
            )));
        }
        let changed = out != stored;
        Ok((out, changed))
    }
}

/// Makes the key at `key_path`, or reads the one another opener made at
/// the same moment: written whole to a file of its own, then linked into
/// place, which fails if a key is already there — so two engines opening a
/// new data directory at once agree on one key and never read half of one.
fn create_key(key_path: &Path) -> Result<[u8; 32], EngineError> {
    static ATTEMPT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut key = [0u8; 32];
    getrandom::getrandom(&mut key).expect("the OS random number generator works");
    let attempt = ATTEMPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let staged = key_path.with_extension(format!("new.{}.{attempt}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staged)?;
        f.write_all(&key)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&staged);
        return Err(EngineError::io(format!("creating {}", staged.display()))(e));
    }
    let linked = std::fs::hard_link(&staged, key_path);
    let _ = std::fs::remove_file(&staged);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = std::fs::read(key_path)
                .map_err(EngineError::io(format!("reading {}", key_path.display())))?;
            bytes.try_into().map_err(|_| {
                EngineError::Internal(format!(
                    "secret key {} is damaged (not 32 bytes); restore it from a backup",
                    key_path.display()
                ))
            })
        }
        Err(e) => Err(EngineError::io(format!("creating {}", key_path.display()))(
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_no_plaintext_on_disk() {
        let dir = std::env::temp_dir().join(format!("commons-secrets-{}", std::process::id()));
        let b = SecretBox::open(&dir.join("key")).unwrap();
        let mut m = BTreeMap::new();
        m.insert("api_key".to_string(), "s3cr3t-value-xyz".to_string());
        b.save("d", &m).unwrap();
        assert_eq!(b.load("d").unwrap(), m);
        let raw = std::fs::read(dir.join("d.enc")).unwrap();
        assert!(!raw.windows(16).any(|w| w == b"s3cr3t-value-xyz"));
        assert_eq!(b.fingerprint("a"), b.fingerprint("a"));
        assert_ne!(b.fingerprint("a"), b.fingerprint("b"));
        let g = generate(32);
        assert_eq!(g.len(), 32);
        assert!(g.chars().all(|c| c.is_ascii_alphanumeric()));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_purpose() {
        let dir = std::env::temp_dir().join(format!("commons-secrets-seal-{}", std::process::id()));
        let b = SecretBox::open(&dir.join("key")).unwrap();
        let other = SecretBox::open(&dir.join("other/key")).unwrap();
        let sealed = b.seal("certificate", b"-----BEGIN PRIVATE KEY-----");
        assert!(!sealed.windows(5).any(|w| w == b"BEGIN"));
        assert_eq!(
            b.open_sealed("certificate", &sealed).as_deref(),
            Some(&b"-----BEGIN PRIVATE KEY-----"[..])
        );
        assert_eq!(b.open_sealed("answer", &sealed), None, "another purpose");
        assert_eq!(
            other.open_sealed("certificate", &sealed),
            None,
            "another key"
        );
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(b.open_sealed("certificate", &altered), None);
        assert_eq!(b.open_sealed("certificate", &sealed[..10]), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn instances_sharing_a_store_keep_one_set_of_a_sites_secrets() {
        let dir =
            std::env::temp_dir().join(format!("commons-secrets-shared-{}", std::process::id()));
        let store: std::sync::Arc<dyn commons_store::StateStore> =
            std::sync::Arc::new(commons_store::SqliteStore::memory().unwrap());
        let mut one = SecretBox::open(&dir.join("one/key")).unwrap();
        std::fs::create_dir_all(dir.join("two")).unwrap();
        std::fs::copy(dir.join("one/key"), dir.join("two/key")).unwrap();
        let mut two = SecretBox::open(&dir.join("two/key")).unwrap();
        // A value kept in a file before the store was shared is still read.
        let mut old = BTreeMap::new();
        old.insert("password".to_string(), "kept-in-a-file".to_string());
        one.save("site", &old).unwrap();
        one.share_through(store.clone());
        two.share_through(store.clone());
        assert_eq!(one.load("site").unwrap(), old);
        assert!(
            two.load("site").unwrap().is_empty(),
            "two never saw the file"
        );

        let mut values = BTreeMap::new();
        values.insert("password".to_string(), "s3cr3t-shared-xyz".to_string());
        one.save("site", &values).unwrap();
        assert!(!dir.join("one/site.enc").exists(), "the old file is gone");
        assert_eq!(
            two.load("site").unwrap(),
            values,
            "the other instance reads it"
        );
        let sealed = store.shared(SHARED_KIND, "site").unwrap().unwrap();
        assert!(!sealed.windows(17).any(|w| w == b"s3cr3t-shared-xyz"));
        // Sealed for its site: moved under another name, it does not open.
        store.put_shared(SHARED_KIND, "other", &sealed).unwrap();
        assert!(two.load("other").is_err());
        two.delete("site");
        assert!(one.load("site").unwrap().is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_engine_with_another_key_than_its_state_was_made_with_is_refused() {
        let home = std::env::temp_dir().join(format!("commons-key-check-{}", std::process::id()));
        let config = commons_store::StoreConfig::Embedded;
        drop(crate::Engine::open(&home, &config).unwrap());
        drop(crate::Engine::open(&home, &config).expect("the same key opens again"));
        let key = home.join("secrets/key");
        let kept = std::fs::read(&key).unwrap();
        std::fs::write(&key, [7u8; 32]).unwrap();
        let refused = crate::Engine::open(&home, &config)
            .err()
            .expect("another key is refused")
            .to_string();
        assert!(
            refused.contains("secrets/key") && refused.contains("copy it"),
            "{refused}"
        );
        std::fs::write(&key, kept).unwrap();
        assert!(crate::Engine::open(&home, &config).is_ok());
        std::fs::remove_dir_all(home).unwrap();
    }

    #[test]
    fn engines_opening_a_new_directory_at_once_agree_on_one_key() {
        let dir = std::env::temp_dir().join(format!("commons-secrets-race-{}", std::process::id()));
        let key = dir.join("key");
        let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
            let opens: Vec<_> = (0..16)
                .map(|_| s.spawn(|| SecretBox::open(&key).unwrap().key))
                .collect();
            opens.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert!(keys.windows(2).all(|w| w[0] == w[1]), "one key for all");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            [std::ffi::OsString::from("key")],
            "no staged file left behind"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
