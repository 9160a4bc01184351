//! `commons login URL`: the same CLI driving a platform elsewhere through
//! its REST API — deploying a blueprint with the files it needs, following
//! the deploy, status, list, plan, history, logs, backup, destroy — and
//! nobody reaching another organisation's sites from it.

mod common;
use common::*;
use std::io::Write;
use std::time::Duration;

use serde_json::{json, Value};

const PASSWORD: &str = "a long enough password";

fn signup(port: u16, email: &str, name: &str) {
    let body = json!({ "email": email, "name": name, "password": PASSWORD }).to_string();
    let (code, text) = http(
        port,
        "POST",
        "/api/signup",
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .unwrap();
    assert_eq!(code, 201, "{text}");
}

/// Runs `commons ARGS` in `s` with `input` on standard input.
fn with_stdin(s: &Sandbox, args: &[&str], input: &str) -> Run {
    let mut child = s
        .cmd(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A command that refuses its arguments exits without reading its input.
    match child.stdin.take().unwrap().write_all(input.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("{e}"),
        _ => {}
    }
    Run(child.wait_with_output().unwrap())
}

/// A site with a static directory: deploying it elsewhere needs its files.
const SITE: &str = r#"name: rweb
inputs:
  motd: { type: string, default: "first" }
components:
  assets:
    static: ./public
  web:
    process: "printf '%s' '${inputs.motd}' > $COMMONS_DATA_DIR/motd && python3 -m http.server --bind 127.0.0.1 --directory ${components.assets.path} $PORT"
    health: { http: "/" }
"#;

#[test]
fn the_cli_drives_a_remote_platform_after_login() {
    let platform = Sandbox::new("remote-platform");
    let server = platform.serve(&[]);
    let url = format!("http://127.0.0.1:{}", server.port);
    signup(server.port, "ann@example.org", "Ann");
    signup(server.port, "bob@example.org", "Bob");

    // Ann's laptop: a data directory of its own, with the blueprint.
    let ann = Sandbox::new("remote-ann");
    ann.blueprint(SITE);
    ann.write(
        "public/index.html",
        "<h1>served from an uploaded file</h1>\n",
    );

    // Passwords only to loopback over plain HTTP; a wrong one is refused.
    let r = with_stdin(
        &ann,
        &[
            "login",
            "http://commons.example.org",
            "--email",
            "ann@example.org",
        ],
        &format!("{PASSWORD}\n"),
    );
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.stderr().contains("plain HTTP"), "{}", r.all());
    let r = with_stdin(
        &ann,
        &["login", &url, "--email", "ann@example.org"],
        "not the password\n",
    );
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.stderr().contains("refused"), "{}", r.all());
    assert!(!ann.home.join("remote.json").exists());

    // Email and password on standard input, one line each.
    let r = with_stdin(
        &ann,
        &["login", &url],
        &format!("ann@example.org\n{PASSWORD}\n"),
    );
    assert_eq!(r.code(), 0, "{}", r.all());
    assert!(r.stderr().contains("Logged in"), "{}", r.all());
    assert!(r.stderr().contains("\"ann\""), "{}", r.all());
    // Only a token is kept, readable by its owner alone.
    let kept = std::fs::read_to_string(ann.home.join("remote.json")).unwrap();
    assert!(!kept.contains(PASSWORD), "{kept}");
    let kept: Value = serde_json::from_str(&kept).unwrap();
    let token = kept["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("cmnu_"), "{kept}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(ann.home.join("remote.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "remote.json is mode {mode:o}");

    // The remote's catalog.
    let catalog = ann.ok(&["catalog", "--json"]).json();
    assert!(
        catalog
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "datasette"),
        "{catalog}"
    );

    // A mistake in the blueprint shows with this machine's file and line.
    ann.write(
        "broken/commons.yaml",
        "name: broken\ncomponents:\n  web:\n    proces: x\n",
    );
    let r = ann.run(&["plan", "broken"]);
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.stderr().contains("commons.yaml:4"), "{}", r.all());

    // Plan, then deploy: the blueprint and its static files travel; the CLI
    // follows the deploy to its end.
    let plan = ann.ok(&["plan", "--json"]).json();
    assert_eq!(plan["deployment"], "rweb", "{plan}");
    let r = ann.ok(&["deploy"]);
    assert!(r.stderr().contains("Deployed rweb"), "{}", r.all());
    let status = ann.ok(&["status", "rweb", "--json"]).json();
    let web = status["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "web")
        .cloned()
        .unwrap();
    assert_eq!(web["state"], "running", "{status}");
    // It is the platform's site, served by its gateway (once its routes
    // are reloaded), from the uploaded file.
    let get = || http(server.http, "GET", "/", &[("Host", "rweb.localhost")], b"").unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || get().0 == 200),
        "{:?}",
        get()
    );
    let (_, page) = get();
    assert!(page.contains("served from an uploaded file"), "{page}");
    // Not on Ann's machine.
    assert!(!ann.has_local_state());

    let list = ann.ok(&["list", "--json"]).json();
    assert_eq!(list[0]["name"], "rweb", "{list}");
    assert_eq!(list[0]["org"], "ann", "{list}");

    // Deploying again with another input: a second revision, and its diff.
    let r = ann.ok(&["deploy", "-i", "motd=second"]);
    assert!(r.stderr().contains("Deployed rweb"), "{}", r.all());
    let history = ann.ok(&["history", "rweb", "--json"]).json();
    assert_eq!(history.as_array().unwrap().len(), 2, "{history}");
    let diff = ann.ok(&["history", "rweb", "--diff", "1", "2"]).stdout();
    assert!(diff.contains("second"), "{diff}");
    // What the site printed: the gateway's request above.
    assert_eq!(get().0, 200);
    assert!(
        wait_for(Duration::from_secs(5), || ann
            .ok(&["logs", "rweb", "web"])
            .stdout()
            .contains("GET / HTTP/1.1")),
        "{}",
        ann.ok(&["logs", "rweb"]).all()
    );
    // Following: what the site prints later shows up as it is printed.
    let mut follow = ann
        .cmd(&["logs", "rweb", "web", "-f", "-n", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    std::thread::sleep(Duration::from_millis(800));
    let (code, _) = http(
        server.http,
        "GET",
        "/followed",
        &[("Host", "rweb.localhost")],
        b"",
    )
    .unwrap();
    assert_eq!(code, 404);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("GET /followed")) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("`logs -f` did not show the new request: {seen:?}"),
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();

    let backup = ann.ok(&["backup", "rweb", "--json"]).json();
    assert_eq!(backup["sha256"].as_str().unwrap().len(), 64, "{backup}");
    assert!(platform
        .home
        .join(format!(
            "archive/{}.tar",
            backup["sha256"].as_str().unwrap()
        ))
        .exists());

    // Commands about this machine's deployments say why they do not apply.
    let r = ann.run(&["wake", "rweb"]);
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.stderr().contains("commons logout"), "{}", r.all());

    // Bob, logged in from elsewhere, neither sees nor removes Ann's site.
    let bob = Sandbox::new("remote-bob");
    let r = with_stdin(
        &bob,
        &["login", &url, "--email", "bob@example.org", "--json"],
        &format!("{PASSWORD}\n"),
    );
    assert_eq!(r.code(), 0, "{}", r.all());
    assert_eq!(r.json()["org"], "bob", "{}", r.all());
    let r = bob.run(&["status", "rweb"]);
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.stderr().contains("no site"), "{}", r.all());
    let r = bob.run(&["destroy", "rweb"]);
    assert_eq!(r.code(), 2, "{}", r.all());
    assert_eq!(bob.ok(&["list", "--json"]).json(), json!([]));
    // Names are global (they are host names), so taking it is refused.
    let r = bob.run(&["deploy", "catalog:datasette", "--name", "rweb"]);
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(
        r.stderr().contains("exists; choose another name"),
        "{}",
        r.all()
    );
    // ...nor deploys into Ann's organisation.
    let r = with_stdin(
        &bob,
        &["login", &url, "--email", "bob@example.org", "--org", "ann"],
        &format!("{PASSWORD}\n"),
    );
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.stderr().contains("not a member"), "{}", r.all());
    assert_eq!(get().0, 200, "Ann's site still serves");

    // Uploaded files stay inside the site's upload directory.
    for bad in ["../escape", "/tmp/escape", "a/../../escape", ""] {
        let body = json!({ "name": "evil", "source": {
            "root": "commons.yaml",
            "files": { "commons.yaml": "eA==", bad: "eA==" } } });
        let (code, text) = http(
            server.port,
            "POST",
            "/api/orgs/ann/sites",
            &[
                ("Authorization", &format!("Bearer {token}")),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
        .unwrap();
        assert_eq!(code, 422, "{bad:?}: {text}");
        assert!(text.contains("not a relative path"), "{text}");
    }
    assert!(!platform.home.join("uploads/escape").exists());
    assert!(!platform.home.join("escape").exists());

    // Destroy, then log out: the token is revoked, commands act locally.
    let r = ann.ok(&["destroy", "rweb"]);
    assert!(r.stderr().contains("Destroyed rweb"), "{}", r.all());
    assert_eq!(ann.ok(&["list", "--json"]).json(), json!([]));
    let r = ann.ok(&["logout"]);
    assert!(r.stderr().contains("Logged out"), "{}", r.all());
    assert!(!ann.home.join("remote.json").exists());
    let (code, _) = http(
        server.port,
        "GET",
        "/api/me",
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    )
    .unwrap();
    assert_eq!(code, 401, "the CLI's token is revoked at logout");
    let r = ann.ok(&["list", "--json"]);
    assert_eq!(r.json(), json!([]));
    assert!(ann.has_local_state(), "list acted locally");

    // A token from elsewhere works too, and logout leaves it alone.
    let r = with_stdin(
        &bob,
        &["login", &url, "--token-stdin"],
        "cmnu_not-a-token\n",
    );
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.stderr().contains("login"), "{}", r.all());
}
