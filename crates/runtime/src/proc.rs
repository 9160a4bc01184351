//! Starting, recognising and stopping the processes of components.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::{DriverError, Layout, Spec};

/// Environment variable carrying the start's unique token.
pub const INSTANCE_VAR: &str = "COMMONS_INSTANCE";

/// Characters that make a command need a shell.
const SHELL_SYNTAX: &[char] = &[
    '|', '&', ';', '<', '>', '(', ')', '$', '`', '\\', '"', '\'', '*', '?', '[', ']', '#', '~',
    '=', '%', '{', '}', '\n', '!',
];

/// The `commons` binary, which doubles as the sandbox helper and keeper
/// (`commons __sandbox ...`), when the program using this crate is it.
static HELPER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Registers the `commons` binary as the helper. Without it, processes run
/// without a keeper (how they end is not recorded) and the sandbox uses the
/// current executable.
pub fn set_helper(binary: PathBuf) {
    let _ = HELPER.set(binary);
}

/// A started process: the child, and where its log started for this run.
pub struct Started {
    pub child: Child,
    pub pid: i32,
    pub log: PathBuf,
    pub log_offset: u64,
    /// Where the host reaches it: its site's address when sandboxed.
    pub addr: std::net::Ipv4Addr,
}

/// Starts `spec.command` in a new session of its own, with output appended
/// to the component's log, its pid written to the component's pidfile, and
/// `COMMONS_DATA_DIR` plus `extra_env` in its environment.
///
/// Commands without shell syntax are executed directly (half the cost of a
/// shell); others run under `sh -c`.
pub fn spawn(
    layout: &Layout,
    spec: &Spec,
    extra_env: &[(&str, String)],
) -> Result<Started, DriverError> {
    launch(layout, spec, extra_env, None)
}

/// Starts a container's runtime (`argv`: the command that runs it in the
/// foreground) under a keeper, as [`spawn`] starts a process; the host
/// reaches it at `addr`. Its isolation is the runtime's: the keeper runs
/// as the platform, with only the basics of the platform's environment.
pub fn spawn_container(
    layout: &Layout,
    spec: &Spec,
    argv: &[String],
    addr: std::net::Ipv4Addr,
) -> Result<Started, DriverError> {
    launch(layout, spec, &[], Some((argv, addr)))
}

fn launch(
    layout: &Layout,
    spec: &Spec,
    extra_env: &[(&str, String)],
    container: Option<(&[String], std::net::Ipv4Addr)>,
) -> Result<Started, DriverError> {
    let command = match container {
        Some((argv, _)) => argv.join(" "),
        None => spec
            .command
            .clone()
            .ok_or_else(|| DriverError::Failed("component has no command".into()))?,
    };
    let command = command.as_str();
    let log_path = layout.log_file(&spec.deployment, &spec.component);
    let pidfile_path = layout.pid_file(&spec.deployment, &spec.component);
    let data = layout.data_dir(&spec.deployment);
    for dir in [
        log_path.parent(),
        pidfile_path.parent(),
        Some(data.as_path()),
    ]
    .into_iter()
    .flatten()
    {
        crate::layout::private_dir(dir)
            .map_err(DriverError::io(format!("creating {}", dir.display())))?;
    }
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(DriverError::io(format!(
            "opening log {}",
            log_path.display()
        )))?;
    let log_offset = log.seek(SeekFrom::End(0)).unwrap_or(0);
    let _ = writeln!(
        log,
        "--- {} {} started (instance {}) ---",
        spec.component,
        if matches!(spec.kind, commons_blueprint::Kind::Job { .. }) {
            "job"
        } else {
            "process"
        },
        spec.instance
    );
    let log_offset = log_offset.max(log.stream_position().unwrap_or(log_offset));
    let stderr = log
        .try_clone()
        .map_err(DriverError::io("duplicating log handle"))?;

    let sandboxed = crate::sandbox::enabled();
    // Jobs are waited for by their driver; processes outlive it.
    let keeper = !matches!(spec.kind, commons_blueprint::Kind::Job { .. });
    let exit_file = layout.exit_file(&spec.deployment, &spec.component);
    let mut addr = std::net::Ipv4Addr::LOCALHOST;
    // A container is told in its own configuration (`image::spawn`).
    let mut data_url = match (container, sandboxed) {
        (None, false) => {
            crate::net::data_api_url(crate::settings::current().data_api, None, spec.data_api)
                .map_err(DriverError::io("opening the way to the data API"))?
        }
        _ => None,
    };
    let mut cmd =
        if let Some((argv, at)) = container {
            addr = at;
            let me = match HELPER.get() {
                Some(h) => h.clone(),
                None => std::env::current_exe()
                    .map_err(DriverError::io("finding the commons binary"))?,
            };
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            // The runtime confines the container in the instance's cgroup
            // (see `image::spawn`) and keeps it after it ends, so the keeper
            // reads whether the OOM killer struck there.
            let cgroup = crate::image::cgroup_of(&spec.deployment, &spec.component, &spec.instance);
            let mut c = Command::new(me);
            c.arg("__sandbox").args(crate::sandbox::keeper_args(
                &exit_file,
                &argv,
                Some((&cgroup, spec.resources.memory_bytes)),
            ));
            c
        } else if sandboxed {
            let uid = crate::sandbox::uid_for(&layout.home, &spec.deployment)
                .map_err(DriverError::io("allocating the deployment's user"))?;
            crate::sandbox::give(&data, uid)
                .map_err(DriverError::io("handing the data directory to its user"))?;
            crate::sandbox::traversable(&layout.home, &layout.deployment_dir(&spec.deployment))
                .map_err(DriverError::io("opening the way to the data directory"))?;
            let net = crate::net::site_network(&layout.home, &spec.deployment, spec.egress)
                .map_err(DriverError::io("making the site's network"))?;
            addr = net.site_ip;
            data_url = crate::net::data_api_url(
                crate::settings::current().data_api,
                Some(&net),
                spec.data_api,
            )
            .map_err(DriverError::io("opening the way to the data API"))?;
            let limits = crate::sandbox::Limits {
                memory_bytes: spec.resources.memory_bytes,
                cpu_millis: spec.resources.cpu_millis,
                pids: spec.resources.pids,
            };
            let cgroup = format!("{}/{}", spec.deployment, spec.component);
            let me = match HELPER.get() {
                Some(h) => h.clone(),
                None => std::env::current_exe()
                    .map_err(DriverError::io("finding the commons binary"))?,
            };
            let netns = net.netns_path();
            let confinement = crate::sandbox::Confinement {
                uid,
                hostname: &spec.deployment,
                netns: &netns,
                cgroup: &cgroup,
                limits,
            };
            let mut c = Command::new(me);
            c.arg("__sandbox").args(crate::sandbox::helper_args(
                &confinement,
                &[&layout.deployment_dir(&spec.deployment), &spec.cwd],
                keeper.then_some(exit_file.as_path()),
                &shell_command(command),
            ));
            c
        } else if let Some(helper) = HELPER.get().filter(|_| keeper) {
            // A process gets a keeper that waits for it and records how it ended.
            let shell = shell_command(command);
            let argv: Vec<&str> = if command.contains(SHELL_SYNTAX) {
                vec!["/bin/sh", "-c", &shell]
            } else {
                command.split_whitespace().collect()
            };
            let mut c = Command::new(helper);
            c.arg("__sandbox")
                .args(crate::sandbox::keeper_args(&exit_file, &argv, None));
            c
        } else if command.contains(SHELL_SYNTAX) {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(command);
            c
        } else {
            let mut words = command.split_whitespace();
            let mut c = Command::new(words.next().expect("non-empty command"));
            c.args(words);
            c
        };
    // What a workload may see of the platform's environment: when sandboxed,
    // only the basics; otherwise the caller's (a developer's tools expect
    // it), less the platform's own settings, which carry credentials.
    if sandboxed || container.is_some() {
        cmd.env_clear();
        cmd.env("HOME", &data);
        for key in ["PATH", "LANG", "LC_ALL", "TZ"] {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
    } else {
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if name.starts_with("COMMONS_") || spec.withhold.iter().any(|w| *w == name) {
                cmd.env_remove(key);
            }
        }
    }
    cmd.current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(stderr))
        .env(INSTANCE_VAR, &spec.instance)
        .env("COMMONS_DATA_DIR", &data)
        .kill_on_drop(false);
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    if let Some(url) = &data_url {
        cmd.env(crate::DATA_URL_VAR, url);
    }
    let pidfile = CString::new(pidfile_path.as_os_str().as_bytes())
        .map_err(|_| DriverError::Failed("pidfile path contains a NUL byte".into()))?;
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (setsid, getpid, open, write, close) on memory prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            write_pid(&pidfile);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        let program = command.split_whitespace().next().unwrap_or("");
        DriverError::Failed(format!("cannot start `{program}`: {e}"))
    })?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    Ok(Started {
        child,
        pid,
        log: log_path.clone(),
        log_offset,
        addr,
    })
}

/// What `sh -c` runs for `command`: a simple command (no pipes, lists or
/// subshells) is `exec`uted, so the shell does not stay in between and how
/// the program ended (its signal, say) reaches the keeper unchanged.
fn shell_command(command: &str) -> String {
    const COMPOUND: &[char] = &['|', '&', ';', '\n', '(', ')', '`'];
    const KEYWORDS: &[&str] = &[
        "exec", "if", "while", "until", "for", "case", "!", "{", "time", "cd", "set", "export",
    ];
    let first = command.split_whitespace().next().unwrap_or("");
    if command.contains(COMPOUND) || first.contains('=') || KEYWORDS.contains(&first) {
        command.to_string()
    } else {
        format!("exec {command}")
    }
}

/// Writes the calling process's pid to `path`. Async-signal-safe.
fn write_pid(path: &CString) {
    let mut buf = [0u8; 16];
    // SAFETY: getpid takes nothing and cannot fail.
    let mut n = unsafe { libc::getpid() } as u32;
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // SAFETY: open, write and close on a NUL-terminated path and a stack
    // buffer that outlive the calls; all three are async-signal-safe.
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o600,
        );
        if fd >= 0 {
            libc::write(fd, buf[i..].as_ptr().cast(), buf.len() - i);
            libc::close(fd);
        }
    }
}

/// Reads the pid a child wrote before it ran its command.
pub fn read_pidfile(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// True if `pid` is alive and was started with this instance token.
///
/// The token guards against pid reuse; a zombie has an empty environment and
/// so counts as gone.
pub fn is_instance_alive(pid: i32, instance: &str) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(mut f) = File::open(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let mut env = Vec::new();
    if f.read_to_end(&mut env).is_err() {
        return false;
    }
    let needle = format!("{INSTANCE_VAR}={instance}");
    env.split(|&b| b == 0).any(|var| var == needle.as_bytes())
}

/// Live (not zombie) members of process group `pgid`.
fn live_members(pgid: i32) -> Vec<i32> {
    group_stats(pgid).into_iter().map(|(pid, _)| pid).collect()
}

/// Live (not zombie) members of process group `pgid`, each with the fields
/// of its `/proc/PID/stat` after the command name (state first).
pub(crate) fn group_stats(pgid: i32) -> Vec<(i32, Vec<String>)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
        let state = fields.first().map(String::as_str).unwrap_or("Z");
        let pgrp = fields.get(2).and_then(|f| f.parse::<i32>().ok());
        if pgrp == Some(pgid) && state != "Z" && state != "X" {
            out.push((pid, fields));
        }
    }
    out
}

/// Whether `pid` is a keeper (`commons __sandbox …`), which passes a
/// SIGTERM on to its group.
fn is_keeper(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == b"__sandbox"))
}

/// Stops the process group that `pid` leads: SIGTERM, then SIGKILL after
/// `grace`. Returns once no member is left.
///
/// Only a group that carries `instance` is signalled, so a reused pid of
/// somebody else's process is never touched.
pub async fn stop(pid: i32, instance: &str, grace: Duration) {
    if pid <= 0 {
        return;
    }
    let ours = |members: &[i32]| members.iter().any(|&m| is_instance_alive(m, instance));
    let members = live_members(pid);
    if !ours(&members) {
        return;
    }
    // A keeper passes SIGTERM on to its whole group itself: signalled with
    // the group, the workload would get it twice (and many apps take a
    // second SIGTERM as "quit now", skipping their drain).
    let target = if is_keeper(pid) { pid } else { -pid };
    // SAFETY: kill takes plain integers; the group is ours (checked above).
    unsafe {
        libc::kill(target, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if live_members(pid).is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !live_members(pid).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Kills a whole group at once, for leftovers of an interrupted deploy.
pub async fn kill_group(pid: i32, instance: &str) {
    stop(pid, instance, Duration::ZERO).await;
}

/// The last `max` bytes a component wrote to its log since `offset`.
pub fn log_tail(log: &Path, offset: u64, max: u64) -> String {
    let Ok(mut f) = File::open(log) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = offset.max(len.saturating_sub(max));
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::shell_command;

    #[test]
    fn simple_commands_are_executed_in_place_of_the_shell() {
        assert_eq!(
            shell_command("python3 -m http.server $PORT"),
            "exec python3 -m http.server $PORT"
        );
        assert_eq!(shell_command("app > \"$LOG\""), "exec app > \"$LOG\"");
        for compound in [
            "a && b",
            "a | b",
            "a; b",
            "X=1 app",
            "if true; then app; fi",
            "(app)",
            "cd /srv && app",
        ] {
            assert_eq!(shell_command(compound), compound);
        }
    }
}
