//! The RFC 6962 / RFC 9162 Merkle tree over journal entries.
//!
//! Leaf hash `SHA-256(0x00 || entry)`, node hash `SHA-256(0x01 || l || r)`,
//! the tree of `n` leaves split at the largest power of two below `n`. The
//! same hashing as Certificate Transparency, so any CT tooling can check a
//! OneCommons journal; the tests hold it to the published test vectors.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// SHA-256 of nothing: the root of the empty tree.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Largest power of two strictly below `n` (n ≥ 2).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// MTH(D[0:n]) over leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// PATH(m, D[0:n]): the audit path of leaf `m`.
pub fn inclusion_proof(index: usize, leaves: &[Hash]) -> Vec<Hash> {
    assert!(
        index < leaves.len(),
        "leaf {index} outside a tree of {}",
        leaves.len()
    );
    let n = leaves.len();
    if n == 1 {
        return Vec::new();
    }
    let k = split(n);
    let (mut path, sibling) = if index < k {
        (inclusion_proof(index, &leaves[..k]), root(&leaves[k..]))
    } else {
        (inclusion_proof(index - k, &leaves[k..]), root(&leaves[..k]))
    };
    path.push(sibling);
    path
}

/// PROOF(m, D[0:n]): proof that the first `m` leaves are a prefix.
pub fn consistency_proof(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    assert!(
        m >= 1 && m <= leaves.len(),
        "bad consistency range {m}..{}",
        leaves.len()
    );
    subproof(m, leaves, true)
}

fn subproof(m: usize, leaves: &[Hash], complete: bool) -> Vec<Hash> {
    let n = leaves.len();
    if m == n {
        return if complete {
            Vec::new()
        } else {
            vec![root(leaves)]
        };
    }
    let k = split(n);
    if m <= k {
        let mut p = subproof(m, &leaves[..k], complete);
        p.push(root(&leaves[k..]));
        p
    } else {
        let mut p = subproof(m - k, &leaves[k..], false);
        p.push(root(&leaves[..k]));
        p
    }
}

/// Verifies an inclusion proof (RFC 9162, 2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && &r == root
}

/// Verifies a consistency proof between two tree heads (RFC 9162, 2.1.4.2).
pub fn verify_consistency(
    first: u64,
    second: u64,
    proof: &[Hash],
    first_root: &Hash,
    second_root: &Hash,
) -> bool {
    if first == 0 || first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if first.is_power_of_two() {
        path.insert(0, *first_root);
    }
    if path.is_empty() {
        return false;
    }
    let (mut fn_, mut sn) = (first - 1, second - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && &fr == first_root && &sr == second_root
}

/// An append-only tree that keeps every leaf (for proofs) and the roots of
/// its perfect subtrees (so the current root costs O(log n), not O(n)).
#[derive(Debug, Clone, Default)]
pub struct Tree {
    leaves: Vec<Hash>,
    /// (height, hash) of perfect subtrees, largest first.
    frontier: Vec<(u32, Hash)>,
}

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    pub fn len(&self) -> u64 {
        self.leaves.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }

    pub fn push(&mut self, leaf: Hash) {
        self.leaves.push(leaf);
        let mut node = (0u32, leaf);
        while let Some(&(h, left)) = self.frontier.last() {
            if h != node.0 {
                break;
            }
            self.frontier.pop();
            node = (h + 1, node_hash(&left, &node.1));
        }
        self.frontier.push(node);
    }

    /// Drops leaves after `len` (to undo a batch that was not stored).
    pub fn truncate(&mut self, len: u64) {
        let keep: Vec<Hash> = self.leaves[..len as usize].to_vec();
        *self = Tree::new();
        for l in keep {
            self.push(l);
        }
    }

    pub fn root(&self) -> Hash {
        let mut it = self.frontier.iter().rev();
        match it.next() {
            None => empty_root(),
            Some(&(_, last)) => it.fold(last, |acc, (_, h)| node_hash(h, &acc)),
        }
    }

    pub fn root_at(&self, size: u64) -> Hash {
        root(&self.leaves[..size as usize])
    }

    pub fn leaf(&self, index: u64) -> Option<&Hash> {
        self.leaves.get(index as usize)
    }

    pub fn inclusion_proof(&self, index: u64, size: u64) -> Vec<Hash> {
        inclusion_proof(index as usize, &self.leaves[..size as usize])
    }

    pub fn consistency_proof(&self, first: u64, second: u64) -> Vec<Hash> {
        consistency_proof(first as usize, &self.leaves[..second as usize])
    }
}

/// Lower-case hex of a hash.
pub fn hex(h: &Hash) -> String {
    crate::hex::encode(h)
}

/// Parses 64 hex digits.
pub fn from_hex(s: &str) -> Option<Hash> {
    crate::hex::decode(s)?.try_into().ok()
}
