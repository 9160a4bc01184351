//! Runs a plan: tasks in parallel along the dependency graph, each recorded
//! as it finishes.
//!
//! Crash safety: before a wave of tasks starts, each task's component is
//! recorded as `applying` with the token its processes will carry; when a task
//! ends its outcome is recorded. Both are batched (one transaction per wave,
//! one per group of finished tasks), so the store is never the bottleneck. A
//! deploy killed at any instant leaves every component either finished (never
//! run again) or `applying` (its leftovers are found by token and stopped, then
//! it is run again).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indexmap::IndexMap;

use commons_blueprint::model::Replace;
use commons_blueprint::{Component, Kind, Ref};
use commons_runtime::drivers::postgres::MASK;
use commons_runtime::drivers::reap_interrupted;
use commons_runtime::{driver_for, Applied, DriverError, Handle, Layout, Spec};
use commons_store::{ComponentChange, ComponentRow, ComponentState, StateStore, TaskRow};

use crate::plan::{
    attributes, env_name, handle_of, hash_attrs, hash_dir, input_text, Action, Values,
};
use crate::{redact, EngineError};
use commons_clock::now_ms;

/// Hears about tasks as they start and finish (progress bars, logs).
pub trait Progress: Send + Sync {
    fn begin(&self, _total: usize) {}
    fn started(&self, _component: &str, _action: Action) {}
    fn finished(&self, _component: &str, _action: Action, _outcome: &str, _error: Option<&str>) {}
    /// An image is being fetched for `component`: `fetched` of `to_fetch`
    /// compressed bytes (layers already here are not counted).
    fn pulling(&self, _component: &str, _fetched: u64, _to_fetch: u64) {}
}

/// A progress listener that ignores everything.
pub struct Quiet;
impl Progress for Quiet {}

/// One unit of work.
#[derive(Debug, Clone)]
pub struct Task {
    pub component: String,
    pub kind: String,
    pub action: Action,
    /// Indices of tasks that must succeed first.
    pub deps: Vec<usize>,
    /// A restart of a process that stopped by itself (counted in its handle).
    pub restart: bool,
}

/// What tasks share.
pub struct Context {
    pub layout: Layout,
    pub deployment: String,
    pub run: i64,
    pub inputs: serde_json::Map<String, serde_json::Value>,
    pub secrets: BTreeMap<String, String>,
    pub secret_prints: BTreeMap<String, Option<String>>,
    pub components: IndexMap<String, Component>,
    pub recorded: HashMap<String, ComponentRow>,
    /// Outputs of components as recorded (passwords masked), filled in as
    /// tasks finish.
    pub outputs: Mutex<HashMap<String, IndexMap<String, Option<String>>>>,
    /// Passwords the platform derived for components (databases), by component.
    pub credentials: HashMap<String, String>,
    /// The deployment's `COMMONS_SERVICE_TOKEN`, given to its processes and
    /// jobs (None when nothing will run).
    pub service_token: Option<String>,
    /// Environment variables secrets were read from: never inherited.
    pub withhold: Vec<String>,
    /// The site's workloads may reach the internet (`network: { egress }`).
    pub egress: bool,
    /// The site declares a `data:` section (it calls the data API).
    pub data_api: bool,
    /// Instances replaced start-first, to stop once the gateway drained them.
    /// (component, its replaced instance)
    pub retired: Mutex<Vec<(String, Handle)>>,
    /// The platform's other gateways, which must have drained a replaced
    /// instance too (when instances share the store).
    pub other_gateways: Option<std::sync::Arc<dyn commons_runtime::drivers::OtherGateways>>,
    /// The components another reads, made once (see `plan::replace_of`).
    pub read_by_others: std::sync::OnceLock<std::collections::HashSet<String>>,
}

impl Context {
    fn read_by_others(&self) -> &std::collections::HashSet<String> {
        self.read_by_others
            .get_or_init(|| crate::plan::read_by_others(&self.components))
    }
}

struct Done {
    index: usize,
    ok: bool,
    change: ComponentChange,
    task: TaskRow,
}

/// What a running task tells the loop that runs it.
enum Report {
    Pulling {
        index: usize,
        fetched: u64,
        to_fetch: u64,
    },
    Done(Box<Done>),
}

/// Runs `tasks` with at most `jobs` at once; returns every task's row.
pub async fn execute(
    ctx: Arc<Context>,
    store: &dyn StateStore,
    tasks: Vec<Task>,
    jobs: usize,
    progress: &dyn Progress,
) -> Result<Vec<TaskRow>, EngineError> {
    let n = tasks.len();
    let jobs = jobs.max(1);
    let mut waiting: Vec<usize> = tasks.iter().map(|t| t.deps.len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, t) in tasks.iter().enumerate() {
        for &d in &t.deps {
            dependents[d].push(i);
        }
    }
    let mut ready: VecDeque<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut blocked = vec![false; n];
    let tasks = Arc::new(tasks);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Report>();
    let mut running = 0usize;
    let mut rows = Vec::with_capacity(n);
    progress.begin(n);

    loop {
        let mut wave = Vec::new();
        while running + wave.len() < jobs {
            match ready.pop_front() {
                Some(i) => wave.push(i),
                None => break,
            }
        }
        if !wave.is_empty() {
            let mut intents = Vec::with_capacity(wave.len());
            let mut tokens = Vec::with_capacity(wave.len());
            for &i in &wave {
                let (row, token) = intent(&ctx, &tasks[i]);
                intents.push(ComponentChange::Put(row));
                tokens.push(token);
            }
            store.apply(&ctx.deployment, &intents, &[])?;
            for (i, token) in wave.into_iter().zip(tokens) {
                progress.started(&tasks[i].component, tasks[i].action);
                running += 1;
                let (ctx, tasks, tx) = (ctx.clone(), tasks.clone(), tx.clone());
                tokio::spawn(async move {
                    let done = run(&ctx, i, &tasks[i], token, &tx).await;
                    let _ = tx.send(Report::Done(Box::new(done)));
                });
            }
        }
        if running == 0 {
            break;
        }
        let heard = |report: Report| match report {
            Report::Pulling {
                index,
                fetched,
                to_fetch,
            } => {
                progress.pulling(&tasks[index].component, fetched, to_fetch);
                None
            }
            Report::Done(d) => Some(*d),
        };
        let first = loop {
            let report = rx.recv().await.expect("a running task always reports");
            if let Some(d) = heard(report) {
                break d;
            }
        };
        let mut batch = vec![first];
        while let Ok(report) = rx.try_recv() {
            batch.extend(heard(report));
        }
        running -= batch.len();
        let mut changes = Vec::with_capacity(batch.len());
        let mut finished = Vec::with_capacity(batch.len());
        for d in batch {
            let t = &tasks[d.index];
            progress.finished(
                &t.component,
                t.action,
                &d.task.outcome,
                d.task.error.as_deref(),
            );
            changes.push(d.change);
            finished.push(d.task);
            if d.ok {
                for &j in &dependents[d.index] {
                    waiting[j] -= 1;
                    if waiting[j] == 0 && !blocked[j] {
                        ready.push_back(j);
                    }
                }
                continue;
            }
            // Everything downstream of a failure is blocked, not attempted.
            let mut stack = dependents[d.index].clone();
            while let Some(j) = stack.pop() {
                if blocked[j] {
                    continue;
                }
                blocked[j] = true;
                let now = now_ms();
                let message = format!("blocked: {} failed", t.component);
                progress.finished(
                    &tasks[j].component,
                    tasks[j].action,
                    "blocked",
                    Some(&message),
                );
                finished.push(TaskRow {
                    run: ctx.run,
                    component: tasks[j].component.clone(),
                    action: tasks[j].action.as_str().into(),
                    outcome: "blocked".into(),
                    attempts: 0,
                    error: Some(message),
                    started_at_ms: now,
                    finished_at_ms: now,
                });
                stack.extend(dependents[j].iter().copied());
            }
        }
        store.apply(&ctx.deployment, &changes, &finished)?;
        rows.extend(finished);
    }
    Ok(rows)
}

/// Rolling replacement: before instance k of a component is replaced, the
/// version instance k-1 replaced start-first (recorded before this task
/// started) is drained and stopped, so a redeploy runs at most one instance
/// more than the component asks for. The last one's waits for the end of
/// the deploy, as any other replaced process's.
async fn retire_previous_replica(ctx: &Context, component: &str) {
    let (base, k) = commons_blueprint::replica_of(component);
    if k < 2 {
        return;
    }
    let before = commons_blueprint::replica_name(base, k - 1);
    let old = {
        let mut retired = ctx.retired.lock().unwrap_or_else(|p| p.into_inner());
        let at = retired.iter().position(|(c, _)| *c == before);
        at.map(|i| retired.remove(i))
    };
    if let Some((name, old)) = old {
        let recorded_at = now_ms() as u64;
        commons_runtime::drivers::retire(
            &ctx.layout,
            &ctx.deployment,
            &name,
            &old,
            recorded_at,
            ctx.other_gateways.as_deref(),
        )
        .await;
    }
}

/// The row recorded before a task starts anything, and the instance token
/// the task's processes will carry.
///
/// If an interrupted deploy left a pending token, the task reuses it: it first
/// stops whatever carries that token, then starts its own processes with it,
/// so a second interruption leaves them just as findable.
fn intent(ctx: &Context, task: &Task) -> (ComponentRow, String) {
    let mut row = ctx
        .recorded
        .get(&task.component)
        .cloned()
        .unwrap_or_else(|| ComponentRow {
            name: task.component.clone(),
            kind: task.kind.clone(),
            state: ComponentState::Applying,
            hash: String::new(),
            config: serde_json::json!({}),
            outputs: serde_json::json!({}),
            handle: serde_json::Value::Null,
            depends_on: Vec::new(),
            error: None,
            updated_at_ms: 0,
        });
    let mut handle = handle_of(&row);
    let token = handle.pending.clone().unwrap_or_else(crate::secrets::token);
    if task.action == Action::Delete {
        row.state = ComponentState::Deleting;
    } else {
        row.state = ComponentState::Applying;
        handle.pending = Some(token.clone());
    }
    row.handle = serde_json::to_value(&handle).expect("handle serialises");
    row.updated_at_ms = now_ms();
    (row, token)
}

async fn run(
    ctx: &Context,
    index: usize,
    task: &Task,
    token: String,
    reports: &tokio::sync::mpsc::UnboundedSender<Report>,
) -> Done {
    let started = now_ms();
    let row = ctx.recorded.get(&task.component);
    let previous = row.map(handle_of);
    // Leftovers of an interrupted deploy go first.
    if let Some(pending) = previous.as_ref().and_then(|h| h.pending.clone()) {
        reap_interrupted(&ctx.layout, &ctx.deployment, &task.component, &pending).await;
    }
    let previous = previous.map(|h| Handle { pending: None, ..h });
    retire_previous_replica(ctx, &task.component).await;
    let (result, attempts, change) = if task.action == Action::Delete {
        let handle = previous.clone().unwrap_or_default();
        let r = driver_for(&task.kind)
            .remove(&ctx.layout, &ctx.deployment, &task.component, &handle)
            .await;
        let change = match &r {
            Ok(()) => ComponentChange::Delete(task.component.clone()),
            Err(e) => ComponentChange::Put(ComponentRow {
                state: ComponentState::Error,
                error: Some(redact(&e.to_string(), &ctx.secrets)),
                handle: serde_json::to_value(&handle).expect("handle serialises"),
                updated_at_ms: now_ms(),
                ..row.cloned().expect("a deleted component was recorded")
            }),
        };
        (r.map(|_| ()), 1, change)
    } else {
        let pulling = |p: commons_runtime::image::Pulling| {
            let _ = reports.send(Report::Pulling {
                index,
                fetched: p.fetched,
                to_fetch: p.to_fetch,
            });
        };
        apply_component(ctx, task, row, previous, token, &pulling).await
    };
    let finished = now_ms();
    let (ok, outcome, error) = match &result {
        Ok(()) => (true, "ok", None),
        Err(DriverError::Timeout(_)) => (
            false,
            "timeout",
            Some(redact(
                &result.as_ref().unwrap_err().to_string(),
                &ctx.secrets,
            )),
        ),
        Err(e) => (false, "failed", Some(redact(&e.to_string(), &ctx.secrets))),
    };
    Done {
        index,
        ok,
        change,
        task: TaskRow {
            run: ctx.run,
            component: task.component.clone(),
            action: task.action.as_str().into(),
            outcome: outcome.into(),
            attempts,
            error,
            started_at_ms: started,
            finished_at_ms: finished,
        },
    }
}

/// Text of a reference's value at deploy time.
fn value_of(
    ctx: &Context,
    outputs: &HashMap<String, IndexMap<String, Option<String>>>,
    r: &Ref,
) -> String {
    match r {
        Ref::Input { name } => ctx.inputs.get(name).map(input_text).unwrap_or_default(),
        Ref::Secret { name } => ctx.secrets.get(name).cloned().unwrap_or_default(),
        Ref::Component { name, attr } => {
            let shown = outputs
                .get(name)
                .and_then(|o| o.get(attr))
                .cloned()
                .flatten()
                .unwrap_or_default();
            // Only the rendered command or environment sees the password.
            match ctx.credentials.get(name) {
                Some(password) => shown.replace(MASK, password),
                None => shown,
            }
        }
    }
}

async fn apply_component(
    ctx: &Context,
    task: &Task,
    row: Option<&ComponentRow>,
    previous: Option<Handle>,
    token: String,
    pulling: &(dyn Fn(commons_runtime::image::Pulling) + Sync),
) -> (Result<(), DriverError>, u32, ComponentChange) {
    let c = &ctx.components[&task.component];
    let static_hash = match &c.kind {
        Kind::Static { path } => hash_dir(path).ok(),
        _ => None,
    };
    let (attrs, mut spec) = {
        let outputs = ctx.outputs.lock().unwrap_or_else(|p| p.into_inner());
        let values = Values {
            inputs: &ctx.inputs,
            secret_prints: &ctx.secret_prints,
            outputs: &outputs,
        };
        let attrs = attributes(c, &values, static_hash);
        let mut env = Vec::new();
        let command = match &c.kind {
            Kind::Job { command } | Kind::Process { command } => Some(command.render(|r| {
                let name = env_name(r);
                env.push((name.clone(), value_of(ctx, &outputs, r)));
                format!("${{{name}}}")
            })),
            _ => None,
        };
        for (k, t) in &c.env {
            env.push((k.clone(), t.render(|r| value_of(ctx, &outputs, r))));
        }
        let volumes: Vec<(String, String)> = match &c.kind {
            Kind::Image(image) => image
                .volumes
                .iter()
                .map(|(path, t)| (path.clone(), t.render(|r| value_of(ctx, &outputs, r))))
                .collect(),
            _ => Vec::new(),
        };
        if let (Some(token), Kind::Job { .. } | Kind::Process { .. } | Kind::Image(_)) =
            (&ctx.service_token, &c.kind)
        {
            env.push(("COMMONS_SERVICE_TOKEN".into(), token.clone()));
        }
        let spec = Spec {
            deployment: ctx.deployment.clone(),
            component: task.component.clone(),
            kind: c.kind.clone(),
            command,
            env,
            cwd: c.dir.clone(),
            health: c.health.clone(),
            timeout: c.timeout_ms.map(Duration::from_millis),
            instance: token,
            resources: c.resources.clone(),
            credential: ctx.credentials.get(&task.component).cloned(),
            withhold: ctx.withhold.clone(),
            egress: ctx.egress,
            data_api: ctx.data_api,
            volumes,
            replace: crate::plan::replace_of(
                &ctx.components,
                ctx.read_by_others(),
                &task.component,
            ),
        };
        (attrs, spec)
    };
    let hash = hash_attrs(&task.kind, &attrs);
    let driver = driver_for(&task.kind);

    // An image runs by digest: resolved (and fetched) now, or on a restart
    // or a wake the very bytes that ran before, whatever its tag says since.
    let mut pinned = Ok(());
    if let Kind::Image(image) = &mut spec.kind {
        let again = task.restart || previous.as_ref().is_some_and(|h| h.idle);
        match previous
            .as_ref()
            .and_then(|h| h.image.clone())
            .filter(|_| again)
        {
            Some(digest) => image.reference = digest,
            None => {
                match commons_runtime::image::resolve(&ctx.layout, &image.reference, pulling).await
                {
                    Ok(by_digest) => image.reference = by_digest,
                    Err(e) => pinned = Err(e),
                }
            }
        }
    }

    let mut attempts = 0u32;
    let result: Result<Applied, DriverError> = if let Err(e) = pinned {
        attempts = 1;
        Err(e)
    } else if task.action == Action::Update && commons_blueprint::Kind::runs(&task.kind) {
        // Only the route changed: the running process stays as it is.
        attempts = 1;
        Ok(Applied {
            handle: previous.clone().unwrap_or_default(),
            outputs: row
                .and_then(|r| serde_json::from_value(r.outputs.clone()).ok())
                .unwrap_or_default(),
            retired: None,
        })
    } else {
        let mut prev = previous.clone();
        loop {
            attempts += 1;
            match driver.apply(&ctx.layout, &spec, prev.as_ref()).await {
                Ok(a) => break Ok(a),
                Err(e) if attempts <= c.retries => {
                    let _ = e;
                    // The old version was stopped by the first attempt; keep its port.
                    prev = prev.map(|h| Handle {
                        pid: None,
                        instance: None,
                        ..h
                    });
                    tokio::time::sleep(Duration::from_millis(100 << attempts.min(6))).await;
                }
                Err(e) => break Err(e),
            }
        }
    };
    let base = ComponentRow {
        name: task.component.clone(),
        kind: task.kind.clone(),
        state: ComponentState::Ready,
        hash: String::new(),
        config: serde_json::to_value(&attrs).expect("attrs serialise"),
        outputs: serde_json::json!({}),
        handle: serde_json::Value::Null,
        depends_on: c.depends_on.clone(),
        error: None,
        updated_at_ms: now_ms(),
    };
    match result {
        Ok(mut applied) => {
            // Outputs are recorded and shown with the password masked.
            if let Some(password) = ctx.credentials.get(&task.component) {
                for v in applied.outputs.values_mut() {
                    *v = v.replace(password.as_str(), MASK);
                }
            }
            ctx.outputs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    task.component.clone(),
                    applied
                        .outputs
                        .iter()
                        .map(|(k, v)| (k.clone(), Some(v.clone())))
                        .collect(),
                );
            if let Some(old) = applied.retired.take() {
                ctx.retired
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((task.component.clone(), old));
            }
            applied.handle.restarts = match &previous {
                // Woken from idle: not a crash.
                Some(p) if p.idle => p.restarts,
                Some(p) if task.restart => p.restarts + 1,
                _ => 0,
            };
            let row = ComponentRow {
                hash,
                outputs: serde_json::to_value(&applied.outputs).expect("outputs serialise"),
                handle: serde_json::to_value(&applied.handle).expect("handle serialises"),
                ..base
            };
            (Ok(()), attempts, ComponentChange::Put(row))
        }
        Err(e) if spec.replace == Replace::StartFirst && still_running(previous.as_ref()) => {
            // The old version never stopped: it keeps serving, as recorded.
            let row = row.cloned().unwrap_or(base);
            let row = ComponentRow {
                error: Some(redact(&e.to_string(), &ctx.secrets)),
                updated_at_ms: now_ms(),
                ..row
            };
            (Err(e), attempts, ComponentChange::Put(row))
        }
        Err(e) => {
            // Keep the port so that a retry serves where dependents expect.
            let handle = Handle {
                port: previous.and_then(|h| h.port),
                ..Handle::default()
            };
            let row = ComponentRow {
                state: ComponentState::Error,
                error: Some(redact(&e.to_string(), &ctx.secrets)),
                handle: serde_json::to_value(&handle).expect("handle serialises"),
                ..base
            };
            (Err(e), attempts, ComponentChange::Put(row))
        }
    }
}

/// True when `handle`'s process is alive.
fn still_running(handle: Option<&Handle>) -> bool {
    handle.is_some_and(|h| matches!((h.pid, &h.instance), (Some(pid), Some(i)) if commons_runtime::proc::is_instance_alive(pid, i)))
}
