//! API tokens: scoped, shown once, stored hashed, revocable.
//!
//! A token is `cmns_` followed by 32 random characters. Only its SHA-256 is
//! stored (in `COMMONS_HOME/tokens.json`, mode 0600), so a leaked file does
//! not leak a usable token.

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

/// The token file of a data directory.
pub struct Tokens {
    path: PathBuf,
    /// The file as last read, by hash, with the size and time it had: a
    /// look-up reads the file again only when it changed.
    index: std::sync::Mutex<Option<(FileStamp, std::sync::Arc<TokenIndex>)>>,
}

/// Size, inode (each save renames a new file in) and modification time.
type FileStamp = (u64, u64, std::time::SystemTime);
type TokenIndex = std::collections::HashMap<String, TokenRecord>;

impl Tokens {
    pub fn new(home: &Path) -> Tokens {
        Tokens {
            path: commons_runtime::Layout::new(home).tokens_file(),
            index: Default::default(),
        }
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
        let mut all = self.list().map_err(|e| e.to_string())?;
        all.push(record.clone());
        self.save(&all).map_err(|e| e.to_string())?;
        Ok((token, record))
    }

    pub fn revoke(&self, id: &str) -> Result<bool, String> {
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
        self.index()?
            .get(&hash(token))
            .filter(|r| r.scopes.iter().any(|s| s == scope || s == "admin"))
            .cloned()
    }
}
