//! Sandboxed workloads (COMMONS_SANDBOX=1, as root): one site cannot read
//! another's data, signal or even see its processes, and memory limits hold.

mod common;

use common::*;

fn sandboxed(s: &Sandbox, args: &[&str]) -> Run {
    // A platform credential in the platform's environment must not reach workloads.
    Run(s
        .cmd(args)
        .env("COMMONS_SANDBOX", "1")
        .env("COMMONS_STRIPE_WEBHOOK_SECRET", "whsec_platform_only")
        .output()
        .unwrap())
}

fn root() {
    assert!(
        is_root(),
        "sandboxing needs root (a user of its own per site, namespaces, cgroups); run the tests as root"
    );
}

#[test]
fn sites_cannot_reach_each_other() {
    root();
    let s = Sandbox::new("sandbox");
    s.write(
        "b/commons.yaml",
        r#"name: siteb
components:
  secret: { job: "echo b-private > $COMMONS_DATA_DIR/secret" }
  web:
    process: "python3 -m http.server --bind 127.0.0.1 --directory $COMMONS_DATA_DIR $PORT"
    after: [secret]
    health: { http: "/" }
"#,
    );
    let b = sandboxed(&s, &["deploy", "b"]);
    assert_eq!(b.code(), 0, "{}", b.all());
    let web = s.component("siteb", "web");
    let b_pid = web["pid"].as_i64().unwrap();
    let b_data = s.home.join("deployments/siteb/data");
    s.write(
        "a/commons.yaml",
        r#"name: sitea
inputs:
  bdata: { type: string }
  bpid: { type: string }
components:
  probe:
    job: >-
      { cat ${inputs.bdata}/secret 2>/dev/null && echo READ || echo denied; } > $COMMONS_DATA_DIR/read;
      { kill -0 ${inputs.bpid} 2>/dev/null && echo SIGNALLED || echo denied; } > $COMMONS_DATA_DIR/kill;
      { test -e /proc/${inputs.bpid} && echo SEEN || echo hidden; } > $COMMONS_DATA_DIR/proc;
      ls /proc | grep -c '^[0-9]' > $COMMONS_DATA_DIR/procs;
      id -u > $COMMONS_DATA_DIR/uid;
      { echo ${inputs.bpid} > $COMMONS_DATA_DIR/../uid 2>/dev/null && echo CHANGED || echo denied; } > $COMMONS_DATA_DIR/own-uid;
      touch /tmp/a-was-here; ls /tmp > $COMMONS_DATA_DIR/tmp;
      env > $COMMONS_DATA_DIR/env
"#,
    );
    let bdata = format!("bdata={}", b_data.display());
    let bpid = format!("bpid={b_pid}");
    let a = sandboxed(&s, &["deploy", "a", "-i", &bdata, "-i", &bpid]);
    assert_eq!(a.code(), 0, "{}", a.all());
    let seen = |f: &str| {
        std::fs::read_to_string(s.home.join("deployments/sitea/data").join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(seen("read"), "denied", "site A read site B's data");
    assert_eq!(
        seen("kill"),
        "denied",
        "site A could signal site B's process"
    );
    assert_eq!(seen("proc"), "hidden", "site A saw site B's process");
    assert_eq!(
        seen("own-uid"),
        "denied",
        "site A rewrote the record of which user it runs as"
    );
    assert!(
        seen("procs").parse::<u32>().unwrap() < 10,
        "A sees only its own few processes: {}",
        seen("procs")
    );
    let a_uid: u32 = seen("uid").parse().unwrap();
    // The workload is the member of B's process group that runs as B's user.
    let b_uid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i64>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|st| {
                    st.rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().nth(2).map(str::to_string))
                })
                == Some(b_pid.to_string())
        })
        .map(uid_of)
        .max()
        .unwrap();
    assert!(
        a_uid >= 200_000 && b_uid >= 200_000 && a_uid != b_uid,
        "{a_uid} vs {b_uid}"
    );
    assert_eq!(
        std::fs::read_to_string(s.home.join("deployments/sitea/uid")).unwrap(),
        a_uid.to_string(),
        "kept in the deployment's own (root's) directory"
    );
    let env = seen("env");
    assert!(
        !env.contains("whsec_platform_only") && !env.contains("COMMONS_SANDBOX"),
        "{env}"
    );
    assert!(env.contains("COMMONS_DATA_DIR="), "{env}");
    // A private /tmp: A's file is not in the host's /tmp.
    assert!(seen("tmp").contains("a-was-here"));
    assert!(!std::path::Path::new("/tmp/a-was-here").exists());
    // B is untouched, and the platform's own files are closed to workloads.
    assert_eq!(component_get(&web, "/secret").unwrap().0, 200);
    let mode = |p: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(s.home.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    if s.scale_out.is_none() {
        assert_eq!(mode("state.db"), 0o600);
    }
    assert_eq!(mode("secrets"), 0o700);
    assert_eq!(mode("deployments/siteb/logs"), 0o700);
}

#[test]
fn a_memory_limit_kills_only_its_workload() {
    root();
    let s = Sandbox::new("sandbox-oom");
    s.blueprint(
        r#"name: hungry
components:
  eat:
    job: "python3 -c 'x = bytearray(400 * 1024 * 1024); print(len(x))'"
    resources: { memory: 64Mi }
  modest:
    job: "python3 -c 'x = bytearray(8 * 1024 * 1024); print(len(x))'"
    resources: { memory: 64Mi }
"#,
    );
    let r = sandboxed(&s, &["deploy", "--json"]);
    assert_eq!(r.code(), 1, "{}", r.all());
    let v = r.json();
    assert_eq!(task(&v, "modest")["outcome"], "ok");
    assert_eq!(task(&v, "eat")["outcome"], "failed");
    let err = task(&v, "eat")["error"].as_str().unwrap().to_string();
    // Destroy leaves no cgroup behind.
    assert!(
        std::path::Path::new("/sys/fs/cgroup/memory/commons/hungry").exists()
            || std::path::Path::new("/sys/fs/cgroup/commons/hungry").exists()
    );
    s.ok(&["destroy", "hungry"]);
    assert!(!std::path::Path::new("/sys/fs/cgroup/memory/commons/hungry").exists());
    assert!(!std::path::Path::new("/sys/fs/cgroup/commons/hungry").exists());
    assert!(
        err.contains("out of memory, over its limit of 64 MiB") || err.contains("MemoryError"),
        "{err}"
    );
}

#[test]
fn a_process_killed_for_its_memory_shows_as_oom() {
    root();
    let s = Sandbox::new("sandbox-oom-process");
    s.blueprint(
        r#"name: greedy
components:
  hog:
    process: "python3 -c 'import time; time.sleep(1); x = b\"x\" * (400 << 20); time.sleep(60)'"
    resources: { memory: 64Mi }
  calm:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    health: { http: "/" }
    resources: { memory: 64Mi }
"#,
    );
    let r = sandboxed(&s, &["deploy"]);
    assert_eq!(r.code(), 0, "{}", r.all());
    assert!(
        wait_for(std::time::Duration::from_secs(20), || s
            .component("greedy", "hog")["state"]
            == "oom"),
        "{}",
        s.component("greedy", "hog")
    );
    let hog = s.component("greedy", "hog");
    assert_eq!(hog["last_exit"]["oom"], true, "{hog}");
    assert!(
        hog["last_exit"]["reason"]
            .as_str()
            .unwrap()
            .contains("out of memory: killed by the kernel over its limit of 64 MiB"),
        "{hog}"
    );
    // Only the hog: its neighbour, under the same limit, still serves.
    let calm = s.component("greedy", "calm");
    assert_eq!(calm["state"], "running", "{calm}");
    assert_eq!(component_get(&calm, "/").unwrap().0, 200);
    let text = s.ok(&["status", "greedy"]).stdout();
    assert!(text.contains("oom"), "{text}");
    sandboxed(&s, &["destroy", "greedy"]);
}
