//! Exports anyone can check offline: `commons ledger export` writes the
//! journal and its signed checkpoints; `commons ledger verify` replays it.

use serde::{Deserialize, Serialize};

use crate::book::{Book, Entry};
use crate::journal::{Checkpoint, Journal, JournalError};
use crate::merkle::{self, Tree};

pub const FORMAT: &str = "onecommons-ledger-export/v1";

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    entries: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointLine {
    checkpoint: Checkpoint,
}

/// The export: a header line, one line per entry (its exact journal bytes),
/// then one line per checkpoint.
pub fn export(journal: &mut Journal) -> Result<String, JournalError> {
    let entries = journal.entries()?;
    let mut out = serde_json::to_string(&Header {
        format: FORMAT.into(),
        entries: entries.len() as u64,
    })
    .expect("json");
    out.push('\n');
    for e in &entries {
        out.push_str(std::str::from_utf8(e).expect("entries are JSON"));
        out.push('\n');
    }
    for c in journal.checkpoints()? {
        out.push_str(&serde_json::to_string(&CheckpointLine { checkpoint: c }).expect("json"));
        out.push('\n');
    }
    Ok(out)
}

/// What a successful verification established.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub entries: u64,
    pub accounts: usize,
    pub transfers: usize,
    pub root: String,
    /// Checkpoints whose signature and root were checked.
    pub checkpoints: usize,
    /// Size of the largest checkpoint: entries beyond it are not yet signed.
    pub signed_size: u64,
}

/// Verifies an export: every entry replays under the book's rules, the
/// invariants hold, and every checkpoint is signed by `public_key` over the
/// root of the entries it covers. Any edit to an entry changes a root and
/// fails here.
pub fn verify(text: &str, public_key: &str) -> Result<Verified, String> {
    let mut lines = text.lines();
    let header: Header = lines
        .next()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or("not a ledger export (no header line)")?;
    if header.format != FORMAT {
        return Err(format!("unknown export format {:?}", header.format));
    }
    let mut book = Book::new();
    let mut tree = Tree::new();
    let mut checkpoints = Vec::new();
    for (n, line) in lines.enumerate() {
        if (n as u64) < header.entries {
            let entry: Entry = serde_json::from_str(line).map_err(|e| format!("entry {n}: {e}"))?;
            // The leaf is the exact bytes; a re-encoding could hide an edit.
            if entry.bytes() != line.as_bytes() {
                return Err(format!("entry {n} is not in canonical form"));
            }
            book.replay(&entry)
                .map_err(|r| format!("entry {n} breaks the rules: {r}"))?;
            book.commit();
            // A close's figures are what the journal gives at that point.
            if let Entry::Close { close } = &entry {
                let (reserve, outstanding) = crate::cents::reserve_and_outstanding(&book);
                if (close.reserve_cents, close.tokens_outstanding) != (reserve, outstanding) {
                    return Err(format!(
                        "entry {n}: the close of {} says the reserve held {} cents and {} tokens were out; the journal gives {reserve} and {outstanding}",
                        close.period, close.reserve_cents, close.tokens_outstanding
                    ));
                }
            }
            tree.push(merkle::leaf_hash(line.as_bytes()));
        } else {
            let c: CheckpointLine = serde_json::from_str(line)
                .map_err(|e| format!("checkpoint line {}: {e}", n + 1))?;
            checkpoints.push(c.checkpoint);
        }
    }
    if tree.len() != header.entries {
        return Err(format!(
            "export is truncated: {} of {} entries",
            tree.len(),
            header.entries
        ));
    }
    book.check()?;
    let mut signed_size = 0;
    for c in &checkpoints {
        if c.tree_size > tree.len() {
            return Err(format!(
                "checkpoint of size {} is past the journal's end ({})",
                c.tree_size,
                tree.len()
            ));
        }
        if !c.verify(public_key) {
            return Err(format!(
                "checkpoint of size {} is not signed by key {public_key}",
                c.tree_size
            ));
        }
        if merkle::hex(&tree.root_at(c.tree_size)) != c.root {
            return Err(format!(
                "the first {} entries do not hash to the signed root {}: the journal was altered",
                c.tree_size, c.root
            ));
        }
        signed_size = signed_size.max(c.tree_size);
    }
    Ok(Verified {
        entries: tree.len(),
        accounts: book.accounts().count(),
        transfers: book.transfer_count(),
        root: merkle::hex(&tree.root()),
        checkpoints: checkpoints.len(),
        signed_size,
    })
}
