//! What a blueprint declares beside its components: its inputs, its
//! secrets, and the upstream projects it depends on.

use super::*;

pub(super) fn article(ty: InputType) -> &'static str {
    match ty {
        InputType::String => "a string",
        InputType::Int => "an int",
        InputType::Bool => "a bool",
        InputType::List => "a list",
        InputType::Map => "a map",
    }
}

impl Loader<'_> {
    pub(super) fn project_deps(&mut self, file: &Path, node: &Node) -> Vec<ProjectDependency> {
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

    pub(super) fn input(&mut self, file: &Path, key: &str, node: &Node) -> Option<InputSpec> {
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

    pub(super) fn secret(&mut self, file: &Path, key: &str, node: &Node) -> Option<SecretSpec> {
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
}
