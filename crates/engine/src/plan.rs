//! Desired state vs recorded state: which components change, and which of
//! their attributes.
//!
//! Each component's *attributes* are everything it reads — its own settings
//! and the values of the inputs, secrets and other components' outputs it
//! references. A component is acted on only when an attribute changed, so
//! changing one input touches exactly the components that read it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

use commons_blueprint::model::Replace;
use commons_blueprint::{Component, Kind, Ref};
use commons_runtime::{driver_for, Handle, Layout, Observed, Spec};
use commons_store::{ComponentRow, ComponentState};

use crate::EngineError;

/// Attribute values; `None` is a value known only after deploy.
pub type Attrs = BTreeMap<String, Option<String>>;

/// Why a process is replaced although nothing it reads changed.
pub const NOT_RUNNING: &str = "the process is not running";

/// Prefix of a secret's fingerprint in attributes; shown as `(sensitive)`.
pub const SENSITIVE: &str = "sensitive:";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Update,
    Replace,
    Delete,
    Unchanged,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Replace => "replace",
            Action::Delete => "delete",
            Action::Unchanged => "unchanged",
        }
    }
}

/// One attribute that changes, as shown to people (secrets masked).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttrChange {
    pub attr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new: Option<String>,
}

/// What happens to one component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub component: String,
    pub kind: String,
    pub action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attrs: Vec<AttrChange>,
}

/// The plan of one deploy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub deployment: String,
    pub changes: Vec<Change>,
}

impl Plan {
    pub fn count(&self, action: Action) -> usize {
        self.changes.iter().filter(|c| c.action == action).count()
    }

    pub fn is_noop(&self) -> bool {
        self.changes.iter().all(|c| c.action == Action::Unchanged)
    }

    /// "2 to create, 1 to update, 0 to replace, 0 to delete, 5 unchanged"
    pub fn summary(&self) -> String {
        format!(
            "{} to create, {} to update, {} to replace, {} to delete, {} unchanged",
            self.count(Action::Create),
            self.count(Action::Update),
            self.count(Action::Replace),
            self.count(Action::Delete),
            self.count(Action::Unchanged)
        )
    }
}

pub use commons_blueprint::template::{env_name, input_text};

/// What a plan or a deploy knows about values.
pub struct Values<'a> {
    pub inputs: &'a serde_json::Map<String, serde_json::Value>,
    /// Secret fingerprints (`None`: made at deploy).
    pub secret_prints: &'a BTreeMap<String, Option<String>>,
    /// Outputs of components, as known so far.
    pub outputs: &'a HashMap<String, IndexMap<String, Option<String>>>,
}

impl Values<'_> {
    fn read(&self, r: &Ref) -> Option<String> {
        match r {
            Ref::Input { name } => self.inputs.get(name).map(input_text),
            Ref::Secret { name } => self
                .secret_prints
                .get(name)
                .cloned()
                .flatten()
                .map(|p| format!("{SENSITIVE}{p}")),
            Ref::Component { name, attr } => self.outputs.get(name)?.get(attr).cloned().flatten(),
        }
    }
}

/// Hash of a directory's names and contents, so a static site's change is seen.
pub fn hash_dir(dir: &Path) -> Result<String, EngineError> {
    let mut hasher = blake3::Hasher::new();
    let mut todo = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(d) = todo.pop() {
        let entries =
            std::fs::read_dir(&d).map_err(EngineError::io(format!("reading {}", d.display())))?;
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    for f in files {
        let rel = f.strip_prefix(dir).unwrap_or(&f);
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update(&[0]);
        let content =
            std::fs::read(&f).map_err(EngineError::io(format!("reading {}", f.display())))?;
        hasher.update(&(content.len() as u64).to_le_bytes());
        hasher.update(&content);
    }
    Ok(hasher.finalize().to_hex()[..32].to_string())
}

/// Every attribute of a component.
pub fn attributes(c: &Component, values: &Values<'_>, static_hash: Option<String>) -> Attrs {
    let mut a = Attrs::new();
    let mut put = |k: &str, v: Option<String>| {
        a.insert(k.to_string(), v);
    };
    match &c.kind {
        Kind::Job { command } | Kind::Process { command } => put("command", Some(command.source())),
        Kind::Static { path } => {
            put("static.path", Some(path.display().to_string()));
            put("static.content", static_hash);
        }
        Kind::Postgres | Kind::Sqlite | Kind::Volume => {}
        Kind::Image(image) => {
            put("image", Some(image.reference.clone()));
            put("image.port", Some(image.port.to_string()));
            if let Some(command) = &image.command {
                put(
                    "image.command",
                    Some(serde_json::to_string(command).expect("serialises")),
                );
            }
            for (path, t) in &image.volumes {
                put(&format!("volume.{path}"), Some(t.source()));
            }
        }
    }
    for (k, t) in &c.env {
        put(&format!("env.{k}"), Some(t.source()));
    }
    if let Some(h) = &c.health {
        put("health.http", Some(h.http.clone()));
        put("health.timeout", Some(format!("{}ms", h.timeout_ms)));
        put("health.interval", Some(format!("{}ms", h.interval_ms)));
    }
    if let Some(r) = &c.route {
        if let Some(h) = &r.host {
            put("route.host", Some(h.clone()));
        }
        put("route.path", Some(r.path.clone()));
        if let Some(h) = &r.user_header {
            put("route.user_header", Some(h.clone()));
        }
        if !r.login.is_empty() {
            put("route.login", Some(r.login.join(",")));
        }
        if let Some(b) = r.max_body_bytes {
            put("route.max_body", Some(b.to_string()));
        }
        if let Some(b) = r.max_header_bytes {
            put("route.max_header", Some(b.to_string()));
        }
        if let Some(ms) = r.response_timeout_ms {
            put("route.response_timeout", Some(format!("{ms}ms")));
        }
    }
    if let Some(m) = c.resources.memory_bytes {
        put("resources.memory", Some(m.to_string()));
    }
    if let Some(m) = c.resources.cpu_millis {
        put("resources.cpu", Some(format!("{m}m")));
    }
    if let Some(p) = c.resources.pids {
        put("resources.pids", Some(p.to_string()));
    }
    if let Some(t) = c.timeout_ms {
        put("timeout", Some(format!("{t}ms")));
    }
    if c.retries > 0 {
        put("retries", Some(c.retries.to_string()));
    }
    if matches!(
        c.kind,
        Kind::Job { .. } | Kind::Process { .. } | Kind::Image(_)
    ) {
        put("dir", Some(c.dir.display().to_string()));
    }
    for r in c.refs() {
        let key = match r {
            Ref::Input { name } => format!("inputs.{name}"),
            Ref::Secret { name } => format!("secrets.{name}"),
            Ref::Component { name, attr } => format!("components.{name}.{attr}"),
        };
        a.insert(key, values.read(r));
    }
    a
}

/// The hash recorded for a component: of its attributes, all known.
pub fn hash_attrs(kind: &str, attrs: &Attrs) -> String {
    let mut h = blake3::Hasher::new();
    h.update(kind.as_bytes());
    for (k, v) in attrs {
        h.update(&[0]);
        h.update(k.as_bytes());
        h.update(&[1]);
        h.update(v.as_deref().unwrap_or("").as_bytes());
    }
    h.finalize().to_hex()[..32].to_string()
}

/// An attribute value as shown to people.
pub fn show(v: &Option<String>) -> Option<String> {
    match v {
        None => Some("(known after deploy)".into()),
        Some(s) if s.starts_with(SENSITIVE) => Some("(sensitive)".into()),
        Some(s) => Some(s.clone()),
    }
}

/// The recorded attributes of a component.
pub fn recorded_attrs(row: &ComponentRow) -> Attrs {
    serde_json::from_value(row.config.clone()).unwrap_or_default()
}

/// A minimal spec, enough for a driver to predict outputs.
pub fn probe_spec(deployment: &str, name: &str, c: &Component) -> Spec {
    Spec {
        deployment: deployment.to_string(),
        component: name.to_string(),
        kind: c.kind.clone(),
        command: None,
        env: Vec::new(),
        cwd: c.dir.clone(),
        health: c.health.clone(),
        timeout: None,
        instance: String::new(),
        resources: c.resources.clone(),
        credential: None,
        withhold: Vec::new(),
        replace: c.replace.unwrap_or(Replace::StopFirst),
        egress: true,
        data_api: false,
        volumes: Vec::new(),
    }
}

/// How a redeploy replaces component `name` (see [`Replace`]): as the
/// blueprint says, else start-first when that is safe — the process has a
/// health check (so "ready" means something), no other component reads its
/// address (which changes), and it keeps no volume or SQLite file (which two
/// versions must not write at once).
/// `read` is [`read_by_others`] of `components`, made once per plan or
/// deploy (a scan per component would make planning quadratic).
pub fn replace_of(
    components: &IndexMap<String, Component>,
    read: &HashSet<String>,
    name: &str,
) -> Replace {
    let Some(c) = components.get(name) else {
        return Replace::StopFirst;
    };
    if let Some(r) = c.replace {
        return r;
    }
    let read_by_others = read.contains(name);
    let keeps_files = c.depends_on.iter().any(|d| {
        components
            .get(d)
            .is_some_and(|dep| matches!(dep.kind, Kind::Volume | Kind::Sqlite))
    });
    if c.health.is_some() && !read_by_others && !keeps_files {
        Replace::StartFirst
    } else {
        Replace::StopFirst
    }
}

/// The components some other component depends on (reads). An instance of
/// a component with replicas comes after the one before it without reading it.
pub fn read_by_others(components: &IndexMap<String, Component>) -> HashSet<String> {
    let mut read = HashSet::new();
    for (name, c) in components {
        let own = commons_blueprint::replica_of(name).0;
        for d in c
            .depends_on
            .iter()
            .filter(|d| *d != name && commons_blueprint::replica_of(d).0 != own)
        {
            read.insert(d.clone());
        }
    }
    read
}

pub fn handle_of(row: &ComponentRow) -> Handle {
    serde_json::from_value(row.handle.clone()).unwrap_or_default()
}

/// Computes the plan; also returns the desired attributes by component.
pub fn compute(
    layout: &Layout,
    deployment: &str,
    components: &IndexMap<String, Component>,
    order: &[usize],
    recorded: &HashMap<String, ComponentRow>,
    inputs: &serde_json::Map<String, serde_json::Value>,
    secret_prints: &BTreeMap<String, Option<String>>,
) -> Result<Plan, EngineError> {
    let mut outputs: HashMap<String, IndexMap<String, Option<String>>> = HashMap::new();
    let mut changes: Vec<Option<Change>> = vec![None; components.len()];
    let read = read_by_others(components);
    for &i in order {
        let (name, c) = components.get_index(i).expect("index from topo order");
        let kind = c.kind.keyword();
        let static_hash = match &c.kind {
            Kind::Static { path } => Some(hash_dir(path)?),
            _ => None,
        };
        let values = Values {
            inputs,
            secret_prints,
            outputs: &outputs,
        };
        let attrs = attributes(c, &values, static_hash);
        let row = recorded.get(name);
        let (action, reason, shown) = decide(kind, &attrs, row);
        // What dependents will read from this component.
        let predicted: IndexMap<String, Option<String>> = match (action, row) {
            (Action::Unchanged | Action::Update, Some(r)) => r
                .outputs
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string)))
                        .collect()
                })
                .unwrap_or_default(),
            _ => {
                let previous = row.map(handle_of);
                let spec = Spec {
                    replace: replace_of(components, &read, name),
                    ..probe_spec(deployment, name, c)
                };
                driver_for(kind)
                    .planned_outputs(layout, &spec, previous.as_ref())
                    .into_iter()
                    .collect()
            }
        };
        outputs.insert(name.clone(), predicted);
        changes[i] = Some(Change {
            component: name.clone(),
            kind: kind.to_string(),
            action,
            reason,
            attrs: shown,
        });
    }
    let mut changes: Vec<Change> = changes.into_iter().flatten().collect();
    let mut gone: Vec<&ComponentRow> = recorded
        .values()
        .filter(|r| !components.contains_key(&r.name))
        .collect();
    gone.sort_by(|a, b| a.name.cmp(&b.name));
    for r in gone {
        changes.push(Change {
            component: r.name.clone(),
            kind: r.kind.clone(),
            action: Action::Delete,
            reason: None,
            attrs: Vec::new(),
        });
    }
    Ok(Plan {
        deployment: deployment.to_string(),
        changes,
    })
}

/// Decides the action for one component and the attribute changes to show.
fn decide(
    kind: &str,
    attrs: &Attrs,
    row: Option<&ComponentRow>,
) -> (Action, Option<String>, Vec<AttrChange>) {
    let all_new = || {
        attrs
            .iter()
            .map(|(k, v)| AttrChange {
                attr: k.clone(),
                old: None,
                new: show(v),
            })
            .collect::<Vec<_>>()
    };
    let Some(row) = row else {
        return (Action::Create, None, all_new());
    };
    if row.kind != kind {
        return (
            Action::Replace,
            Some(format!("kind changes from {} to {kind}", row.kind)),
            all_new(),
        );
    }
    let old = recorded_attrs(row);
    let mut diffs = Vec::new();
    for key in old
        .keys()
        .chain(attrs.keys().filter(|k| !old.contains_key(*k)))
    {
        let (o, n) = (old.get(key), attrs.get(key));
        let unknown = matches!(n, Some(None));
        if o != n || unknown {
            diffs.push(AttrChange {
                attr: key.clone(),
                old: o.and_then(show),
                new: n.and_then(show),
            });
        }
    }
    // A secret's masked value looks the same on both sides; say it changed.
    for d in &mut diffs {
        if d.old == d.new && d.old.as_deref() == Some("(sensitive)") {
            d.new = Some("(sensitive, changed)".into());
        }
    }
    match row.state {
        ComponentState::Ready => {}
        ComponentState::Applying | ComponentState::Deleting => {
            return (
                if Kind::runs(kind) {
                    Action::Replace
                } else {
                    Action::Create
                },
                Some("the last deploy was interrupted; finishing it".into()),
                diffs,
            )
        }
        ComponentState::Error => {
            return (
                if Kind::runs(kind) {
                    Action::Replace
                } else {
                    Action::Create
                },
                Some("the last attempt failed; trying again".into()),
                diffs,
            )
        }
    }
    if diffs.is_empty() {
        if Kind::runs(kind) && driver_for(kind).observe(&handle_of(row)) == Observed::Stopped {
            return (Action::Replace, Some(NOT_RUNNING.into()), diffs);
        }
        return (Action::Unchanged, None, diffs);
    }
    let action = match kind {
        // Only the route changed: the gateway's business, no restart.
        "process" | "image" if diffs.iter().all(|d| d.attr.starts_with("route.")) => Action::Update,
        "process" | "image" => Action::Replace,
        _ => Action::Update,
    };
    (action, None, diffs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn components(yaml: &str) -> IndexMap<String, Component> {
        commons_blueprint::load_str(Path::new("/bp/commons.yaml"), yaml)
            .unwrap_or_else(|e| panic!("{e:?}"))
            .components
    }

    #[test]
    fn replacement_is_start_first_only_when_safe() {
        let c = components(
            r#"name: t
components:
  db: { sqlite: {} }
  files: { volume: {} }
  api:
    process: "serve $PORT"
    health: { http: "/" }
  web:
    process: "serve $PORT ${components.api.url}"
    health: { http: "/" }
  store:
    process: "serve $PORT ${components.db.path}"
    health: { http: "/" }
  blind: { process: "serve $PORT" }
  told:
    process: "serve $PORT"
    replace: stop-first
    health: { http: "/" }
"#,
        );
        let read = read_by_others(&c);
        // (component, how it is replaced, why)
        let table = [
            (
                "web",
                Replace::StartFirst,
                "healthy, read by nobody, no files",
            ),
            ("api", Replace::StopFirst, "web reads its address"),
            ("store", Replace::StopFirst, "keeps a SQLite file"),
            ("blind", Replace::StopFirst, "no health check"),
            ("told", Replace::StopFirst, "the blueprint says so"),
            ("missing", Replace::StopFirst, "no such component"),
        ];
        for (name, want, why) in table {
            assert_eq!(replace_of(&c, &read, name), want, "{name}: {why}");
        }
        assert!(read.contains("api") && read.contains("db") && !read.contains("web"));
    }
}
