//! Which sites run on which cluster: one small file per site, so `status`
//! and `destroy` find a site's cluster again without asking every one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A site on a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub site: String,
    pub namespace: String,
    /// The kubeconfig the cluster was reached with.
    pub kubeconfig: PathBuf,
}

/// The placements kept in one directory (`NAME.json`, owner-only).
pub struct Placements {
    dir: PathBuf,
}

impl Placements {
    pub fn new(dir: impl Into<PathBuf>) -> Placements {
        Placements { dir: dir.into() }
    }

    fn file(&self, site: &str) -> PathBuf {
        self.dir.join(format!("{site}.json"))
    }

    /// The site's placement, if it runs on a cluster.
    pub fn get(&self, site: &str) -> std::io::Result<Option<Placement>> {
        match std::fs::read(self.file(site)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, placement: &Placement) -> std::io::Result<()> {
        commons_files::private_dir(&self.dir)?;
        let bytes = serde_json::to_vec_pretty(placement).expect("a placement serialises");
        commons_files::write_whole(&self.file(&placement.site), &bytes)
    }

    pub fn remove(&self, site: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.file(site)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every placement, by site name.
    pub fn list(&self) -> std::io::Result<Vec<Placement>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let path = entry?.path();
            let site = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            if path.extension().is_some_and(|e| e == "json") {
                if let Some(p) = self.get(&site)? {
                    out.push(p);
                }
            }
        }
        out.sort_by(|a, b| a.site.cmp(&b.site));
        Ok(out)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
