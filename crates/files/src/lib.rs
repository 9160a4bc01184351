//! Files the platform keeps to itself: directories only their owner can
//! enter (0700), and files only their owner can read (0600), written whole
//! — a temporary file renamed over the old one, so a reader never sees
//! half of it — and, for what a crash must not lose, on disk before they
//! replace the old one. Every crate that keeps keys, tokens or state in
//! the data directory writes them here.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` whole, readable only by its owner. For state
/// rewritten often (what the gateway routes, crash loops); see
/// [`write_durable`] for what must survive a crash.
pub fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_private(path, bytes, false)
}

/// [`write_whole`], with the file on disk before it replaces the old one:
/// for keys, tokens, certificates and sealed secrets.
pub fn write_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_private(path, bytes, true)
}

fn write_private(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    if durable {
        f.sync_all()?;
    }
    std::fs::rename(tmp, path)
}

/// Creates `dir` (and parents) readable only by its owner.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn written_files_and_made_directories_are_the_owners_alone() {
        let root = std::env::temp_dir().join(format!("commons-files-{}", std::process::id()));
        let dir = root.join("a/b");
        private_dir(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let file = dir.join("key");
        write_durable(&file, b"first").unwrap();
        write_whole(&file, b"second").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"second");
        assert_eq!(mode(&file), 0o600);
        // No temporary file is left beside it.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["key"]);
        let _ = std::fs::remove_dir_all(&root);
    }
}
