//! What a deployment looks like now: its components' states as recorded
//! and observed, crash loops, last exits, routes; its history and logs.

use super::*;

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
    /// Where the host reaches it, when not at 127.0.0.1: its site's own
    /// address (sandboxed sites have a network of their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::Ipv4Addr>,
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
pub(crate) fn rfc3339_ms(ms: i64) -> String {
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

/// The route recorded in a component's configuration.
pub(crate) fn route_of(config: &serde_json::Value) -> Option<commons_blueprint::model::Route> {
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

impl Engine {
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
        let uid = commons_runtime::sandbox::recorded_uid(&self.layout.home, name);
        let components = rows
            .into_iter()
            .map(|r| {
                let handle = plan::handle_of(&r);
                let observed = driver_for(&r.kind).observe(&handle);
                let alive = observed == Observed::Running;
                let exit = commons_blueprint::Kind::runs(&r.kind)
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
                    (ComponentState::Applying, _) if commons_blueprint::Kind::runs(&r.kind) => {
                        "starting"
                    }
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
                    address: handle.addr,
                    uid: uid.filter(|_| commons_blueprint::Kind::runs(&r.kind) || r.kind == "job"),
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
}
