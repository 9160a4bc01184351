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

mod component;
mod data;
mod declarations;
mod fields;
mod includes;
mod settings;
mod sources;

use fields::{is_identifier, is_name};
pub use fields::{parse_bytes, parse_cpu_millis, parse_duration_ms, to_json};
use includes::flatten_root;
pub use sources::{normalize, Confined, FileSystem, InMemory, Sources};

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
    "network",
    "data",
];
/// Keywords that say what a component is; each component has exactly one.
pub const KIND_FIELDS: &[&str] = &[
    "job",
    "process",
    "static",
    "postgres",
    "sqlite",
    "volume",
    "image",
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
    "replicas",
    "with",
    "description",
    "command",
    "port",
    "volumes",
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
    network: crate::model::Network,
    data: IndexMap<String, crate::model::DataCollection>,
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
    replicas: u32,
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
        let network = match f.get("network") {
            Some(n) => self.network(file, n),
            None => Default::default(),
        };
        let data = match f.get("data") {
            Some(n) => self.data(file, &dir, n),
            None => IndexMap::new(),
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
            network,
            data,
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
}
