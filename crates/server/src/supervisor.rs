//! What `commons serve` runs beside the API: the supervisor, which restarts
//! workloads that stopped, and the sampler, which meters what they use.

use commons_engine::Engine;

use crate::config::SupervisorSettings;

/// How often the supervisor looks: a crashed process is back within about
/// this long plus its start-up.
pub const PASS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Restarts stopped workloads, for as long as `serve` runs, with an engine
/// of its own.
pub fn spawn(engine: Engine, settings: SupervisorSettings) {
    std::thread::Builder::new()
        .name("commons-supervisor".into())
        .spawn(move || {
            commons_gateway::background_priority();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the async runtime starts");
            let mut supervisor = commons_engine::supervise::Supervisor::new();
            let mut sampler = Sampler::new(&engine, &settings);
            loop {
                let pass = rt.block_on(supervisor.pass(&engine));
                sampler.maybe_sample(&engine);
                let quiet = sampler.quiet_sites(&engine);
                for (d, stopped) in rt.block_on(idle(&engine, quiet)) {
                    eprintln!(
                        "{:>12} {d} ({} idle, no traffic)",
                        "Idled",
                        stopped.join(", ")
                    );
                }
                for (d, c, ended) in &pass.restarted {
                    eprintln!("{:>12} {d}/{c} ({ended})", "Restarted");
                }
                for (d, why) in &pass.failed {
                    eprintln!("{:>12} {d}: {}", "Failed", why.lines().next().unwrap_or(""));
                }
                std::thread::sleep(PASS_EVERY);
            }
        })
        .expect("the supervisor thread starts");
}

/// Samples every running workload's CPU, memory and storage, and meters it.
pub struct Sampler {
    meter: Option<commons_meter::Meter>,
    every: std::time::Duration,
    idle_after: Option<std::time::Duration>,
    last: Option<std::time::Instant>,
    /// CPU milliseconds at the last reading, per (deployment, component, pid).
    cpu: std::collections::HashMap<(String, String, i32), u64>,
    node: String,
}

/// Stops the processes of each site in `sites`; says which it stopped.
async fn idle(engine: &Engine, sites: Vec<String>) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for site in sites {
        if let Ok(stopped) = engine.idle(&site).await {
            out.push((site, stopped));
        }
    }
    out
}

impl Sampler {
    pub fn new(engine: &Engine, settings: &SupervisorSettings) -> Sampler {
        let meter = crate::periods::meter(&engine.layout.home, engine.store_config()).ok();
        let node = crate::host_name().unwrap_or_else(|| "local".into());
        Sampler {
            meter,
            every: settings.sample_every,
            idle_after: settings.idle_after,
            last: None,
            cpu: Default::default(),
            node,
        }
    }

    /// The free-hosted sites running with no request for `idle_after`
    /// (unset: none), counting a deploy or wake as activity. Always-on
    /// sites are left running. (Not async: the meter's PostgreSQL client
    /// blocks.)
    pub fn quiet_sites(&self, engine: &Engine) -> Vec<String> {
        let Some(after) = self.idle_after.map(|d| d.as_secs() as i64) else {
            return Vec::new();
        };
        let now = commons_clock::now_ms();
        let mut out = Vec::new();
        for d in engine.list().unwrap_or_default() {
            if engine.hosting(&d.name) == commons_engine::Hosting::AlwaysOn {
                continue;
            }
            let Ok(status) = engine.observe(&d.name) else {
                continue;
            };
            if !status
                .components
                .iter()
                .any(|c| commons_blueprint::Kind::runs(&c.kind) && c.state == "running")
            {
                continue;
            }
            let last_request = self
                .meter
                .as_ref()
                .and_then(|m| m.last_request(&d.name).ok().flatten())
                .unwrap_or(0);
            if now - last_request.max(d.updated_at_ms) > after * 1000 {
                out.push(d.name);
            }
        }
        out
    }

    pub fn maybe_sample(&mut self, engine: &Engine) {
        let now = std::time::Instant::now();
        let interval = match self.last {
            Some(t) if now.duration_since(t) < self.every => return,
            Some(t) => now.duration_since(t),
            None => self.every,
        };
        self.last = Some(now);
        let Some(meter) = self.meter.as_mut() else {
            return;
        };
        let ms = commons_clock::now_ms();
        let mut events = Vec::new();
        for d in engine.list().unwrap_or_default() {
            let Ok(status) = engine.observe(&d.name) else {
                continue;
            };
            let storage = commons_runtime::usage::dir_bytes(&engine.layout.deployment_dir(&d.name));
            for c in status.components.iter().filter(|c| c.state == "running") {
                let Some(pid) = c.pid else { continue };
                let sample = commons_runtime::usage::sample_group(pid);
                let key = (d.name.clone(), c.name.clone(), pid);
                let before = self.cpu.insert(key, sample.cpu_ms).unwrap_or(0);
                // The cgroup's peak since the last sample when it keeps one
                // (sandboxed), else this sample's reading.
                let peak = commons_runtime::usage::take_memory_peak(&d.name, &c.name)
                    .unwrap_or(0)
                    .max(sample.memory_bytes);
                let data = serde_json::json!({
                    "site": d.name, "component": c.name, "node": self.node,
                    "operator": "local", "provider": "local",
                    "cpu_ms": sample.cpu_ms.saturating_sub(before),
                    "memory_bytes": sample.memory_bytes,
                    "memory_peak_bytes": peak,
                    "memory_byte_seconds": sample.memory_bytes * interval.as_secs().max(1),
                    "storage_bytes": storage,
                    "restarts": c.restarts,
                });
                events.push(commons_meter::Event {
                    specversion: "1.0".into(),
                    id: format!("{}/{}/{ms}", d.name, c.name),
                    source: format!("runtime/{}", self.node),
                    kind: "resources".into(),
                    subject: Some(d.name.clone()),
                    time: commons_meter::format_time(ms),
                    data: data.as_object().cloned().unwrap_or_default(),
                });
            }
        }
        if !events.is_empty() {
            if let Err(e) = meter.ingest(&events, None) {
                eprintln!("sampler: {e}");
            }
        }
    }
}
