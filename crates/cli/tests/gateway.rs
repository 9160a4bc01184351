//! The gateway as `commons serve` runs it, in front of real sites: routing
//! from the deployments' state, usage into the meter, wake on request, and
//! redeploys under load that lose no request.

mod common;

use common::*;
use std::time::{Duration, Instant};

fn get(port: u16, host: &str, path: &str) -> (u16, String) {
    http(port, "GET", path, &[("Host", host)], b"").unwrap()
}

/// Requests the meter counted for `site` (sum of `events:request`).
fn metered(s: &Sandbox, site: &str) -> f64 {
    let v = s.ok(&["usage", "show", "site", site, "--json"]).json();
    v.as_array()
        .into_iter()
        .flatten()
        .map(|p| p["value"].as_f64().unwrap_or(0.0))
        .sum()
}

#[test]
fn deployed_sites_are_routed_and_every_request_is_metered() {
    let s = Sandbox::new("gw-route");
    s.blueprint(VERSIONED_SHOP);
    s.ok(&["deploy"]);
    let server = s.serve(&[]);
    // The deployment's own name, and the component's.
    let (code, body) = get(server.http, "shop.localhost", "/");
    assert_eq!((code, body.as_str()), (200, "shop v1"));
    let (code, body) = get(server.http, "web.shop.localhost:8080", "/");
    assert_eq!((code, body.as_str()), (200, "shop v1"));
    let (code, body) = get(server.http, "nothing.localhost", "/");
    assert_eq!(code, 404);
    assert!(
        body.contains("no site is served at nothing.localhost"),
        "{body}"
    );
    for _ in 0..7 {
        assert_eq!(get(server.http, "shop.localhost", "/").0, 200);
    }
    // Nine requests reached the site; the tap hands them to the meter.
    assert!(
        wait_for(Duration::from_secs(10), || metered(&s, "shop") >= 9.0),
        "metered {} requests, want 9",
        metered(&s, "shop")
    );
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(metered(&s, "shop"), 9.0);
    let log = lines(&s.home.join("logs/gateway-access.log"));
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("\"site\":\"shop\""))
            .count(),
        9
    );
    // Operators see it in the metrics.
    let (code, metrics) = http_get(server.admin, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("commons_gateway_site_requests_total{site=\"shop\"} 9"),
        "{metrics}"
    );
    // The HTTPS listener serves *.localhost with a self-signed certificate.
    assert!(std::net::TcpStream::connect(("127.0.0.1", server.https)).is_ok());
}

#[test]
fn a_request_wakes_an_idle_site() {
    let s = Sandbox::new("gw-wake");
    s.blueprint(VERSIONED_SHOP);
    s.ok(&["deploy"]);
    let server = s.serve(&[("COMMONS_IDLE_AFTER", "1")]);
    assert!(
        wait_for(Duration::from_secs(15), || s.component("shop", "web")
            ["state"]
            == "idle"),
        "not idle: {}",
        s.component("shop", "web")
    );
    let t = Instant::now();
    let (code, body) = get(server.http, "shop.localhost", "/");
    assert_eq!(
        (code, body.as_str()),
        (200, "shop v1"),
        "held until healthy"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(s.component("shop", "web")["state"], "running");
}

#[test]
fn twenty_redeploys_under_load_fail_no_request() {
    let s = Sandbox::new("gw-zero");
    s.blueprint(VERSIONED_SHOP);
    s.ok(&["deploy"]);
    let server = s.serve(&[]);
    assert_eq!(get(server.http, "shop.localhost", "/").0, 200);
    // One redeploy unloaded sizes the run: under load, on two cores shared
    // with the load, each takes several times as long.
    let t = Instant::now();
    s.ok(&["deploy", "-i", "version=2"]);
    let seconds = (t.elapsed().as_secs_f64() * 20.0 * 5.0).ceil() as u64 + 5;
    let mut load = Load::start(server.http, "shop.localhost", seconds);
    std::thread::sleep(Duration::from_millis(500));
    let mut ports = std::collections::HashSet::new();
    for v in 3..=22 {
        let input = format!("version={v}");
        s.ok(&["deploy", "-i", &input]);
        let web = s.component("shop", "web");
        assert_eq!(web["state"], "running");
        ports.insert(web["port"].as_u64().unwrap());
    }
    assert!(load.running(), "the load ended before the redeploys did");
    let (requests, failures, summary) = load.finish();
    assert!(
        requests > 200,
        "too little load to prove anything:\n{summary}"
    );
    let failed: Vec<String> = lines(&s.home.join("logs/gateway-access.log"))
        .into_iter()
        .filter(|l| !l.contains("\"status\":200"))
        .collect();
    assert_eq!(
        failures,
        0,
        "requests failed during redeploys:\n{summary}\n{}",
        failed.join("\n")
    );
    // Each version ran beside the last (a new port each time), and the old
    // ones were stopped once drained.
    assert_eq!(ports.len(), 20);
    let (code, body) = get(server.http, "shop.localhost", "/");
    assert_eq!((code, body.as_str()), (200, "shop v22"));
    let python_processes = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("cmdline")).is_ok_and(|c| {
                c.contains("http.server")
                    && c.contains(&s.home.display().to_string())
                    // Not their keepers, whose arguments name the same command.
                    && !c.contains("__sandbox")
            })
        })
        .count();
    assert_eq!(python_processes, 1, "replaced versions are stopped");
}

/// An app that says which version and instance answered, and notes when
/// each instance starts listening and when it is stopped.
const INSTANCE_APP: &str = r#"import os, signal, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, version = int(os.environ["PORT"]), os.environ["VERSION"]
log = os.path.join(os.environ["COMMONS_DATA_DIR"], "instances.log")
def note(what):
    with open(log, "a") as f:
        f.write("%.6f %s %s %d\n" % (time.time(), what, version, port))
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("v%s %d" % (version, port)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
def stop(*_):
    # Drains a moment: a second SIGTERM meanwhile would be noted too.
    note("stop")
    time.sleep(0.3)
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
server = ThreadingHTTPServer(("127.0.0.1", port), H)
note("start")
server.serve_forever()
"#;

const FLEET: &str = r#"name: fleet
inputs:
  version: { type: string, default: "1" }
components:
  web:
    process: python3 app.py
    env: { VERSION: "${inputs.version}" }
    health: { http: "/", interval: 50ms }
    replicas: 3
"#;

/// Which instance (by port) answered each of `n` requests, and the versions seen.
fn answers(port: u16, n: usize) -> (std::collections::HashSet<String>, Vec<String>) {
    let (mut ports, mut versions) = (std::collections::HashSet::new(), Vec::new());
    for _ in 0..n {
        let (code, body) = get(port, "fleet.localhost", "/");
        assert_eq!(code, 200, "{body}");
        let (version, at) = body.split_once(' ').unwrap();
        ports.insert(at.to_string());
        versions.push(version.to_string());
    }
    (ports, versions)
}

#[test]
fn three_replicas_share_the_load_and_roll_one_at_a_time_without_a_failed_request() {
    let s = Sandbox::new("gw-replicas");
    s.write("app.py", INSTANCE_APP);
    s.blueprint(FLEET);
    s.ok(&["deploy"]);
    let status = s.status_json("fleet");
    let names: Vec<&str> = status["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web", "web.2", "web.3"], "{status}");
    let server = s.serve(&[]);
    // The gateway spreads requests over the three.
    let (ports, versions) = answers(server.http, 30);
    assert_eq!(ports.len(), 3, "answered by {ports:?}");
    assert!(versions.iter().all(|v| v == "v1"));

    let mut load = Load::start(server.http, "fleet.localhost", 40);
    std::thread::sleep(Duration::from_millis(500));
    let rolled_at = commons_clock::now_ms() as f64 / 1000.0;
    for v in 2..=4 {
        let input = format!("version={v}");
        s.ok(&["deploy", "-i", &input]);
        for c in ["web", "web.2", "web.3"] {
            assert_eq!(s.component("fleet", c)["state"], "running");
        }
    }
    assert!(load.running(), "the load ended before the redeploys did");
    let (requests, failures, summary) = load.finish();
    assert!(
        requests > 300,
        "too little load to prove anything:\n{summary}"
    );
    let failed: Vec<String> = lines(&s.home.join("logs/gateway-access.log"))
        .into_iter()
        .filter(|l| l.contains("\"site\":\"fleet\"") && !l.contains("\"status\":200"))
        .collect();
    assert_eq!(
        failures,
        0,
        "requests failed during the rolling redeploys:\n{summary}\n{}",
        failed.join("\n")
    );
    let (ports, versions) = answers(server.http, 30);
    assert_eq!(ports.len(), 3, "answered by {ports:?}");
    assert!(versions.iter().all(|v| v == "v4"), "{versions:?}");

    // One instance at a time: from the first redeploy on, three instances
    // always listened, and never more than four.
    let log = lines(&s.home.join("deployments/fleet/data/instances.log"));
    // Each instance was asked to stop once (many apps take a second
    // SIGTERM as "quit now, skip the drain").
    let mut noted = std::collections::HashSet::new();
    let mut events: Vec<(f64, i32)> = log
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // An instance is its version and port: a port freed by a stop
            // may be given to a later version's instance.
            assert!(
                noted.insert((f[1], f[2], f[3])),
                "instance {} of version {} noted \"{}\" twice:\n{}",
                f[3],
                f[2],
                f[1],
                log.join("\n")
            );
            (f[0].parse().unwrap(), if f[1] == "start" { 1 } else { -1 })
        })
        .collect();
    events.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (mut live, mut most, mut least) = (0, 0, i32::MAX);
    for (at, change) in &events {
        live += change;
        if *at >= rolled_at {
            most = most.max(live);
            least = least.min(live);
        }
    }
    let starts = events.iter().filter(|e| e.1 == 1).count();
    assert_eq!(starts, 12, "3 instances of 4 versions:\n{}", log.join("\n"));
    assert_eq!(
        live,
        3,
        "the replaced instances stopped:\n{}\n{}",
        log.join("\n"),
        s.status_json("fleet")
    );
    assert!(
        (3..=4).contains(&least) && most == 4,
        "instances listening during the rollout went from {least} to {most}:\n{}",
        log.join("\n")
    );
}

#[test]
fn blueprints_set_login_paths_and_limits() {
    let s = Sandbox::new("gw-login");
    s.blueprint(
        r#"name: members
components:
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    health: { http: "/" }
    route: { host: members.localhost, login: [/admin], max_body: 1Ki, max_header: 2Ki }
"#,
    );
    s.ok(&["deploy"]);
    let token = s
        .ok(&["token", "create", "alice", "--scope", "session"])
        .stdout()
        .trim()
        .to_string();
    let server = s.serve(&[]);
    assert_eq!(get(server.http, "members.localhost", "/").0, 200);
    let (code, body) = get(server.http, "members.localhost", "/admin/");
    assert_eq!(code, 401, "anonymous on a login path: {body}");
    // Signed in, the request reaches the app (which has no /admin/: 404).
    let cookie = format!("commons_session={token}");
    let host = ("Host", "members.localhost");
    let (code, _) = http(
        server.http,
        "GET",
        "/admin/",
        &[host, ("Cookie", &cookie)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 404);
    // A body over the limit never reaches the app (which would say 501).
    let (code, body) = http(server.http, "POST", "/", &[host], &[b'x'; 2048]).unwrap();
    assert_eq!(code, 413, "{body}");
    let (code, _) = http(server.http, "POST", "/", &[host], &[b'x'; 512]).unwrap();
    assert_eq!(code, 501, "a small body reaches the app");
    // So does a head under the site's limit; one over it does not.
    let (code, _) = http(
        server.http,
        "GET",
        "/",
        &[host, ("X-Pad", &"p".repeat(1500))],
        b"",
    )
    .unwrap();
    assert_eq!(code, 200);
    let (code, body) = http(
        server.http,
        "GET",
        "/",
        &[host, ("X-Pad", &"p".repeat(2500))],
        b"",
    )
    .unwrap();
    assert_eq!(code, 431, "{body}");
}

#[test]
fn a_stopping_platform_finishes_requests_in_flight_and_meters_them() {
    let s = Sandbox::new("gw-stop");
    s.write(
        "app.py",
        r#"import os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow":
            time.sleep(1.5)
        body = b"done" if self.path == "/slow" else b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#,
    );
    s.blueprint(
        r#"name: slow
components:
  web:
    process: python3 app.py
    health: { http: "/" }
"#,
    );
    s.ok(&["deploy"]);
    let mut server = s.serve(&[]);
    assert_eq!(get(server.http, "slow.localhost", "/"), (200, "ok".into()));
    let port = server.http;
    let slow = std::thread::spawn(move || get(port, "slow.localhost", "/slow"));
    std::thread::sleep(Duration::from_millis(400));
    // SIGTERM, as `commons daemon stop` and service managers send it.
    let pid = server.child.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert_eq!(
        slow.join().unwrap(),
        (200, "done".into()),
        "the request in flight finished"
    );
    let status = server.child.wait().unwrap();
    assert!(status.success(), "serve exits cleanly: {status}");
    // Both requests were metered before it stopped.
    assert_eq!(metered(&s, "slow"), 2.0);
    // New connections are refused once it has stopped.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

/// Two platform instances sharing PostgreSQL and NATS, each with its
/// gateway, in front of one site; a client fails over from the first to the
/// second. The first is killed (SIGKILL) under load: no request fails, and
/// the meter (the survivor's, taking usage from the stream) counts every
/// request the survivor answered and every one the killed gateway had
/// handed to the bus — only what it answered in its last moments, not yet
/// published, may be missing — and none twice.
#[test]
fn a_gateway_killed_under_load_loses_no_request_and_no_published_usage() {
    let url = std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let schema = format!("gw_kill_{}", std::process::id());
    let (one, two) = (Sandbox::new("gw-kill-one"), Sandbox::new("gw-kill-two"));
    let nats = Nats::start(&one.dir.join("jetstream"));
    let env = [
        ("COMMONS_DATABASE_URL", url.as_str()),
        ("COMMONS_DATABASE_SCHEMA", schema.as_str()),
        ("COMMONS_NATS_URL", nats.url.as_str()),
        ("COMMONS_BUS_NAME", schema.as_str()),
    ];
    one.blueprint(VERSIONED_SHOP);
    let mut deploy = one.cmd(&["deploy"]);
    for (k, v) in env {
        deploy.env(k, v);
    }
    run_ok(&mut deploy);
    let mut first = one.serve(&env);
    one.share_keys(&two);
    let second = two.serve(&env);
    let gateways = [first.http, second.http];
    // Requests made before the load (each is metered too).
    let mut warmup = 0u64;
    for port in gateways {
        assert!(
            wait_for(Duration::from_secs(20), || {
                warmup += 1;
                http(port, "GET", "/", &[("Host", "shop.localhost")], b"")
                    .is_ok_and(|(c, _)| c == 200)
            }),
            "both gateways serve the site"
        );
    }
    // The client: the first gateway while it answers, then the second.
    let mut answered = [0u64; 2];
    let mut failed = 0u64;
    let mut first_answers: Vec<Instant> = Vec::new();
    let started = Instant::now();
    let mut killed_at = None;
    while started.elapsed() < Duration::from_secs(4) {
        if killed_at.is_none() && started.elapsed() > Duration::from_millis(1500) {
            let _ = first.child.kill();
            let _ = first.child.wait();
            killed_at = Some(Instant::now());
        }
        let tried = gateways.iter().enumerate().find_map(|(i, port)| {
            match http(*port, "GET", "/", &[("Host", "shop.localhost")], b"") {
                Ok((200, _)) => Some(i),
                _ => None,
            }
        });
        match tried {
            Some(i) => {
                answered[i] += 1;
                if i == 0 {
                    first_answers.push(Instant::now());
                }
            }
            None => failed += 1,
        }
    }
    let killed_at = killed_at.unwrap();
    assert_eq!(failed, 0, "a request failed on both gateways");
    assert!(answered[0] > 50 && answered[1] > 50, "{answered:?}");
    // What the killed gateway answered in its last half second may not
    // have reached the bus (its tap hands usage over four times a second).
    // Its last half second of work: up to the kill, or up to its last answer
    // if it stalled before (a starved process's tap stalls with it).
    let last_work = first_answers.last().copied().unwrap_or(killed_at);
    let unpublished_at_most = first_answers
        .iter()
        .filter(|t| last_work.duration_since(**t) < Duration::from_millis(500))
        .count() as f64;
    let metered = || {
        let mut c = two.cmd(&["usage", "show", "site", "shop", "--json"]);
        for (k, v) in env {
            c.env(k, v);
        }
        let v: serde_json::Value = serde_json::from_slice(&run_ok(&mut c).stdout).unwrap();
        v.as_array()
            .into_iter()
            .flatten()
            .map(|p| p["value"].as_f64().unwrap_or(0.0))
            .sum::<f64>()
    };
    let total = (answered[0] + answered[1]) as f64;
    assert!(
        wait_for(Duration::from_secs(30), || metered()
            >= total - unpublished_at_most),
        "metered {} of {total} answered ({unpublished_at_most} answered by the killed gateway in its last half second)",
        metered()
    );
    // Past the consumer's ack wait: nothing delivered again was counted again.
    std::thread::sleep(Duration::from_secs(11));
    let counted = metered();
    eprintln!(
        "answered {answered:?} (killed after {}), failed {failed}, metered {counted}, at most {unpublished_at_most} unpublished",
        answered[0]
    );
    assert!(
        counted <= total + warmup as f64,
        "counted {counted} of {total} answered (+{warmup} before the load): some twice"
    );
    destroy_on(&one, &env, "shop");
    drop((first, second, nats));
    drop_platform_schemas(&url, &schema);
}
