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

/// Perfect subtrees of `2^LOW` leaves and more are kept once complete;
/// smaller ones are hashed again from the leaves when needed (at most
/// `2^LOW - 1` hashes), which keeps the cache to an eighth of the leaves.
const LOW: u32 = 4;

/// An append-only tree that keeps every leaf and the roots of its aligned
/// perfect subtrees, so that the root of any prefix, an inclusion proof
/// and a consistency proof each cost O(log² n) hashes, not O(n).
#[derive(Debug, Clone, Default)]
pub struct Tree {
    leaves: Vec<Hash>,
    /// `upper[j][i]`: the root of leaves `[i·2^h, (i+1)·2^h)`, h = LOW + j.
    upper: Vec<Vec<Hash>>,
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
        let n = self.leaves.len();
        let low = 1usize << LOW;
        if !n.is_multiple_of(low) {
            return;
        }
        // A new perfect subtree of 2^LOW leaves, then every one it completes.
        let mut node = root(&self.leaves[n - low..]);
        let mut j = 0;
        loop {
            if self.upper.len() == j {
                self.upper.push(Vec::new());
            }
            self.upper[j].push(node);
            let level = &self.upper[j];
            if !level.len().is_multiple_of(2) {
                break;
            }
            node = node_hash(&level[level.len() - 2], &level[level.len() - 1]);
            j += 1;
        }
    }

    /// Drops leaves after `len` (to undo a batch that was not stored).
    pub fn truncate(&mut self, len: u64) {
        self.leaves.truncate(len as usize);
        for (j, level) in self.upper.iter_mut().enumerate() {
            level.truncate((len >> (LOW as usize + j)) as usize);
        }
    }

    /// MTH of leaves `[lo, hi)`.
    fn range_root(&self, lo: u64, hi: u64) -> Hash {
        let n = hi - lo;
        if n == 0 {
            return empty_root();
        }
        if n.is_power_of_two() && lo.is_multiple_of(n) {
            let h = n.trailing_zeros();
            if h >= LOW {
                return self.upper[(h - LOW) as usize][(lo >> h) as usize];
            }
            return root(&self.leaves[lo as usize..hi as usize]);
        }
        let k = split(n as usize) as u64;
        node_hash(&self.range_root(lo, lo + k), &self.range_root(lo + k, hi))
    }

    pub fn root(&self) -> Hash {
        self.range_root(0, self.len())
    }

    /// The root of the tree of its first `size` leaves.
    pub fn root_at(&self, size: u64) -> Hash {
        assert!(
            size <= self.len(),
            "a tree of {} has no prefix of {size}",
            self.len()
        );
        self.range_root(0, size)
    }

    pub fn leaf(&self, index: u64) -> Option<&Hash> {
        self.leaves.get(index as usize)
    }

    /// PATH(index, D[0:size]).
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Vec<Hash> {
        assert!(
            index < size && size <= self.len(),
            "leaf {index} outside a tree of {size}"
        );
        let mut path = Vec::new();
        self.path(index, 0, size, &mut path);
        path
    }

    fn path(&self, m: u64, lo: u64, hi: u64, out: &mut Vec<Hash>) {
        let n = hi - lo;
        if n == 1 {
            return;
        }
        let k = split(n as usize) as u64;
        if m < k {
            self.path(m, lo, lo + k, out);
            out.push(self.range_root(lo + k, hi));
        } else {
            self.path(m - k, lo + k, hi, out);
            out.push(self.range_root(lo, lo + k));
        }
    }

    /// PROOF(first, D[0:second]).
    pub fn consistency_proof(&self, first: u64, second: u64) -> Vec<Hash> {
        assert!(
            first >= 1 && first <= second && second <= self.len(),
            "bad consistency range {first}..{second}"
        );
        let mut out = Vec::new();
        self.subproof(first, 0, second, true, &mut out);
        out
    }

    fn subproof(&self, m: u64, lo: u64, hi: u64, complete: bool, out: &mut Vec<Hash>) {
        let n = hi - lo;
        if m == n {
            if !complete {
                out.push(self.range_root(lo, hi));
            }
            return;
        }
        let k = split(n as usize) as u64;
        if m <= k {
            self.subproof(m, lo, lo + k, complete, out);
            out.push(self.range_root(lo + k, hi));
        } else {
            self.subproof(m - k, lo + k, hi, false, out);
            out.push(self.range_root(lo, lo + k));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The cached tree answers exactly as the definitions over the leaves,
    /// at every size across several cache levels, and after truncation.
    #[test]
    fn the_tree_agrees_with_the_definitions() {
        let leaves: Vec<Hash> = (0..300u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut tree = Tree::new();
        for (i, l) in leaves.iter().enumerate() {
            tree.push(*l);
            let n = i + 1;
            assert_eq!(tree.root(), root(&leaves[..n]), "root of {n}");
        }
        for size in [
            1usize, 2, 3, 15, 16, 17, 31, 32, 33, 64, 100, 255, 256, 257, 300,
        ] {
            assert_eq!(tree.root_at(size as u64), root(&leaves[..size]));
            for m in [0, size / 3, size / 2, size - 1] {
                assert_eq!(
                    tree.inclusion_proof(m as u64, size as u64),
                    inclusion_proof(m, &leaves[..size]),
                    "path of {m} in {size}"
                );
                if m >= 1 {
                    assert_eq!(
                        tree.consistency_proof(m as u64, size as u64),
                        consistency_proof(m, &leaves[..size]),
                        "consistency {m}..{size}"
                    );
                }
            }
        }
        tree.truncate(100);
        assert_eq!(tree.root(), root(&leaves[..100]));
        for l in &leaves[100..] {
            tree.push(*l);
        }
        assert_eq!(tree.root(), root(&leaves));
    }
}
