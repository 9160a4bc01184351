//! Inclusion proofs of statement lines: whoever holds a line, its audit
//! path and a signed checkpoint can check, without the journal, that the
//! line is one of the entries the checkpoint covers (RFC 6962 §2.1.1).

use serde::{Deserialize, Serialize};

use crate::book::{Entry, Statement};
use crate::journal::{Checkpoint, Journal, JournalError};
use crate::merkle;

pub const FORMAT: &str = "onecommons-ledger-inclusion/v1";

/// One statement line and the evidence that a checkpoint covers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    pub format: String,
    /// The entry's exact bytes (JSON text): its leaf hash is what is proven.
    pub entry: String,
    /// The entry's position in the journal.
    pub index: u64,
    /// Sibling hashes from the leaf up to the root of the checkpoint's tree (hex).
    pub path: Vec<String>,
    pub checkpoint: Checkpoint,
}

impl InclusionProof {
    /// Checks the proof against the custodian's key (hex, obtained
    /// independently) and returns the statement line it proves.
    pub fn check(&self, public_key: &str) -> Result<Statement, String> {
        if self.format != FORMAT {
            return Err(format!("unknown proof format {:?}", self.format));
        }
        if !self.checkpoint.verify(public_key) {
            return Err(format!(
                "the checkpoint of size {} is not signed by key {public_key}",
                self.checkpoint.tree_size
            ));
        }
        let root =
            merkle::from_hex(&self.checkpoint.root).ok_or("the checkpoint's root is not a hash")?;
        let path: Vec<merkle::Hash> = self
            .path
            .iter()
            .map(|h| merkle::from_hex(h).ok_or_else(|| format!("{h:?} in the path is not a hash")))
            .collect::<Result<_, _>>()?;
        let leaf = merkle::leaf_hash(self.entry.as_bytes());
        if !merkle::verify_inclusion(self.index, self.checkpoint.tree_size, &leaf, &path, &root) {
            return Err(format!(
                "entry {} is not in the tree of size {} with root {}: the line or its proof was altered",
                self.index, self.checkpoint.tree_size, self.checkpoint.root
            ));
        }
        match serde_json::from_str::<Entry>(&self.entry) {
            Ok(Entry::Statement { statement }) => Ok(statement),
            Ok(_) => Err(format!("entry {} is not a statement line", self.index)),
            Err(e) => Err(format!("entry {} is not a journal entry: {e}", self.index)),
        }
    }
}

/// Proofs that `checkpoint` covers each of a recipient's statement lines
/// (those committed before it).
pub fn statement_proofs(
    journal: &mut Journal,
    recipient: &str,
    period: Option<&str>,
    checkpoint: &Checkpoint,
) -> Result<Vec<InclusionProof>, JournalError> {
    let mut out = Vec::new();
    for seq in journal.statement_entries(recipient, period)? {
        if seq >= checkpoint.tree_size {
            continue;
        }
        let Some(bytes) = journal.entry(seq)? else {
            continue;
        };
        let entry = String::from_utf8(bytes).map_err(|e| JournalError::Malformed {
            seq,
            message: e.to_string(),
        })?;
        let path = journal
            .tree()
            .inclusion_proof(seq, checkpoint.tree_size)
            .iter()
            .map(merkle::hex)
            .collect();
        out.push(InclusionProof {
            format: FORMAT.into(),
            entry,
            index: seq,
            path,
            checkpoint: checkpoint.clone(),
        });
    }
    Ok(out)
}
