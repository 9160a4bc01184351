//! `data:` — the DataCommons collections an app reads and writes, each with
//! its sharing class, Lexicon schema file and purpose. The schema is read
//! here and checked for its shape (a JSON object whose `id` is the
//! collection); DataCommons checks the Lexicon itself when the site is
//! deployed.

use super::*;
use crate::model::{DataAccess, DataClass, DataCollection};

const DATA_FIELDS: &[&str] = &[
    "class", "licence", "schema", "purpose", "access", "fields", "index",
];

impl Loader<'_> {
    pub(super) fn data(
        &mut self,
        file: &Path,
        dir: &Path,
        node: &Node,
    ) -> IndexMap<String, DataCollection> {
        let mut out = IndexMap::new();
        for (nsid, pos, value) in self.named(file, node, "data") {
            if !looks_like_nsid(nsid) {
                self.sink(file).error_help(
                    pos,
                    format!("\"{nsid}\" is not a collection name (an NSID)"),
                    "name collections by a domain you control, reversed, then a name: `org.example.notes.note`",
                );
                continue;
            }
            if let Some(c) = self.collection(file, dir, nsid, pos, value) {
                out.insert(nsid.to_string(), c);
            }
        }
        out
    }

    fn collection(
        &mut self,
        file: &Path,
        dir: &Path,
        nsid: &str,
        pos: Pos,
        node: &Node,
    ) -> Option<DataCollection> {
        let what = format!("data.{nsid}");
        let f = self.fields(file, node, DATA_FIELDS, &what)?;
        let errors_before = self.diags.len();
        let class = match f.get("class") {
            None => {
                self.sink(file).error_help(
                    pos,
                    format!("{what} needs a `class`"),
                    "one of `public` (plaintext, with a licence), `personal` (encrypted, shared by the owner) or `private` (encrypted, fields released only as declared)",
                );
                None
            }
            Some(n) => match self.string(file, n, "class")?.as_str() {
                "public" => Some(DataClass::Public),
                "personal" => Some(DataClass::Personal),
                "private" => Some(DataClass::Private),
                other => {
                    self.sink(file).error_help(
                        n.pos,
                        format!("unknown class \"{other}\""),
                        "one of `public`, `personal` or `private`",
                    );
                    None
                }
            },
        };
        let licence = f
            .get("licence")
            .and_then(|n| self.string(file, n, "licence"));
        match (class, &licence) {
            (Some(DataClass::Public), None) => self.sink(file).error_help(
                pos,
                format!("the public collection {nsid} needs a `licence`"),
                "name an SPDX licence its records are published under, e.g. `licence: CC-BY-4.0`",
            ),
            (Some(DataClass::Personal | DataClass::Private), Some(_)) => {
                self.sink(file).error_help(
                    f.key_pos("licence").unwrap_or(pos),
                    "only public collections carry a licence",
                    "remove `licence:`, or make the collection `class: public`",
                )
            }
            _ => {}
        }
        let purpose = match f.get("purpose") {
            Some(n) => self
                .string(file, n, "purpose")
                .filter(|p| !p.trim().is_empty()),
            None => None,
        };
        if purpose.is_none() {
            self.sink(file).error_help(
                f.key_pos("purpose").unwrap_or(pos),
                format!("{what} needs a `purpose`"),
                "say why the app needs this data; users read it on the consent screen",
            );
        }
        let mut access = DataAccess {
            read: true,
            write: true,
        };
        if let Some(n) = f.get("access") {
            access = DataAccess {
                read: false,
                write: false,
            };
            for (word, at) in self.words(file, n, "access") {
                match word.as_str() {
                    "read" => access.read = true,
                    "write" => access.write = true,
                    other => self.sink(file).error_help(
                        at,
                        format!("unknown access \"{other}\""),
                        "write `access: [read]`, `[write]` or `[read, write]`",
                    ),
                }
            }
        }
        let fields = f.get("fields").map(|n| {
            self.words(file, n, "fields")
                .into_iter()
                .map(|(w, _)| w)
                .collect()
        });
        let index = f
            .get("index")
            .map(|n| {
                self.words(file, n, "index")
                    .into_iter()
                    .map(|(w, _)| w)
                    .collect()
            })
            .unwrap_or_default();
        let (schema, schema_file) = match f.get("schema") {
            None => {
                self.sink(file).error_help(
                    pos,
                    format!("{what} needs a `schema`"),
                    "point it at a Lexicon JSON file beside the blueprint, e.g. `schema: schemas/note.json`",
                );
                (None, None)
            }
            Some(n) => match self.lexicon_file(file, dir, nsid, n) {
                Some((doc, path)) => (Some(doc), Some(path)),
                None => (None, None),
            },
        };
        if self.diags.len() > errors_before {
            return None;
        }
        Some(DataCollection {
            class: class?,
            licence,
            schema: schema?,
            schema_file: schema_file?,
            purpose: purpose?,
            access,
            fields,
            index,
        })
    }

    /// A list of plain words with their positions.
    fn words(&mut self, file: &Path, node: &Node, what: &str) -> Vec<(String, Pos)> {
        let items: Vec<&Node> = match &node.kind {
            NodeKind::Seq(items) => items.iter().collect(),
            _ => {
                self.sink(file).error_help(
                    node.pos,
                    format!("`{what}` must be a list"),
                    format!("write `{what}: [a, b]`"),
                );
                return Vec::new();
            }
        };
        items
            .into_iter()
            .filter_map(|item| Some((self.string(file, item, what)?, item.pos)))
            .collect()
    }

    fn lexicon_file(
        &mut self,
        file: &Path,
        dir: &Path,
        nsid: &str,
        node: &Node,
    ) -> Option<(serde_json::Value, PathBuf)> {
        let p = self.string(file, node, "schema")?;
        let path = normalize(&dir.join(&p));
        if let Err(help) = self.sources.allows(&path) {
            self.sink(file).error_help(
                node.pos,
                format!("schema \"{p}\" is outside the blueprint's directory"),
                help,
            );
            return None;
        }
        let text = match self.sources.read(&path) {
            Ok(t) => t,
            Err(e) => {
                self.sink(file).error_help(
                    node.pos,
                    format!("cannot read schema {}: {e}", path.display()),
                    "fix the path (relative to the blueprint) or create the Lexicon file",
                );
                return None;
            }
        };
        self.files.push(path.clone());
        let doc: serde_json::Value = match serde_json::from_str(&text) {
            Ok(d) => d,
            Err(e) => {
                let at = Pos {
                    line: e.line().max(1),
                    col: e.column().max(1),
                    offset: 0,
                };
                self.sink(&path).error_help(
                    at,
                    format!("the schema is not JSON: {e}"),
                    "a Lexicon schema is a JSON document: {\"lexicon\": 1, \"id\": ..., \"defs\": {...}}",
                );
                return None;
            }
        };
        if doc.get("id").and_then(|v| v.as_str()) != Some(nsid) {
            self.sink(file).error_help(
                node.pos,
                format!("the schema's \"id\" must be \"{nsid}\", the collection it describes"),
                format!("set \"id\": \"{nsid}\" in {}", path.display()),
            );
            return None;
        }
        Some((doc, path))
    }
}

/// Three or more dot-separated segments of letters, digits and hyphens.
fn looks_like_nsid(s: &str) -> bool {
    let segments: Vec<&str> = s.split('.').collect();
    segments.len() >= 3
        && s.len() <= 317
        && segments.iter().all(|seg| {
            !seg.is_empty()
                && seg.len() <= 63
                && seg.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && segments[segments.len() - 1]
            .chars()
            .all(|c| c.is_ascii_alphanumeric())
        && segments[0].starts_with(|c: char| c.is_ascii_alphabetic())
}
