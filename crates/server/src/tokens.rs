//! API tokens: scoped, shown once, stored hashed, revocable.
//!
//! A token is `cmns_` followed by 32 random characters. Only its SHA-256 is
//! stored (in `COMMONS_HOME/tokens.json`, mode 0600, or, when instances
//! share a database, in its shared entries, one per token, so that any
//! instance knows every token), so a leaked file or table does not leak a
//! usable token.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a token may do.
/// `session` signs its owner (the token's name) in at the gateway.
pub const SCOPES: &[&str] = &[
    "usage:write",
    "usage:read",
    "billing:read",
    "runtime:wake",
    "deployments:read",
    "periods:close",
    "billing:write",
    "session",
    // Everything: the platform's administrator (made once, at first start).
    "admin",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    /// Hex SHA-256 of the token.
    pub hash: String,
    pub created_ms: i64,
}

pub(crate) fn hash(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn random(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::new();
    let mut buf = [0u8; 64];
    while out.len() < n {
        getrandom::getrandom(&mut buf).expect("the OS random number generator works");
        for &b in &buf {
            // 252 = 36 * 7: no modulo bias.
            if b < 252 && out.len() < n {
                out.push(ALPHABET[(b % 36) as usize] as char);
            }
        }
    }
    out
}

/// How platform tokens start.
pub const TOKEN_PREFIX: &str = "cmns_";

/// The platform's tokens: the token file of a data directory, or the
/// shared store of the instances sharing a database.
pub struct Tokens {
    path: PathBuf,
    /// The file as last read, by hash, with the size and time it had: a
    /// look-up reads the file again only when it changed.
    index: std::sync::Mutex<Option<(FileStamp, std::sync::Arc<TokenIndex>)>>,
    shared: Option<std::sync::Arc<dyn commons_store::StateStore>>,
}

/// The shared entries' kind: one per token, named by its hash.
const SHARED_KIND: &str = "platform-token";

/// Size, inode (each save renames a new file in) and modification time.
type FileStamp = (u64, u64, std::time::SystemTime);
type TokenIndex = std::collections::HashMap<String, TokenRecord>;

impl Tokens {
    /// The tokens of the data directory `home`.
    pub fn new(home: &Path) -> Tokens {
        Tokens {
            path: commons_runtime::Layout::new(home).tokens_file(),
            index: Default::default(),
            shared: None,
        }
    }

    /// The tokens of the platform whose state is `store`: with a shared
    /// database, in it (those in `home`'s file, made before, are moved
    /// there); with the embedded store, in `home`'s file.
    pub fn open(
        home: &Path,
        config: &commons_store::StoreConfig,
        store: std::sync::Arc<dyn commons_store::StateStore>,
    ) -> Result<Tokens, String> {
        match config {
            commons_store::StoreConfig::Embedded => Ok(Tokens::new(home)),
            commons_store::StoreConfig::Postgres { .. } => Tokens::in_store(home, store),
        }
    }

    /// The tokens in `store`'s shared entries, those of `home`'s file moved
    /// there first.
    fn in_store(
        home: &Path,
        store: std::sync::Arc<dyn commons_store::StateStore>,
    ) -> Result<Tokens, String> {
        let mut tokens = Tokens::new(home);
        let kept = tokens.list().map_err(|e| e.to_string())?;
        for r in &kept {
            store
                .keep_first(SHARED_KIND, &r.hash, &serde_json::to_vec(r).expect("json"))
                .map_err(|e| e.to_string())?;
        }
        if !kept.is_empty() {
            std::fs::remove_file(&tokens.path)
                .map_err(|e| format!("{}: {e}", tokens.path.display()))?;
        }
        tokens.shared = Some(store);
        Ok(tokens)
    }

    /// The tokens by hash, read again only when the file changed.
    fn index(&self) -> Option<std::sync::Arc<TokenIndex>> {
        let stamp = match std::fs::metadata(&self.path) {
            Ok(m) => {
                use std::os::unix::fs::MetadataExt;
                (m.len(), m.ino(), m.modified().ok()?)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (0, 0, std::time::SystemTime::UNIX_EPOCH)
            }
            Err(_) => return None,
        };
        let mut cached = self.index.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, index)) = cached.as_ref() {
            if *at == stamp {
                return Some(index.clone());
            }
        }
        let index: std::sync::Arc<TokenIndex> = std::sync::Arc::new(
            self.list()
                .ok()?
                .into_iter()
                .map(|r| (r.hash.clone(), r))
                .collect(),
        );
        *cached = Some((stamp, index.clone()));
        Some(index)
    }

    pub fn list(&self) -> std::io::Result<Vec<TokenRecord>> {
        if let Some(store) = &self.shared {
            return store
                .shared_since(SHARED_KIND, 0)
                .map_err(std::io::Error::other)?
                .iter()
                .map(|e| serde_json::from_slice(&e.body).map_err(std::io::Error::other))
                .collect();
        }
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn save(&self, records: &[TokenRecord]) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let json = serde_json::to_vec_pretty(records).expect("json");
        commons_runtime::layout::write_durable(&self.path, &json)
    }

    /// Creates a token; returns it (the only time it is seen) and its record.
    pub fn create(
        &self,
        name: &str,
        scopes: &[String],
        now_ms: i64,
    ) -> Result<(String, TokenRecord), String> {
        for s in scopes {
            if !SCOPES.contains(&s.as_str()) {
                return Err(format!(
                    "unknown scope \"{s}\"; scopes are {}",
                    SCOPES.join(", ")
                ));
            }
        }
        if scopes.is_empty() {
            return Err(format!(
                "give the token at least one scope: {}",
                SCOPES.join(", ")
            ));
        }
        let token = format!("{TOKEN_PREFIX}{}", random(32));
        let record = TokenRecord {
            id: random(8),
            name: name.into(),
            scopes: scopes.to_vec(),
            hash: hash(&token),
            created_ms: now_ms,
        };
        if let Some(store) = &self.shared {
            store
                .put_shared(
                    SHARED_KIND,
                    &record.hash,
                    &serde_json::to_vec(&record).expect("json"),
                )
                .map_err(|e| e.to_string())?;
            return Ok((token, record));
        }
        let mut all = self.list().map_err(|e| e.to_string())?;
        all.push(record.clone());
        self.save(&all).map_err(|e| e.to_string())?;
        Ok((token, record))
    }

    pub fn revoke(&self, id: &str) -> Result<bool, String> {
        if let Some(store) = &self.shared {
            let Some(r) = self
                .list()
                .map_err(|e| e.to_string())?
                .into_iter()
                .find(|r| r.id == id)
            else {
                return Ok(false);
            };
            store
                .delete_shared(SHARED_KIND, &r.hash)
                .map_err(|e| e.to_string())?;
            return Ok(true);
        }
        let mut all = self.list().map_err(|e| e.to_string())?;
        let before = all.len();
        all.retain(|r| r.id != id);
        self.save(&all).map_err(|e| e.to_string())?;
        Ok(all.len() < before)
    }

    /// The record of `token` if it exists and has `scope`.
    pub fn authorise(&self, token: &str, scope: &str) -> Option<TokenRecord> {
        if !token.starts_with(TOKEN_PREFIX) {
            return None;
        }
        if let Some(store) = &self.shared {
            let body = store.shared(SHARED_KIND, &hash(token)).ok()??;
            return serde_json::from_slice::<TokenRecord>(&body)
                .ok()
                .filter(|r| r.scopes.iter().any(|s| s == scope || s == "admin"));
        }
        self.index()?
            .get(&hash(token))
            .filter(|r| r.scopes.iter().any(|s| s == scope || s == "admin"))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_sharing_a_store_know_every_token() {
        let dir = std::env::temp_dir().join(format!("commons-tokens-{}", std::process::id()));
        let (home_a, home_b) = (dir.join("a"), dir.join("b"));
        let store: std::sync::Arc<dyn commons_store::StateStore> =
            std::sync::Arc::new(commons_store::SqliteStore::memory().unwrap());
        // A token made before the instance shared its database moves there.
        let (old, _) = Tokens::new(&home_a)
            .create("old", &["usage:write".to_string()], 1)
            .unwrap();
        let a = Tokens::in_store(&home_a, store.clone()).unwrap();
        let b = Tokens::in_store(&home_b, store.clone()).unwrap();
        assert!(
            !home_a.join("tokens.json").exists(),
            "moved out of the file"
        );
        assert_eq!(b.authorise(&old, "usage:write").unwrap().name, "old");
        assert!(
            b.authorise(&old, "billing:write").is_none(),
            "not its scope"
        );

        let (made, record) = b.create("gateway", &["session".to_string()], 2).unwrap();
        assert_eq!(a.authorise(&made, "session").unwrap().id, record.id);
        assert_eq!(a.list().unwrap().len(), 2);
        assert!(a.authorise("cmns_madeup", "session").is_none());
        let stored = store.shared_since(SHARED_KIND, 0).unwrap();
        assert!(
            stored
                .iter()
                .all(|e| !String::from_utf8_lossy(&e.body).contains(&made[5..])),
            "only hashes are kept"
        );
        assert!(a.revoke(&record.id).unwrap());
        assert!(
            b.authorise(&made, "session").is_none(),
            "revoked everywhere"
        );
        assert!(!a.revoke(&record.id).unwrap());
        let _ = std::fs::remove_dir_all(dir);
    }
}
