//! One component: which kind it is, the fields that apply to that kind,
//! and what every kind shares (order, environment, timeouts, retries).

use super::fields::Fields;
use super::*;

impl Loader<'_> {
    #[allow(clippy::too_many_arguments)]
    /// One component: its kind (exactly one), the fields that apply to
    /// that kind, and the fields every kind shares. The references its
    /// templates make go to `refs`, its `after` names to `afters`, to be
    /// checked once every component is known.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn component(
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
        let keyword = self.kind_of(file, name, pos, &f, unknown_fields)?;
        let value = f.get(keyword).expect("kind present");
        let mut ok = self.only_fields_of(file, keyword, &f);
        let kind = match keyword {
            "job" | "process" => self.command(file, keyword, value, refs)?,
            "static" => self.static_dir(file, dir, value)?,
            "image" => self.image(file, name, pos, value, &f, refs)?,
            "postgres" | "sqlite" | "volume" => self.store(file, keyword, value)?,
            _ => self.include(file, dir, name, pos, value, f.get("with"), refs, &mut ok)?,
        };
        let after = self.after(file, name, f.get("after"), afters, &mut ok);
        let env = self.env(file, f.get("env"), refs, &mut ok);
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
            Some(r) => self.replace(file, r, &mut ok),
            None => None,
        };
        let replicas = match f.get("replicas") {
            Some(r) => match self.uint(file, r, "replicas", MAX_REPLICAS as u64) {
                Some(0) => {
                    self.sink(file).error_help(
                        r.pos,
                        "replicas must be at least 1",
                        "write `replicas: 1` or more; to stop a site, use `commons down`",
                    );
                    ok = false;
                    1
                }
                Some(n) => n as u32,
                None => {
                    ok = false;
                    1
                }
            },
            None => 1,
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
            replicas,
        })
    }

    /// The one kind field the component has.
    fn kind_of(
        &mut self,
        file: &Path,
        name: &str,
        pos: Pos,
        f: &Fields<'_>,
        unknown_fields: bool,
    ) -> Option<&'static str> {
        let kinds: Vec<&'static str> = KIND_FIELDS
            .iter()
            .copied()
            .filter(|k| f.get(k).is_some())
            .collect();
        match kinds.as_slice() {
            [one] => Some(*one),
            // A misspelt kind was already reported as an unknown field.
            [] if unknown_fields => None,
            [] => {
                self.sink(file).error_help(
                    pos,
                    format!("component \"{name}\" does not say what it is"),
                    format!("add one of: {}", KIND_FIELDS.join(", ")),
                );
                None
            }
            [first, second, ..] => {
                let at = f.key_pos(second).unwrap_or(pos);
                self.sink(file).error_help(
                    at,
                    format!("component \"{name}\" is both a {first} and a {second}"),
                    "a component has exactly one kind; split it into two components",
                );
                None
            }
        }
    }

    /// Whether every field is one that applies to a `keyword` component
    /// (each one that does not is reported).
    fn only_fields_of(&mut self, file: &Path, keyword: &str, f: &Fields<'_>) -> bool {
        let applies = |field: &str| match field {
            "env" | "resources" => matches!(keyword, "job" | "process" | "image"),
            "health" | "replace" | "replicas" => matches!(keyword, "process" | "image"),
            "route" => matches!(keyword, "process" | "image" | "static"),
            "command" | "port" | "volumes" => keyword == "image",
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
        ok
    }

    /// A `job` or a `process`: a command that is not empty.
    fn command(
        &mut self,
        file: &Path,
        keyword: &str,
        value: &Node,
        refs: &mut Vec<(Ref, Pos)>,
    ) -> Option<RawKind> {
        let (command, r) = self.template(file, value, &format!("the {keyword} command"))?;
        refs.extend(r);
        if command.render(|_| "x".into()).trim().is_empty() {
            self.sink(file)
                .error(value.pos, format!("the {keyword} command is empty"));
            return None;
        }
        Some(RawKind::Plain(if keyword == "job" {
            Kind::Job { command }
        } else {
            Kind::Process { command }
        }))
    }

    /// An `image`: its reference, and its `port:` (required), `command:`
    /// (a list of words) and `volumes:` (absolute path → template).
    fn image(
        &mut self,
        file: &Path,
        name: &str,
        pos: Pos,
        value: &Node,
        f: &Fields<'_>,
        refs: &mut Vec<(Ref, Pos)>,
    ) -> Option<RawKind> {
        let reference = self.string(file, value, "the image reference")?;
        if reference.trim().is_empty() || reference.contains(char::is_whitespace) {
            self.sink(file).error_help(
                value.pos,
                format!("\"{reference}\" is not an image reference"),
                "write REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:DIGEST",
            );
            return None;
        }
        let Some(port_node) = f.get("port") else {
            self.sink(file).error_help(
                pos,
                format!("image component \"{name}\" does not say which port its app listens on"),
                "add `port: 8080` (the port inside the container)",
            );
            return None;
        };
        let port = self.uint(file, port_node, "port", 65535)?;
        if port == 0 {
            self.sink(file)
                .error(port_node.pos, "port must be 1 to 65535");
            return None;
        }
        let command = match f.get("command") {
            Some(n) => match &n.kind {
                NodeKind::Seq(items) if !items.is_empty() => {
                    let words: Vec<String> = items
                        .iter()
                        .filter_map(|i| self.string(file, i, "a command word"))
                        .collect();
                    (words.len() == items.len()).then_some(words)
                }
                _ => {
                    self.sink(file).error_help(
                        n.pos,
                        format!("command must be a list of words, found {}", n.describe()),
                        "write command: [program, arg, ...]",
                    );
                    return None;
                }
            },
            None => None,
        };
        let mut volumes = IndexMap::new();
        if let Some(v) = f.get("volumes") {
            for (path, at, node) in self.named(file, v, "volumes") {
                if !path.starts_with('/') || path.split('/').any(|p| p == "..") {
                    self.sink(file).error_help(
                        at,
                        format!(
                            "volume path \"{path}\" is not an absolute path inside the container"
                        ),
                        "write it like /data",
                    );
                    continue;
                }
                if let Some((t, r)) = self.template(file, node, &format!("volume {path}")) {
                    refs.extend(r);
                    volumes.insert(path.to_string(), t);
                }
            }
        }
        Some(RawKind::Plain(Kind::Image(ImageSpec {
            reference,
            command,
            port: port as u16,
            volumes,
        })))
    }

    /// A `static` directory: inside what the blueprint may read, and there.
    fn static_dir(&mut self, file: &Path, dir: &Path, value: &Node) -> Option<RawKind> {
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
        Some(RawKind::Plain(Kind::Static { path }))
    }

    /// A `postgres`, `sqlite` or `volume`: no settings yet.
    fn store(&mut self, file: &Path, keyword: &str, value: &Node) -> Option<RawKind> {
        if !value.is_null() {
            // Accept `{}` (the documented form) and nothing else for now.
            self.fields(file, value, &[], &format!("the {keyword} settings"))?;
        }
        Some(RawKind::Plain(match keyword {
            "postgres" => Kind::Postgres,
            "sqlite" => Kind::Sqlite,
            _ => Kind::Volume,
        }))
    }

    /// `after`: the components this one waits for (never itself).
    fn after(
        &mut self,
        file: &Path,
        name: &str,
        node: Option<&Node>,
        afters: &mut Vec<(String, Pos)>,
        ok: &mut bool,
    ) -> Vec<String> {
        let mut after = Vec::new();
        let Some(a) = node else {
            return after;
        };
        let items: Vec<&Node> = match &a.kind {
            NodeKind::Seq(items) => items.iter().collect(),
            NodeKind::Scalar(..) => vec![a],
            NodeKind::Map(_) => {
                self.sink(file).error_help(
                    a.pos,
                    "`after` must be a list of component names",
                    "write `after: [migrate]`",
                );
                *ok = false;
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
                    *ok = false;
                }
                afters.push((s.clone(), item.pos));
                after.push(s);
            }
        }
        after
    }

    /// `env`: variables the workload gets, none of the platform's own.
    fn env(
        &mut self,
        file: &Path,
        node: Option<&Node>,
        refs: &mut Vec<(Ref, Pos)>,
        ok: &mut bool,
    ) -> IndexMap<String, Template> {
        let mut env = IndexMap::new();
        let Some(e) = node else {
            return env;
        };
        for (key, kpos, v) in self.named(file, e, "env") {
            if !is_identifier(key) {
                self.sink(file).error_help(
                    kpos,
                    format!("\"{key}\" is not an environment variable name"),
                    "use letters, digits and '_', starting with a letter",
                );
                *ok = false;
                continue;
            }
            if key == "PORT" || key.starts_with("COMMONS_") {
                self.sink(file).error_help(
                    kpos,
                    format!("environment variable \"{key}\" is set by the platform"),
                    "choose another name",
                );
                *ok = false;
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
                None => *ok = false,
            }
        }
        env
    }

    /// `replace`: how a new version of a process takes over.
    fn replace(&mut self, file: &Path, r: &Node, ok: &mut bool) -> Option<Replace> {
        match self.string(file, r, "replace").as_deref() {
            Some("start-first") => Some(Replace::StartFirst),
            Some("stop-first") => Some(Replace::StopFirst),
            Some(other) => {
                self.sink(file).error_help(
                    r.pos,
                    format!("\"{other}\" is not a way to replace a process"),
                    "write `replace: start-first` (no downtime) or `replace: stop-first` (one version at a time)",
                );
                *ok = false;
                None
            }
            None => {
                *ok = false;
                None
            }
        }
    }
}
