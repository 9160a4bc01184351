//! A repository: records in a Merkle search tree under a signed commit.
//!
//! A commit is `{did, version: 3, data, rev, prev: null, sig}`: `data` is
//! the tree's root, `rev` a TID that increases with every commit, `sig` the
//! signing key's low-S signature over the DAG-CBOR of the commit without
//! `sig`. A repository exports as a CAR v1 file whose root is the commit,
//! and any such file — or one whose root is a bare tree node — can be
//! inspected, verified, diffed and imported.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::car::{self, Car, CarError};
use crate::keys::{KeyError, Keypair, PublicKey};
use crate::model::{self, Cid, Ipld};
use crate::mst::{self, NodeStore, Tree, TreeDiff, TreeError};

/// The repository format version this code writes and reads.
pub const VERSION: u64 = 3;

/// Why a repository operation or file was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Car(#[from] CarError),
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error("the commit is malformed: {0}")]
    BadCommit(String),
    #[error("the signature does not verify: {0}")]
    Signature(#[from] KeyError),
    #[error("the root {0} is neither a commit nor a tree node")]
    BadRoot(Cid),
    #[error("the CAR has no root block {0}")]
    MissingRoot(Cid),
    #[error("record {path} ({cid}) is missing from the file")]
    MissingRecord { path: String, cid: Cid },
    #[error("the tree is not in canonical form: rebuilt from its keys it has root {rebuilt}, not {stored}")]
    NotCanonical { stored: String, rebuilt: String },
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("a record must be a DAG-CBOR map: {0}")]
    BadRecord(String),
}

/// A block: its CID and bytes.
pub type Block = (Cid, Arc<[u8]>);

/// A signed commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    pub did: String,
    pub version: u64,
    pub data: Cid,
    pub rev: String,
    pub prev: Option<Cid>,
    pub sig: Vec<u8>,
}

impl Commit {
    fn unsigned_value(&self) -> BTreeMap<String, Ipld> {
        let mut map = BTreeMap::new();
        map.insert("did".into(), Ipld::String(self.did.clone()));
        map.insert("version".into(), Ipld::Integer(self.version.into()));
        map.insert("data".into(), Ipld::Link(self.data));
        map.insert("rev".into(), Ipld::String(self.rev.clone()));
        map.insert("prev".into(), self.prev.map_or(Ipld::Null, Ipld::Link));
        map
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        model::encode(&Ipld::Map(self.unsigned_value()))
    }

    /// Signs a new commit of `data` at `rev`.
    pub fn sign(did: &str, data: Cid, rev: String, key: &Keypair) -> Self {
        let mut commit = Self {
            did: did.to_owned(),
            version: VERSION,
            data,
            rev,
            prev: None,
            sig: Vec::new(),
        };
        commit.sig = key.sign(&commit.signed_bytes()).to_vec();
        commit
    }

    /// The commit's block: its CID and DAG-CBOR bytes.
    pub fn block(&self) -> (Cid, Vec<u8>) {
        let mut map = self.unsigned_value();
        map.insert("sig".into(), Ipld::Bytes(self.sig.clone()));
        model::block(&Ipld::Map(map))
    }

    /// Decodes a commit block, checking its fields (not its signature).
    pub fn decode(bytes: &[u8]) -> Result<Self, RepoError> {
        let bad = |m: &str| RepoError::BadCommit(m.to_owned());
        let Ipld::Map(map) = model::decode(bytes).map_err(RepoError::BadCommit)? else {
            return Err(bad("not a map"));
        };
        let string = |k: &str| match map.get(k) {
            Some(Ipld::String(s)) => Ok(s.clone()),
            _ => Err(RepoError::BadCommit(format!("\"{k}\" must be a string"))),
        };
        let did = string("did")?;
        crate::syntax::did(&did).map_err(|e| RepoError::BadCommit(e.to_string()))?;
        let rev = string("rev")?;
        crate::syntax::tid(&rev).map_err(|e| RepoError::BadCommit(e.to_string()))?;
        let version = match map.get("version") {
            Some(Ipld::Integer(3)) => VERSION,
            Some(Ipld::Integer(v)) => {
                return Err(RepoError::BadCommit(format!(
                    "version {v}; only version 3 repositories are read"
                )))
            }
            _ => return Err(bad("\"version\" must be an integer")),
        };
        let Some(Ipld::Link(data)) = map.get("data") else {
            return Err(bad("\"data\" must link to the tree's root"));
        };
        let prev = match map.get("prev") {
            None | Some(Ipld::Null) => None,
            Some(Ipld::Link(cid)) => Some(*cid),
            _ => return Err(bad("\"prev\" must be null or a link")),
        };
        let Some(Ipld::Bytes(sig)) = map.get("sig") else {
            return Err(bad("\"sig\" must be bytes"));
        };
        Ok(Self {
            did,
            version,
            data: *data,
            rev,
            prev,
            sig: sig.clone(),
        })
    }

    /// Checks the signature with `key`.
    pub fn verify(&self, key: &PublicKey) -> Result<(), RepoError> {
        Ok(key.verify(&self.signed_bytes(), &self.sig)?)
    }
}

/// One change to a repository.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// A new record; refused if the path exists.
    Create { path: String, record: Vec<u8> },
    /// A new version of a record; refused if the path does not exist.
    Update { path: String, record: Vec<u8> },
    /// Removes a record; refused if the path does not exist.
    Delete { path: String },
}

/// What one commit changed, as the change feed carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub action: &'static str,
    pub path: String,
    pub cid: Option<Cid>,
    pub prev: Option<Cid>,
}

/// The result of a commit: the new head, what changed and the blocks a
/// reader needs to check it (the commit, new records, and the tree nodes
/// proving each op).
#[derive(Debug, Clone)]
pub struct Committed {
    pub cid: Cid,
    pub commit: Commit,
    pub ops: Vec<Op>,
    pub blocks: Vec<Block>,
    /// The root of the tree before this commit.
    pub prev_data: Cid,
    /// Every tree node this commit created (to persist).
    pub new_nodes: Vec<Block>,
    /// Tree nodes the new tree no longer uses (to drop).
    pub dropped_nodes: Vec<Cid>,
}

/// A repository held in memory: tree nodes, record blocks and the head.
#[derive(Debug, Clone)]
pub struct Repo {
    pub did: String,
    nodes: NodeStore,
    records: HashMap<Cid, Arc<[u8]>>,
    tree: Tree,
    head: Option<(Cid, Commit)>,
    /// Whether record blocks are kept here (a store-backed repository
    /// keeps them in its database instead).
    keep_records: bool,
}

impl Repo {
    /// A repository whose tree nodes are given and whose records live
    /// elsewhere (the caller stores the blocks each commit returns).
    pub fn detached(did: &str, nodes: NodeStore, tree: Tree, head: Option<(Cid, Commit)>) -> Self {
        Self {
            did: did.to_owned(),
            nodes,
            records: HashMap::new(),
            tree,
            head,
            keep_records: false,
        }
    }

    /// An empty repository of `did`.
    pub fn new(did: &str) -> Self {
        let mut nodes = NodeStore::new();
        let tree = Tree::empty(&mut nodes);
        Self {
            did: did.to_owned(),
            nodes,
            records: HashMap::new(),
            tree,
            head: None,
            keep_records: true,
        }
    }

    pub fn head(&self) -> Option<&(Cid, Commit)> {
        self.head.as_ref()
    }

    pub fn tree(&self) -> Tree {
        self.tree
    }

    pub fn nodes(&self) -> &NodeStore {
        &self.nodes
    }

    /// The record block at `path`.
    pub fn get(&self, path: &str) -> Result<Option<Block>, RepoError> {
        let Some(cid) = self.tree.get(&self.nodes, path)? else {
            return Ok(None);
        };
        let bytes = self
            .records
            .get(&cid)
            .cloned()
            .ok_or(RepoError::MissingRecord {
                path: path.to_owned(),
                cid,
            })?;
        Ok(Some((cid, bytes)))
    }

    /// Paths and CIDs in `collection`, after `cursor` (an rkey), at most `limit`.
    pub fn list(
        &self,
        collection: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Cid)>, RepoError> {
        let prefix = format!("{collection}/");
        let after = cursor.map(|rkey| format!("{prefix}{rkey}"));
        Ok(self
            .tree
            .range(&self.nodes, &prefix, after.as_deref(), limit)?)
    }

    /// Every (path, record CID).
    pub fn entries(&self) -> Result<Vec<(String, Cid)>, RepoError> {
        Ok(self.tree.entries(&self.nodes)?)
    }

    /// Applies `writes` atomically and signs a commit at `rev`. On any
    /// error nothing changes.
    pub fn commit(
        &mut self,
        writes: &[Write],
        key: &Keypair,
        rev: String,
    ) -> Result<Committed, RepoError> {
        let prev_data = self.tree.root;
        let mut tree = self.tree;
        let mut ops = Vec::with_capacity(writes.len());
        let mut new_records: Vec<Block> = Vec::new();
        // Nodes written here are garbage if a later write fails; they are
        // unreachable and dropped on the next compaction.
        for write in writes {
            match write {
                Write::Create { path, record } | Write::Update { path, record } => {
                    let create = matches!(write, Write::Create { .. });
                    let existing = tree.get(&self.nodes, path)?;
                    if create && existing.is_some() {
                        return Err(RepoError::Exists(path.clone()));
                    }
                    if !create && existing.is_none() {
                        return Err(RepoError::NotFound(path.clone()));
                    }
                    if !matches!(model::decode(record), Ok(Ipld::Map(_))) {
                        return Err(RepoError::BadRecord(path.clone()));
                    }
                    let cid = model::cid_of(model::DAG_CBOR, record);
                    let (next, prev) = tree.put(&mut self.nodes, path, cid)?;
                    tree = next;
                    new_records.push((cid, record.as_slice().into()));
                    ops.push(Op {
                        action: if create { "create" } else { "update" },
                        path: path.clone(),
                        cid: Some(cid),
                        prev,
                    });
                }
                Write::Delete { path } => {
                    let (next, prev) = tree.delete(&mut self.nodes, path)?;
                    if prev.is_none() {
                        return Err(RepoError::NotFound(path.clone()));
                    }
                    tree = next;
                    ops.push(Op {
                        action: "delete",
                        path: path.clone(),
                        cid: None,
                        prev,
                    });
                }
            }
        }
        let commit = Commit::sign(&self.did, tree.root, rev, key);
        let (cid, commit_bytes) = commit.block();
        let mut blocks: Vec<Block> = vec![(cid, commit_bytes.into())];
        let mut proof: Vec<Cid> = Vec::new();
        for op in &ops {
            proof.extend(tree.proof(&self.nodes, &op.path)?);
        }
        proof.sort();
        proof.dedup();
        for node in proof {
            if let Some(bytes) = self.nodes.bytes(&node) {
                blocks.push((node, bytes));
            }
        }
        let change = mst::diff(&self.nodes, Some(self.tree), Some(tree))?;
        let new_nodes = change
            .created_nodes
            .iter()
            .filter_map(|c| self.nodes.bytes(c).map(|b| (*c, b)))
            .collect();
        for dropped in &change.deleted_nodes {
            self.nodes.remove(dropped);
        }
        if self.keep_records {
            for (cid, bytes) in &new_records {
                self.records.insert(*cid, bytes.clone());
            }
        }
        blocks.extend(new_records);
        self.tree = tree;
        self.head = Some((cid, commit.clone()));
        Ok(Committed {
            cid,
            commit,
            ops,
            blocks,
            prev_data,
            new_nodes,
            dropped_nodes: change.deleted_nodes,
        })
    }

    /// Drops tree nodes and record blocks no longer reachable from the head.
    pub fn compact(&mut self) -> Result<(), RepoError> {
        self.nodes.retain_reachable(&[self.tree.root])?;
        let live: std::collections::HashSet<Cid> =
            self.entries()?.into_iter().map(|(_, cid)| cid).collect();
        self.records.retain(|cid, _| live.contains(cid));
        Ok(())
    }

    /// The whole repository as a CAR file: the commit first, then the tree
    /// and records in depth-first order.
    pub fn export_car(&self) -> Result<Vec<u8>, RepoError> {
        let Some((head_cid, commit)) = &self.head else {
            return Err(RepoError::BadCommit(
                "the repository has no commit yet".into(),
            ));
        };
        let (_, commit_bytes) = commit.block();
        let mut blocks: Vec<Block> = vec![(*head_cid, commit_bytes.into())];
        let mut stack = vec![self.tree.root];
        while let Some(cid) = stack.pop() {
            let node = self.nodes.get(&cid)?;
            blocks.push((cid, self.nodes.bytes(&cid).ok_or(TreeError::Missing(cid))?));
            // Push in reverse so the walk visits left to right.
            for entry in node.entries.iter().rev() {
                stack.extend(entry.right);
            }
            stack.extend(node.left);
            for entry in &node.entries {
                if let Some(bytes) = self.records.get(&entry.value) {
                    blocks.push((entry.value, bytes.clone()));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        blocks.retain(|(cid, _)| seen.insert(*cid));
        Ok(car::write(
            *head_cid,
            blocks.iter().map(|(c, b)| (*c, &b[..])),
        ))
    }

    /// Loads a repository from a CAR file, checking every block's hash, the
    /// tree's shape and — when `key` is given — the commit's signature.
    pub async fn import_car(bytes: &[u8], key: Option<&PublicKey>) -> Result<Self, RepoError> {
        let car = car::read(bytes).await?;
        let loaded = load(&car)?;
        let Some((head_cid, commit)) = loaded.commit else {
            return Err(RepoError::BadCommit(
                "the CAR's root is a bare tree node; a repository needs a commit".into(),
            ));
        };
        if let Some(key) = key {
            commit.verify(key)?;
        }
        let mut records = HashMap::new();
        for (path, cid) in loaded.tree.entries(&loaded.nodes)? {
            let bytes = car.blocks.get(&cid).ok_or(RepoError::MissingRecord {
                path: path.clone(),
                cid,
            })?;
            records.insert(cid, Arc::from(&bytes[..]));
        }
        Ok(Self {
            did: commit.did.clone(),
            nodes: loaded.nodes,
            records,
            tree: loaded.tree,
            head: Some((head_cid, commit)),
            keep_records: true,
        })
    }
}

/// A CAR's root resolved: the commit (if the root is one) and the tree.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub commit: Option<(Cid, Commit)>,
    pub tree: Tree,
    pub nodes: NodeStore,
}

/// Resolves the root of a CAR into a commit and/or tree, decoding every
/// tree node reachable from it.
pub fn load(car: &Car) -> Result<Loaded, RepoError> {
    let root = *car
        .roots
        .first()
        .ok_or_else(|| CarError::Malformed("the header names no root".into()))?;
    let root_bytes = car.blocks.get(&root).ok_or(RepoError::MissingRoot(root))?;
    let (commit, data) = match Commit::decode(root_bytes) {
        Ok(commit) => {
            let data = commit.data;
            (Some((root, commit)), data)
        }
        Err(commit_err) => {
            if mst::Node::decode(root_bytes).is_err() {
                return Err(match commit_err {
                    RepoError::BadCommit(reason) if looks_like_commit(root_bytes) => {
                        RepoError::BadCommit(reason)
                    }
                    _ => RepoError::BadRoot(root),
                });
            }
            (None, root)
        }
    };
    let mut nodes = NodeStore::new();
    let mut stack = vec![data];
    while let Some(cid) = stack.pop() {
        if nodes.contains(&cid) {
            continue;
        }
        let bytes = car.blocks.get(&cid).ok_or(TreeError::Missing(cid))?;
        nodes
            .insert_bytes(cid, bytes)
            .map_err(TreeError::Malformed)?;
        let node = nodes.get(&cid)?;
        stack.extend(node.left);
        stack.extend(node.entries.iter().filter_map(|e| e.right));
    }
    let tree = Tree::open(&nodes, data)?;
    Ok(Loaded {
        commit,
        tree,
        nodes,
    })
}

fn looks_like_commit(bytes: &[u8]) -> bool {
    matches!(model::decode(bytes), Ok(Ipld::Map(m)) if m.contains_key("did") || m.contains_key("sig"))
}

/// What `verify` found in a good file.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub commit: Option<(Cid, Commit)>,
    pub data: Cid,
    pub records: usize,
    pub nodes: usize,
    /// Whether the signature was checked (a key was known).
    pub signature_checked: bool,
}

/// Checks a CAR file completely: every block's hash, the commit's fields
/// and signature, that every tree node decodes with keys in order, that the
/// tree is canonical (rebuilding it from its keys gives the same root) and
/// that every record it names is in the file.
pub async fn verify(bytes: &[u8], key: Option<&PublicKey>) -> Result<Verified, RepoError> {
    Ok(verify_car(&car::read(bytes).await?, key)?.0)
}

/// [`verify`] of a CAR already read (and its blocks' hashes checked),
/// with the records it holds: (path, CID) in key order.
pub fn verify_car(
    car: &Car,
    key: Option<&PublicKey>,
) -> Result<(Verified, Vec<(String, Cid)>), RepoError> {
    let loaded = load(car)?;
    let mut signature_checked = false;
    if let Some((_, commit)) = &loaded.commit {
        let key = match key {
            Some(key) => Some(*key),
            None if commit.did.starts_with("did:key:") => {
                Some(PublicKey::from_did_key(&commit.did)?)
            }
            None => None,
        };
        if let Some(key) = key {
            commit.verify(&key)?;
            signature_checked = true;
        }
    }
    let entries = loaded.tree.entries(&loaded.nodes)?;
    for (path, cid) in &entries {
        if !car.blocks.contains_key(cid) {
            return Err(RepoError::MissingRecord {
                path: path.clone(),
                cid: *cid,
            });
        }
    }
    let mut rebuilt_nodes = NodeStore::new();
    let mut rebuilt = Tree::empty(&mut rebuilt_nodes);
    for (path, cid) in &entries {
        rebuilt = rebuilt.put(&mut rebuilt_nodes, path, *cid)?.0;
    }
    if rebuilt.root != loaded.tree.root {
        return Err(RepoError::NotCanonical {
            stored: loaded.tree.root.to_string(),
            rebuilt: rebuilt.root.to_string(),
        });
    }
    let verified = Verified {
        data: loaded.tree.root,
        commit: loaded.commit,
        records: entries.len(),
        nodes: loaded.nodes.len(),
        signature_checked,
    };
    Ok((verified, entries))
}

/// The changes from the repository in CAR `a` to the one in CAR `b`.
pub async fn diff_cars(a: &[u8], b: &[u8]) -> Result<TreeDiff, RepoError> {
    let (a, b) = (car::read(a).await?, car::read(b).await?);
    let (a, b) = (load(&a)?, load(&b)?);
    let mut nodes = a.nodes;
    for cid in b.tree.node_cids(&b.nodes)? {
        let bytes = b.nodes.bytes(&cid).ok_or(TreeError::Missing(cid))?;
        nodes
            .insert_bytes(cid, &bytes)
            .map_err(TreeError::Malformed)?;
    }
    Ok(mst::diff(&nodes, Some(a.tree), Some(b.tree))?)
}
