//! What this node's sites use — CPU time and memory of each running
//! component, sampled from `/proc` — sent as usage events in the node's
//! name, so the provider is paid for what its machine did.

use std::collections::HashMap;
use std::time::Duration;

use crate::ops::Executor;

/// Keeps each component's CPU time at the last sample, to send the
/// difference.
#[derive(Default)]
pub struct Sampler {
    cpu: HashMap<(String, String, i32), u64>,
}

impl Sampler {
    /// One `resources` event per running component of every site here.
    pub fn sample(
        &mut self,
        executor: &Executor,
        node: &str,
        every: Duration,
    ) -> Vec<serde_json::Value> {
        let now = commons_clock::now_ms();
        let mut events = Vec::new();
        let mut seen = HashMap::new();
        for (site, component, pid) in executor.running() {
            let s = commons_runtime::usage::sample_group(pid);
            let key = (site.clone(), component.clone(), pid);
            let before = self.cpu.get(&key).copied().unwrap_or(0);
            seen.insert(key, s.cpu_ms);
            events.push(serde_json::json!({
                "specversion": "1.0",
                "id": format!("{node}/{site}/{component}/{now}"),
                "source": format!("node:{node}"),
                "type": "resources",
                "subject": site,
                "time": humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_millis(now.max(0) as u64)
                ).to_string(),
                "data": {
                    "site": site, "component": component,
                    "cpu_ms": s.cpu_ms.saturating_sub(before),
                    "memory_bytes": s.memory_bytes,
                    "memory_byte_seconds": s.memory_bytes * every.as_secs().max(1),
                },
            }));
        }
        // Components that stopped are forgotten.
        self.cpu = seen;
        events
    }
}
