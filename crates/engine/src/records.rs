//! Deployment records: one git repository per deployment, one commit per
//! deploy, holding the resolved blueprint, the inputs, the plan and the
//! outcome — never a secret value. Anyone can clone the repository to see how
//! the service was deployed, diff two deploys, or stand the same service up
//! elsewhere with `commons clone`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use git2::{DiffFormat, ObjectType, Oid, Repository, RepositoryInitOptions, Signature, Time};
use serde::Serialize;

use crate::EngineError;

fn git_err(what: &str) -> impl FnOnce(git2::Error) -> EngineError + '_ {
    move |e| EngineError::Internal(format!("deployment record ({what}): {}", e.message()))
}

/// One commit of a deployment's record.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RecordEntry {
    /// 1 for the first deploy, counting up.
    pub revision: usize,
    pub commit: String,
    pub time: String,
    pub summary: String,
}

/// Opens the record repository in `dir`, creating a bare one if needed.
fn open_or_init(dir: &Path) -> Result<Repository, EngineError> {
    match Repository::open_bare(dir) {
        Ok(r) => Ok(r),
        Err(_) => {
            let mut opts = RepositoryInitOptions::new();
            opts.bare(true).initial_head("main").mkpath(true);
            Repository::init_opts(dir, &opts).map_err(git_err("init"))
        }
    }
}

/// Writes `files` (path -> content) as the next commit; returns its id.
pub fn commit(
    dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    message: &str,
    time_ms: i64,
) -> Result<String, EngineError> {
    let repo = open_or_init(dir)?;
    let tree_id = write_tree(&repo, files)?;
    let tree = repo.find_tree(tree_id).map_err(git_err("tree"))?;
    let sig = Signature::new(
        "OneCommons",
        "records@onecommons.invalid",
        &Time::new(time_ms / 1000, 0),
    )
    .map_err(git_err("signature"))?;
    let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
    let parents: Vec<&git2::Commit> = parent.iter().collect();
    let id = repo
        .commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
        .map_err(git_err("commit"))?;
    Ok(id.to_string())
}

/// Builds nested trees from flat `a/b/c` paths.
fn write_tree(repo: &Repository, files: &BTreeMap<String, Vec<u8>>) -> Result<Oid, EngineError> {
    let mut root = Dir::default();
    for (path, content) in files {
        let oid = repo.blob(content).map_err(git_err("blob"))?;
        let mut dir = &mut root;
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for part in &parts[..parts.len() - 1] {
            dir = dir.dirs.entry((*part).to_string()).or_default();
        }
        dir.files.insert(parts[parts.len() - 1].to_string(), oid);
    }
    root.write(repo)
}

#[derive(Default)]
struct Dir {
    dirs: BTreeMap<String, Dir>,
    files: BTreeMap<String, Oid>,
}

impl Dir {
    fn write(&self, repo: &Repository) -> Result<Oid, EngineError> {
        let mut b = repo.treebuilder(None).map_err(git_err("tree"))?;
        for (name, d) in &self.dirs {
            b.insert(name, d.write(repo)?, 0o040000)
                .map_err(git_err("tree"))?;
        }
        for (name, oid) in &self.files {
            b.insert(name, *oid, 0o100644).map_err(git_err("tree"))?;
        }
        b.write().map_err(git_err("tree"))
    }
}

/// Every commit of a record, oldest first.
pub fn history(dir: &Path) -> Result<Vec<RecordEntry>, EngineError> {
    let Ok(repo) = Repository::open_bare(dir) else {
        return Ok(Vec::new());
    };
    if repo.head().is_err() {
        return Ok(Vec::new());
    }
    let mut walk = repo.revwalk().map_err(git_err("history"))?;
    walk.push_head().map_err(git_err("history"))?;
    walk.set_sorting(git2::Sort::TOPOLOGICAL | git2::Sort::REVERSE)
        .map_err(git_err("history"))?;
    let mut out = Vec::new();
    for (i, oid) in walk.enumerate() {
        let oid = oid.map_err(git_err("history"))?;
        let c = repo.find_commit(oid).map_err(git_err("history"))?;
        let t = std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(c.time().seconds().max(0) as u64);
        out.push(RecordEntry {
            revision: i + 1,
            commit: oid.to_string(),
            time: humantime::format_rfc3339_seconds(t).to_string(),
            summary: c.summary().unwrap_or("").to_string(),
        });
    }
    Ok(out)
}

/// Finds a revision by number (`3`) or commit-id prefix (`a1b2c3`).
fn find(entries: &[RecordEntry], spec: &str) -> Result<String, EngineError> {
    if let Ok(n) = spec.parse::<usize>() {
        if let Some(e) = entries.iter().find(|e| e.revision == n) {
            return Ok(e.commit.clone());
        }
    }
    let matches: Vec<&RecordEntry> = entries
        .iter()
        .filter(|e| spec.len() >= 4 && e.commit.starts_with(spec))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.commit.clone()),
        [] => Err(EngineError::Input(format!(
            "no revision \"{spec}\" in this record (revisions are 1..={})",
            entries.len()
        ))),
        _ => Err(EngineError::Input(format!(
            "revision \"{spec}\" is ambiguous; give more of the commit id"
        ))),
    }
}

/// A unified diff between two revisions.
pub fn diff(dir: &Path, a: &str, b: &str) -> Result<String, EngineError> {
    let entries = history(dir)?;
    let (a, b) = (find(&entries, a)?, find(&entries, b)?);
    let repo = Repository::open_bare(dir).map_err(git_err("open"))?;
    let tree = |id: &str| -> Result<git2::Tree<'_>, EngineError> {
        let oid = Oid::from_str(id).map_err(git_err("id"))?;
        repo.find_commit(oid)
            .and_then(|c| c.tree())
            .map_err(git_err("tree"))
    };
    let (ta, tb) = (tree(&a)?, tree(&b)?);
    let d = repo
        .diff_tree_to_tree(Some(&ta), Some(&tb), None)
        .map_err(git_err("diff"))?;
    let mut out = String::new();
    d.print(DiffFormat::Patch, |_, _, line| {
        if matches!(line.origin(), '+' | '-' | ' ') {
            out.push(line.origin());
        }
        out.push_str(&String::from_utf8_lossy(line.content()));
        true
    })
    .map_err(git_err("diff"))?;
    Ok(out)
}

/// Writes every file of the newest revision of the record at `source` (a
/// path or git URL git can read without network credentials) into `into`.
pub fn checkout(source: &str, into: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let repo = match Repository::open(source) {
        Ok(r) => r,
        Err(_) => {
            let tmp = into.with_extension("clone-tmp");
            let _ = std::fs::remove_dir_all(&tmp);
            git2::build::RepoBuilder::new()
                .bare(true)
                .clone(source, &tmp)
                .map_err(|e| {
                    EngineError::Input(format!("cannot read record {source}: {}", e.message()))
                })?
        }
    };
    let head = repo.head().and_then(|h| h.peel_to_tree()).map_err(|e| {
        EngineError::Input(format!("record {source} has no deploys: {}", e.message()))
    })?;
    let mut written = Vec::new();
    let mut todo = vec![(head, PathBuf::new())];
    while let Some((tree, prefix)) = todo.pop() {
        for entry in tree.iter() {
            let name = entry.name().unwrap_or("_");
            if name == ".." || name == "." || name.contains('/') {
                return Err(EngineError::Input(format!(
                    "record {source} holds an unsafe path {name:?}"
                )));
            }
            let path = prefix.join(name);
            match entry.kind() {
                Some(ObjectType::Tree) => {
                    let t = entry
                        .to_object(&repo)
                        .and_then(|o| o.peel_to_tree())
                        .map_err(git_err("tree"))?;
                    todo.push((t, path));
                }
                Some(ObjectType::Blob) => {
                    let blob = entry
                        .to_object(&repo)
                        .and_then(|o| o.peel_to_blob())
                        .map_err(git_err("blob"))?;
                    let dest = into.join(&path);
                    if let Some(parent) = dest.parent() {
                        std::fs::create_dir_all(parent)
                            .map_err(EngineError::io(format!("creating {}", parent.display())))?;
                    }
                    std::fs::write(&dest, blob.content())
                        .map_err(EngineError::io(format!("writing {}", dest.display())))?;
                    written.push(path);
                }
                _ => {}
            }
        }
    }
    Ok(written)
}
