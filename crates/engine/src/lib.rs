//! The deployment engine: desired state (blueprint + inputs) against
//! recorded state (the store) gives a [`Plan`]; [`Engine::deploy`] runs it
//! in parallel along the dependency graph through the runtime's drivers,
//! records every task, and commits a deployment record to git.

pub mod apply;
pub mod backup;
pub mod plan;
pub mod records;
pub mod secrets;
pub mod supervise;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use indexmap::IndexMap;
use serde::Serialize;

use commons_blueprint::{Blueprint, Diagnostics, FileSystem};
use commons_runtime::exit::Ending;
use commons_runtime::{driver_for, Layout, Observed};
use commons_store::{ComponentRow, ComponentState, SqliteStore, StateStore, StoreError, TaskRow};

pub use apply::{Progress, Quiet};
pub use commons_store::DeploymentRow;
pub use plan::{Action, Change, Plan};

/// Default number of tasks run at once.
pub const DEFAULT_JOBS: usize = 16;

/// Why an engine operation did not succeed. [`EngineError::is_bad_input`]
/// separates the user's mistakes (exit 2) from failures (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Blueprint(Diagnostics),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
        let what = what.into();
        move |source| EngineError::Io { what, source }
    }

    pub fn is_bad_input(&self) -> bool {
        matches!(self, EngineError::Blueprint(_) | EngineError::Input(_))
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Replaces every secret value in `text` by `[redacted]`.
pub(crate) fn redact(text: &str, secrets: &BTreeMap<String, String>) -> String {
    let mut out = text.to_string();
    for v in secrets.values() {
        if v.len() >= 4 {
            out = out.replace(v.as_str(), "[redacted]");
        }
    }
    out
}

/// A blueprint with its inputs, to be deployed under a name.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub path: PathBuf,
    pub blueprint: Blueprint,
    pub inputs: serde_json::Map<String, serde_json::Value>,
}

/// What a deploy or destroy did.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Outcome {
    pub deployment: String,
    pub ok: bool,
    /// 0 when nothing had to be done.
    pub run: i64,
    pub plan: Plan,
    pub tasks: Vec<TaskRow>,
    /// Commit id of the deployment record written, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
}

/// One component as `status` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ComponentStatus {
    pub name: String,
    pub kind: String,
    /// Processes: running, starting, crashed, oom, idle, stopped; other
    /// components: ready; any: error, blocked, applying or deleting.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The user its processes run as, when sandboxed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Its writable directory (`COMMONS_DATA_DIR`).
    pub data_dir: String,
    /// Times it was restarted after stopping by itself.
    pub restarts: u32,
    /// The supervisor is restarting it over and over (with backoff).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crash_loop: Option<CrashLoop>,
    /// How its process last ended, whether or not it was started again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<LastExit>,
    pub outputs: serde_json::Value,
    /// Where the gateway serves it, as the blueprint says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<commons_blueprint::model::Route>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_task: Option<TaskRow>,
    pub updated_at: String,
}

/// A process that keeps stopping, as the running supervisor sees it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct CrashLoop {
    /// Restarts since it last stayed up for 30 s.
    pub restarts_in_a_row: u32,
    /// When the supervisor tries again.
    pub next_restart: String,
}

/// How a process last ended.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LastExit {
    /// For people: "exited with status 1", "killed by SIGSEGV", "out of memory: ...".
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it.
    pub oom: bool,
    pub at: String,
}

/// A process state that means it should run and does not (the supervisor
/// starts it again; a request wakes it).
pub fn is_down(state: &str) -> bool {
    matches!(state, "stopped" | "crashed" | "oom")
}

/// Milliseconds since the epoch, as an RFC 3339 time to the second.
fn rfc3339_ms(ms: i64) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
    )
    .to_string()
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeploymentStatus {
    pub name: String,
    pub status: String,
    pub blueprint: String,
    /// Its hosting plan: whether it is idled when nobody uses it.
    pub hosting: Hosting,
    pub components: Vec<ComponentStatus>,
}

/// How a site is hosted, as its operator chose (`commons deploy --hosting`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hosting {
    /// Free hosting: its processes are stopped after a while without
    /// traffic (`COMMONS_IDLE_AFTER`) and woken by the next request.
    #[default]
    Free,
    /// Kept running whether or not anybody uses it.
    AlwaysOn,
}

impl Hosting {
    pub fn as_str(self) -> &'static str {
        match self {
            Hosting::Free => "free",
            Hosting::AlwaysOn => "always-on",
        }
    }
}

/// The route recorded in a component's configuration.
fn route_of(config: &serde_json::Value) -> Option<commons_blueprint::model::Route> {
    let attr = |k: &str| config.get(k).and_then(|v| v.as_str()).map(str::to_string);
    // Every route records its path.
    Some(commons_blueprint::model::Route {
        path: attr("route.path")?,
        host: attr("route.host"),
        user_header: attr("route.user_header"),
        login: attr("route.login")
            .map(|l| l.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
        max_body_bytes: attr("route.max_body").and_then(|b| b.parse().ok()),
        max_header_bytes: attr("route.max_header").and_then(|b| b.parse().ok()),
        response_timeout_ms: attr("route.response_timeout")
            .and_then(|t| commons_blueprint::load::parse_duration_ms(&t)),
    })
}

/// An exclusive lock on one deployment, released on drop (or when the
/// process dies, since it is an `flock`).
pub struct Lock {
    _file: std::fs::File,
}

impl Lock {
    fn take(path: &Path, deployment: &str) -> Result<Lock, EngineError> {
        use std::os::unix::io::AsRawFd;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(EngineError::io("creating the lock directory"))?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(EngineError::io("opening the lock file"))?;
        // SAFETY: flock on a descriptor `f` owns for the whole call.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(EngineError::Busy(format!(
                "another command is working on deployment \"{deployment}\"; wait for it to finish"
            )));
        }
        Ok(Lock { _file: f })
    }
}

/// How service tokens start.
pub const SERVICE_TOKEN_PREFIX: &str = "cmsv_";

/// The engine over one data directory.
pub struct Engine {
    pub layout: Layout,
    store: Arc<dyn StateStore>,
    secrets: secrets::SecretBox,
}

impl Engine {
    /// Opens the data directory `home`, creating it if needed.
    pub fn open(home: &Path) -> Result<Engine, EngineError> {
        commons_runtime::layout::private_dir(home)
            .map_err(EngineError::io(format!("creating {}", home.display())))?;
        let layout = Layout::new(home);
        // The embedded store by default; PostgreSQL when the platform names one.
        let store: Arc<dyn StateStore> = match std::env::var("COMMONS_DATABASE_URL") {
            Ok(url) if !url.is_empty() => {
                let schema =
                    std::env::var("COMMONS_DATABASE_SCHEMA").unwrap_or_else(|_| "commons".into());
                Arc::new(commons_store::PgStore::connect(&url, &schema)?)
            }
            _ => Arc::new(SqliteStore::open(&layout.state_db())?),
        };
        let secrets = secrets::SecretBox::open(&layout.secrets_key())?;
        Ok(Engine {
            layout,
            store,
            secrets,
        })
    }

    /// The credential a deployment's processes prove who they are with
    /// when they call another site through the gateway on a user's behalf
    /// (`COMMONS_SERVICE_TOKEN`): derived from the platform's key, never
    /// stored.
    pub fn service_token(&self, deployment: &str) -> String {
        format!(
            "{SERVICE_TOKEN_PREFIX}{deployment}.{}",
            self.secrets.derive(&format!("service/{deployment}"))
        )
    }

    /// The deployment a service token belongs to, if it is one this
    /// platform made (compared in constant time).
    pub fn service_of(&self, token: &str) -> Option<String> {
        let (deployment, _) = token.strip_prefix(SERVICE_TOKEN_PREFIX)?.split_once('.')?;
        let expected = self.service_token(deployment);
        let same = expected.len() == token.len()
            && expected
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        same.then(|| deployment.to_string())
    }

    /// A key for `purpose` derived from the platform's key (the same on
    /// every start, never stored): for credentials the platform signs.
    pub fn derived_key(&self, purpose: &str) -> String {
        self.secrets.derive(&format!("key/{purpose}"))
    }

    /// Where everything lives under the data directory.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn store(&self) -> &dyn StateStore {
        self.store.as_ref()
    }

    /// Finds what to deploy: a blueprint path, a deployment name, or
    /// `./commons.yaml` when `target` is `None`; then settles the inputs
    /// (given > last deployed > default).
    pub fn target(
        &self,
        target: Option<&str>,
        name: Option<&str>,
        given: &[(String, String)],
    ) -> Result<Target, EngineError> {
        let (path, known_name) = match target {
            None => {
                let p = PathBuf::from(commons_blueprint::FILE_NAME);
                if !p.exists() {
                    return Err(EngineError::Input(
                        "no commons.yaml in this directory; run `commons init` to create one, or name a deployment or blueprint".into(),
                    ));
                }
                (p, None)
            }
            Some(t) if Path::new(t).exists() => (PathBuf::from(t), None),
            Some(t) => match self.store.deployment(t)? {
                Some(row) => (PathBuf::from(&row.blueprint), Some(t.to_string())),
                None => {
                    let names: Vec<String> = self
                        .store
                        .deployments()?
                        .into_iter()
                        .map(|d| d.name)
                        .collect();
                    let hint =
                        commons_blueprint::diag::did_you_mean(t, names.iter().map(String::as_str));
                    return Err(EngineError::Input(format!(
                        "\"{t}\" is neither a blueprint file nor a deployment{hint}"
                    )));
                }
            },
        };
        self.target_from(path, known_name, name, given, &FileSystem)
    }

    /// [`Engine::target`] for a blueprint file that came from someone else
    /// (through the API): it and everything it includes or serves must lie
    /// under `root`.
    pub fn target_confined(
        &self,
        path: &Path,
        root: &Path,
        name: Option<&str>,
        given: &[(String, String)],
    ) -> Result<Target, EngineError> {
        let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        let sources = commons_blueprint::load::Confined { root };
        self.target_from(path.to_path_buf(), None, name, given, &sources)
    }

    fn target_from(
        &self,
        path: PathBuf,
        known_name: Option<String>,
        name: Option<&str>,
        given: &[(String, String)],
        sources: &dyn commons_blueprint::load::Sources,
    ) -> Result<Target, EngineError> {
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        let blueprint = commons_blueprint::load(&path, sources).map_err(EngineError::Blueprint)?;
        let path = blueprint.files.first().cloned().unwrap_or(path);
        let name = name
            .map(str::to_string)
            .or(known_name)
            .unwrap_or_else(|| blueprint.name.clone());
        if !valid_name(&name) {
            return Err(EngineError::Input(format!(
                "invalid deployment name \"{name}\": use lowercase letters, digits and '-', starting with a letter"
            )));
        }
        let recorded = self
            .store
            .deployment(&name)?
            .and_then(|d| d.inputs.as_object().cloned())
            .unwrap_or_default();
        let inputs = settle_inputs(&blueprint, &recorded, given)?;
        Ok(Target {
            name,
            path,
            blueprint,
            inputs,
        })
    }

    fn recorded(&self, name: &str) -> Result<HashMap<String, ComponentRow>, EngineError> {
        Ok(self
            .store
            .components(name)?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect())
    }

    /// The plan of deploying `target`, changing nothing.
    pub fn plan(&self, target: &Target) -> Result<Plan, EngineError> {
        let recorded = self.recorded(&target.name)?;
        let stored = self.secrets.load(&target.name)?;
        let mut prints = BTreeMap::new();
        let mut missing = Vec::new();
        for (name, spec) in &target.blueprint.secrets {
            let print = match spec {
                commons_blueprint::SecretSpec::Generate(len) => stored
                    .get(name)
                    .filter(|v| v.chars().count() == *len)
                    .map(|v| self.secrets.fingerprint(v)),
                commons_blueprint::SecretSpec::FromEnv(var) => match std::env::var(var) {
                    Ok(v) if !v.is_empty() => Some(self.secrets.fingerprint(&v)),
                    _ => {
                        missing.push(format!("secret \"{name}\" reads ${var}, which is not set"));
                        None
                    }
                },
            };
            prints.insert(name.clone(), print);
        }
        if !missing.is_empty() {
            return Err(EngineError::Input(format!(
                "{} (set it and run again)",
                missing.join("; ")
            )));
        }
        self.compute_plan(target, &recorded, &prints)
    }

    fn compute_plan(
        &self,
        target: &Target,
        recorded: &HashMap<String, ComponentRow>,
        prints: &BTreeMap<String, Option<String>>,
    ) -> Result<Plan, EngineError> {
        let order = commons_blueprint::topo_order(&target.blueprint.components)
            .map_err(|c| EngineError::Input(format!("dependency cycle: {}", c.join(" -> "))))?;
        plan::compute(
            &self.layout,
            &target.name,
            &target.blueprint.components,
            &order,
            recorded,
            &target.inputs,
            prints,
        )
    }

    /// Deploys `target`: plans, runs the plan, records the outcome.
    pub async fn deploy(
        &self,
        target: &Target,
        jobs: usize,
        progress: &dyn Progress,
    ) -> Result<Outcome, EngineError> {
        self.deploy_with(target, jobs, progress, false, None).await
    }

    /// Restarts the listed process components of `name` that are recorded
    /// running but are not, and changes nothing else (a component whose
    /// blueprint changed since is left for the next deploy). No deployment
    /// record is written: a restart is not a deploy. Used by the supervisor.
    pub async fn restart_stopped(
        &self,
        name: &str,
        components: &[String],
    ) -> Result<Outcome, EngineError> {
        let target = self.target(Some(name), None, &[])?;
        self.deploy_with(&target, DEFAULT_JOBS, &Quiet, false, Some(components))
            .await
    }

    async fn deploy_with(
        &self,
        target: &Target,
        jobs: usize,
        progress: &dyn Progress,
        fresh_secrets: bool,
        only_restarts: Option<&[String]>,
    ) -> Result<Outcome, EngineError> {
        let _lock = Lock::take(&self.layout.lock_file(&target.name), &target.name)?;
        let existing = self.store.deployment(&target.name)?;
        let recorded = self.recorded(&target.name)?;
        let (secret_values, secrets_changed) =
            self.secrets
                .resolve(&target.name, &target.blueprint.secrets, fresh_secrets)?;
        let prints: BTreeMap<String, Option<String>> = secret_values
            .iter()
            .map(|(k, v)| (k.clone(), Some(self.secrets.fingerprint(v))))
            .collect();
        let mut plan = self.compute_plan(target, &recorded, &prints)?;
        if let Some(only) = only_restarts {
            for c in &mut plan.changes {
                let restart = c.action == Action::Replace
                    && c.reason.as_deref() == Some(plan::NOT_RUNNING)
                    && only.contains(&c.component);
                if !restart {
                    c.action = Action::Unchanged;
                    c.attrs.clear();
                }
            }
            if plan.is_noop() {
                return Ok(Outcome {
                    deployment: target.name.clone(),
                    ok: true,
                    run: 0,
                    plan,
                    tasks: Vec::new(),
                    record: None,
                });
            }
        }
        let blueprint_path = target.path.display().to_string();
        let inputs_value = serde_json::Value::Object(target.inputs.clone());
        let same_target = existing.as_ref().is_some_and(|d| {
            d.inputs == inputs_value && d.blueprint == blueprint_path && d.status == "ok"
        });
        if plan.is_noop() && same_target {
            return Ok(Outcome {
                deployment: target.name.clone(),
                ok: true,
                run: 0,
                plan,
                tasks: Vec::new(),
                record: None,
            });
        }
        if secrets_changed {
            self.secrets.save(&target.name, &secret_values)?;
        }
        let started = now_ms();
        let mut row = DeploymentRow {
            name: target.name.clone(),
            blueprint: blueprint_path,
            inputs: inputs_value,
            status: "running".into(),
            created_at_ms: existing
                .as_ref()
                .map(|d| d.created_at_ms)
                .unwrap_or(started),
            updated_at_ms: started,
        };
        self.store.put_deployment(&row)?;
        let run = match self.store.begin_run(&target.name, started) {
            Ok(run) => run,
            Err(e) => {
                // Not left `running` by a deploy that never ran.
                row.status = "failed".into();
                let _ = self.store.put_deployment(&row);
                return Err(e.into());
            }
        };

        let tasks = build_tasks(&plan, &target.blueprint.components, &recorded);
        let outputs = recorded
            .values()
            .filter(|r| r.state == ComponentState::Ready)
            .map(|r| {
                let o: IndexMap<String, Option<String>> = r
                    .outputs
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string)))
                            .collect()
                    })
                    .unwrap_or_default();
                (r.name.clone(), o)
            })
            .collect();
        // Databases get passwords derived from the platform's key; they are
        // redacted like secrets wherever a message could carry them.
        let mut secret_values = secret_values;
        let credentials: HashMap<String, String> = target
            .blueprint
            .components
            .iter()
            .filter(|(_, c)| matches!(c.kind, commons_blueprint::Kind::Postgres))
            .map(|(name, _)| {
                (
                    name.clone(),
                    self.secrets
                        .derive(&format!("postgres/{}/{name}", target.name)),
                )
            })
            .collect();
        for (name, password) in &credentials {
            secret_values.insert(format!("credential/{name}"), password.clone());
        }
        let service_token = self.service_token(&target.name);
        secret_values.insert("credential/service".into(), service_token.clone());
        let ctx = Arc::new(apply::Context {
            layout: self.layout.clone(),
            deployment: target.name.clone(),
            run,
            inputs: target.inputs.clone(),
            credentials,
            service_token: Some(service_token),
            withhold: target
                .blueprint
                .secrets
                .values()
                .filter_map(|s| match s {
                    commons_blueprint::SecretSpec::FromEnv(var) => Some(var.clone()),
                    _ => None,
                })
                .collect(),
            secrets: secret_values,
            secret_prints: prints,
            components: target.blueprint.components.clone(),
            recorded,
            outputs: Mutex::new(outputs),
            retired: Mutex::new(Vec::new()),
            read_by_others: Default::default(),
        });
        let rows = apply::execute(ctx.clone(), self.store.as_ref(), tasks, jobs, progress).await?;
        let recorded_at = now_ms();
        let ok = rows.iter().all(|t| t.outcome == "ok");
        let finished = now_ms();
        let status = if ok { "ok" } else { "failed" };
        self.store.finish_run(&target.name, run, status, finished)?;
        let mut row = self.store.deployment(&target.name)?.expect("written above");
        row.status = status.into();
        row.updated_at_ms = finished;
        self.store.put_deployment(&row)?;
        let record = match only_restarts {
            Some(_) => None,
            None => Some(self.write_record(target, run, &plan, &rows, ok, started, finished)?),
        };
        // Versions replaced start-first stop once nothing reaches them.
        let retired = std::mem::take(&mut *ctx.retired.lock().expect("retired lock"));
        for old in &retired {
            commons_runtime::drivers::retire(&self.layout, old, recorded_at as u64).await;
        }
        Ok(Outcome {
            deployment: target.name.clone(),
            ok,
            run,
            plan,
            tasks: rows,
            record,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn write_record(
        &self,
        target: &Target,
        run: i64,
        plan: &Plan,
        tasks: &[TaskRow],
        ok: bool,
        started: i64,
        finished: i64,
    ) -> Result<String, EngineError> {
        let (files, root, bp) = record_files(&target.blueprint)?;
        let mut out: BTreeMap<String, Vec<u8>> = files;
        let time = |ms: i64| {
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
            )
            .to_string()
        };
        let record = serde_json::json!({
            "deployment": target.name,
            "run": run,
            "outcome": if ok { "ok" } else { "failed" },
            "started_at": time(started),
            "finished_at": time(finished),
            "blueprint": { "name": bp.name, "version": bp.version, "project": bp.project,
                           "depends_on_projects": bp.depends_on_projects },
            "root": root,
            "commons_version": env!("CARGO_PKG_VERSION"),
        });
        let pretty = |v: &serde_json::Value| {
            let mut s = serde_json::to_vec_pretty(v).expect("json");
            s.push(b'\n');
            s
        };
        out.insert("record.json".into(), pretty(&record));
        out.insert(
            "blueprint.json".into(),
            pretty(&serde_json::to_value(&bp).expect("json")),
        );
        out.insert(
            "inputs.json".into(),
            pretty(&serde_json::Value::Object(target.inputs.clone())),
        );
        out.insert(
            "plan.json".into(),
            pretty(&serde_json::to_value(plan).expect("json")),
        );
        let outcome: Vec<serde_json::Value> = tasks
            .iter()
            .map(|t| {
                serde_json::json!({
                    "component": t.component, "action": t.action, "outcome": t.outcome,
                    "attempts": t.attempts, "error": t.error,
                    "started_at": time(t.started_at_ms), "finished_at": time(t.finished_at_ms),
                })
            })
            .collect();
        out.insert(
            "outcome.json".into(),
            pretty(&serde_json::Value::Array(outcome)),
        );
        let message = format!(
            "deploy {} run {run}: {}\n\n{}\n",
            target.name,
            if ok { "ok" } else { "failed" },
            plan.summary()
        );
        records::commit(
            &self.layout.records_dir(&target.name),
            &out,
            &message,
            finished,
        )
    }

    /// Removes every component of a deployment, in reverse dependency order.
    pub async fn destroy(
        &self,
        name: &str,
        jobs: usize,
        progress: &dyn Progress,
    ) -> Result<Outcome, EngineError> {
        let _lock = Lock::take(&self.layout.lock_file(name), name)?;
        let Some(mut deployment) = self.store.deployment(name)? else {
            return Err(EngineError::Input(format!(
                "no deployment named \"{name}\""
            )));
        };
        let recorded = self.recorded(name)?;
        let mut names: Vec<&String> = recorded.keys().collect();
        names.sort();
        let plan = Plan {
            deployment: name.to_string(),
            changes: names
                .iter()
                .map(|n| Change {
                    component: (*n).clone(),
                    kind: recorded[*n].kind.clone(),
                    action: Action::Delete,
                    reason: None,
                    attrs: Vec::new(),
                })
                .collect(),
        };
        let started = now_ms();
        let run = self.store.begin_run(name, started)?;
        let tasks = build_tasks(&plan, &IndexMap::new(), &recorded);
        let ctx = Arc::new(apply::Context {
            layout: self.layout.clone(),
            deployment: name.to_string(),
            run,
            inputs: serde_json::Map::new(),
            secrets: self.secrets.load(name).unwrap_or_default(),
            secret_prints: BTreeMap::new(),
            components: IndexMap::new(),
            recorded,
            outputs: Mutex::new(HashMap::new()),
            credentials: HashMap::new(),
            service_token: None,
            withhold: Vec::new(),
            retired: Mutex::new(Vec::new()),
            read_by_others: Default::default(),
        });
        let rows = apply::execute(ctx, self.store.as_ref(), tasks, jobs, progress).await?;
        let ok = rows.iter().all(|t| t.outcome == "ok");
        let finished = now_ms();
        let record = if ok {
            let mut files = BTreeMap::new();
            files.insert(
                "record.json".to_string(),
                serde_json::to_vec_pretty(&serde_json::json!({
                    "deployment": name, "run": run, "outcome": "destroyed",
                }))
                .expect("json"),
            );
            let commit = records::commit(
                &self.layout.records_dir(name),
                &files,
                &format!("destroy {name}\n"),
                finished,
            )?;
            self.store.delete_deployment(name)?;
            self.secrets.delete(name);
            let _ = std::fs::remove_dir_all(self.layout.deployment_dir(name));
            commons_runtime::sandbox::remove_cgroups(name);
            Some(commit)
        } else {
            self.store.finish_run(name, run, "failed", finished)?;
            deployment.status = "failed".into();
            deployment.updated_at_ms = finished;
            self.store.put_deployment(&deployment)?;
            None
        };
        Ok(Outcome {
            deployment: name.to_string(),
            ok,
            run,
            plan,
            tasks: rows,
            record,
        })
    }

    /// Every deployment's name and status.
    pub fn list(&self) -> Result<Vec<DeploymentRow>, EngineError> {
        Ok(self.store.deployments()?)
    }

    /// The state of a deployment's components, as the drivers see them now.
    pub fn status(&self, name: &str) -> Result<DeploymentStatus, EngineError> {
        let mut status = self.observe(name)?;
        // Show components in blueprint order when the blueprint still loads.
        if let Ok(bp) = commons_blueprint::load(Path::new(&status.blueprint), &FileSystem) {
            status
                .components
                .sort_by_key(|c| bp.components.get_index_of(&c.name).unwrap_or(usize::MAX));
        }
        Ok(status)
    }

    /// The same as [`Engine::status`] without reading the blueprint (for the
    /// supervisor, which looks several times a second): components by name.
    pub fn observe(&self, name: &str) -> Result<DeploymentStatus, EngineError> {
        let Some(d) = self.store.deployment(name)? else {
            return Err(EngineError::Input(format!(
                "no deployment named \"{name}\""
            )));
        };
        let last: HashMap<String, TaskRow> = self
            .store
            .last_tasks(name)?
            .into_iter()
            .map(|t| (t.component.clone(), t))
            .collect();
        let rows = self.store.components(name)?;
        // Sandboxed deployments have a user of their own.
        let uid = std::fs::read(self.layout.home.join("uids.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<BTreeMap<String, u32>>(&b).ok())
            .and_then(|m| m.get(name).copied());
        let components = rows
            .into_iter()
            .map(|r| {
                let handle = plan::handle_of(&r);
                let observed = driver_for(&r.kind).observe(&handle);
                let alive = observed == Observed::Running;
                let exit = (r.kind == "process")
                    .then(|| commons_runtime::exit::read(&self.layout.exit_file(name, &r.name)))
                    .flatten();
                // How this very instance ended, if it did.
                let ended = exit
                    .as_ref()
                    .filter(|e| !alive && handle.instance.as_deref() == Some(e.instance.as_str()))
                    .map(|e| e.ending());
                let state = match (r.state, observed) {
                    (ComponentState::Ready, Observed::Running) => "running",
                    (ComponentState::Ready, Observed::Stopped) if handle.idle => "idle",
                    (ComponentState::Ready, Observed::Stopped) => match ended {
                        Some(Ending::Oom) => "oom",
                        Some(Ending::Crashed) => "crashed",
                        _ => "stopped",
                    },
                    (ComponentState::Ready, Observed::Present) => "ready",
                    (ComponentState::Applying, _) if r.kind == "process" => "starting",
                    (s, _) => s.as_str(),
                };
                ComponentStatus {
                    name: r.name.clone(),
                    kind: r.kind.clone(),
                    state: state.to_string(),
                    // Shown while alive, even mid-deploy (the gateway routes
                    // to it until its successor is recorded).
                    pid: handle.pid.filter(|_| alive),
                    port: handle.port,
                    uid: uid.filter(|_| r.kind == "process" || r.kind == "job"),
                    data_dir: self.layout.data_dir(name).display().to_string(),
                    restarts: handle.restarts,
                    crash_loop: is_down(state)
                        .then(|| supervise::waiting(&self.layout, name, &r.name))
                        .flatten()
                        .map(|w| CrashLoop {
                            restarts_in_a_row: w.restarts_in_a_row,
                            next_restart: rfc3339_ms(w.next_restart_ms as i64),
                        }),
                    last_exit: exit.map(|e| LastExit {
                        reason: e.reason(),
                        code: e.code,
                        signal: e.signal,
                        oom: e.oom,
                        at: rfc3339_ms(e.at_ms as i64),
                    }),
                    outputs: r.outputs.clone(),
                    route: route_of(&r.config),
                    error: r.error.clone(),
                    last_task: last.get(&r.name).cloned(),
                    updated_at: rfc3339_ms(r.updated_at_ms),
                }
            })
            .collect();
        Ok(DeploymentStatus {
            hosting: self.hosting(&d.name),
            name: d.name,
            status: d.status,
            blueprint: d.blueprint,
            components,
        })
    }

    /// The deployment record's commits, oldest first.
    pub fn history(&self, name: &str) -> Result<Vec<records::RecordEntry>, EngineError> {
        let entries = records::history(&self.layout.records_dir(name))?;
        if entries.is_empty() && self.store.deployment(name)?.is_none() {
            return Err(EngineError::Input(format!(
                "no deployment named \"{name}\""
            )));
        }
        Ok(entries)
    }

    pub fn history_diff(&self, name: &str, a: &str, b: &str) -> Result<String, EngineError> {
        records::diff(&self.layout.records_dir(name), a, b)
    }

    /// Log files of a deployment's components (those that have one).
    pub fn log_files(
        &self,
        name: &str,
        component: Option<&str>,
    ) -> Result<Vec<(String, PathBuf)>, EngineError> {
        let Some(_) = self.store.deployment(name)? else {
            return Err(EngineError::Input(format!(
                "no deployment named \"{name}\""
            )));
        };
        let rows = self.store.components(name)?;
        if let Some(c) = component {
            if !rows.iter().any(|r| r.name == c) {
                let hint =
                    commons_blueprint::diag::did_you_mean(c, rows.iter().map(|r| r.name.as_str()));
                return Err(EngineError::Input(format!(
                    "deployment \"{name}\" has no component \"{c}\"{hint}"
                )));
            }
        }
        Ok(rows
            .into_iter()
            .filter(|r| component.is_none_or(|c| c == r.name))
            .map(|r| (r.name.clone(), self.layout.log_file(name, &r.name)))
            .filter(|(_, p)| p.exists())
            .collect())
    }

    /// Stands up the service recorded in `source` (a record repository) under
    /// `name` (default: the recorded name). Secrets are made anew.
    pub async fn clone_record(
        &self,
        source: &str,
        name: Option<&str>,
        jobs: usize,
        progress: &dyn Progress,
    ) -> Result<(Target, Outcome), EngineError> {
        let staging = self.layout.home.join("clones").join(secrets::token());
        let result = records::checkout(source, &staging);
        let record: serde_json::Value = result
            .and_then(|_| {
                let text = std::fs::read(staging.join("record.json")).map_err(|_| {
                    EngineError::Input(format!(
                        "{source} is not a deployment record (no record.json)"
                    ))
                })?;
                serde_json::from_slice(&text)
                    .map_err(|e| EngineError::Input(format!("{source}: record.json: {e}")))
            })
            .inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&staging);
            })?;
        let recorded_name = record["deployment"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = name.map(str::to_string).unwrap_or(recorded_name);
        let Some(root) = record["root"].as_str().map(str::to_string) else {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(EngineError::Input(format!(
                "{source} records a destroy, not a deploy; clone an earlier record"
            )));
        };
        if self.store.deployment(&name)?.is_some() {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(EngineError::Input(format!(
                "a deployment named \"{name}\" exists already; pass --name to clone under another name"
            )));
        }
        let dest = self.layout.deployment_dir(&name).join("source");
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::create_dir_all(dest.parent().expect("has parent"))
            .map_err(EngineError::io("creating the deployment directory"))?;
        std::fs::rename(&staging, &dest).map_err(EngineError::io("moving the cloned record"))?;
        let target = target_from_record(name, &dest, &root)?;
        let outcome = self
            .deploy_with(&target, jobs, progress, true, None)
            .await?;
        Ok((target, outcome))
    }
}

fn valid_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some('a'..='z'))
        && c.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.len() <= 63
}

/// Inputs: given on the command line, else last deployed, else default.
fn settle_inputs(
    bp: &Blueprint,
    recorded: &serde_json::Map<String, serde_json::Value>,
    given: &[(String, String)],
) -> Result<serde_json::Map<String, serde_json::Value>, EngineError> {
    let mut problems = Vec::new();
    for (k, _) in given {
        if !bp.inputs.contains_key(k) {
            let hint =
                commons_blueprint::diag::did_you_mean(k, bp.inputs.keys().map(String::as_str));
            problems.push(format!(
                "blueprint \"{}\" has no input \"{k}\"{hint}",
                bp.name
            ));
        }
    }
    let mut out = serde_json::Map::new();
    for (name, spec) in &bp.inputs {
        let value = if let Some((_, raw)) = given.iter().rev().find(|(k, _)| k == name) {
            match spec.ty.parse_cli(raw) {
                Ok(v) => Some(v),
                Err(e) => {
                    problems.push(format!("input \"{name}\": {e}"));
                    continue;
                }
            }
        } else {
            recorded
                .get(name)
                .filter(|v| spec.ty.accepts(v))
                .cloned()
                .or_else(|| spec.default.clone())
        };
        match value {
            Some(v) => {
                out.insert(name.clone(), v);
            }
            None => problems.push(format!(
                "input \"{name}\" ({}) is required: pass --input {name}=VALUE",
                spec.ty.name()
            )),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(EngineError::Input(problems.join("\n")))
    }
}

/// Tasks for every change but `unchanged`, with their dependency edges.
fn build_tasks(
    plan: &Plan,
    components: &IndexMap<String, commons_blueprint::Component>,
    recorded: &HashMap<String, ComponentRow>,
) -> Vec<apply::Task> {
    let acting: Vec<&Change> = plan
        .changes
        .iter()
        .filter(|c| c.action != Action::Unchanged)
        .collect();
    let index: HashMap<&str, usize> = acting
        .iter()
        .enumerate()
        .map(|(i, c)| (c.component.as_str(), i))
        .collect();
    acting
        .iter()
        .map(|c| {
            let deps = if c.action == Action::Delete {
                // A deleted component goes after the deleted ones that need it.
                recorded
                    .values()
                    .filter(|r| r.depends_on.contains(&c.component))
                    .filter_map(|r| index.get(r.name.as_str()).copied())
                    .filter(|&i| acting[i].action == Action::Delete)
                    .collect()
            } else {
                components[&c.component]
                    .depends_on
                    .iter()
                    .filter_map(|d| index.get(d.as_str()).copied())
                    .collect()
            };
            apply::Task {
                component: c.component.clone(),
                kind: c.kind.clone(),
                action: c.action,
                deps,
                restart: c.reason.as_deref() == Some(plan::NOT_RUNNING),
            }
        })
        .collect()
}

/// Files of a record: path in the repository -> content.
type RecordTree = BTreeMap<String, Vec<u8>>;

/// The files of a record's `source/` and the blueprint with paths made
/// relative to them, so a record holds no machine's paths.
fn record_files(bp: &Blueprint) -> Result<(RecordTree, String, Blueprint), EngineError> {
    let mut dirs: Vec<PathBuf> = bp
        .files
        .iter()
        .filter_map(|f| f.parent().map(Path::to_path_buf))
        .collect();
    for c in bp.components.values() {
        if let commons_blueprint::Kind::Static { path } = &c.kind {
            dirs.push(path.clone());
        }
    }
    let base = common_ancestor(&dirs);
    let rel = |p: &Path| -> String {
        let r = p.strip_prefix(&base).unwrap_or(p);
        let s = r.to_string_lossy().replace('\\', "/");
        if s.is_empty() {
            ".".into()
        } else {
            s
        }
    };
    let mut files = BTreeMap::new();
    for f in &bp.files {
        let content =
            std::fs::read(f).map_err(EngineError::io(format!("reading {}", f.display())))?;
        files.insert(format!("source/{}", rel(f)), content);
    }
    let mut copy = bp.clone();
    for c in copy.components.values_mut() {
        if let commons_blueprint::Kind::Static { path } = &mut c.kind {
            let mut todo = vec![path.clone()];
            while let Some(d) = todo.pop() {
                for e in std::fs::read_dir(&d)
                    .map_err(EngineError::io(format!("reading {}", d.display())))?
                    .flatten()
                {
                    let p = e.path();
                    if p.is_dir() {
                        todo.push(p);
                    } else if let Ok(content) = std::fs::read(&p) {
                        files.insert(format!("source/{}", rel(&p)), content);
                    }
                }
            }
            *path = PathBuf::from(rel(path));
        }
        c.dir = PathBuf::from(rel(&c.dir));
        c.origin.file = PathBuf::from(rel(&c.origin.file));
    }
    copy.files = copy.files.iter().map(|f| PathBuf::from(rel(f))).collect();
    let root = format!("source/{}", rel(&bp.files[0]));
    Ok((files, root, copy))
}

/// Every file a blueprint needs (the files it was read from, and the
/// directories its static components serve), by path relative to their
/// common directory, with the root blueprint file's relative path: what
/// deploying it on another machine takes.
pub fn source_files(bp: &Blueprint) -> Result<(BTreeMap<String, Vec<u8>>, String), EngineError> {
    let (files, root, _) = record_files(bp)?;
    let strip = |p: &str| p.strip_prefix("source/").unwrap_or(p).to_string();
    let files = files.into_iter().map(|(k, v)| (strip(&k), v)).collect();
    Ok((files, strip(&root)))
}

fn common_ancestor(paths: &[PathBuf]) -> PathBuf {
    let mut it = paths.iter();
    let Some(first) = it.next() else {
        return PathBuf::new();
    };
    let mut base = first.clone();
    for p in it {
        while !p.starts_with(&base) {
            if !base.pop() {
                return PathBuf::new();
            }
        }
    }
    base
}

impl Engine {
    /// The hosting plan of `name` (free unless its operator chose otherwise).
    pub fn hosting(&self, name: &str) -> Hosting {
        std::fs::read(self.layout.hosting_file(name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Puts `name` on a hosting plan.
    pub fn set_hosting(&self, name: &str, hosting: Hosting) -> Result<(), EngineError> {
        if self.store.deployment(name)?.is_none() {
            return Err(EngineError::Input(format!(
                "no deployment named \"{name}\""
            )));
        }
        let path = self.layout.hosting_file(name);
        std::fs::write(&path, serde_json::to_vec(&hosting).expect("serialises"))
            .map_err(EngineError::io(format!("writing {}", path.display())))
    }

    /// Stops the running processes of `name` for lack of traffic; they show
    /// as `idle` and are started again by [`Engine::wake`] (or a deploy).
    /// Returns the components stopped.
    pub async fn idle(&self, name: &str) -> Result<Vec<String>, EngineError> {
        let _lock = Lock::take(&self.layout.lock_file(name), name)?;
        let mut changes = Vec::new();
        let mut stopped = Vec::new();
        for mut row in self.store.components(name)? {
            let mut handle = plan::handle_of(&row);
            if row.kind != "process" || row.state != ComponentState::Ready || handle.idle {
                continue;
            }
            if let (Some(pid), Some(instance)) = (handle.pid, &handle.instance) {
                commons_runtime::proc::stop(pid, instance, commons_runtime::drivers::STOP_GRACE)
                    .await;
            }
            handle.idle = true;
            row.handle = serde_json::to_value(&handle).expect("handle serialises");
            stopped.push(row.name.clone());
            changes.push(commons_store::ComponentChange::Put(row));
        }
        self.store.apply(name, &changes, &[])?;
        Ok(stopped)
    }

    /// Starts the idle (or stopped) processes of `name` and returns once they
    /// are healthy: what the gateway calls on the first request to an idle site.
    pub async fn wake(&self, name: &str) -> Result<Outcome, EngineError> {
        let waking: Vec<String> = self
            .observe(name)?
            .components
            .into_iter()
            .filter(|c| c.kind == "process" && (c.state == "idle" || is_down(&c.state)))
            .map(|c| c.name)
            .collect();
        self.restart_stopped(name, &waking).await
    }

    /// Writes a backup of `name` (data, volumes, databases, record) to the archive.
    pub fn backup(&self, name: &str) -> Result<backup::Backup, EngineError> {
        let _lock = Lock::take(&self.layout.lock_file(name), name)?;
        if self.store.deployment(name)?.is_none() {
            return Err(EngineError::Input(format!(
                "no deployment named \"{name}\""
            )));
        }
        let kinds: Vec<(String, String)> = self
            .store
            .components(name)?
            .into_iter()
            .map(|c| (c.name, c.kind))
            .collect();
        backup::write(self, name, &kinds, now_ms())
    }

    /// Stands a backed-up deployment up again, under its name or `as_name`,
    /// with its files and databases in place before anything of it runs.
    pub async fn restore(
        &self,
        archive: &Path,
        as_name: Option<&str>,
        jobs: usize,
        progress: &dyn Progress,
    ) -> Result<(Target, Outcome), EngineError> {
        let staging = self.layout.home.join("clones").join(secrets::token());
        let manifest = backup::unpack(archive, &staging)?;
        let result = self
            .restore_from(&staging, &manifest, as_name, jobs, progress)
            .await;
        let _ = std::fs::remove_dir_all(&staging);
        result
    }

    async fn restore_from(
        &self,
        staging: &Path,
        manifest: &backup::Manifest,
        as_name: Option<&str>,
        jobs: usize,
        progress: &dyn Progress,
    ) -> Result<(Target, Outcome), EngineError> {
        let name = as_name
            .map(str::to_string)
            .unwrap_or_else(|| manifest.deployment.clone());
        if !valid_name(&name) {
            return Err(EngineError::Input(format!(
                "invalid deployment name \"{name}\""
            )));
        }
        if self.store.deployment(&name)?.is_some() {
            return Err(EngineError::Input(format!(
                "a deployment named \"{name}\" exists already; pass --as to restore under another name"
            )));
        }
        let record: serde_json::Value = std::fs::read(staging.join("record/record.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| EngineError::Input("the backup holds no deployment record".into()))?;
        let root = record["root"]
            .as_str()
            .unwrap_or("source/commons.yaml")
            .to_string();
        let dest = self.layout.deployment_dir(&name).join("source");
        backup::copy_tree(&staging.join("record"), &dest)?;
        backup::copy_tree(&staging.join("data"), &self.layout.data_dir(&name))?;
        for v in &manifest.volumes {
            backup::copy_tree(
                &staging.join("volumes").join(v),
                &self.layout.volume_dir(&name, v),
            )?;
        }
        if commons_runtime::sandbox::enabled() {
            let uid = commons_runtime::sandbox::uid_for(&self.layout.home, &name)
                .map_err(EngineError::io("allocating the deployment's user"))?;
            commons_runtime::sandbox::give_tree(
                &self.layout.deployment_dir(&name).join("data"),
                uid,
            )
            .and_then(|_| {
                commons_runtime::sandbox::give_tree(
                    &self.layout.deployment_dir(&name).join("volumes"),
                    uid,
                )
            })
            .map_err(EngineError::io("handing the restored files to their user"))?;
        }
        let target = target_from_record(name.clone(), &dest, &root)?;
        // Databases first, loaded as their own role, before any job runs.
        for component in &manifest.databases {
            let Some(c) = target.blueprint.components.get(component) else {
                continue;
            };
            let mut spec = plan::probe_spec(&name, component, c);
            spec.credential = Some(self.secrets.derive(&format!("postgres/{name}/{component}")));
            let applied = driver_for("postgres")
                .apply(&self.layout, &spec, None)
                .await
                .map_err(|e| {
                    EngineError::Internal(format!("restoring database {component}: {e}"))
                })?;
            let url = applied.outputs.get("url").cloned().unwrap_or_default();
            backup::load_database(
                &url,
                &staging.join("postgres").join(format!("{component}.sql")),
            )?;
        }
        let outcome = self
            .deploy_with(&target, jobs, progress, true, None)
            .await?;
        Ok((target, outcome))
    }
}

/// The target recorded in a deployment record checked out at `dest`.
fn target_from_record(name: String, dest: &Path, root: &str) -> Result<Target, EngineError> {
    let inputs: serde_json::Map<String, serde_json::Value> =
        std::fs::read(dest.join("inputs.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
    let path = dest.join(root);
    let blueprint = commons_blueprint::load(&path, &FileSystem).map_err(EngineError::Blueprint)?;
    let inputs = settle_inputs(&blueprint, &inputs, &[])?;
    Ok(Target {
        name,
        path,
        blueprint,
        inputs,
    })
}
