//! `commons serve` supervises: a killed process comes back (with backoff),
//! and processes come back when the platform itself restarts.

mod common;

use std::time::Duration;

use common::*;

fn kill9(pid: i64) {
    std::process::Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status()
        .unwrap();
}

#[test]
fn killed_processes_come_back() {
    let s = Sandbox::new("supervise");
    s.blueprint(
        r#"name: kept
components:
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    health: { http: "/" }
"#,
    );
    s.ok(&["deploy"]);
    let web = s.component("kept", "web");
    let (pid, port) = (
        web["pid"].as_i64().unwrap(),
        web["port"].as_u64().unwrap() as u16,
    );

    let server = s.serve(&[("COMMONS_SAMPLE_SECONDS", "1")]);
    kill9(pid);
    assert!(
        wait_for(Duration::from_secs(20), || {
            let w = s.component("kept", "web");
            w["state"] == "running" && w["pid"].as_i64() != Some(pid)
        }),
        "the process was not restarted: {}",
        s.component("kept", "web")
    );
    let web = s.component("kept", "web");
    assert_eq!(web["restarts"], 1);
    assert_eq!(
        web["port"].as_u64().unwrap() as u16,
        port,
        "it comes back on its port"
    );
    assert_eq!(http_get(port, "/").unwrap().0, 200);

    // Its CPU, memory (now and peak) and storage are sampled and metered.
    let metered = |metric: &str| {
        let m = s.run(&[
            "usage",
            "show",
            "site",
            "kept",
            "--metric",
            metric,
            "--aggregation",
            "max",
            "--json",
        ]);
        (m.code() == 0)
            .then(|| m.json())
            .and_then(|v| {
                v.as_array().and_then(|rows| {
                    rows.iter()
                        .filter_map(|r| r["value"].as_f64())
                        .reduce(f64::max)
                })
            })
            .unwrap_or(0.0)
    };
    assert!(
        wait_for(Duration::from_secs(10), || metered("memory_bytes") > 1e6),
        "no resource usage metered"
    );
    assert!(metered("memory_peak_bytes") >= metered("memory_bytes"));
    assert!(metered("storage_bytes") > 0.0);

    // The platform restarts (and the process died while it was down).
    drop(server);
    kill9(web["pid"].as_i64().unwrap());
    assert!(wait_for(Duration::from_secs(5), || s
        .component("kept", "web")["state"]
        == "stopped"));
    let _server = s.serve(&[]);
    assert!(
        wait_for(Duration::from_secs(20), || s.component("kept", "web")
            ["state"]
            == "running"),
        "not restored after the platform restarted"
    );
    assert_eq!(http_get(port, "/").unwrap().0, 200);
    // Restarts are not deploys: the record has only the deploy.
    assert_eq!(
        s.ok(&["history", "kept", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn quiet_sites_go_idle_and_wake_on_demand() {
    let s = Sandbox::new("idle");
    s.blueprint(
        r#"name: sleepy
components:
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    health: { http: "/" }
"#,
    );
    s.ok(&["deploy"]);
    let port = s.component("sleepy", "web")["port"].as_u64().unwrap() as u16;
    // A site on always-on hosting is never idled.
    s.write(
        "steady/commons.yaml",
        r#"name: steady
components:
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    health: { http: "/" }
"#,
    );
    s.ok(&["deploy", "steady", "--hosting", "always-on"]);
    assert_eq!(s.status_json("steady")["hosting"], "always-on");
    assert_eq!(s.status_json("sleepy")["hosting"], "free");
    let token = s
        .ok(&["token", "create", "gateway", "--scope", "runtime:wake"])
        .stdout()
        .trim()
        .to_string();
    let server = s.serve(&[("COMMONS_IDLE_AFTER", "2")]);
    assert!(
        wait_for(Duration::from_secs(15), || s.component("sleepy", "web")
            ["state"]
            == "idle"),
        "no traffic, yet not idle: {}",
        s.component("sleepy", "web")
    );
    assert!(
        http_get(port, "/").is_err(),
        "an idle site's process is stopped"
    );
    assert_eq!(s.component("steady", "web")["state"], "running");
    // The supervisor leaves idle processes alone.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(s.component("sleepy", "web")["state"], "idle");
    // Woken: healthy when the command returns, on the same port.
    s.ok(&["wake", "sleepy"]);
    let web = s.component("sleepy", "web");
    assert_eq!(web["state"], "running");
    assert_eq!(web["restarts"], 0, "a wake is not a crash");
    assert_eq!(http_get(port, "/").unwrap().0, 200);

    // Quiet again, then woken the way the gateway will: through the API.
    assert!(wait_for(Duration::from_secs(15), || s
        .component("sleepy", "web")["state"]
        == "idle"));
    let auth = format!("Bearer {token}");
    let (code, body) = http(
        server.port,
        "POST",
        "/api/deployments/sleepy/wake",
        &[("Authorization", &auth)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        http_get(port, "/").unwrap().0,
        200,
        "healthy when the API answers"
    );
    let (code, _) = http(
        server.port,
        "POST",
        "/api/deployments/nosuch/wake",
        &[("Authorization", &auth)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 404);
}

/// The process the keeper (the pid `status` shows) runs.
fn workload_of(keeper: i64) -> i64 {
    let children = std::fs::read_to_string(format!("/proc/{keeper}/task/{keeper}/children"))
        .unwrap_or_default();
    children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("keeper {keeper} has no child"))
}

fn signal(pid: i64, sig: &str) {
    std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
}

#[test]
fn status_says_how_a_process_ended() {
    let s = Sandbox::new("endings");
    s.blueprint(
        r#"name: ends
components:
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    health: { http: "/" }
"#,
    );
    s.ok(&["deploy"]);
    let web = s.component("ends", "web");
    assert_eq!(web["state"], "running");
    assert!(web.get("last_exit").is_none(), "{web}");

    // The program itself crashes.
    signal(workload_of(web["pid"].as_i64().unwrap()), "-SEGV");
    assert!(
        wait_for(Duration::from_secs(5), || s.component("ends", "web")
            ["state"]
            == "crashed"),
        "{}",
        s.component("ends", "web")
    );
    let web = s.component("ends", "web");
    assert_eq!(web["last_exit"]["signal"], 11, "{web}");
    assert_eq!(web["last_exit"]["reason"], "killed by SIGSEGV");
    assert_eq!(web["last_exit"]["oom"], false);
    let status = s.ok(&["status", "ends"]);
    let text = status.stdout();
    assert!(text.contains("crashed"), "{text}");
    assert!(text.contains("last exit: killed by SIGSEGV"), "{text}");
    // Nothing supervises it here, and status says so.
    assert!(
        status.stderr().contains("no platform daemon runs"),
        "{}",
        status.all()
    );

    // Started again, then stopped on request: not a crash.
    s.ok(&["deploy"]);
    let pid = s.component("ends", "web")["pid"].as_i64().unwrap();
    signal(pid, "-TERM");
    assert!(wait_for(Duration::from_secs(10), || !pid_alive(pid)));
    let web = s.component("ends", "web");
    assert_eq!(web["state"], "stopped", "{web}");
    assert_eq!(
        web["last_exit"]["reason"],
        "stopped on request (killed by SIGTERM)"
    );
}

#[test]
fn a_crash_loop_shows_in_status() {
    let s = Sandbox::new("crash-loop");
    s.blueprint(
        r#"name: flaky
components:
  web:
    process: "python3 -c 'import time; time.sleep(0.4); raise SystemExit(3)'"
"#,
    );
    s.ok(&["deploy"]);
    let _server = s.serve(&[]);
    assert!(
        wait_for(Duration::from_secs(20), || {
            let w = s.component("flaky", "web");
            w["state"] == "crashed"
                && w["crash_loop"]["restarts_in_a_row"].as_u64().unwrap_or(0) >= 2
        }),
        "{}",
        s.component("flaky", "web")
    );
    let web = s.component("flaky", "web");
    assert_eq!(web["last_exit"]["code"], 3, "{web}");
    assert_eq!(web["last_exit"]["reason"], "exited with status 3");
    assert!(web["restarts"].as_u64().unwrap() >= 2, "{web}");
    let text = s.ok(&["status", "flaky"]).stdout();
    assert!(text.contains("crash loop: restarted"), "{text}");
}

/// Stops the daemon a test started, even when the test fails.
struct StopDaemon<'a>(&'a Sandbox);

impl Drop for StopDaemon<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["daemon", "stop"]);
    }
}

#[test]
fn the_cli_starts_the_daemon_and_talks_to_it() {
    let s = Sandbox::new("daemon");
    s.blueprint(
        r#"name: looked-after
components:
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    health: { http: "/" }
"#,
    );
    let with_daemon = |args: &[&str]| {
        let mut c = s.cmd(args);
        c.env_remove("COMMONS_DAEMON");
        for var in [
            "COMMONS_LISTEN",
            "COMMONS_GATEWAY_HTTP",
            "COMMONS_GATEWAY_HTTPS",
            "COMMONS_GATEWAY_ADMIN",
        ] {
            c.env(var, "127.0.0.1:0");
        }
        Run(c.output().unwrap())
    };
    assert_eq!(
        s.ok(&["daemon", "status", "--json"]).json()["running"],
        false
    );

    // A deploy that leaves a process starts the daemon, once.
    let first = with_daemon(&["deploy"]);
    assert_eq!(first.code(), 0, "{}", first.all());
    let _stop = StopDaemon(&s);
    assert!(
        first.stderr().contains("Started the platform daemon"),
        "{}",
        first.all()
    );
    // Its first start made the administrator, whose token is in a private file.
    assert!(
        first.stderr().contains("administrator's API token is in"),
        "{}",
        first.all()
    );
    assert!(s.home.join("secrets/admin.token").exists());
    let status = s.ok(&["daemon", "status", "--json"]).json();
    assert_eq!(status["running"], true, "{status}");
    assert_eq!(status["processes_running"], 1, "{status}");
    let daemon_pid = status["daemon"]["pid"].as_i64().unwrap();
    let again = with_daemon(&["deploy"]);
    assert!(!again.stderr().contains("Started"), "{}", again.all());

    // Only the platform's user can reach its socket; over TCP the daemon's
    // own endpoint is refused.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.home.join("api.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let api = status["daemon"]["api"].as_str().unwrap();
    let api_port: u16 = api.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(http_get(api_port, "/api/daemon").unwrap().0, 403);
    assert_eq!(
        http_get(api_port, "/api/deployments/looked-after")
            .unwrap()
            .0,
        401
    );

    // It supervises: a killed process comes back without a `serve` by hand.
    let pid = s.component("looked-after", "web")["pid"].as_i64().unwrap();
    kill9(pid);
    assert!(
        wait_for(Duration::from_secs(20), || {
            let w = s.component("looked-after", "web");
            w["state"] == "running" && w["pid"].as_i64() != Some(pid)
        }),
        "{}",
        s.component("looked-after", "web")
    );

    // `wake` goes through it.
    let woke = s.run(&["wake", "looked-after"]);
    assert_eq!(woke.code(), 0, "{}", woke.all());
    assert!(
        woke.stderr().contains("through the platform daemon"),
        "{}",
        woke.all()
    );
    let missing = s.run(&["wake", "nothing-here"]);
    assert_eq!(missing.code(), 2, "{}", missing.all());

    // Stopped, it is gone; the workload runs on.
    s.ok(&["daemon", "stop"]);
    assert!(!pid_alive(daemon_pid));
    assert_eq!(
        s.ok(&["daemon", "status", "--json"]).json()["running"],
        false
    );
    let web = s.component("looked-after", "web");
    assert_eq!(web["state"], "running", "{web}");
}
