//! A PostgreSQL database carried by a move while its site serves: the
//! source follows the database's changes by logical decoding, the target
//! applies them to its own copy as they arrive, so the cut-over carries
//! only the last few.
//!
//! Providers' servers cannot reach each other (nodes open no ports), so
//! PostgreSQL's own subscriptions cannot be used: the source reads its
//! server's change stream (`pgoutput` through a replication slot) and the
//! changes travel in the move's increments, as files of the copy:
//!
//! - `postgres/NAME.sql` — the base: a `pg_dump` taken at the slot's
//!   starting point (the snapshot the slot exports), so every change after
//!   it is in the stream and none before it;
//! - `postgres/NAME.changes` — a header line (`base`, `seq`) and the row
//!   changes since the increment before, one JSON object per line, in
//!   commit order, then every sequence's position.
//!
//! The target loads the base once and applies each `seq` once, in order,
//! in one transaction, as the site's own role with triggers and foreign
//! keys off (`session_replication_role = replica`, as PostgreSQL's own
//! subscribers apply). It builds every statement itself from names and
//! values, quoted: a source cannot have it run SQL of its choosing.
//!
//! A database that cannot be followed — the server's `wal_level` is not
//! `logical`, or a table has no primary key (updates to it could not be
//! found on the target, and with a publication they would fail on the
//! source) — goes as a dump in every increment, as a backup does. When the
//! schema changes during the move, following starts again from a new base.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};

use crate::backup::admin_for;
use crate::pgoutput::{Change, Decoder, Name, Row};
use crate::pgtools::Conn;
use crate::EngineError;

fn internal(what: &'static str) -> impl FnOnce(postgres::Error) -> EngineError {
    move |e| match e.as_db_error() {
        Some(db) => EngineError::Internal(format!("{what}: {}", db.message())),
        None => EngineError::Internal(format!("{what}: {e}")),
    }
}

/// Runs `f` on a thread of its own: PostgreSQL's synchronous client runs
/// a runtime of its own, which cannot block inside the caller's.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().expect("the database thread panicked"))
}

fn connect(db: &str) -> Result<postgres::Client, EngineError> {
    postgres::Client::connect(&admin_for(db)?, postgres::NoTls)
        .map_err(internal("connecting to PostgreSQL"))
}

/// The slot's and the publication's name for database `db`.
fn slot_name(db: &str) -> String {
    let h = blake3::hash(db.as_bytes()).to_hex();
    format!("commons_move_{}", &h[..24])
}

/// What the source keeps of a database it follows.
#[derive(Debug)]
pub(crate) struct Following {
    db: String,
    /// The schema when following began: a change to it starts again.
    fingerprint: String,
    /// Names the base; the target loads a base once.
    base: String,
    seq: u64,
    /// The base dump, kept while following (it is listed in every
    /// increment, and goes once).
    pub(crate) dump: PathBuf,
    /// The changes file at the base (`seq` 0) was written.
    started: bool,
    decoder: Decoder,
}

/// The header line of a changes file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Header {
    base: String,
    seq: u64,
}

/// How one database went in an increment.
#[derive(Debug, Clone, Default)]
pub struct Sent {
    pub changes: u64,
    /// Why it went as a dump, when it did.
    pub dumped: Option<String>,
}

const USER_SCHEMAS: &str =
    "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'";

/// Tables, their columns and types, and sequences: what a change of
/// schema changes.
fn fingerprint(client: &mut postgres::Client) -> Result<String, EngineError> {
    let row = client
        .query_one(
            &format!(
                "SELECT coalesce(string_agg(format('%s.%s.%s.%s:%s', n.nspname, c.relname, c.relkind, a.attname, a.atttypid), ',' \
                 ORDER BY n.nspname, c.relname, a.attnum), '') \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
                 WHERE c.relkind IN ('r', 'p', 'S') AND {USER_SCHEMAS}"
            ),
            &[],
        )
        .map_err(internal("reading the schema"))?;
    let schema: String = row.get(0);
    Ok(blake3::hash(schema.as_bytes()).to_hex().to_string())
}

/// Drops what following `db` made there, if anything is left of it.
fn drop_slot(client: &mut postgres::Client, slot: &str) -> Result<(), EngineError> {
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .map_err(internal("dropping a replication slot"))?;
    client
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS \"{slot}\""))
        .map_err(internal("dropping a publication"))?;
    Ok(())
}

/// Begins following `db` (of deployment `name`), its base dumped to
/// `dump`; or says why it cannot be followed.
pub(crate) fn begin(db: &str, dump: &Path) -> Result<Result<Following, String>, EngineError> {
    let slot = slot_name(db);
    let prepared = off_runtime(|| -> Result<Result<String, String>, EngineError> {
        let mut client = connect(db)?;
        let wal: String = client
            .query_one("SHOW wal_level", &[])
            .map_err(internal("reading wal_level"))?
            .get(0);
        if wal != "logical" {
            return Ok(Err(format!("the server's wal_level is {wal}, not logical")));
        }
        let keyless: Vec<String> = client
            .query(
                &format!(
                    "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.relkind = 'r' AND {USER_SCHEMAS} AND NOT (c.relreplident = 'i' \
                     OR (c.relreplident = 'd' AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))) \
                     ORDER BY 1"
                ),
                &[],
            )
            .map_err(internal("looking for tables without a key"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !keyless.is_empty() {
            return Ok(Err(format!("{} has no primary key", keyless.join(", "))));
        }
        drop_slot(&mut client, &slot)?;
        let fingerprint = fingerprint(&mut client)?;
        let tables: Vec<String> = client
            .query(
                &format!(
                    "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.relkind = 'r' AND {USER_SCHEMAS} ORDER BY 1"
                ),
                &[],
            )
            .map_err(internal("listing tables"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        // The publication names the tables there are now: one made later
        // changes the schema, and following starts again.
        let publication = if tables.is_empty() {
            format!("CREATE PUBLICATION \"{slot}\"")
        } else {
            format!(
                "CREATE PUBLICATION \"{slot}\" FOR TABLE {}",
                tables.join(", ")
            )
        };
        client
            .batch_execute(&publication)
            .map_err(internal("creating the publication"))?;
        Ok(Ok(fingerprint))
    })?;
    let fingerprint = match prepared {
        Ok(f) => f,
        Err(why) => return Ok(Err(why)),
    };
    // The slot is made on a replication connection, which exports the
    // snapshot it starts at; the base is dumped in that snapshot while the
    // connection waits.
    let conn = Conn::parse(&admin_for(db)?)?;
    let mut psql = conn
        .command("psql")
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "--dbname"])
        .arg(format!("{} replication=database", conn.info))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| EngineError::Internal(format!("cannot run psql: {e}")))?;
    let mut stdin = psql.stdin.take().expect("piped");
    let mut stdout = BufReader::new(psql.stdout.take().expect("piped"));
    let made = (|| -> Result<String, String> {
        writeln!(
            stdin,
            "CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput EXPORT_SNAPSHOT;"
        )
        .and_then(|_| stdin.flush())
        .map_err(|e| e.to_string())?;
        let mut line = String::new();
        stdout.read_line(&mut line).map_err(|e| e.to_string())?;
        let snapshot = line.trim().split('|').nth(2).unwrap_or("").to_string();
        if snapshot.is_empty() {
            return Err("the replication slot was not made".into());
        }
        let dumped = conn
            .command("pg_dump")
            .args(crate::backup::DUMP_OPTIONS)
            .args(["--snapshot", &snapshot])
            .arg("--file")
            .arg(dump)
            .args(["--dbname", &conn.info])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run pg_dump: {e}"))?;
        if !dumped.status.success() {
            return Err(format!(
                "pg_dump failed: {}",
                String::from_utf8_lossy(&dumped.stderr).trim()
            ));
        }
        Ok(snapshot)
    })();
    drop(stdin);
    let out = psql
        .wait_with_output()
        .map_err(|e| EngineError::Internal(format!("psql: {e}")))?;
    if let Err(e) = made {
        let _ = off_runtime(|| connect(db).and_then(|mut c| drop_slot(&mut c, &slot)));
        return Err(EngineError::Internal(format!(
            "following database {db}: {e} {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(Ok(Following {
        db: db.to_string(),
        fingerprint,
        base: crate::secrets::token(),
        seq: 0,
        dump: dump.to_path_buf(),
        started: false,
        decoder: Decoder::default(),
    }))
}

impl Following {
    /// Writes the changes file of the next increment to `out`: the changes
    /// since the last (none, right after [`begin`]), then where every
    /// sequence stands. Answers how many changes, or `None` when the schema
    /// changed (following must begin again).
    pub(crate) fn write_changes(&mut self, out: &Path) -> Result<Option<u64>, EngineError> {
        let first = !self.started;
        let seq = if first { 0 } else { self.seq + 1 };
        let header = Header {
            base: self.base.clone(),
            seq,
        };
        let mut file = BufWriter::new(
            std::fs::File::create(out).map_err(EngineError::io("writing a database's changes"))?,
        );
        let w = EngineError::io("writing a database's changes");
        serde_json::to_writer(&mut file, &header).expect("json");
        file.write_all(b"\n").map_err(w)?;
        let slot = slot_name(&self.db);
        let db = self.db.clone();
        let schema_then = self.fingerprint.clone();
        let decoder = &mut self.decoder;
        let counted = off_runtime(move || -> Result<Option<u64>, EngineError> {
            let mut client = connect(&db)?;
            if fingerprint(&mut client)? != schema_then {
                return Ok(None);
            }
            let mut count = 0;
            if !first {
                let upto: String = client
                    .query_one("SELECT pg_current_wal_lsn()::text", &[])
                    .map_err(internal("reading the WAL position"))?
                    .get(0);
                loop {
                    let rows = client
                        .query(
                            "SELECT data FROM pg_logical_slot_get_binary_changes($1, $2::text::pg_lsn, 10000, \
                             'proto_version', '1', 'publication_names', $3)",
                            &[&slot, &upto, &slot],
                        )
                        .map_err(internal("reading the database's changes"))?;
                    if rows.is_empty() {
                        break;
                    }
                    for row in rows {
                        let data: Vec<u8> = row.get(0);
                        let change = decoder.decode(&data).map_err(|e| {
                            EngineError::Internal(format!("decoding a change of {db}: {e}"))
                        })?;
                        if let Some(change) = change {
                            write_line(&mut file, &change)?;
                            count += 1;
                        }
                    }
                }
            }
            for change in sequences(&mut client)? {
                write_line(&mut file, &change)?;
            }
            // A change of schema while the changes were read: they may not
            // fit the tables the target has.
            if fingerprint(&mut client)? != schema_then {
                return Ok(None);
            }
            file.flush()
                .map_err(EngineError::io("writing a database's changes"))?;
            Ok(Some(count))
        })?;
        if counted.is_some() {
            self.seq = seq;
            self.started = true;
        }
        Ok(counted)
    }

    /// Stops following: the slot and the publication are dropped (a slot
    /// left behind keeps the server's WAL forever), the base dump removed.
    pub(crate) fn end(self) {
        // The base may be gigabytes: removing it is not the caller's wait
        // (the last increment is shipped while the site is held).
        let dump = self.dump.clone();
        std::thread::spawn(move || std::fs::remove_file(dump));
        let slot = slot_name(&self.db);
        let db = self.db;
        if let Err(e) = off_runtime(|| connect(&db).and_then(|mut c| drop_slot(&mut c, &slot))) {
            eprintln!(
                "{:>12} replication slot {slot} of {db} may be left: {e}",
                "Warning"
            );
        }
    }
}

fn write_line(out: &mut dyn Write, change: &Change) -> Result<(), EngineError> {
    serde_json::to_writer(&mut *out, change).expect("json");
    out.write_all(b"\n")
        .map_err(EngineError::io("writing a database's changes"))
}

/// Where every sequence of the database stands.
fn sequences(client: &mut postgres::Client) -> Result<Vec<Change>, EngineError> {
    let names: Vec<(String, String)> = client
        .query(
            "SELECT schemaname::text, sequencename::text FROM pg_sequences \
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
            &[],
        )
        .map_err(internal("listing sequences"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let row = client
            .query_one(
                &format!(
                    "SELECT last_value, is_called FROM {}.{}",
                    ident(&name.0),
                    ident(&name.1)
                ),
                &[],
            )
            .map_err(internal("reading a sequence"))?;
        out.push(Change::Sequence {
            name,
            value: row.get(0),
            called: row.get(1),
        });
    }
    Ok(out)
}

/// A quoted SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A quoted SQL string (with `standard_conforming_strings` on).
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn table(name: &Name) -> String {
    format!("{}.{}", ident(&name.0), ident(&name.1))
}

fn matching(key: &Row) -> Result<String, String> {
    key.iter()
        .map(|(c, v)| match v {
            Some(v) => Ok(format!("{} = {}", ident(c), literal(v))),
            None => Err(format!("key column {c} has no value")),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|parts| parts.join(" AND "))
}

/// The statement that makes `change`, and how many rows it must touch
/// (when that is known).
fn statement(change: &Change) -> Result<(String, Option<u64>), String> {
    let clean = |s: &str| {
        if s.contains('\0') {
            Err("a name or value holds a NUL byte".to_string())
        } else {
            Ok(())
        }
    };
    let check_row = |row: &Row| -> Result<(), String> {
        for (c, v) in row {
            clean(c)?;
            if let Some(v) = v {
                clean(v)?;
            }
        }
        Ok(())
    };
    let check_name = |n: &Name| -> Result<(), String> {
        clean(&n.0)?;
        clean(&n.1)
    };
    Ok(match change {
        Change::Insert { table: t, row } => {
            check_name(t)?;
            check_row(row)?;
            if row.is_empty() {
                return Err("an insert without values".into());
            }
            let columns: Vec<String> = row.iter().map(|(c, _)| ident(c)).collect();
            let values: Vec<String> = row
                .iter()
                .map(|(_, v)| v.as_deref().map_or("NULL".to_string(), literal))
                .collect();
            (
                format!(
                    "INSERT INTO {} ({}) VALUES ({})",
                    table(t),
                    columns.join(", "),
                    values.join(", ")
                ),
                Some(1),
            )
        }
        Change::Update { table: t, key, row } => {
            check_name(t)?;
            check_row(key)?;
            check_row(row)?;
            if row.is_empty() {
                // Only values too large to send changed, and they were not
                // sent: the row is as the source had it before.
                return Ok((
                    format!("SELECT 1 FROM {} WHERE {}", table(t), matching(key)?),
                    Some(1),
                ));
            }
            let set: Vec<String> = row
                .iter()
                .map(|(c, v)| {
                    format!(
                        "{} = {}",
                        ident(c),
                        v.as_deref().map_or("NULL".to_string(), literal)
                    )
                })
                .collect();
            (
                format!(
                    "UPDATE {} SET {} WHERE {}",
                    table(t),
                    set.join(", "),
                    matching(key)?
                ),
                Some(1),
            )
        }
        Change::Delete { table: t, key } => {
            check_name(t)?;
            check_row(key)?;
            (
                format!("DELETE FROM {} WHERE {}", table(t), matching(key)?),
                Some(1),
            )
        }
        Change::Truncate {
            tables,
            cascade,
            restart_identity,
        } => {
            for t in tables {
                check_name(t)?;
            }
            if tables.is_empty() {
                return Err("a truncate of no table".into());
            }
            let names: Vec<String> = tables.iter().map(table).collect();
            (
                format!(
                    "TRUNCATE {}{}{}",
                    names.join(", "),
                    if *restart_identity {
                        " RESTART IDENTITY"
                    } else {
                        ""
                    },
                    if *cascade { " CASCADE" } else { "" }
                ),
                None,
            )
        }
        Change::Sequence {
            name,
            value,
            called,
        } => {
            check_name(name)?;
            (
                format!(
                    "SELECT setval({}::regclass, {value}, {called})",
                    literal(&table(name))
                ),
                Some(1),
            )
        }
    })
}

/// What a node building a copy has done with the copy's databases, kept
/// beside the copy (not in it: increments make the copy what the source
/// lists).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Caught {
    databases: BTreeMap<String, CaughtUp>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CaughtUp {
    base: String,
    seq: u64,
    /// Loaded into this server's database as changes come; else (a
    /// stopped copy of the site is kept here under the same names) the
    /// changes files are kept until the cut-over.
    live: bool,
}

impl Caught {
    fn read(dir: &Path) -> Caught {
        std::fs::read(dir.join("caught.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn write(&self, dir: &Path) -> Result<(), EngineError> {
        commons_runtime::layout::private_dir(dir)
            .map_err(EngineError::io("keeping the copy's databases' state"))?;
        commons_files::write_durable(
            &dir.join("caught.json"),
            &serde_json::to_vec(self).expect("json"),
        )
        .map_err(EngineError::io("keeping the copy's databases' state"))
    }
}

fn header_of(changes: &Path) -> Result<Option<Header>, EngineError> {
    let Ok(file) = std::fs::File::open(changes) else {
        return Ok(None);
    };
    let mut line = String::new();
    BufReader::new(file)
        .read_line(&mut line)
        .map_err(EngineError::io("reading a database's changes"))?;
    serde_json::from_str(&line).map(Some).map_err(|e| {
        EngineError::Input(format!(
            "{} does not begin with a header: {e}",
            changes.display()
        ))
    })
}

/// Applies the changes file at `changes` to database `db`, as its own
/// role; answers how many changes.
fn apply_changes(db: &str, changes: &Path) -> Result<u64, EngineError> {
    let file = std::fs::File::open(changes)
        .map_err(EngineError::io(format!("reading {}", changes.display())))?;
    let mut lines = BufReader::with_capacity(1 << 20, file).lines();
    let _header = lines.next();
    off_runtime(|| {
        let mut client = connect(db)?;
        let mut tx = client
            .transaction()
            .map_err(internal("beginning to apply changes"))?;
        tx.batch_execute(&format!(
            "SET LOCAL session_replication_role = replica; SET LOCAL standard_conforming_strings = on; SET LOCAL ROLE {}",
            ident(db)
        ))
        .map_err(internal("taking the database's role"))?;
        let mut count = 0;
        let mut batch = String::new();
        let mut expected = Vec::new();
        let flush = |tx: &mut postgres::Transaction,
                     batch: &mut String,
                     expected: &mut Vec<Option<u64>>| {
            if batch.is_empty() {
                return Ok(());
            }
            let done = tx
                .simple_query(batch)
                .map_err(internal("applying changes"))?;
            let touched = done.iter().filter_map(|m| match m {
                postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
                _ => None,
            });
            for (n, (want, got)) in expected.iter().zip(touched).enumerate() {
                if want.is_some_and(|w| w != got) {
                    return Err(EngineError::Internal(format!(
                            "the copy of {db} differs from its source: a change touched {got} rows, not {} ({})",
                            want.unwrap_or(0),
                            batch.split(";\n").nth(n).unwrap_or("").chars().take(200).collect::<String>()
                        )));
                }
            }
            batch.clear();
            expected.clear();
            Ok(())
        };
        for line in lines {
            let line = line.map_err(EngineError::io("reading a database's changes"))?;
            let change: Change = serde_json::from_str(&line)
                .map_err(|e| EngineError::Input(format!("a change of {db} is not one: {e}")))?;
            let (sql, touches) = statement(&change)
                .map_err(|e| EngineError::Input(format!("a change of {db}: {e}")))?;
            batch.push_str(&sql);
            batch.push_str(";\n");
            expected.push(touches);
            if !matches!(change, Change::Sequence { .. }) {
                count += 1;
            }
            if expected.len() >= 500 {
                flush(&mut tx, &mut batch, &mut expected)?;
            }
        }
        flush(&mut tx, &mut batch, &mut expected)?;
        tx.commit().map_err(internal("committing changes"))?;
        Ok(count)
    })
}

impl crate::Engine {
    /// Drops what following this machine's databases for a move left
    /// behind: a process that ships a site remembers its following in
    /// memory, so after a restart a slot would stay — keeping the server's
    /// WAL forever. Called as the shipping process starts; answers how many
    /// slots went.
    pub fn forget_moves(&self) -> Result<usize, EngineError> {
        if commons_runtime::settings::current()
            .postgres_admin_url
            .is_none()
        {
            return Ok(0);
        }
        let mut dropped = 0;
        for d in self.store.deployments()? {
            for (component, kind) in self.component_kinds(&d.name)? {
                if kind != "postgres" {
                    continue;
                }
                let db = commons_runtime::drivers::postgres::name(&d.name, &component);
                let slot = slot_name(&db);
                dropped += off_runtime(|| -> Result<usize, EngineError> {
                    let mut client = connect(&db)?;
                    let had = client
                        .query_one(
                            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                            &[&slot],
                        )
                        .map_err(internal("looking for a replication slot"))?
                        .get::<_, i64>(0);
                    drop_slot(&mut client, &slot)?;
                    Ok(had as usize)
                })?;
            }
            let _ = std::fs::remove_dir_all(self.layout.home.join("following").join(&d.name));
        }
        Ok(dropped)
    }

    /// Brings the databases of the copy of `name` being built at `copy` up
    /// to what the copy holds: a new base is loaded, new changes applied
    /// (see the module's text). `state` is a directory beside the copy.
    /// Answers what was done, for the operation's report.
    pub async fn follow_copy(
        &self,
        name: &str,
        copy: &Path,
        state: &Path,
    ) -> Result<String, EngineError> {
        let what = format!("{} is not a complete copy of a site", copy.display());
        let manifest = crate::backup::read_manifest(copy, &what)?;
        let mut caught = Caught::read(state);
        // A stopped copy of the site kept here holds the databases' names:
        // it stays as it is until the cut-over replaces it.
        let kept_here = self.store.deployment(name)?.is_some();
        let mut done = Vec::new();
        for component in &manifest.databases {
            let changes = copy.join("postgres").join(format!("{component}.changes"));
            let Some(header) = header_of(&changes)? else {
                // Not followed (any more): the dump is loaded at the
                // cut-over, into a database made then.
                if let Some(old) = caught.databases.remove(component) {
                    if old.live && !kept_here {
                        self.drop_database(name, component).await?;
                    }
                    caught.write(state)?;
                }
                continue;
            };
            let db = commons_runtime::drivers::postgres::name(name, component);
            let mut entry = caught
                .databases
                .get(component)
                .filter(|c| c.base == header.base)
                .cloned();
            if entry.is_none() {
                // A new base.
                let _ = std::fs::remove_dir_all(state.join(component));
                if !kept_here {
                    let url = self.fresh_database(name, component, copy).await?;
                    let dump = copy.join("postgres").join(format!("{component}.sql"));
                    tokio::task::block_in_place(|| crate::backup::load_database(&url, &dump))?;
                    done.push(format!("{component}: base loaded"));
                }
                entry = Some(CaughtUp {
                    base: header.base.clone(),
                    seq: 0,
                    live: !kept_here,
                });
            }
            let mut entry = entry.expect("set");
            if header.seq > entry.seq {
                if header.seq != entry.seq + 1 {
                    return Err(EngineError::Input(format!(
                        "changes {} of {component} arrived after {}: some are missing",
                        header.seq, entry.seq
                    )));
                }
                if entry.live {
                    let n = tokio::task::block_in_place(|| apply_changes(&db, &changes))?;
                    done.push(format!("{component}: {n} changes applied"));
                } else {
                    let keep = state.join(component);
                    commons_runtime::layout::private_dir(&keep)
                        .map_err(EngineError::io("keeping changes"))?;
                    std::fs::copy(&changes, keep.join(format!("{:012}", header.seq)))
                        .map_err(EngineError::io("keeping changes"))?;
                }
                entry.seq = header.seq;
            }
            caught.databases.insert(component.clone(), entry);
            caught.write(state)?;
        }
        caught.write(state)?;
        Ok(done.join(", "))
    }

    /// The database of component `component` of the copy at `copy`,
    /// dropped and made again empty; answers its role's URL.
    async fn fresh_database(
        &self,
        name: &str,
        component: &str,
        copy: &Path,
    ) -> Result<String, EngineError> {
        let spec = self.copy_spec(name, component, copy)?;
        self.drop_database(name, component).await?;
        let applied = commons_runtime::drivers::driver_for("postgres")
            .apply(&self.layout, &spec, None)
            .await
            .map_err(|e| EngineError::Internal(format!("making database {component}: {e}")))?;
        Ok(applied.outputs.get("url").cloned().unwrap_or_default())
    }

    /// Drops component `component`'s database and role, if there.
    pub(crate) async fn drop_database(
        &self,
        name: &str,
        component: &str,
    ) -> Result<(), EngineError> {
        commons_runtime::drivers::driver_for("postgres")
            .remove(&self.layout, name, component, &Default::default())
            .await
            .map_err(|e| EngineError::Internal(format!("dropping database {component}: {e}")))
    }

    fn copy_spec(
        &self,
        name: &str,
        component: &str,
        copy: &Path,
    ) -> Result<commons_runtime::Spec, EngineError> {
        let record: serde_json::Value = std::fs::read(copy.join("record/record.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| EngineError::Input("the copy holds no deployment record".into()))?;
        let root = record["root"].as_str().unwrap_or("source/commons.yaml");
        let target =
            crate::target::target_from_record(name.to_string(), &copy.join("record"), root)?;
        let c = target.blueprint.components.get(component).ok_or_else(|| {
            EngineError::Input(format!("the copy's blueprint has no component {component}"))
        })?;
        let mut spec = crate::plan::probe_spec(name, component, c);
        spec.credential = Some(self.secrets.derive(&format!("postgres/{name}/{component}")));
        Ok(spec)
    }

    /// Drops the databases made for a copy that will not be used (the move
    /// failed): those loaded as changes came, unless a deployment of the
    /// name runs here.
    pub async fn drop_copy_databases(&self, name: &str, state: &Path) -> Result<(), EngineError> {
        let caught = Caught::read(state);
        if self.store.deployment(name)?.is_none() {
            for (component, c) in &caught.databases {
                if c.live {
                    self.drop_database(name, component).await?;
                }
            }
        }
        let _ = std::fs::remove_dir_all(state);
        Ok(())
    }
}

/// How a restore from a copy treats database `component`: already loaded
/// as its changes came (nothing to do), or loaded from the copy's base and
/// the changes kept beside it.
pub(crate) fn finish_restore(
    state: Option<&Path>,
    db: &str,
    component: &str,
    copy: &Path,
    url: &str,
) -> Result<(), EngineError> {
    let changes = copy.join("postgres").join(format!("{component}.changes"));
    let header = header_of(&changes)?;
    let entry = state.and_then(|s| Caught::read(s).databases.get(component).cloned());
    if let (Some(h), Some(e)) = (&header, &entry) {
        if e.live && e.base == h.base && e.seq == h.seq {
            return Ok(());
        }
    }
    let dump = copy.join("postgres").join(format!("{component}.sql"));
    crate::backup::load_database(url, &dump)?;
    let Some(header) = header else {
        return Ok(());
    };
    // Changes kept while a stopped copy held the names, then the last.
    let mut kept: Vec<PathBuf> = match (state, &entry) {
        (Some(s), Some(e)) if e.base == header.base && !e.live => {
            std::fs::read_dir(s.join(component))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default()
        }
        _ => Vec::new(),
    };
    kept.sort();
    let mut last = 0;
    for path in &kept {
        apply_changes(db, path)?;
        last = header_of(path)?.map_or(last, |h| h.seq);
    }
    if header.seq > last {
        apply_changes(db, &changes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_quote_every_name_and_value() {
        let t = ("public".to_string(), "no\"tes".to_string());
        let (sql, n) = statement(&Change::Insert {
            table: t.clone(),
            row: vec![
                ("id".into(), Some("1".into())),
                ("body".into(), Some("it's'); DROP TABLE x; --".into())),
                ("gone".into(), None),
            ],
        })
        .unwrap();
        assert_eq!(
            sql,
            "INSERT INTO \"public\".\"no\"\"tes\" (\"id\", \"body\", \"gone\") VALUES ('1', 'it''s''); DROP TABLE x; --', NULL)"
        );
        assert_eq!(n, Some(1));
        let (sql, _) = statement(&Change::Update {
            table: t.clone(),
            key: vec![("id".into(), Some("1".into()))],
            row: vec![("body".into(), Some("b".into()))],
        })
        .unwrap();
        assert_eq!(
            sql,
            "UPDATE \"public\".\"no\"\"tes\" SET \"body\" = 'b' WHERE \"id\" = '1'"
        );
        assert!(statement(&Change::Delete {
            table: t.clone(),
            key: vec![("id".into(), None)],
        })
        .is_err());
        assert!(statement(&Change::Insert {
            table: t,
            row: vec![("id".into(), Some("a\0b".into()))],
        })
        .is_err());
        let (sql, _) = statement(&Change::Sequence {
            name: ("public".into(), "notes_id_seq".into()),
            value: 42,
            called: true,
        })
        .unwrap();
        assert_eq!(
            sql,
            "SELECT setval('\"public\".\"notes_id_seq\"'::regclass, 42, true)"
        );
    }
}
