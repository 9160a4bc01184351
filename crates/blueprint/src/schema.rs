//! A JSON Schema (draft 2020-12) of `commons.yaml`, for editors.
//!
//! Field lists come from the same constants the loader checks against, so the
//! schema and the loader cannot disagree on which fields exist.

use serde_json::{json, Map, Value};

use crate::load::{HEALTH_FIELDS, KIND_FIELDS, RESOURCE_FIELDS, ROUTE_FIELDS};

fn props(names: &[&str], describe: impl Fn(&str) -> Value) -> Value {
    let mut m = Map::new();
    for n in names {
        m.insert((*n).to_string(), describe(n));
    }
    Value::Object(m)
}

/// The schema as a JSON value.
pub fn json_schema() -> Value {
    let name = json!({ "type": "string", "pattern": "^[a-z][a-z0-9-]{0,62}$" });
    let duration = json!({ "type": "string", "pattern": "^[0-9.]+(ms|s|m|h)$" });
    let template = json!({ "type": ["string", "number", "boolean"],
        "description": "Text with ${inputs.X}, ${secrets.X} or ${components.NAME.ATTR}" });
    let kind = |k: &str| -> Value {
        match k {
            "job" => {
                json!({ "type": "string", "description": "A command run once per change; must exit 0." })
            }
            "process" => {
                json!({ "type": "string", "description": "A long-running command; $PORT is given." })
            }
            "static" => {
                json!({ "type": "string", "description": "A directory of files served by the gateway." })
            }
            "image" => {
                json!({ "type": "string", "description": "An OCI image (REGISTRY/REPOSITORY:TAG or @sha256:DIGEST) run as a long-running container; needs port." })
            }
            "blueprint" => {
                json!({ "type": "string", "description": "Another blueprint (a directory or file) included as a component." })
            }
            _ => json!({ "type": ["object", "null"], "additionalProperties": false }),
        }
    };
    let mut component = props(KIND_FIELDS, kind);
    let c = component.as_object_mut().expect("object");
    c.insert(
        "after".into(),
        json!({ "type": "array", "items": name.clone() }),
    );
    c.insert(
        "env".into(),
        json!({ "type": "object", "additionalProperties": template.clone() }),
    );
    c.insert("health".into(), json!({
        "type": "object", "additionalProperties": false, "required": ["http"],
        "properties": props(HEALTH_FIELDS, |f| if f == "http" { json!({"type": "string", "pattern": "^/"}) } else { duration.clone() }),
    }));
    c.insert(
        "route".into(),
        json!({
            "type": "object", "additionalProperties": false,
            "properties": props(ROUTE_FIELDS, |f| match f {
                "login" => json!({"type": "array", "items": {"type": "string", "pattern": "^/"}}),
                "max_body" => json!({"type": "string", "pattern": "^[0-9]+(K|k|M|G|Ki|Mi|Gi|Ti)?$"}),
                _ => json!({"type": "string"}),
            }),
        }),
    );
    c.insert(
        "resources".into(),
        json!({
            "type": "object", "additionalProperties": false,
            "properties": props(RESOURCE_FIELDS, |f| match f {
                "memory" => json!({"type": "string", "pattern": "^[0-9]+(K|k|M|G|Ki|Mi|Gi|Ti)?$"}),
                "cpu" => json!({"type": ["number", "string"]}),
                _ => json!({"type": "integer", "minimum": 1}),
            }),
        }),
    );
    c.insert(
        "command".into(),
        json!({ "type": "array", "minItems": 1, "items": { "type": "string" },
                "description": "image: replaces the image's Cmd" }),
    );
    c.insert(
        "port".into(),
        json!({ "type": "integer", "minimum": 1, "maximum": 65535,
                "description": "image: the port its app listens on inside" }),
    );
    c.insert(
        "volumes".into(),
        json!({ "type": "object", "propertyNames": { "pattern": "^/" },
                "additionalProperties": template.clone(),
                "description": "image: path inside → a directory of the site's" }),
    );
    c.insert("timeout".into(), duration.clone());
    c.insert(
        "retries".into(),
        json!({ "type": "integer", "minimum": 0, "maximum": 100 }),
    );
    c.insert(
        "replace".into(),
        json!({ "enum": ["start-first", "stop-first"] }),
    );
    c.insert(
        "replicas".into(),
        json!({ "type": "integer", "minimum": 1, "maximum": crate::model::MAX_REPLICAS,
                "description": "process or image: instances run at once, replaced one at a time" }),
    );
    c.insert(
        "with".into(),
        json!({ "type": "object", "additionalProperties": template.clone() }),
    );
    c.insert("description".into(), json!({ "type": "string" }));
    let one_of: Vec<Value> = KIND_FIELDS
        .iter()
        .map(|k| json!({ "required": [k] }))
        .collect();

    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://onecommons.org/schemas/commons.yaml.json",
        "title": "OneCommons blueprint (commons.yaml)",
        "type": "object",
        "additionalProperties": false,
        "required": ["name", "components"],
        "properties": {
            "name": name,
            "version": { "type": "string", "description": "Semantic version, e.g. 0.1.0" },
            "project": { "type": "string", "description": "The developer project this code belongs to" },
            "description": { "type": "string" },
            "network": { "type": "object", "additionalProperties": false,
                "description": "What a sandboxed site's workloads may reach besides their own components",
                "properties": { "egress": { "type": "boolean", "default": true,
                    "description": "The internet and DNS (never the host or other sites)" } } },
            "data": { "type": "object",
                "description": "DataCommons collections the app reads and writes, by NSID",
                "additionalProperties": { "type": "object", "additionalProperties": false,
                    "required": ["class", "schema", "purpose"],
                    "properties": {
                        "class": { "enum": ["public", "personal", "private"] },
                        "licence": { "type": "string", "description": "SPDX id; public collections only" },
                        "schema": { "type": "string", "description": "A Lexicon JSON file beside the blueprint" },
                        "purpose": { "type": "string", "description": "Why the app needs it (shown on the consent screen)" },
                        "access": { "type": "array", "items": { "enum": ["read", "write"] } },
                        "fields": { "type": "array", "items": { "type": "string" } },
                        "index": { "type": "array", "items": { "type": "string" } } } } },
            "depends_on_projects": { "type": "array", "items": { "oneOf": [
                { "type": "string" },
                { "type": "object", "additionalProperties": false, "required": ["project"],
                  "properties": { "project": {"type": "string"}, "weight": {"type": "integer", "minimum": 1} } }
            ]}},
            "inputs": { "type": "object", "additionalProperties": {
                "type": "object", "additionalProperties": false,
                "properties": {
                    "type": { "enum": ["string", "int", "bool", "list", "map"] },
                    "default": {},
                    "description": { "type": "string" }
                }
            }},
            "secrets": { "type": "object", "additionalProperties": {
                "type": "object", "additionalProperties": false,
                "properties": {
                    "generate": { "type": "integer", "minimum": 8, "maximum": 4096 },
                    "from_env": { "type": "string" },
                    "description": { "type": "string" }
                },
                "oneOf": [ { "required": ["generate"] }, { "required": ["from_env"] } ]
            }},
            "outputs": { "type": "object", "additionalProperties": template },
            "components": {
                "type": "object",
                "propertyNames": name,
                "additionalProperties": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": component,
                    "oneOf": one_of
                }
            }
        }
    })
}
