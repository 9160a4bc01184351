//! `commons daemon`: the platform daemon (`commons serve`) of a data
//! directory — started when a deploy leaves processes to supervise, asked
//! over its local socket, stopped on request.

use std::path::Path;
use std::time::{Duration, Instant};

use commons_server::local;

use crate::{output, Failure};

#[derive(clap::Subcommand, Debug)]
pub enum DaemonCommand {
    /// Start `commons serve` in the background if it is not running.
    Start {
        /// Options for `commons serve` (e.g. `-- --http 127.0.0.1:9080`).
        #[arg(last = true)]
        serve: Vec<String>,
    },
    /// Whether it runs, where it listens, what it supervises.
    Status,
    /// Stop it (workloads keep running, unsupervised, until it starts again).
    Stop,
}

/// Set to `off` to never start the daemon behind a command's back.
pub const AUTOSTART_VAR: &str = "COMMONS_DAEMON";

fn autostart_enabled() -> bool {
    std::env::var(AUTOSTART_VAR).map_or(true, |v| v != "off" && v != "0")
}

fn binary() -> Result<std::path::PathBuf, Failure> {
    std::env::current_exe()
        .map_err(|e| Failure::Failed(format!("cannot find the commons binary: {e}")))
}

fn started_message(info: &local::DaemonInfo, home: &Path) {
    let gateway: Vec<String> = info
        .gateway
        .iter()
        .map(|(what, addr)| format!("{what} {addr}"))
        .collect();
    eprintln!(
        "{:>12} the platform daemon (pid {}; API {}, gateway {}; log {})",
        "Started",
        info.pid,
        info.api,
        gateway.join(", "),
        commons_runtime::Layout::new(home).serve_log().display()
    );
    let admin = commons_runtime::Layout::new(home).admin_token();
    if admin.exists() {
        eprintln!(
            "{:>12} the administrator's API token is in {} (read it, then delete the file)",
            "Admin",
            admin.display()
        );
    }
}

/// After a command left `deployment` with processes: make sure a daemon
/// supervises them (unless `COMMONS_DAEMON=off`). A daemon that cannot
/// start is a warning, not a failure: the deploy itself succeeded.
pub fn ensure_supervised(home: &Path, engine: &commons_engine::Engine, deployment: &str) {
    if !autostart_enabled() || local::running(home).is_some() {
        return;
    }
    let has_processes = engine.observe(deployment).is_ok_and(|s| {
        s.components
            .iter()
            .any(|c| commons_blueprint::Kind::runs(&c.kind))
    });
    if !has_processes {
        return;
    }
    let Ok(me) = binary() else {
        return;
    };
    match local::start(home, &me, &[]) {
        Ok(info) => started_message(&info, home),
        // Another command started one at the same moment: all is well.
        Err(_) if local::running(home).is_some() => {}
        Err(e) => output::warn(&format!(
            "{e}; the processes run, but nothing restarts them if they stop \
             (`commons daemon start -- --http ADDR` picks other addresses)"
        )),
    }
}

pub fn run(cmd: DaemonCommand, home: &Path, json: bool) -> Result<(), Failure> {
    match cmd {
        DaemonCommand::Start { serve } => {
            if let Some(info) = local::running(home) {
                if json {
                    output::json(&info);
                } else {
                    eprintln!("{:>12} already (pid {})", "Running", info.pid);
                }
                return Ok(());
            }
            let info = local::start(home, &binary()?, &serve).map_err(Failure::Failed)?;
            if json {
                output::json(&info);
            } else {
                started_message(&info, home);
            }
            Ok(())
        }
        DaemonCommand::Status => {
            let Some(_) = local::running(home) else {
                if json {
                    output::json(&serde_json::json!({ "running": false }));
                } else {
                    println!("not running (`commons daemon start` starts it)");
                }
                return Ok(());
            };
            let answer = ask(home, "GET", "/api/daemon")?;
            let mut v: serde_json::Value =
                serde_json::from_slice(&answer.body).map_err(|e| Failure::Failed(e.to_string()))?;
            v["running"] = true.into();
            if json {
                output::json(&v);
            } else {
                let d = &v["daemon"];
                println!(
                    "running (pid {}, since {})",
                    d["pid"],
                    str_of(&d["started_at"])
                );
                println!("api      {}", str_of(&d["api"]));
                for g in d["gateway"].as_array().into_iter().flatten() {
                    println!("{:8} {}", str_of(&g[0]), str_of(&g[1]));
                }
                println!(
                    "supervising {} deployments: {} processes running, {} down",
                    v["deployments"], v["processes_running"], v["processes_down"]
                );
            }
            Ok(())
        }
        DaemonCommand::Stop => {
            let Some(info) = local::running(home) else {
                eprintln!("{:>12} the platform daemon was not running", "Stopped");
                return Ok(());
            };
            // SAFETY: a plain kill of the pid the running daemon wrote.
            unsafe {
                libc::kill(info.pid as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Path::new(&format!("/proc/{}", info.pid)).exists() && Instant::now() < deadline {
                if proc_state(info.pid) == Some('Z') {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if local::running(home).is_some() {
                return Err(Failure::Failed(format!(
                    "the platform daemon (pid {}) did not stop within 15 s",
                    info.pid
                )));
            }
            eprintln!("{:>12} the platform daemon (pid {})", "Stopped", info.pid);
            Ok(())
        }
    }
}

fn str_of(v: &serde_json::Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// One request to the running daemon; a problem answer becomes a failure
/// (4xx: bad input, otherwise: the operation failed).
pub fn ask(home: &Path, method: &str, path: &str) -> Result<local::Answer, Failure> {
    ask_with(home, method, path, None)
}

/// [`ask`] with a JSON body.
pub fn ask_with(
    home: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<local::Answer, Failure> {
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    ask_bytes(home, method, path, "application/json", bytes.into_bytes())
}

/// [`ask_with`] with a body of any media type.
pub fn ask_bytes(
    home: &Path,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<local::Answer, Failure> {
    if local::running(home).is_none() {
        return Err(Failure::Input(
            "the platform daemon is not running here; `commons serve` (or `commons daemon start`) starts it".into(),
        ));
    }
    let answer = crate::runtime()
        .block_on(local::request_bytes(home, method, path, content_type, body))
        .map_err(Failure::Failed)?;
    match answer.status {
        200..=299 => Ok(answer),
        400..=499 => Err(Failure::Input(answer.detail())),
        _ => Err(Failure::Failed(answer.detail())),
    }
}
