//! The scale-out implementation: the same tables on a PostgreSQL server,
//! in a schema of their own. Every method is one statement or one
//! transaction, as in the SQLite store.

use std::sync::Mutex;

use ::postgres::{Client, NoTls};

use crate::*;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY, blueprint TEXT NOT NULL, inputs TEXT NOT NULL, status TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL, updated_at_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS components (
    deployment TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL, hash TEXT NOT NULL,
    config TEXT NOT NULL, outputs TEXT NOT NULL, handle TEXT NOT NULL, depends_on TEXT NOT NULL, error TEXT,
    updated_at_ms BIGINT NOT NULL, PRIMARY KEY (deployment, name));
CREATE TABLE IF NOT EXISTS runs (
    deployment TEXT NOT NULL, run BIGINT NOT NULL, outcome TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL, finished_at_ms BIGINT, PRIMARY KEY (deployment, run));
CREATE TABLE IF NOT EXISTS tasks (
    seq BIGSERIAL PRIMARY KEY, deployment TEXT NOT NULL, run BIGINT NOT NULL, component TEXT NOT NULL,
    action TEXT NOT NULL, outcome TEXT NOT NULL, attempts INTEGER NOT NULL, error TEXT,
    started_at_ms BIGINT NOT NULL, finished_at_ms BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_by_run ON tasks (deployment, run);
CREATE INDEX IF NOT EXISTS tasks_by_component ON tasks (deployment, component, seq);
CREATE TABLE IF NOT EXISTS audit (
    seq BIGSERIAL PRIMARY KEY, at_ms BIGINT NOT NULL, actor TEXT NOT NULL, org TEXT,
    action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_by_org ON audit (org, seq);
CREATE TABLE IF NOT EXISTS changes (
    rev BIGSERIAL PRIMARY KEY, key TEXT NOT NULL, kind TEXT NOT NULL,
    payload TEXT NOT NULL, at_ms BIGINT NOT NULL);
CREATE SEQUENCE IF NOT EXISTS shared_seq;
CREATE TABLE IF NOT EXISTS shared (
    kind TEXT NOT NULL, name TEXT NOT NULL, body BYTEA NOT NULL,
    seq BIGINT NOT NULL DEFAULT nextval('shared_seq'), PRIMARY KEY (kind, name));
CREATE INDEX IF NOT EXISTS shared_by_seq ON shared (kind, seq);
";

/// Adds a change to the outbox, in the caller's transaction (dropping, now
/// and then, those older than [`crate::CHANGES_KEPT`]). Writers take
/// one transaction-scoped lock first, so changes commit in `rev` order and
/// a consumer reading past its last `rev` never skips one that commits
/// late (instances sharing the database included).
fn record_change(
    tx: &mut ::postgres::Transaction<'_>,
    key: &str,
    kind: &str,
    payload: &str,
) -> Result<()> {
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext(current_schema()), hashtext('commons:changes'))",
        &[],
    )
    .map_err(pg)?;
    let rev: i64 = tx
        .query_one(
            "INSERT INTO changes (key, kind, payload, at_ms) VALUES ($1, $2, $3, $4) RETURNING rev",
            &[&key, &kind, &payload, &commons_clock::now_ms()],
        )
        .map_err(pg)?
        .get(0);
    if rev % 1_000 == 0 {
        tx.execute(
            "DELETE FROM changes WHERE rev <= $1",
            &[&(rev - crate::CHANGES_KEPT)],
        )
        .map_err(pg)?;
    }
    Ok(())
}

type Job = Box<dyn FnOnce(&mut Client) + Send>;

/// The PostgreSQL implementation of [`StateStore`].
///
/// The client lives on a thread of its own: the synchronous `postgres` client
/// drives its own runtime, which must not run inside the engine's.
pub struct PgStore {
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
}

pub(crate) fn pg(e: ::postgres::Error) -> StoreError {
    use ::postgres::error::SqlState;
    if e.code() == Some(&SqlState::CHARACTER_NOT_IN_REPERTOIRE) {
        return StoreError::Refused(
            "text may not contain the NUL character (U+0000, %00 in a URL); remove it".into(),
        );
    }
    StoreError::Postgres(e.to_string())
}

impl PgStore {
    /// Connects (a URL or `host=... user=... dbname=...`) and creates the
    /// tables in `schema` if needed.
    pub fn connect(url: &str, schema: &str) -> Result<PgStore> {
        if schema.is_empty()
            || !schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(StoreError::Open {
                path: url.into(),
                message: format!("invalid schema name {schema:?}"),
            });
        }
        let (url, schema) = (url.to_string(), schema.to_string());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("commons-pg-store".into())
            .spawn(move || {
                let connected = Client::connect(&url, NoTls).and_then(|mut c| {
                    c.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}; {SCHEMA} {} {}", crate::accounts::SCHEMA, crate::accounts::OIDC_SCHEMA))
                        .map(|_| c)
                });
                let mut client = match connected {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(pg(e)));
                        return;
                    }
                };
                // Runs until the store is dropped (the sender closes).
                for job in queue {
                    job(&mut client);
                }
            })
            .map_err(|e| StoreError::Postgres(e.to_string()))?;
        ready_rx
            .recv()
            .map_err(|_| StoreError::Postgres("the connection thread stopped".into()))??;
        Ok(PgStore {
            jobs: Mutex::new(jobs),
        })
    }

    pub(crate) fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        let job: Job = Box::new(move |c| {
            let _ = tx.send(f(c));
        });
        self.jobs
            .lock()
            .expect("store lock")
            .send(job)
            .map_err(|_| StoreError::Postgres("the connection thread stopped".into()))?;
        rx.recv()
            .map_err(|_| StoreError::Postgres("the connection thread stopped".into()))?
    }
}

fn deployment(r: &::postgres::Row) -> Result<DeploymentRow> {
    Ok(DeploymentRow {
        name: r.get(0),
        blueprint: r.get(1),
        inputs: serde_json::from_str(r.get::<_, &str>(2))?,
        status: r.get(3),
        created_at_ms: r.get(4),
        updated_at_ms: r.get(5),
    })
}

fn task(r: &::postgres::Row) -> TaskRow {
    TaskRow {
        run: r.get(0),
        component: r.get(1),
        action: r.get(2),
        outcome: r.get(3),
        attempts: r.get::<_, i32>(4) as u32,
        error: r.get(5),
        started_at_ms: r.get(6),
        finished_at_ms: r.get(7),
    }
}

const DEPLOYMENT_COLS: &str = "name, blueprint, inputs, status, created_at_ms, updated_at_ms";
const TASK_COLS: &str =
    "run, component, action, outcome, attempts, error, started_at_ms, finished_at_ms";

impl StateStore for PgStore {
    fn deployment(&self, name: &str) -> Result<Option<DeploymentRow>> {
        let name = name.to_string();
        self.with(move |c| {
            let rows = c
                .query(
                    &format!("SELECT {DEPLOYMENT_COLS} FROM deployments WHERE name = $1"),
                    &[&name],
                )
                .map_err(pg)?;
            rows.first().map(deployment).transpose()
        })
    }

    fn deployments(&self) -> Result<Vec<DeploymentRow>> {
        self.with(move |c| {
            c.query(
                &format!("SELECT {DEPLOYMENT_COLS} FROM deployments ORDER BY name"),
                &[],
            )
            .map_err(pg)?
            .iter()
            .map(deployment)
            .collect()
        })
    }

    fn put_deployment(&self, row: &DeploymentRow) -> Result<()> {
        let inputs = serde_json::to_string(&row.inputs)?;
        let row = row.clone();
        self.with(move |c| {
            let mut tx = c.transaction().map_err(pg)?;
            tx.execute(
                "INSERT INTO deployments (name, blueprint, inputs, status, created_at_ms, updated_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (name) DO UPDATE SET blueprint = $2, inputs = $3, status = $4, updated_at_ms = $6",
                &[&row.name, &row.blueprint, &inputs, &row.status, &row.created_at_ms, &row.updated_at_ms],
            )
            .map_err(pg)?;
            let payload = serde_json::json!({ "status": row.status }).to_string();
            record_change(&mut tx, &row.name, "deployment.put", &payload)?;
            tx.commit().map_err(pg)
        })
    }

    fn delete_deployment(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.with(move |c| {
            let mut tx = c.transaction().map_err(pg)?;
            for table in ["components", "tasks", "runs"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE deployment = $1"),
                    &[&name],
                )
                .map_err(pg)?;
            }
            tx.execute("DELETE FROM deployments WHERE name = $1", &[&name])
                .map_err(pg)?;
            record_change(&mut tx, &name, "deployment.delete", "{}")?;
            tx.commit().map_err(pg)
        })
    }

    fn components(&self, deployment: &str) -> Result<Vec<ComponentRow>> {
        let deployment = deployment.to_string();
        self.with(move |c| {
            let rows = c
                .query(
                    "SELECT name, kind, state, hash, config, outputs, handle, depends_on, error, updated_at_ms
                     FROM components WHERE deployment = $1 ORDER BY name",
                    &[&deployment],
                )
                .map_err(pg)?;
            rows.iter()
                .map(|r| {
                    Ok(ComponentRow {
                        name: r.get(0),
                        kind: r.get(1),
                        state: ComponentState::parse(r.get(2)),
                        hash: r.get(3),
                        config: serde_json::from_str(r.get::<_, &str>(4))?,
                        outputs: serde_json::from_str(r.get::<_, &str>(5))?,
                        handle: serde_json::from_str(r.get::<_, &str>(6))?,
                        depends_on: serde_json::from_str(r.get::<_, &str>(7))?,
                        error: r.get(8),
                        updated_at_ms: r.get(9),
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
        let (deployment, changes, tasks) =
            (deployment.to_string(), changes.to_vec(), tasks.to_vec());
        self.with(move |c| {
            let mut tx = c.transaction().map_err(pg)?;
            let put = tx
                .prepare(
                    "INSERT INTO components (deployment, name, kind, state, hash, config, outputs, handle, depends_on, error, updated_at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
                     ON CONFLICT (deployment, name) DO UPDATE SET kind = $3, state = $4, hash = $5, config = $6,
                        outputs = $7, handle = $8, depends_on = $9, error = $10, updated_at_ms = $11",
                )
                .map_err(pg)?;
            for change in &changes {
                match change {
                    ComponentChange::Put(r) => {
                        let (config, outputs) = (serde_json::to_string(&r.config)?, serde_json::to_string(&r.outputs)?);
                        let (handle, deps) = (serde_json::to_string(&r.handle)?, serde_json::to_string(&r.depends_on)?);
                        tx.execute(
                            &put,
                            &[&deployment, &r.name, &r.kind, &r.state.as_str(), &r.hash, &config, &outputs, &handle, &deps, &r.error, &r.updated_at_ms],
                        )
                        .map_err(pg)?;
                    }
                    ComponentChange::Delete(name) => {
                        tx.execute("DELETE FROM components WHERE deployment = $1 AND name = $2", &[&deployment, name])
                            .map_err(pg)?;
                    }
                }
            }
            for t in &tasks {
                tx.execute(
                    "INSERT INTO tasks (deployment, run, component, action, outcome, attempts, error, started_at_ms, finished_at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &[&deployment, &t.run, &t.component, &t.action, &t.outcome, &(t.attempts as i32), &t.error, &t.started_at_ms, &t.finished_at_ms],
                )
                .map_err(pg)?;
            }
            let payload = crate::applied_payload(&changes, tasks.len());
            record_change(&mut tx, &deployment, "components.apply", &payload)?;
            tx.commit().map_err(pg)
        })
    }

    fn begin_run(&self, deployment: &str, started_at_ms: i64) -> Result<i64> {
        let deployment = deployment.to_string();
        self.with(move |c| {
            let mut tx = c.transaction().map_err(pg)?;
            // Serialise run numbering per deployment.
            tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&deployment]).map_err(pg)?;
            let run: i64 = tx
                .query_one("SELECT COALESCE(MAX(run), 0) + 1 FROM runs WHERE deployment = $1", &[&deployment])
                .map_err(pg)?
                .get(0);
            tx.execute(
                "INSERT INTO runs (deployment, run, outcome, started_at_ms) VALUES ($1, $2, 'running', $3)",
                &[&deployment, &run, &started_at_ms],
            )
            .map_err(pg)?;
            tx.commit().map_err(pg)?;
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
        let (deployment, outcome) = (deployment.to_string(), outcome.to_string());
        self.with(move |c| {
            let mut tx = c.transaction().map_err(pg)?;
            tx.execute(
                "UPDATE runs SET outcome = $3, finished_at_ms = $4 WHERE deployment = $1 AND run = $2",
                &[&deployment, &run, &outcome, &finished_at_ms],
            )
            .map_err(pg)?;
            let payload = serde_json::json!({ "run": run, "outcome": outcome }).to_string();
            record_change(&mut tx, &deployment, "run.finish", &payload)?;
            tx.commit().map_err(pg)
        })
    }

    fn revision(&self) -> Result<i64> {
        self.with(|c| {
            Ok(
                c.query_one("SELECT COALESCE(MAX(rev), 0) FROM changes", &[])
                    .map_err(pg)?
                    .get(0),
            )
        })
    }

    fn changes_since(&self, rev: i64, limit: u32) -> Result<Vec<Change>> {
        self.with(move |c| {
            Ok(c.query(
                "SELECT rev, key, kind, payload, at_ms FROM changes WHERE rev > $1 ORDER BY rev LIMIT $2",
                &[&rev, &(limit as i64)],
            )
            .map_err(pg)?
            .iter()
            .map(|r| Change {
                rev: r.get(0),
                key: r.get(1),
                kind: r.get(2),
                payload: r.get(3),
                at_ms: r.get(4),
            })
            .collect())
        })
    }

    fn tasks(&self, deployment: &str, run: i64) -> Result<Vec<TaskRow>> {
        let deployment = deployment.to_string();
        self.with(move |c| {
            Ok(c.query(
                &format!(
                    "SELECT {TASK_COLS} FROM tasks WHERE deployment = $1 AND run = $2 ORDER BY seq"
                ),
                &[&deployment, &run],
            )
            .map_err(pg)?
            .iter()
            .map(task)
            .collect())
        })
    }

    fn statuses(&self, names: &[String]) -> Result<std::collections::HashMap<String, String>> {
        let names = names.to_vec();
        self.with(move |c| {
            Ok(c.query(
                "SELECT name, status FROM deployments WHERE name = ANY($1)",
                &[&names],
            )
            .map_err(pg)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
        })
    }

    fn keep_first(&self, kind: &str, name: &str, body: &[u8]) -> Result<Vec<u8>> {
        let (kind, name, body) = (kind.to_string(), name.to_string(), body.to_vec());
        self.with(move |c| {
            c.execute(
                "INSERT INTO shared (kind, name, body) VALUES ($1, $2, $3)
                 ON CONFLICT (kind, name) DO NOTHING",
                &[&kind, &name, &body],
            )
            .map_err(pg)?;
            Ok(c.query_one(
                "SELECT body FROM shared WHERE kind = $1 AND name = $2",
                &[&kind, &name],
            )
            .map_err(pg)?
            .get(0))
        })
    }

    fn put_shared(&self, kind: &str, name: &str, body: &[u8]) -> Result<i64> {
        let (kind, name, body) = (kind.to_string(), name.to_string(), body.to_vec());
        self.with(move |c| {
            Ok(c.query_one(
                "INSERT INTO shared (kind, name, body) VALUES ($1, $2, $3)
                 ON CONFLICT (kind, name)
                 DO UPDATE SET body = excluded.body, seq = nextval('shared_seq')
                 RETURNING seq",
                &[&kind, &name, &body],
            )
            .map_err(pg)?
            .get(0))
        })
    }

    fn shared(&self, kind: &str, name: &str) -> Result<Option<Vec<u8>>> {
        let (kind, name) = (kind.to_string(), name.to_string());
        self.with(move |c| {
            Ok(c.query_opt(
                "SELECT body FROM shared WHERE kind = $1 AND name = $2",
                &[&kind, &name],
            )
            .map_err(pg)?
            .map(|r| r.get(0)))
        })
    }

    fn shared_since(&self, kind: &str, after: i64) -> Result<Vec<SharedEntry>> {
        let kind = kind.to_string();
        self.with(move |c| {
            Ok(c.query(
                "SELECT name, body, seq FROM shared WHERE kind = $1 AND seq > $2 ORDER BY seq",
                &[&kind, &after],
            )
            .map_err(pg)?
            .iter()
            .map(|r| SharedEntry {
                name: r.get(0),
                body: r.get(1),
                seq: r.get(2),
            })
            .collect())
        })
    }

    fn delete_shared(&self, kind: &str, name: &str) -> Result<()> {
        let (kind, name) = (kind.to_string(), name.to_string());
        self.with(move |c| {
            c.execute(
                "DELETE FROM shared WHERE kind = $1 AND name = $2",
                &[&kind, &name],
            )
            .map_err(pg)?;
            Ok(())
        })
    }

    fn take_shared(&self, kind: &str, name: &str) -> Result<Option<Vec<u8>>> {
        let (kind, name) = (kind.to_string(), name.to_string());
        self.with(move |c| {
            Ok(c.query_opt(
                "DELETE FROM shared WHERE kind = $1 AND name = $2 RETURNING body",
                &[&kind, &name],
            )
            .map_err(pg)?
            .map(|r| r.get(0)))
        })
    }

    fn last_tasks(&self, deployment: &str) -> Result<Vec<TaskRow>> {
        let deployment = deployment.to_string();
        self.with(move |c| {
            Ok(c.query(
                &format!(
                    "SELECT {TASK_COLS} FROM tasks WHERE seq IN
                       (SELECT MAX(seq) FROM tasks WHERE deployment = $1 GROUP BY component)
                     ORDER BY seq"
                ),
                &[&deployment],
            )
            .map_err(pg)?
            .iter()
            .map(task)
            .collect())
        })
    }
}
