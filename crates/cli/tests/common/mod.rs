//! Helpers for driving the real `commons` binary in a scratch directory.

#![allow(dead_code)]

pub mod browser;
pub mod stripe;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A scratch directory with a blueprint and its own `COMMONS_HOME`.
pub struct Sandbox {
    pub dir: PathBuf,
    pub home: PathBuf,
    /// Where its platform serves the data API: every command is told, so
    /// sites deployed without the daemon learn it too.
    pub data_port: u16,
    /// Its place in the scale-out configuration, when the suite runs on it.
    pub scale_out: Option<ScaleOut>,
}

/// The scale-out configuration the whole suite runs on a second time
/// (`COMMONS_TEST_SCALE_OUT=1`, set by `scripts/test`): each sandbox's
/// platform keeps its state, accounts, ledger and DataCommons in schemas of
/// its own on the suite's PostgreSQL (`COMMONS_TEST_POSTGRES`) and relays
/// its changes to the suite's NATS server (`COMMONS_TEST_NATS`) under a name
/// of its own, as platforms sharing those servers would.
pub struct ScaleOut {
    pub database_url: String,
    /// Also the platform's name on the bus.
    pub schema: String,
    pub nats_url: String,
}

impl ScaleOut {
    /// The configuration for the sandbox `test`, when the suite runs on it.
    fn for_test(test: &str) -> Option<ScaleOut> {
        if std::env::var("COMMONS_TEST_SCALE_OUT").ok().as_deref() != Some("1") {
            return None;
        }
        let need = |var: &str| {
            std::env::var(var).unwrap_or_else(|_| {
                panic!("COMMONS_TEST_SCALE_OUT=1 needs {var}: run the suite with scripts/test")
            })
        };
        let name: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(20)
            .collect();
        Some(ScaleOut {
            database_url: need("COMMONS_TEST_POSTGRES"),
            schema: format!("t_{name}_{}", std::process::id()),
            nats_url: need("COMMONS_TEST_NATS"),
        })
    }

    fn remove(&self) {
        drop_platform_schemas(&self.database_url, &self.schema);
    }
}

/// Drops a platform's schemas on PostgreSQL: its state's (with the ledger
/// and billing), its meter's and DataCommons'.
pub fn drop_platform_schemas(url: &str, schema: &str) {
    if let Ok(mut db) = postgres::Client::connect(url, postgres::NoTls) {
        for s in [
            schema.to_string(),
            format!("{schema}_meter"),
            format!("{schema}_data"),
        ] {
            let _ = db.batch_execute(&format!("DROP SCHEMA IF EXISTS {s} CASCADE"));
        }
    }
}

impl Sandbox {
    pub fn new(test: &str) -> Sandbox {
        let dir = std::env::temp_dir().join(format!("commons-test-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("app")).unwrap();
        let home = dir.join("home");
        let scale_out = ScaleOut::for_test(test);
        if let Some(s) = &scale_out {
            // Left by an earlier run that was killed.
            s.remove();
        }
        Sandbox {
            dir,
            home,
            data_port: lasting_port(),
            scale_out,
        }
    }

    /// The blueprint directory.
    pub fn app(&self) -> PathBuf {
        self.dir.join("app")
    }

    pub fn write(&self, rel: &str, content: &str) -> PathBuf {
        let p = self.app().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        p
    }

    pub fn blueprint(&self, yaml: &str) -> PathBuf {
        self.write("commons.yaml", yaml)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_commons"));
        c.args(args)
            .current_dir(self.app())
            .env("COMMONS_HOME", &self.home)
            // Tests start `commons serve` themselves, on ports of their own.
            .env("COMMONS_DAEMON", "off")
            // Unsandboxed unless a test asks (the default as root is the
            // sandbox; the tests of it say so explicitly).
            .env("COMMONS_SANDBOX", "0")
            // The data API on a port of its own, too.
            .env(
                "COMMONS_DATA_LISTEN",
                format!("127.0.0.1:{}", self.data_port),
            )
            .env_remove("CI");
        if let Some(s) = &self.scale_out {
            c.env("COMMONS_DATABASE_URL", &s.database_url)
                .env("COMMONS_DATABASE_SCHEMA", &s.schema)
                .env("COMMONS_NATS_URL", &s.nats_url)
                .env("COMMONS_BUS_NAME", &s.schema);
        }
        c
    }

    /// Runs `commons ARGS` and returns its output.
    pub fn run(&self, args: &[&str]) -> Run {
        let out = self.cmd(args).output().expect("commons runs");
        Run(out)
    }

    /// Runs `commons ARGS`, asserting exit code 0.
    pub fn ok(&self, args: &[&str]) -> Run {
        let r = self.run(args);
        assert_eq!(r.code(), 0, "commons {args:?} failed:\n{}", r.all());
        r
    }

    pub fn status_json(&self, name: &str) -> serde_json::Value {
        self.ok(&["status", name, "--json"]).json()
    }

    /// Everything the platform stored about its state, accounts and
    /// tokens, as text to search: `state.db` and its WAL, or a dump of its
    /// schema in the scale-out configuration.
    pub fn stored_state(&self) -> String {
        match &self.scale_out {
            None => {
                let mut bytes = std::fs::read(self.home.join("state.db")).unwrap();
                bytes.extend(std::fs::read(self.home.join("state.db-wal")).unwrap_or_default());
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Some(s) => {
                let out = Command::new("pg_dump")
                    .args(["--schema", &s.schema, "--no-owner", &s.database_url])
                    .output()
                    .expect("pg_dump runs");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
        }
    }

    /// The platform's token records, as text: `tokens.json`, or its shared
    /// entries in the scale-out configuration.
    pub fn stored_tokens(&self) -> String {
        match &self.scale_out {
            None => std::fs::read_to_string(self.home.join("tokens.json")).unwrap(),
            Some(s) => {
                let mut db = postgres::Client::connect(&s.database_url, postgres::NoTls).unwrap();
                db.query(
                    &format!(
                        "SELECT convert_from(body, 'UTF8') FROM {}.shared WHERE kind = 'platform-token'",
                        s.schema
                    ),
                    &[],
                )
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
            }
        }
    }

    /// Whether this machine keeps a platform's state (the CLI acted
    /// locally): its `state.db`, or its tables in the scale-out schema.
    pub fn has_local_state(&self) -> bool {
        match &self.scale_out {
            None => self.home.join("state.db").exists(),
            Some(s) => {
                let mut db = postgres::Client::connect(&s.database_url, postgres::NoTls).unwrap();
                let n: i64 = db
                    .query_one(
                        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = $1",
                        &[&s.schema],
                    )
                    .unwrap()
                    .get(0);
                n > 0
            }
        }
    }

    /// The platform's ledger journal, wherever it keeps it.
    pub fn journal(&self) -> commons_ledger::journal::Journal {
        use commons_ledger::journal::Journal;
        match &self.scale_out {
            None => {
                std::fs::create_dir_all(self.home.join("ledger")).unwrap();
                Journal::open(&self.home.join("ledger/ledger.db")).unwrap()
            }
            Some(s) => Journal::with_store(Box::new(
                commons_ledger::store::PgStore::connect(&s.database_url, &s.schema).unwrap(),
            ))
            .unwrap(),
        }
    }

    /// The platform's name on the event bus.
    pub fn bus_name(&self) -> &str {
        self.scale_out
            .as_ref()
            .map(|s| s.schema.as_str())
            .unwrap_or(commons_bus::DEFAULT_NAME)
    }

    /// Gives `other` this platform's keys, as an operator does for every
    /// instance sharing one database: the platform's key (`secrets/key`,
    /// made here first if this instance has not run yet: site sessions,
    /// service tokens and what is sealed in the shared store come from it)
    /// and, once this instance made it, the DataCommons key its accounts are
    /// sealed with. An instance with keys of its own is refused.
    pub fn share_keys(&self, other: &Sandbox) {
        use std::os::unix::fs::PermissionsExt;
        let copy = |from: &std::path::Path, to: &std::path::Path| {
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::set_permissions(to.parent().unwrap(), std::fs::Permissions::from_mode(0o700))
                .unwrap();
            std::fs::write(to, std::fs::read(from).unwrap()).unwrap();
            std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        let key = self.home.join("secrets/key");
        if !key.exists() {
            let mut bytes = [0u8; 32];
            use std::io::Read;
            std::fs::File::open("/dev/urandom")
                .unwrap()
                .read_exact(&mut bytes)
                .unwrap();
            let made = self.home.join("secrets/key.made");
            std::fs::create_dir_all(key.parent().unwrap()).unwrap();
            std::fs::write(&made, bytes).unwrap();
            copy(&made, &key);
            std::fs::remove_file(made).unwrap();
        }
        copy(&key, &other.home.join("secrets/key"));
        let data = self.home.join("datacommons/platform.key");
        if data.exists() {
            copy(&data, &other.home.join("datacommons/platform.key"));
        }
    }

    /// The status entry of one component.
    pub fn component(&self, name: &str, component: &str) -> serde_json::Value {
        let s = self.status_json(name);
        s["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == component)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Stop whatever a test left running, then remove its files. (The
        // working directory may be gone if the test removed the sources.)
        let _ = std::fs::create_dir_all(self.app());
        if let Ok(out) = self.cmd(&["list", "--json"]).output() {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                for d in v.as_array().into_iter().flatten() {
                    if let Some(name) = d["name"].as_str() {
                        let _ = self.cmd(&["destroy", name]).output();
                        // A destroy without the environment the test
                        // deployed with (a database server's URL) fails
                        // before it takes the site's network down: taken
                        // here, so no namespace outlives its test.
                        commons_runtime::net::remove_site(&self.home, name);
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(s) = &self.scale_out {
            s.remove();
        }
    }
}

pub struct Run(pub Output);

impl Run {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    pub fn all(&self) -> String {
        format!("stdout:\n{}\nstderr:\n{}", self.stdout(), self.stderr())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.0.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.all()))
    }
}

/// A GET on 127.0.0.1:port; returns (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http(port, "GET", path, &[], b"")
}

/// The body of a chunked response.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// Waits until `f` holds, up to `limit`.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

pub fn pid_alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().starts_with('Z'))
                    .unwrap_or(true)
            })
            .unwrap_or(false)
}

/// Lines of a file (empty if missing).
pub fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// One HTTP/1.1 request to 127.0.0.1:port; returns (status, body).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    http_with_head(port, method, path, headers, body).map(|(code, _, body)| (code, body))
}

/// One HTTP/1.1 request to 127.0.0.1:port; returns (status, head, body).
pub fn http_with_head(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String, String)> {
    http_at(
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        method,
        path,
        headers,
        body,
    )
}

/// Where the host reaches a process component (`status --json`): its
/// site's own address when sandboxed, else 127.0.0.1.
pub fn component_addr(component: &serde_json::Value) -> std::net::SocketAddr {
    let ip: std::net::Ipv4Addr = component["address"]
        .as_str()
        .unwrap_or("127.0.0.1")
        .parse()
        .unwrap();
    let port = component["port"]
        .as_u64()
        .unwrap_or_else(|| panic!("no port: {component}")) as u16;
    std::net::SocketAddr::from((ip, port))
}

/// A GET straight at a process component, wherever it listens.
pub fn component_get(component: &serde_json::Value, path: &str) -> std::io::Result<(u16, String)> {
    http_at(component_addr(component), "GET", path, &[], b"").map(|(c, _, b)| (c, b))
}

/// One HTTP/1.1 request to `addr`; returns (status, head, body).
pub fn http_at(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str("Host: 127.0.0.1\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, head.to_string(), body))
}

/// A running `commons serve` on free loopback ports; stopped on drop.
pub struct Server {
    pub child: std::process::Child,
    /// The API's port.
    pub port: u16,
    /// The gateway's plain-HTTP, HTTPS and admin ports.
    pub http: u16,
    pub https: u16,
    pub admin: u16,
    /// The node agents' listener, when `COMMONS_AGENT_LISTEN` was given.
    pub agents: Option<u16>,
    /// The data API's own listener (apps').
    pub data: u16,
}

impl Sandbox {
    pub fn serve(&self, env: &[(&str, &str)]) -> Server {
        use std::io::BufRead;
        let mut cmd = self.cmd(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--https",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ]);
        // Sites from the API run unsandboxed in tests that do not ask for
        // the sandbox: the platform is the test's alone.
        cmd.env("COMMONS_SINGLE_USER", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let mut reader = std::io::BufReader::new(stderr);
        // "Listening http://127.0.0.1:P (data in ...)", "Listening data
        // 127.0.0.1:P (apps' data API)", then one line per gateway listener:
        // "Listening http 127.0.0.1:P (gateway)".
        let mut ports = std::collections::HashMap::new();
        let mut said = String::new();
        let expected = if env.iter().any(|(k, _)| *k == "COMMONS_AGENT_LISTEN") {
            6
        } else {
            5
        };
        while ports.len() < expected {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                panic!("serve stopped before it said where it listens:\n{said}");
            }
            said.push_str(&line);
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() != Some(&"Listening") {
                continue;
            }
            let (what, addr) = match words.get(1) {
                Some(url) if url.starts_with("http://") => {
                    ("api", url.trim_start_matches("http://"))
                }
                // "Listening https://127.0.0.1:P (node agents)"
                Some(url) if url.starts_with("https://") => {
                    ("agents", url.trim_start_matches("https://"))
                }
                Some(what) => (*what, words.get(2).copied().unwrap_or("")),
                None => continue,
            };
            let port: u16 = addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap();
            ports.insert(what.to_string(), port);
        }
        // Keep draining what it says, so it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        // The CLI finds it by its daemon file and socket, written just
        // after the listeners say where they are.
        assert!(
            wait_for(Duration::from_secs(10), || self
                .home
                .join("daemon.json")
                .exists()
                && std::os::unix::net::UnixStream::connect(
                    self.home.join("api.sock")
                )
                .is_ok()),
            "serve never announced itself in {}",
            self.home.display()
        );
        Server {
            child,
            port: ports["api"],
            http: ports["http"],
            https: ports["https"],
            admin: ports["admin"],
            agents: ports.get("agents").copied(),
            data: ports["data"],
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `nats-server -js` of a test's own, on loopback; stopped when dropped.
pub struct Nats {
    child: std::process::Child,
    pub url: String,
}

impl Nats {
    /// Starts one keeping its streams in `dir`.
    pub fn start(dir: &Path) -> Nats {
        let port = free_port();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("nats-server is needed for this test (`bash scripts/test` installs it): {e}")
            });
        assert!(
            wait_for(Duration::from_secs(10), || TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "nats-server listens"
        );
        Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The task row of `component` in a deploy's `--json` outcome.
pub fn task(outcome: &serde_json::Value, component: &str) -> serde_json::Value {
    outcome["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["component"] == component)
        .cloned()
        .unwrap_or_else(|| panic!("no task for {component} in {outcome}"))
}

/// The real uid of a process.
pub fn uid_of(pid: i64) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|u| u.parse().ok())
        .unwrap()
}

/// Whether the tests run as root (sandboxing needs it).
pub fn is_root() -> bool {
    uid_of(std::process::id() as i64) == 0
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free loopback port for a listener a test names long before it starts
/// (a sandbox's data API, fixed for all its commands): taken below the
/// kernel's ephemeral range, so no outgoing connection or `free_port` of
/// another test is given it meanwhile, from a place that differs per
/// process and call.
pub fn lasting_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_low.max(10_001));
    let span = high - low;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let seed = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(nanos)
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(7919));
    (0..span)
        .map(|i| (low + (seed.wrapping_add(i * 31)) % span) as u16)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// Runs `c`, failing the test with what it printed unless it succeeds.
/// Destroys `name` on the platform `env` selects (a database of the test's
/// own), as a test that chose one must: the sandbox's clean-up looks only
/// at the sandbox's own configuration, and the site's processes outlive
/// the platform's.
pub fn destroy_on(s: &Sandbox, env: &[(&str, &str)], name: &str) {
    let mut c = s.cmd(&["destroy", name]);
    for (k, v) in env {
        c.env(k, v);
    }
    run_ok(&mut c);
}

pub fn run_ok(c: &mut std::process::Command) -> std::process::Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed:\n{}\n{}",
        c,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A Python virtual environment at `dir` with `packages` from PyPI; returns
/// its interpreter.
pub fn python_venv(dir: &Path, packages: &[&str]) -> PathBuf {
    run_ok(Command::new("python3").args(["-m", "venv"]).arg(dir));
    run_ok(
        Command::new(dir.join("bin/pip"))
            .args(["install", "-q"])
            .args(packages),
    );
    dir.join("bin/python")
}

// --- accounts and the API -----------------------------------------------

use serde_json::{json, Value};

/// A client of one server, with or without credentials.
pub struct Api {
    pub port: u16,
    pub headers: Vec<(String, String)>,
}

impl Api {
    pub fn anonymous(port: u16) -> Api {
        Api {
            port,
            headers: vec![("Content-Type".into(), "application/json".into())],
        }
    }

    pub fn token(port: u16, token: &str) -> Api {
        let mut a = Api::anonymous(port);
        a.headers
            .push(("Authorization".into(), format!("Bearer {token}")));
        a
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (code, _, body) = self.raw(method, path, body);
        let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
        (code, v)
    }

    pub fn raw(&self, method: &str, path: &str, body: Option<Value>) -> (u16, String, String) {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        http_with_head(self.port, method, path, &headers, body.as_bytes()).unwrap()
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None)
    }

    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(body))
    }
}

pub fn signup(port: u16, email: &str, name: &str) -> Value {
    let (code, v) = Api::anonymous(port).post(
        "/api/signup",
        json!({ "email": email, "name": name, "password": "a long enough password" }),
    );
    assert_eq!(code, 201, "{v}");
    v
}

/// Logs in; returns a client carrying the session cookie (and, when
/// `with_csrf`, the CSRF header).
pub fn login(port: u16, email: &str, with_csrf: bool) -> Api {
    let (code, head, body) = Api::anonymous(port).raw(
        "POST",
        "/api/login",
        Some(json!({ "email": email, "password": "a long enough password" })),
    );
    assert_eq!(code, 200, "{body}");
    let cookie_line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a session cookie is set");
    assert!(cookie_line.contains("HttpOnly"), "{cookie_line}");
    assert!(cookie_line.contains("SameSite=Lax"), "{cookie_line}");
    let cookie = cookie_line
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let csrf = serde_json::from_str::<Value>(&body).unwrap()["csrf"]
        .as_str()
        .unwrap()
        .to_string();
    let mut a = Api::anonymous(port);
    a.headers.push(("Cookie".into(), cookie));
    if with_csrf {
        a.headers.push(("X-CSRF-Token".into(), csrf));
    }
    a
}

pub fn make_token(api: &Api, scopes: &[&str], org: Option<&str>) -> String {
    let (code, v) = api.post(
        "/api/tokens",
        json!({ "name": "test", "scopes": scopes, "org": org }),
    );
    assert_eq!(code, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}

/// The value of the `Location` header, and every `Set-Cookie`.
pub fn location_and_cookies(head: &str) -> (String, Vec<String>) {
    let mut location = String::new();
    let mut cookies = Vec::new();
    for line in head.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        match k.to_ascii_lowercase().as_str() {
            "location" => location = v.trim().to_string(),
            "set-cookie" => cookies.push(v.trim().to_string()),
            _ => {}
        }
    }
    (location, cookies)
}

/// `http://host:port/path?query` → ("/path?query").
pub fn path_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.find('/').map_or("/".into(), |i| rest[i..].to_string())
}

/// A site that shows what reaches it, as JSON: the path, every header, and
/// (for convenience) the identity assertion and cookies; on
/// `/members/grab` it tries to set the platform's session cookie.
pub const ECHO_APP: &str = r#"import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({
            "path": self.path,
            "headers": dict(self.headers),
            "identity": self.headers.get("X-Commons-Identity"),
            "cookie": self.headers.get("Cookie"),
        }).encode()
        self.send_response(200)
        if self.path == "/members/grab":
            self.send_header("Set-Cookie", "commons_session=chosen-by-the-app; Path=/")
        self.send_header("Set-Cookie", "theme=dark; Path=/")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// The worked example's ledger: site S (operator O, provider P) depends on
/// project A, A on B; the reserve bootstrapped at 1 cent per token.
pub fn worked_example_ledger(s: &Sandbox) {
    ledger_with(
        s,
        r#"{ "sites": { "S": { "operator": "O", "providers": [["P", 1]], "projects": [["A", 1]] } },
             "projects": { "A": { "depends_on": [["B", 1]] } } }"#,
    );
}

/// A ledger with `config` (its `ledger/config.json`), the reserve
/// bootstrapped at 1 cent per token.
pub fn ledger_with(s: &Sandbox, config: &str) {
    std::fs::create_dir_all(s.home.join("ledger")).unwrap();
    std::fs::write(s.home.join("ledger/config.json"), config).unwrap();
    s.ok(&[
        "ledger",
        "bootstrap",
        "--cash",
        "100000",
        "--tokens",
        "100000",
    ]);
}

/// `wrk` against the gateway for a fixed time. (Stopped early with a
/// signal, wrk counts the interrupted reads as errors: it must run out.)
pub struct Load {
    child: std::process::Child,
}

impl Load {
    pub fn start(port: u16, host: &str, seconds: u64) -> Load {
        Load::start_with(port, host, seconds, &[])
    }

    /// [`Load::start`] with more of wrk's arguments (`-s SCRIPT`).
    pub fn start_with(port: u16, host: &str, seconds: u64, extra: &[&str]) -> Load {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("wrk").exists()));
        assert!(
            found,
            "wrk is not installed: this test puts real load on the gateway \
             (apt-get install wrk; scripts/test installs it)"
        );
        let child = std::process::Command::new("wrk")
            .args(["-t1", "-c8", &format!("-d{seconds}s"), "--timeout", "10s"])
            .args(["-H", &format!("Host: {host}")])
            .args(extra)
            .arg(format!("http://127.0.0.1:{port}/"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        Load { child }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the run to end; returns (requests, failures, summary).
    pub fn finish(self) -> (u64, u64, String) {
        let out = self.child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let requests = text
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        // "Socket errors: connect 0, read 0, write 0, timeout 0"
        let socket: u64 = text
            .lines()
            .find(|l| l.trim().starts_with("Socket errors:"))
            .map(|l| {
                l.split(',')
                    .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        let non_2xx: u64 = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        (requests, socket + non_2xx, text)
    }
}

/// A site whose page says its version (`shop vN`, from the input
/// `version`): redeploys under load show which version answered.
pub const VERSIONED_SHOP: &str = r#"name: shop
inputs:
  version: { type: string, default: "1" }
components:
  page:
    # Written aside and renamed: the running version never serves half a file.
    job: "printf 'shop v%s' \"${inputs.version}\" > $COMMONS_DATA_DIR/new.html && mv $COMMONS_DATA_DIR/new.html $COMMONS_DATA_DIR/index.html"
  web:
    process: "python3 -m http.server --bind 127.0.0.1 --directory $COMMONS_DATA_DIR $PORT"
    after: [page]
    env: { VERSION: "${inputs.version}" }
    health: { http: "/", interval: 50ms }
"#;
