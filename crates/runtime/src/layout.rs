//! Where a deployment's files live under the data directory (`COMMONS_HOME`).

use std::path::{Path, PathBuf};

/// The data directory and the places in it.
#[derive(Debug, Clone)]
pub struct Layout {
    pub home: PathBuf,
}

impl Layout {
    pub fn new(home: impl Into<PathBuf>) -> Layout {
        Layout { home: home.into() }
    }

    pub fn state_db(&self) -> PathBuf {
        self.home.join("state.db")
    }

    pub fn deployment_dir(&self, deployment: &str) -> PathBuf {
        self.home.join("deployments").join(deployment)
    }

    /// The writable directory workloads get as `COMMONS_DATA_DIR`.
    pub fn data_dir(&self, deployment: &str) -> PathBuf {
        self.deployment_dir(deployment).join("data")
    }

    pub fn volume_dir(&self, deployment: &str, component: &str) -> PathBuf {
        self.deployment_dir(deployment)
            .join("volumes")
            .join(component)
    }

    pub fn sqlite_file(&self, deployment: &str, component: &str) -> PathBuf {
        self.data_dir(deployment)
            .join(format!("{component}.sqlite3"))
    }

    pub fn log_dir(&self, deployment: &str) -> PathBuf {
        self.deployment_dir(deployment).join("logs")
    }

    pub fn log_file(&self, deployment: &str, component: &str) -> PathBuf {
        self.log_dir(deployment).join(format!("{component}.log"))
    }

    pub fn pid_file(&self, deployment: &str, component: &str) -> PathBuf {
        self.deployment_dir(deployment)
            .join("run")
            .join(format!("{component}.pid"))
    }

    /// How the component's process last ended (see [`crate::exit`]).
    pub fn exit_file(&self, deployment: &str, component: &str) -> PathBuf {
        self.deployment_dir(deployment)
            .join("run")
            .join(format!("{component}.exit"))
    }

    /// The deployment's hosting plan (free, always-on), as its operator chose.
    pub fn hosting_file(&self, deployment: &str) -> PathBuf {
        self.deployment_dir(deployment).join("hosting.json")
    }

    pub fn records_dir(&self, deployment: &str) -> PathBuf {
        self.home.join("records").join(deployment)
    }

    pub fn secrets_file(&self, deployment: &str) -> PathBuf {
        self.home.join("secrets").join(format!("{deployment}.enc"))
    }

    pub fn secrets_key(&self) -> PathBuf {
        self.home.join("secrets").join("key")
    }

    /// What the gateway routes now and how many requests each upstream has
    /// in flight (written by `commons serve`, read before stopping a
    /// replaced instance).
    pub fn gateway_state(&self) -> PathBuf {
        self.home.join("gateway").join("upstreams.json")
    }

    /// The crash loops `commons serve`'s supervisor is waiting out.
    pub fn supervisor_state(&self) -> PathBuf {
        self.home.join("supervisor.json")
    }

    pub fn lock_file(&self, deployment: &str) -> PathBuf {
        self.home.join("locks").join(format!("{deployment}.lock"))
    }
}

/// Writes `bytes` to `path` whole, readable only by its owner: a temporary
/// file renamed over the old one, so a reader never sees half of it.
pub fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?
        .write_all(bytes)?;
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
