//! The platform daemon of a data directory, as the CLI finds, starts and
//! talks to it.
//!
//! `commons serve` writes `daemon.json` (its pid and addresses) and serves
//! the API on the Unix socket `api.sock` besides its TCP address. The socket
//! is mode 0600 in the 0700 data directory, so only the platform's own user
//! can connect, and the kernel checks that; a request over it acts as the
//! platform's administrator ([`LocalCaller`]). Over TCP every call needs a
//! scoped token.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::{Deserialize, Serialize};

/// Marks a request that came over the local socket.
#[derive(Debug, Clone, Copy)]
pub struct LocalCaller;

/// What a running daemon says about itself in `daemon.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    pub version: String,
    /// The API's TCP address.
    pub api: String,
    /// The gateway's listeners: ("http" | "https" | "admin", address).
    pub gateway: Vec<(String, String)>,
    pub started_at: String,
}

pub fn socket_path(home: &Path) -> PathBuf {
    commons_runtime::Layout::new(home).api_socket()
}

pub fn info_path(home: &Path) -> PathBuf {
    commons_runtime::Layout::new(home).daemon_file()
}

/// The daemon serving `home`, if one answers on its socket.
pub fn running(home: &Path) -> Option<DaemonInfo> {
    let info: DaemonInfo = serde_json::from_slice(&std::fs::read(info_path(home)).ok()?).ok()?;
    std::os::unix::net::UnixStream::connect(socket_path(home)).ok()?;
    Some(info)
}

/// Records the daemon's addresses and binds its socket (only the platform's
/// user may connect). A socket left by a daemon that died is replaced; one
/// that answers means another daemon serves this directory.
pub fn announce(home: &Path, info: &DaemonInfo) -> Result<tokio::net::UnixListener, String> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(home);
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(format!(
            "another `commons serve` already serves {} (stop it with `commons daemon stop`)",
            home.display()
        ));
    }
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot protect {}: {e}", path.display()))?;
    let bytes = serde_json::to_vec_pretty(info).map_err(|e| e.to_string())?;
    commons_runtime::layout::write_whole(&info_path(home), &bytes)
        .map_err(|e| format!("cannot write {}: {e}", info_path(home).display()))?;
    Ok(listener)
}

/// Removes what [`announce`] wrote, when the daemon stops.
pub fn withdraw(home: &Path) {
    let _ = std::fs::remove_file(socket_path(home));
    let _ = std::fs::remove_file(info_path(home));
}

/// A response from the daemon.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Answer {
    /// The `detail` of a problem document, or the body as text.
    pub fn detail(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_string())
    }
}

/// Sends one request to the daemon over its socket.
pub async fn request(
    home: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<Answer, String> {
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    request_bytes(home, method, path, "application/json", bytes.into_bytes()).await
}

/// A request with a body of any media type (an archive, say).
pub async fn request_bytes(
    home: &Path,
    method: &str,
    path: &str,
    content_type: &str,
    bytes: Vec<u8>,
) -> Result<Answer, String> {
    let stream = tokio::net::UnixStream::connect(socket_path(home))
        .await
        .map_err(|e| format!("the platform daemon does not answer: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("talking to the platform daemon: {e}"))?;
    tokio::spawn(connection);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| e.to_string())?;
    let res = sender
        .send_request(req)
        .await
        .map_err(|e| format!("talking to the platform daemon: {e}"))?;
    let status = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the platform daemon's answer: {e}"))?
        .to_bytes()
        .to_vec();
    Ok(Answer { status, body })
}

/// Starts `commons serve` for `home` in the background (a session of its
/// own, output appended to `logs/serve.log`) and waits until it answers.
/// `binary` is the `commons` executable; `args` are extra `serve` options.
pub fn start(home: &Path, binary: &Path, args: &[String]) -> Result<DaemonInfo, String> {
    use std::os::unix::process::CommandExt;
    let layout = commons_runtime::Layout::new(home);
    let logs = layout.platform_logs();
    crate::private_dir(&logs).map_err(|e| format!("creating {}: {e}", logs.display()))?;
    let log_path = layout.serve_log();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
    let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = std::process::Command::new(binary);
    cmd.arg("--home")
        .arg(home)
        .arg("serve")
        .args(args)
        // Not the caller's directory: the daemon outlives it.
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start `commons serve`: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(info) = running(home).filter(|i| i.pid == child.id()) {
            return Ok(info);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(&log_path) {
                use std::io::Seek;
                let _ = f.seek(std::io::SeekFrom::Start(offset));
                let _ = f.read_to_string(&mut text);
            }
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(format!(
                "`commons serve` stopped at once ({status}): {}",
                last.trim()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "`commons serve` did not answer within 10 s; see {}",
                log_path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
