//! How a process component last ended: written by the process that waited
//! for it (its keeper, see [`crate::sandbox::helper_main`]) to
//! `run/COMPONENT.exit`, read by `status` and the supervisor.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One ended run of a process component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The instance token of the run that ended.
    pub instance: String,
    /// Its exit status, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The kernel's out-of-memory killer ended it (its cgroup counted a kill).
    #[serde(default)]
    pub oom: bool,
    /// It was asked to stop (SIGTERM reached its keeper).
    #[serde(default)]
    pub stopped: bool,
    /// Its memory limit, for the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<u64>,
    /// When it ended, in milliseconds since the epoch.
    pub at_ms: u64,
}

/// What `status` calls a process that is not running, from how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Killed by the kernel for going over its memory limit.
    Oom,
    /// Exited with a failure or was killed, without being asked to stop.
    Crashed,
    /// Exited with status 0, or was stopped on request.
    Stopped,
}

impl ExitRecord {
    pub fn ending(&self) -> Ending {
        if self.oom {
            Ending::Oom
        } else if self.stopped || (self.code == Some(0) && self.signal.is_none()) {
            Ending::Stopped
        } else {
            Ending::Crashed
        }
    }

    /// One line for people: "exited with status 1", "killed by SIGSEGV",
    /// "out of memory (over its limit of 64 MiB)".
    pub fn reason(&self) -> String {
        if self.oom {
            return match self.memory_limit {
                Some(m) => format!(
                    "out of memory: killed by the kernel over its limit of {} MiB",
                    m >> 20
                ),
                None => "out of memory: killed by the kernel".into(),
            };
        }
        let how = match (self.code, self.signal) {
            (_, Some(s)) => format!("killed by {}", signal_name(s)),
            (Some(c), None) => format!("exited with status {c}"),
            (None, None) => "ended".into(),
        };
        if self.stopped {
            format!("stopped on request ({how})")
        } else {
            how
        }
    }
}

/// The conventional name of a signal number.
pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

/// The last ending recorded for a component, if any.
pub fn read(path: &Path) -> Option<ExitRecord> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Writes `record` whole, so a reader never sees half of it.
pub fn write(path: &Path, record: &ExitRecord) -> std::io::Result<()> {
    crate::layout::write_whole(
        path,
        &serde_json::to_vec(record).map_err(std::io::Error::other)?,
    )
}

/// How many times the kernel's OOM killer struck in a component's memory
/// cgroup (`oom_kill` of cgroup v2's `memory.events`, or of v1's
/// `memory.oom_control`); `None` when it has no memory cgroup.
pub fn oom_kills(cgroup: &str) -> Option<u64> {
    let root = Path::new("/sys/fs/cgroup");
    let v2 = root.join("commons").join(cgroup).join("memory.events");
    let v1 = root
        .join("memory/commons")
        .join(cgroup)
        .join("memory.oom_control");
    let text = std::fs::read_to_string(v2)
        .or_else(|_| std::fs::read_to_string(v1))
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(code: Option<i32>, signal: Option<i32>) -> ExitRecord {
        ExitRecord {
            instance: "i".into(),
            code,
            signal,
            oom: false,
            stopped: false,
            memory_limit: None,
            at_ms: 0,
        }
    }

    #[test]
    fn endings_and_reasons() {
        assert_eq!(record(Some(0), None).ending(), Ending::Stopped);
        assert_eq!(record(Some(3), None).ending(), Ending::Crashed);
        assert_eq!(record(Some(3), None).reason(), "exited with status 3");
        let killed = record(None, Some(libc::SIGKILL));
        assert_eq!(killed.ending(), Ending::Crashed);
        assert_eq!(killed.reason(), "killed by SIGKILL");
        let stopped = ExitRecord {
            stopped: true,
            ..record(None, Some(libc::SIGTERM))
        };
        assert_eq!(stopped.ending(), Ending::Stopped);
        assert_eq!(stopped.reason(), "stopped on request (killed by SIGTERM)");
        let oom = ExitRecord {
            oom: true,
            memory_limit: Some(64 << 20),
            ..record(None, Some(libc::SIGKILL))
        };
        assert_eq!(oom.ending(), Ending::Oom);
        assert!(oom.reason().contains("64 MiB"), "{}", oom.reason());
    }

    #[test]
    fn records_round_trip_through_files() {
        let dir = std::env::temp_dir().join(format!("commons-exit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("web.exit");
        assert_eq!(read(&path), None);
        let r = record(Some(1), None);
        write(&path, &r).unwrap();
        assert_eq!(read(&path), Some(r));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
