//! `image:` components end to end (as root, with real runc and a real
//! registry on loopback): an image built here from a static busybox is
//! pushed, deployed as a site, served through the gateway from its own
//! network, restarted by the supervisor after `kill -9` of its process,
//! and gone with its site.

mod common;

use std::time::Duration;

use common::*;
use commons_images::testing::{busybox_layer, push_with, scratch, start_registry};

fn root() {
    assert!(
        is_root(),
        "image components run under runc, sandboxed: run the tests as root"
    );
}

/// The pids of processes whose command line contains `needle`.
fn pids_of(needle: &str) -> Vec<i32> {
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
    port: 8080
    volumes: {{ /var/files: "${{components.files.path}}" }}
    health: {{ http: "/" }}
    resources: {{ memory: 64Mi, pids: 32 }}
"#,
            port = registry.port
        ),
    );
    let mut deploy = s.cmd(&["deploy", "www"]);
    for (k, v) in env {
        deploy.env(k, v);
    }
    let r = Run(deploy.output().unwrap());
    assert_eq!(r.code(), 0, "{}", r.all());
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
    let httpd = pids_of("httpd -f -p 8080");
    assert_eq!(httpd.len(), 1, "one container process: {httpd:?}");
    assert_eq!(uid_of(httpd[0] as i64), web["uid"].as_u64().unwrap() as u32);

    // kill -9 of the container's process: the supervisor starts it again.
    // SAFETY: kill with a pid read from /proc and a constant signal.
    assert_eq!(unsafe { libc::kill(httpd[0], libc::SIGKILL) }, 0);
    assert!(
        wait_for(Duration::from_secs(20), || {
            let again = pids_of("httpd -f -p 8080");
            !again.is_empty() && !again.contains(&httpd[0]) && through_gateway().0 == 200
        }),
        "restarted: {}",
        s.component("www", "web")
    );
    assert!(s.component("www", "web")["restarts"].as_u64().unwrap() >= 1);

    // Destroyed: no container, no network.
    let mut destroy = s.cmd(&["destroy", "www"]);
    for (k, v) in env {
        destroy.env(k, v);
    }
    let r = Run(destroy.output().unwrap());
    assert_eq!(r.code(), 0, "{}", r.all());
    assert!(wait_for(Duration::from_secs(10), || pids_of(
        "httpd -f -p 8080"
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
    let run = |args: &[&str]| {
        let mut c = s.cmd(args);
        for (k, v) in env {
            c.env(k, v);
        }
        Run(c.output().unwrap())
    };
    let r = run(&["deploy", "hog"]);
    assert_eq!(r.code(), 0, "{}", r.all());
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
    let r = run(&["destroy", "hog"]);
    assert_eq!(r.code(), 0, "{}", r.all());
    let _ = std::fs::remove_dir_all(&dir);
}
