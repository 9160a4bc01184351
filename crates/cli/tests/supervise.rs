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

    // Its CPU, memory and storage are sampled and metered.
    assert!(
        wait_for(Duration::from_secs(10), || {
            let m = s.run(&[
                "usage",
                "show",
                "site",
                "kept",
                "--metric",
                "memory_bytes",
                "--aggregation",
                "max",
                "--json",
            ]);
            m.code() == 0
                && m.json().as_array().is_some_and(|rows| {
                    rows.iter()
                        .any(|r| r["value"].as_f64().unwrap_or(0.0) > 1e6)
                })
        }),
        "no resource usage metered"
    );

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
