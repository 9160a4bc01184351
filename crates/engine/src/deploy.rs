//! Deploying, redeploying and destroying: the plan against recorded state,
//! its tasks run along the dependency graph under the deployment's lock,
//! and the record of each run committed.

use super::*;

/// How long a deploy waits for another platform instance's work on the
/// same deployment.
const LEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// How often a waiting command tries a busy deployment's lock again.
const LOCK_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// What taking a deployment's lock does when another process holds it.
#[derive(Clone, Copy)]
pub struct LockWait {
    /// How long to wait: zero for the platform's own background work (it
    /// tries again on its next pass); minutes for a person's command, whose
    /// deployment the platform's idler or supervisor may hold for a moment.
    pub patience: std::time::Duration,
    /// Told the deployment's name once when the wait begins.
    pub notice: fn(&str),
}

impl Default for LockWait {
    fn default() -> Self {
        LockWait {
            patience: std::time::Duration::ZERO,
            notice: |_| {},
        }
    }
}

/// An exclusive lock on one deployment, released on drop (or when the
/// process dies, since it is an `flock`) — on this machine, and, when the
/// state is in PostgreSQL, across every instance sharing it (a lease).
pub struct Lock {
    _file: std::fs::File,
    _lease: Option<commons_store::Lease>,
}

impl Lock {
    /// Takes the lock; when another process on this machine holds it,
    /// waits up to `wait.patience` (calling `wait.notice` once, so a person
    /// hears why nothing happens yet) before answering [`EngineError::Busy`].
    pub(crate) fn take(
        path: &Path,
        deployment: &str,
        store: &StoreConfig,
        wait: &LockWait,
    ) -> Result<Lock, EngineError> {
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
        let try_lock = || unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !try_lock() {
            let since = std::time::Instant::now();
            if !wait.patience.is_zero() {
                (wait.notice)(deployment);
            }
            loop {
                if since.elapsed() >= wait.patience {
                    return Err(EngineError::Busy(format!(
                        "another command is working on deployment \"{deployment}\"; wait for it to finish"
                    )));
                }
                std::thread::sleep(LOCK_POLL.min(wait.patience));
                if try_lock() {
                    break;
                }
            }
        }
        // Another instance's work on it is waited for (a deploy's image
        // pulls and health checks take minutes at most).
        let lease = match store.lease(&format!("deploy:{deployment}"), LEASE_WAIT)? {
            commons_store::Leased::Held(lease) => lease,
            commons_store::Leased::Taken => {
                return Err(EngineError::Busy(format!(
                    "another platform instance has been working on deployment \"{deployment}\" for {} s; try again once it is done",
                    LEASE_WAIT.as_secs()
                )))
            }
        };
        Ok(Lock {
            _file: f,
            _lease: Some(lease),
        })
    }
}

/// Tasks for every change but `unchanged`, with their dependency edges.
pub(crate) fn build_tasks(
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
pub(crate) type RecordTree = BTreeMap<String, Vec<u8>>;

/// The files of a record's `source/` and the blueprint with paths made
/// relative to them, so a record holds no machine's paths.
pub(crate) fn record_files(bp: &Blueprint) -> Result<(RecordTree, String, Blueprint), EngineError> {
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

pub(crate) fn common_ancestor(paths: &[PathBuf]) -> PathBuf {
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
    pub(crate) fn recorded(
        &self,
        name: &str,
    ) -> Result<HashMap<String, ComponentRow>, EngineError> {
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

    pub(crate) fn compute_plan(
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

    pub(crate) async fn deploy_with(
        &self,
        target: &Target,
        jobs: usize,
        progress: &dyn Progress,
        fresh_secrets: bool,
        only_restarts: Option<&[String]>,
    ) -> Result<Outcome, EngineError> {
        let _lock = self.lock(&target.name)?;
        // A change of `network:` alone changes no component: it is applied
        // to the site's network (if it has one) here.
        if commons_runtime::sandbox::enabled() {
            commons_runtime::net::set_egress(
                &self.layout.home,
                &target.name,
                target.blueprint.network.egress,
            )
            .map_err(EngineError::io("the site's network"))?;
        }
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
            egress: target.blueprint.network.egress,
            data_api: !target.blueprint.data.is_empty(),
            secrets: secret_values,
            secret_prints: prints,
            components: target.blueprint.components.clone(),
            recorded,
            outputs: Mutex::new(outputs),
            retired: Mutex::new(Vec::new()),
            other_gateways: self.other_gateways(),
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
        let retired = std::mem::take(&mut *ctx.retired.lock().unwrap_or_else(|p| p.into_inner()));
        for (component, old) in &retired {
            commons_runtime::drivers::retire(
                &self.layout,
                &target.name,
                component,
                old,
                recorded_at as u64,
                ctx.other_gateways.as_deref(),
            )
            .await;
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
    pub(crate) fn write_record(
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
        // Which bytes each image component ran: a clone or a restore of this
        // record runs these, whatever the tags say by then.
        let mut images = serde_json::Map::new();
        for row in self.store.components(&target.name)? {
            let Some(commons_blueprint::Kind::Image(image)) =
                target.blueprint.components.get(&row.name).map(|c| &c.kind)
            else {
                continue;
            };
            if let Some(pinned) = crate::plan::handle_of(&row).image {
                images.insert(
                    row.name.clone(),
                    serde_json::json!({ "reference": image.reference, "pinned": pinned }),
                );
            }
        }
        if !images.is_empty() {
            out.insert(
                "images.json".into(),
                pretty(&serde_json::Value::Object(images)),
            );
        }
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
        let _lock = self.lock(name)?;
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
            egress: true,
            data_api: false,
            retired: Mutex::new(Vec::new()),
            other_gateways: self.other_gateways(),
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
            commons_runtime::net::remove_site(&self.layout.home, name);
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
