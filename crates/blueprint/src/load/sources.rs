//! Where blueprint files come from: the `Sources` trait and its three
//! kinds — the filesystem, the filesystem confined to one directory (a
//! blueprint someone uploaded), and memory (tests, the schema's examples).

use super::*;

/// Where blueprint files come from. The blueprint crate does no I/O itself.
pub trait Sources {
    fn read(&self, path: &Path) -> std::io::Result<String>;
    fn is_dir(&self, path: &Path) -> bool;
    /// Whether a blueprint may refer to `path` (an include or a static
    /// directory); `Err` says why not and what to do instead.
    fn allows(&self, _path: &Path) -> Result<(), String> {
        Ok(())
    }
}

/// The filesystem below one directory only: what a blueprint that came
/// from someone else (through the API) may refer to. Paths are compared
/// after `..` is resolved and symbolic links are followed.
pub struct Confined {
    pub root: PathBuf,
}

impl Confined {
    fn inside(&self, path: &Path) -> bool {
        let lexical = normalize(path);
        if !lexical.starts_with(&self.root) {
            return false;
        }
        // Where it exists, where it really is (a link may lead out).
        match (
            std::fs::canonicalize(&lexical),
            std::fs::canonicalize(&self.root),
        ) {
            (Ok(real), Ok(root)) => real.starts_with(root),
            (Err(_), _) => true,
            (Ok(_), Err(_)) => false,
        }
    }
}

impl Sources for Confined {
    fn read(&self, path: &Path) -> std::io::Result<String> {
        if !self.inside(path) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "outside the blueprint's own directory",
            ));
        }
        FileSystem.read(path)
    }
    fn is_dir(&self, path: &Path) -> bool {
        self.inside(path) && FileSystem.is_dir(path)
    }
    fn allows(&self, path: &Path) -> Result<(), String> {
        if self.inside(path) {
            Ok(())
        } else {
            Err("send it with the blueprint, inside its directory (`source.files`)".into())
        }
    }
}

/// Reads blueprints from the local filesystem.
pub struct FileSystem;

impl Sources for FileSystem {
    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
}

/// Blueprint files held in memory (tests, fuzzing, records).
#[derive(Default)]
pub struct InMemory(pub HashMap<PathBuf, String>);

impl Sources for InMemory {
    fn read(&self, path: &Path) -> std::io::Result<String> {
        self.0
            .get(path)
            .cloned()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))
    }
    fn is_dir(&self, path: &Path) -> bool {
        let prefix = path.to_path_buf();
        self.0
            .keys()
            .any(|k| k.starts_with(&prefix) && k != &prefix)
    }
}

/// `path` with `.` and `..` resolved lexically (no filesystem access).
pub fn normalize(path: &Path) -> PathBuf {
    use std::path::Component as C;
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            C::CurDir => {}
            C::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}
