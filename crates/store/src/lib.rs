//! Persistence behind traits.
//!
//! [`StateStore`] is what the engine needs: deployments, the recorded state
//! of their components, and the log of runs and tasks. [`SqliteStore`] is the
//! embedded default (one file, WAL); [`PgStore`] keeps the same tables on a
//! PostgreSQL server. Both pass the same test suite; nothing outside this
//! crate sees SQL.

#![forbid(unsafe_code)]

pub mod accounts;
mod config;
pub mod entries;
mod lease;
mod pg;
mod sqlite;

use serde::{Deserialize, Serialize};

pub use accounts::AccountStore;
pub use config::{StoreConfig, DATABASE_SCHEMA_VAR, DATABASE_URL_VAR};
pub use lease::{Lease, Leased};
pub use pg::PgStore;
pub use sqlite::SqliteStore;

/// A store failure. Storage errors are not the user's fault: they carry the
/// underlying cause for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("state store holds malformed data: {0}")]
    Json(#[from] serde_json::Error),
    #[error("state store (PostgreSQL): {0}")]
    Postgres(String),
    /// Text the store cannot keep (PostgreSQL keeps no NUL character in
    /// text): the caller's to fix, not the store's failure.
    #[error("{0}")]
    Refused(String),
    #[error("state store at {path}: {message}")]
    Open { path: String, message: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One deployment: a blueprint deployed under a name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRow {
    pub name: String,
    /// The blueprint file last deployed.
    pub blueprint: String,
    /// Input values last deployed (never secrets).
    pub inputs: serde_json::Value,
    /// ok, failed, running or destroyed.
    pub status: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// Life-cycle state of a recorded component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentState {
    /// A task is acting on it; if the deploy dies, the next one finishes the job.
    Applying,
    /// The last task succeeded; `hash` is what it was applied with.
    Ready,
    /// The last task failed; whatever it left is tracked in `handle`.
    Error,
    /// A destroy is removing it.
    Deleting,
}

impl ComponentState {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentState::Applying => "applying",
            ComponentState::Ready => "ready",
            ComponentState::Error => "error",
            ComponentState::Deleting => "deleting",
        }
    }

    pub(crate) fn parse(s: &str) -> ComponentState {
        match s {
            "applying" => ComponentState::Applying,
            "ready" => ComponentState::Ready,
            "deleting" => ComponentState::Deleting,
            _ => ComponentState::Error,
        }
    }
}

/// The recorded state of one component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComponentRow {
    pub name: String,
    pub kind: String,
    pub state: ComponentState,
    /// Hash of everything the component read when it was last applied.
    pub hash: String,
    /// The attribute values it was last applied with (secrets as keyed hashes).
    pub config: serde_json::Value,
    /// Attributes others may read (`port`, `url`, `path`).
    pub outputs: serde_json::Value,
    /// What the driver needs to find it again (pid, instance token, ...).
    pub handle: serde_json::Value,
    /// Components it depends on, so that deletes can run in reverse order.
    pub depends_on: Vec<String>,
    pub error: Option<String>,
    pub updated_at_ms: i64,
}

/// One task of a run, as it finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRow {
    pub run: i64,
    pub component: String,
    /// create, update, replace, delete.
    pub action: String,
    /// ok, failed, blocked, timeout.
    pub outcome: String,
    pub attempts: u32,
    pub error: Option<String>,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
}

/// A change to a deployment's components, applied atomically with others.
#[derive(Debug, Clone)]
// Changes live only briefly, in one batch; boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum ComponentChange {
    Put(ComponentRow),
    Delete(String),
}

/// One change to the recorded state, as the outbox keeps it: written in
/// the same transaction as the change, numbered in commit order, so a
/// consumer (the gateway's routes, a relay to an event bus) that remembers
/// the last `rev` it saw resumes from there and misses nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub rev: i64,
    /// The deployment it is about.
    pub key: String,
    /// `deployment.put`, `deployment.delete`, `components.apply`, `run.finish`.
    pub kind: String,
    /// What changed, as JSON.
    pub payload: String,
    pub at_ms: i64,
}

/// Where the engine keeps what it knows about deployments.
///
/// Every method is atomic; `apply` writes all its changes or none, so a crash
/// never leaves half a batch. Every write adds a [`Change`] to the outbox
/// in the same transaction.
pub trait StateStore: Send + Sync {
    fn deployment(&self, name: &str) -> Result<Option<DeploymentRow>>;
    fn deployments(&self) -> Result<Vec<DeploymentRow>>;
    fn put_deployment(&self, row: &DeploymentRow) -> Result<()>;
    /// Removes the deployment, its components and its task log.
    fn delete_deployment(&self, name: &str) -> Result<()>;
    fn components(&self, deployment: &str) -> Result<Vec<ComponentRow>>;
    /// Applies component changes and appends finished tasks in one transaction.
    fn apply(&self, deployment: &str, changes: &[ComponentChange], tasks: &[TaskRow])
        -> Result<()>;
    /// Starts a new run and returns its number (1, 2, ...).
    fn begin_run(&self, deployment: &str, started_at_ms: i64) -> Result<i64>;
    fn finish_run(
        &self,
        deployment: &str,
        run: i64,
        outcome: &str,
        finished_at_ms: i64,
    ) -> Result<()>;
    /// Tasks of one run, in the order they finished.
    fn tasks(&self, deployment: &str, run: i64) -> Result<Vec<TaskRow>>;
    /// The latest task of each component, for `status`.
    fn last_tasks(&self, deployment: &str) -> Result<Vec<TaskRow>>;
    /// The status of each named deployment that exists, in one query (for
    /// lists of sites).
    fn statuses(&self, names: &[String]) -> Result<std::collections::HashMap<String, String>>;
    /// The latest change's number (0 before any): a consumer compares it
    /// with the last it saw to learn, cheaply, that something changed.
    fn revision(&self) -> Result<i64>;
    /// Changes after `rev`, oldest first, at most `limit`.
    fn changes_since(&self, rev: i64, limit: u32) -> Result<Vec<Change>>;

    /// What the platform's instances keep for one another beside the
    /// engine's state (the gateways' certificates, a key's check), by kind
    /// and name: bytes the caller has sealed, never read here. Not part of
    /// the outbox. Keeps `body` under (kind, name) unless something is
    /// there already, and returns what is kept: the first writer wins.
    fn keep_first(&self, kind: &str, name: &str, body: &[u8]) -> Result<Vec<u8>>;
    /// Sets (kind, name) to `body`; returns the entry's new sequence
    /// number, larger than any before it of that kind.
    fn put_shared(&self, kind: &str, name: &str, body: &[u8]) -> Result<i64>;
    fn shared(&self, kind: &str, name: &str) -> Result<Option<Vec<u8>>>;
    /// Entries of `kind` set after sequence number `after`, oldest first.
    fn shared_since(&self, kind: &str, after: i64) -> Result<Vec<SharedEntry>>;
    fn delete_shared(&self, kind: &str, name: &str) -> Result<()>;
    /// Removes (kind, name) and returns what it held: of several takers at
    /// once, one gets it.
    fn take_shared(&self, kind: &str, name: &str) -> Result<Option<Vec<u8>>>;
}

/// One entry of [`StateStore::shared_since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedEntry {
    pub name: String,
    pub body: Vec<u8>,
    pub seq: i64,
}

/// How many of the latest changes the outbox keeps: a consumer further
/// behind reads the state whole again.
pub const CHANGES_KEPT: i64 = 100_000;

/// A change's payload for components applied.
pub(crate) fn applied_payload(changes: &[ComponentChange], tasks: usize) -> String {
    let (mut put, mut deleted) = (Vec::new(), Vec::new());
    for c in changes {
        match c {
            ComponentChange::Put(r) => put.push(r.name.as_str()),
            ComponentChange::Delete(name) => deleted.push(name.as_str()),
        }
    }
    serde_json::json!({ "put": put, "deleted": deleted, "tasks": tasks }).to_string()
}
