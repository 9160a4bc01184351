//! The catalog: curated blueprints of real open-source applications, each
//! deployable with `commons deploy catalog:NAME`. The blueprints live in the
//! repository's `catalog/` directory and are built into the binary; each
//! names its upstream project (`project:`) and what that project builds on
//! (`depends_on_projects:`), which period close pays.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// One application of the catalog.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Entry {
    pub name: &'static str,
    /// What it is, in a line.
    pub summary: &'static str,
    /// The upstream project (the blueprint's `project:`).
    pub project: &'static str,
    /// Where it is installed from.
    pub source: &'static str,
    #[serde(skip)]
    pub blueprint: &'static str,
    /// Files beside the blueprint (path relative to it, content): an app
    /// of the platform's own, shipped with its blueprint.
    #[serde(skip)]
    pub files: &'static [(&'static str, &'static str)],
}

pub const ENTRIES: &[Entry] = &[
    Entry {
        name: "datasette",
        summary: "explore and publish a SQLite database as a website and a JSON API",
        project: "datasette.io",
        source: "PyPI: datasette",
        blueprint: include_str!("../../../catalog/datasette.yaml"),
        files: &[],
    },
    Entry {
        name: "json-server",
        summary: "a REST API over a JSON file (Node.js)",
        project: "github.com/typicode/json-server",
        source: "npm: json-server",
        blueprint: include_str!("../../../catalog/json-server.yaml"),
        files: &[],
    },
    Entry {
        name: "mkdocs",
        summary: "a documentation site built from Markdown, served static",
        project: "mkdocs.org",
        source: "PyPI: mkdocs",
        blueprint: include_str!("../../../catalog/mkdocs.yaml"),
        files: &[],
    },
    Entry {
        name: "notes",
        summary: "notes kept in each user's own DataCommons repository, with their consent",
        project: "onecommons.org/notes",
        source: "this repository (Python's standard library)",
        blueprint: include_str!("../../../catalog/notes.yaml"),
        files: &[
            ("app.py", include_str!("../../../catalog/notes/app.py")),
            (
                "schemas/note.json",
                include_str!("../../../catalog/notes/schemas/note.json"),
            ),
        ],
    },
    Entry {
        name: "prometheus",
        summary: "metrics collection and querying, with an expression browser and an HTTP API",
        project: "prometheus.io",
        source: "image: docker.io/prom/prometheus",
        blueprint: include_str!("../../../catalog/prometheus.yaml"),
        files: &[],
    },
    Entry {
        name: "radicale",
        summary: "a CalDAV and CardDAV server for calendars and contacts",
        project: "radicale.org",
        source: "PyPI: Radicale",
        blueprint: include_str!("../../../catalog/radicale.yaml"),
        files: &[],
    },
    Entry {
        name: "rclone",
        summary: "a WebDAV server for your files, from any WebDAV client",
        project: "rclone.org",
        source: "image: docker.io/rclone/rclone",
        blueprint: include_str!("../../../catalog/rclone.yaml"),
        files: &[],
    },
];

/// What a deploy target names when it starts with this.
pub const PREFIX: &str = "catalog:";

pub fn find(name: &str) -> Option<&'static Entry> {
    ENTRIES.iter().find(|e| e.name == name)
}

/// Writes the entry's blueprint to `HOME/catalog/NAME/commons.yaml` (as this
/// build of the catalog has it), and its files beside it, and returns that
/// path, for the engine to deploy like any blueprint file.
pub fn materialize(home: &Path, name: &str) -> Result<PathBuf, String> {
    let entry = find(name).ok_or_else(|| {
        let names: Vec<&str> = ENTRIES.iter().map(|e| e.name).collect();
        format!(
            "the catalog has no \"{name}\"; it has {} (`commons catalog` lists them)",
            names.join(", ")
        )
    })?;
    let dir = commons_runtime::Layout::new(home).catalog_dir(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = dir.join(commons_blueprint::FILE_NAME);
    if std::fs::read_to_string(&path).ok().as_deref() != Some(entry.blueprint) {
        std::fs::write(&path, entry.blueprint)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    for (rel, content) in entry.files {
        let file = dir.join(rel);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        if std::fs::read_to_string(&file).ok().as_deref() != Some(*content) {
            std::fs::write(&file, content)
                .map_err(|e| format!("writing {}: {e}", file.display()))?;
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_is_a_valid_blueprint_that_names_its_project() {
        let dir = std::env::temp_dir().join(format!("commons-catalog-{}", std::process::id()));
        for e in ENTRIES {
            let path = materialize(&dir, e.name).unwrap();
            let bp = commons_blueprint::load(&path, &commons_blueprint::FileSystem)
                .unwrap_or_else(|d| panic!("{}: {d:?}", e.name));
            assert_eq!(bp.name, e.name);
            assert_eq!(bp.project.as_deref(), Some(e.project), "{}", e.name);
            assert!(!bp.depends_on_projects.is_empty(), "{}", e.name);
            assert!(bp
                .components
                .values()
                .any(|c| commons_blueprint::Kind::runs(c.kind.keyword())));
        }
        assert!(materialize(&dir, "nope").unwrap_err().contains("datasette"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
