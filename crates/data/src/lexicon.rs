//! Lexicon schemas: checking schema documents, validating records against
//! them, and refusing schema changes that would break stored records.
//!
//! A [`Catalog`] holds the documents an app registered, keyed by NSID.
//! Records are validated as the data model holds them (IPLD), so a record
//! written as JSON and one imported from a CAR are judged alike. Unknown
//! fields are allowed (schemas evolve by adding); every error names the
//! field's path, e.g. `$.formats.did`.

use std::collections::HashMap;

use serde_json::{Map, Value};
use unicode_segmentation::UnicodeSegmentation;

use crate::model::Ipld;
use crate::syntax::{self, Format};

/// A schema document or a schema change that is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SchemaError {
    /// Where in the document (`defs.main.record.properties.text`).
    pub path: String,
    pub message: String,
}

/// A record that breaks its schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ValidationError {
    /// Where in the record (`$.formats.did`).
    pub path: String,
    pub message: String,
}

fn schema_error(path: &str, message: impl Into<String>) -> SchemaError {
    SchemaError {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// The types a Lexicon def may have at the top of `defs`.
const PRIMARY: &[&str] = &[
    "record",
    "query",
    "procedure",
    "subscription",
    "permission-set",
];
const NAMED: &[&str] = &[
    "token", "object", "array", "boolean", "integer", "string", "bytes", "cid-link", "blob",
];
const FIELD: &[&str] = &[
    "boolean", "integer", "string", "bytes", "cid-link", "blob", "array", "object", "ref", "union",
    "unknown", "null",
];

/// Checks a Lexicon document's shape: version 1, an NSID id, defs whose
/// types are known, primary types only as `main`, records of objects.
pub fn check_document(doc: &Value) -> Result<(), SchemaError> {
    let Value::Object(doc) = doc else {
        return Err(schema_error("$", "a Lexicon document is a JSON object"));
    };
    if doc.get("lexicon") != Some(&Value::from(1)) {
        return Err(schema_error("lexicon", "must be the integer 1"));
    }
    let Some(Value::String(id)) = doc.get("id") else {
        return Err(schema_error("id", "must be an NSID string"));
    };
    syntax::nsid(id).map_err(|e| schema_error("id", e.to_string()))?;
    let Some(Value::Object(defs)) = doc.get("defs") else {
        return Err(schema_error("defs", "must be an object of definitions"));
    };
    for (name, def) in defs {
        let path = format!("defs.{name}");
        let kind = def_type(def).ok_or_else(|| schema_error(&path, "needs a \"type\""))?;
        if PRIMARY.contains(&kind) {
            if name != "main" {
                return Err(schema_error(
                    &path,
                    format!("a {kind} definition must be named \"main\""),
                ));
            }
            if kind == "record" {
                check_record_def(def, &path)?;
            }
        } else if NAMED.contains(&kind) {
            check_field(def, &path)?;
        } else {
            return Err(schema_error(
                &path,
                format!("\"{kind}\" cannot be a named definition; use one of {NAMED:?} or a primary type as main"),
            ));
        }
    }
    Ok(())
}

fn def_type(def: &Value) -> Option<&str> {
    def.get("type")?.as_str()
}

fn check_record_def(def: &Value, path: &str) -> Result<(), SchemaError> {
    match def.get("key").and_then(Value::as_str) {
        Some("tid" | "nsid" | "any") => {}
        Some(k) if k.starts_with("literal:") => {}
        _ => {
            return Err(schema_error(
                &format!("{path}.key"),
                "must be \"tid\", \"nsid\", \"any\" or \"literal:VALUE\"",
            ))
        }
    }
    let record = def.get("record");
    if record.and_then(def_type) != Some("object") {
        return Err(schema_error(
            &format!("{path}.record"),
            "must be an object definition (\"type\": \"object\")",
        ));
    }
    check_field(record.unwrap_or(&Value::Null), &format!("{path}.record"))
}

fn check_field(def: &Value, path: &str) -> Result<(), SchemaError> {
    let kind = def_type(def).ok_or_else(|| schema_error(path, "needs a \"type\""))?;
    match kind {
        "object" => {
            let properties = match def.get("properties") {
                None => return Ok(()),
                Some(Value::Object(p)) => p,
                Some(_) => return Err(schema_error(path, "\"properties\" must be an object")),
            };
            for (name, field) in properties {
                check_field(field, &format!("{path}.properties.{name}"))?;
            }
            for list in ["required", "nullable"] {
                if let Some(names) = def.get(list) {
                    let ok = names
                        .as_array()
                        .is_some_and(|a| a.iter().all(|n| n.as_str().is_some()));
                    if !ok {
                        return Err(schema_error(
                            path,
                            format!("\"{list}\" must list field names"),
                        ));
                    }
                }
            }
            Ok(())
        }
        "array" => check_field(
            def.get("items")
                .ok_or_else(|| schema_error(path, "an array needs \"items\""))?,
            &format!("{path}.items"),
        ),
        "ref" => match def.get("ref").and_then(Value::as_str) {
            Some(_) => Ok(()),
            None => Err(schema_error(path, "a ref needs \"ref\": \"nsid#name\"")),
        },
        "union" => match def.get("refs").and_then(Value::as_array) {
            Some(refs) if refs.iter().all(|r| r.as_str().is_some()) => Ok(()),
            _ => Err(schema_error(
                path,
                "a union needs \"refs\": [\"nsid#name\", ...]",
            )),
        },
        "string" => match def.get("format").and_then(Value::as_str) {
            Some(f) if Format::from_name(f).is_none() => {
                Err(schema_error(path, format!("unknown string format {f:?}")))
            }
            _ => Ok(()),
        },
        "token" => Ok(()),
        other if FIELD.contains(&other) => Ok(()),
        other => Err(schema_error(path, format!("unknown type {other:?}"))),
    }
}

/// The schemas a validator can resolve refs against.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    docs: HashMap<String, Map<String, Value>>,
}

impl Catalog {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a checked document; a document of the same NSID is replaced
    /// only by a compatible one (see [`check_compatible`]).
    pub fn add(&mut self, doc: Value) -> Result<String, SchemaError> {
        check_document(&doc)?;
        let id = doc["id"].as_str().unwrap_or_default().to_owned();
        if let Some(old) = self.docs.get(&id) {
            check_compatible(&Value::Object(old.clone()), &doc)?;
        }
        let Value::Object(map) = doc else {
            unreachable!("checked to be an object")
        };
        self.docs.insert(id.clone(), map);
        Ok(id)
    }

    pub fn contains(&self, nsid: &str) -> bool {
        self.docs.contains_key(nsid)
    }

    fn resolve(&self, reference: &str, base: &str) -> Option<(&Value, String)> {
        let (nsid, name) = match reference.split_once('#') {
            Some(("", name)) => (base, name),
            Some((nsid, name)) => (nsid, name),
            None => (reference, "main"),
        };
        let def = self.docs.get(nsid)?.get("defs")?.get(name)?;
        Some((def, nsid.to_owned()))
    }

    /// Validates a record of collection `nsid` with record key `rkey`.
    pub fn validate_record(
        &self,
        nsid: &str,
        rkey: &str,
        record: &Ipld,
    ) -> Result<(), ValidationError> {
        let fail = |path: &str, message: String| ValidationError {
            path: path.to_owned(),
            message,
        };
        let main = self
            .docs
            .get(nsid)
            .and_then(|d| d.get("defs"))
            .and_then(|d| d.get("main"))
            .filter(|d| def_type(d) == Some("record"))
            .ok_or_else(|| fail("$", format!("no record schema is registered for {nsid}")))?;
        let Ipld::Map(map) = record else {
            return Err(fail("$", "a record must be an object".into()));
        };
        match map.get("$type") {
            Some(Ipld::String(t)) if t == nsid => {}
            Some(Ipld::String(t)) => {
                return Err(fail(
                    "$.$type",
                    format!("is {t:?}; this collection holds {nsid:?}"),
                ))
            }
            _ => return Err(fail("$.$type", format!("must be the string {nsid:?}"))),
        }
        syntax::record_key(rkey).map_err(|e| fail("rkey", e.to_string()))?;
        match main.get("key").and_then(Value::as_str).unwrap_or("any") {
            "tid" => syntax::tid(rkey).map_err(|e| fail("rkey", e.to_string()))?,
            "nsid" => syntax::nsid(rkey).map_err(|e| fail("rkey", e.to_string()))?,
            "any" => {}
            literal => {
                let want = literal.strip_prefix("literal:").unwrap_or(literal);
                if rkey != want {
                    return Err(fail("rkey", format!("must be {want:?} in this collection")));
                }
            }
        }
        let mut path = String::from("$");
        self.validate(&main["record"], nsid, record, &mut path, 0)
    }

    fn validate(
        &self,
        def: &Value,
        base: &str,
        value: &Ipld,
        path: &mut String,
        depth: usize,
    ) -> Result<(), ValidationError> {
        let fail = |path: &str, message: String| {
            Err(ValidationError {
                path: path.to_owned(),
                message,
            })
        };
        if depth > crate::model::MAX_DEPTH {
            return fail(path, "schema refs nest too deep".into());
        }
        let kind = def_type(def).unwrap_or("unknown");
        match (kind, value) {
            ("boolean", Ipld::Bool(b)) => {
                if let Some(c) = def.get("const").and_then(Value::as_bool) {
                    if c != *b {
                        return fail(path, format!("must be {c}"));
                    }
                }
                Ok(())
            }
            ("integer", Ipld::Integer(i)) => {
                let n = *i;
                if let Some(c) = def.get("const").and_then(Value::as_i64) {
                    if n != i128::from(c) {
                        return fail(path, format!("must be {c}"));
                    }
                }
                if let Some(allowed) = def.get("enum").and_then(Value::as_array) {
                    if !allowed
                        .iter()
                        .any(|a| a.as_i64().map(i128::from) == Some(n))
                    {
                        return fail(
                            path,
                            format!("must be one of {}", Value::Array(allowed.clone())),
                        );
                    }
                }
                if let Some(min) = def.get("minimum").and_then(Value::as_i64) {
                    if n < i128::from(min) {
                        return fail(path, format!("must be at least {min}"));
                    }
                }
                if let Some(max) = def.get("maximum").and_then(Value::as_i64) {
                    if n > i128::from(max) {
                        return fail(path, format!("must be at most {max}"));
                    }
                }
                Ok(())
            }
            ("string", Ipld::String(s)) => self.validate_string(def, s, path),
            ("bytes", Ipld::Bytes(b)) => check_len(def, b.len(), "bytes", path),
            ("cid-link", Ipld::Link(_)) => Ok(()),
            ("blob", Ipld::Map(m)) if is_blob(m) => {
                let size = match m.get("size") {
                    Some(Ipld::Integer(n)) => *n,
                    _ => 0,
                };
                if let Some(max) = def.get("maxSize").and_then(Value::as_i64) {
                    if size > i128::from(max) {
                        return fail(
                            path,
                            format!("the blob is {size} bytes; at most {max} are allowed"),
                        );
                    }
                }
                if let Some(accept) = def.get("accept").and_then(Value::as_array) {
                    let mime = match m.get("mimeType") {
                        Some(Ipld::String(s)) => s.as_str(),
                        _ => "",
                    };
                    let ok = accept.iter().filter_map(Value::as_str).any(|pattern| {
                        pattern == "*/*"
                            || pattern == mime
                            || pattern
                                .strip_suffix("/*")
                                .is_some_and(|top| mime.split('/').next() == Some(top))
                    });
                    if !ok {
                        return fail(
                            path,
                            format!(
                                "a blob of type {mime:?} is not accepted here ({})",
                                Value::Array(accept.clone())
                            ),
                        );
                    }
                }
                Ok(())
            }
            ("array", Ipld::List(items)) => {
                check_len(def, items.len(), "items", path)?;
                let item_def = def.get("items").unwrap_or(&Value::Null);
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    self.validate(item_def, base, item, path, depth + 1)?;
                    path.truncate(len);
                }
                Ok(())
            }
            ("object", Ipld::Map(map)) => {
                let names = |list: &str| -> Vec<&str> {
                    def.get(list)
                        .and_then(Value::as_array)
                        .map(|a| a.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default()
                };
                let nullable = names("nullable");
                for required in names("required") {
                    if !map.contains_key(required) {
                        return fail(path, format!("the required field {required:?} is missing"));
                    }
                }
                let Some(Value::Object(properties)) = def.get("properties") else {
                    return Ok(());
                };
                for (name, field) in properties {
                    let Some(v) = map.get(name) else { continue };
                    let len = path.len();
                    path.push('.');
                    path.push_str(name);
                    if matches!(v, Ipld::Null) {
                        if !nullable.contains(&name.as_str()) {
                            return fail(path, "may not be null".into());
                        }
                    } else {
                        self.validate(field, base, v, path, depth + 1)?;
                    }
                    path.truncate(len);
                }
                Ok(())
            }
            ("ref", _) => {
                let reference = def.get("ref").and_then(Value::as_str).unwrap_or_default();
                let Some((target, target_base)) = self.resolve(reference, base) else {
                    return fail(
                        path,
                        format!("the schema refers to {reference:?}, which is not registered"),
                    );
                };
                if def_type(target) == Some("token") {
                    let full = full_ref(reference, base);
                    return match value {
                        Ipld::String(s) if *s == full => Ok(()),
                        _ => fail(path, format!("must be the token {full:?}")),
                    };
                }
                self.validate(target, &target_base, value, path, depth + 1)
            }
            ("union", Ipld::Map(map)) => {
                let Some(Ipld::String(t)) = map.get("$type") else {
                    return fail(path, "a union value needs a \"$type\"".into());
                };
                let refs: Vec<&str> = def
                    .get("refs")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let wanted = normalize_ref(t);
                let hit = refs
                    .iter()
                    .find(|r| normalize_ref(&full_ref(r, base)) == wanted);
                match hit {
                    Some(reference) => {
                        let Some((target, target_base)) = self.resolve(reference, base) else {
                            return fail(
                                path,
                                format!(
                                    "the schema refers to {reference:?}, which is not registered"
                                ),
                            );
                        };
                        self.validate(target, &target_base, value, path, depth + 1)
                    }
                    None if def.get("closed").and_then(Value::as_bool) == Some(true) => {
                        fail(path, format!("{t:?} is not one of {refs:?}"))
                    }
                    None => Ok(()),
                }
            }
            ("unknown", Ipld::Map(map)) if !is_blob(map) => Ok(()),
            ("unknown", _) => fail(
                path,
                "must be an object (not bytes, a blob or a scalar)".into(),
            ),
            ("null", Ipld::Null) => Ok(()),
            (kind, value) => fail(
                path,
                format!("must be {} (found {})", article(kind), describe(value)),
            ),
        }
    }

    fn validate_string(&self, def: &Value, s: &str, path: &str) -> Result<(), ValidationError> {
        let fail = |message: String| {
            Err(ValidationError {
                path: path.to_owned(),
                message,
            })
        };
        if let Some(c) = def.get("const").and_then(Value::as_str) {
            if s != c {
                return fail(format!("must be {c:?}"));
            }
        }
        if let Some(allowed) = def.get("enum").and_then(Value::as_array) {
            if !allowed.iter().any(|a| a.as_str() == Some(s)) {
                return fail(format!("must be one of {}", Value::Array(allowed.clone())));
            }
        }
        check_len(def, s.len(), "bytes of UTF-8", path)?;
        let graphemes = || s.graphemes(true).count();
        if let Some(min) = def.get("minGraphemes").and_then(Value::as_u64) {
            if (graphemes() as u64) < min {
                return fail(format!("needs at least {min} characters (graphemes)"));
            }
        }
        if let Some(max) = def.get("maxGraphemes").and_then(Value::as_u64) {
            if graphemes() as u64 > max {
                return fail(format!("allows at most {max} characters (graphemes)"));
            }
        }
        if let Some(format) = def
            .get("format")
            .and_then(Value::as_str)
            .and_then(Format::from_name)
        {
            if let Err(e) = format.check(s) {
                return fail(format!("must be a valid {format}: {}", e.reason));
            }
        }
        Ok(())
    }
}

fn check_len(def: &Value, len: usize, unit: &str, path: &str) -> Result<(), ValidationError> {
    let len = len as u64;
    if let Some(min) = def.get("minLength").and_then(Value::as_u64) {
        if len < min {
            return Err(ValidationError {
                path: path.to_owned(),
                message: format!("has {len} {unit}; at least {min} are needed"),
            });
        }
    }
    if let Some(max) = def.get("maxLength").and_then(Value::as_u64) {
        if len > max {
            return Err(ValidationError {
                path: path.to_owned(),
                message: format!("has {len} {unit}; at most {max} are allowed"),
            });
        }
    }
    Ok(())
}

fn is_blob(map: &std::collections::BTreeMap<String, Ipld>) -> bool {
    matches!(map.get("$type"), Some(Ipld::String(t)) if t == "blob")
        && matches!(map.get("ref"), Some(Ipld::Link(_)))
        && matches!(map.get("mimeType"), Some(Ipld::String(_)))
        && matches!(map.get("size"), Some(Ipld::Integer(_)))
}

/// `#name` made absolute against `base`.
fn full_ref(reference: &str, base: &str) -> String {
    match reference.strip_prefix('#') {
        Some(name) => format!("{base}#{name}"),
        None => reference.to_owned(),
    }
}

/// `nsid#main` and `nsid` name the same def.
fn normalize_ref(reference: &str) -> &str {
    reference.strip_suffix("#main").unwrap_or(reference)
}

fn article(kind: &str) -> String {
    match kind {
        "integer" | "object" | "array" | "unknown" => format!("an {kind}"),
        "cid-link" => "a CID link ({\"$link\": ...})".into(),
        "bytes" => "bytes ({\"$bytes\": ...})".into(),
        "blob" => "a blob ({\"$type\": \"blob\", ref, mimeType, size})".into(),
        "union" => "an object with a \"$type\"".into(),
        "null" => "null".into(),
        other => format!("a {other}"),
    }
}

fn describe(value: &Ipld) -> &'static str {
    match value {
        Ipld::Null => "null",
        Ipld::Bool(_) => "a boolean",
        Ipld::Integer(_) => "an integer",
        Ipld::Float(_) => "a float",
        Ipld::String(_) => "a string",
        Ipld::Bytes(_) => "bytes",
        Ipld::List(_) => "an array",
        Ipld::Map(_) => "an object",
        Ipld::Link(_) => "a CID link",
    }
}

/// Refuses a new version of a schema that would break records written
/// under the old one: a definition or field removed, a type changed, a
/// newly required field, a tighter limit. Such a change needs a new NSID.
pub fn check_compatible(old: &Value, new: &Value) -> Result<(), SchemaError> {
    let empty = Map::new();
    let defs = |doc: &Value| {
        doc.get("defs")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_else(|| empty.clone())
    };
    let (old_defs, new_defs) = (defs(old), defs(new));
    for (name, old_def) in &old_defs {
        let path = format!("defs.{name}");
        let Some(new_def) = new_defs.get(name) else {
            return Err(breaking(&path, "the definition was removed"));
        };
        let field = if def_type(old_def) == Some("record") {
            if old_def.get("key") != new_def.get("key") {
                return Err(breaking(
                    &format!("{path}.key"),
                    "the record key type changed",
                ));
            }
            (
                old_def.get("record"),
                new_def.get("record"),
                format!("{path}.record"),
            )
        } else {
            (Some(old_def), Some(new_def), path)
        };
        compatible_field(
            field.0.unwrap_or(&Value::Null),
            field.1.unwrap_or(&Value::Null),
            &field.2,
        )?;
    }
    Ok(())
}

fn breaking(path: &str, what: &str) -> SchemaError {
    schema_error(
        path,
        format!("{what}; records written under the old schema would break — publish the change under a new NSID"),
    )
}

fn compatible_field(old: &Value, new: &Value, path: &str) -> Result<(), SchemaError> {
    let (old_type, new_type) = (def_type(old), def_type(new));
    if old_type != new_type {
        return Err(breaking(
            path,
            &format!(
                "the type changed from {:?} to {:?}",
                old_type.unwrap_or("?"),
                new_type.unwrap_or("?")
            ),
        ));
    }
    for key in ["ref", "format", "const"] {
        if old.get(key) != new.get(key) {
            return Err(breaking(path, &format!("\"{key}\" changed")));
        }
    }
    for (key, tighter) in [
        ("maxLength", "lowered"),
        ("maxGraphemes", "lowered"),
        ("maximum", "lowered"),
        ("maxSize", "lowered"),
    ] {
        if let (Some(o), Some(n)) = (
            old.get(key).and_then(Value::as_i64),
            new.get(key).and_then(Value::as_i64),
        ) {
            if n < o {
                return Err(breaking(
                    path,
                    &format!("\"{key}\" was {tighter} from {o} to {n}"),
                ));
            }
        } else if old.get(key).is_none() && new.get(key).is_some() {
            return Err(breaking(path, &format!("a new \"{key}\" limit was added")));
        }
    }
    for key in ["minLength", "minGraphemes", "minimum"] {
        let (o, n) = (
            old.get(key).and_then(Value::as_i64),
            new.get(key).and_then(Value::as_i64),
        );
        if n.is_some() && (o.is_none() || n > o) {
            return Err(breaking(path, &format!("\"{key}\" was raised")));
        }
    }
    match old_type {
        Some("object") => {
            let names = |def: &Value, list: &str| -> Vec<String> {
                def.get(list)
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let old_required = names(old, "required");
            for name in names(new, "required") {
                if !old_required.contains(&name) {
                    return Err(breaking(
                        &format!("{path}.required"),
                        &format!("{name:?} became required"),
                    ));
                }
            }
            let empty = Map::new();
            let props = |def: &Value| {
                def.get("properties")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_else(|| empty.clone())
            };
            let (old_props, new_props) = (props(old), props(new));
            for (name, old_field) in &old_props {
                let field_path = format!("{path}.properties.{name}");
                let Some(new_field) = new_props.get(name) else {
                    return Err(breaking(&field_path, "the field was removed"));
                };
                compatible_field(old_field, new_field, &field_path)?;
            }
        }
        Some("array") => compatible_field(
            old.get("items").unwrap_or(&Value::Null),
            new.get("items").unwrap_or(&Value::Null),
            &format!("{path}.items"),
        )?,
        Some("union") if new.get("closed").and_then(Value::as_bool) == Some(true) => {
            let refs = |def: &Value| {
                def.get("refs")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            };
            let new_refs = refs(new);
            if refs(old).iter().any(|r| !new_refs.contains(r)) {
                return Err(breaking(path, "a closed union lost a member"));
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn note(extra: Value) -> Value {
        let mut properties = json!({
            "text": {"type": "string", "maxLength": 100},
            "tags": {"type": "array", "items": {"type": "string"}},
            "extra": {"type": "unknown"}
        });
        if let (Some(p), Value::Object(e)) = (properties.as_object_mut(), extra) {
            p.extend(e);
        }
        json!({"lexicon": 1, "id": "app.commons.note", "defs": {"main": {
            "type": "record", "key": "tid",
            "record": {"type": "object", "required": ["text"], "properties": properties}
        }}})
    }

    #[test]
    fn unknown_fields_must_be_objects_and_paths_are_named() {
        let mut catalog = Catalog::new();
        catalog.add(note(json!({}))).unwrap();
        let check = |record: Value| {
            let value = crate::model::from_json(&record).unwrap();
            catalog.validate_record("app.commons.note", "3jzfcijpj2z2a", &value)
        };
        check(json!({"$type": "app.commons.note", "text": "hi", "extra": {"a": 1}, "newField": 5}))
            .unwrap();
        for bad in [json!(false), json!({"$bytes": "aGk"})] {
            let err = check(json!({"$type": "app.commons.note", "text": "hi", "extra": bad}))
                .unwrap_err();
            assert_eq!(err.path, "$.extra");
        }
        let err = check(json!({"$type": "app.commons.note", "text": "hi", "tags": ["a", 3]}))
            .unwrap_err();
        assert_eq!(err.path, "$.tags[1]");
        let value =
            crate::model::from_json(&json!({"$type": "app.commons.note", "text": "hi"})).unwrap();
        let err = catalog
            .validate_record("app.commons.note", "not-a-tid", &value)
            .unwrap_err();
        assert_eq!(err.path, "rkey");
    }

    #[test]
    fn only_additive_schema_changes_are_accepted() {
        let mut catalog = Catalog::new();
        catalog.add(note(json!({}))).unwrap();
        // Adding an optional field is fine.
        catalog
            .add(note(json!({"mood": {"type": "string"}})))
            .unwrap();
        // Removing it again, retyping or tightening is not.
        let err = catalog.add(note(json!({}))).unwrap_err();
        assert!(
            err.message.contains("removed") && err.message.contains("new NSID"),
            "{err}"
        );
        let err = catalog
            .add(note(json!({"mood": {"type": "integer"}})))
            .unwrap_err();
        assert!(err.message.contains("type changed"), "{err}");
        let mut tighter = note(json!({"mood": {"type": "string"}}));
        tighter["defs"]["main"]["record"]["properties"]["text"]["maxLength"] = json!(50);
        let err = catalog.add(tighter).unwrap_err();
        assert_eq!(err.path, "defs.main.record.properties.text");
        let mut required = note(json!({"mood": {"type": "string"}}));
        required["defs"]["main"]["record"]["required"] = json!(["text", "mood"]);
        assert!(catalog
            .add(required)
            .unwrap_err()
            .message
            .contains("became required"));
    }
}
