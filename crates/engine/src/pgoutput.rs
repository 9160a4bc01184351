//! Decoding PostgreSQL's logical replication messages (`pgoutput`,
//! protocol version 1, values in text form) into row changes a move
//! carries to another server.
//!
//! The format is PostgreSQL's "Logical Replication Message Formats": a
//! type byte, then big-endian integers and NUL-terminated strings. A
//! relation is described (`R`) before the first change to it in a session,
//! and again when it changes; a change names its relation by id.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// A table or sequence: schema and name.
pub type Name = (String, String);

/// Column values by name; `None` is SQL NULL. Values are PostgreSQL's text
/// form of the column's type.
pub type Row = Vec<(String, Option<String>)>;

/// One change to one table, as the target applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    Insert {
        table: Name,
        row: Row,
    },
    /// `key` finds the row (its replica identity before the change); `row`
    /// holds the new values, less those unchanged and not sent.
    Update {
        table: Name,
        key: Row,
        row: Row,
    },
    Delete {
        table: Name,
        key: Row,
    },
    Truncate {
        tables: Vec<Name>,
        cascade: bool,
        restart_identity: bool,
    },
    /// A sequence's position (sequences are not decoded; the source reads
    /// them and sends where they stand).
    Sequence {
        name: Name,
        value: i64,
        called: bool,
    },
}

#[derive(Debug, Clone)]
struct Relation {
    name: Name,
    /// (column, part of the replica identity)
    columns: Vec<(String, bool)>,
}

/// Decodes one session's messages, remembering relations as they are
/// described.
#[derive(Debug, Default)]
pub struct Decoder {
    relations: HashMap<u32, Relation>,
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err("a message ends early".into());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn string(&mut self) -> Result<String, String> {
        let end = self
            .bytes
            .iter()
            .position(|b| *b == 0)
            .ok_or("a string is not terminated")?;
        let s = String::from_utf8(self.bytes[..end].to_vec())
            .map_err(|_| "a name is not UTF-8".to_string())?;
        self.bytes = &self.bytes[end + 1..];
        Ok(s)
    }
}

/// A tuple's values: `None` for NULL, and `Unchanged` for a large value an
/// update left as it was (not sent).
enum Value {
    Null,
    Unchanged,
    Text(String),
}

fn tuple(r: &mut Reader) -> Result<Vec<Value>, String> {
    let n = r.u16()?;
    let mut values = Vec::with_capacity(n as usize);
    for _ in 0..n {
        values.push(match r.u8()? {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            b't' => {
                let len = r.u32()? as usize;
                let bytes = r.take(len)?;
                Value::Text(
                    String::from_utf8(bytes.to_vec())
                        .map_err(|_| "a value is not UTF-8".to_string())?,
                )
            }
            other => return Err(format!("unknown value kind {:?}", other as char)),
        });
    }
    Ok(values)
}

impl Decoder {
    /// The change `message` makes, if it makes one (begin, commit, origin
    /// and type messages do not).
    pub fn decode(&mut self, message: &[u8]) -> Result<Option<Change>, String> {
        let mut r = Reader { bytes: message };
        match r.u8()? {
            b'B' | b'C' | b'O' | b'Y' | b'M' => Ok(None),
            b'R' => {
                let id = r.u32()?;
                let schema = r.string()?;
                let table = r.string()?;
                let _identity = r.u8()?;
                let n = r.u16()?;
                let mut columns = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let flags = r.u8()?;
                    let name = r.string()?;
                    let _type_oid = r.u32()?;
                    let _type_modifier = r.u32()?;
                    columns.push((name, flags & 1 == 1));
                }
                self.relations.insert(
                    id,
                    Relation {
                        name: (schema, table),
                        columns,
                    },
                );
                Ok(None)
            }
            b'I' => {
                let rel = self.relation(r.u32()?)?;
                expect(&mut r, b'N')?;
                let row = named(&rel, tuple(&mut r)?, false)?;
                Ok(Some(Change::Insert {
                    table: rel.name,
                    row,
                }))
            }
            b'U' => {
                let rel = self.relation(r.u32()?)?;
                let mut old = None;
                let mut kind = r.u8()?;
                if kind == b'K' || kind == b'O' {
                    old = Some(tuple(&mut r)?);
                    kind = r.u8()?;
                }
                if kind != b'N' {
                    return Err(format!("an update has no new row ({:?})", kind as char));
                }
                let new = tuple(&mut r)?;
                let key = key_of(&rel, old.as_ref().unwrap_or(&new))?;
                let row = named(&rel, new, true)?;
                Ok(Some(Change::Update {
                    table: rel.name,
                    key,
                    row,
                }))
            }
            b'D' => {
                let rel = self.relation(r.u32()?)?;
                let kind = r.u8()?;
                if kind != b'K' && kind != b'O' {
                    return Err(format!("a delete has no key ({:?})", kind as char));
                }
                let key = key_of(&rel, &tuple(&mut r)?)?;
                Ok(Some(Change::Delete {
                    table: rel.name,
                    key,
                }))
            }
            b'T' => {
                let n = r.u32()?;
                let options = r.u8()?;
                let mut tables = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    tables.push(self.relation(r.u32()?)?.name);
                }
                Ok(Some(Change::Truncate {
                    tables,
                    cascade: options & 1 == 1,
                    restart_identity: options & 2 == 2,
                }))
            }
            other => Err(format!("unknown message {:?}", other as char)),
        }
    }

    fn relation(&self, id: u32) -> Result<Relation, String> {
        self.relations
            .get(&id)
            .cloned()
            .ok_or_else(|| format!("a change names relation {id}, never described"))
    }
}

fn expect(r: &mut Reader, kind: u8) -> Result<(), String> {
    match r.u8()? {
        k if k == kind => Ok(()),
        k => Err(format!(
            "expected {:?}, found {:?}",
            kind as char, k as char
        )),
    }
}

/// The values of `rel`'s columns; with `skip_unchanged`, columns an update
/// did not send are left out (else they are an error).
fn named(rel: &Relation, values: Vec<Value>, skip_unchanged: bool) -> Result<Row, String> {
    if values.len() != rel.columns.len() {
        return Err(format!(
            "{}.{} has {} columns, a change {}",
            rel.name.0,
            rel.name.1,
            rel.columns.len(),
            values.len()
        ));
    }
    let mut row = Vec::with_capacity(values.len());
    for ((column, _), v) in rel.columns.iter().zip(values) {
        match v {
            Value::Null => row.push((column.clone(), None)),
            Value::Text(t) => row.push((column.clone(), Some(t))),
            Value::Unchanged if skip_unchanged => {}
            Value::Unchanged => return Err(format!("{column} was not sent")),
        }
    }
    Ok(row)
}

/// The replica identity's columns of a row.
fn key_of(rel: &Relation, values: &[Value]) -> Result<Row, String> {
    let mut key = Vec::new();
    for ((column, is_key), v) in rel.columns.iter().zip(values) {
        if !is_key {
            continue;
        }
        match v {
            Value::Text(t) => key.push((column.clone(), Some(t.clone()))),
            _ => return Err(format!("key column {column} has no value")),
        }
    }
    if key.is_empty() {
        return Err(format!("{}.{} has no key", rel.name.0, rel.name.1));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }

    fn relation() -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&16384u32.to_be_bytes());
        s(&mut m, "public");
        s(&mut m, "notes");
        m.push(b'd');
        m.extend_from_slice(&2u16.to_be_bytes());
        for (flags, name) in [(1u8, "id"), (0, "body")] {
            m.push(flags);
            s(&mut m, name);
            m.extend_from_slice(&25u32.to_be_bytes());
            m.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        m
    }

    /// A change message of `kind` to the test's relation, its tuple (of
    /// two values) introduced by `tuple`.
    fn change(kind: u8, tuple: u8) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&16384u32.to_be_bytes());
        m.push(tuple);
        m.extend_from_slice(&2u16.to_be_bytes());
        m
    }

    fn text(m: &mut Vec<u8>, v: &str) {
        m.push(b't');
        m.extend_from_slice(&(v.len() as u32).to_be_bytes());
        m.extend_from_slice(v.as_bytes());
    }

    #[test]
    fn inserts_updates_and_deletes_decode_with_their_keys() {
        let mut d = Decoder::default();
        assert_eq!(d.decode(&relation()), Ok(None));
        let mut insert = change(b'I', b'N');
        text(&mut insert, "7");
        insert.push(b'n');
        let table = ("public".to_string(), "notes".to_string());
        assert_eq!(
            d.decode(&insert),
            Ok(Some(Change::Insert {
                table: table.clone(),
                row: vec![("id".into(), Some("7".into())), ("body".into(), None)],
            }))
        );
        // An update that changed the key sends the old one; a large value
        // left as it was is not sent.
        let mut update = change(b'U', b'K');
        text(&mut update, "7");
        update.push(b'n');
        update.push(b'N');
        update.extend_from_slice(&2u16.to_be_bytes());
        text(&mut update, "8");
        update.push(b'u');
        assert_eq!(
            d.decode(&update),
            Ok(Some(Change::Update {
                table: table.clone(),
                key: vec![("id".into(), Some("7".into()))],
                row: vec![("id".into(), Some("8".into()))],
            }))
        );
        let mut delete = change(b'D', b'K');
        text(&mut delete, "8");
        delete.push(b'n');
        assert_eq!(
            d.decode(&delete),
            Ok(Some(Change::Delete {
                table,
                key: vec![("id".into(), Some("8".into()))],
            }))
        );
    }

    #[test]
    fn broken_messages_are_errors_not_panics() {
        let mut d = Decoder::default();
        let whole = relation();
        for end in 0..whole.len() {
            assert!(d.decode(&whole[..end]).is_err(), "cut at {end}");
        }
        let mut insert = vec![b'I'];
        insert.extend_from_slice(&99u32.to_be_bytes());
        assert!(d.decode(&insert).unwrap_err().contains("never described"));
        assert!(d.decode(b"Z").is_err());
    }
}
