//! How the nodes' registry is kept on disk: a snapshot (`registry.json`)
//! and a journal of the entries changed since (`registry.journal`, one JSON
//! line per entry, synced before a change answers). A change costs the
//! entries it touched, not the whole registry — a placement among 5,000
//! sites writes one placement and one node's operations, not 5,000 — and
//! the journal is folded into a new snapshot every [`COMPACT_AFTER`] lines,
//! so its cost is spread. On open the journal is replayed (a torn last line,
//! from a crash mid-write, is ignored: its change never answered) and
//! folded in at once.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{CertRecord, JoinTokenRecord, NodeRecord, OpRecord, Placed, Registry};

/// Journal lines before a new snapshot.
const COMPACT_AFTER: usize = 4096;

/// An entry of the registry that changed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Key {
    Node(String),
    Token(String),
    Cert(String),
    Placement(String),
    /// A node's operations.
    Ops(String),
}

/// One journal line: an entry's new value, or its removal.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Line {
    Node {
        key: String,
        value: Option<NodeRecord>,
    },
    Token {
        key: String,
        value: Option<JoinTokenRecord>,
    },
    Cert {
        key: String,
        value: Option<CertRecord>,
    },
    Placement {
        key: String,
        value: Option<Box<Placed>>,
    },
    Ops {
        key: String,
        value: Option<Vec<OpRecord>>,
    },
}

fn set<V>(map: &mut std::collections::BTreeMap<String, V>, key: String, value: Option<V>) {
    match value {
        Some(v) => {
            map.insert(key, v);
        }
        None => {
            map.remove(&key);
        }
    }
}

impl Line {
    /// The entry's name where entries are kept by name: `KIND/KEY`.
    pub(super) fn name(&self) -> String {
        let (kind, key) = match self {
            Line::Node { key, .. } => ("node", key),
            Line::Token { key, .. } => ("token", key),
            Line::Cert { key, .. } => ("cert", key),
            Line::Placement { key, .. } => ("placement", key),
            Line::Ops { key, .. } => ("ops", key),
        };
        format!("{kind}/{key}")
    }

    /// The placement it sets (or removes: `Some(None)`), if it is one.
    pub(super) fn placement(&self) -> Option<(&str, Option<&Placed>)> {
        match self {
            Line::Placement { key, value } => Some((key, value.as_deref())),
            _ => None,
        }
    }

    /// The node whose operations it changes, if it does.
    pub(super) fn assigns(&self) -> Option<&str> {
        match self {
            Line::Ops { key, .. } => Some(key),
            _ => None,
        }
    }

    pub(super) fn of(reg: &Registry, key: &Key) -> Line {
        match key {
            Key::Node(k) => Line::Node {
                key: k.clone(),
                value: reg.nodes.get(k).cloned(),
            },
            Key::Token(k) => Line::Token {
                key: k.clone(),
                value: reg.join_tokens.get(k).cloned(),
            },
            Key::Cert(k) => Line::Cert {
                key: k.clone(),
                value: reg.certificates.get(k).cloned(),
            },
            Key::Placement(k) => Line::Placement {
                key: k.clone(),
                value: reg.placements.get(k).cloned().map(Box::new),
            },
            Key::Ops(k) => Line::Ops {
                key: k.clone(),
                value: reg.operations.get(k).cloned(),
            },
        }
    }

    pub(super) fn apply(self, reg: &mut Registry) {
        match self {
            Line::Node { key, value } => set(&mut reg.nodes, key, value),
            Line::Token { key, value } => set(&mut reg.join_tokens, key, value),
            Line::Cert { key, value } => set(&mut reg.certificates, key, value),
            Line::Placement { key, value } => set(&mut reg.placements, key, value.map(|p| *p)),
            Line::Ops { key, value } => set(&mut reg.operations, key, value),
        }
    }
}

/// The registry's files, and the journal open for appending.
pub(super) struct Journal {
    snapshot: PathBuf,
    path: PathBuf,
    file: std::fs::File,
    lines: usize,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

impl Journal {
    /// Reads the registry in `dir` (snapshot, then journal), and folds the
    /// journal into a new snapshot.
    pub(super) fn open(dir: &Path) -> Result<(Journal, Registry), String> {
        let snapshot = dir.join("registry.json");
        let path = dir.join("registry.journal");
        let mut reg: Registry = match std::fs::read(&snapshot) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| io(&snapshot)(e.into()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Registry::default(),
            Err(e) => return Err(io(&snapshot)(e)),
        };
        match std::fs::File::open(&path) {
            Ok(f) => {
                for line in std::io::BufReader::new(f).lines() {
                    let Ok(line) = line else { break };
                    // A torn line ends the journal: its change never answered.
                    let Ok(change) = serde_json::from_str::<Line>(&line) else {
                        break;
                    };
                    change.apply(&mut reg);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let mut journal = Journal {
            snapshot,
            path,
            file,
            lines: 0,
        };
        journal.compact(&reg)?;
        Ok((journal, reg))
    }

    /// Writes the whole registry as the snapshot and empties the journal.
    pub(super) fn compact(&mut self, reg: &Registry) -> Result<(), String> {
        let bytes = serde_json::to_vec(reg).map_err(|e| e.to_string())?;
        commons_files::write_durable(&self.snapshot, &bytes).map_err(io(&self.snapshot))?;
        self.file.set_len(0).map_err(io(&self.path))?;
        self.file.sync_all().map_err(io(&self.path))?;
        self.lines = 0;
        Ok(())
    }

    /// Records the entries `changed` as they are now in `reg`, synced.
    pub(super) fn record(&mut self, reg: &Registry, changed: &[Key]) -> Result<(), String> {
        if self.lines + changed.len() > COMPACT_AFTER {
            return self.compact(reg);
        }
        let mut buf = Vec::new();
        for key in changed {
            serde_json::to_writer(&mut buf, &Line::of(reg, key)).map_err(|e| e.to_string())?;
            buf.push(b'\n');
        }
        self.file.write_all(&buf).map_err(io(&self.path))?;
        self.file.sync_data().map_err(io(&self.path))?;
        self.lines += changed.len();
        // The test suite checks every change against what a restart reads.
        #[cfg(debug_assertions)]
        {
            let dir = self.path.parent().expect("in a directory");
            let read = Self::read_only(dir)?;
            let (now, then) = (serde_json::to_value(reg), serde_json::to_value(&read));
            assert_eq!(
                now.ok(),
                then.ok(),
                "the nodes' journal missed a change ({changed:?})"
            );
        }
        Ok(())
    }

    /// The registry as a restart would read it, changing nothing.
    #[cfg(debug_assertions)]
    fn read_only(dir: &Path) -> Result<Registry, String> {
        let snapshot = dir.join("registry.json");
        let mut reg: Registry =
            serde_json::from_slice(&std::fs::read(&snapshot).map_err(io(&snapshot))?)
                .map_err(|e| e.to_string())?;
        let path = dir.join("registry.journal");
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        for line in text.lines() {
            if let Ok(change) = serde_json::from_str::<Line>(line) {
                change.apply(&mut reg);
            }
        }
        Ok(reg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: &str) -> JoinTokenRecord {
        JoinTokenRecord {
            id: id.into(),
            org: "acme".into(),
            created_by: "op".into(),
            expires_at_ms: 1,
            used_by: None,
        }
    }

    #[test]
    fn a_restart_reads_every_recorded_change_and_ignores_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("commons-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (mut journal, mut reg) = Journal::open(&dir).unwrap();
        reg.join_tokens.insert("a".into(), token("a"));
        reg.join_tokens.insert("b".into(), token("b"));
        journal
            .record(&reg, &[Key::Token("a".into()), Key::Token("b".into())])
            .unwrap();
        reg.join_tokens.remove("a");
        reg.join_tokens.get_mut("b").unwrap().used_by = Some("node-1".into());
        journal
            .record(&reg, &[Key::Token("a".into()), Key::Token("b".into())])
            .unwrap();
        // Only the journal holds them: the snapshot is still empty.
        let snapshot: Registry =
            serde_json::from_slice(&std::fs::read(dir.join("registry.json")).unwrap()).unwrap();
        assert!(snapshot.join_tokens.is_empty());
        // A crash mid-write leaves a torn line.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("registry.journal"))
            .unwrap();
        f.write_all(br#"{"kind":"token","key":"c","val"#).unwrap();
        drop((journal, f));
        let (_, again) = Journal::open(&dir).unwrap();
        assert_eq!(again.join_tokens.len(), 1);
        assert_eq!(again.join_tokens["b"].used_by.as_deref(), Some("node-1"));
        // Folded into the snapshot on open.
        assert_eq!(
            std::fs::metadata(dir.join("registry.journal"))
                .unwrap()
                .len(),
            0
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
