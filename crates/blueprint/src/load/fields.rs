//! Reading one YAML map's fields and the scalar values in them — names,
//! strings, counts, durations, sizes, templates — each wrong one reported
//! where it stands.

use super::*;

/// Reads the fields of one YAML map, reporting unknown and duplicate keys.
pub(super) struct Fields<'n> {
    pub(super) entries: Vec<(&'n str, &'n Node, &'n Node)>,
}

impl<'n> Fields<'n> {
    pub(super) fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, v)| *v)
    }
    pub(super) fn key_pos(&self, key: &str) -> Option<Pos> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, k, _)| k.pos)
    }
}

pub(super) fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some('a'..='z'))
        && c.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.len() <= 63
}

pub(super) fn is_identifier(s: &str) -> bool {
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

impl Loader<'_> {
    pub(super) fn fields<'n>(
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
    pub(super) fn named<'n>(
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

    /// `true` or `false`, as YAML writes them.
    pub(super) fn boolean(&mut self, file: &Path, node: &Node, what: &str) -> Option<bool> {
        match &node.kind {
            NodeKind::Scalar(s, Style::Plain) if s == "true" => Some(true),
            NodeKind::Scalar(s, Style::Plain) if s == "false" => Some(false),
            _ => {
                self.sink(file).error_help(
                    node.pos,
                    format!("{what} must be true or false, found {}", node.describe()),
                    "write true or false, without quotes",
                );
                None
            }
        }
    }

    /// `network: { egress: BOOL }`.
    pub(super) fn network(&mut self, file: &Path, node: &Node) -> crate::model::Network {
        let mut network = crate::model::Network::default();
        if let Some(f) = self.fields(file, node, &["egress"], "network") {
            if let Some(n) = f.get("egress") {
                if let Some(egress) = self.boolean(file, n, "network.egress") {
                    network.egress = egress;
                }
            }
        }
        network
    }

    pub(super) fn string(&mut self, file: &Path, node: &Node, what: &str) -> Option<String> {
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

    pub(super) fn uint(&mut self, file: &Path, node: &Node, what: &str, max: u64) -> Option<u64> {
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

    pub(super) fn duration(&mut self, file: &Path, node: &Node, what: &str) -> Option<u64> {
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

    pub(super) fn template(
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
}
