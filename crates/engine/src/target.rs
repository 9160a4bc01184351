//! Finding what to deploy: a blueprint path, a deployment name or
//! `./commons.yaml`, confined to an upload when it came from someone else,
//! and its inputs settled (given > last deployed > default).

use super::*;

/// A blueprint with its inputs, to be deployed under a name.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub path: PathBuf,
    pub blueprint: Blueprint,
    pub inputs: serde_json::Map<String, serde_json::Value>,
}

/// Whether `s` is a deployment's name: lowercase letters, digits and `-`,
/// starting with a letter, at most 63 (a DNS label).
pub fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some('a'..='z'))
        && c.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.len() <= 63
}

/// Inputs: given on the command line, else last deployed, else default.
pub(crate) fn settle_inputs(
    bp: &Blueprint,
    recorded: &serde_json::Map<String, serde_json::Value>,
    given: &[(String, String)],
) -> Result<serde_json::Map<String, serde_json::Value>, EngineError> {
    let mut problems = Vec::new();
    for (k, _) in given {
        if !bp.inputs.contains_key(k) {
            let hint =
                commons_blueprint::diag::did_you_mean(k, bp.inputs.keys().map(String::as_str));
            problems.push(format!(
                "blueprint \"{}\" has no input \"{k}\"{hint}",
                bp.name
            ));
        }
    }
    let mut out = serde_json::Map::new();
    for (name, spec) in &bp.inputs {
        let value = if let Some((_, raw)) = given.iter().rev().find(|(k, _)| k == name) {
            match spec.ty.parse_cli(raw) {
                Ok(v) => Some(v),
                Err(e) => {
                    problems.push(format!("input \"{name}\": {e}"));
                    continue;
                }
            }
        } else {
            recorded
                .get(name)
                .filter(|v| spec.ty.accepts(v))
                .cloned()
                .or_else(|| spec.default.clone())
        };
        match value {
            Some(v) => {
                out.insert(name.clone(), v);
            }
            None => problems.push(format!(
                "input \"{name}\" ({}) is required: pass --input {name}=VALUE",
                spec.ty.name()
            )),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(EngineError::Input(problems.join("\n")))
    }
}

/// The target recorded in a deployment record checked out at `dest`.
/// Runs the images a record ran (`images.json`: component → the reference
/// its blueprint gave and the digest that ran), where the blueprint still
/// gives that reference.
fn pin_images(blueprint: &mut commons_blueprint::Blueprint, record: &Path) {
    let pins: serde_json::Map<String, serde_json::Value> =
        std::fs::read(record.join("images.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
    for (name, pin) in pins {
        if let Some(commons_blueprint::Kind::Image(image)) =
            blueprint.components.get_mut(&name).map(|c| &mut c.kind)
        {
            if pin["reference"].as_str() == Some(image.reference.as_str()) {
                if let Some(pinned) = pin["pinned"].as_str() {
                    image.reference = pinned.to_string();
                }
            }
        }
    }
}

pub(crate) fn target_from_record(
    name: String,
    dest: &Path,
    root: &str,
) -> Result<Target, EngineError> {
    let inputs: serde_json::Map<String, serde_json::Value> =
        std::fs::read(dest.join("inputs.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
    let path = dest.join(root);
    let mut blueprint =
        commons_blueprint::load(&path, &FileSystem).map_err(EngineError::Blueprint)?;
    pin_images(&mut blueprint, dest);
    let inputs = settle_inputs(&blueprint, &inputs, &[])?;
    Ok(Target {
        name,
        path,
        blueprint,
        inputs,
    })
}

impl Engine {
    /// Finds what to deploy: a blueprint path, a deployment name, or
    /// `./commons.yaml` when `target` is `None`; then settles the inputs
    /// (given > last deployed > default).
    pub fn target(
        &self,
        target: Option<&str>,
        name: Option<&str>,
        given: &[(String, String)],
    ) -> Result<Target, EngineError> {
        let (path, known_name) = match target {
            None => {
                let p = PathBuf::from(commons_blueprint::FILE_NAME);
                if !p.exists() {
                    return Err(EngineError::Input(
                        "no commons.yaml in this directory; run `commons init` to create one, or name a deployment or blueprint".into(),
                    ));
                }
                (p, None)
            }
            Some(t) if Path::new(t).exists() => (PathBuf::from(t), None),
            Some(t) => match self.store.deployment(t)? {
                Some(row) => (PathBuf::from(&row.blueprint), Some(t.to_string())),
                None => {
                    let names: Vec<String> = self
                        .store
                        .deployments()?
                        .into_iter()
                        .map(|d| d.name)
                        .collect();
                    let hint =
                        commons_blueprint::diag::did_you_mean(t, names.iter().map(String::as_str));
                    return Err(EngineError::Input(format!(
                        "\"{t}\" is neither a blueprint file nor a deployment{hint}"
                    )));
                }
            },
        };
        self.target_from(path, known_name, name, given, &FileSystem)
    }

    /// [`Engine::target`] for a blueprint file that came from someone else
    /// (through the API): it and everything it includes or serves must lie
    /// under `root`.
    pub fn target_confined(
        &self,
        path: &Path,
        root: &Path,
        name: Option<&str>,
        given: &[(String, String)],
    ) -> Result<Target, EngineError> {
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        let sources = commons_blueprint::load::Confined { root };
        self.target_from(path.to_path_buf(), None, name, given, &sources)
    }

    pub(crate) fn target_from(
        &self,
        path: PathBuf,
        known_name: Option<String>,
        name: Option<&str>,
        given: &[(String, String)],
        sources: &dyn commons_blueprint::load::Sources,
    ) -> Result<Target, EngineError> {
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        let blueprint = commons_blueprint::load(&path, sources).map_err(EngineError::Blueprint)?;
        let path = blueprint.files.first().cloned().unwrap_or(path);
        let name = name
            .map(str::to_string)
            .or(known_name)
            .unwrap_or_else(|| blueprint.name.clone());
        if !valid_name(&name) {
            return Err(EngineError::Input(format!(
                "invalid deployment name \"{name}\": use lowercase letters, digits and '-', starting with a letter"
            )));
        }
        let recorded = self
            .store
            .deployment(&name)?
            .and_then(|d| d.inputs.as_object().cloned())
            .unwrap_or_default();
        let inputs = settle_inputs(&blueprint, &recorded, given)?;
        Ok(Target {
            name,
            path,
            blueprint,
            inputs,
        })
    }
}
