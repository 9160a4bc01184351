//! Included blueprints made flat: every component of an included
//! blueprint becomes `INCLUDE.NAME`, and every reference is rewritten to
//! the flat names, with the include's inputs bound to what `with:` gave.

use super::*;

impl Loader<'_> {
    /// A `blueprint:` component: the included file (inside what the
    /// blueprint may read, not including itself), loaded, with `with:`
    /// giving every input it needs that has no default.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn include(
        &mut self,
        file: &Path,
        dir: &Path,
        name: &str,
        pos: Pos,
        value: &Node,
        with_node: Option<&Node>,
        refs: &mut Vec<(Ref, Pos)>,
        ok: &mut bool,
    ) -> Option<RawKind> {
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
        if !nested.data.is_empty() {
            self.sink(file).error_help(
                value.pos,
                format!("the included blueprint {} declares `data:`", path.display()),
                "declare DataCommons collections in the root blueprint: the site, not a part of it, is the app users consent to",
            );
            *ok = false;
        }
        let mut with = IndexMap::new();
        if let Some(w) = with_node {
            for (key, kpos, v) in self.named(file, w, "with") {
                if !nested.inputs.contains_key(key) {
                    let hint = did_you_mean(key, nested.inputs.keys().map(String::as_str));
                    self.sink(file).error(
                        kpos,
                        format!("blueprint \"{}\" has no input \"{key}\"{hint}", nested.name),
                    );
                    *ok = false;
                    continue;
                }
                if let Some((t, r)) = self.template(file, v, "an input value") {
                    refs.extend(r);
                    with.insert(key.to_string(), t);
                }
            }
        }
        for (key, spec) in &nested.inputs {
            if spec.default.is_none() && !with.contains_key(key) && *ok {
                self.sink(file).error_help(
                    pos,
                    format!(
                        "included blueprint \"{}\" needs input \"{key}\"",
                        nested.name
                    ),
                    format!("add `with: {{ {key}: ... }}` to component \"{name}\""),
                );
                *ok = false;
            }
        }
        Some(RawKind::Include {
            with,
            blueprint: Box::new(nested),
        })
    }
}

/// How the inputs of a blueprint being flattened are bound.
pub(super) enum Inputs<'a> {
    /// The root blueprint: inputs stay references, filled at deploy time.
    Root,
    /// An included blueprint: each input is a template of the including scope
    /// (already flattened), or the input's default.
    Bound(&'a IndexMap<String, Template>),
}

pub(super) fn flatten_root(
    raw: &Raw,
    files: Vec<PathBuf>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Blueprint> {
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
    let components = expand_replicas(components, diags)?;
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
        network: raw.network,
        data: raw.data.clone(),
        files,
    })
}

/// Each component with `replicas: N` becomes N components (see
/// [`Component::replicas`]), instance k after instance k-1. A site that
/// keeps files (a volume or a SQLite database) runs one instance of each:
/// two would write the same files at once.
fn expand_replicas(
    components: IndexMap<String, Component>,
    diags: &mut Vec<Diagnostic>,
) -> Option<IndexMap<String, Component>> {
    if components.values().all(|c| c.replicas <= 1) {
        return Some(components);
    }
    let keeper = components
        .iter()
        .find(|(_, c)| matches!(c.kind, Kind::Volume | Kind::Sqlite));
    if let Some((files, kept)) = keeper {
        for (name, c) in components.iter().filter(|(_, c)| c.replicas > 1) {
            diags.push(Diagnostic {
                file: c.origin.file.clone(),
                line: c.origin.line,
                column: c.origin.column,
                offset: 0,
                message: format!(
                    "component \"{name}\" asks for {} replicas, but this site keeps files \
                     (\"{files}\" is a {}): every instance would write them at once",
                    c.replicas,
                    kept.kind.keyword()
                ),
                help: Some(
                    "remove `replicas:` (one instance), or keep the data in a `postgres:` component"
                        .into(),
                ),
            });
        }
        return None;
    }
    let mut out = IndexMap::with_capacity(components.len());
    for (name, c) in components {
        let n = c.replicas;
        out.insert(name.clone(), c.clone());
        for k in 2..=n {
            let mut replica = c.clone();
            let before = replica_name(&name, k - 1);
            replica.depends_on.retain(|d| *d != before);
            replica.depends_on.insert(0, before);
            out.insert(replica_name(&name, k), replica);
        }
    }
    Some(out)
}

/// Rewrites a template of `raw`'s scope into flat names.
pub(super) fn rewrite(raw: &Raw, prefix: &str, inputs: &Inputs, t: &Template) -> Template {
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
pub(super) fn flat_names(raw: &Raw, prefix: &str, name: &str, out: &mut Vec<String>) {
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

pub(super) fn flatten(
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
                    Kind::Image(image) => Kind::Image(crate::model::ImageSpec {
                        volumes: image
                            .volumes
                            .iter()
                            .map(|(k, v)| (k.clone(), rewrite(raw, prefix, inputs, v)))
                            .collect(),
                        ..image.clone()
                    }),
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
                    replicas: c.replicas,
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
