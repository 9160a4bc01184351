//! Named entries that several platform instances sharing one PostgreSQL
//! keep in memory and change one instance at a time (the nodes' registry).
//!
//! Each entry is a row (name, body, sequence number). A change is made
//! under a transaction-scoped advisory lock: [`SharedEntries::begin`]
//! takes it and answers the rows written since the caller's last, so the
//! caller decides on the entries as they are; [`SharedEntries::commit`]
//! writes what it changed and releases it. Changes are serialised across
//! instances, so sequence numbers follow their order and "everything after
//! N" misses nothing. Between changes a [`Follower`] reads what the others
//! wrote.
//!
//! Beside them, notes: the latest body per name, written in the background
//! without the lock (a node's heartbeat, which any instance may receive
//! and every instance judges by). Their order across instances is only
//! roughly kept: a reader may see one a turn late.
//!
//! The synchronous client runs on threads of its own: callers may be
//! inside an async runtime.

use std::sync::mpsc;
use std::sync::Mutex;

use ::postgres::{Client, NoTls};

use crate::{Result, StoreError};

/// One row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: i64,
    pub name: String,
    pub body: String,
}

type Reply<T> = mpsc::Sender<Result<T>>;

enum Call {
    Begin {
        after: i64,
        reply: Reply<Vec<Entry>>,
    },
    Commit {
        rows: Vec<(String, String)>,
        after: i64,
        reply: Reply<i64>,
    },
    Rollback,
    Since {
        after: i64,
        reply: Reply<Vec<Entry>>,
    },
}

/// The entries named `kind` in one schema.
pub struct SharedEntries {
    url: String,
    tables: Tables,
    calls: Mutex<mpsc::Sender<Call>>,
    notes: Mutex<mpsc::Sender<(String, String)>>,
}

/// The names of one kind's tables and lock, schema-qualified.
#[derive(Clone)]
struct Tables {
    schema: String,
    kind: String,
    entries: String,
    seq: String,
    notes: String,
    note_seq: String,
    lock: String,
}

fn pg(e: ::postgres::Error) -> StoreError {
    StoreError::Postgres(e.to_string())
}

impl Tables {
    fn of(schema: &str, kind: &str) -> Result<Tables> {
        let plain =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !plain(schema) || !plain(kind) {
            return Err(StoreError::Postgres(format!(
                "invalid schema or kind name {schema:?}, {kind:?}"
            )));
        }
        Ok(Tables {
            schema: schema.into(),
            kind: kind.into(),
            entries: format!("{schema}.{kind}_entries"),
            seq: format!("{schema}.{kind}_seq"),
            notes: format!("{schema}.{kind}_notes"),
            note_seq: format!("{schema}.{kind}_note_seq"),
            lock: format!(
                "SELECT pg_advisory_xact_lock(hashtext('{schema}'), hashtext('{kind} entries'))"
            ),
        })
    }

    fn connect(&self, url: &str) -> Result<Client> {
        let mut client = Client::connect(url, NoTls).map_err(pg)?;
        // Instances starting at once make the tables once.
        let mut tx = client.transaction().map_err(pg)?;
        tx.batch_execute(&format!(
            "{lock};
             CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE SEQUENCE IF NOT EXISTS {seq};
             CREATE TABLE IF NOT EXISTS {entries} (
                 name TEXT PRIMARY KEY, body TEXT NOT NULL, seq BIGINT NOT NULL);
             CREATE INDEX IF NOT EXISTS {kind}_entries_by_seq ON {entries} (seq);
             CREATE SEQUENCE IF NOT EXISTS {note_seq};
             CREATE TABLE IF NOT EXISTS {notes} (
                 name TEXT PRIMARY KEY, body TEXT NOT NULL, seq BIGINT NOT NULL);",
            lock = self.lock,
            schema = self.schema,
            seq = self.seq,
            entries = self.entries,
            kind = self.kind,
            note_seq = self.note_seq,
            notes = self.notes,
        ))
        .map_err(pg)?;
        tx.commit().map_err(pg)?;
        Ok(client)
    }

    fn since(&self, client: &mut Client, table: &str, after: i64) -> Result<Vec<Entry>> {
        Ok(client
            .query(
                &format!("SELECT seq, name, body FROM {table} WHERE seq > $1 ORDER BY seq"),
                &[&after],
            )
            .map_err(pg)?
            .iter()
            .map(|r| Entry {
                seq: r.get(0),
                name: r.get(1),
                body: r.get(2),
            })
            .collect())
    }
}

impl SharedEntries {
    /// Connects to the entries of `kind` in `schema` at `url` (making their
    /// tables the first time) and answers them with every row they hold.
    pub fn open(url: &str, schema: &str, kind: &str) -> Result<(SharedEntries, Vec<Entry>)> {
        let tables = Tables::of(schema, kind)?;
        let mut client = tables.connect(url)?;
        let all = tables.since(&mut client, &tables.entries, 0)?;
        let (calls, queue) = mpsc::channel::<Call>();
        let t = tables.clone();
        std::thread::Builder::new()
            .name("commons-entries".into())
            .spawn(move || serve_changes(client, &t, queue))
            .map_err(|e| StoreError::Postgres(e.to_string()))?;
        let (notes, note_queue) = mpsc::channel();
        let mut note_client = tables.connect(url)?;
        let statement = format!(
            "INSERT INTO {notes} (name, body, seq) VALUES ($1, $2, nextval('{seq}'))
             ON CONFLICT (name) DO UPDATE SET body = excluded.body, seq = excluded.seq",
            notes = tables.notes,
            seq = tables.note_seq
        );
        std::thread::Builder::new()
            .name("commons-notes".into())
            .spawn(move || {
                for (name, body) in note_queue {
                    let name: String = name;
                    let body: String = body;
                    if let Err(e) = note_client.execute(&statement, &[&name, &body]) {
                        eprintln!("{:>12} a note of {name} was not kept: {e}", "Warning");
                    }
                }
            })
            .map_err(|e| StoreError::Postgres(e.to_string()))?;
        Ok((
            SharedEntries {
                url: url.to_string(),
                tables,
                calls: Mutex::new(calls),
                notes: Mutex::new(notes),
            },
            all,
        ))
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Call) -> Result<T> {
        let stopped = || StoreError::Postgres("the entries' connection stopped".into());
        let (reply, answer) = mpsc::channel();
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(make(reply))
            .map_err(|_| stopped())?;
        answer.recv().map_err(|_| stopped())?
    }

    /// Takes the entries' lock, until [`commit`](Self::commit) or
    /// [`rollback`](Self::rollback), and answers the rows after `after`.
    /// One change at a time per instance: the caller serialises its own.
    pub fn begin(&self, after: i64) -> Result<Vec<Entry>> {
        self.call(|reply| Call::Begin { after, reply })
    }

    /// Writes `rows` (name, body; each name once) and releases the lock:
    /// answers the last sequence number (`after` when nothing was written).
    pub fn commit(&self, rows: Vec<(String, String)>, after: i64) -> Result<i64> {
        self.call(|reply| Call::Commit { rows, after, reply })
    }

    /// Releases the lock, writing nothing; nothing when no change is open.
    pub fn rollback(&self) {
        let _ = self
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Call::Rollback);
    }

    /// The rows after `after`, read now, without the lock.
    pub fn since(&self, after: i64) -> Result<Vec<Entry>> {
        self.call(|reply| Call::Since { after, reply })
    }

    /// Keeps `body` as the note `name`, in the background.
    pub fn note(&self, name: &str, body: String) {
        let _ = self
            .notes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((name.to_string(), body));
    }

    /// A reader of what every instance writes, on a connection of its own,
    /// for a thread of the caller's.
    pub fn follower(&self) -> Result<Follower> {
        Ok(Follower {
            client: self.tables.connect(&self.url)?,
            tables: self.tables.clone(),
        })
    }
}

/// Reads entries and notes, blocking: for a thread of its own.
pub struct Follower {
    client: Client,
    tables: Tables,
}

impl Follower {
    /// The rows after `after`, oldest first.
    pub fn entries_since(&mut self, after: i64) -> Result<Vec<Entry>> {
        let table = self.tables.entries.clone();
        self.tables.since(&mut self.client, &table, after)
    }

    /// The notes written after `after` (their latest bodies).
    pub fn notes_since(&mut self, after: i64) -> Result<Vec<Entry>> {
        let table = self.tables.notes.clone();
        self.tables.since(&mut self.client, &table, after)
    }
}

/// Runs changes on the connection, one at a time.
fn serve_changes(mut client: Client, tables: &Tables, queue: mpsc::Receiver<Call>) {
    let mut open = false;
    for call in queue {
        match call {
            Call::Begin { after, reply } => {
                if open {
                    let _ = client.batch_execute("ROLLBACK");
                }
                let begun = client
                    .batch_execute(&format!("BEGIN; {}", tables.lock))
                    .map_err(pg);
                open = begun.is_ok();
                let answer = begun.and_then(|()| tables.since(&mut client, &tables.entries, after));
                if answer.is_err() && open {
                    let _ = client.batch_execute("ROLLBACK");
                    open = false;
                }
                let _ = reply.send(answer);
            }
            Call::Commit { rows, after, reply } => {
                let answer = if open {
                    commit(&mut client, tables, rows, after)
                } else {
                    Err(StoreError::Postgres(
                        "a change was committed that had not begun".into(),
                    ))
                };
                if answer.is_err() && open {
                    let _ = client.batch_execute("ROLLBACK");
                }
                open = false;
                let _ = reply.send(answer);
            }
            Call::Rollback => {
                if open {
                    let _ = client.batch_execute("ROLLBACK");
                    open = false;
                }
            }
            Call::Since { after, reply } => {
                let _ = reply.send(tables.since(&mut client, &tables.entries, after));
            }
        }
    }
}

fn commit(
    client: &mut Client,
    tables: &Tables,
    rows: Vec<(String, String)>,
    after: i64,
) -> Result<i64> {
    let (names, bodies): (Vec<String>, Vec<String>) = rows.into_iter().unzip();
    let seq = client
        .query(
            &format!(
                "INSERT INTO {entries} (name, body, seq)
                 SELECT n, b, nextval('{seq}') FROM unnest($1::text[], $2::text[]) AS t(n, b)
                 ON CONFLICT (name) DO UPDATE SET body = excluded.body, seq = excluded.seq
                 RETURNING seq",
                entries = tables.entries,
                seq = tables.seq
            ),
            &[&names, &bodies],
        )
        .map_err(pg)?
        .iter()
        .map(|r| r.get::<_, i64>(0))
        .max()
        .unwrap_or(after);
    client.batch_execute("COMMIT").map_err(pg)?;
    Ok(seq)
}
