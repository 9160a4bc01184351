//! The Merkle search tree of an atproto repository (repo v3).
//!
//! Keys are `collection/rkey`, values are record CIDs. A key's layer is the
//! number of leading zero 2-bit groups of SHA-256(key) (fanout 4). A node
//! holds the keys of one layer in order; the gaps between them hold
//! subtrees of lower layers, and a gap with keys but none at the layer just
//! below is an entry-less node pointing down (`l` only). So the shape — and
//! the root CID — depends only on the set of keys, never on the order of
//! writes.
//!
//! Nodes are stored as DAG-CBOR `{l, e: [{p, k, v, t}]}` with keys
//! prefix-compressed against the previous entry in the node. Updates copy
//! the path from the root to the key (O(depth) new nodes) and leave every
//! other node shared, which is what makes commits, diffs and proofs cheap.
//! No crate implements this layout in step with our `cid`/`ipld-core`
//! versions without pulling in a generated API of its own, so it is here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{cid_of, Cid, DAG_CBOR};

/// Longest key the tree accepts, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// The layer of `key`: leading zero bit pairs of SHA-256(key).
pub fn key_height(key: &[u8]) -> u32 {
    let digest = Sha256::digest(key);
    let mut zeros = 0;
    for byte in digest {
        if byte == 0 {
            zeros += 8;
            continue;
        }
        zeros += byte.leading_zeros();
        break;
    }
    zeros / 2
}

/// Bytes two keys share at the start.
pub fn common_prefix_len(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Checks a tree key: `collection/rkey`, printable ASCII of the allowed set.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.len() > MAX_KEY_LEN {
        return Err(format!("the key is longer than {MAX_KEY_LEN} bytes"));
    }
    let Some((collection, rkey)) = key.split_once('/') else {
        return Err(format!("{key:?} is not collection/rkey"));
    };
    if collection.is_empty() || rkey.is_empty() || rkey.contains('/') {
        return Err(format!("{key:?} is not collection/rkey"));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"._:~-".contains(&b);
    if !collection.bytes().all(allowed) || !rkey.bytes().all(allowed) {
        return Err(format!("{key:?} holds characters outside A-Za-z0-9._:~-"));
    }
    Ok(())
}

/// A tree node as it is encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WireNode {
    l: Option<Cid>,
    e: Vec<WireEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct WireEntry {
    p: u64,
    #[serde(with = "serde_bytes")]
    k: Vec<u8>,
    v: Cid,
    t: Option<Cid>,
}

/// A decoded node: keys in full.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Node {
    pub left: Option<Cid>,
    pub entries: Vec<Entry>,
}

/// One key of a node and the subtree to its right.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub value: Cid,
    pub right: Option<Cid>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.left.is_none() && self.entries.is_empty()
    }

    /// DAG-CBOR bytes with prefix-compressed keys.
    pub fn encode(&self) -> Vec<u8> {
        let mut previous: &[u8] = b"";
        let e = self
            .entries
            .iter()
            .map(|entry| {
                let key = entry.key.as_bytes();
                let p = common_prefix_len(previous, key);
                previous = key;
                WireEntry {
                    p: p as u64,
                    k: key[p..].to_vec(),
                    v: entry.value,
                    t: entry.right,
                }
            })
            .collect();
        crate::model::encode_serde(&WireNode { l: self.left, e })
            .expect("a tree node always encodes")
    }

    /// Decodes and checks a node: keys valid, strictly increasing.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let wire: WireNode =
            serde_ipld_dagcbor::from_slice(bytes).map_err(|e| format!("not a tree node: {e}"))?;
        let mut entries = Vec::with_capacity(wire.e.len());
        let mut previous = String::new();
        for (i, e) in wire.e.into_iter().enumerate() {
            let p = usize::try_from(e.p).unwrap_or(usize::MAX);
            if p > previous.len() || (i == 0 && p != 0) {
                return Err(format!("entry {i} shares {p} bytes with a shorter key"));
            }
            let mut key = previous.as_bytes()[..p].to_vec();
            key.extend_from_slice(&e.k);
            let key = String::from_utf8(key).map_err(|_| format!("entry {i}: key is not UTF-8"))?;
            check_key(&key).map_err(|err| format!("entry {i}: {err}"))?;
            if i > 0 && key <= previous {
                return Err(format!("entry {i}: {key:?} is not after {previous:?}"));
            }
            previous = key.clone();
            entries.push(Entry {
                key,
                value: e.v,
                right: e.t,
            });
        }
        Ok(Self {
            left: wire.l,
            entries,
        })
    }
}

/// Where tree nodes live: content-addressed, decoded once.
#[derive(Debug, Default, Clone)]
pub struct NodeStore {
    nodes: HashMap<Cid, (Arc<Node>, Arc<[u8]>)>,
}

impl NodeStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a node from its bytes (checked against `cid`).
    pub fn insert_bytes(&mut self, cid: Cid, bytes: &[u8]) -> Result<(), String> {
        if cid_of(DAG_CBOR, bytes) != cid {
            return Err(format!("block {cid} does not hash to its CID"));
        }
        let node = Node::decode(bytes).map_err(|e| format!("node {cid}: {e}"))?;
        self.nodes.insert(cid, (Arc::new(node), bytes.into()));
        Ok(())
    }

    /// Stores `node`, returning its CID.
    pub fn put(&mut self, node: Node) -> Cid {
        let bytes = node.encode();
        let cid = cid_of(DAG_CBOR, &bytes);
        self.nodes
            .entry(cid)
            .or_insert_with(|| (Arc::new(node), bytes.into()));
        cid
    }

    pub fn get(&self, cid: &Cid) -> Result<Arc<Node>, TreeError> {
        self.nodes
            .get(cid)
            .map(|(n, _)| n.clone())
            .ok_or(TreeError::Missing(*cid))
    }

    pub fn bytes(&self, cid: &Cid) -> Option<Arc<[u8]>> {
        self.nodes.get(cid).map(|(_, b)| b.clone())
    }

    /// Forgets a node no tree uses any more.
    pub fn remove(&mut self, cid: &Cid) {
        self.nodes.remove(cid);
    }

    pub fn contains(&self, cid: &Cid) -> bool {
        self.nodes.contains_key(cid)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Keeps only the nodes reachable from `roots`.
    pub fn retain_reachable(&mut self, roots: &[Cid]) -> Result<(), TreeError> {
        let mut keep = HashSet::new();
        for root in roots {
            keep.extend(Tree::open(self, *root)?.node_cids(self)?);
        }
        self.nodes.retain(|cid, _| keep.contains(cid));
        Ok(())
    }
}

/// A tree operation that found the store or the tree not as expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TreeError {
    #[error("tree node {0} is missing")]
    Missing(Cid),
    #[error("the tree is malformed: {0}")]
    Malformed(String),
    #[error("bad key: {0}")]
    BadKey(String),
}

/// A tree: its root node and the layer of that node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tree {
    pub root: Cid,
    layer: u32,
}

impl Tree {
    /// The empty tree (one node, no entries), stored in `store`.
    pub fn empty(store: &mut NodeStore) -> Self {
        Self {
            root: store.put(Node::default()),
            layer: 0,
        }
    }

    /// Builds the tree of `entries` (sorted by key, keys unique) in one
    /// pass, bottom-up: the same tree as inserting them one by one.
    pub fn build(store: &mut NodeStore, entries: &[(String, Cid)]) -> Result<Self, TreeError> {
        let mut keyed = Vec::with_capacity(entries.len());
        for (i, (key, value)) in entries.iter().enumerate() {
            check_key(key).map_err(TreeError::BadKey)?;
            if i > 0 && entries[i - 1].0 >= *key {
                return Err(TreeError::BadKey(format!(
                    "{key:?} is out of order or repeated"
                )));
            }
            keyed.push((key.as_str(), *value, key_height(key.as_bytes())));
        }
        let Some(layer) = keyed.iter().map(|e| e.2).max() else {
            return Ok(Self::empty(store));
        };
        let root = build_layer(store, &keyed, layer).expect("non-empty entries make a node");
        Ok(Self { root, layer })
    }

    /// Opens a stored tree, working out its root's layer.
    pub fn open(store: &NodeStore, root: Cid) -> Result<Self, TreeError> {
        let mut depth = 0;
        let mut cid = root;
        loop {
            let node = store.get(&cid)?;
            if let Some(first) = node.entries.first() {
                let layer = key_height(first.key.as_bytes()) + depth;
                return Ok(Self { root, layer });
            }
            match node.left {
                Some(next) => {
                    depth += 1;
                    cid = next;
                }
                None if depth == 0 => return Ok(Self { root, layer: 0 }),
                None => {
                    return Err(TreeError::Malformed(format!(
                        "node {cid} is empty below the root"
                    )))
                }
            }
        }
    }

    /// The value under `key`.
    pub fn get(&self, store: &NodeStore, key: &str) -> Result<Option<Cid>, TreeError> {
        let mut cid = Some(self.root);
        while let Some(current) = cid {
            let node = store.get(&current)?;
            let i = node.entries.partition_point(|e| e.key.as_str() < key);
            if let Some(entry) = node.entries.get(i) {
                if entry.key == key {
                    return Ok(Some(entry.value));
                }
            }
            cid = gap(&node, i);
        }
        Ok(None)
    }

    /// Sets `key` to `value`; returns the new tree and the value replaced.
    pub fn put(
        &self,
        store: &mut NodeStore,
        key: &str,
        value: Cid,
    ) -> Result<(Self, Option<Cid>), TreeError> {
        check_key(key).map_err(TreeError::BadKey)?;
        let height = key_height(key.as_bytes());
        let mut root = Some(self.root);
        let mut layer = self.layer;
        if store.get(&self.root)?.is_empty() {
            layer = height;
        }
        while layer < height {
            root = Some(store.put(Node {
                left: root,
                entries: Vec::new(),
            }));
            layer += 1;
        }
        let mut replaced = None;
        let new_root = insert(store, root, layer, key, height, value, &mut replaced)?;
        Ok((
            Self {
                root: new_root,
                layer,
            },
            replaced,
        ))
    }

    /// Removes `key`; returns the new tree and the value removed.
    pub fn delete(
        &self,
        store: &mut NodeStore,
        key: &str,
    ) -> Result<(Self, Option<Cid>), TreeError> {
        let height = key_height(key.as_bytes());
        if height > self.layer {
            return Ok((*self, None));
        }
        let mut removed = None;
        let root = remove(
            store,
            Some(self.root),
            self.layer,
            key,
            height,
            &mut removed,
        )?;
        if removed.is_none() {
            return Ok((*self, None));
        }
        // An entry-less root that only points down is trimmed away.
        let mut root = root;
        let mut layer = self.layer;
        loop {
            let Some(cid) = root else {
                return Ok((Self::empty(store), removed));
            };
            let node = store.get(&cid)?;
            if node.entries.is_empty() && node.left.is_some() {
                root = node.left;
                layer -= 1;
                continue;
            }
            return Ok((Self { root: cid, layer }, removed));
        }
    }

    /// Every (key, value) in key order.
    pub fn entries(&self, store: &NodeStore) -> Result<Vec<(String, Cid)>, TreeError> {
        let mut out = Vec::new();
        walk_leaves(store, Some(self.root), &mut |k, v| {
            out.push((k.to_owned(), v))
        })?;
        Ok(out)
    }

    /// Up to `limit` entries whose key starts with `prefix` and sorts after `after`.
    pub fn range(
        &self,
        store: &NodeStore,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Cid)>, TreeError> {
        let mut out = Vec::new();
        let start = after.unwrap_or(prefix);
        range_walk(
            store,
            Some(self.root),
            prefix,
            start,
            after.is_some(),
            limit,
            &mut out,
        )?;
        Ok(out)
    }

    /// The CIDs of every node of the tree.
    pub fn node_cids(&self, store: &NodeStore) -> Result<Vec<Cid>, TreeError> {
        let mut out = Vec::new();
        let mut stack = vec![self.root];
        while let Some(cid) = stack.pop() {
            let node = store.get(&cid)?;
            out.push(cid);
            stack.extend(node.left);
            stack.extend(node.entries.iter().filter_map(|e| e.right));
        }
        Ok(out)
    }

    /// The nodes a reader needs to invert an operation on `key` (atproto
    /// firehose proofs): the path from the root to where the key is or
    /// would be, and — for a key present — the seam of the two subtrees on
    /// either side of it, which deleting it would merge.
    pub fn proof(&self, store: &NodeStore, key: &str) -> Result<Vec<Cid>, TreeError> {
        let mut out = Vec::new();
        let mut cid = Some(self.root);
        while let Some(current) = cid {
            out.push(current);
            let node = store.get(&current)?;
            let i = node.entries.partition_point(|e| e.key.as_str() < key);
            if node.entries.get(i).is_some_and(|e| e.key == key) {
                edge_path(store, gap(&node, i), false, &mut out)?;
                edge_path(store, node.entries[i].right, true, &mut out)?;
                break;
            }
            cid = gap(&node, i);
        }
        Ok(out)
    }
}

/// The node at `layer` holding `entries` (all at or below that layer).
fn build_layer(store: &mut NodeStore, entries: &[(&str, Cid, u32)], layer: u32) -> Option<Cid> {
    if entries.is_empty() {
        return None;
    }
    let mut node = Node::default();
    let mut gap_start = 0;
    for (i, (key, value, height)) in entries.iter().enumerate() {
        if *height == layer {
            let gap = (layer > 0)
                .then(|| build_layer(store, &entries[gap_start..i], layer - 1))
                .flatten();
            let at = node.entries.len();
            set_gap(&mut node, at, gap);
            node.entries.push(Entry {
                key: (*key).to_owned(),
                value: *value,
                right: None,
            });
            gap_start = i + 1;
        }
    }
    let gap = (layer > 0)
        .then(|| build_layer(store, &entries[gap_start..], layer - 1))
        .flatten();
    let at = node.entries.len();
    set_gap(&mut node, at, gap);
    Some(store.put(node))
}

/// The nodes along the left (or right) edge of a subtree.
fn edge_path(
    store: &NodeStore,
    mut cid: Option<Cid>,
    leftmost: bool,
    out: &mut Vec<Cid>,
) -> Result<(), TreeError> {
    while let Some(current) = cid {
        out.push(current);
        let node = store.get(&current)?;
        cid = if leftmost {
            node.left
        } else {
            node.entries
                .last()
                .and_then(|e| e.right)
                .or(if node.entries.is_empty() {
                    node.left
                } else {
                    None
                })
        };
    }
    Ok(())
}

/// The subtree at gap `i` of `node`: left of entry `i`.
fn gap(node: &Node, i: usize) -> Option<Cid> {
    if i == 0 {
        node.left
    } else {
        node.entries[i - 1].right
    }
}

fn set_gap(node: &mut Node, i: usize, cid: Option<Cid>) {
    if i == 0 {
        node.left = cid;
    } else {
        node.entries[i - 1].right = cid;
    }
}

fn store_node(store: &mut NodeStore, node: Node) -> Option<Cid> {
    (!node.is_empty()).then(|| store.put(node))
}

fn insert(
    store: &mut NodeStore,
    cid: Option<Cid>,
    layer: u32,
    key: &str,
    height: u32,
    value: Cid,
    replaced: &mut Option<Cid>,
) -> Result<Cid, TreeError> {
    let mut node = match cid {
        Some(cid) => (*store.get(&cid)?).clone(),
        None => Node::default(),
    };
    let i = node.entries.partition_point(|e| e.key.as_str() < key);
    if node.entries.get(i).is_some_and(|e| e.key == key) {
        *replaced = Some(node.entries[i].value);
        node.entries[i].value = value;
        return Ok(store.put(node));
    }
    if height == layer {
        let (left, right) = split(store, gap(&node, i), key)?;
        set_gap(&mut node, i, left);
        node.entries.insert(
            i,
            Entry {
                key: key.to_owned(),
                value,
                right,
            },
        );
    } else {
        debug_assert!(height < layer, "a key is inserted at or below its layer");
        let child = insert(
            store,
            gap(&node, i),
            layer - 1,
            key,
            height,
            value,
            replaced,
        )?;
        set_gap(&mut node, i, Some(child));
    }
    Ok(store.put(node))
}

/// Splits a subtree into the keys before and after `key`.
fn split(
    store: &mut NodeStore,
    cid: Option<Cid>,
    key: &str,
) -> Result<(Option<Cid>, Option<Cid>), TreeError> {
    let Some(cid) = cid else {
        return Ok((None, None));
    };
    let node = store.get(&cid)?;
    let i = node.entries.partition_point(|e| e.key.as_str() < key);
    let (inner_left, inner_right) = split(store, gap(&node, i), key)?;
    let mut left = Node {
        left: node.left,
        entries: node.entries[..i].to_vec(),
    };
    set_gap(&mut left, i, inner_left);
    let right = Node {
        left: inner_right,
        entries: node.entries[i..].to_vec(),
    };
    Ok((store_node(store, left), store_node(store, right)))
}

fn remove(
    store: &mut NodeStore,
    cid: Option<Cid>,
    layer: u32,
    key: &str,
    height: u32,
    removed: &mut Option<Cid>,
) -> Result<Option<Cid>, TreeError> {
    let Some(cid) = cid else {
        return Ok(None);
    };
    let mut node = (*store.get(&cid)?).clone();
    let i = node.entries.partition_point(|e| e.key.as_str() < key);
    if height == layer {
        if node.entries.get(i).is_none_or(|e| e.key != key) {
            return Ok(Some(cid));
        }
        let entry = node.entries.remove(i);
        *removed = Some(entry.value);
        let merged = merge(store, gap(&node, i), entry.right)?;
        set_gap(&mut node, i, merged);
    } else {
        let child = gap(&node, i);
        let new_child = remove(store, child, layer - 1, key, height, removed)?;
        if new_child == child {
            return Ok(Some(cid));
        }
        set_gap(&mut node, i, new_child);
    }
    Ok(store_node(store, node))
}

/// Joins two adjacent subtrees of one layer (all keys of `a` before `b`).
fn merge(store: &mut NodeStore, a: Option<Cid>, b: Option<Cid>) -> Result<Option<Cid>, TreeError> {
    let (a, b) = match (a, b) {
        (None, other) | (other, None) => return Ok(other),
        (Some(a), Some(b)) => (store.get(&a)?, store.get(&b)?),
    };
    let mut node = (*a).clone();
    let seam = node.entries.len();
    let inner = merge(store, gap(&node, seam), b.left)?;
    set_gap(&mut node, seam, inner);
    node.entries.extend(b.entries.iter().cloned());
    Ok(store_node(store, node))
}

fn walk_leaves(
    store: &NodeStore,
    cid: Option<Cid>,
    visit: &mut dyn FnMut(&str, Cid),
) -> Result<(), TreeError> {
    let Some(cid) = cid else { return Ok(()) };
    let node = store.get(&cid)?;
    walk_leaves(store, node.left, visit)?;
    for entry in &node.entries {
        visit(&entry.key, entry.value);
        walk_leaves(store, entry.right, visit)?;
    }
    Ok(())
}

fn range_walk(
    store: &NodeStore,
    cid: Option<Cid>,
    prefix: &str,
    start: &str,
    exclusive: bool,
    limit: usize,
    out: &mut Vec<(String, Cid)>,
) -> Result<bool, TreeError> {
    let Some(cid) = cid else { return Ok(true) };
    let node = store.get(&cid)?;
    // Skip gaps and keys wholly before `start`.
    let first = node.entries.partition_point(|e| e.key.as_str() < start);
    for i in first..=node.entries.len() {
        if out.len() >= limit {
            return Ok(false);
        }
        if !range_walk(store, gap(&node, i), prefix, start, exclusive, limit, out)? {
            return Ok(false);
        }
        let Some(entry) = node.entries.get(i) else {
            break;
        };
        if !entry.key.starts_with(prefix) && entry.key.as_str() > prefix {
            return Ok(false);
        }
        if (exclusive && entry.key == start) || !entry.key.starts_with(prefix) {
            continue;
        }
        if out.len() >= limit {
            return Ok(false);
        }
        out.push((entry.key.clone(), entry.value));
    }
    Ok(true)
}

/// What changed between two trees.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TreeDiff {
    /// Keys whose value changed: (key, old, new); `None` is absent.
    pub record_ops: Vec<(String, Option<Cid>, Option<Cid>)>,
    /// Nodes of the new tree that the old one lacks.
    pub created_nodes: Vec<Cid>,
    /// Nodes of the old tree that the new one lacks.
    pub deleted_nodes: Vec<Cid>,
}

/// Compares two trees held in `store`.
///
/// A node's layer is fixed by its keys, so a subtree the two trees share
/// sits at the same layer in both: walking both layer by layer from the top
/// and cutting at CIDs present on both sides visits only what changed.
pub fn diff(
    store: &NodeStore,
    old: Option<Tree>,
    new: Option<Tree>,
) -> Result<TreeDiff, TreeError> {
    let top = old
        .iter()
        .chain(new.iter())
        .map(|t| t.layer)
        .max()
        .unwrap_or(0);
    let (mut old_level, mut new_level) = (HashSet::new(), HashSet::new());
    let (mut deleted, mut created) = (Vec::new(), Vec::new());
    for layer in (0..=top).rev() {
        old_level.extend(old.filter(|t| t.layer == layer).map(|t| t.root));
        new_level.extend(new.filter(|t| t.layer == layer).map(|t| t.root));
        let mut next_old = HashSet::new();
        let mut next_new = HashSet::new();
        for (level, other, next, out) in [
            (&old_level, &new_level, &mut next_old, &mut deleted),
            (&new_level, &old_level, &mut next_new, &mut created),
        ] {
            for cid in level.difference(other) {
                let node = store.get(cid)?;
                out.push(*cid);
                next.extend(node.left);
                next.extend(node.entries.iter().filter_map(|e| e.right));
            }
        }
        old_level = next_old;
        new_level = next_new;
    }
    let mut before: BTreeMap<String, Cid> = BTreeMap::new();
    let mut after: BTreeMap<String, Cid> = BTreeMap::new();
    for (nodes, side) in [(&deleted, &mut before), (&created, &mut after)] {
        for cid in nodes {
            for e in &store.get(cid)?.entries {
                side.insert(e.key.clone(), e.value);
            }
        }
    }
    let mut keys: Vec<&String> = before.keys().chain(after.keys()).collect();
    keys.sort();
    keys.dedup();
    let record_ops = keys
        .into_iter()
        .filter_map(|k| {
            let (o, n) = (before.get(k).copied(), after.get(k).copied());
            (o != n).then(|| (k.clone(), o, n))
        })
        .collect();
    created.sort();
    deleted.sort();
    Ok(TreeDiff {
        record_ops,
        created_nodes: created,
        deleted_nodes: deleted,
    })
}
