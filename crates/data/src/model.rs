//! The atproto data model: values as IPLD, their JSON form (`$link`,
//! `$bytes`, blobs) and their DAG-CBOR encoding and CIDs.
//!
//! A record is stored and hashed as DAG-CBOR; apps and people see JSON.
//! [`from_json`] and [`to_json`] convert between the two without loss, and
//! [`check`] enforces the model's rules (no floats, `$type` a non-empty
//! string, blobs with a `ref`, `mimeType` and `size`).

use std::collections::BTreeMap;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
pub use ipld_core::cid::Cid;
pub use ipld_core::ipld::Ipld;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The multicodec of DAG-CBOR: records, tree nodes and commits.
pub const DAG_CBOR: u64 = 0x71;
/// The multicodec of raw bytes: blobs.
pub const RAW: u64 = 0x55;
/// The multihash code of SHA-256.
const SHA2_256: u64 = 0x12;

/// Deepest nesting of lists and maps a value may have; deeper input is
/// refused before it can exhaust the stack.
pub const MAX_DEPTH: usize = 64;

/// A value that breaks the data model, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct ModelError {
    /// A JSON-pointer-like path to the bad value (`$` is the top).
    pub path: String,
    pub problem: String,
}

fn error(path: &str, problem: impl Into<String>) -> ModelError {
    ModelError {
        path: if path.is_empty() {
            "$".into()
        } else {
            path.into()
        },
        problem: problem.into(),
    }
}

/// Base64 as atproto writes it (standard alphabet, no padding), read with
/// or without padding.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Parses a CID from its string form (multibase), refusing CIDv0.
pub fn parse_cid(s: &str) -> Result<Cid, String> {
    let cid = Cid::try_from(s).map_err(|e| format!("{s:?} is not a CID: {e}"))?;
    if cid.version() == cid::Version::V0 {
        return Err(format!("{s:?} is a CIDv0; atproto uses CIDv1"));
    }
    Ok(cid)
}

/// The CIDv1 (SHA-256) of `bytes` under `codec`.
pub fn cid_of(codec: u64, bytes: &[u8]) -> Cid {
    let digest = Sha256::digest(bytes);
    let hash = cid::multihash::Multihash::<64>::wrap(SHA2_256, &digest)
        .expect("a 32-byte digest fits a 64-byte multihash");
    Cid::new_v1(codec, hash)
}

/// Encodes a value as DAG-CBOR (map keys in canonical order).
pub fn encode(value: &Ipld) -> Vec<u8> {
    serde_ipld_dagcbor::to_vec(value).expect("an Ipld value always encodes")
}

/// Encodes any serialisable value as DAG-CBOR.
pub fn encode_serde<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, String> {
    serde_ipld_dagcbor::to_vec(value).map_err(|e| e.to_string())
}

/// Decodes DAG-CBOR bytes into a value.
pub fn decode(bytes: &[u8]) -> Result<Ipld, String> {
    let value: Ipld =
        serde_ipld_dagcbor::from_slice(bytes).map_err(|e| format!("not DAG-CBOR: {e}"))?;
    depth_ok(&value, 0).map_err(|_| format!("nested deeper than {MAX_DEPTH} levels"))?;
    Ok(value)
}

/// A value encoded and addressed: its DAG-CBOR bytes and their CID.
pub fn block(value: &Ipld) -> (Cid, Vec<u8>) {
    let bytes = encode(value);
    (cid_of(DAG_CBOR, &bytes), bytes)
}

fn depth_ok(value: &Ipld, depth: usize) -> Result<(), ()> {
    if depth > MAX_DEPTH {
        return Err(());
    }
    match value {
        Ipld::List(items) => items.iter().try_for_each(|v| depth_ok(v, depth + 1)),
        Ipld::Map(map) => map.values().try_for_each(|v| depth_ok(v, depth + 1)),
        _ => Ok(()),
    }
}

/// Converts the JSON form of a value into IPLD, checking the data model.
pub fn from_json(json: &Value) -> Result<Ipld, ModelError> {
    let value = convert(json, &mut String::new(), 0)?;
    check(&value)?;
    Ok(value)
}

fn convert(json: &Value, path: &mut String, depth: usize) -> Result<Ipld, ModelError> {
    if depth > MAX_DEPTH {
        return Err(error(
            path,
            format!("nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    Ok(match json {
        Value::Null => Ipld::Null,
        Value::Bool(b) => Ipld::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ipld::Integer(i.into())
            } else if let Some(u) = n.as_u64() {
                Ipld::Integer(u.into())
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                // JSON writers print 123 as 123.0; that is still an integer.
                if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                    Ipld::Integer(f as i128)
                } else {
                    return Err(error(
                        path,
                        format!("{n} is a float; the data model has integers only"),
                    ));
                }
            }
        }
        Value::String(s) => Ipld::String(s.clone()),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(convert(item, path, depth + 1)?);
                path.truncate(len);
            }
            Ipld::List(out)
        }
        Value::Object(map) => {
            if let Some(link) = map.get("$link") {
                if map.len() != 1 {
                    return Err(error(path, "a $link object has no other fields"));
                }
                let Value::String(s) = link else {
                    return Err(error(path, "$link must be a CID string"));
                };
                return parse_cid(s).map(Ipld::Link).map_err(|e| error(path, e));
            }
            if let Some(bytes) = map.get("$bytes") {
                if map.len() != 1 {
                    return Err(error(path, "a $bytes object has no other fields"));
                }
                let Value::String(s) = bytes else {
                    return Err(error(path, "$bytes must be a base64 string"));
                };
                return BASE64
                    .decode(s)
                    .map(Ipld::Bytes)
                    .map_err(|e| error(path, format!("$bytes is not base64: {e}")));
            }
            let mut out = BTreeMap::new();
            for (key, item) in map {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                out.insert(key.clone(), convert(item, path, depth + 1)?);
                path.truncate(len);
            }
            Ipld::Map(out)
        }
    })
}

/// Checks the data model's rules on a value of any origin (JSON or CBOR).
pub fn check(value: &Ipld) -> Result<(), ModelError> {
    if !matches!(value, Ipld::Map(_)) {
        return Err(error("", "a record must be an object"));
    }
    check_at(value, &mut String::new(), 0)
}

fn check_at(value: &Ipld, path: &mut String, depth: usize) -> Result<(), ModelError> {
    if depth > MAX_DEPTH {
        return Err(error(
            path,
            format!("nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    match value {
        Ipld::Float(f) => Err(error(
            path,
            format!("{f} is a float; the data model has integers only"),
        )),
        Ipld::Integer(i) if *i > i128::from(i64::MAX) || *i < i128::from(i64::MIN) => {
            Err(error(path, "integers must fit in 64 signed bits"))
        }
        Ipld::List(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                check_at(item, path, depth + 1)?;
                path.truncate(len);
            }
            Ok(())
        }
        Ipld::Map(map) => {
            match map.get("$type") {
                None => {}
                Some(Ipld::String(t)) if t == "blob" => {
                    blob_shape(map).map_err(|p| error(path, p))?;
                }
                Some(Ipld::String(t)) if !t.is_empty() => {}
                Some(_) => return Err(error(path, "$type must be a non-empty string")),
            }
            for (key, item) in map {
                let len = path.len();
                path.push('.');
                path.push_str(key);
                check_at(item, path, depth + 1)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn blob_shape(map: &BTreeMap<String, Ipld>) -> Result<(), String> {
    if !matches!(map.get("ref"), Some(Ipld::Link(_))) {
        return Err("a blob needs \"ref\": a link to its bytes".into());
    }
    if !matches!(map.get("mimeType"), Some(Ipld::String(m)) if !m.is_empty()) {
        return Err("a blob needs \"mimeType\": a non-empty string".into());
    }
    if !matches!(map.get("size"), Some(Ipld::Integer(n)) if *n >= 0) {
        return Err("a blob needs \"size\": a non-negative integer".into());
    }
    Ok(())
}

/// The JSON form of a value.
pub fn to_json(value: &Ipld) -> Value {
    match value {
        Ipld::Null => Value::Null,
        Ipld::Bool(b) => Value::Bool(*b),
        Ipld::Integer(i) => i64::try_from(*i)
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(i.to_string())),
        Ipld::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Ipld::String(s) => Value::String(s.clone()),
        Ipld::Bytes(b) => serde_json::json!({ "$bytes": BASE64.encode(b) }),
        Ipld::List(items) => Value::Array(items.iter().map(to_json).collect()),
        Ipld::Map(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
        Ipld::Link(cid) => serde_json::json!({ "$link": cid.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_deep_input_is_refused_not_overflowed() {
        let mut json = serde_json::json!(1);
        for _ in 0..200 {
            json = serde_json::json!({ "a": json });
        }
        let err = from_json(&json).unwrap_err();
        assert!(err.problem.contains("nested deeper"), "{err}");
    }
}
