//! `image:` components end to end (as root, with real runc and a real
//! registry on loopback): an image built here from a static busybox is
//! pushed, deployed as a site, served through the gateway from its own
//! network, restarted by the supervisor after `kill -9` of its process,
//! and gone with its site.

mod common;

use std::time::Duration;

use common::*;
use commons_images::testing::{busybox_layer, host_layer, push_with, scratch, start_registry};

fn root() {
    assert!(
        is_root(),
        "image components run under runc, sandboxed: run the tests as root"
    );
}

/// The pids of processes whose command line contains `needle`, leaving out
/// those whose parent is one of them too: busybox's httpd forks a child with
/// its own command line for each connection (a health check, a request).
fn pids_of(needle: &str) -> Vec<i32> {
    let all = matching_pids(needle);
    all.iter()
        .copied()
        .filter(|pid| !parent_of(*pid).is_some_and(|parent| all.contains(&parent)))
        .collect()
}

/// The parent of `pid`, from `/proc/PID/stat` (the field after the command's
/// parenthesised name and the state).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// Every process whose command line contains `needle`.
fn matching_pids(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// `commons ARGS` in `s` with `env` set; it must succeed.
fn ok_with(s: &Sandbox, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut c = s.cmd(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let r = Run(c.output().unwrap());
    assert_eq!(r.code(), 0, "{args:?}: {}", r.all());
    r
}

#[test]
fn an_image_site_is_served_restarted_and_removed() {
    root();
    let dir = scratch("image-site");
    let registry = start_registry(&dir);
    let app = busybox_layer(&[
        ("srv/www", None),
        ("srv/www/index.html", Some(b"served from an image")),
    ]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(push_with(
        registry.port,
        "apps/www:1.0",
        &[app],
        serde_json::json!({
            "Cmd": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/srv/www"],
            "Env": ["PATH=/bin"],
        }),
    ));
    let insecure = format!("127.0.0.1:{}", registry.port);
    let env = [
        ("COMMONS_SANDBOX", "1"),
        ("COMMONS_INSECURE_REGISTRIES", insecure.as_str()),
    ];

    let s = Sandbox::new("image-site");
    let server = s.serve(&env);
    s.write(
        "www/commons.yaml",
        &format!(
            r#"name: www
components:
  files: {{ volume: {{}} }}
  web:
    image: 127.0.0.1:{port}/apps/www:1.0
    command: [/bin/busybox, httpd, -f, -p, "8080", -h, /srv/www, -r, served]
    port: 8080
    volumes: {{ /var/files: "${{components.files.path}}" }}
    health: {{ http: "/" }}
    resources: {{ memory: 64Mi, pids: 32 }}
"#,
            port = registry.port
        ),
    );
    let r = ok_with(&s, &env, &["deploy", "www"]);
    // The pull is shown (a line when it starts and one when it is done,
    // since this is no terminal), with the image's size.
    let said = r.all();
    assert!(
        said.contains("Pulling web (") && said.contains("Pulled web ("),
        "{said}"
    );
    let web = s.component("www", "web");
    assert_eq!(web["kind"], "image", "{web}");
    assert_eq!(web["state"], "running", "{web}");
    assert!(
        !component_addr(&web).ip().is_loopback(),
        "in its own network: {web}"
    );
    let through_gateway =
        || http(server.http, "GET", "/", &[("Host", "www.localhost")], b"").unwrap_or_default();
    let mut answer = (0, String::new());
    assert!(wait_for(Duration::from_secs(10), || {
        answer = through_gateway();
        answer.0 == 200
    }));
    assert_eq!(answer.1, "served from an image");

    // The app runs as the site's user, not root.
    let httpd = pids_of("httpd -f -p 8080 -h /srv/www -r served");
    assert_eq!(httpd.len(), 1, "one container process: {httpd:?}");
    assert_eq!(uid_of(httpd[0] as i64), web["uid"].as_u64().unwrap() as u32);

    // kill -9 of the container's process: the supervisor starts it again.
    // SAFETY: kill with a pid read from /proc and a constant signal.
    assert_eq!(unsafe { libc::kill(httpd[0], libc::SIGKILL) }, 0);
    assert!(
        wait_for(Duration::from_secs(20), || {
            let again = pids_of("httpd -f -p 8080 -h /srv/www -r served");
            !again.is_empty() && !again.contains(&httpd[0]) && through_gateway().0 == 200
        }),
        "restarted: {}",
        s.component("www", "web")
    );
    assert!(s.component("www", "web")["restarts"].as_u64().unwrap() >= 1);

    // The record pins the digest that ran: after the tag moved on, a clone
    // of the record runs the same bytes.
    let record = s.home.join("records/www");
    let pinned: serde_json::Value = serde_json::from_slice(
        &std::process::Command::new("git")
            .arg("-C")
            .arg(&record)
            .args(["show", "HEAD:images.json"])
            .output()
            .unwrap()
            .stdout,
    )
    .expect("the record has images.json");
    let by_digest = pinned["web"]["pinned"].as_str().unwrap().to_string();
    assert!(
        by_digest.starts_with(&format!("127.0.0.1:{}/apps/www@sha256:", registry.port)),
        "{pinned}"
    );
    runtime.block_on(push_with(
        registry.port,
        "apps/www:1.0",
        &[busybox_layer(&[
            ("srv/www", None),
            ("srv/www/index.html", Some(b"a newer image, same tag")),
        ])],
        serde_json::json!({
            "Cmd": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/srv/www"],
            "Env": ["PATH=/bin"],
        }),
    ));
    ok_with(
        &s,
        &env,
        &["clone", record.to_str().unwrap(), "--name", "www-copy"],
    );
    assert_eq!(
        component_get(&s.component("www-copy", "web"), "/").unwrap(),
        (200, "served from an image".to_string()),
        "the clone runs the recorded digest, not what the tag says now"
    );
    ok_with(&s, &env, &["destroy", "www-copy"]);

    // Destroyed: no container, no network.
    ok_with(&s, &env, &["destroy", "www"]);
    assert!(wait_for(Duration::from_secs(10), || pids_of(
        "httpd -f -p 8080 -h /srv/www -r served"
    )
    .is_empty()));
    assert_eq!(commons_runtime::net::site_index(&s.home, "www"), None);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_image_killed_for_its_memory_shows_as_oom() {
    root();
    let dir = scratch("image-oom");
    let registry = start_registry(&dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(push_with(
        registry.port,
        "apps/hog:1",
        &[busybox_layer(&[])],
        serde_json::json!({
            "Cmd": ["/bin/busybox", "sh", "-c",
                    "sleep 1; exec /bin/busybox dd if=/dev/zero of=/dev/null bs=256M count=1"],
            "Env": ["PATH=/bin"],
        }),
    ));
    let insecure = format!("127.0.0.1:{}", registry.port);
    let env = [
        ("COMMONS_SANDBOX", "1"),
        ("COMMONS_INSECURE_REGISTRIES", insecure.as_str()),
    ];
    let s = Sandbox::new("image-oom");
    s.write(
        "hog/commons.yaml",
        &format!(
            "name: hog\ncomponents:\n  web:\n    image: 127.0.0.1:{}/apps/hog:1\n    port: 8080\n    \
             resources: {{ memory: 64Mi }}\n",
            registry.port
        ),
    );
    ok_with(&s, &env, &["deploy", "hog"]);
    assert!(
        wait_for(Duration::from_secs(20), || s.component("hog", "web")
            ["state"]
            == "oom"),
        "{}",
        s.component("hog", "web")
    );
    let web = s.component("hog", "web");
    assert_eq!(web["last_exit"]["oom"], true, "{web}");
    assert!(
        web["last_exit"]["reason"]
            .as_str()
            .unwrap()
            .contains("out of memory: killed by the kernel over its limit of 64 MiB"),
        "{web}"
    );
    ok_with(&s, &env, &["destroy", "hog"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The namespaces of `site`'s image instances (`commons-N-S`).
fn instance_networks(s: &Sandbox, site: &str) -> Vec<String> {
    let index = commons_runtime::net::site_index(&s.home, site).unwrap();
    std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("commons-{index}-")))
        .collect()
}

/// A CGI script busybox httpd runs: the version the instance was given.
const VERSION_CGI: &[u8] =
    b"#!/bin/busybox sh\necho 'Content-Type: text/plain'\necho\necho \"www v$VERSION\"\n";

/// Pushes `apps/www:1.0`: busybox httpd serving `/srv/www` with a version
/// page at `/cgi-bin/v`; returns the registry's `host:port`.
fn push_www(runtime: &tokio::runtime::Runtime, port: u16) -> String {
    let app = busybox_layer(&[
        ("srv/www", None),
        ("srv/www/index.html", Some(b"served from an image")),
        ("srv/www/cgi-bin", None),
        ("srv/www/cgi-bin/v", Some(VERSION_CGI)),
    ]);
    runtime.block_on(push_with(
        port,
        "apps/www:1.0",
        &[app],
        serde_json::json!({
            "Cmd": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/srv/www"],
            "Env": ["PATH=/bin"],
        }),
    ));
    format!("127.0.0.1:{port}")
}

#[test]
fn twenty_redeploys_of_an_image_site_under_load_fail_no_request() {
    root();
    let dir = scratch("image-zero");
    let registry = start_registry(&dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let insecure = push_www(&runtime, registry.port);
    let env = [
        ("COMMONS_SANDBOX", "1"),
        ("COMMONS_INSECURE_REGISTRIES", insecure.as_str()),
    ];
    let s = Sandbox::new("image-zero");
    let server = s.serve(&env);
    s.write(
        "www/commons.yaml",
        &format!(
            r#"name: www
inputs:
  version: {{ type: string, default: "1" }}
components:
  web:
    image: {insecure}/apps/www:1.0
    command: [/bin/busybox, httpd, -f, -p, "8080", -h, /srv/www, -r, zero]
    port: 8080
    env: {{ VERSION: "${{inputs.version}}" }}
    health: {{ http: "/", interval: 20ms }}
"#
        ),
    );
    let deploy = |version: &str| {
        let input = format!("version={version}");
        ok_with(&s, &env, &["deploy", "www", "-i", &input]);
    };
    let version = || {
        http(
            server.http,
            "GET",
            "/cgi-bin/v",
            &[("Host", "www.localhost")],
            b"",
        )
        .unwrap_or_default()
    };
    deploy("1");
    assert!(wait_for(Duration::from_secs(10), || version().0 == 200));
    assert_eq!(version().1.trim(), "www v1");
    // One redeploy unloaded sizes the run.
    let t = std::time::Instant::now();
    deploy("2");
    let seconds = (t.elapsed().as_secs_f64() * 20.0 * 5.0).ceil() as u64 + 5;
    let mut load = Load::start(server.http, "www.localhost", seconds);
    std::thread::sleep(Duration::from_millis(500));
    let mut addresses = std::collections::HashSet::new();
    for v in 3..=22 {
        deploy(&v.to_string());
        let web = s.component("www", "web");
        assert_eq!(web["state"], "running", "{web}");
        addresses.insert(web["outputs"]["host"].as_str().unwrap().to_string());
    }
    assert!(load.running(), "the load ended before the redeploys did");
    let (requests, failures, summary) = load.finish();
    assert!(
        requests > 200,
        "too little load to prove anything:\n{summary}"
    );
    assert_eq!(failures, 0, "requests failed during redeploys:\n{summary}");
    // Each version ran beside the last, in a network of its own (two
    // addresses, taken in turn), and the replaced ones were stopped.
    assert_eq!(addresses.len(), 2, "{addresses:?}");
    assert_eq!(version().1.trim(), "www v22");
    // The last one replaced is killed as the deploy ends; on a loaded
    // machine its process may take a moment to be gone.
    let serving = || pids_of("httpd -f -p 8080 -h /srv/www -r zero").len();
    assert!(
        wait_for(Duration::from_secs(10), || serving() == 1),
        "replaced versions stop: {} still run",
        serving()
    );
    let instances = instance_networks(&s, "www");
    assert_eq!(
        instances.len(),
        1,
        "replaced instances' networks go: {instances:?}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_image_site_with_a_volume_is_backed_up_destroyed_and_restored() {
    root();
    let dir = scratch("image-backup");
    let registry = start_registry(&dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let notes = busybox_layer(&[]);
    // The app writes a note of its own into its volume on its first start
    // (a new one each time it finds none) and serves it.
    runtime.block_on(push_with(
        registry.port,
        "apps/notes:1",
        &[notes],
        serde_json::json!({
            "Cmd": ["/bin/busybox", "sh", "-c",
                    "[ -f /var/notes/index.html ] || echo \"note $(cat /proc/sys/kernel/random/uuid)\" > /var/notes/index.html; \
                     exec httpd -f -p 8080 -h /var/notes"],
            "Env": ["PATH=/bin"],
        }),
    ));
    let insecure = format!("127.0.0.1:{}", registry.port);
    let env = [
        ("COMMONS_SANDBOX", "1"),
        ("COMMONS_INSECURE_REGISTRIES", insecure.as_str()),
    ];
    let s = Sandbox::new("image-backup");
    s.write(
        "notes/commons.yaml",
        &format!(
            r#"name: notes
components:
  files: {{ volume: {{}} }}
  web:
    image: {insecure}/apps/notes:1
    port: 8080
    volumes: {{ /var/notes: "${{components.files.path}}" }}
    health: {{ http: "/" }}
"#
        ),
    );
    let run = |args: &[&str]| ok_with(&s, &env, args);
    run(&["deploy", "notes"]);
    let files = s.component("notes", "files");
    let volume = std::path::PathBuf::from(files["outputs"]["path"].as_str().unwrap());
    let web = s.component("notes", "web");
    let (code, note) = component_get(&web, "/").unwrap();
    assert_eq!(code, 200, "{note}");
    assert!(note.starts_with("note "), "{note}");
    assert_eq!(
        std::fs::read_to_string(volume.join("index.html")).unwrap(),
        note,
        "written by the app into its volume"
    );
    let backup = run(&["backup", "notes", "--json"]).json();
    let archive = backup["path"].as_str().unwrap().to_string();
    run(&["destroy", "notes"]);
    assert!(!volume.exists(), "destroyed with its site");
    assert!(pids_of("-h /var/notes").is_empty());

    run(&["restore", &archive]);
    let web = s.component("notes", "web");
    assert_eq!(web["kind"], "image", "{web}");
    assert_eq!(web["state"], "running", "{web}");
    assert_eq!(
        component_get(&web, "/").unwrap(),
        (200, note),
        "the app found its note again: restored from the archive into its volume"
    );
    run(&["destroy", "notes"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Deploys `catalog:NAME`, whose image is pulled through a mirror on
/// loopback (`docker.io` → the test's registry, where `build` pushed an
/// image of the same name); returns the platform in front of it and a
/// signed-in user's cookie.
fn catalog_site(s: &Sandbox, name: &str, registry: u16) -> (Server, String) {
    let at = format!("127.0.0.1:{registry}");
    let mirror = format!("docker.io={at}");
    let env = [
        ("COMMONS_SANDBOX", "1"),
        ("COMMONS_INSECURE_REGISTRIES", at.as_str()),
        ("COMMONS_REGISTRY_MIRRORS", mirror.as_str()),
    ];
    ok_with(s, &env, &["deploy", &format!("catalog:{name}")]);
    let web = s.component(name, "web");
    assert_eq!(
        (&web["kind"], &web["state"]),
        (&"image".into(), &"running".into()),
        "{web}"
    );
    let token = s
        .ok(&["token", "create", "alice", "--scope", "session"])
        .stdout()
        .trim()
        .to_string();
    (s.serve(&env), format!("commons_session={token}"))
}

#[test]
fn catalog_apps_run_from_their_images() {
    root();
    let dir = scratch("image-catalog");
    let registry = start_registry(&dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The images their projects publish, built here from Debian's packages
    // of the same programs (this machine reaches no image registry): the
    // same names, entrypoints and paths.
    runtime.block_on(push_with(
        registry.port,
        "rclone/rclone:1.60",
        &[host_layer(
            &[("/usr/bin/rclone", "/usr/local/bin/rclone")],
            &[("data", None)],
        )],
        serde_json::json!({
            "Entrypoint": ["rclone"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/data",
        }),
    ));
    let config = b"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: prometheus\n    static_configs:\n      - targets: [\"localhost:9090\"]\n";
    runtime.block_on(push_with(
        registry.port,
        "prom/prometheus:v2.42.0",
        &[host_layer(
            &[("/usr/bin/prometheus", "/bin/prometheus")],
            &[("etc/prometheus", None), ("etc/prometheus/prometheus.yml", Some(config)), ("prometheus", None)],
        )],
        serde_json::json!({
            "Entrypoint": ["/bin/prometheus"],
            "Cmd": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"],
        }),
    ));

    // rclone: a file PUT over WebDAV by a signed-in user is read back, and
    // kept in the site's volume; nobody else gets in.
    let s = Sandbox::new("image-catalog");
    let (server, cookie) = catalog_site(&s, "rclone", registry.port);
    let host = ("Host", "rclone.localhost");
    let signed_in = [host, ("Cookie", cookie.as_str())];
    let (code, _) = http(server.http, "GET", "/", &[host], b"").unwrap();
    assert_eq!(code, 401, "anonymous users are turned away");
    let (code, body) = http(
        server.http,
        "PUT",
        "/notes.txt",
        &signed_in,
        b"kept by rclone",
    )
    .unwrap();
    assert!((200..300).contains(&code), "{code} {body}");
    let (code, body) = http(server.http, "GET", "/notes.txt", &signed_in, b"").unwrap();
    assert_eq!((code, body.as_str()), (200, "kept by rclone"));
    let volume = s.component("rclone", "files")["outputs"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        std::fs::read_to_string(std::path::Path::new(&volume).join("notes.txt")).unwrap(),
        "kept by rclone"
    );
    let (code, listing) = http(
        server.http,
        "PROPFIND",
        "/",
        &[host, ("Cookie", cookie.as_str()), ("Depth", "1")],
        b"",
    )
    .unwrap();
    assert_eq!(code, 207, "{listing}");
    assert!(listing.contains("notes.txt"), "{listing}");
    drop(server);

    // Prometheus: it scrapes itself, and its API answers a query.
    let (server, cookie) = catalog_site(&s, "prometheus", registry.port);
    let signed_in = [
        ("Host", "prometheus.localhost"),
        ("Cookie", cookie.as_str()),
    ];
    let mut answer = (0, String::new());
    assert!(
        wait_for(Duration::from_secs(30), || {
            answer = http(
                server.http,
                "GET",
                "/api/v1/query?query=up",
                &signed_in,
                b"",
            )
            .unwrap_or_default();
            answer.0 == 200 && answer.1.contains(r#""value":["#) && answer.1.contains(r#","1"]"#)
        }),
        "{answer:?}"
    );
    assert!(answer.1.contains(r#""job":"prometheus""#), "{answer:?}");
    let tsdb = s.component("prometheus", "tsdb")["outputs"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        std::fs::read_dir(&tsdb).unwrap().count() > 0,
        "its database is in the site's volume"
    );
    for site in ["rclone", "prometheus"] {
        ok_with(&s, &[("COMMONS_SANDBOX", "1")], &["destroy", site]);
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_idle_image_site_wakes_on_a_request_with_the_bytes_it_ran() {
    root();
    let dir = scratch("image-wake");
    let registry = start_registry(&dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let insecure = push_www(&runtime, registry.port);
    let env = [
        ("COMMONS_SANDBOX", "1"),
        ("COMMONS_INSECURE_REGISTRIES", insecure.as_str()),
    ];
    let s = Sandbox::new("image-wake");
    s.write(
        "www/commons.yaml",
        &format!(
            "name: www\ncomponents:\n  web:\n    image: {insecure}/apps/www:1.0\n    command: [/bin/busybox, httpd, -f, -p, \"8080\", -h, /srv/www, -r, wake]\n    port: 8080\n    \
             health: {{ http: \"/\" }}\n"
        ),
    );
    ok_with(&s, &env, &["deploy", "www"]);
    let idle_env = [env[0], env[1], ("COMMONS_IDLE_AFTER", "1")];
    let server = s.serve(&idle_env);
    assert!(
        wait_for(Duration::from_secs(15), || s.component("www", "web")
            ["state"]
            == "idle"),
        "not idle: {}",
        s.component("www", "web")
    );
    // Idle: nothing runs, and the instance's network is gone.
    assert!(pids_of("httpd -f -p 8080 -h /srv/www -r wake").is_empty());
    let index = commons_runtime::net::site_index(&s.home, "www").unwrap();
    assert!(!std::path::Path::new(&format!("/run/netns/commons-{index}-0")).exists());
    // The tag moves on meanwhile; the wake runs what ran.
    runtime.block_on(push_with(
        registry.port,
        "apps/www:1.0",
        &[busybox_layer(&[
            ("srv/www", None),
            ("srv/www/index.html", Some(b"a newer image, same tag")),
        ])],
        serde_json::json!({
            "Cmd": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/srv/www"],
            "Env": ["PATH=/bin"],
        }),
    ));
    let t = std::time::Instant::now();
    let (code, _, body) =
        http_with_head(server.http, "GET", "/", &[("Host", "www.localhost")], b"").unwrap();
    assert_eq!(
        (code, body.as_str()),
        (200, "served from an image"),
        "held until the same image is up again"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(s.component("www", "web")["state"], "running");
    drop(server);
    ok_with(&s, &[("COMMONS_SANDBOX", "1")], &["destroy", "www"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_interrupted_image_deploy_leaves_no_container_or_network() {
    root();
    let dir = scratch("image-interrupted");
    let registry = start_registry(&dir);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let insecure = push_www(&runtime, registry.port);
    let s = Sandbox::new("image-interrupted");
    // A health check that never passes keeps the deploy waiting with its
    // container up, until the deploy is killed.
    let blueprint = |health: &str| {
        s.write(
            "www/commons.yaml",
            &format!(
                "name: www\ncomponents:\n  web:\n    image: {insecure}/apps/www:1.0\n    command: [/bin/busybox, httpd, -f, -p, \"8080\", -h, /srv/www, -r, interrupted]\n    port: 8080\n    \
                 health: {{ http: \"{health}\", timeout: 60s }}\n"
            ),
        );
    };
    let deploy = || {
        let mut c = s.cmd(&["deploy", "www"]);
        c.env("COMMONS_SANDBOX", "1")
            .env("COMMONS_INSECURE_REGISTRIES", &insecure);
        c
    };
    blueprint("/never-there");
    let mut child = deploy()
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || pids_of(
            "httpd -f -p 8080 -h /srv/www -r interrupted"
        )
        .len()
            == 1),
        "the container never started"
    );
    child.kill().unwrap(); // SIGKILL: nothing of the deploy cleans up
    child.wait().unwrap();
    let instances = || instance_networks(&s, "www");
    assert_eq!(instances().len(), 1, "{:?}", instances());
    let orphan = pids_of("httpd -f -p 8080 -h /srv/www -r interrupted");

    // The next deploy finds the leftovers from the instance it recorded.
    blueprint("/");
    let env = [
        ("COMMONS_SANDBOX", "1"),
        ("COMMONS_INSECURE_REGISTRIES", insecure.as_str()),
    ];
    ok_with(&s, &env, &["deploy", "www"]);
    let now = pids_of("httpd -f -p 8080 -h /srv/www -r interrupted");
    assert_eq!(now.len(), 1, "one container: {now:?}");
    assert_ne!(now, orphan, "the interrupted one was stopped");
    assert_eq!(
        instances().len(),
        1,
        "its network went with it: {:?}",
        instances()
    );
    ok_with(&s, &[("COMMONS_SANDBOX", "1")], &["destroy", "www"]);
    let _ = std::fs::remove_dir_all(&dir);
}
