//! From YAML text to a validated, flattened [`Blueprint`], reporting every
//! problem at once.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use indexmap::IndexMap;

use crate::diag::{did_you_mean, Diagnostic, Diagnostics, Sink};
use crate::graph::topo_order;
use crate::model::*;
use crate::template::{Ref, Template};
use crate::yaml::{self, Node, NodeKind, Pos, Style};

/// The file name looked for when a directory is given.
pub const FILE_NAME: &str = "commons.yaml";

/// Fields of the top level of a blueprint.
pub const TOP_FIELDS: &[&str] = &[
    "name",
    "version",
    "project",
    "description",
    "depends_on_projects",
    "inputs",
    "secrets",
    "outputs",
    "components",
];
/// Keywords that say what a component is; each component has exactly one.
pub const KIND_FIELDS: &[&str] = &[
    "job",
    "process",
    "static",
    "postgres",
    "sqlite",
    "volume",
    "blueprint",
];
/// Fields any component may have besides its kind.
pub const COMMON_FIELDS: &[&str] = &[
    "after",
    "env",
    "health",
    "route",
    "resources",
    "timeout",
    "retries",
    "replace",
    "with",
    "description",
];
pub const INPUT_FIELDS: &[&str] = &["type", "default", "description"];
pub const SECRET_FIELDS: &[&str] = &["generate", "from_env", "description"];
pub const HEALTH_FIELDS: &[&str] = &["http", "timeout", "interval"];
pub const ROUTE_FIELDS: &[&str] = &[
    "host",
    "path",
    "login",
    "max_body",
    "max_header",
    "response_timeout",
    "user_header",
];
/// The largest request head the gateway reads; a route may only lower it.
pub const GATEWAY_MAX_HEADER: u64 = 64 << 10;
/// The longest a route may let its app take to answer.
pub const MAX_RESPONSE_TIMEOUT_MS: u64 = 3_600_000;

/// Headers the gateway itself sets or relies on: a route cannot hand the
/// signed-in user to an app in one of them.
const GATEWAY_HEADERS: &[&str] = &[
    "host",
    "authorization",
    "cookie",
    "forwarded",
    "connection",
    "upgrade",
    "content-length",
    "transfer-encoding",
    "te",
    "trailer",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
];
pub const RESOURCE_FIELDS: &[&str] = &["memory", "cpu", "pids"];
pub const PROJECT_DEP_FIELDS: &[&str] = &["project", "weight"];

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

/// Loads the blueprint at `path` (a file, or a directory holding `commons.yaml`).
pub fn load(path: &Path, sources: &dyn Sources) -> Result<Blueprint, Diagnostics> {
    let path = normalize(path);
    let path = if sources.is_dir(&path) {
        path.join(FILE_NAME)
    } else {
        path
    };
    let mut diags = Vec::new();
    let mut loader = Loader {
        sources,
        diags: &mut diags,
        stack: Vec::new(),
        files: Vec::new(),
    };
    let raw = loader.load_file(&path, None);
    let files = std::mem::take(&mut loader.files);
    let result = match raw {
        Some(raw) if diags.is_empty() => flatten_root(&raw, files, &mut diags),
        _ => None,
    };
    match result {
        Some(bp) if diags.is_empty() => Ok(bp),
        _ => {
            if diags.is_empty() {
                // Defensive: a failure must always say why.
                diags.push(Diagnostic {
                    file: path,
                    line: 1,
                    column: 1,
                    offset: 0,
                    message: "blueprint could not be loaded".into(),
                    help: None,
                });
            }
            sort(&mut diags);
            Err(Diagnostics(diags))
        }
    }
}

/// Loads a blueprint from text; included blueprints are read from the filesystem.
pub fn load_str(file: &Path, text: &str) -> Result<Blueprint, Diagnostics> {
    struct One<'a> {
        file: &'a Path,
        text: &'a str,
    }
    impl Sources for One<'_> {
        fn read(&self, path: &Path) -> std::io::Result<String> {
            if path == self.file {
                Ok(self.text.to_string())
            } else {
                FileSystem.read(path)
            }
        }
        fn is_dir(&self, path: &Path) -> bool {
            path != self.file && FileSystem.is_dir(path)
        }
    }
    load(file, &One { file, text })
}

fn sort(diags: &mut [Diagnostic]) {
    diags.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
}

/// One blueprint file, validated within its own scope, includes loaded.
struct Raw {
    file: PathBuf,
    dir: PathBuf,
    name: String,
    version: String,
    project: Option<String>,
    description: Option<String>,
    depends_on_projects: Vec<ProjectDependency>,
    inputs: IndexMap<String, InputSpec>,
    secrets: IndexMap<String, SecretSpec>,
    outputs: IndexMap<String, Template>,
    components: IndexMap<String, RawComponent>,
}

struct RawComponent {
    pos: Pos,
    kind: RawKind,
    after: Vec<String>,
    env: IndexMap<String, Template>,
    health: Option<Health>,
    route: Option<Route>,
    resources: Resources,
    timeout_ms: Option<u64>,
    retries: u32,
    replace: Option<Replace>,
}

enum RawKind {
    Plain(Kind),
    Include {
        with: IndexMap<String, Template>,
        blueprint: Box<Raw>,
    },
}

struct Loader<'a> {
    sources: &'a dyn Sources,
    diags: &'a mut Vec<Diagnostic>,
    /// Files being loaded, to refuse an include cycle.
    stack: Vec<PathBuf>,
    files: Vec<PathBuf>,
}

/// Reads the fields of one YAML map, reporting unknown and duplicate keys.
struct Fields<'n> {
    entries: Vec<(&'n str, &'n Node, &'n Node)>,
}

impl<'n> Fields<'n> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, v)| *v)
    }
    fn key_pos(&self, key: &str) -> Option<Pos> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, k, _)| k.pos)
    }
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some('a'..='z'))
        && c.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.len() <= 63
}

fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `10s`, `500ms`, `2m`, `1h`; a bare number is seconds.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = if split == 0 {
        return None;
    } else {
        s.split_at(split)
    };
    let n: f64 = num.parse().ok()?;
    let scale = match unit.trim() {
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    let ms = n * scale;
    (ms.is_finite() && (0.0..=1e13).contains(&ms)).then_some(ms as u64)
}

/// Parses `256Mi`, `1Gi`, `512M`, `1000000`.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let scale: u64 = match unit {
        "" => 1,
        "K" | "k" => 1000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(scale)
}

/// Parses `0.5`, `2`, `500m` into thousandths of a core.
pub fn parse_cpu_millis(s: &str) -> Option<u64> {
    let s = s.trim();
    let ms = if let Some(m) = s.strip_suffix('m') {
        m.parse::<u64>().ok()?
    } else {
        let f: f64 = s.parse().ok()?;
        if !(f.is_finite() && f > 0.0 && f <= 1e6) {
            return None;
        }
        (f * 1000.0).round() as u64
    };
    (ms > 0).then_some(ms)
}

/// A YAML value as JSON: plain scalars typed as YAML 1.2 core types.
pub fn to_json(node: &Node) -> serde_json::Value {
    use serde_json::Value as V;
    match &node.kind {
        NodeKind::Scalar(s, Style::Plain) => {
            if node.is_null() {
                V::Null
            } else if s == "true" {
                V::Bool(true)
            } else if s == "false" {
                V::Bool(false)
            } else if let Ok(i) = s.parse::<i64>() {
                V::from(i)
            } else if let Some(f) = s.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
                V::Number(f)
            } else {
                V::String(s.clone())
            }
        }
        NodeKind::Scalar(s, _) => V::String(s.clone()),
        NodeKind::Seq(items) => V::Array(items.iter().map(to_json).collect()),
        NodeKind::Map(entries) => V::Object(
            entries
                .iter()
                .map(|(k, v)| (k.as_str().unwrap_or("").to_string(), to_json(v)))
                .collect(),
        ),
    }
}

impl<'a> Loader<'a> {
    fn sink(&mut self, file: &Path) -> Sink<'_> {
        Sink {
            file: file.to_path_buf(),
            out: self.diags,
        }
    }

    /// Loads one file. `from` is the file and position that included it.
    fn load_file(&mut self, path: &Path, from: Option<(&Path, Pos)>) -> Option<Raw> {
        let text = match self.sources.read(path) {
            Ok(t) => t,
            Err(e) => {
                let (file, pos) = match from {
                    Some((f, p)) => (f.to_path_buf(), p),
                    None => (
                        path.to_path_buf(),
                        Pos {
                            line: 1,
                            col: 1,
                            offset: 0,
                        },
                    ),
                };
                let help = if from.is_some() {
                    "point `blueprint:` at a directory holding commons.yaml, or at a blueprint file"
                } else {
                    "run `commons init` to create one, or pass the path of a blueprint"
                };
                self.sink(&file).error_help(
                    pos,
                    format!("cannot read blueprint {}: {e}", path.display()),
                    help,
                );
                return None;
            }
        };
        self.files.push(path.to_path_buf());
        let root = match yaml::parse(&text) {
            Ok(Some(root)) => root,
            Ok(None) => {
                self.sink(path).error_help(
                    Pos {
                        line: 1,
                        col: 1,
                        offset: 0,
                    },
                    "the blueprint is empty",
                    "add at least `name:` and `components:`",
                );
                return None;
            }
            Err(e) => {
                self.sink(path)
                    .error(e.pos, format!("YAML syntax error: {}", e.message));
                return None;
            }
        };
        self.stack.push(path.to_path_buf());
        let raw = self.blueprint(path, &root);
        self.stack.pop();
        raw
    }

    fn fields<'n>(
        &mut self,
        file: &Path,
        node: &'n Node,
        allowed: &[&str],
        what: &str,
    ) -> Option<Fields<'n>> {
        let NodeKind::Map(entries) = &node.kind else {
            self.sink(file).error(
                node.pos,
                format!("{what} must be a map, found {}", node.describe()),
            );
            return None;
        };
        let mut out: Vec<(&str, &Node, &Node)> = Vec::new();
        for (k, v) in entries {
            let Some(key) = k.as_str() else {
                self.sink(file)
                    .error(k.pos, format!("keys in {what} must be plain words"));
                continue;
            };
            if !allowed.contains(&key) {
                let hint = did_you_mean(key, allowed.iter().copied());
                let help = format!("allowed fields: {}", allowed.join(", "));
                self.sink(file).error_help(
                    k.pos,
                    format!("unknown field \"{key}\" in {what}{hint}"),
                    help,
                );
                continue;
            }
            if out.iter().any(|(seen, _, _)| *seen == key) {
                self.sink(file).error_help(
                    k.pos,
                    format!("duplicate field \"{key}\" in {what}"),
                    "remove one of them",
                );
                continue;
            }
            out.push((key, k, v));
        }
        Some(Fields { entries: out })
    }

    /// Entries of a map whose keys are user-chosen names.
    fn named<'n>(
        &mut self,
        file: &Path,
        node: &'n Node,
        what: &str,
    ) -> Vec<(&'n str, Pos, &'n Node)> {
        if node.is_null() {
            return Vec::new();
        }
        let NodeKind::Map(entries) = &node.kind else {
            self.sink(file).error(
                node.pos,
                format!("{what} must be a map, found {}", node.describe()),
            );
            return Vec::new();
        };
        let mut out: Vec<(&str, Pos, &Node)> = Vec::with_capacity(entries.len());
        // A set, not a scan of `out`: a blueprint may name 50,000 components.
        let mut seen: std::collections::HashSet<&str> =
            std::collections::HashSet::with_capacity(entries.len());
        for (k, v) in entries {
            let Some(key) = k.as_str() else {
                self.sink(file)
                    .error(k.pos, format!("names in {what} must be plain words"));
                continue;
            };
            if !seen.insert(key) {
                self.sink(file).error_help(
                    k.pos,
                    format!("duplicate name \"{key}\" in {what}"),
                    "names must be unique; rename or remove one",
                );
                continue;
            }
            out.push((key, k.pos, v));
        }
        out
    }

    fn string(&mut self, file: &Path, node: &Node, what: &str) -> Option<String> {
        match &node.kind {
            NodeKind::Scalar(s, _) if !node.is_null() => Some(s.clone()),
            _ => {
                self.sink(file).error(
                    node.pos,
                    format!("{what} must be a string, found {}", node.describe()),
                );
                None
            }
        }
    }

    fn uint(&mut self, file: &Path, node: &Node, what: &str, max: u64) -> Option<u64> {
        match &node.kind {
            NodeKind::Scalar(s, Style::Plain) => match s.parse::<u64>() {
                Ok(n) if n <= max => Some(n),
                Ok(_) => {
                    self.sink(file)
                        .error(node.pos, format!("{what} must be at most {max}, found {s}"));
                    None
                }
                Err(_) => {
                    self.sink(file).error(
                        node.pos,
                        format!("{what} must be a whole number, found {}", node.describe()),
                    );
                    None
                }
            },
            _ => {
                self.sink(file).error(
                    node.pos,
                    format!("{what} must be a whole number, found {}", node.describe()),
                );
                None
            }
        }
    }

    fn duration(&mut self, file: &Path, node: &Node, what: &str) -> Option<u64> {
        let s = self.string(file, node, what)?;
        let parsed = parse_duration_ms(&s);
        if parsed.is_none() {
            self.sink(file).error_help(
                node.pos,
                format!("{what} \"{s}\" is not a duration"),
                "write a number and a unit: 500ms, 10s, 2m or 1h",
            );
        }
        parsed
    }

    fn template(
        &mut self,
        file: &Path,
        node: &Node,
        what: &str,
    ) -> Option<(Template, Vec<(Ref, Pos)>)> {
        let text = match &node.kind {
            NodeKind::Scalar(s, _) if !node.is_null() => s.clone(),
            _ => {
                self.sink(file).error(
                    node.pos,
                    format!("{what} must be a string, found {}", node.describe()),
                );
                return None;
            }
        };
        let at = |chars: usize| match &node.kind {
            NodeKind::Scalar(_, Style::Plain) if !text.contains('\n') => node.pos.shifted(chars),
            NodeKind::Scalar(_, Style::Quoted) if !text.contains('\n') => {
                node.pos.shifted(chars + 1)
            }
            _ => node.pos,
        };
        match Template::parse(&text) {
            Ok((t, located)) => {
                let refs = located
                    .into_iter()
                    .map(|l| (l.reference, at(l.at)))
                    .collect();
                Some((t, refs))
            }
            Err(e) => {
                let pos = at(e.at);
                match e.help {
                    Some(h) => self.sink(file).error_help(pos, e.message, h),
                    None => self.sink(file).error(pos, e.message),
                }
                None
            }
        }
    }

    fn blueprint(&mut self, file: &Path, root: &Node) -> Option<Raw> {
        let errors_before = self.diags.len();
        let f = self.fields(file, root, TOP_FIELDS, "the blueprint")?;
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();

        let name = match f.get("name") {
            Some(n) => {
                let name = self.string(file, n, "name").unwrap_or_default();
                if !name.is_empty() && !is_name(&name) {
                    self.sink(file).error_help(
                        n.pos,
                        format!("invalid name \"{name}\""),
                        "use lowercase letters, digits and '-', starting with a letter (at most 63)",
                    );
                }
                name
            }
            None => {
                self.sink(file).error_help(
                    root.pos,
                    "missing required field \"name\"",
                    "add `name: my-site` (lowercase letters, digits and '-')",
                );
                String::new()
            }
        };
        let version = match f.get("version") {
            Some(n) => {
                let v = self.string(file, n, "version").unwrap_or_default();
                if semver::Version::parse(&v).is_err() && !v.is_empty() {
                    self.sink(file).error_help(
                        n.pos,
                        format!("version \"{v}\" is not a semantic version"),
                        "write MAJOR.MINOR.PATCH, for example 0.1.0",
                    );
                }
                v
            }
            None => "0.0.0".to_string(),
        };
        let project = f
            .get("project")
            .and_then(|n| self.string(file, n, "project"));
        let description = f
            .get("description")
            .and_then(|n| self.string(file, n, "description"));
        let depends_on_projects = match f.get("depends_on_projects") {
            Some(n) => self.project_deps(file, n),
            None => Vec::new(),
        };

        let mut inputs = IndexMap::new();
        if let Some(n) = f.get("inputs") {
            for (key, pos, v) in self.named(file, n, "inputs") {
                if !is_identifier(key) {
                    self.sink(file).error_help(
                        pos,
                        format!("invalid input name \"{key}\""),
                        "use letters, digits and '_', starting with a letter",
                    );
                    continue;
                }
                if let Some(spec) = self.input(file, key, v) {
                    inputs.insert(key.to_string(), spec);
                }
            }
        }
        let mut secrets = IndexMap::new();
        if let Some(n) = f.get("secrets") {
            for (key, pos, v) in self.named(file, n, "secrets") {
                if !is_identifier(key) {
                    self.sink(file).error_help(
                        pos,
                        format!("invalid secret name \"{key}\""),
                        "use letters, digits and '_', starting with a letter",
                    );
                    continue;
                }
                if let Some(spec) = self.secret(file, key, v) {
                    secrets.insert(key.to_string(), spec);
                }
            }
        }

        let mut components = IndexMap::new();
        // References to check once every component is known: (ref, where).
        let mut refs: Vec<(Ref, Pos)> = Vec::new();
        let mut afters: Vec<(String, Pos)> = Vec::new();
        match f.get("components") {
            None => self.sink(file).error_help(
                root.pos,
                "missing required field \"components\"",
                "add `components:` with at least one component, for example `web: { process: \"...\" }`",
            ),
            Some(n) => {
                for (key, pos, v) in self.named(file, n, "components") {
                    if !is_name(key) {
                        self.sink(file).error_help(
                            pos,
                            format!("invalid component name \"{key}\""),
                            "use lowercase letters, digits and '-', starting with a letter",
                        );
                        continue;
                    }
                    let first_ref = refs.len();
                    let component = self.component(file, &dir, key, pos, v, &mut refs, &mut afters);
                    for (r, at) in &refs[first_ref..] {
                        if let Ref::Component { name, attr } = r {
                            if name == key {
                                let help = if attr == "port" {
                                    "a process reads its own port from $PORT".to_string()
                                } else {
                                    "a component cannot depend on itself".to_string()
                                };
                                self.sink(file).error_help(
                                    *at,
                                    format!("component \"{key}\" reads its own attribute \"{attr}\""),
                                    help,
                                );
                            }
                        }
                    }
                    if let Some(c) = component {
                        components.insert(key.to_string(), c);
                    }
                }
            }
        }

        let mut outputs = IndexMap::new();
        if let Some(n) = f.get("outputs") {
            for (key, pos, v) in self.named(file, n, "outputs") {
                if !is_identifier(key) {
                    self.sink(file)
                        .error(pos, format!("invalid output name \"{key}\""));
                    continue;
                }
                if let Some((t, r)) = self.template(file, v, "an output") {
                    refs.extend(r);
                    outputs.insert(key.to_string(), t);
                }
            }
        }

        // Scope checks: every reference names something that exists here.
        for (r, pos) in refs {
            self.check_ref(file, &r, pos, &inputs, &secrets, &components);
        }
        for (target, pos) in afters {
            if !components.contains_key(&target) {
                let hint = did_you_mean(&target, components.keys().map(String::as_str));
                self.sink(file).error(
                    pos,
                    format!("`after` names unknown component \"{target}\"{hint}"),
                );
            }
        }
        if self.diags.len() > errors_before {
            return None;
        }
        Some(Raw {
            file: file.to_path_buf(),
            dir,
            name,
            version,
            project,
            description,
            depends_on_projects,
            inputs,
            secrets,
            outputs,
            components,
        })
    }

    fn check_ref(
        &mut self,
        file: &Path,
        r: &Ref,
        pos: Pos,
        inputs: &IndexMap<String, InputSpec>,
        secrets: &IndexMap<String, SecretSpec>,
        components: &IndexMap<String, RawComponent>,
    ) {
        match r {
            Ref::Input { name } if !inputs.contains_key(name) => {
                let hint = did_you_mean(name, inputs.keys().map(String::as_str));
                self.sink(file).error_help(
                    pos,
                    format!("unknown input \"{name}\"{hint}"),
                    format!("declare it under `inputs:`, for example `{name}: {{ type: string }}`"),
                );
            }
            Ref::Secret { name } if !secrets.contains_key(name) => {
                let hint = did_you_mean(name, secrets.keys().map(String::as_str));
                self.sink(file).error_help(
                    pos,
                    format!("unknown secret \"{name}\"{hint}"),
                    format!(
                        "declare it under `secrets:`, for example `{name}: {{ generate: 32 }}`"
                    ),
                );
            }
            Ref::Component { name, attr } => match components.get(name) {
                None => {
                    let hint = did_you_mean(name, components.keys().map(String::as_str));
                    self.sink(file)
                        .error(pos, format!("unknown component \"{name}\"{hint}"));
                }
                Some(c) => {
                    let (kind, attrs): (&str, Vec<&str>) = match &c.kind {
                        RawKind::Plain(k) => (k.keyword(), Kind::attributes(k.keyword()).to_vec()),
                        RawKind::Include { blueprint, .. } => (
                            "blueprint",
                            blueprint.outputs.keys().map(String::as_str).collect(),
                        ),
                    };
                    if !attrs.contains(&attr.as_str()) {
                        let hint = did_you_mean(attr, attrs.iter().copied());
                        let help = if attrs.is_empty() {
                            format!("a {kind} component has no attributes to read")
                        } else {
                            format!("a {kind} component has: {}", attrs.join(", "))
                        };
                        self.sink(file).error_help(
                            pos,
                            format!("component \"{name}\" has no attribute \"{attr}\"{hint}"),
                            help,
                        );
                    }
                }
            },
            _ => {}
        }
    }

    fn project_deps(&mut self, file: &Path, node: &Node) -> Vec<ProjectDependency> {
        let NodeKind::Seq(items) = &node.kind else {
            self.sink(file).error(
                node.pos,
                format!(
                    "depends_on_projects must be a list, found {}",
                    node.describe()
                ),
            );
            return Vec::new();
        };
        let mut out: Vec<ProjectDependency> = Vec::new();
        for item in items {
            let dep = if let NodeKind::Scalar(..) = item.kind {
                self.string(file, item, "a project")
                    .map(|p| ProjectDependency {
                        project: p,
                        weight: 1,
                    })
            } else {
                let Some(f) = self.fields(file, item, PROJECT_DEP_FIELDS, "a project dependency")
                else {
                    continue;
                };
                let project = match f.get("project") {
                    Some(n) => self.string(file, n, "project"),
                    None => {
                        self.sink(file).error_help(
                            item.pos,
                            "missing required field \"project\"",
                            "write `{ project: example.org/lib, weight: 1 }`",
                        );
                        None
                    }
                };
                let weight = match f.get("weight") {
                    Some(n) => match self.uint(file, n, "weight", 1_000_000) {
                        Some(0) => {
                            self.sink(file).error(n.pos, "weight must be at least 1");
                            None
                        }
                        w => w.map(|w| w as u32),
                    },
                    None => Some(1),
                };
                project
                    .zip(weight)
                    .map(|(project, weight)| ProjectDependency { project, weight })
            };
            if let Some(dep) = dep {
                if out.iter().any(|d| d.project == dep.project) {
                    self.sink(file).error_help(
                        item.pos,
                        format!("project \"{}\" is listed twice", dep.project),
                        "list each project once and use `weight` to give it more",
                    );
                } else {
                    out.push(dep);
                }
            }
        }
        out
    }

    fn input(&mut self, file: &Path, key: &str, node: &Node) -> Option<InputSpec> {
        let f = self.fields(file, node, INPUT_FIELDS, &format!("input \"{key}\""))?;
        let default_node = f.get("default");
        let ty = match f.get("type") {
            Some(n) => {
                let s = self.string(file, n, "type")?;
                match InputType::NAMES.iter().position(|t| *t == s) {
                    Some(i) => [
                        InputType::String,
                        InputType::Int,
                        InputType::Bool,
                        InputType::List,
                        InputType::Map,
                    ][i],
                    None => {
                        let hint = did_you_mean(&s, InputType::NAMES);
                        self.sink(file).error_help(
                            n.pos,
                            format!("unknown input type \"{s}\"{hint}"),
                            format!("use one of {}", InputType::NAMES.join(", ")),
                        );
                        return None;
                    }
                }
            }
            // Without a type, the default's shape says it; else a string.
            None => match default_node.map(|d| &d.kind) {
                Some(NodeKind::Seq(_)) => InputType::List,
                Some(NodeKind::Map(_)) => InputType::Map,
                _ => match default_node.map(to_json) {
                    Some(serde_json::Value::Bool(_)) => InputType::Bool,
                    Some(v) if v.is_i64() => InputType::Int,
                    _ => InputType::String,
                },
            },
        };
        let default = match default_node {
            None => None,
            Some(d) => {
                let v = match (ty, &d.kind) {
                    // A string input takes any scalar as written: `default: 8080`.
                    (InputType::String, NodeKind::Scalar(s, _)) if !d.is_null() => {
                        serde_json::Value::String(s.clone())
                    }
                    _ => to_json(d),
                };
                if !ty.accepts(&v) {
                    self.sink(file).error_help(
                        d.pos,
                        format!(
                            "default of input \"{key}\" must be {}, found {}",
                            article(ty),
                            d.describe()
                        ),
                        format!(
                            "change the default or the type ({})",
                            InputType::NAMES.join(", ")
                        ),
                    );
                    return None;
                }
                Some(v)
            }
        };
        let description = f
            .get("description")
            .and_then(|n| self.string(file, n, "description"));
        Some(InputSpec {
            ty,
            default,
            description,
        })
    }

    fn secret(&mut self, file: &Path, key: &str, node: &Node) -> Option<SecretSpec> {
        let f = self.fields(file, node, SECRET_FIELDS, &format!("secret \"{key}\""))?;
        match (f.get("generate"), f.get("from_env")) {
            (Some(g), None) => {
                let n = self.uint(file, g, "generate", 4096)?;
                if n < 8 {
                    self.sink(file).error_help(
                        g.pos,
                        format!("a generated secret of {n} characters is too weak"),
                        "generate at least 8 characters; 32 is a good default",
                    );
                    return None;
                }
                Some(SecretSpec::Generate(n as usize))
            }
            (None, Some(e)) => {
                let var = self.string(file, e, "from_env")?;
                if !is_identifier(&var) {
                    self.sink(file).error(
                        e.pos,
                        format!("\"{var}\" is not an environment variable name"),
                    );
                    return None;
                }
                Some(SecretSpec::FromEnv(var))
            }
            (Some(_), Some(_)) => {
                let pos = f.key_pos("from_env").unwrap_or(node.pos);
                self.sink(file).error_help(
                    pos,
                    format!("secret \"{key}\" has both `generate` and `from_env`"),
                    "keep one of them",
                );
                None
            }
            (None, None) => {
                self.sink(file).error_help(
                    node.pos,
                    format!("secret \"{key}\" says nowhere where its value comes from"),
                    "add `generate: 32` or `from_env: VARIABLE`",
                );
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn component(
        &mut self,
        file: &Path,
        dir: &Path,
        name: &str,
        pos: Pos,
        node: &Node,
        refs: &mut Vec<(Ref, Pos)>,
        afters: &mut Vec<(String, Pos)>,
    ) -> Option<RawComponent> {
        let mut allowed: Vec<&str> = KIND_FIELDS.to_vec();
        allowed.extend_from_slice(COMMON_FIELDS);
        let what = format!("component \"{name}\"");
        let before = self.diags.len();
        let f = self.fields(file, node, &allowed, &what)?;
        let unknown_fields = self.diags.len() > before;
        let kinds: Vec<&str> = KIND_FIELDS
            .iter()
            .copied()
            .filter(|k| f.get(k).is_some())
            .collect();
        let keyword = match kinds.as_slice() {
            [one] => *one,
            // A misspelt kind was already reported as an unknown field.
            [] if unknown_fields => return None,
            [] => {
                self.sink(file).error_help(
                    pos,
                    format!("component \"{name}\" does not say what it is"),
                    format!("add one of: {}", KIND_FIELDS.join(", ")),
                );
                return None;
            }
            [first, second, ..] => {
                let at = f.key_pos(second).unwrap_or(pos);
                self.sink(file).error_help(
                    at,
                    format!("component \"{name}\" is both a {first} and a {second}"),
                    "a component has exactly one kind; split it into two components",
                );
                return None;
            }
        };
        let value = f.get(keyword).expect("kind present");

        // Fields that only make sense for some kinds.
        let applies = |field: &str| match field {
            "env" | "resources" => matches!(keyword, "job" | "process"),
            "health" | "replace" => keyword == "process",
            "route" => matches!(keyword, "process" | "static"),
            "with" => keyword == "blueprint",
            "timeout" | "retries" => keyword != "blueprint",
            _ => true,
        };
        let mut ok = true;
        for (field, k, _) in &f.entries {
            if !KIND_FIELDS.contains(field) && !applies(field) {
                self.sink(file).error_help(
                    k.pos,
                    format!("field \"{field}\" does not apply to a {keyword} component"),
                    "remove it",
                );
                ok = false;
            }
        }

        let kind = match keyword {
            "job" | "process" => {
                let (command, r) = self.template(file, value, &format!("the {keyword} command"))?;
                refs.extend(r);
                if command.render(|_| "x".into()).trim().is_empty() {
                    self.sink(file)
                        .error(value.pos, format!("the {keyword} command is empty"));
                    return None;
                }
                if keyword == "job" {
                    RawKind::Plain(Kind::Job { command })
                } else {
                    RawKind::Plain(Kind::Process { command })
                }
            }
            "static" => {
                let p = self.string(file, value, "a static directory")?;
                let path = normalize(&dir.join(&p));
                if let Err(help) = self.sources.allows(&path) {
                    self.sink(file).error_help(
                        value.pos,
                        format!("static directory \"{p}\" is outside the blueprint's directory"),
                        help,
                    );
                    return None;
                }
                if !self.sources.is_dir(&path) {
                    self.sink(file).error_help(
                        value.pos,
                        format!("static directory \"{p}\" does not exist"),
                        format!(
                            "create {} or fix the path (relative to the blueprint)",
                            path.display()
                        ),
                    );
                    return None;
                }
                RawKind::Plain(Kind::Static { path })
            }
            "postgres" | "sqlite" | "volume" => {
                if !value.is_null() {
                    // Accept `{}` (the documented form) and nothing else for now.
                    self.fields(file, value, &[], &format!("the {keyword} settings"))?;
                }
                RawKind::Plain(match keyword {
                    "postgres" => Kind::Postgres,
                    "sqlite" => Kind::Sqlite,
                    _ => Kind::Volume,
                })
            }
            _ => {
                let p = self.string(file, value, "an included blueprint")?;
                let mut path = normalize(&dir.join(&p));
                if let Err(help) = self.sources.allows(&path) {
                    self.sink(file).error_help(
                        value.pos,
                        format!("included blueprint \"{p}\" is outside the blueprint's directory"),
                        help,
                    );
                    return None;
                }
                if self.sources.is_dir(&path) {
                    path = path.join(FILE_NAME);
                }
                if self.stack.contains(&path) {
                    let chain: Vec<String> = self
                        .stack
                        .iter()
                        .chain(std::iter::once(&path))
                        .map(|p| p.display().to_string())
                        .collect();
                    self.sink(file).error_help(
                        value.pos,
                        format!("blueprint includes itself: {}", chain.join(" -> ")),
                        "break the cycle of `blueprint:` includes",
                    );
                    return None;
                }
                let nested = self.load_file(&path, Some((file, value.pos)))?;
                let mut with = IndexMap::new();
                if let Some(w) = f.get("with") {
                    for (key, kpos, v) in self.named(file, w, "with") {
                        if !nested.inputs.contains_key(key) {
                            let hint = did_you_mean(key, nested.inputs.keys().map(String::as_str));
                            self.sink(file).error(
                                kpos,
                                format!(
                                    "blueprint \"{}\" has no input \"{key}\"{hint}",
                                    nested.name
                                ),
                            );
                            ok = false;
                            continue;
                        }
                        if let Some((t, r)) = self.template(file, v, "an input value") {
                            refs.extend(r);
                            with.insert(key.to_string(), t);
                        }
                    }
                }
                for (key, spec) in &nested.inputs {
                    if spec.default.is_none() && !with.contains_key(key) && ok {
                        self.sink(file).error_help(
                            pos,
                            format!(
                                "included blueprint \"{}\" needs input \"{key}\"",
                                nested.name
                            ),
                            format!("add `with: {{ {key}: ... }}` to component \"{name}\""),
                        );
                        ok = false;
                    }
                }
                RawKind::Include {
                    with,
                    blueprint: Box::new(nested),
                }
            }
        };

        let mut after = Vec::new();
        if let Some(a) = f.get("after") {
            let items: Vec<&Node> = match &a.kind {
                NodeKind::Seq(items) => items.iter().collect(),
                NodeKind::Scalar(..) => vec![a],
                NodeKind::Map(_) => {
                    self.sink(file).error_help(
                        a.pos,
                        "`after` must be a list of component names",
                        "write `after: [migrate]`",
                    );
                    ok = false;
                    Vec::new()
                }
            };
            for item in items {
                if let Some(s) = self.string(file, item, "a component name in `after`") {
                    if s == name {
                        self.sink(file).error(
                            item.pos,
                            format!("component \"{name}\" cannot come after itself"),
                        );
                        ok = false;
                    }
                    afters.push((s.clone(), item.pos));
                    after.push(s);
                }
            }
        }

        let mut env = IndexMap::new();
        if let Some(e) = f.get("env") {
            for (key, kpos, v) in self.named(file, e, "env") {
                if !is_identifier(key) {
                    self.sink(file).error_help(
                        kpos,
                        format!("\"{key}\" is not an environment variable name"),
                        "use letters, digits and '_', starting with a letter",
                    );
                    ok = false;
                    continue;
                }
                if key == "PORT" || key.starts_with("COMMONS_") {
                    self.sink(file).error_help(
                        kpos,
                        format!("environment variable \"{key}\" is set by the platform"),
                        "choose another name",
                    );
                    ok = false;
                    continue;
                }
                // Numbers and booleans are fine as environment values.
                let t = match &v.kind {
                    NodeKind::Scalar(..) if !v.is_null() => {
                        self.template(file, v, "an environment value")
                    }
                    _ => {
                        self.sink(file).error(
                            v.pos,
                            format!("env value must be a string, found {}", v.describe()),
                        );
                        None
                    }
                };
                match t {
                    Some((t, r)) => {
                        refs.extend(r);
                        env.insert(key.to_string(), t);
                    }
                    None => ok = false,
                }
            }
        }

        let health = match f.get("health") {
            Some(h) => self.health(file, h),
            None => None,
        };
        let route = match f.get("route") {
            Some(r) => self.route(file, r),
            None => None,
        };
        let resources = match f.get("resources") {
            Some(r) => self.resources(file, r).unwrap_or_default(),
            None => Resources::default(),
        };
        let timeout_ms = f
            .get("timeout")
            .and_then(|t| self.duration(file, t, "timeout"));
        let retries = match f.get("retries") {
            Some(r) => self.uint(file, r, "retries", 100).unwrap_or(0) as u32,
            None => 0,
        };
        let replace = match f.get("replace") {
            Some(r) => match self.string(file, r, "replace").as_deref() {
                Some("start-first") => Some(Replace::StartFirst),
                Some("stop-first") => Some(Replace::StopFirst),
                Some(other) => {
                    self.sink(file).error_help(
                        r.pos,
                        format!("\"{other}\" is not a way to replace a process"),
                        "write `replace: start-first` (no downtime) or `replace: stop-first` (one version at a time)",
                    );
                    ok = false;
                    None
                }
                None => {
                    ok = false;
                    None
                }
            },
            None => None,
        };
        ok.then_some(RawComponent {
            pos,
            kind,
            after,
            env,
            health,
            route,
            resources,
            timeout_ms,
            retries,
            replace,
        })
    }

    fn health(&mut self, file: &Path, node: &Node) -> Option<Health> {
        let f = self.fields(file, node, HEALTH_FIELDS, "health")?;
        let http = match f.get("http") {
            Some(n) => {
                let p = self.string(file, n, "health.http")?;
                if !p.starts_with('/') {
                    self.sink(file).error_help(
                        n.pos,
                        format!("health check path \"{p}\" must start with /"),
                        format!("write \"/{p}\""),
                    );
                    return None;
                }
                p
            }
            None => {
                self.sink(file).error_help(
                    node.pos,
                    "health needs `http`",
                    "write `health: { http: \"/\" }`",
                );
                return None;
            }
        };
        let timeout_ms = match f.get("timeout") {
            Some(n) => self.duration(file, n, "health.timeout")?,
            None => 30_000,
        };
        let interval_ms = match f.get("interval") {
            Some(n) => self.duration(file, n, "health.interval")?.max(1),
            None => 50,
        };
        Some(Health {
            http,
            timeout_ms,
            interval_ms,
        })
    }

    fn route(&mut self, file: &Path, node: &Node) -> Option<Route> {
        let f = self.fields(file, node, ROUTE_FIELDS, "route")?;
        let host = match f.get("host") {
            Some(n) => {
                let h = self.string(file, n, "route.host")?.to_ascii_lowercase();
                let valid = !h.is_empty()
                    && h.len() <= 253
                    && h.split('.').all(|label| {
                        !label.is_empty()
                            && label.len() <= 63
                            && !label.starts_with('-')
                            && !label.ends_with('-')
                            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    });
                if !valid {
                    self.sink(file).error_help(
                        n.pos,
                        format!("\"{h}\" is not a valid host name"),
                        "write a DNS name such as hello.localhost or www.example.org",
                    );
                    return None;
                }
                Some(h)
            }
            // The deployment's own names (DEPLOYMENT.localhost, ...).
            None => None,
        };
        let path = match f.get("path") {
            Some(n) => {
                let p = self.string(file, n, "route.path")?;
                if !p.starts_with('/') {
                    self.sink(file).error_help(
                        n.pos,
                        format!("route path \"{p}\" must start with /"),
                        format!("write \"/{p}\""),
                    );
                    return None;
                }
                p
            }
            None => "/".to_string(),
        };
        let mut login = Vec::new();
        if let Some(n) = f.get("login") {
            let NodeKind::Seq(items) = &n.kind else {
                self.sink(file).error_help(
                    n.pos,
                    "`login` must be a list of path prefixes",
                    "write `login: [/admin]`",
                );
                return None;
            };
            for item in items {
                let p = self.string(file, item, "a path in route.login")?;
                if !p.starts_with('/') {
                    self.sink(file).error_help(
                        item.pos,
                        format!("login path \"{p}\" must start with /"),
                        format!("write \"/{p}\""),
                    );
                    return None;
                }
                login.push(p);
            }
        }
        // Absent: None; present: Some, if it is valid (else the error is
        // reported and the route is not made).
        let mut limit = |name: &str, size: bool, range, help: &str| match f.get(name) {
            None => Some(None),
            Some(n) => self.route_limit(file, n, name, size, range, help).map(Some),
        };
        let max_body_bytes = limit(
            "max_body",
            true,
            1..=u64::MAX,
            "write a size such as 10Mi or 512Ki",
        )?;
        let max_header_bytes = limit(
            "max_header",
            true,
            1024..=GATEWAY_MAX_HEADER,
            "write a size from 1Ki to 64Ki (the gateway reads no more)",
        )?;
        let response_timeout_ms = limit(
            "response_timeout",
            false,
            1..=MAX_RESPONSE_TIMEOUT_MS,
            "write how long the app may take to start its answer, from 1ms to 1h, such as 30s or 5m",
        )?;
        let user_header = match f.get("user_header") {
            Some(n) => {
                let h = self
                    .string(file, n, "route.user_header")?
                    .to_ascii_lowercase();
                let valid = !h.is_empty()
                    && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !GATEWAY_HEADERS.contains(&h.as_str())
                    && !h.starts_with("x-forwarded-")
                    && !h.starts_with("x-commons-");
                if !valid {
                    self.sink(file).error_help(
                        n.pos,
                        format!("\"{h}\" cannot carry the signed-in user"),
                        "name a header of the app's own, such as X-Remote-User; the gateway sets the others itself",
                    );
                    return None;
                }
                Some(h)
            }
            None => None,
        };
        Some(Route {
            host,
            path,
            login,
            max_body_bytes,
            max_header_bytes,
            response_timeout_ms,
            user_header,
        })
    }

    /// A route's limit, `name`: a size (`size`) or a duration in
    /// milliseconds, within `range`; otherwise an error with `help`.
    fn route_limit(
        &mut self,
        file: &Path,
        node: &Node,
        name: &str,
        size: bool,
        range: std::ops::RangeInclusive<u64>,
        help: &str,
    ) -> Option<u64> {
        let s = self.string(file, node, &format!("route.{name}"))?;
        let parsed = if size {
            parse_bytes(&s)
        } else {
            parse_duration_ms(&s)
        };
        let message = match parsed {
            Some(v) if range.contains(&v) => return Some(v),
            Some(_) => format!("route.{name} \"{s}\" is out of range"),
            None if size => format!("route.{name} \"{s}\" is not a size"),
            None => format!("route.{name} \"{s}\" is not a duration"),
        };
        self.sink(file).error_help(node.pos, message, help);
        None
    }

    fn resources(&mut self, file: &Path, node: &Node) -> Option<Resources> {
        let f = self.fields(file, node, RESOURCE_FIELDS, "resources")?;
        let mut r = Resources::default();
        if let Some(n) = f.get("memory") {
            let s = self.string(file, n, "resources.memory")?;
            match parse_bytes(&s) {
                Some(b) if b >= 1 << 20 => r.memory_bytes = Some(b),
                _ => {
                    self.sink(file).error_help(
                        n.pos,
                        format!("memory \"{s}\" is not a size of at least 1Mi"),
                        "write a size such as 256Mi or 1Gi",
                    );
                    return None;
                }
            }
        }
        if let Some(n) = f.get("cpu") {
            let s = self.string(file, n, "resources.cpu")?;
            match parse_cpu_millis(&s) {
                Some(m) => r.cpu_millis = Some(m),
                None => {
                    self.sink(file).error_help(
                        n.pos,
                        format!("cpu \"{s}\" is not a number of cores"),
                        "write cores such as 0.5 or 2, or thousandths such as 500m",
                    );
                    return None;
                }
            }
        }
        if let Some(n) = f.get("pids") {
            r.pids = Some(self.uint(file, n, "resources.pids", 1 << 22)?);
        }
        Some(r)
    }
}

fn article(ty: InputType) -> &'static str {
    match ty {
        InputType::String => "a string",
        InputType::Int => "an int",
        InputType::Bool => "a bool",
        InputType::List => "a list",
        InputType::Map => "a map",
    }
}

/// How the inputs of a blueprint being flattened are bound.
enum Inputs<'a> {
    /// The root blueprint: inputs stay references, filled at deploy time.
    Root,
    /// An included blueprint: each input is a template of the including scope
    /// (already flattened), or the input's default.
    Bound(&'a IndexMap<String, Template>),
}

fn flatten_root(raw: &Raw, files: Vec<PathBuf>, diags: &mut Vec<Diagnostic>) -> Option<Blueprint> {
    let mut components = IndexMap::new();
    let mut secrets = IndexMap::new();
    flatten(raw, "", &Inputs::Root, &[], &mut components, &mut secrets);
    let outputs = raw
        .outputs
        .iter()
        .map(|(k, t)| (k.clone(), rewrite(raw, "", &Inputs::Root, t)))
        .collect();
    if let Err(cycle) = topo_order(&components) {
        let first = &components[&cycle[0]];
        diags.push(Diagnostic {
            file: first.origin.file.clone(),
            line: first.origin.line,
            column: first.origin.column,
            offset: 0,
            message: format!("dependency cycle: {}", cycle.join(" -> ")),
            help: Some("remove one of these `after:` entries or component references".into()),
        });
        return None;
    }
    Some(Blueprint {
        name: raw.name.clone(),
        version: raw.version.clone(),
        project: raw.project.clone(),
        description: raw.description.clone(),
        depends_on_projects: raw.depends_on_projects.clone(),
        inputs: raw.inputs.clone(),
        secrets,
        outputs,
        components,
        files,
    })
}

/// Rewrites a template of `raw`'s scope into flat names.
fn rewrite(raw: &Raw, prefix: &str, inputs: &Inputs, t: &Template) -> Template {
    t.substitute(|r| match r {
        Ref::Input { name } => match inputs {
            Inputs::Root => Template(vec![crate::template::Segment::Ref(r.clone())]),
            Inputs::Bound(bound) => match bound.get(name) {
                Some(t) => t.clone(),
                None => {
                    let default = raw.inputs[name].default.clone().unwrap_or_default();
                    Template::literal(match default {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    })
                }
            },
        },
        Ref::Secret { name } => Template(vec![crate::template::Segment::Ref(Ref::Secret {
            name: format!("{prefix}{name}"),
        })]),
        Ref::Component { name, attr } => match &raw.components[name].kind {
            RawKind::Include { with, blueprint } => {
                let inner_prefix = format!("{prefix}{name}.");
                let bound: IndexMap<String, Template> = with
                    .iter()
                    .map(|(k, v)| (k.clone(), rewrite(raw, prefix, inputs, v)))
                    .collect();
                rewrite(
                    blueprint,
                    &inner_prefix,
                    &Inputs::Bound(&bound),
                    &blueprint.outputs[attr],
                )
            }
            RawKind::Plain(_) => Template(vec![crate::template::Segment::Ref(Ref::Component {
                name: format!("{prefix}{name}"),
                attr: attr.clone(),
            })]),
        },
    })
}

/// Flat names of every component that `name` (in `raw`'s scope) stands for.
fn flat_names(raw: &Raw, prefix: &str, name: &str, out: &mut Vec<String>) {
    match &raw.components[name].kind {
        RawKind::Plain(_) => out.push(format!("{prefix}{name}")),
        RawKind::Include { blueprint, .. } => {
            let inner = format!("{prefix}{name}.");
            for n in blueprint.components.keys() {
                flat_names(blueprint, &inner, n, out);
            }
        }
    }
}

fn flatten(
    raw: &Raw,
    prefix: &str,
    inputs: &Inputs,
    inherited_after: &[String],
    out: &mut IndexMap<String, Component>,
    secrets: &mut IndexMap<String, SecretSpec>,
) {
    for (name, spec) in &raw.secrets {
        secrets.insert(format!("{prefix}{name}"), spec.clone());
    }
    for (name, c) in &raw.components {
        let mut after: Vec<String> = inherited_after.to_vec();
        for a in &c.after {
            flat_names(raw, prefix, a, &mut after);
        }
        match &c.kind {
            RawKind::Include { with, blueprint } => {
                let bound: IndexMap<String, Template> = with
                    .iter()
                    .map(|(k, v)| (k.clone(), rewrite(raw, prefix, inputs, v)))
                    .collect();
                // What the `with:` values read must be ready before any part.
                for t in bound.values() {
                    for r in t.refs() {
                        if let Ref::Component { name, .. } = r {
                            after.push(name.clone());
                        }
                    }
                }
                let inner = format!("{prefix}{name}.");
                flatten(
                    blueprint,
                    &inner,
                    &Inputs::Bound(&bound),
                    &after,
                    out,
                    secrets,
                );
            }
            RawKind::Plain(kind) => {
                let kind = match kind {
                    Kind::Job { command } => Kind::Job {
                        command: rewrite(raw, prefix, inputs, command),
                    },
                    Kind::Process { command } => Kind::Process {
                        command: rewrite(raw, prefix, inputs, command),
                    },
                    other => other.clone(),
                };
                let env: IndexMap<String, Template> = c
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), rewrite(raw, prefix, inputs, v)))
                    .collect();
                let mut component = Component {
                    kind,
                    depends_on: Vec::new(),
                    env,
                    health: c.health.clone(),
                    route: c.route.clone(),
                    resources: c.resources.clone(),
                    timeout_ms: c.timeout_ms,
                    retries: c.retries,
                    replace: c.replace,
                    dir: raw.dir.clone(),
                    origin: Origin {
                        file: raw.file.clone(),
                        line: c.pos.line,
                        column: c.pos.col,
                    },
                };
                let mut deps: BTreeSet<String> = after.iter().cloned().collect();
                for r in component.refs() {
                    if let Ref::Component { name, .. } = r {
                        deps.insert(name.clone());
                    }
                }
                let flat = format!("{prefix}{name}");
                deps.remove(&flat);
                // Keep `after:` order first, then references, without repeats.
                let mut ordered: Vec<String> = Vec::new();
                for d in after.iter().chain(deps.iter()) {
                    if deps.contains(d) && !ordered.contains(d) {
                        ordered.push(d.clone());
                    }
                }
                component.depends_on = ordered;
                out.insert(flat, component);
            }
        }
    }
}
