//! Providers' nodes (milestone 5): node agents join a control plane with a
//! single-use token that pins its CA, then speak to it only over mutual
//! TLS. Real agents (`commons agent`), each with a data directory of its
//! own, against a real `commons serve` on loopback; the attacks are made
//! with curl presenting real certificates.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SITE: &str = r#"name: hello
components:
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    health: { http: "/" }
    route: { path: /, login: [/private] }
"#;

const DATA_SITE: &str = r#"name: notes
components:
  db:
    sqlite: {}
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    health: { http: "/" }
    route: { host: notes.example.org }
"#;

/// Fast heartbeats, quick loss, certificates that must be renewed within
/// the test.
const AGENT_ENV: &[(&str, &str)] = &[
    ("COMMONS_AGENT_LISTEN", "127.0.0.1:0"),
    ("COMMONS_NODE_HEARTBEAT_SECONDS", "1"),
    ("COMMONS_NODE_LOST_AFTER_SECONDS", "3"),
    ("COMMONS_NODE_CERTIFICATE_SECONDS", "6"),
];

fn admin(s: &Sandbox, server: &Server) -> Api {
    let path = s.home.join("secrets").join("admin.token");
    assert!(
        wait_for(Duration::from_secs(10), || path.exists()),
        "serve writes the administrator's token"
    );
    let token = std::fs::read_to_string(path).unwrap();
    Api::token(server.port, token.trim())
}

/// A provider's machine: a data directory of its own.
struct Agent {
    home: PathBuf,
    /// Its sites' databases' prefix on the one PostgreSQL server all nodes
    /// share here (a provider's node would have its own server).
    prefix: String,
    child: Option<Child>,
}

/// The PostgreSQL server's administrator connection.
fn postgres_admin() -> String {
    std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

impl Agent {
    fn new(s: &Sandbox, name: &str) -> Agent {
        let home = s.dir.join(format!("agent-{name}"));
        std::fs::create_dir_all(&home).unwrap();
        Agent {
            home,
            prefix: name.replace(|c: char| !c.is_ascii_alphanumeric(), ""),
            child: None,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_commons"));
        c.args(args)
            .env("COMMONS_HOME", &self.home)
            .env("COMMONS_DAEMON", "off")
            .env("COMMONS_SANDBOX", "0")
            .env("COMMONS_POSTGRES_URL", postgres_admin())
            .env("COMMONS_POSTGRES_PREFIX", &self.prefix)
            .env_remove("COMMONS_JOIN_TOKEN")
            .env_remove("CI");
        c
    }

    fn join(&self, url: &str, token: &str, region: &str) -> Run {
        Run(self
            .cmd(&[
                "agent",
                "join",
                url,
                "--token",
                token,
                "--region",
                region,
                "--cpu-millis",
                "2000",
                "--memory-mib",
                "2048",
                "--feature",
                "sandbox",
                "--feature",
                "postgres",
            ])
            .output()
            .unwrap())
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.home.join("agent.log")).unwrap();
        self.child = Some(
            self.cmd(&[
                "agent",
                "run",
                "--poll-seconds",
                "5",
                "--sample-seconds",
                "1",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
        );
    }

    /// How the agent's process ended, if it did within `limit`.
    fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut().unwrap();
        wait_for(limit, || child.try_wait().unwrap().is_some());
        child.try_wait().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("agent.log")).unwrap_or_default()
    }

    fn node(&self) -> String {
        let id: Value =
            serde_json::from_slice(&std::fs::read(self.home.join("agent/identity.json")).unwrap())
                .unwrap();
        id["node"].as_str().unwrap().to_string()
    }

    fn pem(&self) -> PathBuf {
        self.home.join("agent/node.pem")
    }

    /// A site's web component as this node runs it: (status, body) of `/`.
    fn get(&self, site: &str) -> Option<(u16, String)> {
        let out = self.cmd(&["status", site, "--json"]).output().ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let web = v["components"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == "web")?
            .clone();
        web["port"].as_u64()?;
        component_get(&web, "/").ok()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Whatever the node deployed goes with it.
        if let Ok(out) = self.cmd(&["list", "--json"]).output() {
            if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
                for d in v.as_array().into_iter().flatten() {
                    if let Some(name) = d["name"].as_str() {
                        let _ = self.cmd(&["destroy", name]).output();
                    }
                }
            }
        }
    }
}

/// A call to the agent listener made by curl with `cert` (a node's), the
/// control plane's CA trusted for its fixed name.
fn agent_call(
    s: &Sandbox,
    port: u16,
    cert: Option<&Path>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, String) {
    let name = "control-plane.commons.internal";
    let mut c = Command::new("curl");
    c.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
        .arg("--cacert")
        .arg(s.home.join("nodes/ca.pem"))
        .arg("--resolve")
        .arg(format!("{name}:{port}:127.0.0.1"));
    if let Some(cert) = cert {
        c.arg("--cert").arg(cert).arg("--key").arg(cert);
    }
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "--data-binary"])
            .arg(b.to_string());
    }
    let out = c
        .arg(format!("https://{name}:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn node_state(admin: &Api, node: &str) -> Value {
    let (code, v) = admin.get("/api/nodes");
    assert_eq!(code, 200, "{v}");
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == node)
        .cloned()
        .unwrap_or(Value::Null)
}

fn join_token(api: &Api, org: &str, ttl: u64) -> String {
    let (code, v) = api.post(
        &format!("/api/orgs/{org}/join-tokens"),
        json!({ "ttl_seconds": ttl }),
    );
    assert_eq!(code, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}

#[test]
fn nodes_join_only_with_a_good_token_and_act_only_as_themselves() {
    let s = Sandbox::new("agents-join");
    let server = s.serve(AGENT_ENV);
    let url = format!("https://127.0.0.1:{}", server.agents.unwrap());
    let admin = admin(&s, &server);
    // The first account administers the platform; providers come after.
    signup(server.port, "operator@example.org", "Operator");
    signup(server.port, "acme@example.org", "Acme");
    signup(server.port, "mallory@example.org", "Mallory");
    let acme = login(server.port, "acme@example.org", true);
    let mallory = login(server.port, "mallory@example.org", true);

    // Another organisation neither makes acme's join tokens nor sees its nodes.
    let (code, _) = mallory.post("/api/orgs/acme/join-tokens", json!({}));
    assert_eq!(code, 404);

    // A token pinning another CA: refused before the token is sent, so the
    // same token with the right pin still works afterwards.
    let token = join_token(&acme, "acme", 600);
    let (pin, secret) = token
        .strip_prefix("cmnj_")
        .unwrap()
        .split_once('_')
        .unwrap();
    let wrong_pin = format!("cmnj_{}_{secret}", "0".repeat(pin.len()));
    let a = Agent::new(&s, "a");
    let r = a.join(&url, &wrong_pin, "eu-west");
    assert_eq!(r.code(), 1, "{}", r.all());
    assert!(
        r.stderr().contains("not the one the join token pins"),
        "{}",
        r.all()
    );
    assert!(!a.home.join("agent/identity.json").exists());

    // A forged token (this CA's pin, a made-up secret).
    let forged = format!("cmnj_{pin}_{}", "ab".repeat(32));
    let r = a.join(&url, &forged, "eu-west");
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(
        r.stderr().contains("not a join token of this platform"),
        "{}",
        r.all()
    );

    // An expired token.
    let short = join_token(&acme, "acme", 1);
    std::thread::sleep(Duration::from_millis(1500));
    let r = a.join(&url, &short, "eu-west");
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.stderr().contains("expired"), "{}", r.all());

    // The good token joins, and the node is ready at once.
    let started = Instant::now();
    let r = a.join(&url, &token, "eu-west");
    assert_eq!(r.code(), 0, "{}", r.all());
    let node_a = a.node();
    let view = node_state(&admin, &node_a);
    assert_eq!(view["state"], "ready", "{view}");
    assert_eq!(view["provider"], "acme", "{view}");
    eprintln!("join to ready: {:?}", started.elapsed());
    // The key never left the machine, and only the platform reads it.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(a.pem()).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "node.pem is the node's alone: {mode:o}");

    // The same token again: refused.
    let b = Agent::new(&s, "b");
    let r = b.join(&url, &token, "eu-west");
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.stderr().contains("used already"), "{}", r.all());
    let r = b.join(&url, &join_token(&acme, "acme", 600), "us-east");
    assert_eq!(r.code(), 0, "{}", r.all());
    let node_b = b.node();

    // Acme sees its two nodes; Mallory sees none of them.
    let (code, v) = acme.get("/api/orgs/acme/nodes");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 2, "{v}");
    let (code, _) = mallory.get("/api/orgs/acme/nodes");
    assert_eq!(code, 404);

    // The console shows a provider its nodes and makes join tokens, with
    // the command that uses them; another organisation sees nothing.
    let header = |api: &Api, name: &str| {
        api.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let cookie = header(&acme, "Cookie");
    let (code, _, page) = http_with_head(
        server.port,
        "GET",
        "/console/orgs/acme/nodes",
        &[("Cookie", &cookie)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 200, "{page}");
    assert!(page.contains(&node_a) && page.contains(&node_b), "{page}");
    let form = format!("csrf={}&ttl_minutes=5", header(&acme, "X-CSRF-Token"));
    let form_headers = [
        ("Cookie", cookie.as_str()),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    let (code, _, page) = http_with_head(
        server.port,
        "POST",
        "/console/orgs/acme/join-tokens",
        &form_headers,
        form.as_bytes(),
    )
    .unwrap();
    assert_eq!(code, 200, "{page}");
    let command = format!("commons agent join {url} --token cmnj_");
    assert!(page.contains(&command), "{page}");
    let (code, _, _) = http_with_head(
        server.port,
        "POST",
        "/console/orgs/acme/join-tokens",
        &form_headers,
        b"ttl_minutes=5",
    )
    .unwrap();
    assert_ne!(
        code, 200,
        "a form without the session's CSRF token is refused"
    );
    let mallory_cookie = header(&mallory, "Cookie");
    let (code, _, _) = http_with_head(
        server.port,
        "GET",
        "/console/orgs/acme/nodes",
        &[("Cookie", &mallory_cookie)],
        b"",
    )
    .unwrap();
    assert_eq!(code, 404);

    let port = server.agents.unwrap();
    let call = |cert: Option<&Path>, method: &str, path: &str, body: Option<Value>| {
        agent_call(&s, port, cert, method, path, body)
    };
    let assignments = |cert: Option<&Path>, node: &str| {
        call(
            cert,
            "GET",
            &format!("/agent/v1/nodes/{node}/assignments"),
            None,
        )
    };
    // No certificate: only joining works.
    let (code, body) = assignments(None, &node_a);
    assert_eq!(code, 401, "{body}");
    // A's certificate reads A's assignments, never B's, and sends no usage
    // as B.
    let (code, body) = assignments(Some(&a.pem()), &node_a);
    assert_eq!(code, 200, "{body}");
    let (code, body) = assignments(Some(&a.pem()), &node_b);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("acts only for itself"), "{body}");
    let event = |node: &str, id: &str| {
        json!({ "events": [{
            "specversion": "1.0", "id": id, "source": "anything", "type": "request",
            "time": now_rfc3339(),
            "data": { "user": "someone", "site": "hello", "node": node, "requests": 1 }
        }]})
    };
    let usage = |node: &str, events: Value| {
        call(
            Some(&a.pem()),
            "POST",
            &format!("/agent/v1/nodes/{node}/usage"),
            Some(events),
        )
    };
    let (code, body) = usage(&node_a, event(&node_b, "e1"));
    assert_eq!(code, 403, "usage as another node: {body}");
    let (code, body) = usage(&node_b, event(&node_b, "e2"));
    assert_eq!(code, 403, "usage at another node's path: {body}");
    let (code, body) = usage(&node_a, event(&node_a, "e3"));
    assert_eq!(code, 204, "its own usage: {body}");

    // A site's data travels only between the two nodes of its move: no
    // node fetches or overwrites a snapshot otherwise.
    for method in ["GET", "PUT"] {
        let (code, body) = call(
            Some(&a.pem()),
            method,
            &format!("/agent/v1/nodes/{node_a}/snapshots/hello"),
            None,
        );
        assert_eq!(code, 403, "{method} a snapshot: {body}");
    }

    // Operations are a closed set: anything else is refused, and only the
    // platform assigns them.
    let (code, v) = admin.post(
        &format!("/api/nodes/{node_a}/operations"),
        json!({ "op": "shell", "command": "cat /etc/shadow" }),
    );
    assert_eq!(code, 422, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("apply_site"), "{v}");
    let (code, v) = admin.post(
        &format!("/api/nodes/{node_a}/operations"),
        json!({ "op": "stop", "site": "hello", "command": "id" }),
    );
    assert_eq!(code, 422, "a smuggled field: {v}");
    let (code, _) = acme.post(
        &format!("/api/nodes/{node_a}/operations"),
        json!({ "op": "drain" }),
    );
    assert_eq!(code, 403, "a provider does not command nodes");

    // The agent runs: it heartbeats, runs what it is assigned (once per
    // operation id), and renews its certificate before it expires.
    let mut a = a;
    a.start();
    let first_pem = std::fs::read(a.pem()).unwrap();
    let (code, v) = admin.post(
        "/api/placements",
        json!({ "site": "hello", "blueprint": SITE, "providers": ["acme"], "regions": ["eu-west"],
                "needs": { "cpu_millis": 500, "memory_bytes": 1 << 28, "disk_bytes": 0 } }),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["node"], node_a.as_str(), "only A is in eu-west: {v}");
    assert!(
        wait_for(Duration::from_secs(60), || a
            .get("hello")
            .is_some_and(|(c, _)| c == 200)),
        "node A serves the site it was assigned:\n{}",
        a.log()
    );
    let through_tunnel = || {
        http(server.http, "GET", "/", &[("Host", "hello.localhost")], b"")
            .map(|(code, _)| code)
            .unwrap_or(0)
    };
    assert!(
        wait_for(Duration::from_secs(10), || through_tunnel() == 200),
        "the gateway reaches hello over A's tunnel:\n{}",
        a.log()
    );
    // The tunnel lasts no longer than the certificate it was opened with.
    let tunnel_until = || node_state(&admin, &node_a)["tunnel_until_ms"].as_i64();
    let first_until = tunnel_until().expect("A's tunnel is open");
    let first_expiry = first_until / 1000;
    assert!(
        first_expiry <= now_secs() + 6,
        "the tunnel closes when the first certificate (6 s) expires: {first_until}"
    );
    // Past the certificate's lifetime, the node still works: it renewed.
    std::thread::sleep(Duration::from_secs(7));
    assert_ne!(
        std::fs::read(a.pem()).unwrap(),
        first_pem,
        "renewed:\n{}",
        a.log()
    );
    let view = node_state(&admin, &node_a);
    assert_eq!(view["state"], "ready", "{view}\n{}", a.log());
    assert!(
        view["last_heartbeat_ms_ago"].as_u64().unwrap() < 3000,
        "{view}"
    );
    assert_eq!(view["sites"][0]["site"], "hello", "{view}");
    // The renewed certificate opened a new tunnel: the first one's closed
    // with its certificate, and the site is still reached.
    assert!(
        wait_for(Duration::from_secs(5), || tunnel_until()
            .is_some_and(|t| t > first_until)),
        "a tunnel of the renewed certificate: {:?} (first until {first_until})\n{}",
        tunnel_until(),
        a.log()
    );
    assert!(
        wait_for(Duration::from_secs(10), || through_tunnel() == 200),
        "served over the new tunnel:\n{}",
        a.log()
    );
    // Renewals come every 4 s and each certificate lives 6 s. An earlier
    // certificate's tunnel goes on carrying the connections it has (the
    // gateway keeps its upstream connections open) until that certificate
    // expires, then it is closed: a node never holds more than two (kept
    // open, they would pile up, one per renewal).
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(9) {
        through_tunnel();
        let open = node_state(&admin, &node_a)["tunnels_open"].as_u64();
        assert!(open.is_some_and(|n| n <= 2), "tunnels open: {open:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    // The old certificate expired; the old one is refused.
    std::fs::write(s.dir.join("old.pem"), &first_pem).unwrap();
    let (code, _) = assignments(Some(&s.dir.join("old.pem")), &node_a);
    assert_eq!(code, 0, "an expired certificate fails the handshake");

    // One operation was assigned; it ran once (its report is kept by id).
    let ops = std::fs::read_dir(a.home.join("agent/ops")).unwrap().count();
    assert_eq!(ops, 1, "one operation, run once");

    // Revoked by its provider, the node's certificate is refused at once,
    // its tunnel closed by the control plane even while the agent cannot
    // hear of it (stopped here, as a node ignoring the revocation would),
    // and the agent stops.
    let agent_pid = a.child.as_ref().unwrap().id();
    signal(agent_pid, "-STOP");
    let (code, _) = acme.call("DELETE", &format!("/api/orgs/acme/nodes/{node_a}"), None);
    assert_eq!(code, 204);
    let closed = wait_for(Duration::from_secs(3), || tunnel_until().is_none());
    let answered = through_tunnel();
    signal(agent_pid, "-CONT");
    assert!(
        closed,
        "the revoked node's tunnel is closed: {:?}",
        tunnel_until()
    );
    assert_ne!(answered, 200, "nothing reaches a revoked node's sites");
    let (code, body) = assignments(Some(&a.pem()), &node_a);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("revoked"), "{body}");
    assert!(
        a.exited_within(Duration::from_secs(15)).is_some(),
        "a revoked agent stops"
    );
    assert!(a.log().contains("revoked"), "{}", a.log());

    // B never ran, and its certificate (6 s) expired: the agent says what
    // to do instead of retrying what cannot work.
    let mut b = b;
    b.start();
    let ended = b.exited_within(Duration::from_secs(10));
    assert!(
        ended.is_some(),
        "an agent with an expired certificate stops"
    );
    assert_eq!(ended.unwrap().code(), Some(2));
    assert!(
        b.log().contains("expired") && b.log().contains("commons agent join"),
        "{}",
        b.log()
    );
    // Joining again on a new token of its provider brings the machine back
    // as the same node, which then runs.
    let r = b.join(&url, &join_token(&acme, "acme", 600), "us-east");
    assert_eq!(r.code(), 0, "{}", r.all());
    assert_eq!(b.node(), node_b, "the same node");
    b.start();
    assert!(
        wait_for(Duration::from_secs(15), || node_state(&admin, &node_b)
            ["last_heartbeat_ms_ago"]
            .as_u64()
            .is_some_and(|ms| ms < 2000)),
        "node B beats again: {}\n{}",
        node_state(&admin, &node_b),
        b.log()
    );
    // Nobody else's token does that: another provider cannot take over
    // acme's node by naming it, and a revoked node stays revoked.
    let expire = |agent: &Agent| {
        let path = agent.home.join("agent/identity.json");
        let mut id: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        id["not_after"] = json!(0);
        std::fs::write(&path, id.to_string()).unwrap();
    };
    let m = Agent::new(&s, "m");
    std::fs::create_dir_all(m.home.join("agent")).unwrap();
    std::fs::copy(
        b.home.join("agent/identity.json"),
        m.home.join("agent/identity.json"),
    )
    .unwrap();
    expire(&m);
    let r = m.join(&url, &join_token(&mallory, "mallory", 600), "eu-west");
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(
        r.stderr().contains("not one of mallory's nodes"),
        "{}",
        r.all()
    );
    expire(&a);
    let r = a.join(&url, &join_token(&acme, "acme", 600), "eu-west");
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.stderr().contains("was revoked"), "{}", r.all());
    assert_eq!(node_state(&admin, &node_a)["state"], "revoked");
}

/// A control plane with two providers, acme and globex, each with a node
/// in `eu` whose agent runs.
fn two_providers(s: &Sandbox, env: &[(&str, &str)]) -> (Server, Api, Agent, Agent) {
    let server = s.serve(env);
    let url = format!("https://127.0.0.1:{}", server.agents.unwrap());
    let admin = admin(s, &server);
    // The first account administers the platform (the console's
    // placements are its); providers come after.
    signup(server.port, "operator@example.org", "Operator");
    let mut agents = Vec::new();
    for provider in ["acme", "globex"] {
        signup(server.port, &format!("{provider}@example.org"), provider);
        let api = login(server.port, &format!("{provider}@example.org"), true);
        let mut agent = Agent::new(s, provider);
        let joined = agent.join(&url, &join_token(&api, provider, 600), "eu");
        assert_eq!(joined.code(), 0, "{}", joined.all());
        agent.start();
        agents.push(agent);
    }
    let b = agents.pop().unwrap();
    let a = agents.pop().unwrap();
    (server, admin, a, b)
}

#[test]
fn a_lost_nodes_stateless_site_is_served_elsewhere() {
    let s = Sandbox::new("agents-lost");
    // Certificates that outlive A's time down: a node whose certificate
    // expired while it was away is refused once the control plane forgets
    // expired ones (at the next renewal of any node), which on a loaded
    // machine raced A's return. Renewal is the first test's.
    let env: Vec<(&str, &str)> = AGENT_ENV
        .iter()
        .map(|&(k, v)| match k {
            "COMMONS_NODE_CERTIFICATE_SECONDS" => (k, "600"),
            _ => (k, v),
        })
        .collect();
    let (server, admin, mut a, b) = two_providers(&s, &env);
    let (node_a, node_b) = (a.node(), b.node());

    // Both sites go to acme's node: the operator prefers acme for one and
    // allows only acme for the other.
    for (site, blueprint, prefs) in [
        ("hello", SITE, json!({ "preferred": ["acme"] })),
        ("notes", DATA_SITE, json!({ "providers": ["acme"] })),
    ] {
        let mut req = json!({ "site": site, "blueprint": blueprint });
        req.as_object_mut()
            .unwrap()
            .extend(prefs.as_object().unwrap().clone());
        let (code, v) = admin.post("/api/placements", req);
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["node"], node_a.as_str(), "{v}");
    }
    assert!(
        wait_for(Duration::from_secs(60), || a
            .get("hello")
            .is_some_and(|(c, _)| c == 200)
            && a.get("notes").is_some_and(|(c, _)| c == 200)),
        "node A serves both:\n{}",
        a.log()
    );
    // Through the control plane's gateway, over A's tunnel: A dials out
    // and opens no port.
    let at = |host: &str, path: &str| {
        http(server.http, "GET", path, &[("Host", host)], b"")
            .map(|(code, _)| code)
            .unwrap_or(0)
    };
    let through_gateway = |site: &str| {
        let host = match site {
            // A site whose route names a host is served there.
            "notes" => "notes.example.org".to_string(),
            _ => format!("{site}.localhost"),
        };
        at(&host, "/")
    };
    assert!(
        wait_for(Duration::from_secs(10), || through_gateway("hello") == 200),
        "the gateway reaches hello on node A:\n{}",
        a.log()
    );
    assert_eq!(through_gateway("notes"), 200);
    // A node's site is routed as its blueprint says, as one of this
    // machine's would be: its host instead of SITE.localhost, its
    // component's name, and its login-only paths held by the gateway.
    assert_eq!(
        at("notes.localhost", "/"),
        404,
        "notes is served at its host"
    );
    assert_eq!(at("web.notes.localhost", "/"), 200);
    assert_eq!(at("hello.localhost", "/private/"), 401, "a login-only path");
    assert_eq!(at("web.hello.localhost", "/private/"), 401);

    // A dry run says where a site would go, and why not elsewhere.
    let file = s.blueprint(SITE);
    let r = s.run(&[
        "place",
        "big",
        file.to_str().unwrap(),
        "--dry-run",
        "--cpu-millis",
        "3000",
    ]);
    assert_eq!(r.code(), 2, "nothing has room: {}", r.all());
    assert!(r.stdout().contains("refused: no room (cpu)"), "{}", r.all());
    let r = s.ok(&["place", "small", file.to_str().unwrap(), "--dry-run"]);
    assert!(r.stderr().contains("small would go to"), "{}", r.all());
    let listed = s.ok(&["nodes", "--json"]).json();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    assert!(node_state(&admin, &node_a)["placed"] == json!(["hello", "notes"]));

    // kill -9 the agent of node A: it is lost within 30 s (3 s here), and
    // its stateless site is placed on B and served there; the site with
    // data waits for A.
    let killed = Instant::now();
    let child = a.child.as_mut().unwrap();
    unsafe_kill(child.id());
    let _ = child.wait();
    assert!(
        wait_for(Duration::from_secs(30), || node_state(&admin, &node_a)
            ["state"]
            == "lost"),
        "node A is marked lost"
    );
    eprintln!("lost node detected after {:?}", killed.elapsed());
    assert!(
        wait_for(Duration::from_secs(60), || b
            .get("hello")
            .is_some_and(|(c, _)| c == 200)),
        "node B serves the lost node's stateless site:\n{}",
        b.log()
    );
    // The same host, now served by B.
    assert!(
        wait_for(Duration::from_secs(10), || through_gateway("hello") == 200),
        "the gateway reaches hello on node B"
    );
    eprintln!("lost node's site served again after {:?}", killed.elapsed());
    // The requests were metered as the providers' whose nodes served them:
    // acme's before the loss, globex's after.
    let served_by = |provider: &str| -> f64 {
        let v = s
            .ok(&["usage", "show", "provider", provider, "--json"])
            .json();
        v.as_array()
            .into_iter()
            .flatten()
            .map(|p| p["value"].as_f64().unwrap_or(0.0))
            .sum()
    };
    assert!(
        wait_for(Duration::from_secs(10), || served_by("acme") >= 2.0
            && served_by("globex") >= 1.0),
        "acme {} globex {}",
        served_by("acme"),
        served_by("globex")
    );
    // The agents send their sites' memory and CPU as their own usage: B's
    // provider is metered for the site B runs now.
    let memory_of = |provider: &str| -> f64 {
        let v = s
            .ok(&[
                "usage",
                "show",
                "provider",
                provider,
                "--metric",
                "memory_bytes",
                "--aggregation",
                "max",
                "--json",
            ])
            .json();
        v.as_array()
            .into_iter()
            .flatten()
            .map(|p| p["value"].as_f64().unwrap_or(0.0))
            .fold(0.0, f64::max)
    };
    assert!(
        wait_for(Duration::from_secs(15), || memory_of("globex") > 1e6),
        "no memory usage from B's agent:\n{}",
        b.log()
    );
    let view_b = node_state(&admin, &node_b);
    assert_eq!(view_b["placed"], json!(["hello"]), "{view_b}");
    let view_a = node_state(&admin, &node_a);
    assert_eq!(
        view_a["placed"],
        json!(["notes"]),
        "the site with data waits: {view_a}"
    );
    assert!(b.get("notes").is_none(), "B never ran the site with data");

    // A comes back: ready again, and it removes the site that moved away.
    a.start();
    assert!(
        wait_for(Duration::from_secs(30), || node_state(&admin, &node_a)
            ["state"]
            == "ready"
            && a.get("hello").is_none()),
        "A is back and no longer runs hello:\n{}",
        a.log()
    );
    assert!(a.get("notes").is_some_and(|(c, _)| c == 200));
}

/// Now, as usage events state their time.
fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn now_rfc3339() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// `kill -9`.
fn unsafe_kill(pid: u32) {
    signal(pid, "-9");
}

/// Sends `sig` (as `kill` spells it) to `pid`.
fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

#[test]
fn concurrent_placements_never_overcommit_a_node() {
    let s = Sandbox::new("agents-place");
    let server = s.serve(&[("COMMONS_AGENT_LISTEN", "127.0.0.1:0")]);
    let url = format!("https://127.0.0.1:{}", server.agents.unwrap());
    let admin = admin(&s, &server);
    signup(server.port, "operator@example.org", "Operator");
    signup(server.port, "acme@example.org", "Acme");
    let acme = login(server.port, "acme@example.org", true);
    // Two nodes of 2000 m CPU each (see `Agent::join`): room for 8 sites
    // of 500 m. Their agents never run: placement is the control plane's.
    for n in ["a", "b"] {
        let agent = Agent::new(&s, n);
        assert_eq!(
            agent
                .join(&url, &join_token(&acme, "acme", 600), "eu")
                .code(),
            0
        );
        std::mem::forget(agent);
    }
    let placed: usize = std::thread::scope(|scope| {
        (0..4)
            .map(|t| {
                let admin = &admin;
                scope.spawn(move || {
                    (0..5)
                        .filter(|i| {
                            let (code, v) = admin.post(
                                "/api/placements",
                                json!({ "site": format!("s{t}-{i}"), "blueprint": SITE,
                                        "needs": { "cpu_millis": 500, "memory_bytes": 0, "disk_bytes": 0 } }),
                            );
                            assert_eq!(code, 200, "{v}");
                            !v["node"].is_null()
                        })
                        .count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum()
    });
    assert_eq!(placed, 8, "exactly the room there was");
    let (_, v) = admin.get("/api/nodes");
    for n in v["items"].as_array().unwrap() {
        assert_eq!(n["placed"].as_array().unwrap().len(), 4, "{n}");
    }
}

/// A site that keeps every write in SQLite: `POST /N` records N (answered
/// once committed), `GET /has/N` says whether N is there, `GET /` counts.
const WRITES_SITE: &str = r#"name: ledger
components:
  db:
    sqlite: {}
  files:
    volume: {}
  pg:
    postgres: {}
  web:
    process: |
      exec python3 - "${components.db.path}" "${components.files.path}" <<'PY'
      import hashlib, os, sqlite3, subprocess, sys
      from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
      def psql(sql):
          return subprocess.run(["psql", os.environ["PG_URL"], "-v", "ON_ERROR_STOP=1", "-Atqc", sql],
                                check=True, capture_output=True, text=True).stdout.strip()
      psql("CREATE TABLE IF NOT EXISTS w (n bigint PRIMARY KEY); "
           "CREATE TABLE IF NOT EXISTS c (id int PRIMARY KEY, total bigint NOT NULL); "
           "INSERT INTO c VALUES (1, 0) ON CONFLICT DO NOTHING; "
           "CREATE TABLE IF NOT EXISTS log (id bigserial PRIMARY KEY, n bigint NOT NULL)")
      path = sys.argv[1]
      blob = os.path.join(sys.argv[2], "blob")
      if not os.path.exists(blob):
          with open(blob, "wb") as f:
              f.write(os.urandom(3 * 65536 + 17))
      c = sqlite3.connect(path)
      c.execute("CREATE TABLE IF NOT EXISTS w (n INTEGER PRIMARY KEY)")
      c.commit()
      class H(BaseHTTPRequestHandler):
          protocol_version = "HTTP/1.1"
          def reply(self, code, body):
              b = body.encode()
              self.send_response(code)
              self.send_header("Content-Length", str(len(b)))
              self.end_headers()
              self.wfile.write(b)
          def do_GET(self):
              db = sqlite3.connect(path)
              if self.path == "/blob":
                  self.reply(200, hashlib.sha256(open(blob, "rb").read()).hexdigest())
              elif self.path.startswith("/has/"):
                  n = int(self.path[5:])
                  found = db.execute("SELECT 1 FROM w WHERE n = ?", (n,)).fetchone()
                  in_pg = psql("SELECT 1 FROM w WHERE n = %d" % n) == "1"
                  self.reply(200 if found and in_pg else 404, "")
              else:
                  self.reply(200, str(db.execute("SELECT COUNT(*) FROM w").fetchone()[0]))
          def do_POST(self):
              db = sqlite3.connect(path)
              n = int(self.path[1:])
              db.execute("INSERT OR IGNORE INTO w VALUES (?)", (n,))
              db.commit()
              # An insert, an update and a sequence's step in one transaction.
              psql("WITH ins AS (INSERT INTO w VALUES (%d) ON CONFLICT DO NOTHING RETURNING n) "
                   "UPDATE c SET total = total + (SELECT count(*) FROM ins) WHERE id = 1; "
                   "INSERT INTO log (n) VALUES (%d)" % (n, n))
              self.reply(200, "ok")
          def log_message(self, *a):
              pass
      ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
      PY
    env: { PG_URL: "${components.pg.url}" }
    health: { http: "/" }
"#;

/// Posts a console form as `who` (with their session's CSRF token);
/// answers the status, the head and the body.
fn console_post(who: &Api, port: u16, path: &str, form: &str) -> (u16, String, String) {
    let header = |name: &str| {
        who.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let body = format!("csrf={}&{form}", header("X-CSRF-Token"));
    let cookie = header("Cookie");
    http_with_head(
        port,
        "POST",
        path,
        &[
            ("Cookie", cookie.as_str()),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        body.as_bytes(),
    )
    .unwrap()
}

/// `text` as a form field's value.
fn form_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn pg(db: &str) -> postgres::Client {
    postgres::Client::connect(
        &format!("{} dbname={db}", postgres_admin()),
        postgres::NoTls,
    )
    .unwrap_or_else(|e| {
        panic!("PostgreSQL is needed for this test: {e}; `bash scripts/test` starts it")
    })
}

#[test]
fn a_site_with_data_moves_under_load_without_losing_a_write() {
    use std::sync::atomic::{AtomicBool, Ordering};
    // What an earlier run left on the shared server goes first.
    let mut admin_db = pg("postgres");
    for db in ["acme_ledger_pg", "globex_ledger_pg"] {
        for sql in [
            format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
            format!("DROP ROLE IF EXISTS {db}"),
        ] {
            admin_db.batch_execute(&sql).unwrap();
        }
    }
    let s = Sandbox::new("agents-move");
    let (server, admin, a, b) = two_providers(&s, AGENT_ENV);
    let (node_a, node_b) = (a.node(), b.node());
    let operator = login(server.port, "operator@example.org", true);
    // Where it would go, and why, as the console shows it: each node's
    // verdict, scores charted; nothing is placed by asking.
    let (code, _, page) = console_post(
        &operator,
        server.port,
        "/console/placements/plan",
        &format!(
            "site=ledger&preferred=acme&action=plan&blueprint={}",
            form_encode(WRITES_SITE)
        ),
    );
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains("ledger would go to") && page.contains(&node_a) && page.contains(&node_b),
        "{page}"
    );
    assert!(
        page.contains("<svg role=\"img\" aria-label=\"price"),
        "{page}"
    );
    assert_eq!(node_state(&admin, &node_a)["placed"], json!([]));
    // A provider is not the platform's administrator.
    let acme = login(server.port, "acme@example.org", true);
    let (code, _, _) = console_post(
        &acme,
        server.port,
        "/console/placements/plan",
        "site=x&blueprint=y",
    );
    assert_eq!(code, 403);
    let (code, v) = admin.post(
        "/api/placements",
        json!({ "site": "ledger", "blueprint": WRITES_SITE, "preferred": ["acme"] }),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["node"], node_a.as_str(), "{v}");
    let gw = server.http;
    let request = move |method: &str, path: &str| -> u16 {
        http(gw, method, path, &[("Host", "ledger.localhost")], b"")
            .map(|(c, _)| c)
            .unwrap_or(0)
    };
    assert!(
        wait_for(Duration::from_secs(60), || request("GET", "/") == 200),
        "the site serves on A:\n{}",
        a.log()
    );

    let blob = || {
        http(gw, "GET", "/blob", &[("Host", "ledger.localhost")], b"")
            .map(|(_, b)| b)
            .unwrap_or_default()
    };
    let blob_on_a = blob();
    assert_eq!(blob_on_a.len(), 64, "{blob_on_a}");

    // A writer that records every acknowledged write, a reader that counts
    // failed reads; the move happens under both.
    let stop = AtomicBool::new(false);
    let (acked, failed_writes, slowest, failed_reads, reads) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let (mut acked, mut failed, mut slowest) = (Vec::new(), 0, Duration::ZERO);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match request("POST", &format!("/{n}")) {
                    200 => acked.push(n),
                    _ => failed += 1,
                }
                slowest = slowest.max(t.elapsed());
                n += 1;
            }
            (acked, failed, slowest)
        });
        let reader = scope.spawn(|| {
            let (mut failed, mut reads) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                if request("GET", "/") != 200 {
                    failed += 1;
                }
                reads += 1;
            }
            (failed, reads)
        });
        std::thread::sleep(Duration::from_secs(1));
        // The operator moves it from the console.
        let (code, head, v) = console_post(
            &operator,
            server.port,
            "/console/placements/ledger/move",
            &format!("to={node_b}"),
        );
        let moved = code == 303
            && head.contains("/console/placements")
            && wait_for(Duration::from_secs(120), || {
                node_state(&admin, &node_b)["placed"] == json!(["ledger"])
            });
        std::thread::sleep(Duration::from_secs(1));
        // The load stops before anything is asserted: a failed assertion
        // must not leave the scope waiting for its threads.
        stop.store(true, Ordering::Relaxed);
        assert_eq!(code, 303, "{v}");
        assert!(moved, "the site moved to B:\n{}\n{}", a.log(), b.log());
        let (acked, failed_writes, slowest) = writer.join().unwrap();
        let (failed_reads, reads) = reader.join().unwrap();
        (acked, failed_writes, slowest, failed_reads, reads)
    });
    eprintln!(
        "move under load: {} writes acknowledged, {failed_writes} refused, longest write {slowest:?}; {reads} reads, {failed_reads} failed",
        acked.len()
    );
    assert!(acked.len() > 10, "the writer wrote");
    assert_eq!(failed_reads, 0, "no read failed");
    assert_eq!(failed_writes, 0, "no write was refused: they waited");
    // Every acknowledged write is on B, which serves the site now.
    assert!(
        b.get("ledger").is_some_and(|(c, _)| c == 200),
        "B serves it"
    );
    let missing: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|n| request("GET", &format!("/has/{n}")) != 200)
        .collect();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
    // The PostgreSQL database came too: B's own holds every acknowledged
    // write, A's stays as it was until the move is confirmed.
    let mut on_b_db = pg("globex_ledger_pg");
    // Updates and sequences came as they were: the counter counts the
    // rows, the sequence stands past every id it gave.
    let row = on_b_db
        .query_one(
            "SELECT (SELECT total FROM c WHERE id = 1), (SELECT count(*) FROM w), \
             (SELECT last_value FROM log_id_seq), (SELECT coalesce(max(id), 0) FROM log)",
            &[],
        )
        .unwrap();
    let (total, rows, seq, max_id): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(total, rows, "the counter's updates all came");
    assert!(
        seq >= max_id,
        "the sequence ({seq}) stands past every id ({max_id})"
    );
    // Nothing of the following stays on the source's server: a slot left
    // there would keep its WAL forever.
    let slots: i64 = admin_db
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE database = 'acme_ledger_pg'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "the move's replication slot was dropped");
    let on_b: Vec<i64> = on_b_db
        .query("SELECT n FROM w ORDER BY n", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for n in &acked {
        assert!(
            on_b.binary_search(&(*n as i64)).is_ok(),
            "write {n} is not in B's database"
        );
    }
    // The volume came too; the copy was built while A served (increment 0),
    // and completed by an increment after the freeze.
    assert_eq!(blob(), blob_on_a, "the volume's file moved intact");
    let (log_a, log_b) = (a.log(), b.log());
    assert!(log_b.contains("increment 0 applied"), "{log_b}");
    // The database went by its changes while A served, not as dumps.
    assert!(log_b.contains("pg: base loaded"), "{log_b}");
    assert!(log_b.contains("changes applied"), "{log_b}");
    assert!(log_a.contains("database changes"), "{log_a}");
    assert!(!log_a.contains("dumped pg"), "{log_a}");
    assert!(
        log_a.contains("increment 1 shipped for"),
        "a last increment after the live one:\n{log_a}"
    );
    assert!(log_b.contains("restored from its copy"), "{log_b}");
    // A keeps its copy, stopped, until the operator confirms the move.
    assert!(a.get("ledger").is_none(), "A no longer serves it");
    assert_eq!(node_state(&admin, &node_a)["kept"], json!(["ledger"]));
    let listed = || a.cmd(&["list", "--json"]).output().unwrap().stdout;
    assert!(String::from_utf8_lossy(&listed()).contains("ledger"));
    let r = s.ok(&["move", "ledger", "--confirm"]);
    assert!(r.stderr().contains(&node_a), "{}", r.all());
    assert!(
        wait_for(Duration::from_secs(30), || !String::from_utf8_lossy(
            &listed()
        )
        .contains("\"ledger\"")),
        "A removed its copy:\n{}",
        a.log()
    );
    assert_eq!(node_state(&admin, &node_a)["kept"], json!([]));
}

/// Two control-plane instances (two data directories, as on two machines)
/// sharing one PostgreSQL share their nodes: a token made on one joins on
/// the other, a site placed through either reaches its node whichever
/// instance the node calls, placements through both never overcommit, each
/// instance sees the sites every node reports, and a node gone silent is
/// lost for both. The nodes are `commons agent simulate`'s, one calling
/// each instance.
#[test]
fn control_planes_sharing_a_database_share_their_nodes() {
    let url = std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let schema = format!("nodes_instances_{}", std::process::id());
    let (a, b) = (
        Sandbox::new("agents-shared-a"),
        Sandbox::new("agents-shared-b"),
    );
    a.share_keys(&b);
    let mut env = AGENT_ENV.to_vec();
    env.extend([
        ("COMMONS_DATABASE_URL", url.as_str()),
        ("COMMONS_DATABASE_SCHEMA", schema.as_str()),
    ]);
    let server_a = a.serve(&env);
    let admin_a = admin(&a, &server_a);
    signup(server_a.port, "operator@example.org", "Operator");
    signup(server_a.port, "acme@example.org", "Acme");
    let acme = login(server_a.port, "acme@example.org", true);
    // With the DataCommons key a made.
    a.share_keys(&b);
    let server_b = b.serve(&env);
    // The administrator's token is one of the platform's, good on both.
    let token = std::fs::read_to_string(a.home.join("secrets/admin.token")).unwrap();
    let admin_b = Api::token(server_b.port, token.trim());
    let agents = |s: &Server| format!("https://127.0.0.1:{}", s.agents.unwrap());

    // Two nodes of 2000 m CPU on tokens made on a: the first calls a, the
    // second b.
    let tokens = a.write(
        "tokens",
        &format!(
            "{}\n{}\n",
            join_token(&acme, "acme", 600),
            join_token(&acme, "acme", 600)
        ),
    );
    let mut fleet = a
        .cmd(&["agent", "simulate", "--control-plane", &agents(&server_a)])
        .args([
            "--control-plane",
            &agents(&server_b),
            "--cpu-millis",
            "2000",
        ])
        .arg("--tokens")
        .arg(&tokens)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let nodes = |admin: &Api| -> Vec<Value> {
        let (code, v) = admin.get("/api/nodes");
        assert_eq!(code, 200, "{v}");
        v["items"].as_array().unwrap().clone()
    };
    for admin in [&admin_a, &admin_b] {
        assert!(
            wait_for(Duration::from_secs(20), || nodes(admin)
                .iter()
                .filter(|n| n["state"] == "ready")
                .count()
                == 2),
            "both instances know both nodes: {:?}",
            nodes(admin)
        );
    }

    // Four sites of 1000 m, placed through a and b in turn: two fit on
    // each node, and a fifth fits nowhere, whichever instance is asked.
    for i in 0..4 {
        let admin = if i % 2 == 0 { &admin_a } else { &admin_b };
        let (code, v) = admin.post(
            "/api/placements",
            json!({ "site": format!("s{i}"), "blueprint": SITE,
                    "needs": { "cpu_millis": 1000, "memory_bytes": 0, "disk_bytes": 0 } }),
        );
        assert_eq!(code, 200, "{v}");
        assert!(!v["node"].is_null(), "s{i} has room: {v}");
    }
    for admin in [&admin_a, &admin_b] {
        let (code, v) = admin.post(
            "/api/placements",
            json!({ "site": "s-more", "blueprint": SITE,
                    "needs": { "cpu_millis": 1000, "memory_bytes": 0, "disk_bytes": 0 } }),
        );
        assert_eq!(code, 200, "{v}");
        assert!(v["node"].is_null(), "no room is left: {v}");
    }
    // Each node took its two sites, whichever instance placed them and
    // whichever it calls, and both instances see them running there.
    for admin in [&admin_a, &admin_b] {
        assert!(
            wait_for(Duration::from_secs(20), || nodes(admin).iter().all(|n| {
                n["placed"].as_array().unwrap().len() == 2
                    && n["sites"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .filter(|s| s["state"] == "running")
                        .count()
                        == 2
            })),
            "{:?}",
            nodes(admin)
        );
    }

    // The fleet goes silent: both instances find both nodes lost.
    let _ = fleet.kill();
    let _ = fleet.wait();
    for admin in [&admin_a, &admin_b] {
        assert!(
            wait_for(Duration::from_secs(20), || nodes(admin)
                .iter()
                .all(|n| n["state"] == "lost")),
            "{:?}",
            nodes(admin)
        );
    }
    drop((server_a, server_b));
    common::drop_platform_schemas(&url, &schema);
}
