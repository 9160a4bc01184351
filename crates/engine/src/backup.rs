//! Backups and restores of a deployment.
//!
//! A backup is one tar archive in `COMMONS_HOME/archive/`, named by the
//! SHA-256 of its bytes (content-addressed: the name proves the content):
//! `manifest.json`, the deployment's record at its latest revision
//! (`record/`: blueprint sources and inputs, never secrets), its data
//! directory (`data/`), its volumes (`volumes/NAME/`) and a plain-SQL
//! `pg_dump` of each of its PostgreSQL databases (`postgres/NAME.sql`).
//!
//! A restore checks the hash, stands the service up again from the record
//! (under the same or a new name, with new secrets), with its files and
//! databases back in place before any of its jobs or processes start.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use commons_runtime::drivers::postgres::{name as db_name, ADMIN_URL_VAR};

use crate::pgtools::{self, Conn};
use crate::{records, EngineError};

/// What a backup holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub deployment: String,
    /// The record revision (commit id) the backup goes with.
    pub record_commit: String,
    /// PostgreSQL components dumped.
    pub databases: Vec<String>,
    pub volumes: Vec<String>,
    pub created_at_ms: i64,
}

pub const FORMAT: &str = "onecommons-backup/v1";

impl Manifest {
    /// What a backup (or a move's copy) of `deployment` at `record_commit`
    /// holds, made now.
    pub(crate) fn new(
        deployment: &str,
        record_commit: String,
        databases: Vec<String>,
        volumes: Vec<String>,
        created_at_ms: i64,
    ) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            deployment: deployment.into(),
            record_commit,
            databases,
            volumes,
            created_at_ms,
        }
    }
}

/// A written backup.
#[derive(Debug, Clone, Serialize)]
pub struct Backup {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    pub manifest: Manifest,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    EngineError::io(what)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Adds a directory tree to the archive under `prefix` (if it exists).
fn add_dir(tar: &mut tar::Builder<Vec<u8>>, dir: &Path, prefix: &str) -> Result<(), EngineError> {
    if dir.is_dir() {
        tar.append_dir_all(prefix, dir)
            .map_err(io(format!("archiving {}", dir.display())))?;
    }
    Ok(())
}

fn add_bytes(tar: &mut tar::Builder<Vec<u8>>, path: &str, bytes: &[u8]) -> Result<(), EngineError> {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o600);
    h.set_cksum();
    tar.append_data(&mut h, path, bytes)
        .map_err(io(format!("archiving {path}")))
}

/// The admin connection string pointed at database `db`.
pub(crate) fn admin_for(db: &str) -> Result<String, EngineError> {
    let url = commons_runtime::settings::current()
        .postgres_admin_url
        .clone()
        .ok_or_else(|| {
            EngineError::Input(format!(
                "backing up a PostgreSQL database needs {ADMIN_URL_VAR}"
            ))
        })?;
    // Key=value connection strings take a later dbname over an earlier one.
    Ok(if url.contains("://") {
        let base = url.split('?').next().unwrap_or(&url);
        let without_db = base.rsplit_once('/').map(|(b, _)| b).unwrap_or(base);
        format!("{without_db}/{db}")
    } else {
        format!("{url} dbname={db}")
    })
}

/// A plain-SQL dump of deployment `name`'s database `component`: portable
/// SQL, no owners or grants, so it loads under a new role.
pub(crate) fn dump_database(name: &str, component: &str) -> Result<Vec<u8>, EngineError> {
    let conn = Conn::parse(&admin_for(&db_name(name, component))?)?;
    pgtools::output("pg_dump", &conn, DUMP_OPTIONS)
}

/// A dump loads under any role, and leaves out what a move made for
/// itself (its publication).
pub(crate) const DUMP_OPTIONS: &[&str] = &[
    "--no-owner",
    "--no-privileges",
    "--no-publications",
    "--no-subscriptions",
];

/// Writes the backup of `name`.
pub(crate) fn write(
    engine: &crate::Engine,
    name: &str,
    kinds: &[(String, String)],
    now_ms: i64,
) -> Result<Backup, EngineError> {
    let layout = &engine.layout;
    let history = records::history(&layout.records_dir(name))?;
    let commit = history.last().map(|e| e.commit.clone()).unwrap_or_default();
    let mut tar = tar::Builder::new(Vec::new());
    tar.mode(tar::HeaderMode::Deterministic);
    // A link a tenant made in its data is archived as a link: followed, it
    // would copy whatever it names on the host into the tenant's backup.
    tar.follow_symlinks(false);
    let staging = layout.home.join("clones").join(crate::secrets::token());
    records::checkout(&layout.records_dir(name).display().to_string(), &staging)?;
    add_dir(&mut tar, &staging, "record")?;
    let _ = std::fs::remove_dir_all(&staging);
    add_dir(&mut tar, &layout.data_dir(name), "data")?;
    let mut databases = Vec::new();
    let mut volumes = Vec::new();
    for (component, kind) in kinds {
        match kind.as_str() {
            "volume" => {
                add_dir(
                    &mut tar,
                    &layout.volume_dir(name, component),
                    &format!("volumes/{component}"),
                )?;
                volumes.push(component.clone());
            }
            "postgres" => {
                let dump = dump_database(name, component)?;
                add_bytes(&mut tar, &format!("postgres/{component}.sql"), &dump)?;
                databases.push(component.clone());
            }
            _ => {}
        }
    }
    let manifest = Manifest::new(name, commit, databases, volumes, now_ms);
    add_bytes(
        &mut tar,
        "manifest.json",
        &serde_json::to_vec_pretty(&manifest).expect("json"),
    )?;
    let bytes = tar.into_inner().map_err(io("finishing the archive"))?;
    let sha256 = hex(&Sha256::digest(&bytes));
    let dir = layout.archive_dir();
    commons_runtime::layout::private_dir(&dir).map_err(io("creating the archive directory"))?;
    let path = dir.join(format!("{sha256}.tar"));
    std::fs::write(&path, &bytes).map_err(io(format!("writing {}", path.display())))?;
    Ok(Backup {
        path,
        sha256,
        bytes: bytes.len() as u64,
        manifest,
    })
}

/// Checks an archive's name against its content and unpacks it into `into`.
pub(crate) fn unpack(archive: &Path, into: &Path) -> Result<Manifest, EngineError> {
    let mut bytes = Vec::new();
    std::fs::File::open(archive)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| {
            EngineError::Input(format!("cannot read backup {}: {e}", archive.display()))
        })?;
    let sha = hex(&Sha256::digest(&bytes));
    let named = archive.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if named.len() == 64 && named != sha {
        return Err(EngineError::Input(format!(
            "backup {} is damaged: its content hashes to {sha}, not to its name",
            archive.display()
        )));
    }
    let _ = std::fs::remove_dir_all(into);
    std::fs::create_dir_all(into).map_err(io("creating the restore directory"))?;
    tar::Archive::new(bytes.as_slice())
        .unpack(into)
        .map_err(|e| {
            EngineError::Input(format!("cannot unpack backup {}: {e}", archive.display()))
        })?;
    read_manifest(
        into,
        &format!("{} is not a OneCommons backup", archive.display()),
    )
}

/// The manifest of an unpacked backup, or of a copy built for a move, at
/// `dir`; `what` says what it is not when it has none.
pub(crate) fn read_manifest(dir: &Path, what: &str) -> Result<Manifest, EngineError> {
    let manifest: Manifest = std::fs::read(dir.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| EngineError::Input(format!("{what} (no manifest)")))?;
    if manifest.format != FORMAT {
        return Err(EngineError::Input(format!(
            "unknown backup format {:?}",
            manifest.format
        )));
    }
    Ok(manifest)
}

/// Loads a dumped database into a restored component's database, as its
/// own role; the dump's backslash commands are refused (it may come from
/// another machine).
pub(crate) fn load_database(app_url: &str, dump: &Path) -> Result<(), EngineError> {
    pgtools::load(&Conn::parse(app_url)?, dump)
}

/// Puts a directory tree in place (restoring data and volumes): renamed
/// when it can be — a copy built for a move is gigabytes, and is not needed
/// where it was — copied otherwise. `from` is consumed either way.
pub(crate) fn move_tree(from: &Path, to: &Path) -> Result<(), EngineError> {
    if !from.is_dir() {
        return Ok(());
    }
    // An empty directory in the way is replaced; anything else is merged into.
    let _ = std::fs::remove_dir(to);
    if !to.exists() {
        if let Some(parent) = to.parent() {
            commons_runtime::layout::private_dir(parent)
                .map_err(io(format!("creating {}", parent.display())))?;
        }
        if std::fs::rename(from, to).is_ok() {
            return Ok(());
        }
    }
    copy_tree(from, to)
}

/// Copies a directory tree; links are made again as links, never followed.
pub(crate) fn copy_tree(from: &Path, to: &Path) -> Result<(), EngineError> {
    if !from.is_dir() {
        return Ok(());
    }
    let mut todo = vec![(from.to_path_buf(), to.to_path_buf())];
    while let Some((src, dst)) = todo.pop() {
        commons_runtime::layout::private_dir(&dst)
            .map_err(io(format!("creating {}", dst.display())))?;
        for e in std::fs::read_dir(&src)
            .map_err(io(format!("reading {}", src.display())))?
            .flatten()
        {
            let (s, d) = (e.path(), dst.join(e.file_name()));
            let kind = e
                .file_type()
                .map_err(io(format!("reading {}", s.display())))?;
            if kind.is_dir() {
                todo.push((s, d));
            } else if kind.is_symlink() {
                let target =
                    std::fs::read_link(&s).map_err(io(format!("reading {}", s.display())))?;
                let _ = std::fs::remove_file(&d);
                std::os::unix::fs::symlink(target, &d)
                    .map_err(io(format!("restoring {}", d.display())))?;
            } else {
                std::fs::copy(&s, &d).map_err(io(format!("restoring {}", d.display())))?;
            }
        }
    }
    Ok(())
}
