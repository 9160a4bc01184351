//! Every kind of validation error, with the file, line and column it points at.

use std::path::{Path, PathBuf};

use commons_blueprint::{load, Diagnostics, InMemory, Kind, Ref};

fn files(list: &[(&str, &str)]) -> InMemory {
    let mut m = InMemory::default();
    for (p, t) in list {
        m.0.insert(PathBuf::from(p), t.to_string());
    }
    m
}

fn errors(text: &str) -> Diagnostics {
    let src = files(&[("/bp/commons.yaml", text)]);
    load(Path::new("/bp/commons.yaml"), &src).expect_err("expected validation errors")
}

/// Asserts exactly one error, at line:col, whose message contains `msg`.
fn one(text: &str, line: usize, col: usize, msg: &str) {
    let d = errors(text);
    assert_eq!(d.len(), 1, "expected one error, got: {d}");
    let e = &d.0[0];
    assert_eq!((e.line, e.column), (line, col), "wrong position for: {e}");
    assert!(
        e.message.contains(msg),
        "message {:?} lacks {:?}",
        e.message,
        msg
    );
    assert_eq!(e.file, PathBuf::from("/bp/commons.yaml"));
}

#[test]
fn full_example_loads() {
    let src = files(&[
        (
            "/bp/commons.yaml",
            r#"name: hello
version: 0.1.0
project: example.org/hello
depends_on_projects:
  - { project: example.org/lib, weight: 2 }
  - example.org/other
inputs:
  greeting: { type: string, default: "hi" }
secrets:
  api_key: { generate: 32 }
components:
  migrate:
    job: "echo ${inputs.greeting}"
  web:
    process: "python3 -m http.server $PORT"
    after: [migrate]
    env: { KEY: "${secrets.api_key}", DB: "${components.db.url}" }
    health: { http: "/", timeout: 10s }
    route: { host: hello.localhost }
    resources: { memory: 256Mi, cpu: 0.5 }
  docs:
    static: ./public
  db:
    postgres: {}
  other:
    blueprint: ../lib-blueprint
    with: { port: "${components.web.port}" }
"#,
        ),
        ("/bp/public/index.html", "hi"),
        (
            "/lib-blueprint/commons.yaml",
            r#"name: lib
inputs:
  port: { type: string }
secrets:
  token: { from_env: LIB_TOKEN }
components:
  worker:
    process: "worker --upstream ${inputs.port} --token ${secrets.token}"
outputs:
  url: "http://127.0.0.1:${components.worker.port}"
"#,
        ),
    ]);
    let bp = load(Path::new("/bp"), &src).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(bp.name, "hello");
    assert_eq!(bp.depends_on_projects[0].weight, 2);
    assert_eq!(bp.depends_on_projects[1].weight, 1);
    let names: Vec<&str> = bp.components.keys().map(String::as_str).collect();
    assert_eq!(names, ["migrate", "web", "docs", "db", "other.worker"]);
    assert_eq!(bp.components["web"].depends_on, ["migrate", "db"]);
    assert_eq!(bp.components["web"].resources.memory_bytes, Some(256 << 20));
    assert_eq!(bp.components["web"].resources.cpu_millis, Some(500));
    // The included worker reads the parent's web port and its own, namespaced secret.
    let worker = &bp.components["other.worker"];
    assert_eq!(worker.depends_on, ["web"]);
    let refs: Vec<&Ref> = worker.refs().collect();
    assert!(refs.contains(&&Ref::Component {
        name: "web".into(),
        attr: "port".into()
    }));
    assert!(refs.contains(&&Ref::Secret {
        name: "other.token".into()
    }));
    assert!(bp.secrets.contains_key("other.token"));
    assert!(matches!(bp.components["docs"].kind, Kind::Static { .. }));
    assert_eq!(bp.files.len(), 2);
}

#[test]
fn output_of_include_is_inlined() {
    let src = files(&[
        ("/a/commons.yaml", "name: a\ncomponents:\n  lib:\n    blueprint: ../b\n  app:\n    job: \"curl ${components.lib.url}\"\n"),
        ("/b/commons.yaml", "name: b\ncomponents:\n  srv:\n    process: serve\noutputs:\n  url: \"http://${components.srv.host}:${components.srv.port}\"\n"),
    ]);
    let bp = load(Path::new("/a"), &src).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(bp.components["app"].depends_on, ["lib.srv"]);
    let Kind::Job { command } = &bp.components["app"].kind else {
        panic!()
    };
    assert_eq!(
        command.source(),
        "curl http://${components.lib.srv.host}:${components.lib.srv.port}"
    );
}

#[test]
fn yaml_syntax_error() {
    one("name: x\ncomponents: [a\nb: c\n", 3, 2, "YAML syntax error");
}

#[test]
fn empty_file() {
    one("", 1, 1, "empty");
}

#[test]
fn unknown_field_with_suggestion() {
    let d = errors("name: x\ncomponents:\n  web:\n    procss: \"serve\"\n");
    // Two problems: the typo, and so the component has no kind. Only the typo is reported for it.
    let e = d
        .iter()
        .find(|e| e.message.contains("procss"))
        .expect("typo reported");
    assert_eq!((e.line, e.column), (4, 5));
    assert_eq!(
        e.message,
        "unknown field \"procss\" in component \"web\", did you mean \"process\"?"
    );
}

#[test]
fn unknown_top_level_field() {
    one(
        "name: x\ncomponent:\n  a: {job: x}\ncomponents:\n  a: {job: x}\n",
        2,
        1,
        "did you mean \"components\"?",
    );
}

#[test]
fn missing_name() {
    one(
        "components:\n  a: {job: x}\n",
        1,
        1,
        "missing required field \"name\"",
    );
}

#[test]
fn missing_components() {
    one("name: x\n", 1, 1, "missing required field \"components\"");
}

#[test]
fn invalid_name() {
    one(
        "name: Hello_World\ncomponents:\n  a: {job: x}\n",
        1,
        7,
        "invalid name",
    );
}

#[test]
fn invalid_component_name() {
    one(
        "name: x\ncomponents:\n  Web: {job: x}\n",
        3,
        3,
        "invalid component name",
    );
}

#[test]
fn bad_semver() {
    one(
        "name: x\nversion: one\ncomponents:\n  a: {job: x}\n",
        2,
        10,
        "not a semantic version",
    );
}

#[test]
fn no_kind() {
    one(
        "name: x\ncomponents:\n  a: {after: []}\n",
        3,
        3,
        "does not say what it is",
    );
}

#[test]
fn two_kinds() {
    one(
        "name: x\ncomponents:\n  a:\n    job: x\n    process: y\n",
        5,
        5,
        "both a job and a process",
    );
}

#[test]
fn field_not_for_kind() {
    one(
        "name: x\ncomponents:\n  a:\n    job: x\n    health: { http: / }\n",
        5,
        5,
        "does not apply to a job",
    );
}

#[test]
fn wrong_type() {
    one(
        "name: x\ncomponents:\n  a:\n    job: [x]\n",
        4,
        10,
        "must be a string, found a list",
    );
}

#[test]
fn unknown_input_reference() {
    one(
        "name: x\ninputs:\n  greeting: {default: hi}\ncomponents:\n  a:\n    job: \"echo ${inputs.greting}\"\n",
        6, 16, "unknown input \"greting\", did you mean \"greeting\"?",
    );
}

#[test]
fn unknown_secret_reference() {
    one(
        "name: x\ncomponents:\n  a:\n    job: echo ${secrets.key}\n",
        4,
        15,
        "unknown secret \"key\"",
    );
}

#[test]
fn unknown_component_reference() {
    one(
        "name: x\ncomponents:\n  a:\n    job: echo ${components.bd.url}\n  db: {postgres: {}}\n",
        4,
        15,
        "unknown component \"bd\", did you mean \"db\"?",
    );
}

#[test]
fn unknown_attribute() {
    one(
        "name: x\ncomponents:\n  a:\n    job: echo ${components.db.uri}\n  db: {postgres: {}}\n",
        4,
        15,
        "has no attribute \"uri\", did you mean \"url\"?",
    );
}

#[test]
fn malformed_expression() {
    one(
        "name: x\ncomponents:\n  a:\n    job: \"echo ${components.db}\"\n  db: {postgres: {}}\n",
        4,
        16,
        "malformed expression",
    );
}

#[test]
fn unclosed_expression() {
    one(
        "name: x\ncomponents:\n  a:\n    job: \"echo ${inputs.x\"\n",
        4,
        16,
        "unclosed expression",
    );
}

#[test]
fn unknown_after() {
    one(
        "name: x\ncomponents:\n  a:\n    job: x\n    after: [mgrate]\n  migrate: {job: y}\n",
        5,
        13,
        "unknown component \"mgrate\", did you mean \"migrate\"?",
    );
}

#[test]
fn cycle_reports_path() {
    let d = errors("name: x\ncomponents:\n  a: {job: x, after: [c]}\n  b: {job: x, after: [a]}\n  c: {job: x, after: [b]}\n");
    assert_eq!(d.len(), 1, "{d}");
    let e = &d.0[0];
    assert!(e.message.starts_with("dependency cycle: "), "{}", e.message);
    // Whichever component the path starts from, it is a closed loop through all three.
    let path: Vec<&str> = e.message["dependency cycle: ".len()..]
        .split(" -> ")
        .collect();
    assert_eq!(path.len(), 4);
    assert_eq!(path[0], path[3]);
    assert_eq!(
        e.line,
        match path[0] {
            "a" => 3,
            "b" => 4,
            _ => 5,
        }
    );
}

#[test]
fn cycle_through_reference() {
    let d = errors("name: x\ncomponents:\n  a: {process: \"x ${components.b.port}\"}\n  b: {process: \"y ${components.a.port}\"}\n");
    assert!(d.0[0].message.contains("dependency cycle"), "{d}");
}

#[test]
fn bad_duration() {
    one(
        "name: x\ncomponents:\n  a:\n    job: x\n    timeout: soon\n",
        5,
        14,
        "is not a duration",
    );
}

#[test]
fn bad_memory() {
    one(
        "name: x\ncomponents:\n  a:\n    process: x\n    resources: { memory: lots }\n",
        5,
        26,
        "memory \"lots\"",
    );
}

#[test]
fn bad_cpu() {
    one(
        "name: x\ncomponents:\n  a:\n    process: x\n    resources: { cpu: -1 }\n",
        5,
        23,
        "cpu \"-1\"",
    );
}

#[test]
fn default_type_mismatch() {
    one(
        "name: x\ninputs:\n  n: { type: int, default: many }\ncomponents:\n  a: {job: x}\n",
        3,
        28,
        "must be an int, found a string",
    );
}

#[test]
fn unknown_input_type() {
    one(
        "name: x\ninputs:\n  n: { type: integer }\ncomponents:\n  a: {job: x}\n",
        3,
        14,
        "unknown input type \"integer\"",
    );
}

#[test]
fn secret_without_source() {
    one(
        "name: x\nsecrets:\n  k: {description: key}\ncomponents:\n  a: {job: x}\n",
        3,
        6,
        "says nowhere where its value comes from",
    );
}

#[test]
fn secret_with_two_sources() {
    one(
        "name: x\nsecrets:\n  k: {generate: 32, from_env: K}\ncomponents:\n  a: {job: x}\n",
        3,
        21,
        "both `generate` and `from_env`",
    );
}

#[test]
fn weak_secret() {
    one(
        "name: x\nsecrets:\n  k: {generate: 4}\ncomponents:\n  a: {job: x}\n",
        3,
        17,
        "too weak",
    );
}

#[test]
fn duplicate_key() {
    one(
        "name: x\ncomponents:\n  a: {job: x}\n  a: {job: y}\n",
        4,
        3,
        "duplicate name \"a\"",
    );
}

#[test]
fn missing_static_dir() {
    one(
        "name: x\ncomponents:\n  docs: {static: ./nope}\n",
        3,
        18,
        "static directory \"./nope\" does not exist",
    );
}

#[test]
fn missing_include() {
    one(
        "name: x\ncomponents:\n  lib: {blueprint: ../nope}\n",
        3,
        20,
        "cannot read blueprint",
    );
}

#[test]
fn include_cycle() {
    let src = files(&[
        (
            "/a/commons.yaml",
            "name: a\ncomponents:\n  b: {blueprint: ../b}\n",
        ),
        (
            "/b/commons.yaml",
            "name: b\ncomponents:\n  a: {blueprint: ../a}\n",
        ),
    ]);
    let d = load(Path::new("/a"), &src).unwrap_err();
    assert!(d.0[0].message.contains("includes itself"), "{d}");
    assert_eq!(d.0[0].file, PathBuf::from("/b/commons.yaml"));
    assert_eq!((d.0[0].line, d.0[0].column), (3, 18));
}

#[test]
fn include_missing_input() {
    let src = files(&[
        (
            "/a/commons.yaml",
            "name: a\ncomponents:\n  b: {blueprint: ../b}\n",
        ),
        (
            "/b/commons.yaml",
            "name: b\ninputs:\n  port: {type: int}\ncomponents:\n  w: {job: x}\n",
        ),
    ]);
    let d = load(Path::new("/a"), &src).unwrap_err();
    assert!(d.0[0].message.contains("needs input \"port\""), "{d}");
    assert_eq!((d.0[0].line, d.0[0].column), (3, 3));
}

#[test]
fn errors_in_included_file_point_there() {
    let src = files(&[
        (
            "/a/commons.yaml",
            "name: a\ncomponents:\n  b: {blueprint: ../b}\n",
        ),
        ("/b/commons.yaml", "name: b\ncomponents:\n  w: {jbo: x}\n"),
    ]);
    let d = load(Path::new("/a"), &src).unwrap_err();
    assert_eq!(d.0[0].file, PathBuf::from("/b/commons.yaml"));
    assert!(d.0[0].message.contains("did you mean \"job\""), "{d}");
}

#[test]
fn reserved_env() {
    one(
        "name: x\ncomponents:\n  a:\n    process: x\n    env: { PORT: 1 }\n",
        5,
        12,
        "set by the platform",
    );
}

#[test]
fn bad_route_host() {
    one(
        "name: x\ncomponents:\n  a:\n    process: x\n    route: { host: \"bad host\" }\n",
        5,
        20,
        "not a valid host name",
    );
}

#[test]
fn health_path() {
    one(
        "name: x\ncomponents:\n  a:\n    process: x\n    health: { http: healthz }\n",
        5,
        21,
        "must start with /",
    );
}

#[test]
fn reports_every_error_at_once() {
    let d = errors("name: X\ncomponents:\n  a: {jb: x}\n  b:\n    job: x\n    timeout: never\n    after: [zz]\n");
    assert!(d.len() >= 4, "{d}");
    let lines: Vec<usize> = d.iter().map(|e| e.line).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted, "errors are in source order");
}

#[test]
fn schema_covers_every_kind() {
    let s = commons_blueprint::schema::json_schema();
    let props = &s["properties"]["components"]["additionalProperties"]["properties"];
    for k in [
        "job",
        "process",
        "static",
        "postgres",
        "sqlite",
        "volume",
        "blueprint",
        "after",
        "env",
        "health",
        "route",
        "resources",
        "timeout",
        "retries",
    ] {
        assert!(props.get(k).is_some(), "schema lacks {k}");
    }
}

#[test]
fn self_reference() {
    one(
        "name: x\ncomponents:\n  web:\n    process: \"serve ${components.web.port}\"\n",
        4,
        21,
        "reads its own attribute \"port\"",
    );
}

#[test]
fn route_login_paths_and_body_limits() {
    one(
        "name: x\ncomponents:\n  a:\n    process: x\n    route: { host: a.localhost, login: [admin] }\n",
        5,
        41,
        "login path \"admin\" must start with /",
    );
    one(
        "name: x\ncomponents:\n  a:\n    process: x\n    route: { host: a.localhost, max_body: huge }\n",
        5,
        43,
        "max_body \"huge\"",
    );
    let src = files(&[(
        "/bp/commons.yaml",
        "name: x\ncomponents:\n  a:\n    process: x\n    route: { host: a.localhost, login: [/admin], max_body: 1Mi }\n",
    )]);
    let bp = load(Path::new("/bp/commons.yaml"), &src).unwrap();
    let route = bp.components["a"].route.clone().unwrap();
    assert_eq!(route.login, vec!["/admin".to_string()]);
    assert_eq!(route.max_body_bytes, Some(1 << 20));
}

#[test]
fn routes_limit_header_size_and_response_time() {
    one(
        "name: x\ncomponents:\n  a:\n    process: x\n    route: { max_header: 1Mi }\n",
        5,
        26,
        "route.max_header \"1Mi\" is out of range",
    );
    one(
        "name: x\ncomponents:\n  a:\n    process: x\n    route: { max_header: big }\n",
        5,
        26,
        "route.max_header \"big\" is not a size",
    );
    one(
        "name: x\ncomponents:\n  a:\n    process: x\n    route: { response_timeout: soon }\n",
        5,
        32,
        "route.response_timeout \"soon\" is not a duration",
    );
    one(
        "name: x\ncomponents:\n  a:\n    process: x\n    route: { response_timeout: 2h }\n",
        5,
        32,
        "route.response_timeout \"2h\" is out of range",
    );
    let src = files(&[(
        "/bp/commons.yaml",
        "name: x\ncomponents:\n  a:\n    process: x\n    route: { max_header: 8Ki, response_timeout: 5m }\n",
    )]);
    let bp = load(Path::new("/bp/commons.yaml"), &src).unwrap();
    let route = bp.components["a"].route.clone().unwrap();
    assert_eq!(route.max_header_bytes, Some(8 << 10));
    assert_eq!(route.response_timeout_ms, Some(300_000));
}

#[test]
fn routes_may_keep_the_deployments_names_and_name_a_user_header() {
    one(
        "name: x\ncomponents:\n  a:\n    process: x\n    route: { user_header: Authorization }\n",
        5,
        27,
        "\"authorization\" cannot carry the signed-in user",
    );
    one(
        "name: x\ncomponents:\n  a:\n    process: x\n    route: { user_header: X-Commons-User }\n",
        5,
        27,
        "cannot carry the signed-in user",
    );
    let src = files(&[(
        "/bp/commons.yaml",
        "name: x\ncomponents:\n  a:\n    process: x\n    route: { user_header: X-Remote-User }\n",
    )]);
    let bp = load(Path::new("/bp/commons.yaml"), &src).unwrap();
    let route = bp.components["a"].route.clone().unwrap();
    assert_eq!(route.host, None);
    assert_eq!(route.path, "/");
    assert_eq!(route.user_header.as_deref(), Some("x-remote-user"));
}

#[test]
fn replace_must_be_a_known_strategy() {
    one(
        "name: x\ncomponents:\n  a:\n    process: x\n    replace: blue-green\n",
        5,
        14,
        "\"blue-green\" is not a way to replace a process",
    );
}

#[test]
fn replicas_expand_into_instances_each_after_the_one_before() {
    let src = files(&[(
        "/bp/commons.yaml",
        "name: x\ncomponents:\n  db: { postgres: {} }\n  web:\n    process: serve\n    env: { DB: \"${components.db.url}\" }\n    replicas: 3\n    resources: { memory: 64Mi }\n  worker: { process: work, env: { WEB: \"${components.web.url}\" } }\n",
    )]);
    let bp = load(Path::new("/bp/commons.yaml"), &src).expect("loads");
    let names: Vec<&str> = bp.components.keys().map(String::as_str).collect();
    assert_eq!(names, ["db", "web", "web.2", "web.3", "worker"]);
    assert_eq!(bp.components["web"].depends_on, ["db"]);
    assert_eq!(bp.components["web.2"].depends_on, ["web", "db"]);
    assert_eq!(bp.components["web.3"].depends_on, ["web.2", "db"]);
    // Resources are per instance; others read the first instance.
    assert_eq!(
        bp.components["web.3"].resources.memory_bytes,
        Some(64 << 20)
    );
    assert_eq!(bp.components["worker"].depends_on, ["web"]);
    assert_eq!(commons_blueprint::replica_of("web.3"), ("web", 3));
    assert_eq!(commons_blueprint::replica_of("inc.web"), ("inc.web", 1));
    assert_eq!(commons_blueprint::replica_of("inc.web.2"), ("inc.web", 2));
    assert_eq!(commons_blueprint::replica_of("web"), ("web", 1));
}

#[test]
fn a_site_that_keeps_files_runs_one_replica_and_says_why() {
    let d = errors(
        "name: x\ncomponents:\n  data: { volume: {} }\n  web:\n    process: serve\n    replicas: 2\n",
    );
    assert_eq!(d.len(), 1, "{d}");
    let e = &d.0[0];
    assert_eq!((e.line, e.column), (4, 3), "{e}");
    assert!(
        e.message.contains("asks for 2 replicas") && e.message.contains("\"data\" is a volume"),
        "{e}"
    );
    assert!(e.help.as_deref().unwrap().contains("postgres"), "{e}");
    one(
        "name: x\ncomponents:\n  web: { process: serve, replicas: 0 }\n",
        3,
        36,
        "replicas must be at least 1",
    );
    one(
        "name: x\ncomponents:\n  web: { process: serve, replicas: 65 }\n",
        3,
        36,
        "replicas must be at most 64",
    );
    one(
        "name: x\ncomponents:\n  j: { job: run, replicas: 2 }\n",
        3,
        18,
        "field \"replicas\" does not apply to a job component",
    );
}

#[test]
fn network_says_whether_the_site_reaches_the_internet() {
    let load_text = |text: &str| {
        let src = files(&[("/bp/commons.yaml", text)]);
        load(Path::new("/bp/commons.yaml"), &src).expect("loads")
    };
    let open = load_text("name: x\ncomponents:\n  a: {job: x}\n");
    assert!(
        open.network.egress,
        "egress is allowed unless said otherwise"
    );
    let sealed = load_text("name: x\nnetwork: { egress: false }\ncomponents:\n  a: {job: x}\n");
    assert!(!sealed.network.egress);
    one(
        "name: x\nnetwork: { egress: \"no\" }\ncomponents:\n  a: {job: x}\n",
        2,
        20,
        "network.egress must be true or false",
    );
    one(
        "name: x\nnetwork: { egres: false }\ncomponents:\n  a: {job: x}\n",
        2,
        12,
        "did you mean \"egress\"?",
    );
}

const NOTE_SCHEMA: &str = r#"{"lexicon": 1, "id": "org.example.notes.note", "defs": {"main": {"type": "record", "key": "tid", "record": {"type": "object", "properties": {"text": {"type": "string"}}}}}}"#;

#[test]
fn data_section_loads_with_its_schema() {
    let src = files(&[
        (
            "/bp/commons.yaml",
            "name: notes\ncomponents:\n  web: { process: \"run\" }\ndata:\n  org.example.notes.note:\n    class: private\n    schema: schemas/note.json\n    purpose: Your notes\n    access: [read, write]\n    fields: [text]\n    index: [text]\n",
        ),
        ("/bp/schemas/note.json", NOTE_SCHEMA),
    ]);
    let bp = load(Path::new("/bp/commons.yaml"), &src).unwrap();
    let c = &bp.data["org.example.notes.note"];
    assert_eq!(c.class, commons_blueprint::DataClass::Private);
    assert!(c.access.read && c.access.write);
    assert_eq!(c.fields.as_deref(), Some(&["text".to_string()][..]));
    assert_eq!(c.schema["id"], "org.example.notes.note");
    assert!(bp.files.contains(&PathBuf::from("/bp/schemas/note.json")));
}

#[test]
fn data_section_errors_point_at_the_fix() {
    let base = "name: notes\ncomponents:\n  web: { process: \"run\" }\ndata:\n";
    one(
        &format!("{base}  notes:\n    class: public\n"),
        5,
        3,
        "not a collection name",
    );
    let d = errors(&format!(
        "{base}  org.example.notes.note:\n    class: secret\n    schema: s.json\n    purpose: p\n"
    ));
    assert!(
        d.0.iter()
            .any(|e| (e.line, e.column) == (6, 12) && e.message.contains("unknown class")),
        "{d}"
    );
    let d = errors(&format!("{base}  org.example.notes.note:\n    class: public\n    schema: missing.json\n    purpose: p\n"));
    let messages: Vec<&str> = d.0.iter().map(|e| e.message.as_str()).collect();
    assert!(
        messages.iter().any(|m| m.contains("needs a `licence`")),
        "{d}"
    );
    assert!(
        messages.iter().any(|m| m.contains("cannot read schema")),
        "{d}"
    );
    // A schema whose id is another collection's.
    let src = files(&[
        ("/bp/commons.yaml", &format!("{base}  org.example.notes.other:\n    class: private\n    schema: note.json\n    purpose: p\n")),
        ("/bp/note.json", NOTE_SCHEMA),
    ]);
    let d = load(Path::new("/bp/commons.yaml"), &src).unwrap_err();
    assert_eq!((d.0[0].line, d.0[0].column), (7, 13));
    assert!(
        d.0[0]
            .message
            .contains("must be \"org.example.notes.other\""),
        "{d}"
    );
    // A schema that is not JSON points into the schema file.
    let src = files(&[
        ("/bp/commons.yaml", &format!("{base}  org.example.notes.note:\n    class: private\n    schema: note.json\n    purpose: p\n")),
        ("/bp/note.json", "{\n  \"lexicon\": 1,\n  oops\n}"),
    ]);
    let d = load(Path::new("/bp/commons.yaml"), &src).unwrap_err();
    assert_eq!(d.0[0].file, PathBuf::from("/bp/note.json"));
    assert_eq!(d.0[0].line, 3);
}
