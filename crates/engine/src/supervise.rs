//! The supervisor: processes that stop by themselves are started again,
//! with exponential backoff, and everything recorded running is brought back
//! when the platform (or the machine) restarts.
//!
//! It only restarts: a component whose blueprint changed since its last
//! deploy waits for the next deploy, so editing a blueprint never deploys
//! it behind the user's back.

use std::collections::HashMap;
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
    /// (deployment, component) restarted.
    pub restarted: Vec<(String, String)>,
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
            for c in status.components.iter().filter(|c| c.kind == "process") {
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
                if c.state != "stopped" {
                    continue;
                }
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
                        pass.restarted.push(key);
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
        pass
    }
}
