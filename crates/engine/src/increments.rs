//! A deployment copied to another machine while it keeps serving:
//! increments of its files, as a move ships them.
//!
//! The copy is a tree laid out as a backup is (`manifest.json`, `record/`,
//! `data/`, `volumes/NAME/`, `postgres/NAME.sql`), built where the site goes
//! by applying increments in order. The first increment carries every file;
//! each later one carries the list of every entry (so what was removed goes
//! there too) and only the 64 KiB blocks whose hash differs from the block
//! shipped before. Files are read while the site runs, so a block may be
//! torn; the last increment is taken once the site has stopped, and every
//! block that differs from the one shipped goes again: the copy is then
//! exact. Blocks are fixed and aligned for SQLite files and the rest (SQLite
//! writes its pages in place); volumes' files go in content-defined chunks
//! instead, as pieces of their new version — chunks the copy holds as
//! copies from where they are, the others as bytes — so a byte inserted
//! mid-file sends the chunks around it, not the file's tail.
//!
//! A file is not read again when its size, inode and times are those seen
//! before it was last read, and it had last changed well before that read
//! (the clock that stamps files is coarse: a change in the same tick as the
//! look leaves the stamp as it was — "racy" in git's words).
//!
//! The receiving side trusts nothing in an increment: paths stay inside the
//! copy (no `..`, no absolute path, never through a link), blocks fall
//! within their file, modes lose set-id bits.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backup::{self, Manifest};
use crate::follow::{self, Following};
use crate::{records, EngineError};

/// The unit of change.
pub const BLOCK: usize = 64 * 1024;

const MAGIC: &[u8; 8] = b"CMNSINC1";

/// A block record whose entry is this ends the increment.
const END: u32 = u32::MAX;

/// How long before a look a file must have last changed for its stamp to
/// be trusted the next time.
const SETTLED_NS: i128 = 2_000_000_000;

/// What the receiving side holds, as the sender knows it.
#[derive(Debug, Default)]
pub struct Shipped {
    files: HashMap<String, Seen>,
    /// PostgreSQL databases followed by their changes, by component.
    databases: HashMap<String, Following>,
}

impl Shipped {
    /// Nothing shipped yet: the next increment is the whole.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Stops following the databases: the move is over (its last
    /// increment went after the site stopped) or given up. What the
    /// server keeps for following (a replication slot) goes.
    pub fn stop_following(&mut self) {
        for (_, f) in self.databases.drain() {
            f.end();
        }
    }
}

#[derive(Debug)]
struct Seen {
    stamp: Stamp,
    /// A file in fixed blocks: each block's hash.
    blocks: Vec<[u8; 32]>,
    /// A file in content-defined chunks: each chunk's hash and place.
    chunks: Vec<Chunk>,
}

#[derive(Debug, Clone, Copy)]
struct Chunk {
    hash: [u8; 32],
    at: u64,
    len: u32,
}

/// Content-defined chunks' sizes (FastCDC, normalised): a byte inserted
/// or removed moves the boundaries near it only, so the rest of the file
/// is found again by its chunks' hashes.
const CHUNK_MIN: u32 = 16 * 1024;
const CHUNK_AVG: u32 = 64 * 1024;
const CHUNK_MAX: u32 = 256 * 1024;

/// A record's entry index with this bit set: `at`, `len` and `len` bytes
/// of a chunked file's new version.
const PIECE_DATA: u32 = 1 << 31;
/// With this bit: `at`, `len`, `from`: bytes of the new version found in
/// the version the copy holds, at `from`.
const PIECE_COPY: u32 = 1 << 30;

/// Whether a file goes in content-defined chunks: volumes' files, where
/// uploads are written whole and edits insert; SQLite files and the rest
/// change in place, which fixed blocks follow best.
fn chunked(path: &str) -> bool {
    path.starts_with("volumes/")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    ino: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    /// Changed well before it was looked at: the stamp can be trusted.
    settled: bool,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata, now_ns: i128) -> Stamp {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        let mtime_ns = ns(meta.mtime(), meta.mtime_nsec());
        let ctime_ns = ns(meta.ctime(), meta.ctime_nsec());
        Stamp {
            size: meta.len(),
            ino: meta.ino(),
            mtime_ns,
            ctime_ns,
            settled: mtime_ns.max(ctime_ns) < now_ns - SETTLED_NS,
        }
    }

    /// Whether a file stamped `self` now holds what it held when `before`
    /// was taken.
    fn unchanged_since(&self, before: &Stamp) -> bool {
        before.settled
            && (self.size, self.ino, self.mtime_ns, self.ctime_ns)
                == (before.size, before.ino, before.mtime_ns, before.ctime_ns)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    File,
    Dir,
    Link,
}

/// One entry of the copy, relative to its root.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    path: String,
    kind: Kind,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    mode: u32,
    /// A link's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    /// A file that goes in content-defined chunks: when pieces of it come,
    /// its new version is built from them and the version the copy holds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    chunked: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    deployment: String,
    entries: Vec<Entry>,
}

/// What an increment held.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub entries: usize,
    /// Blocks of every file, and those sent.
    pub blocks: u64,
    pub blocks_sent: u64,
    /// Bytes of the files, and of the blocks sent.
    pub bytes: u64,
    pub bytes_sent: u64,
    /// Row changes of followed databases.
    pub changes: u64,
    /// Databases that went as a dump, and why.
    pub dumped: Vec<String>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    EngineError::io(what)
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Every entry under `root`, named under `prefix`, links not followed.
fn walk(root: &Path, prefix: &str, out: &mut Vec<(Entry, PathBuf)>) -> Result<(), EngineError> {
    let meta = match std::fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(format!("reading {}", root.display()))(e)),
    };
    let mut todo = vec![(root.to_path_buf(), prefix.to_string(), meta)];
    while let Some((path, name, meta)) = todo.pop() {
        let mode = meta.permissions().mode() & 0o777;
        let kind = meta.file_type();
        if kind.is_dir() {
            out.push((
                Entry {
                    path: name.clone(),
                    kind: Kind::Dir,
                    size: 0,
                    mode,
                    target: None,
                    chunked: false,
                },
                path.clone(),
            ));
            for e in std::fs::read_dir(&path)
                .map_err(io(format!("reading {}", path.display())))?
                .flatten()
            {
                let Some(file) = e.file_name().to_str().map(str::to_string) else {
                    return Err(EngineError::Input(format!(
                        "{} has a name that is not UTF-8; rename it to move the site",
                        e.path().display()
                    )));
                };
                let m = std::fs::symlink_metadata(e.path())
                    .map_err(io(format!("reading {}", e.path().display())))?;
                todo.push((e.path(), format!("{name}/{file}"), m));
            }
        } else if kind.is_symlink() {
            let target =
                std::fs::read_link(&path).map_err(io(format!("reading {}", path.display())))?;
            out.push((
                Entry {
                    path: name,
                    kind: Kind::Link,
                    size: 0,
                    mode,
                    target: Some(target.to_string_lossy().into_owned()),
                    chunked: false,
                },
                path,
            ));
        } else if kind.is_file() {
            out.push((
                Entry {
                    path: name,
                    kind: Kind::File,
                    size: meta.len(),
                    mode,
                    target: None,
                    chunked: false,
                },
                path,
            ));
        }
        // Sockets, pipes and devices are not data: they are made again by
        // whatever made them.
    }
    Ok(())
}

/// Adds the directories that hold roots (`volumes/` of `volumes/NAME`)
/// as entries: the copy makes each directory it is told of, parents first.
fn add_parent_dirs(entries: &mut Vec<(Entry, PathBuf)>, placeholder: &Path) {
    let have: BTreeSet<String> = entries.iter().map(|(e, _)| e.path.clone()).collect();
    let parents: BTreeSet<String> = entries
        .iter()
        .flat_map(|(e, _)| {
            let parts: Vec<&str> = e.path.split('/').collect();
            (1..parts.len()).map(move |n| parts[..n].join("/"))
        })
        .filter(|dir| !have.contains(dir))
        .collect();
    for dir in parents {
        entries.push((
            Entry {
                path: dir,
                kind: Kind::Dir,
                size: 0,
                mode: 0o700,
                target: None,
                chunked: false,
            },
            placeholder.to_path_buf(),
        ));
    }
}

fn put_u32(out: &mut dyn Write, v: u32) -> std::io::Result<()> {
    out.write_all(&v.to_le_bytes())
}

fn read_u32(input: &mut dyn Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    input.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(input: &mut dyn Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    input.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

impl crate::Engine {
    /// Writes to `out` the increment that brings a copy of deployment
    /// `name` from what `shipped` says it holds to what the deployment
    /// holds now, and notes in `shipped` what it will hold then. With an
    /// empty `shipped`, every file goes. Runs while the site serves; taken
    /// after it stopped, the copy it completes is exact.
    pub fn write_increment(
        &self,
        name: &str,
        shipped: &mut Shipped,
        out: &mut dyn Write,
    ) -> Result<Stats, EngineError> {
        let layout = &self.layout;
        let _lock = self.lock(name)?;
        let kinds = self.component_kinds(name)?;
        let whole = shipped.is_empty();
        let mut carried = Stats::default();
        // What is made for the copy rather than read from the site: its
        // record, its databases' dumps and the manifest.
        let made = layout.home.join("clones").join(crate::secrets::token());
        let result = (|| {
            let history = records::history(&layout.records_dir(name))?;
            let commit = history.last().map(|e| e.commit.clone()).unwrap_or_default();
            records::checkout(
                &layout.records_dir(name).display().to_string(),
                &made.join("record"),
            )?;
            let mut roots = vec![
                ("record".to_string(), made.join("record")),
                ("data".to_string(), layout.data_dir(name)),
            ];
            let (mut databases, mut volumes) = (Vec::new(), Vec::new());
            for (component, kind) in &kinds {
                match kind.as_str() {
                    "volume" => {
                        roots.push((
                            format!("volumes/{component}"),
                            layout.volume_dir(name, component),
                        ));
                        volumes.push(component.clone());
                    }
                    "postgres" => {
                        let dir = made.join("postgres");
                        commons_runtime::layout::private_dir(&dir)
                            .map_err(io("creating the dumps' directory"))?;
                        match database(layout, name, component, whole, &dir, shipped)? {
                            Carried::Followed { base, changes } => {
                                roots.push((format!("postgres/{component}.sql"), base));
                                carried.changes += changes;
                            }
                            Carried::Dumped(why) => {
                                let dump = backup::dump_database(name, component)?;
                                std::fs::write(dir.join(format!("{component}.sql")), dump)
                                    .map_err(io("writing a database's dump"))?;
                                carried.dumped.push(format!("{component}: {why}"));
                            }
                        }
                        databases.push(component.clone());
                    }
                    _ => {}
                }
            }
            roots.push(("postgres".to_string(), made.join("postgres")));
            let manifest = Manifest::new(name, commit, databases, volumes, commons_clock::now_ms());
            std::fs::write(
                made.join("manifest.json"),
                serde_json::to_vec_pretty(&manifest).expect("json"),
            )
            .map_err(io("writing the manifest"))?;
            roots.push(("manifest.json".to_string(), made.join("manifest.json")));
            let mut entries = Vec::new();
            for (prefix, root) in &roots {
                walk(root, prefix, &mut entries)?;
            }
            add_parent_dirs(&mut entries, &made);
            entries.sort_by(|a, b| a.0.path.cmp(&b.0.path));
            // Stamps are taken before the files are read: a change after
            // the look shows as a new stamp next time.
            let mut stats = send(name, &entries, shipped, out, now_ns())?;
            stats.changes = carried.changes;
            stats.dumped = std::mem::take(&mut carried.dumped);
            Ok(stats)
        })();
        let _ = std::fs::remove_dir_all(&made);
        result
    }

    /// Stands a deployment up from a copy that increments built (see
    /// [`apply_increment`]), as a restore from a backup does; the copy's
    /// files are moved into place.
    /// `caught` is the state [`crate::Engine::follow_copy`] kept: databases
    /// it loaded as their changes came are not loaded again.
    pub async fn restore_copy(
        &self,
        copy: &Path,
        caught: Option<&Path>,
        as_name: Option<&str>,
        jobs: usize,
        progress: &dyn crate::Progress,
    ) -> Result<(crate::Target, crate::Outcome), EngineError> {
        let what = format!("{} is not a complete copy of a site", copy.display());
        let manifest = backup::read_manifest(copy, &what)?;
        self.restore_from(copy, &manifest, caught, as_name, jobs, progress)
            .await
    }
}

/// How a database goes in an increment.
enum Carried {
    /// By its changes: the base dump (at this path) and the changes file
    /// (in the increment's own files), with this many changes.
    Followed { base: PathBuf, changes: u64 },
    /// As a dump, for this reason.
    Dumped(String),
}

/// Carries database `component` of deployment `name` in an increment:
/// its changes since the last one, written to `dir`, when it is followed
/// (following begins with the first increment, and again when the schema
/// changed); else a dump.
fn database(
    layout: &commons_runtime::Layout,
    name: &str,
    component: &str,
    whole: bool,
    dir: &Path,
    shipped: &mut Shipped,
) -> Result<Carried, EngineError> {
    let db = commons_runtime::drivers::postgres::name(name, component);
    let changes_file = dir.join(format!("{component}.changes"));
    let mut following = shipped.databases.remove(component);
    if whole {
        if let Some(f) = following.take() {
            f.end();
        }
    }
    if let Some(f) = following {
        // None: the schema changed, following begins again from a new base.
        if let Some(carried) = next_changes(f, &changes_file, component, shipped)? {
            return Ok(carried);
        }
    }
    let kept = layout.home.join("following").join(name);
    commons_runtime::layout::private_dir(&kept).map_err(io("keeping a database's base"))?;
    let f = match follow::begin(&db, &kept.join(format!("{component}.sql")))? {
        Ok(f) => f,
        Err(why) => return Ok(Carried::Dumped(why)),
    };
    Ok(next_changes(f, &changes_file, component, shipped)?
        .unwrap_or_else(|| Carried::Dumped("its schema is changing".into())))
}

/// Writes `f`'s next changes file; `None` (following ended) when the
/// schema changed. Following ends on any failure too.
fn next_changes(
    mut f: Following,
    changes_file: &Path,
    component: &str,
    shipped: &mut Shipped,
) -> Result<Option<Carried>, EngineError> {
    match f.write_changes(changes_file) {
        Ok(Some(changes)) => {
            let base = f.dump.clone();
            shipped.databases.insert(component.to_string(), f);
            Ok(Some(Carried::Followed { base, changes }))
        }
        Ok(None) => {
            let _ = std::fs::remove_file(changes_file);
            f.end();
            Ok(None)
        }
        Err(e) => {
            f.end();
            Err(e)
        }
    }
}

/// Writes the header and the changed blocks of `entries`.
fn send(
    name: &str,
    entries: &[(Entry, PathBuf)],
    shipped: &mut Shipped,
    out: &mut dyn Write,
    looked: i128,
) -> Result<Stats, EngineError> {
    let w = |e: std::io::Error| io("writing the increment")(e);
    let header = Header {
        deployment: name.to_string(),
        entries: entries
            .iter()
            .map(|(e, _)| Entry {
                chunked: e.kind == Kind::File && chunked(&e.path),
                ..e.clone()
            })
            .collect(),
    };
    let header = serde_json::to_vec(&header).expect("json");
    out.write_all(MAGIC).map_err(w)?;
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(w)?;
    out.write_all(&header).map_err(w)?;
    let mut stats = Stats {
        entries: entries.len(),
        ..Stats::default()
    };
    let mut kept = HashMap::new();
    let mut buf = vec![0u8; BLOCK];
    for (index, (entry, path)) in entries.iter().enumerate() {
        if entry.kind != Kind::File {
            continue;
        }
        let before = shipped.files.remove(&entry.path);
        let file = std::fs::File::open(path).map_err(io(format!("reading {}", path.display())))?;
        let meta = file
            .metadata()
            .map_err(io(format!("reading {}", path.display())))?;
        let stamp = Stamp::of(&meta, looked);
        // The size the header promised is what is read.
        let size = entry.size;
        let count = size.div_ceil(BLOCK as u64);
        stats.blocks += count;
        stats.bytes += size;
        if let Some(b) = before.as_ref().filter(|b| {
            stamp.unchanged_since(&b.stamp) && b.stamp.size == size && stamp.size == size
        }) {
            kept.insert(
                entry.path.clone(),
                Seen {
                    stamp,
                    blocks: b.blocks.clone(),
                    chunks: b.chunks.clone(),
                },
            );
            continue;
        }
        if chunked(&entry.path) {
            let chunks = send_chunks(index as u32, &file, size, before.as_ref(), out, &mut stats)
                .map_err(io(format!("reading {}", path.display())))?;
            kept.insert(
                entry.path.clone(),
                Seen {
                    stamp,
                    blocks: Vec::new(),
                    chunks,
                },
            );
            continue;
        }
        let mut blocks = Vec::with_capacity(count as usize);
        for n in 0..count {
            let at = n * BLOCK as u64;
            let len = (size - at).min(BLOCK as u64) as usize;
            let got = read_at_most(&file, &mut buf[..len], at)
                .map_err(io(format!("reading {}", path.display())))?;
            // A file that shrank while read reads as zeros past its end: the
            // last increment, taken once it is still, sends what it is.
            buf[got..len].fill(0);
            let hash = *blake3::hash(&buf[..len]).as_bytes();
            // The hash covers the length: an equal one is the same bytes.
            let same = before
                .as_ref()
                .and_then(|b| b.blocks.get(n as usize))
                .is_some_and(|h| *h == hash);
            if !same {
                put_u32(out, index as u32).map_err(w)?;
                out.write_all(&n.to_le_bytes()).map_err(w)?;
                put_u32(out, len as u32).map_err(w)?;
                out.write_all(&buf[..len]).map_err(w)?;
                stats.blocks_sent += 1;
                stats.bytes_sent += len as u64;
            }
            blocks.push(hash);
        }
        kept.insert(
            entry.path.clone(),
            Seen {
                stamp,
                blocks,
                chunks: Vec::new(),
            },
        );
    }
    put_u32(out, END).map_err(w)?;
    out.flush().map_err(w)?;
    shipped.files = kept;
    Ok(stats)
}

/// Reads up to `buf.len()` bytes at `at`, fewer only at the end of the file.
/// Sends file `index` (`size` bytes, as the header says) as pieces of its
/// new version: chunks the copy holds (in the version `before` describes)
/// as copies from where they are, the others as bytes. Answers the new
/// version's chunks.
fn send_chunks(
    index: u32,
    file: &std::fs::File,
    size: u64,
    before: Option<&Seen>,
    out: &mut dyn Write,
    stats: &mut Stats,
) -> std::io::Result<Vec<Chunk>> {
    let known: HashMap<[u8; 32], (u64, u32)> = before
        .map(|b| b.chunks.iter().map(|c| (c.hash, (c.at, c.len))).collect())
        .unwrap_or_default();
    let mut chunks = Vec::new();
    // A run of copies that follow each other, sent as one.
    let mut run: Option<(u64, u32, u64)> = None;
    let flush = |run: &mut Option<(u64, u32, u64)>, out: &mut dyn Write| {
        if let Some((at, len, from)) = run.take() {
            put_u32(out, index | PIECE_COPY)?;
            out.write_all(&at.to_le_bytes())?;
            put_u32(out, len)?;
            out.write_all(&from.to_le_bytes())?;
        }
        Ok::<_, std::io::Error>(())
    };
    let reader = Exactly { file, at: 0, size };
    for chunk in fastcdc::v2020::StreamCDC::new(reader, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
        let chunk = chunk.map_err(std::io::Error::other)?;
        let hash = *blake3::hash(&chunk.data).as_bytes();
        let len = chunk.length as u32;
        match known.get(&hash) {
            Some(&(from, was)) if was == len => {
                run = match run {
                    Some((at, n, f)) if at + n as u64 == chunk.offset && f + n as u64 == from => {
                        Some((at, n + len, f))
                    }
                    other => {
                        let mut other = other;
                        flush(&mut other, out)?;
                        Some((chunk.offset, len, from))
                    }
                };
            }
            _ => {
                flush(&mut run, out)?;
                put_u32(out, index | PIECE_DATA)?;
                out.write_all(&chunk.offset.to_le_bytes())?;
                put_u32(out, len)?;
                out.write_all(&chunk.data)?;
                stats.blocks_sent += 1;
                stats.bytes_sent += len as u64;
            }
        }
        chunks.push(Chunk {
            hash,
            at: chunk.offset,
            len,
        });
    }
    flush(&mut run, out)?;
    Ok(chunks)
}

/// A file read as exactly `size` bytes: zeros past its end if it shrank
/// since the header was written (the last increment sends what it is).
struct Exactly<'a> {
    file: &'a std::fs::File,
    at: u64,
    size: u64,
}

impl Read for Exactly<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.size - self.at).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let got = read_at_most(self.file, &mut buf[..want], self.at)?;
        buf[got..want].fill(0);
        self.at += want as u64;
        Ok(want)
    }
}

fn read_at_most(file: &std::fs::File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// `rel` under `root`, when it is a plain relative path (no `..`, no root,
/// no empty or `.` part).
fn inside(root: &Path, rel: &str) -> Option<PathBuf> {
    let p = Path::new(rel);
    let plain = !rel.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && !rel.split('/').any(|part| part.is_empty() || part == ".");
    plain.then(|| root.join(p))
}

/// Makes sure nothing between `root` and `path` is a link (or anything but
/// a directory), so what is written there stays in the copy.
fn no_link_above(root: &Path, path: &Path) -> Result<(), EngineError> {
    let mut at = path.parent();
    while let Some(dir) = at {
        if dir == root {
            return Ok(());
        }
        match std::fs::symlink_metadata(dir) {
            Ok(m) if m.file_type().is_dir() => {}
            _ => {
                return Err(EngineError::Input(format!(
                    "the increment writes through {}, which is not a directory of the copy",
                    dir.display()
                )))
            }
        }
        at = dir.parent();
    }
    Ok(())
}

fn bad(detail: impl Into<String>) -> EngineError {
    EngineError::Input(format!("a broken increment: {}", detail.into()))
}

/// Applies the increment read from `input` to the copy at `copy` (made
/// afresh when `fresh`): entries it does not list are removed, files take
/// their new sizes and the blocks sent. Answers what it held.
pub fn apply_increment(
    copy: &Path,
    input: &mut dyn Read,
    fresh: bool,
) -> Result<Stats, EngineError> {
    let r = |e: std::io::Error| bad(e.to_string());
    let mut magic = [0u8; 8];
    input.read_exact(&mut magic).map_err(r)?;
    if &magic != MAGIC {
        return Err(bad("it does not start as one"));
    }
    let len = read_u64(input).map_err(r)?;
    if len > 1 << 30 {
        return Err(bad("its list of entries is over 1 GiB"));
    }
    let mut header = vec![0u8; len as usize];
    input.read_exact(&mut header).map_err(r)?;
    let header: Header = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    if fresh {
        let _ = std::fs::remove_dir_all(copy);
    }
    commons_runtime::layout::private_dir(copy)
        .map_err(io(format!("creating {}", copy.display())))?;
    let mut stats = Stats {
        entries: header.entries.len(),
        ..Stats::default()
    };
    // Entries first, parents before children (the list is sorted): what
    // changed kind goes, directories and links are made, files sized.
    let mut listed = BTreeSet::new();
    let mut files: Vec<Option<Receiving>> = Vec::with_capacity(header.entries.len());
    for e in &header.entries {
        let path = inside(copy, &e.path).ok_or_else(|| bad(format!("the path {:?}", e.path)))?;
        no_link_above(copy, &path)?;
        listed.insert(path.clone());
        let mode = e.mode & 0o777;
        let now = std::fs::symlink_metadata(&path).ok();
        let same_kind = now.as_ref().is_some_and(|m| match e.kind {
            Kind::File => m.file_type().is_file(),
            Kind::Dir => m.file_type().is_dir(),
            Kind::Link => false,
        });
        if now.is_some() && !same_kind {
            let gone = if now.as_ref().is_some_and(|m| m.file_type().is_dir()) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            gone.map_err(io(format!("replacing {}", path.display())))?;
        }
        let w = |what: &Path| io(format!("writing {}", what.display()));
        match e.kind {
            Kind::Dir => {
                if !same_kind {
                    std::fs::create_dir(&path).map_err(w(&path))?;
                }
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .map_err(w(&path))?;
                files.push(None);
            }
            Kind::Link => {
                let target = e
                    .target
                    .as_deref()
                    .ok_or_else(|| bad("a link without a target"))?;
                std::os::unix::fs::symlink(target, &path).map_err(w(&path))?;
                files.push(None);
            }
            Kind::File => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(w(&path))?;
                // A chunked file keeps the version it holds until pieces of
                // the new one come: they may copy from anywhere in it.
                if !e.chunked {
                    file.set_len(e.size).map_err(w(&path))?;
                }
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(w(&path))?;
                stats.blocks += e.size.div_ceil(BLOCK as u64);
                stats.bytes += e.size;
                files.push(Some(Receiving {
                    file,
                    size: e.size,
                    chunked: e.chunked,
                    path,
                    mode,
                }));
            }
        }
    }
    // What the copy holds and the increment does not list goes.
    remove_unlisted(copy, &listed)?;
    let mut buf = vec![0u8; CHUNK_MAX as usize];
    let mut written = vec![false; files.len()];
    let scratch = copy.with_extension("chunks");
    let mut building: Option<Building> = None;
    loop {
        let index = read_u32(input).map_err(r)?;
        if index == END {
            break;
        }
        if index & (PIECE_DATA | PIECE_COPY) != 0 {
            let copying = index & PIECE_COPY != 0;
            let index = index & !(PIECE_DATA | PIECE_COPY);
            let Some(Some(target)) = files
                .get(index as usize)
                .filter(|f| f.as_ref().is_some_and(|f| f.chunked))
            else {
                return Err(bad(format!(
                    "a piece for entry {index}, which is not a chunked file"
                )));
            };
            if building.as_ref().is_some_and(|b| b.index != index) {
                building.take().expect("some").finish(&files)?;
            }
            if building.is_none() {
                building = Some(Building::start(&scratch, index, target)?);
            }
            let b = building.as_mut().expect("some");
            let at = read_u64(input).map_err(r)?;
            let len = read_u32(input).map_err(r)?;
            if (len > CHUNK_MAX && !copying)
                || at
                    .checked_add(len as u64)
                    .is_none_or(|end| end > target.size)
            {
                return Err(bad(format!(
                    "a piece of {len} bytes at {at} lies outside its file"
                )));
            }
            if copying {
                let from = read_u64(input).map_err(r)?;
                b.copy(&target.file, from, at, len, &mut buf)?;
            } else {
                input.read_exact(&mut buf[..len as usize]).map_err(r)?;
                b.temp
                    .write_all_at(&buf[..len as usize], at)
                    .map_err(io("writing a piece of the copy"))?;
                stats.blocks_sent += 1;
                stats.bytes_sent += len as u64;
            }
            continue;
        }
        let n = read_u64(input).map_err(r)?;
        let len = read_u32(input).map_err(r)? as usize;
        let Some(Some(Receiving { file, size, .. })) = files
            .get(index as usize)
            .filter(|f| f.as_ref().is_some_and(|f| !f.chunked))
        else {
            return Err(bad(format!(
                "a block for entry {index}, which is not a file in blocks"
            )));
        };
        let at = n
            .checked_mul(BLOCK as u64)
            .filter(|at| len <= BLOCK && at + len as u64 <= *size)
            .ok_or_else(|| bad(format!("block {n} of {len} bytes lies outside its file")))?;
        input.read_exact(&mut buf[..len]).map_err(r)?;
        file.write_all_at(&buf[..len], at)
            .map_err(io("writing a block of the copy"))?;
        written[index as usize] = true;
        stats.blocks_sent += 1;
        stats.bytes_sent += len as u64;
    }
    if let Some(b) = building.take() {
        b.finish(&files)?;
    }
    let _ = std::fs::remove_dir_all(&scratch);
    for (i, f) in files.iter().enumerate() {
        if let (Some(Receiving { file, .. }), true) = (f, written[i]) {
            file.sync_data().map_err(io("syncing the copy"))?;
        }
    }
    Ok(stats)
}

/// A file of the copy an increment lists.
struct Receiving {
    file: std::fs::File,
    size: u64,
    chunked: bool,
    path: PathBuf,
    mode: u32,
}

/// The new version of a chunked file, built beside the copy from pieces,
/// then put in its place.
struct Building {
    index: u32,
    temp: std::fs::File,
    temp_path: PathBuf,
    /// The size of the version the copy holds.
    old_size: u64,
}

impl Building {
    fn start(scratch: &Path, index: u32, target: &Receiving) -> Result<Building, EngineError> {
        commons_runtime::layout::private_dir(scratch)
            .map_err(io(format!("creating {}", scratch.display())))?;
        let temp_path = scratch.join(index.to_string());
        let w = io(format!("writing {}", temp_path.display()));
        let temp = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp_path)
            .map_err(w)?;
        temp.set_len(target.size)
            .map_err(io(format!("writing {}", temp_path.display())))?;
        let old_size = target
            .file
            .metadata()
            .map_err(io(format!("reading {}", target.path.display())))?
            .len();
        Ok(Building {
            index,
            temp,
            temp_path,
            old_size,
        })
    }

    /// Copies `len` bytes at `from` in the version the copy holds to `at`
    /// in the new one.
    fn copy(
        &mut self,
        old: &std::fs::File,
        from: u64,
        at: u64,
        len: u32,
        buf: &mut [u8],
    ) -> Result<(), EngineError> {
        if from
            .checked_add(len as u64)
            .is_none_or(|end| end > self.old_size)
        {
            return Err(bad(format!(
                "a piece copies {len} bytes at {from}, outside the file the copy holds"
            )));
        }
        let mut done = 0u64;
        while done < len as u64 {
            let n = (len as u64 - done).min(buf.len() as u64) as usize;
            old.read_exact_at(&mut buf[..n], from + done)
                .map_err(io("reading the copy"))?;
            self.temp
                .write_all_at(&buf[..n], at + done)
                .map_err(io("writing a piece of the copy"))?;
            done += n as u64;
        }
        Ok(())
    }

    fn finish(self, files: &[Option<Receiving>]) -> Result<(), EngineError> {
        let target = files[self.index as usize].as_ref().expect("a file");
        self.temp
            .set_permissions(std::fs::Permissions::from_mode(target.mode))
            .and_then(|_| self.temp.sync_data())
            .map_err(io(format!("writing {}", self.temp_path.display())))?;
        std::fs::rename(&self.temp_path, &target.path)
            .map_err(io(format!("replacing {}", target.path.display())))
    }
}

/// Removes what lies under `copy` and is not in `listed`.
fn remove_unlisted(copy: &Path, listed: &BTreeSet<PathBuf>) -> Result<(), EngineError> {
    let mut todo = vec![copy.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir)
            .map_err(io(format!("reading {}", dir.display())))?
            .flatten()
        {
            let path = e.path();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if !listed.contains(&path) {
                let gone = if is_dir {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                gone.map_err(io(format!("removing {}", path.display())))?;
            } else if is_dir {
                todo.push(path);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: Kind, size: u64) -> Entry {
        Entry {
            path: path.into(),
            kind,
            size,
            mode: 0o644,
            target: None,
            chunked: false,
        }
    }

    /// Sends the tree at `src` (as the root `data`) onto `copy`.
    fn ship(src: &Path, shipped: &mut Shipped, copy: &Path, fresh: bool) -> (Stats, Stats) {
        ship_at(src, shipped, copy, fresh, now_ns())
    }

    fn ship_at(
        src: &Path,
        shipped: &mut Shipped,
        copy: &Path,
        fresh: bool,
        looked: i128,
    ) -> (Stats, Stats) {
        let mut entries = Vec::new();
        walk(src, "data", &mut entries).unwrap();
        // A root below another name, as volumes are.
        walk(&src.join("sub"), "volumes/sub", &mut entries).unwrap();
        add_parent_dirs(&mut entries, src);
        entries.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        let mut wire = Vec::new();
        let sent = send("site", &entries, shipped, &mut wire, looked).unwrap();
        let applied = apply_increment(copy, &mut wire.as_slice(), fresh).unwrap();
        (sent, applied)
    }

    /// Sends the tree at `src` as the volume `v` onto `copy`.
    fn ship_volume(src: &Path, shipped: &mut Shipped, copy: &Path, fresh: bool) -> Stats {
        let mut entries = Vec::new();
        walk(src, "volumes/v", &mut entries).unwrap();
        add_parent_dirs(&mut entries, src);
        entries.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        let mut wire = Vec::new();
        let sent = send("site", &entries, shipped, &mut wire, now_ns()).unwrap();
        let applied = apply_increment(copy, &mut wire.as_slice(), fresh).unwrap();
        assert_eq!(applied.bytes_sent, sent.bytes_sent);
        sent
    }

    /// Bytes that look random (content-defined chunking needs some): a
    /// hash of a counter.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 32);
        let mut n = 0u64;
        while out.len() < len {
            let mut h = blake3::Hasher::new();
            h.update(&seed.to_le_bytes()).update(&n.to_le_bytes());
            out.extend_from_slice(h.finalize().as_bytes());
            n += 1;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn a_byte_inserted_in_a_volume_file_sends_the_chunks_around_it() {
        let root = temp("chunks");
        let (src, copy) = (root.join("src"), root.join("copy"));
        std::fs::create_dir_all(&src).unwrap();
        let mut big = noise(4 << 20, 7);
        std::fs::write(src.join("upload.bin"), &big).unwrap();
        let mut shipped = Shipped::default();
        let sent = ship_volume(&src, &mut shipped, &copy, true);
        assert_eq!(sent.bytes_sent, 4 << 20);
        // One byte in, near the front: fixed blocks would send 3 MiB and more.
        big.insert((1 << 20) + 7, 42);
        std::fs::write(src.join("upload.bin"), &big).unwrap();
        let sent = ship_volume(&src, &mut shipped, &copy, false);
        assert!(
            sent.bytes_sent <= 2 * CHUNK_MAX as u64,
            "only the chunks around the byte go: {sent:?}"
        );
        assert!(std::fs::read(copy.join("volumes/v/upload.bin")).unwrap() == big);
        // Cut short, then a piece of it moved to the end.
        let mut moved = big[..3 << 20].to_vec();
        moved.extend_from_slice(&big[..1 << 20]);
        std::fs::write(src.join("upload.bin"), &moved).unwrap();
        let sent = ship_volume(&src, &mut shipped, &copy, false);
        assert!(sent.bytes_sent <= 3 * CHUNK_MAX as u64, "{sent:?}");
        assert!(std::fs::read(copy.join("volumes/v/upload.bin")).unwrap() == moved);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_piece_copying_from_outside_the_file_is_refused() {
        let root = temp("bad-piece");
        let copy = root.join("copy");
        let header = Header {
            deployment: "site".into(),
            entries: vec![
                entry("volumes", Kind::Dir, 0),
                Entry {
                    chunked: true,
                    ..entry("volumes/v", Kind::File, 10)
                },
            ],
        };
        let header = serde_json::to_vec(&header).unwrap();
        let mut wire = MAGIC.to_vec();
        wire.extend_from_slice(&(header.len() as u64).to_le_bytes());
        wire.extend_from_slice(&header);
        wire.extend_from_slice(&(PIECE_COPY | 1).to_le_bytes());
        wire.extend_from_slice(&0u64.to_le_bytes());
        wire.extend_from_slice(&10u32.to_le_bytes());
        wire.extend_from_slice(&0u64.to_le_bytes());
        wire.extend_from_slice(&END.to_le_bytes());
        let err = apply_increment(&copy, &mut wire.as_slice(), true).unwrap_err();
        assert!(
            err.to_string().contains("outside the file the copy holds"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    fn same_tree(a: &Path, b: &Path) {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        walk(a, "data", &mut x).unwrap();
        walk(b, "data", &mut y).unwrap();
        x.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        y.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        let names = |v: &[(Entry, PathBuf)]| {
            v.iter()
                .map(|(e, _)| (e.path.clone(), e.kind, e.size, e.mode, e.target.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&x), names(&y));
        for ((e, p), (_, q)) in x.iter().zip(&y) {
            if e.kind == Kind::File {
                assert!(
                    std::fs::read(p).unwrap() == std::fs::read(q).unwrap(),
                    "{}",
                    e.path
                );
            }
        }
    }

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("commons-incr-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn increments_send_what_changed_and_leave_an_exact_copy() {
        let root = temp("exact");
        let (src, copy) = (root.join("src"), root.join("copy").join("data"));
        std::fs::create_dir_all(src.join("sub")).unwrap();
        let big: Vec<u8> = (0..(BLOCK * 10 + 123))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(src.join("db.sqlite"), &big).unwrap();
        std::fs::write(src.join("sub/note.txt"), b"hello").unwrap();
        std::os::unix::fs::symlink("note.txt", src.join("sub/link")).unwrap();
        std::fs::write(src.join("gone.txt"), b"bye").unwrap();
        let mut shipped = Shipped::default();
        let (sent, applied) = ship(&src, &mut shipped, &root.join("copy"), true);
        assert_eq!(sent.blocks_sent, 11 + 1 + 1 + 1, "{sent:?}");
        assert!(root.join("copy/volumes/sub/note.txt").is_file());
        assert_eq!(applied.bytes_sent, sent.bytes_sent);
        same_tree(&src, &copy);

        // A block changed in place (same size, in the same clock tick as
        // the last look), a file grew, one went, one came.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(src.join("db.sqlite"))
            .unwrap();
        f.write_all_at(b"changed", (BLOCK * 4 + 10) as u64).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(src.join("sub/note.txt"))
            .unwrap()
            .write_all(b", world")
            .unwrap();
        std::fs::remove_file(src.join("gone.txt")).unwrap();
        std::fs::write(src.join("new.txt"), b"new").unwrap();
        let (sent, _) = ship(&src, &mut shipped, &root.join("copy"), false);
        assert_eq!(
            sent.blocks_sent, 4,
            "block 4 of the db, the note (twice), the new file: {sent:?}"
        );
        same_tree(&src, &copy);
        assert!(!copy.join("gone.txt").exists());

        // Nothing changed: only files too recent to trust are read, and
        // none of their blocks goes.
        let (sent, _) = ship(&src, &mut shipped, &root.join("copy"), false);
        assert_eq!(sent.blocks_sent, 0, "{sent:?}");

        // A shrunk file and a file that became a directory.
        std::fs::write(src.join("db.sqlite"), &big[..BLOCK + 5]).unwrap();
        std::fs::remove_file(src.join("new.txt")).unwrap();
        std::fs::create_dir(src.join("new.txt")).unwrap();
        let (sent, _) = ship(&src, &mut shipped, &root.join("copy"), false);
        assert_eq!(
            sent.blocks_sent, 1,
            "the first block is unchanged: {sent:?}"
        );
        same_tree(&src, &copy);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_settled_file_is_not_read_again() {
        let root = temp("settled");
        let src = root.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let path = src.join("volume.bin");
        std::fs::write(&path, vec![1u8; BLOCK * 3]).unwrap();
        // Looked at long after it last changed: trusted at the next look.
        let later = now_ns() + 10 * SETTLED_NS;
        let mut shipped = Shipped::default();
        ship_at(&src, &mut shipped, &root.join("copy"), true, later);
        assert!(shipped.files["data/volume.bin"].stamp.settled);
        let (sent, _) = ship_at(&src, &mut shipped, &root.join("copy"), false, later);
        assert_eq!((sent.blocks, sent.blocks_sent), (3, 0));
        assert!(shipped.files["data/volume.bin"].stamp.settled);
        // A change, even one that keeps the size and puts the time back,
        // moves the change time: read again.
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.write_all_at(b"x", 5).unwrap();
        f.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(3600))
            .unwrap();
        let (sent, _) = ship_at(&src, &mut shipped, &root.join("copy"), false, later);
        assert_eq!((sent.blocks, sent.blocks_sent), (3, 1));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_malicious_increment_cannot_write_outside_the_copy() {
        let root = temp("malicious");
        let copy = root.join("copy");
        let outside = root.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let wire = |entries: Vec<Entry>, blocks: &[(u32, u64, &[u8])]| {
            let header = serde_json::to_vec(&Header {
                deployment: "x".into(),
                entries,
            })
            .unwrap();
            let mut w = MAGIC.to_vec();
            w.extend((header.len() as u64).to_le_bytes());
            w.extend(header);
            for (i, n, b) in blocks {
                w.extend(i.to_le_bytes());
                w.extend(n.to_le_bytes());
                w.extend((b.len() as u32).to_le_bytes());
                w.extend(*b);
            }
            w.extend(END.to_le_bytes());
            w
        };
        let refused = |w: Vec<u8>| {
            let e = apply_increment(&copy, &mut w.as_slice(), true).unwrap_err();
            assert!(
                e.to_string().contains("broken increment")
                    || e.to_string().contains("not a directory"),
                "{e}"
            );
        };
        refused(wire(vec![entry("../outside/x", Kind::File, 3)], &[]));
        refused(wire(vec![entry("/etc/x", Kind::File, 3)], &[]));
        refused(wire(vec![entry("data/./x", Kind::File, 3)], &[]));
        // Through a link the same increment makes.
        let mut link = entry("data", Kind::Link, 0);
        link.target = Some(outside.display().to_string());
        refused(wire(
            vec![link, entry("data/x", Kind::File, 3)],
            &[(1, 0, b"pwn")],
        ));
        // A block past its file's end, or for a directory.
        refused(wire(vec![entry("f", Kind::File, 3)], &[(0, 0, b"four")]));
        refused(wire(vec![entry("f", Kind::File, 3)], &[(0, 1, b"abc")]));
        refused(wire(vec![entry("d", Kind::Dir, 0)], &[(0, 0, b"abc")]));
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // Set-id bits are dropped.
        let mut suid = entry("f", Kind::File, 3);
        suid.mode = 0o4755;
        apply_increment(
            &copy,
            &mut wire(vec![suid], &[(0, 0, b"abc")]).as_slice(),
            true,
        )
        .unwrap();
        let mode = std::fs::metadata(copy.join("f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
        let _ = std::fs::remove_dir_all(&root);
    }
}
