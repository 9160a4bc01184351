//! Strings with `${inputs.X}`, `${secrets.X}` and `${components.NAME.ATTR}`.
//!
//! Only those three roots are expressions; any other `${...}` (for example
//! `${HOME}`) is left for the shell. `$${` writes a literal `${`.

use serde::{Deserialize, Serialize};

/// What an expression refers to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "ref", rename_all = "snake_case")]
pub enum Ref {
    Input { name: String },
    Secret { name: String },
    Component { name: String, attr: String },
}

impl std::fmt::Display for Ref {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ref::Input { name } => write!(f, "${{inputs.{name}}}"),
            Ref::Secret { name } => write!(f, "${{secrets.{name}}}"),
            Ref::Component { name, attr } => write!(f, "${{components.{name}.{attr}}}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Segment {
    Text(String),
    Ref(Ref),
}

/// A parsed template: literal text and references, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Template(pub Vec<Segment>);

/// A reference found while parsing, with its character offset in the source string.
#[derive(Debug, Clone, PartialEq)]
pub struct Located {
    pub reference: Ref,
    pub at: usize,
}

/// A malformed expression, with its character offset in the source string.
#[derive(Debug, Clone, PartialEq)]
pub struct ExprError {
    pub at: usize,
    pub message: String,
    pub help: Option<String>,
}

impl Template {
    /// A template with no references.
    pub fn literal(s: impl Into<String>) -> Template {
        Template(vec![Segment::Text(s.into())])
    }

    /// Parses `s`, returning the template and where each reference sits.
    pub fn parse(s: &str) -> Result<(Template, Vec<Located>), ExprError> {
        let chars: Vec<char> = s.chars().collect();
        let mut segs = Vec::new();
        let mut located = Vec::new();
        let mut text = String::new();
        let mut i = 0;
        while i < chars.len() {
            if chars[i] == '$' && chars.get(i + 1) == Some(&'$') && chars.get(i + 2) == Some(&'{') {
                text.push_str("${");
                i += 3;
                continue;
            }
            if chars[i] == '$' && chars.get(i + 1) == Some(&'{') {
                let start = i;
                let body_start = i + 2;
                let close = chars[body_start..].iter().position(|&c| c == '}');
                let body: String = match close {
                    Some(n) => chars[body_start..body_start + n].iter().collect(),
                    None => chars[body_start..].iter().collect(),
                };
                let root = body.split('.').next().unwrap_or("").trim();
                if !matches!(root, "inputs" | "secrets" | "components") {
                    // Not ours: a shell variable such as ${HOME}. A near miss
                    // of one of our roots is almost surely a typo.
                    if body.contains('.') && crate::diag::suggest(root, ROOTS).is_some() {
                        return Err(ExprError {
                            at: start,
                            message: format!("unknown expression root \"{root}\""),
                            help: Some(format!(
                                "expressions start with {}",
                                ROOTS.map(|r| format!("\"{r}.\"")).join(", ")
                            )),
                        });
                    }
                    text.push_str("${");
                    i += 2;
                    continue;
                }
                let Some(n) = close else {
                    return Err(ExprError {
                        at: start,
                        message: "unclosed expression: missing \"}\"".into(),
                        help: Some(format!("write ${{{body}}}")),
                    });
                };
                let reference = parse_ref(body.trim()).map_err(|(message, help)| ExprError {
                    at: start,
                    message,
                    help,
                })?;
                if !text.is_empty() {
                    segs.push(Segment::Text(std::mem::take(&mut text)));
                }
                located.push(Located {
                    reference: reference.clone(),
                    at: start,
                });
                segs.push(Segment::Ref(reference));
                i = body_start + n + 1;
                continue;
            }
            text.push(chars[i]);
            i += 1;
        }
        if !text.is_empty() || segs.is_empty() {
            segs.push(Segment::Text(text));
        }
        Ok((Template(segs), located))
    }

    /// Every reference, in order.
    pub fn refs(&self) -> impl Iterator<Item = &Ref> {
        self.0.iter().filter_map(|s| match s {
            Segment::Ref(r) => Some(r),
            Segment::Text(_) => None,
        })
    }

    /// The template with each reference replaced by what `f` returns.
    pub fn render(&self, mut f: impl FnMut(&Ref) -> String) -> String {
        let mut out = String::new();
        for s in &self.0 {
            match s {
                Segment::Text(t) => out.push_str(t),
                Segment::Ref(r) => out.push_str(&f(r)),
            }
        }
        out
    }

    /// Replaces references by templates (used to flatten included blueprints).
    pub fn substitute(&self, mut f: impl FnMut(&Ref) -> Template) -> Template {
        let mut out: Vec<Segment> = Vec::new();
        for s in &self.0 {
            match s {
                Segment::Text(t) => push_text(&mut out, t),
                Segment::Ref(r) => {
                    for seg in f(r).0 {
                        match seg {
                            Segment::Text(t) => push_text(&mut out, &t),
                            other => out.push(other),
                        }
                    }
                }
            }
        }
        if out.is_empty() {
            out.push(Segment::Text(String::new()));
        }
        Template(out)
    }

    /// The template written back in blueprint syntax.
    pub fn source(&self) -> String {
        let mut out = String::new();
        for s in &self.0 {
            match s {
                Segment::Text(t) => out.push_str(&t.replace("${", "$${")),
                Segment::Ref(r) => out.push_str(&r.to_string()),
            }
        }
        out
    }
}

fn push_text(out: &mut Vec<Segment>, t: &str) {
    if t.is_empty() {
        return;
    }
    if let Some(Segment::Text(last)) = out.last_mut() {
        last.push_str(t);
    } else {
        out.push(Segment::Text(t.to_string()));
    }
}

const ROOTS: [&str; 3] = ["inputs", "secrets", "components"];

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn parse_ref(body: &str) -> Result<Ref, (String, Option<String>)> {
    let parts: Vec<&str> = body.split('.').collect();
    let bad = |msg: &str, help: &str| Err((msg.to_string(), Some(help.to_string())));
    match parts.as_slice() {
        ["inputs", name] if is_ident(name) => Ok(Ref::Input {
            name: name.to_string(),
        }),
        ["secrets", name] if is_ident(name) => Ok(Ref::Secret {
            name: name.to_string(),
        }),
        ["components", name, attr] if is_ident(name) && is_ident(attr) => Ok(Ref::Component {
            name: name.to_string(),
            attr: attr.to_string(),
        }),
        ["inputs", ..] => bad(
            &format!("malformed expression ${{{body}}}"),
            "write ${inputs.NAME}",
        ),
        ["secrets", ..] => bad(
            &format!("malformed expression ${{{body}}}"),
            "write ${secrets.NAME}",
        ),
        _ => bad(
            &format!("malformed expression ${{{body}}}"),
            "write ${components.NAME.ATTRIBUTE}, for example ${components.db.url}",
        ),
    }
}

/// The environment variable a command reads a reference from.
///
/// Commands never have values pasted in: `${inputs.x}` becomes
/// `${COMMONS_INPUT_X}`, so values cannot inject shell syntax and secrets
/// never appear in a process's argv.
pub fn env_name(r: &Ref) -> String {
    let up = |s: &str| s.to_ascii_uppercase().replace('-', "_").replace('.', "__");
    match r {
        Ref::Input { name } => format!("COMMONS_INPUT_{}", up(name)),
        Ref::Secret { name } => format!("COMMONS_SECRET_{}", up(name)),
        Ref::Component { name, attr } => format!("COMMONS_COMPONENT_{}_{}", up(name), up(attr)),
    }
}

/// How a JSON input value is written into text.
pub fn input_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_refs_and_leaves_shell_vars() {
        let (t, refs) = Template::parse("echo ${inputs.greeting} $HOME ${HOME} $${x}").unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].at, 5);
        assert_eq!(
            t.render(|_| "hi".into()),
            "echo hi $HOME ${HOME} ${x}".to_string()
        );
    }

    #[test]
    fn component_ref() {
        let (t, _) = Template::parse("${components.db.url}/x").unwrap();
        assert_eq!(
            t.refs().next(),
            Some(&Ref::Component {
                name: "db".into(),
                attr: "url".into()
            })
        );
        assert_eq!(t.source(), "${components.db.url}/x");
    }

    #[test]
    fn errors() {
        assert!(Template::parse("${inputs.a").is_err());
        assert!(Template::parse("${components.db}").is_err());
        let e = Template::parse("x ${input.a}").unwrap_err();
        assert_eq!(e.at, 2);
        assert!(e.message.contains("unknown expression root"));
    }
}
