//! The durable journal: the book's entries in a store, one fsync per batch,
//! hashed into a Merkle tree, with checkpoints signed by the custodian.
//!
//! The journal is the only thing stored; balances are what replaying it
//! gives. A batch is one transaction: it is on disk whole or not at all, so
//! no partial batch is ever visible, before or after a crash.

use std::path::Path;

/// The custodian's key, which signs checkpoints ([`load_or_create_key`]).
pub use ed25519_dalek::SigningKey;
use ed25519_dalek::{Signature, Signer, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::book::{Accepted, Account, Book, Entry, PeriodClosed, Refusal, Transfer};
use crate::merkle::{self, Hash, Tree};
use crate::store::{decode_parts, Side, SqliteStore, StatementLine, Store, SubscriberShare};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("ledger journal: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("ledger journal (PostgreSQL): {0}")]
    Postgres(String),
    #[error("ledger journal entry {seq} is malformed: {message}")]
    Malformed { seq: u64, message: String },
    #[error("ledger journal entry {seq} breaks the rules ({refusal}); the journal was altered")]
    Invalid { seq: u64, refusal: Refusal },
    #[error("ledger key {path}: {message}")]
    Key { path: String, message: String },
    #[error("injected failure (test)")]
    Injected,
    /// Another writer appended entry `seq` first: this writer's copy of the
    /// book is behind. Nothing was written.
    #[error("another writer appended ledger journal entry {seq} first")]
    Conflict { seq: u64 },
    #[error("the ledger journal kept changing under this writer; try again")]
    Busy,
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

/// The book, its journal in a [`Store`], and the journal's Merkle tree.
pub struct Journal {
    store: Box<dyn Store>,
    book: Book,
    tree: Tree,
    /// Test hook: fail the next batch after writing this many entries.
    fail_after: Option<usize>,
}

/// Nanoseconds since the Unix epoch: the book's clock (the platform's one).
pub use commons_clock::now_ns;

impl Journal {
    /// Opens the embedded journal (SQLite) at `path`.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        Journal::with_store(Box::new(SqliteStore::open(path)?))
    }

    /// Replays the journal in `store`; any entry the rules refuse means the
    /// store was altered, and opening fails.
    pub fn with_store(mut store: Box<dyn Store>) -> Result<Journal, JournalError> {
        let mut book = Book::new();
        let mut tree = Tree::new();
        for (seq, bytes) in store.load_from(0)?.into_iter().enumerate() {
            let seq = seq as u64;
            let entry: Entry =
                serde_json::from_slice(&bytes).map_err(|e| JournalError::Malformed {
                    seq,
                    message: e.to_string(),
                })?;
            book.replay(&entry)
                .map_err(|refusal| JournalError::Invalid { seq, refusal })?;
            tree.push(merkle::leaf_hash(&bytes));
        }
        book.commit();
        book.check().map_err(|m| JournalError::Malformed {
            seq: tree.len(),
            message: m,
        })?;
        Ok(Journal {
            store,
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
        self.write(&[], |book, entries| book.create_accounts(accounts, entries))
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
        self.create_transfers_with(batch, now, &[])
    }

    /// Like [`Journal::create_transfers_at`], and writes `side` records
    /// (statements, payouts) in the same transaction: both are stored, or
    /// neither. Side records were planned against this writer's copy of
    /// the book, so when another writer got there first this fails with
    /// [`JournalError::Conflict`] (having caught up) for the caller to plan
    /// again, instead of writing them twice.
    pub fn create_transfers_with(
        &mut self,
        batch: &[Transfer],
        now: u64,
        side: &[Side],
    ) -> Result<Vec<Result<Accepted, Refusal>>, JournalError> {
        self.write(side, |book, entries| {
            book.create_transfers(batch, now, entries)
        })
    }

    /// Expires pending transfers whose time is up.
    pub fn expire(&mut self, now: u64) -> Result<usize, JournalError> {
        self.write(&[], |book, entries| book.expire(now, entries))
    }

    /// Applies `change` to the book and stores the entries it made. The
    /// journal may have other writers (the CLI beside a server, servers
    /// sharing PostgreSQL): this one first catches up with what they
    /// appended, and if one appends in between, catches up again and, for
    /// a change without side records, applies it again to the book as it
    /// now is — so a transfer is judged against every balance there is.
    fn write<R>(
        &mut self,
        side: &[Side],
        change: impl Fn(&mut Book, &mut Vec<Entry>) -> R,
    ) -> Result<R, JournalError> {
        const ATTEMPTS: usize = 8;
        self.catch_up()?;
        for _ in 0..ATTEMPTS {
            let mark = self.book.mark();
            let mut entries = Vec::new();
            let results = change(&mut self.book, &mut entries);
            match self.persist(mark, entries, side) {
                Ok(()) => return Ok(results),
                Err(JournalError::Conflict { seq }) => {
                    self.catch_up()?;
                    if !side.is_empty() {
                        return Err(JournalError::Conflict { seq });
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(JournalError::Busy)
    }

    /// Reads and replays what other writers appended since this copy was
    /// last in step; returns how many entries that was.
    pub fn catch_up(&mut self) -> Result<u64, JournalError> {
        let start = self.tree.len();
        let new = self.store.load_from(start)?;
        for (i, bytes) in new.iter().enumerate() {
            let seq = start + i as u64;
            let entry: Entry =
                serde_json::from_slice(bytes).map_err(|e| JournalError::Malformed {
                    seq,
                    message: e.to_string(),
                })?;
            self.book
                .replay(&entry)
                .map_err(|refusal| JournalError::Invalid { seq, refusal })?;
            self.book.commit();
            self.tree.push(merkle::leaf_hash(bytes));
        }
        Ok(new.len() as u64)
    }

    /// Stores `entries` in one transaction; on failure the book is rolled back
    /// to `mark`, so memory never shows what the store does not hold.
    ///
    /// Statement lines among `side` are committed as entries after the
    /// batch's own, each told the sequence number it got.
    fn persist(
        &mut self,
        mark: usize,
        mut entries: Vec<Entry>,
        side: &[Side],
    ) -> Result<(), JournalError> {
        if entries.is_empty() && side.is_empty() {
            self.book.commit();
            return Ok(());
        }
        let mut side = std::borrow::Cow::Borrowed(side);
        if side
            .iter()
            .any(|s| matches!(s, Side::Statement { .. } | Side::Close { .. }))
        {
            let mut lines: Vec<u64> = Vec::new();
            for s in side.to_mut() {
                match s {
                    Side::Statement { statement, seq } => {
                        *seq = self.tree.len() + entries.len() as u64;
                        lines.push(*seq);
                        entries.push(Entry::Statement {
                            statement: statement.clone(),
                        });
                    }
                    // Subscribers' parts name the lines they are part of.
                    Side::Shares { parts, .. } => {
                        for (line, _) in parts.iter_mut() {
                            *line = *lines.get(*line as usize).ok_or_else(|| {
                                JournalError::Malformed {
                                    seq: self.tree.len(),
                                    message: format!(
                                        "a share names statement line {line} of {}",
                                        lines.len()
                                    ),
                                }
                            })?;
                        }
                    }
                    Side::Close { close, seq } => {
                        *seq = self.tree.len() + entries.len() as u64;
                        entries.push(Entry::Close {
                            close: close.clone(),
                        });
                    }
                    Side::Payout { .. } => {}
                }
            }
        }
        let bytes: Vec<Vec<u8>> = entries.iter().map(Entry::bytes).collect();
        let fail_after = self.fail_after.take();
        if let Err(e) = self
            .store
            .append(self.tree.len(), &bytes, &side, fail_after)
        {
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
        self.store.put_checkpoint(&cp)?;
        Ok(cp)
    }

    pub fn checkpoints(&mut self) -> Result<Vec<Checkpoint>, JournalError> {
        self.store.checkpoints()
    }

    /// Every entry's exact bytes, in order (for export).
    pub fn entries(&mut self) -> Result<Vec<Vec<u8>>, JournalError> {
        self.store.load_from(0)
    }

    /// The statement lines of a recipient (account name).
    pub fn statement(
        &mut self,
        recipient: &str,
        period: Option<&str>,
    ) -> Result<Vec<StatementLine>, JournalError> {
        self.store.statement(recipient, period)
    }

    /// The journal entries that commit a recipient's statement lines.
    pub fn statement_entries(
        &mut self,
        recipient: &str,
        period: Option<&str>,
    ) -> Result<Vec<u64>, JournalError> {
        self.store.statement_entries(recipient, period)
    }

    /// One entry's exact bytes, as hashed into the tree.
    pub fn entry(&mut self, seq: u64) -> Result<Option<Vec<u8>>, JournalError> {
        self.store.entry(seq)
    }

    /// A subscriber's private shares: where their tokens went, each their
    /// part of a statement line in the journal.
    pub fn shares(
        &mut self,
        subscriber: &str,
        period: Option<&str>,
    ) -> Result<Vec<SubscriberShare>, JournalError> {
        let mut out = Vec::new();
        for (period, bytes) in self.store.shares(subscriber, period)? {
            let malformed = |seq, message: String| JournalError::Malformed { seq, message };
            let parts = decode_parts(&bytes).ok_or_else(|| {
                malformed(
                    0,
                    format!("{subscriber}'s shares of {period} are unreadable"),
                )
            })?;
            for (seq, amount) in parts {
                let entry = self
                    .store
                    .entry(seq)?
                    .ok_or_else(|| malformed(seq, "a share's statement line is missing".into()))?;
                let Ok(Entry::Statement { statement }) = serde_json::from_slice(&entry) else {
                    return Err(malformed(
                        seq,
                        "a share names an entry that is no statement line".into(),
                    ));
                };
                out.push(SubscriberShare {
                    period: period.clone(),
                    subscriber: subscriber.to_string(),
                    recipient: statement.recipient,
                    site: statement.site,
                    via: statement.via,
                    amount,
                });
            }
        }
        Ok(out)
    }

    /// Every close, oldest first: the policy each applied and where
    /// CommonCents stood after it.
    pub fn closes(&mut self) -> Result<Vec<PeriodClosed>, JournalError> {
        let mut out = Vec::new();
        for seq in self.store.close_entries()? {
            let bytes = self.store.entry(seq)?.unwrap_or_default();
            match serde_json::from_slice(&bytes) {
                Ok(Entry::Close { close }) => out.push(close),
                _ => {
                    return Err(JournalError::Malformed {
                        seq,
                        message: "a period's close names an entry that is no close".into(),
                    })
                }
            }
        }
        Ok(out)
    }

    /// Every period's statements summed per recipient: (period, account, amount).
    pub fn totals(&mut self) -> Result<Vec<(String, String, u64)>, JournalError> {
        self.store.totals()
    }

    /// Erases a subscriber's private shares; returns how many rows went.
    pub fn forget(&mut self, subscriber: &str) -> Result<u64, JournalError> {
        self.store.forget(subscriber)
    }

    /// Per recipient of a period: (account, owed, paid so far).
    pub(crate) fn owed(&mut self, period: &str) -> Result<Vec<(String, u64, u64)>, JournalError> {
        self.store.owed(period)
    }
}
