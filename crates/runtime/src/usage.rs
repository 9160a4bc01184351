//! What a workload uses, read from `/proc` and the filesystem: CPU time and
//! resident memory of every process in its group, bytes in its directories.

use std::path::Path;

/// One reading of a process group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// User + system CPU time of the live processes, in milliseconds.
    pub cpu_ms: u64,
    /// Resident memory, summed.
    pub memory_bytes: u64,
    pub processes: u32,
}

fn ticks_per_second() -> u64 {
    // SAFETY: sysconf takes an integer and reads configuration only.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Reads every live process whose process group is `pgid`.
pub fn sample_group(pgid: i32) -> Sample {
    let mut s = Sample::default();
    let hz = ticks_per_second();
    // Fields after the name: state(0) ppid(1) pgrp(2) ... utime(11) stime(12) ... rss(21, pages)
    for (_, f) in crate::proc::group_stats(pgid) {
        let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        s.cpu_ms += (field(11) + field(12)) * 1000 / hz;
        s.memory_bytes += field(21) * page_size();
        s.processes += 1;
    }
    s
}

fn page_size() -> u64 {
    // SAFETY: as above.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Bytes in the files under `dir` (0 if it does not exist).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => todo.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// The most memory a component's cgroup used since the last call (cgroup
/// v1's `memory.max_usage_in_bytes`, or v2's `memory.peak`), then reset
/// so the next call covers the next interval. `None` when the component has
/// no memory cgroup (unsandboxed) or the kernel keeps no peak.
pub fn take_memory_peak(deployment: &str, component: &str) -> Option<u64> {
    let root = Path::new("/sys/fs/cgroup");
    let candidates = [
        root.join("memory/commons")
            .join(deployment)
            .join(component)
            .join("memory.max_usage_in_bytes"),
        root.join("commons")
            .join(deployment)
            .join(component)
            .join("memory.peak"),
    ];
    candidates.iter().find_map(|path| {
        let peak = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
        // Writing resets v1's peak, so the next reading is of the next
        // interval. v2 resets only for the writer's open file, so there the
        // peak is since the workload started: still an upper bound.
        let _ = std::fs::write(path, "0");
        Some(peak)
    })
}
