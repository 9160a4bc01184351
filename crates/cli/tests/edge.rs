//! A gateway on its own (`commons gateway`) beside a `commons serve`
//! instance on one PostgreSQL (and, in the scale-out pass, one NATS
//! server): it keeps no state of its own, serves the platform's sites from
//! the routes the platform publishes (the bus's bucket, or the database
//! without one), asks the platform's API to wake an idle site, and its
//! requests are metered by the platform — also those it finished after it
//! was asked to stop. Without a database, or without a token to wake sites
//! with, it refuses to start and says what to set.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The state of the platform's `shop.web`, as its CLI reads it from the database.
fn web_state(platform: &Sandbox, env: &[(&str, &str)]) -> String {
    let out = run_ok(
        platform
            .cmd(&["status", "shop", "--json"])
            .envs(env.iter().copied()),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["components"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "web")
        .map(|c| c["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

fn get(port: u16) -> Option<(u16, String)> {
    http(port, "GET", "/", &[("Host", "shop.localhost")], b"").ok()
}

/// A `commons gateway` process and where it listens.
struct Edge {
    child: std::process::Child,
    http: u16,
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_edge(s: &Sandbox, env: &[(&str, &str)]) -> Edge {
    use std::io::BufRead;
    let mut cmd = s.cmd(&[
        "gateway",
        "--http",
        "127.0.0.1:0",
        "--https",
        "off",
        "--admin",
        "127.0.0.1:0",
    ]);
    cmd.envs(env.iter().copied());
    let mut child = cmd.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut reader = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut said = String::new();
    let http = loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            panic!("the gateway stopped before it said where it listens:\n{said}");
        }
        said.push_str(&line);
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"Listening") && words.get(1) == Some(&"http") {
            break words[2].rsplit(':').next().unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    Edge { child, http }
}

/// The same site with an app that takes a second to answer a form: posts
/// are in flight at any moment, and a gateway does not send a post again
/// (it may have been acted on), so a replaced process stopped while a
/// gateway still has some there fails them.
const SLOW_SITE: &str = r#"name: shop
inputs:
  version: { type: string, default: "1" }
components:
  web:
    process: "python3 slow.py"
    env: { VERSION: "${inputs.version}" }
    health: { http: "/", interval: 50ms }
"#;

const SLOW_APP: &str = r#"import os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
body = ("shop v" + os.environ["VERSION"]).encode()
class Slow(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(1.0)
        self.do_GET()
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Slow).serve_forever()
"#;

/// A platform token for waking sites, as the operator makes it.
fn wake_token(platform: &Sandbox, env: &[(&str, &str)]) -> String {
    let made = run_ok(
        platform
            .cmd(&[
                "token",
                "create",
                "edge",
                "--scope",
                "runtime:wake",
                "--json",
            ])
            .envs(env.iter().copied()),
    );
    let token: serde_json::Value = serde_json::from_slice(&made.stdout).unwrap();
    token["token"].as_str().unwrap().to_string()
}

#[test]
fn a_gateway_on_its_own_serves_wakes_and_meters_the_platforms_sites() {
    let url = std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let schema = format!("edge_{}", std::process::id());
    let (platform, edge) = (Sandbox::new("edge-platform"), Sandbox::new("edge-gateway"));
    let shared = [
        ("COMMONS_DATABASE_URL", url.as_str()),
        ("COMMONS_DATABASE_SCHEMA", schema.as_str()),
        ("COMMONS_BUS_NAME", schema.as_str()),
    ];
    platform.blueprint(VERSIONED_SHOP);
    run_ok(platform.cmd(&["deploy"]).envs(shared));
    // Sites idle after a second without requests (the meter, which every
    // gateway's requests reach, says when the last one was).
    let mut serve_env = shared.to_vec();
    serve_env.push(("COMMONS_IDLE_AFTER", "1"));
    let server = platform.serve(&serve_env);
    let control_plane = format!("http://127.0.0.1:{}", server.port);

    // Without the platform's database, or without a token, it says what to set.
    let r = Run(edge
        .cmd(&["gateway", "--control-plane", &control_plane])
        .env_remove("COMMONS_DATABASE_URL")
        .env("COMMONS_CONTROL_PLANE_TOKEN", "x")
        .output()
        .unwrap());
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.all().contains("database_url"), "{}", r.all());
    let r = Run(edge
        .cmd(&["gateway", "--control-plane", &control_plane])
        .envs(shared)
        .output()
        .unwrap());
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(
        r.all().contains("COMMONS_CONTROL_PLANE_TOKEN") && r.all().contains("runtime:wake"),
        "{}",
        r.all()
    );

    // The operator copies the platform's keys and makes it a wake token.
    platform.share_keys(&edge);
    let token = wake_token(&platform, &shared);
    let mut edge_env = shared.to_vec();
    edge_env.push(("COMMONS_CONTROL_PLANE", &control_plane));
    edge_env.push(("COMMONS_CONTROL_PLANE_TOKEN", &token));
    let mut gateway = start_edge(&edge, &edge_env);

    // The site idles at the platform; a request at the gateway on its own
    // wakes it through the platform's API and is answered.
    assert!(
        wait_for(Duration::from_secs(20), || web_state(&platform, &shared)
            == "idle"),
        "not idle: {}",
        web_state(&platform, &shared)
    );
    let t = Instant::now();
    assert_eq!(
        get(gateway.http),
        Some((200, "shop v1".to_string())),
        "woken through the control plane and served"
    );
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(web_state(&platform, &shared), "running");

    // Its requests are the platform's usage, also those answered just
    // before it was asked to stop.
    let metered = || {
        let mut c = platform.cmd(&["usage", "show", "site", "shop", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&run_ok(c.envs(shared)).stdout).unwrap();
        v.as_array()
            .into_iter()
            .flatten()
            .map(|p| p["value"].as_f64().unwrap_or(0.0))
            .sum::<f64>()
    };
    for _ in 0..20 {
        assert_eq!(get(gateway.http), Some((200, "shop v1".to_string())));
    }
    let sigterm = std::process::Command::new("kill")
        .args(["-TERM", &gateway.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sigterm.success());
    let ended = wait_for(Duration::from_secs(15), || {
        gateway.child.try_wait().ok().flatten().is_some()
    });
    assert!(ended, "the gateway did not stop on SIGTERM");
    assert!(
        wait_for(Duration::from_secs(20), || metered() >= 21.0),
        "metered {} of the 21 requests the gateway answered",
        metered()
    );
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(metered(), 21.0, "each request once");

    // It kept nothing of the platform's state in its own directory.
    assert!(!edge.home.join("state.db").exists());
    assert!(!edge.home.join("meter").join("meter.db").exists());

    // The site's process outlives the platform's: it goes with the site.
    run_ok(platform.cmd(&["destroy", "shop"]).envs(shared));
    drop(server);
    drop_platform_schemas(&url, &schema);
}

#[test]
fn redeploys_under_load_through_a_gateway_on_its_own_fail_no_request() {
    let url = std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let schema = format!("edge_load_{}", std::process::id());
    let (platform, edge) = (
        Sandbox::new("edge-load-platform"),
        Sandbox::new("edge-load-gateway"),
    );
    let shared = [
        ("COMMONS_DATABASE_URL", url.as_str()),
        ("COMMONS_DATABASE_SCHEMA", schema.as_str()),
        ("COMMONS_BUS_NAME", schema.as_str()),
    ];
    platform.blueprint(SLOW_SITE);
    platform.write("slow.py", SLOW_APP);
    run_ok(platform.cmd(&["deploy"]).envs(shared));
    let server = platform.serve(&shared);
    platform.share_keys(&edge);
    let token = wake_token(&platform, &shared);
    let control_plane = format!("http://127.0.0.1:{}", server.port);
    let mut edge_env = shared.to_vec();
    edge_env.push(("COMMONS_CONTROL_PLANE", &control_plane));
    edge_env.push(("COMMONS_CONTROL_PLANE_TOKEN", &token));
    let gateway = start_edge(&edge, &edge_env);
    assert!(
        wait_for(Duration::from_secs(20), || get(gateway.http)
            == Some((200, "shop v1".to_string()))),
        "the gateway on its own serves the site"
    );

    // The instance replaces the site's process ten times while posts go
    // through the other gateway alone: each replaced process is
    // stopped only once no gateway of the platform has requests there
    // (this instance's own has none: it has to ask the other).
    let deploy = |v: u32| {
        let input = format!("version={v}");
        run_ok(platform.cmd(&["deploy", "-i", &input]).envs(shared));
    };
    let t = Instant::now();
    deploy(2);
    let seconds = (t.elapsed().as_secs_f64() * 10.0 * 5.0).ceil() as u64 + 5;
    let post = edge.write("post.lua", "wrk.method = \"POST\"\nwrk.body = \"note=1\"\n");
    let mut load = Load::start_with(
        gateway.http,
        "shop.localhost",
        seconds,
        &["-s", post.to_str().unwrap()],
    );
    std::thread::sleep(Duration::from_millis(500));
    for v in 3..=12 {
        deploy(v);
    }
    assert!(load.running(), "the load ended before the redeploys did");
    let (requests, failures, summary) = load.finish();
    assert!(
        requests > 50,
        "too little load to prove anything:\n{summary}"
    );
    assert_eq!(failures, 0, "requests failed during redeploys:\n{summary}");
    assert_eq!(get(gateway.http), Some((200, "shop v12".to_string())));

    run_ok(platform.cmd(&["destroy", "shop"]).envs(shared));
    drop((gateway, server));
    drop_platform_schemas(&url, &schema);
}
