//! The gateway as `commons serve` runs it, in front of real sites: routing
//! from the deployments' state, usage into the meter, wake on request, and
//! redeploys under load that lose no request.

mod common;

use common::*;
use std::time::{Duration, Instant};

const SITE: &str = r#"name: shop
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
    s.blueprint(SITE);
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
    s.blueprint(SITE);
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
    s.blueprint(SITE);
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
