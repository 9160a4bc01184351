//! The durable journal: the book's entries in SQLite, one fsync per batch,
//! hashed into a Merkle tree, with checkpoints signed by the custodian.
//!
//! The journal is the only thing stored; balances are what replaying it
//! gives. A batch is one transaction: it is on disk whole or not at all, so
//! no partial batch is ever visible, before or after a crash.

use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

use crate::book::{Accepted, Account, Book, Entry, Refusal, Transfer};
use crate::merkle::{self, Hash, Tree};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("ledger journal: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("ledger journal entry {seq} is malformed: {message}")]
    Malformed { seq: u64, message: String },
    #[error("ledger journal entry {seq} breaks the rules ({refusal}); the journal was altered")]
    Invalid { seq: u64, refusal: Refusal },
    #[error("ledger key {path}: {message}")]
    Key { path: String, message: String },
    #[error("injected failure (test)")]
    Injected,
}

/// A signed tree head: "the journal's first `tree_size` entries hash to `root`".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub tree_size: u64,
    pub root: String,
    pub timestamp_ms: u64,
    pub public_key: String,
    pub signature: String,
}

use crate::hex::{decode as from_hex, encode as to_hex};

impl Checkpoint {
    fn message(tree_size: u64, root: &Hash, timestamp_ms: u64) -> Vec<u8> {
        let mut m = b"onecommons ledger checkpoint v1\n".to_vec();
        m.extend_from_slice(&tree_size.to_be_bytes());
        m.extend_from_slice(root);
        m.extend_from_slice(&timestamp_ms.to_be_bytes());
        m
    }

    pub fn sign(key: &SigningKey, tree_size: u64, root: &Hash, timestamp_ms: u64) -> Checkpoint {
        let sig = key.sign(&Checkpoint::message(tree_size, root, timestamp_ms));
        Checkpoint {
            tree_size,
            root: merkle::hex(root),
            timestamp_ms,
            public_key: to_hex(key.verifying_key().as_bytes()),
            signature: to_hex(&sig.to_bytes()),
        }
    }

    /// Checks the signature against `public_key` (hex), which the verifier
    /// must know independently (a checkpoint naming its own key proves nothing).
    pub fn verify(&self, public_key: &str) -> bool {
        let (Some(pk), Some(sig), Some(root)) = (
            from_hex(public_key),
            from_hex(&self.signature),
            merkle::from_hex(&self.root),
        ) else {
            return false;
        };
        let (Ok(pk), Ok(sig)) = (
            <[u8; 32]>::try_from(pk.as_slice()),
            <[u8; 64]>::try_from(sig.as_slice()),
        ) else {
            return false;
        };
        let Ok(key) = VerifyingKey::from_bytes(&pk) else {
            return false;
        };
        self.public_key == public_key
            && key
                .verify(
                    &Checkpoint::message(self.tree_size, &root, self.timestamp_ms),
                    &Signature::from_bytes(&sig),
                )
                .is_ok()
    }
}

/// Loads the custodian's signing key from `path`, creating it (mode 0600) if missing.
pub fn load_or_create_key(path: &Path) -> Result<SigningKey, JournalError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |message: String| JournalError::Key {
        path: path.display().to_string(),
        message,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let b: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| err("not a 32-byte key".into()))?;
            Ok(SigningKey::from_bytes(&b))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = [0u8; 32];
            getrandom::getrandom(&mut b).map_err(|e| err(e.to_string()))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| err(e.to_string()))?;
            f.write_all(&b)
                .and_then(|_| f.sync_all())
                .map_err(|e| err(e.to_string()))?;
            Ok(SigningKey::from_bytes(&b))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// The book, its journal on disk, and the journal's Merkle tree.
pub struct Journal {
    conn: Connection,
    book: Book,
    tree: Tree,
    /// Test hook: fail the next batch after writing this many entries.
    fail_after: Option<usize>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    tree_size INTEGER PRIMARY KEY, root TEXT NOT NULL, timestamp_ms INTEGER NOT NULL,
    public_key TEXT NOT NULL, signature TEXT NOT NULL);
";

/// Nanoseconds since the Unix epoch: the book's clock.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Journal {
    /// Opens the journal at `path` and replays it; any entry the rules refuse
    /// means the file was altered, and opening fails.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Durable: the WAL is fsynced at every commit, i.e. once per batch.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "cache_size", -262_144)?; // 256 MiB
        conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
        conn.execute_batch(SCHEMA)?;
        let mut book = Book::new();
        let mut tree = Tree::new();
        {
            let mut stmt = conn.prepare("SELECT seq, entry FROM journal ORDER BY seq")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let seq = row.get::<_, i64>(0)? as u64;
                // Text or blob: an edited row must still be read and judged.
                let bytes: Vec<u8> = row
                    .get_ref(1)?
                    .as_bytes()
                    .map_err(|e| JournalError::Malformed {
                        seq,
                        message: e.to_string(),
                    })?
                    .to_vec();
                let entry: Entry =
                    serde_json::from_slice(&bytes).map_err(|e| JournalError::Malformed {
                        seq,
                        message: e.to_string(),
                    })?;
                book.replay(&entry)
                    .map_err(|refusal| JournalError::Invalid { seq, refusal })?;
                tree.push(merkle::leaf_hash(&bytes));
            }
        }
        book.commit();
        book.check().map_err(|m| JournalError::Malformed {
            seq: tree.len(),
            message: m,
        })?;
        Ok(Journal {
            conn,
            book,
            tree,
            fail_after: None,
        })
    }

    pub fn book(&self) -> &Book {
        &self.book
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Test hook: the next batch fails after writing `n` entries, as if the
    /// process died mid-batch.
    pub fn fail_next_batch_after(&mut self, n: usize) {
        self.fail_after = Some(n);
    }

    pub fn create_accounts(
        &mut self,
        accounts: &[Account],
    ) -> Result<Vec<Result<Accepted, Refusal>>, JournalError> {
        let mark = self.book.mark();
        let mut entries = Vec::new();
        let results = self.book.create_accounts(accounts, &mut entries);
        self.persist(mark, entries, &|_| Ok(()))?;
        Ok(results)
    }

    /// Applies a batch of transfers and makes it durable (one fsync).
    pub fn create_transfers(
        &mut self,
        batch: &[Transfer],
    ) -> Result<Vec<Result<Accepted, Refusal>>, JournalError> {
        self.create_transfers_at(batch, now_ns())
    }

    pub fn create_transfers_at(
        &mut self,
        batch: &[Transfer],
        now: u64,
    ) -> Result<Vec<Result<Accepted, Refusal>>, JournalError> {
        let mark = self.book.mark();
        let mut entries = Vec::new();
        let results = self.book.create_transfers(batch, now, &mut entries);
        self.persist(mark, entries, &|_| Ok(()))?;
        Ok(results)
    }

    /// Like [`Journal::create_transfers`], and `extra` writes records that
    /// belong with the batch (statements) in the same transaction: both are
    /// on disk, or neither.
    pub fn create_transfers_with(
        &mut self,
        batch: &[Transfer],
        extra: &dyn Fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>,
    ) -> Result<Vec<Result<Accepted, Refusal>>, JournalError> {
        let mark = self.book.mark();
        let mut entries = Vec::new();
        let results = self.book.create_transfers(batch, now_ns(), &mut entries);
        self.persist(mark, entries, extra)?;
        Ok(results)
    }

    /// The journal's database, for tables kept beside it.
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Expires pending transfers whose time is up.
    pub fn expire(&mut self, now: u64) -> Result<usize, JournalError> {
        let mark = self.book.mark();
        let mut entries = Vec::new();
        let n = self.book.expire(now, &mut entries);
        self.persist(mark, entries, &|_| Ok(()))?;
        Ok(n)
    }

    /// Writes `entries` in one transaction; on failure the book is rolled back
    /// to `mark`, so memory never shows what the disk does not hold.
    fn persist(
        &mut self,
        mark: usize,
        entries: Vec<Entry>,
        extra: &dyn Fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>,
    ) -> Result<(), JournalError> {
        let start = self.tree.len();
        let bytes: Vec<Vec<u8>> = entries.iter().map(Entry::bytes).collect();
        let fail_after = self.fail_after.take();
        let written = (|| -> Result<(), JournalError> {
            let tx = self.conn.transaction()?;
            {
                let mut insert =
                    tx.prepare_cached("INSERT INTO journal (seq, entry) VALUES (?1, ?2)")?;
                for (i, b) in bytes.iter().enumerate() {
                    if fail_after == Some(i) {
                        // Dropping the transaction without commit: as if we died here.
                        return Err(JournalError::Injected);
                    }
                    insert.execute(params![(start + i as u64) as i64, b])?;
                }
            }
            extra(&tx)?;
            tx.commit()?;
            Ok(())
        })();
        if let Err(e) = written {
            self.book.rollback(mark);
            return Err(e);
        }
        self.book.commit();
        for b in &bytes {
            self.tree.push(merkle::leaf_hash(b));
        }
        Ok(())
    }

    /// Signs and stores a checkpoint of the current tree head.
    pub fn checkpoint(&mut self, key: &SigningKey) -> Result<Checkpoint, JournalError> {
        let now_ms = now_ns() / 1_000_000;
        let cp = Checkpoint::sign(key, self.tree.len(), &self.tree.root(), now_ms);
        self.conn.execute(
            "INSERT OR REPLACE INTO checkpoints (tree_size, root, timestamp_ms, public_key, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![cp.tree_size as i64, cp.root, cp.timestamp_ms as i64, cp.public_key, cp.signature],
        )?;
        Ok(cp)
    }

    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, JournalError> {
        let mut stmt = self.conn.prepare(
            "SELECT tree_size, root, timestamp_ms, public_key, signature FROM checkpoints ORDER BY tree_size",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Checkpoint {
                    tree_size: r.get::<_, i64>(0)? as u64,
                    root: r.get(1)?,
                    timestamp_ms: r.get::<_, i64>(2)? as u64,
                    public_key: r.get(3)?,
                    signature: r.get(4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Every entry's exact bytes, in order (for export).
    pub fn entries(&self) -> Result<Vec<Vec<u8>>, JournalError> {
        let mut stmt = self
            .conn
            .prepare("SELECT entry FROM journal ORDER BY seq")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(r.get_ref(0)?
                    .as_bytes()
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default())
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}
