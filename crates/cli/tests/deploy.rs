//! The engine end to end, through the real `commons` binary: real processes,
//! a real SQLite state store, real git records.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use common::*;

fn data_file(s: &Sandbox, deployment: &str, file: &str) -> PathBuf {
    s.home
        .join("deployments")
        .join(deployment)
        .join("data")
        .join(file)
}

#[test]
fn validate_reports_position_and_fix_with_exit_2() {
    let s = Sandbox::new("validate");
    s.blueprint("name: x\ncomponents:\n  web:\n    procss: \"serve\"\n");
    let r = s.run(&["validate"]);
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.stderr().contains("commons.yaml:4:5"), "{}", r.stderr());
    assert!(
        r.stderr().contains("did you mean \"process\"?"),
        "{}",
        r.stderr()
    );
    let j = s.run(&["validate", "--json"]);
    assert_eq!(j.code(), 2);
    let v = j.json();
    assert_eq!(v["valid"], false);
    assert_eq!(v["errors"][0]["line"], 4);
    assert_eq!(v["errors"][0]["column"], 5);
    // Deploying an invalid blueprint is bad input too, and changes nothing.
    assert_eq!(s.run(&["deploy"]).code(), 2);
    assert_eq!(
        s.ok(&["list", "--json"]).json().as_array().unwrap().len(),
        0
    );
}

#[test]
fn bad_input_exits_2() {
    let s = Sandbox::new("badinput");
    s.blueprint(
        "name: needs\ninputs:\n  port: { type: int }\ncomponents:\n  a: { job: \"true\" }\n",
    );
    let r = s.run(&["deploy"]);
    assert_eq!(r.code(), 2);
    assert!(
        r.stderr().contains("input \"port\" (int) is required"),
        "{}",
        r.stderr()
    );
    let r = s.run(&["deploy", "-i", "port=eighty"]);
    assert_eq!(r.code(), 2);
    assert!(r.stderr().contains("expected an integer"), "{}", r.stderr());
    let r = s.run(&["deploy", "-i", "prot=80"]);
    assert!(
        r.stderr().contains("did you mean \"port\"?"),
        "{}",
        r.stderr()
    );
    let r = s.run(&["status", "nope"]);
    assert_eq!(r.code(), 2);
}

#[test]
fn plan_shows_attribute_diffs_and_only_readers_change() {
    let s = Sandbox::new("plan");
    s.blueprint(
        r#"name: plan
inputs:
  x: { default: one }
  y: { default: two }
components:
  a: { job: "echo a ${inputs.x} >> $COMMONS_DATA_DIR/runs" }
  b: { job: "echo b ${inputs.y} >> $COMMONS_DATA_DIR/runs" }
  c: { job: "echo c >> $COMMONS_DATA_DIR/runs" }
"#,
    );
    let p = s.ok(&["plan", "--json"]).json();
    let actions: Vec<&str> = p["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["create", "create", "create"]);
    s.ok(&["deploy"]);
    let runs = data_file(&s, "plan", "runs");
    assert_eq!(lines(&runs).len(), 3);

    // Change x: only `a` reads it.
    let p = s.ok(&["plan", "-i", "x=uno", "--json"]).json();
    let by: Vec<(String, String)> = p["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["component"].as_str().unwrap().into(),
                c["action"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        by,
        [
            ("a".into(), "update".into()),
            ("b".into(), "unchanged".into()),
            ("c".into(), "unchanged".into())
        ]
    );
    let attrs = &p["changes"][0]["attrs"];
    assert_eq!(attrs[0]["attr"], "inputs.x");
    assert_eq!(attrs[0]["old"], "one");
    assert_eq!(attrs[0]["new"], "uno");
    let text = s.ok(&["plan", "-i", "x=uno"]).stdout();
    assert!(text.contains("inputs.x: \"one\" -> \"uno\""), "{text}");
    assert!(text.contains("1 to update"), "{text}");

    s.ok(&["deploy", "-i", "x=uno"]);
    // a, b and c ran in parallel the first time, so only the set is fixed.
    let l = lines(&runs);
    let mut first: Vec<&str> = l[..3].iter().map(String::as_str).collect();
    first.sort();
    assert_eq!(first, ["a one", "b two", "c"]);
    assert_eq!(&l[3..], ["a uno"]);
    // Inputs are remembered: a plain redeploy changes nothing and runs nothing.
    let r = s.ok(&["deploy"]);
    assert!(r.stderr().contains("nothing to do"), "{}", r.stderr());
    assert_eq!(lines(&runs).len(), 4);

    // Editing a command reconfigures just that component; removing one deletes it.
    s.blueprint(
        r#"name: plan
inputs:
  x: { default: one }
  y: { default: two }
components:
  a: { job: "echo a ${inputs.x} >> $COMMONS_DATA_DIR/runs" }
  b: { job: "echo B ${inputs.y} >> $COMMONS_DATA_DIR/runs" }
"#,
    );
    let p = s.ok(&["plan", "--json"]).json();
    let by: Vec<(&str, &str)> = p["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["component"].as_str().unwrap(),
                c["action"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(by, [("a", "unchanged"), ("b", "update"), ("c", "delete")]);
    s.ok(&["deploy"]);
    assert_eq!(lines(&runs).last().unwrap(), "B two");
    assert!(s.component("plan", "c").is_null());
}

#[test]
fn independent_tasks_run_in_parallel() {
    let s = Sandbox::new("parallel");
    let mut yaml = String::from("name: par\ncomponents:\n");
    for i in 0..5 {
        yaml.push_str(&format!(
            "  s{i}: {{ job: \"date +%s.%N >> $COMMONS_DATA_DIR/start; sleep 1; date +%s.%N >> $COMMONS_DATA_DIR/end\" }}\n"
        ));
    }
    s.blueprint(&yaml);
    s.ok(&["deploy"]);
    let parse = |f: &str| -> Vec<f64> {
        lines(&data_file(&s, "par", f))
            .iter()
            .map(|l| l.parse().unwrap())
            .collect()
    };
    let (starts, ends) = (parse("start"), parse("end"));
    assert_eq!(starts.len(), 5);
    // Every job started before any finished: they overlapped.
    let last_start = starts.iter().cloned().fold(f64::MIN, f64::max);
    let first_end = ends.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        last_start < first_end,
        "jobs ran one after another: starts {starts:?} ends {ends:?}"
    );
}

#[test]
fn failure_blocks_dependents_and_exits_1() {
    let s = Sandbox::new("failure");
    s.blueprint(
        r#"name: fail
components:
  migrate: { job: "echo broken schema >&2; exit 3" }
  web: { job: "touch $COMMONS_DATA_DIR/web", after: [migrate] }
  worker: { job: "touch $COMMONS_DATA_DIR/worker", after: [web] }
  docs: { job: "touch $COMMONS_DATA_DIR/docs" }
"#,
    );
    let r = s.run(&["deploy"]);
    assert_eq!(r.code(), 1, "{}", r.all());
    assert!(
        r.stderr().contains("exited with status 3"),
        "{}",
        r.stderr()
    );
    assert!(
        r.stderr().contains("broken schema"),
        "the job's output is shown: {}",
        r.stderr()
    );
    let j = s.run(&["deploy", "--json"]);
    assert_eq!(j.code(), 1);
    let outcome = j.json();
    assert_eq!(task(&outcome, "migrate")["outcome"], "failed");
    assert_eq!(task(&outcome, "web")["outcome"], "blocked");
    assert_eq!(task(&outcome, "worker")["outcome"], "blocked");
    assert!(!data_file(&s, "fail", "web").exists());
    assert!(data_file(&s, "fail", "docs").exists());
    assert_eq!(s.component("fail", "migrate")["state"], "error");
    assert_eq!(s.status_json("fail")["status"], "failed");
    // Fixing the job lets everything through.
    s.blueprint(
        r#"name: fail
components:
  migrate: { job: "true" }
  web: { job: "touch $COMMONS_DATA_DIR/web", after: [migrate] }
  worker: { job: "touch $COMMONS_DATA_DIR/worker", after: [web] }
  docs: { job: "touch $COMMONS_DATA_DIR/docs" }
"#,
    );
    s.ok(&["deploy"]);
    assert!(data_file(&s, "fail", "worker").exists());
}

#[test]
fn retries_and_timeouts_come_from_the_blueprint() {
    let s = Sandbox::new("retries");
    s.blueprint(
        r#"name: retry
components:
  flaky:
    job: "echo x >> $COMMONS_DATA_DIR/tries; test $(wc -l < $COMMONS_DATA_DIR/tries) -ge 3"
    retries: 2
  slow:
    job: "sleep 30"
    timeout: 300ms
"#,
    );
    let j = s.run(&["deploy", "--json"]);
    assert_eq!(j.code(), 1);
    let v = j.json();
    assert_eq!(task(&v, "flaky")["outcome"], "ok");
    assert_eq!(task(&v, "flaky")["attempts"], 3);
    assert_eq!(task(&v, "slow")["outcome"], "timeout");
    assert_eq!(lines(&data_file(&s, "retry", "tries")).len(), 3);
}

#[test]
fn deploy_killed_with_sigkill_is_resumed() {
    let s = Sandbox::new("resume");
    s.blueprint(
        r#"name: resume
components:
  first: { job: "echo first >> $COMMONS_DATA_DIR/runs" }
  slow:
    job: "echo slow-start >> $COMMONS_DATA_DIR/runs; sleep 3; echo slow-end >> $COMMONS_DATA_DIR/runs"
    after: [first]
  last: { job: "echo last >> $COMMONS_DATA_DIR/runs", after: [slow] }
  web:
    process: "python3 -m http.server --bind 127.0.0.1 $PORT"
    after: [first]
    health: { http: "/" }
"#,
    );
    let runs = data_file(&s, "resume", "runs");
    let mut child = s
        .cmd(&["deploy"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_for(Duration::from_secs(20), || lines(&runs)
        .contains(&"slow-start".to_string())));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // The interrupted task is recorded as in progress, with its leftovers findable.
    let slow = s.component("resume", "slow");
    assert_eq!(slow["state"], "applying", "{slow}");

    let r = s.ok(&["deploy", "--json"]).json();
    let ran: Vec<&str> = r["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["component"].as_str().unwrap())
        .collect();
    assert!(
        !ran.contains(&"first"),
        "a finished task ran again: {ran:?}"
    );
    assert!(ran.contains(&"slow") && ran.contains(&"last"), "{ran:?}");
    std::thread::sleep(Duration::from_millis(3500));
    let l = lines(&runs);
    assert_eq!(l.iter().filter(|x| *x == "first").count(), 1, "{l:?}");
    assert_eq!(l.iter().filter(|x| *x == "last").count(), 1, "{l:?}");
    // The interrupted `slow` was stopped, not left to finish on its own: its
    // only end is from the resumed run.
    assert_eq!(l.iter().filter(|x| *x == "slow-end").count(), 1, "{l:?}");
    assert_eq!(l.iter().filter(|x| *x == "slow-start").count(), 2, "{l:?}");

    // Exactly one web server runs, and it is the tracked one.
    let web = s.component("resume", "web");
    assert_eq!(web["state"], "running");
    let port = web["port"].as_u64().unwrap() as u16;
    assert_eq!(http_get(port, "/").unwrap().0, 200);
    let ours = format!("--bind 127.0.0.1 {port}");
    let servers = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| {
            c.contains("http.server") && c.contains(&s.home.display().to_string())
                || c.contains(&ours)
        })
        // Not its keeper, whose arguments name the same command.
        .filter(|c| !c.contains(" __sandbox "))
        .count();
    assert_eq!(servers, 1);
}

#[test]
fn destroy_cleans_up_after_a_failed_create() {
    let s = Sandbox::new("destroyfail");
    s.blueprint(
        r#"name: broken
components:
  store: { volume: {} }
  web:
    process: "sleep 60"
    health: { http: "/", timeout: 1s }
    after: [store]
"#,
    );
    let r = s.run(&["deploy"]);
    assert_eq!(r.code(), 1, "{}", r.all());
    // Nothing ever listens: the health check fails and says so.
    assert!(
        r.stderr().contains("health check failed for 1s"),
        "{}",
        r.stderr()
    );
    assert_eq!(s.component("broken", "web")["state"], "error");
    let volume = s.home.join("deployments/broken/volumes/store");
    assert!(volume.is_dir());
    s.ok(&["destroy", "broken"]);
    assert!(!volume.exists());
    assert_eq!(s.run(&["status", "broken"]).code(), 2);
    // History stays: the destroy is the last record.
    let h = s.ok(&["history", "broken", "--json"]).json();
    assert!(h.as_array().unwrap().last().unwrap()["summary"]
        .as_str()
        .unwrap()
        .starts_with("destroy"));
}

#[test]
fn a_command_waits_for_a_deployment_another_process_holds() {
    // The platform's idler or supervisor holds a deployment for a moment
    // now and then; a person's command waits for it, saying so, instead of
    // failing.
    let s = Sandbox::new("lockwait");
    s.blueprint("name: held\ncomponents:\n  store: { volume: {} }\n");
    s.ok(&["deploy"]);
    let lock = s.home.join("locks").join("held.lock");
    let mut holder = std::process::Command::new("flock")
        .arg(&lock)
        .args(["sleep", "3"])
        .spawn()
        .expect("flock (util-linux) runs");
    // Until the holder has it, a non-blocking try succeeds.
    assert!(wait_for(Duration::from_secs(5), || {
        !std::process::Command::new("flock")
            .args(["--nonblock", "--conflict-exit-code", "9"])
            .arg(&lock)
            .arg("true")
            .status()
            .unwrap()
            .success()
    }));
    let t = std::time::Instant::now();
    let r = s.run(&["destroy", "held"]);
    assert_eq!(r.code(), 0, "{}", r.all());
    assert!(
        r.stderr().contains("Blocking") && r.stderr().contains("\"held\""),
        "{}",
        r.stderr()
    );
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    holder.wait().unwrap();
    assert!(!s.home.join("deployments/held/volumes/store").exists());
}

#[test]
fn records_never_hold_a_secret() {
    let s = Sandbox::new("secrets");
    s.blueprint(
        r#"name: secretive
secrets:
  made: { generate: 40 }
  given: { from_env: GIVEN_TOKEN }
components:
  save: { job: "printf %s ${secrets.made} > $COMMONS_DATA_DIR/made" }
  web:
    process: "exec python3 -m http.server --bind 127.0.0.1 $PORT # ${secrets.made}"
    env: { TOKEN: "${secrets.given}" }
    health: { http: "/" }
  leak: { job: "echo token=$TOKEN >&2; exit 1", env: { TOKEN: "${secrets.made}" } }
  envdump: { job: "env > $COMMONS_DATA_DIR/env" }
"#,
    );
    let given = "given-Secret-Value-0451";
    let r = s
        .cmd(&["deploy"])
        .env("GIVEN_TOKEN", given)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(1), "the leak job fails on purpose");
    let made = std::fs::read_to_string(data_file(&s, "secretive", "made")).unwrap();
    // The variable a secret is read from is not handed to every workload.
    let env = std::fs::read_to_string(data_file(&s, "secretive", "env")).unwrap();
    assert!(
        !env.contains("GIVEN_TOKEN") && !env.contains(given),
        "{env}"
    );
    assert_eq!(made.len(), 40);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("token=[redacted]"), "{stderr}");
    assert!(!stderr.contains(&made));

    // Not in any argv of the running process tree.
    let web = s.component("secretive", "web");
    let pid = web["pid"].as_i64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&made));

    // Not in any file the platform keeps, outside what the app itself wrote.
    let mut todo = vec![s.home.clone()];
    let mut scanned = 0;
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.ends_with("data") || p.ends_with("logs") {
                continue; // the app's own files and output
            }
            if p.is_dir() {
                todo.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap();
                let text = String::from_utf8_lossy(&bytes);
                assert!(
                    !text.contains(&made),
                    "generated secret found in {}",
                    p.display()
                );
                assert!(!text.contains(given), "env secret found in {}", p.display());
                scanned += 1;
            }
        }
    }
    assert!(scanned > 5, "scanned too few files: {scanned}");
    // And not in the record's history, uncompressed.
    let log = std::process::Command::new("git")
        .args(["--git-dir"])
        .arg(s.home.join("records/secretive"))
        .args(["log", "-p", "--all"])
        .output()
        .unwrap();
    assert!(log.status.success());
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(
        log.contains("${secrets.made}"),
        "the record shows the reference"
    );
    assert!(!log.contains(&made) && !log.contains(given));
}

#[test]
fn clone_reproduces_a_deployment() {
    let s = Sandbox::new("clone");
    s.write("public/index.html", "<h1>cloned page</h1>\n");
    s.blueprint(
        r#"name: origin
inputs:
  motto: { default: "share alike" }
secrets:
  key: { generate: 16 }
components:
  docs: { static: ./public }
  config: { job: "printf %s \"${inputs.motto}\" > $COMMONS_DATA_DIR/motto" }
  web:
    process: "python3 -m http.server --bind 127.0.0.1 --directory ${components.docs.path} $PORT"
    env: { KEY: "${secrets.key}" }
    after: [config]
    health: { http: "/" }
"#,
    );
    s.ok(&["deploy", "-i", "motto=copy me"]);
    let record = s.home.join("records/origin");

    // Another machine: a fresh data directory, the record as the only source.
    let other = Sandbox::new("clone-target");
    std::fs::remove_dir_all(s.app()).unwrap(); // the original sources are gone
    other.ok(&["clone", record.to_str().unwrap(), "--name", "copy"]);
    assert_eq!(
        std::fs::read_to_string(data_file(&other, "copy", "motto")).unwrap(),
        "copy me"
    );
    let web = other.component("copy", "web");
    assert_eq!(web["state"], "running");
    let (code, body) = http_get(web["port"].as_u64().unwrap() as u16, "/index.html").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("cloned page"));
    // The clone has its own history and a new secret.
    assert_eq!(
        other
            .ok(&["history", "copy", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn serves_a_real_page_and_restarts_a_dead_process() {
    let s = Sandbox::new("e2e");
    s.write("site/index.html", "<p>hello from a real server</p>\n");
    s.blueprint(
        r#"name: hello
components:
  web:
    process: "python3 -m http.server --bind 127.0.0.1 --directory site $PORT"
    health: { http: "/", timeout: 20s }
    route: { host: hello.localhost }
"#,
    );
    s.ok(&["deploy"]);
    let web = s.component("hello", "web");
    assert_eq!(web["state"], "running");
    let port = web["port"].as_u64().unwrap() as u16;
    let (code, body) = http_get(port, "/index.html").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("hello from a real server"), "{body}");
    assert_eq!(web["outputs"]["url"], format!("http://127.0.0.1:{port}"));

    // The process outlives the CLI; `logs` shows what it printed.
    let logs = s.ok(&["logs", "hello", "web"]).stdout();
    assert!(logs.contains("GET /index.html"), "{logs}");

    // Killed behind our back: status says so, the next deploy restarts it on the same port.
    let pid = web["pid"].as_i64().unwrap();
    unsafe_kill(pid);
    assert!(wait_for(Duration::from_secs(5), || s
        .component("hello", "web")["state"]
        == "stopped"));
    let p = s.ok(&["plan", "--json"]).json();
    assert_eq!(p["changes"][0]["action"], "replace");
    s.ok(&["deploy"]);
    let web = s.component("hello", "web");
    assert_eq!(web["state"], "running");
    assert_eq!(web["port"].as_u64().unwrap() as u16, port);
    assert_eq!(http_get(port, "/index.html").unwrap().0, 200);

    // A route change needs no restart.
    s.blueprint(
        &std::fs::read_to_string(s.app().join("commons.yaml"))
            .unwrap()
            .replace("hello.localhost", "hi.localhost"),
    );
    let p = s.ok(&["plan", "--json"]).json();
    assert_eq!(p["changes"][0]["action"], "update");
    s.ok(&["deploy"]);
    assert_eq!(s.component("hello", "web")["pid"], web["pid"]);

    s.ok(&["destroy"]);
    assert!(wait_for(Duration::from_secs(5), || http_get(port, "/").is_err()));
}

fn unsafe_kill(pid: i64) {
    std::process::Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status()
        .unwrap();
}

#[test]
fn the_readme_example_deploys() {
    let s = Sandbox::new("example");
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello");
    s.ok(&["validate", example.to_str().unwrap()]);
    s.ok(&[
        "deploy",
        example.to_str().unwrap(),
        "-i",
        "greeting=Welcome aboard",
    ]);
    let web = s.component("hello", "web");
    let (code, body) = http_get(web["port"].as_u64().unwrap() as u16, "/").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("<h1>Welcome aboard</h1>"), "{body}");
    // By name from anywhere, with the inputs it was deployed with.
    let r = s.ok(&["deploy", "hello"]);
    assert!(r.stderr().contains("nothing to do"), "{}", r.stderr());
}

#[test]
fn init_writes_a_blueprint_that_deploys() {
    let s = Sandbox::new("init");
    s.ok(&["init", "--name", "starter"]);
    assert_eq!(s.run(&["init"]).code(), 2, "init refuses to overwrite");
    s.ok(&["validate"]);
    s.ok(&["deploy"]);
    let web = s.component("starter", "web");
    let (code, body) = http_get(web["port"].as_u64().unwrap() as u16, "/").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("Hello from OneCommons"), "{body}");
    // Commands without a name act on ./commons.yaml's deployment.
    assert_eq!(s.ok(&["status", "--json"]).json()["name"], "starter");
    assert!(s
        .ok(&["history"])
        .stdout()
        .contains("deploy starter run 1: ok"));
    s.ok(&["destroy"]);
}

#[test]
fn schema_is_json_schema() {
    let s = Sandbox::new("schema");
    let v = s.ok(&["schema"]).json();
    assert_eq!(v["$schema"], "https://json-schema.org/draft/2020-12/schema");
    assert!(
        v["properties"]["components"]["additionalProperties"]["properties"]["process"].is_object()
    );
    assert!(s.ok(&["--version"]).stdout().starts_with("commons "));
}

#[test]
fn included_blueprints_deploy_as_one() {
    let s = Sandbox::new("include");
    s.write(
        "lib/commons.yaml",
        r#"name: lib
inputs:
  motd: { type: string }
components:
  files: { job: "mkdir -p $COMMONS_DATA_DIR/lib && printf %s \"${inputs.motd}\" > $COMMONS_DATA_DIR/lib/motd" }
  srv:
    process: "python3 -m http.server --bind 127.0.0.1 --directory $COMMONS_DATA_DIR/lib $PORT"
    after: [files]
    health: { http: "/motd" }
outputs:
  url: "${components.srv.url}/motd"
"#,
    );
    s.blueprint(
        r#"name: app
inputs:
  greeting: { default: "hi from the parent" }
components:
  lib:
    blueprint: ./lib
    with: { motd: "${inputs.greeting}" }
  check: { job: "python3 -c \"import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('${components.lib.url}').read().decode())\" > $COMMONS_DATA_DIR/seen" }
"#,
    );
    let p = s.ok(&["plan", "--json"]).json();
    let names: Vec<&str> = p["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["component"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lib.files", "lib.srv", "check"]);
    s.ok(&["deploy"]);
    assert_eq!(
        std::fs::read_to_string(data_file(&s, "app", "seen")).unwrap(),
        "hi from the parent"
    );
    // Changing the parent's input reaches into the included blueprint.
    let p = s.ok(&["plan", "-i", "greeting=changed", "--json"]).json();
    let acting: Vec<&str> = p["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["action"] != "unchanged")
        .map(|c| c["component"].as_str().unwrap())
        .collect();
    assert_eq!(acting, ["lib.files"]);
}

#[test]
fn the_state_store_can_be_postgresql() {
    let url = std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let schema = format!("engine_state_{}", std::process::id());
    let s = Sandbox::new("pgstate");
    s.blueprint("name: pgstate\ninputs:\n  x: { default: one }\ncomponents:\n  a: { job: \"echo ${inputs.x} >> $COMMONS_DATA_DIR/runs\" }\n");
    let run = |args: &[&str]| {
        let out = s
            .cmd(args)
            .env("COMMONS_DATABASE_URL", &url)
            .env("COMMONS_DATABASE_SCHEMA", &schema)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "commons {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    run(&["deploy"]);
    run(&["deploy", "-i", "x=two"]);
    let status: serde_json::Value =
        serde_json::from_slice(&run(&["status", "pgstate", "--json"]).stdout).unwrap();
    assert_eq!(status["components"][0]["last_task"]["run"], 2);
    assert_eq!(lines(&data_file(&s, "pgstate", "runs")), ["one", "two"]);
    // The SQLite file was never made: the state lives in PostgreSQL.
    assert!(!s.home.join("state.db").exists());
    run(&["destroy", "pgstate"]);
    // The ledger's journal lives there too, and the CLI reads it back.
    run(&["ledger", "bootstrap", "--cash", "1000", "--tokens", "1000"]);
    let balance: serde_json::Value =
        serde_json::from_slice(&run(&["ledger", "balance", "cash:reserve", "--json"]).stdout)
            .unwrap();
    assert_eq!(balance[0]["balance"]["credits_posted"], 1000, "{balance}");
    assert!(!s.home.join("ledger/ledger.db").exists());
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let entries: i64 = admin
        .query_one(&format!("SELECT COUNT(*) FROM {schema}.journal"), &[])
        .unwrap()
        .get(0);
    assert!(entries > 0, "no journal entries in {schema}");
    // Subscriptions and payments too.
    run(&["subscribe", "alice", "member", "--payment", "bank-1"]);
    let sub: serde_json::Value =
        serde_json::from_slice(&run(&["subscribe", "alice", "--json"]).stdout).unwrap();
    assert_eq!(sub["subscription"]["tier"], "member", "{sub}");
    assert!(!s.home.join("ledger/billing.db").exists());
    let paid: i64 = admin
        .query_one(
            &format!("SELECT gross FROM {schema}.payments WHERE \"user\" = 'alice'"),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(paid, 500);
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
}

/// Two platform instances (two data directories, as on two machines) that
/// share one PostgreSQL deploy one site one at a time: the second waits for
/// the first to finish, then deploys, and the record stays whole.
#[test]
fn deploys_of_one_site_are_one_at_a_time_across_instances() {
    let url = std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let schema = format!("engine_lease_{}", std::process::id());
    let first = Sandbox::new("lease-one");
    let second = Sandbox::new("lease-two");
    first.share_keys(&second);
    // Both instances' jobs write to one file: their lines must not interleave.
    let shared = first.dir.join("both.log");
    let blueprint = format!(
        "name: shared\ncomponents:\n  a: {{ job: \"echo start >> {0}; sleep 2; echo done >> {0}\" }}\n",
        shared.display()
    );
    first.blueprint(&blueprint);
    second.blueprint(&blueprint);
    let deploy = |s: &Sandbox| {
        s.cmd(&["deploy"])
            .env("COMMONS_DATABASE_URL", &url)
            .env("COMMONS_DATABASE_SCHEMA", &schema)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let running = deploy(&first);
    // The first holds the site's lease while its job sleeps.
    std::thread::sleep(std::time::Duration::from_millis(800));
    let asked = std::time::Instant::now();
    let waiting = deploy(&second);
    let done = running.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let after = waiting.wait_with_output().unwrap();
    assert!(
        after.status.success(),
        "the second waited, then deployed: {}",
        String::from_utf8_lossy(&after.stderr)
    );
    // It waited the first's remaining ~1.2 s, then ran its own 2 s job.
    assert!(asked.elapsed() >= std::time::Duration::from_secs(3));
    assert_eq!(lines(&shared), ["start", "done", "start", "done"]);
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let runs: Vec<(i64, String)> = admin
        .query(
            &format!(
                "SELECT run, outcome FROM {schema}.runs WHERE deployment = 'shared' ORDER BY run"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // One run each, one after the other, both whole.
    assert_eq!(
        runs,
        [(1, "ok".to_string()), (2, "ok".to_string())],
        "{runs:?}"
    );
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
}

/// Two platform instances (two data directories) sharing one PostgreSQL
/// close the same period at the same moment, twice over: the subscriber's
/// payment is allocated once in all, and the journal still verifies.
#[test]
fn a_period_closed_by_two_instances_at_once_is_closed_once() {
    let url = std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let schema = format!("period_race_{}", std::process::id());
    let (first, second) = (Sandbox::new("race-one"), Sandbox::new("race-two"));
    first.share_keys(&second);
    let cmd = |s: &Sandbox, args: &[&str]| {
        let mut c = s.cmd(args);
        c.env("COMMONS_DATABASE_URL", &url)
            .env("COMMONS_DATABASE_SCHEMA", &schema)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c
    };
    let ok = |s: &Sandbox, args: &[&str]| {
        let out = cmd(s, args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    ok(
        &first,
        &["ledger", "bootstrap", "--cash", "1000", "--tokens", "1000"],
    );
    ok(
        &first,
        &["subscribe", "alice", "member", "--payment", "bank-1"],
    );
    let period = {
        let sub: serde_json::Value =
            serde_json::from_slice(&ok(&second, &["subscribe", "alice", "--json"])).unwrap();
        assert_eq!(sub["subscription"]["tier"], "member", "both see it: {sub}");
        let out = std::process::Command::new("date")
            .arg("+%Y-%m")
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let mut allocated = 0;
    let mut closers = 0;
    for _ in 0..2 {
        let racing: Vec<_> = [&first, &second, &first, &second]
            .iter()
            .map(|s| {
                cmd(s, &["period", "close", &period, "--json"])
                    .spawn()
                    .unwrap()
            })
            .collect();
        for r in racing {
            let out = r.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "a racing close failed instead of finding it closed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let closed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            allocated += closed["tokens_allocated"].as_i64().unwrap();
            if closed["subscribers"].as_i64() == Some(1) {
                closers += 1;
            }
        }
    }
    assert_eq!(closers, 1, "one close allocated the payment");
    assert_eq!(allocated, 500, "the member's payment, allocated once");
    let export = first.dir.join("journal.export");
    ok(
        &first,
        &["ledger", "export", "-o", export.to_str().unwrap()],
    );
    let key = String::from_utf8(ok(&first, &["ledger", "key"])).unwrap();
    // Every instance signs with the one custodian key kept in the database,
    // on the command line too.
    assert_eq!(
        String::from_utf8(ok(&second, &["ledger", "key"])).unwrap(),
        key,
        "one custodian key for the platform"
    );
    ok(
        &first,
        &[
            "ledger",
            "verify",
            "--key",
            key.trim(),
            export.to_str().unwrap(),
        ],
    );
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
}

/// Two `commons serve` instances (two data directories, as on two
/// machines) sharing one PostgreSQL: a deploy of a site through one and a
/// redeploy of it through the other at the same moment. One runs, the
/// other waits for it, then runs; both answer, and the record is whole.
#[test]
fn two_serve_instances_deploy_one_site_one_after_the_other() {
    let url = std::env::var("COMMONS_TEST_POSTGRES")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let schema = format!("serve_lease_{}", std::process::id());
    let (one, two) = (
        Sandbox::new("serve-lease-one"),
        Sandbox::new("serve-lease-two"),
    );
    let shared = one.dir.join("both.log");
    let blueprint = format!(
        "name: shared\ncomponents:\n  a: {{ job: \"echo start >> {0}; sleep 2; echo done >> {0}\" }}\n",
        shared.display()
    );
    let env = [
        ("COMMONS_DATABASE_URL", url.as_str()),
        ("COMMONS_DATABASE_SCHEMA", schema.as_str()),
    ];
    let first = one.serve(&env);
    one.share_keys(&two);
    let second = two.serve(&env);
    // One account, seen by both instances (it is in the shared store).
    signup(first.port, "ann@example.org", "Ann");
    let (a, b) = (
        login(first.port, "ann@example.org", true),
        login(second.port, "ann@example.org", true),
    );
    let (code, v) = a.post(
        "/api/orgs/ann/sites",
        json!({ "name": "shared", "blueprint": blueprint }),
    );
    assert_eq!(code, 202, "{v}");
    std::thread::sleep(Duration::from_millis(500));
    let (code, v) = b.call(
        "PUT",
        "/api/sites/shared",
        Some(json!({ "blueprint": blueprint })),
    );
    assert_eq!(code, 202, "{v}");
    let runs = || -> Vec<(i64, String)> {
        let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        db.query(
            &format!(
                "SELECT run, outcome FROM {schema}.runs WHERE deployment = 'shared' ORDER BY run"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
        .collect()
    };
    assert!(
        wait_for(Duration::from_secs(60), || runs()
            == [(1, "ok".to_string()), (2, "ok".to_string())]),
        "both deploys ran, one after the other: {:?}",
        runs()
    );
    // The second instance's job started only after the first's ended.
    assert_eq!(lines(&shared), ["start", "done", "start", "done"]);
    drop((first, second));
    drop_platform_schemas(&url, &schema);
}
