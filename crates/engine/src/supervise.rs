//! The supervisor: processes that stop by themselves are started again,
//! with exponential backoff, and everything recorded running is brought back
//! when the platform (or the machine) restarts.
//!
//! It only restarts: a component whose blueprint changed since its last
//! deploy waits for the next deploy, so editing a blueprint never deploys
//! it behind the user's back.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

use crate::Engine;

/// Longest wait between two restarts of a crash-looping process.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A process up this long is healthy again: its backoff resets.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    not_before: Instant,
    last_restart: Instant,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// (deployment, component, how it had ended) restarted.
    pub restarted: Vec<(String, String, String)>,
    /// (deployment, component) waiting for its backoff.
    pub waiting: Vec<(String, String)>,
    /// Deployments whose restart failed, with why.
    pub failed: Vec<(String, String)>,
}

#[derive(Default)]
pub struct Supervisor {
    backoff: HashMap<(String, String), Backoff>,
    /// Deployments whose restart could not even be tried (say, their
    /// blueprint file is gone): left alone until then, and reported once.
    quiet_until: HashMap<String, Instant>,
    /// The crash loops last written to `supervisor.json`.
    published: Option<String>,
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    /// Looks at every deployment once and restarts what stopped.
    pub async fn pass(&mut self, engine: &Engine) -> Pass {
        let now = Instant::now();
        let mut pass = Pass::default();
        let Ok(deployments) = engine.list() else {
            return pass;
        };
        for d in deployments {
            let Ok(status) = engine.observe(&d.name) else {
                continue;
            };
            let mut due = Vec::new();
            let mut why = HashMap::new();
            for c in status
                .components
                .iter()
                .filter(|c| commons_blueprint::Kind::runs(&c.kind))
            {
                let key = (d.name.clone(), c.name.clone());
                if c.state == "running" {
                    if self
                        .backoff
                        .get(&key)
                        .is_some_and(|b| now.duration_since(b.last_restart) > STABLE_AFTER)
                    {
                        self.backoff.remove(&key);
                    }
                    continue;
                }
                if !crate::is_down(&c.state) {
                    continue;
                }
                let ended = match (&c.last_exit, c.state.as_str()) {
                    (Some(e), "crashed" | "oom") => e.reason.clone(),
                    _ => "it had stopped".to_string(),
                };
                why.insert(c.name.clone(), ended);
                match self.backoff.get(&key) {
                    Some(b) if now < b.not_before => pass.waiting.push(key),
                    _ => due.push(c.name.clone()),
                }
            }
            if due.is_empty() || self.quiet_until.get(&d.name).is_some_and(|t| now < *t) {
                continue;
            }
            match engine.restart_stopped(&d.name, &due).await {
                Ok(outcome) => {
                    for t in &outcome.tasks {
                        let key = (d.name.clone(), t.component.clone());
                        let b = self.backoff.entry(key.clone()).or_insert(Backoff {
                            failures: 0,
                            not_before: now,
                            last_restart: now,
                        });
                        b.failures += 1;
                        b.last_restart = now;
                        let wait =
                            Duration::from_millis(500u64 << b.failures.min(8)).min(MAX_BACKOFF);
                        b.not_before = now + wait;
                        let ended = why.remove(&t.component).unwrap_or_default();
                        pass.restarted.push((key.0, key.1, ended));
                    }
                }
                // A deploy is at work on it: look again next pass.
                Err(crate::EngineError::Busy(_)) => {}
                Err(e) => {
                    self.quiet_until.insert(d.name.clone(), now + MAX_BACKOFF);
                    pass.failed.push((d.name.clone(), e.to_string()));
                }
            }
        }
        self.publish(engine.layout(), &pass);
        pass
    }

    /// Writes the crash loops in progress (`supervisor.json`) for `status`,
    /// when they changed.
    fn publish(&mut self, layout: &commons_runtime::Layout, pass: &Pass) {
        let waiting: BTreeMap<String, Waiting> = self
            .backoff
            .iter()
            .filter(|(key, _)| {
                pass.waiting.contains(key)
                    || pass.restarted.iter().any(|r| r.0 == key.0 && r.1 == key.1)
            })
            .map(|((d, c), b)| {
                let wait = b.not_before.saturating_duration_since(Instant::now());
                (
                    format!("{d}/{c}"),
                    Waiting {
                        restarts_in_a_row: b.failures,
                        next_restart_ms: commons_clock::now_ms() as u64 + wait.as_millis() as u64,
                    },
                )
            })
            .collect();
        let shape: BTreeMap<&String, u32> = waiting
            .iter()
            .map(|(k, w)| (k, w.restarts_in_a_row))
            .collect();
        let shape = format!("{shape:?}");
        if self.published.as_deref() == Some(shape.as_str()) {
            return;
        }
        let state = Published {
            pid: std::process::id(),
            waiting,
        };
        let written = serde_json::to_vec(&state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                commons_runtime::layout::write_whole(&layout.supervisor_state(), &bytes)
            });
        if written.is_ok() {
            self.published = Some(shape);
        }
    }
}

/// A process the supervisor keeps restarting (a crash loop).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Waiting {
    /// Restarts since it last stayed up for [`STABLE_AFTER`].
    pub restarts_in_a_row: u32,
    /// When the supervisor will try again, in milliseconds since the epoch.
    pub next_restart_ms: u64,
}

/// What a running supervisor publishes.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Published {
    pid: u32,
    /// "DEPLOYMENT/COMPONENT" → its crash loop.
    waiting: BTreeMap<String, Waiting>,
}

/// The crash loop of `deployment/component` as the running supervisor
/// published it (nothing when no supervisor runs).
pub fn waiting(
    layout: &commons_runtime::Layout,
    deployment: &str,
    component: &str,
) -> Option<Waiting> {
    let published: Published =
        serde_json::from_slice(&std::fs::read(layout.supervisor_state()).ok()?).ok()?;
    if !std::path::Path::new(&format!("/proc/{}", published.pid)).exists() {
        return None;
    }
    published
        .waiting
        .get(&format!("{deployment}/{component}"))
        .copied()
}
