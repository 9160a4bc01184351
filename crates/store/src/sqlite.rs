//! The embedded default: one SQLite file in WAL mode.
//!
//! `synchronous = NORMAL` with WAL keeps every committed transaction across a
//! crash of the process (the case `kill -9` tests); only a power loss can take
//! back the last few, and never tears one.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::*;

const V1: &str = r#"
CREATE TABLE deployments (
    name TEXT PRIMARY KEY,
    blueprint TEXT NOT NULL,
    inputs TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    last_run INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE components (
    deployment TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    hash TEXT NOT NULL,
    config TEXT NOT NULL,
    outputs TEXT NOT NULL,
    handle TEXT NOT NULL,
    depends_on TEXT NOT NULL,
    error TEXT,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (deployment, name)
) WITHOUT ROWID;
CREATE TABLE runs (
    deployment TEXT NOT NULL,
    run INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER,
    PRIMARY KEY (deployment, run)
) WITHOUT ROWID;
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    deployment TEXT NOT NULL,
    run INTEGER NOT NULL,
    component TEXT NOT NULL,
    action TEXT NOT NULL,
    outcome TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT,
    started_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER NOT NULL
);
CREATE INDEX tasks_by_run ON tasks (deployment, run);
CREATE INDEX tasks_by_component ON tasks (deployment, component, seq);
"#;

/// Each migration is run once, in order, its pieces in one transaction.
const MIGRATIONS: &[&[&str]] = &[
    &[V1],
    &[crate::accounts::SCHEMA, AUDIT],
    &[crate::accounts::OIDC_SCHEMA],
    &[OUTBOX],
    &[SHARED],
];

const SHARED: &str = "
CREATE TABLE shared (
    kind TEXT NOT NULL, name TEXT NOT NULL, body BLOB NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (kind, name));
CREATE INDEX shared_by_seq ON shared (kind, seq);
";

const OUTBOX: &str = "
CREATE TABLE changes (
    rev INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, kind TEXT NOT NULL,
    payload TEXT NOT NULL, at_ms INTEGER NOT NULL);
";

/// Adds a change to the outbox, in the caller's transaction, and now and
/// then drops those older than [`crate::CHANGES_KEPT`].
fn record_change(c: &Connection, key: &str, kind: &str, payload: &str) -> rusqlite::Result<()> {
    c.prepare_cached("INSERT INTO changes (key, kind, payload, at_ms) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![key, kind, payload, commons_clock::now_ms()])?;
    let rev = c.last_insert_rowid();
    if rev % 1_000 == 0 {
        c.prepare_cached("DELETE FROM changes WHERE rev <= ?1")?
            .execute([rev - crate::CHANGES_KEPT])?;
    }
    Ok(())
}

const AUDIT: &str = "
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL, actor TEXT NOT NULL, org TEXT,
    action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX audit_by_org ON audit (org, seq);
";

/// The SQLite implementation of [`StateStore`].
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` and migrates it.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
        }
        let mut conn = Connection::open(path)?;
        // Only the platform reads its state (SQLite gives the WAL the same mode).
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // Several connections write this file (the engine's, the accounts',
        // another command's): a transaction that starts as a reader and then
        // writes cannot wait for the lock (SQLite answers "database is
        // locked" at once), so every transaction takes the write lock first.
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        // Switching a new file to WAL takes it whole, and SQLite answers
        // "busy" at once rather than waiting when another process opens
        // it at the same time: try again, within the busy timeout.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match conn.pragma_update(None, "journal_mode", "WAL") {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                other => break other?,
            }
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let store = SqliteStore {
            conn: Mutex::new(conn),
        };
        store.migrate()?;
        Ok(store)
    }

    /// An in-memory store, for tests.
    pub fn memory() -> Result<SqliteStore> {
        let store = SqliteStore {
            conn: Mutex::new(Connection::open_in_memory()?),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> Result<()> {
        let mut conn = self.conn.lock().expect("store lock");
        // The version is read under the write lock: two processes opening a
        // new store at once must not both migrate it.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, pieces) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            for sql in *pieces {
                tx.execute_batch(sql)?;
            }
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        }
        tx.commit()?;
        Ok(())
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut conn = self.conn.lock().expect("store lock");
        f(&mut conn)
    }
}

fn deployment_row(r: &rusqlite::Row) -> rusqlite::Result<(DeploymentRow, String)> {
    Ok((
        DeploymentRow {
            name: r.get(0)?,
            blueprint: r.get(1)?,
            inputs: serde_json::Value::Null,
            status: r.get(3)?,
            created_at_ms: r.get(4)?,
            updated_at_ms: r.get(5)?,
        },
        r.get(2)?,
    ))
}

fn finish_deployment((mut row, inputs): (DeploymentRow, String)) -> Result<DeploymentRow> {
    row.inputs = serde_json::from_str(&inputs)?;
    Ok(row)
}

fn task_row(r: &rusqlite::Row) -> rusqlite::Result<TaskRow> {
    Ok(TaskRow {
        run: r.get(0)?,
        component: r.get(1)?,
        action: r.get(2)?,
        outcome: r.get(3)?,
        attempts: r.get(4)?,
        error: r.get(5)?,
        started_at_ms: r.get(6)?,
        finished_at_ms: r.get(7)?,
    })
}

const DEPLOYMENT_COLS: &str = "name, blueprint, inputs, status, created_at_ms, updated_at_ms";
const TASK_COLS: &str =
    "run, component, action, outcome, attempts, error, started_at_ms, finished_at_ms";

impl StateStore for SqliteStore {
    fn deployment(&self, name: &str) -> Result<Option<DeploymentRow>> {
        self.with(|c| {
            let row = c
                .query_row(
                    &format!("SELECT {DEPLOYMENT_COLS} FROM deployments WHERE name = ?1"),
                    [name],
                    deployment_row,
                )
                .optional()?;
            row.map(finish_deployment).transpose()
        })
    }

    fn deployments(&self) -> Result<Vec<DeploymentRow>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT {DEPLOYMENT_COLS} FROM deployments ORDER BY name"
            ))?;
            let rows = stmt
                .query_map([], deployment_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows.into_iter().map(finish_deployment).collect()
        })
    }

    fn put_deployment(&self, row: &DeploymentRow) -> Result<()> {
        let inputs = serde_json::to_string(&row.inputs)?;
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO deployments (name, blueprint, inputs, status, created_at_ms, updated_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (name) DO UPDATE SET blueprint = ?2, inputs = ?3, status = ?4, updated_at_ms = ?6",
                params![row.name, row.blueprint, inputs, row.status, row.created_at_ms, row.updated_at_ms],
            )?;
            let payload = serde_json::json!({ "status": row.status }).to_string();
            record_change(&tx, &row.name, "deployment.put", &payload)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn delete_deployment(&self, name: &str) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            for table in ["components", "tasks", "runs"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE deployment = ?1"),
                    [name],
                )?;
            }
            tx.execute("DELETE FROM deployments WHERE name = ?1", [name])?;
            record_change(&tx, name, "deployment.delete", "{}")?;
            tx.commit()?;
            Ok(())
        })
    }

    fn components(&self, deployment: &str) -> Result<Vec<ComponentRow>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT name, kind, state, hash, config, outputs, handle, depends_on, error, updated_at_ms
                 FROM components WHERE deployment = ?1 ORDER BY name",
            )?;
            let raw = stmt
                .query_map([deployment], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, String>(6)?,
                        r.get::<_, String>(7)?,
                        r.get::<_, Option<String>>(8)?,
                        r.get::<_, i64>(9)?,
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            raw.into_iter()
                .map(|(name, kind, state, hash, config, outputs, handle, deps, error, at)| {
                    Ok(ComponentRow {
                        name,
                        kind,
                        state: ComponentState::parse(&state),
                        hash,
                        config: serde_json::from_str(&config)?,
                        outputs: serde_json::from_str(&outputs)?,
                        handle: serde_json::from_str(&handle)?,
                        depends_on: serde_json::from_str(&deps)?,
                        error,
                        updated_at_ms: at,
                    })
                })
                .collect()
        })
    }

    fn apply(
        &self,
        deployment: &str,
        changes: &[ComponentChange],
        tasks: &[TaskRow],
    ) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut put = tx.prepare_cached(
                    "INSERT INTO components (deployment, name, kind, state, hash, config, outputs, handle, depends_on, error, updated_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                     ON CONFLICT (deployment, name) DO UPDATE SET kind = ?3, state = ?4, hash = ?5, config = ?6,
                        outputs = ?7, handle = ?8, depends_on = ?9, error = ?10, updated_at_ms = ?11",
                )?;
                let mut delete =
                    tx.prepare_cached("DELETE FROM components WHERE deployment = ?1 AND name = ?2")?;
                for change in changes {
                    match change {
                        ComponentChange::Put(r) => {
                            put.execute(params![
                                deployment,
                                r.name,
                                r.kind,
                                r.state.as_str(),
                                r.hash,
                                serde_json::to_string(&r.config)?,
                                serde_json::to_string(&r.outputs)?,
                                serde_json::to_string(&r.handle)?,
                                serde_json::to_string(&r.depends_on)?,
                                r.error,
                                r.updated_at_ms,
                            ])?;
                        }
                        ComponentChange::Delete(name) => {
                            delete.execute(params![deployment, name])?;
                        }
                    }
                }
                let mut task = tx.prepare_cached(
                    "INSERT INTO tasks (deployment, run, component, action, outcome, attempts, error, started_at_ms, finished_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?;
                for t in tasks {
                    task.execute(params![
                        deployment,
                        t.run,
                        t.component,
                        t.action,
                        t.outcome,
                        t.attempts,
                        t.error,
                        t.started_at_ms,
                        t.finished_at_ms
                    ])?;
                }
            }
            let payload = crate::applied_payload(changes, tasks.len());
            record_change(&tx, deployment, "components.apply", &payload)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn begin_run(&self, deployment: &str, started_at_ms: i64) -> Result<i64> {
        self.with(|c| {
            let tx = c.transaction()?;
            let run: i64 = tx.query_row(
                "SELECT COALESCE(MAX(run), 0) + 1 FROM runs WHERE deployment = ?1",
                [deployment],
                |r| r.get(0),
            )?;
            tx.execute(
                "INSERT INTO runs (deployment, run, outcome, started_at_ms) VALUES (?1, ?2, 'running', ?3)",
                params![deployment, run, started_at_ms],
            )?;
            tx.commit()?;
            Ok(run)
        })
    }

    fn finish_run(
        &self,
        deployment: &str,
        run: i64,
        outcome: &str,
        finished_at_ms: i64,
    ) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE runs SET outcome = ?3, finished_at_ms = ?4 WHERE deployment = ?1 AND run = ?2",
                params![deployment, run, outcome, finished_at_ms],
            )?;
            let payload = serde_json::json!({ "run": run, "outcome": outcome }).to_string();
            record_change(&tx, deployment, "run.finish", &payload)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn tasks(&self, deployment: &str, run: i64) -> Result<Vec<TaskRow>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE deployment = ?1 AND run = ?2 ORDER BY seq"
            ))?;
            let rows = stmt
                .query_map(params![deployment, run], task_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn statuses(&self, names: &[String]) -> Result<std::collections::HashMap<String, String>> {
        let names = serde_json::to_string(names)?;
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT name, status FROM deployments WHERE name IN (SELECT value FROM json_each(?1))",
            )?;
            let rows = stmt
                .query_map([names], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
    }

    fn revision(&self) -> Result<i64> {
        self.with(|c| {
            Ok(
                c.prepare_cached("SELECT COALESCE(MAX(rev), 0) FROM changes")?
                    .query_row([], |r| r.get(0))?,
            )
        })
    }

    fn changes_since(&self, rev: i64, limit: u32) -> Result<Vec<Change>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT rev, key, kind, payload, at_ms FROM changes WHERE rev > ?1 ORDER BY rev LIMIT ?2",
            )?;
            let rows = stmt
                .query_map(params![rev, limit], |r| {
                    Ok(Change {
                        rev: r.get(0)?,
                        key: r.get(1)?,
                        kind: r.get(2)?,
                        payload: r.get(3)?,
                        at_ms: r.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn keep_first(&self, kind: &str, name: &str, body: &[u8]) -> Result<Vec<u8>> {
        // `WHERE true`: SQLite reads `ON CONFLICT` after a bare `SELECT ...
        // FROM` as a join's constraint.
        self.with(|c| {
            let tx = c.transaction()?;
            tx.prepare_cached(
                "INSERT INTO shared (kind, name, body, seq)
                 SELECT ?1, ?2, ?3, COALESCE(MAX(seq), 0) + 1 FROM shared WHERE true
                 ON CONFLICT (kind, name) DO NOTHING",
            )?
            .execute(params![kind, name, body])?;
            let kept = tx
                .prepare_cached("SELECT body FROM shared WHERE kind = ?1 AND name = ?2")?
                .query_row(params![kind, name], |r| r.get(0))?;
            tx.commit()?;
            Ok(kept)
        })
    }

    fn put_shared(&self, kind: &str, name: &str, body: &[u8]) -> Result<i64> {
        self.with(|c| {
            Ok(c.prepare_cached(
                "INSERT INTO shared (kind, name, body, seq)
                 SELECT ?1, ?2, ?3, COALESCE(MAX(seq), 0) + 1 FROM shared WHERE true
                 ON CONFLICT (kind, name) DO UPDATE SET body = excluded.body, seq = excluded.seq
                 RETURNING seq",
            )?
            .query_row(params![kind, name, body], |r| r.get(0))?)
        })
    }

    fn shared(&self, kind: &str, name: &str) -> Result<Option<Vec<u8>>> {
        use rusqlite::OptionalExtension;
        self.with(|c| {
            Ok(
                c.prepare_cached("SELECT body FROM shared WHERE kind = ?1 AND name = ?2")?
                    .query_row(params![kind, name], |r| r.get(0))
                    .optional()?,
            )
        })
    }

    fn shared_since(&self, kind: &str, after: i64) -> Result<Vec<SharedEntry>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT name, body, seq FROM shared WHERE kind = ?1 AND seq > ?2 ORDER BY seq",
            )?;
            let rows = stmt
                .query_map(params![kind, after], |r| {
                    Ok(SharedEntry {
                        name: r.get(0)?,
                        body: r.get(1)?,
                        seq: r.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }

    fn delete_shared(&self, kind: &str, name: &str) -> Result<()> {
        self.with(|c| {
            c.prepare_cached("DELETE FROM shared WHERE kind = ?1 AND name = ?2")?
                .execute(params![kind, name])?;
            Ok(())
        })
    }

    fn take_shared(&self, kind: &str, name: &str) -> Result<Option<Vec<u8>>> {
        use rusqlite::OptionalExtension;
        self.with(|c| {
            Ok(
                c.prepare_cached(
                    "DELETE FROM shared WHERE kind = ?1 AND name = ?2 RETURNING body",
                )?
                .query_row(params![kind, name], |r| r.get(0))
                .optional()?,
            )
        })
    }

    fn last_tasks(&self, deployment: &str) -> Result<Vec<TaskRow>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE seq IN
                   (SELECT MAX(seq) FROM tasks WHERE deployment = ?1 GROUP BY component)
                 ORDER BY seq"
            ))?;
            let rows = stmt
                .query_map([deployment], task_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn component(name: &str) -> ComponentRow {
        ComponentRow {
            name: name.into(),
            kind: "job".into(),
            state: ComponentState::Ready,
            hash: "h".into(),
            config: serde_json::json!({"command": "true"}),
            outputs: serde_json::json!({}),
            handle: serde_json::Value::Null,
            depends_on: vec![],
            error: None,
            updated_at_ms: 1,
        }
    }

    #[test]
    fn a_new_store_opened_by_many_at_once_is_migrated_once() {
        let dir = std::env::temp_dir().join(format!("commons-store-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("state.db");
        let opened: Vec<std::result::Result<SqliteStore, String>> = std::thread::scope(|s| {
            (0..8)
                .map(|_| s.spawn(|| SqliteStore::open(&path).map_err(|e| e.to_string())))
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect()
        });
        let failed: Vec<&String> = opened.iter().filter_map(|o| o.as_ref().err()).collect();
        assert!(failed.is_empty(), "{failed:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn round_trip_and_delete() {
        let s = SqliteStore::memory().unwrap();
        s.put_deployment(&DeploymentRow {
            name: "d".into(),
            blueprint: "/x/commons.yaml".into(),
            inputs: serde_json::json!({"a": 1}),
            status: "ok".into(),
            created_at_ms: 1,
            updated_at_ms: 2,
        })
        .unwrap();
        let run = s.begin_run("d", 5).unwrap();
        assert_eq!(run, 1);
        s.apply(
            "d",
            &[
                ComponentChange::Put(component("b")),
                ComponentChange::Put(component("a")),
            ],
            &[TaskRow {
                run,
                component: "a".into(),
                action: "create".into(),
                outcome: "ok".into(),
                attempts: 1,
                error: None,
                started_at_ms: 5,
                finished_at_ms: 6,
            }],
        )
        .unwrap();
        let names: Vec<String> = s
            .components("d")
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(s.tasks("d", run).unwrap().len(), 1);
        assert_eq!(s.begin_run("d", 7).unwrap(), 2);
        assert_eq!(s.deployment("d").unwrap().unwrap().inputs["a"], 1);
        s.apply("d", &[ComponentChange::Delete("a".into())], &[])
            .unwrap();
        assert_eq!(s.components("d").unwrap().len(), 1);
        s.delete_deployment("d").unwrap();
        assert!(s.deployment("d").unwrap().is_none());
        assert!(s.components("d").unwrap().is_empty());
    }
}
