//! A site's Kubernetes objects against golden files (no cluster can run
//! here: what the API server would be sent is checked instead, and each
//! object is read back through its `k8s-openapi` type so a misspelt field
//! cannot hide). `UPDATE_GOLDEN=1 cargo test -p commons-kubernetes` writes
//! the files anew; review the diff before committing it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use commons_kubernetes::{render, Settings, Values, WorkloadKind};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    Namespace, PersistentVolumeClaim, ResourceQuota, Secret, Service,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::Value;

const SHOP: &str = r#"
name: shop
version: 1.0.0
inputs:
  greeting: { type: string, default: hello }
secrets:
  session_key: { generate: 32 }
components:
  db: { postgres: {} }
  migrate:
    job: ./migrate --url "${components.db.url}" --say ${inputs.greeting}
    timeout: 2m
    retries: 2
  web:
    image: registry.example/shop/web:1.4
    command: [serve, --port, "8080"]
    port: 8080
    replicas: 3
    after: [migrate]
    env:
      DATABASE_URL: "${components.db.url}"
      SESSION_KEY: "${secrets.session_key}"
      GREETING: "${inputs.greeting}, world"
    health: { http: /healthz, interval: 2s, timeout: 3s }
    resources: { memory: 256Mi, cpu: 0.5 }
    route: { path: / }
  assets: { static: ./public }
"#;

const NOTES: &str = r#"
name: notes
version: 0.1.0
network: { egress: false }
components:
  files: { volume: {} }
  db: { sqlite: {} }
  web:
    process: python3 app.py --db ${components.db.path} --files ${components.files.path}
    health: { http: /health }
    resources: { memory: 128Mi }
  search:
    image: registry.example/search:2
    port: 7700
    volumes: { /meili_data: "${components.files.path}" }
"#;

fn values() -> Values {
    Values {
        inputs: serde_json::Map::new(),
        secrets: BTreeMap::from([("session_key".into(), "s3cr3t-session-key-value".into())]),
        passwords: BTreeMap::from([("db".into(), "pg-password-0123456789".into())]),
        secrets_print: "print-1".into(),
    }
}

fn settings() -> Settings {
    Settings {
        process_image: Some("registry.example/commons/runner:bookworm".into()),
        ..Settings::default()
    }
}

fn load(text: &str) -> commons_blueprint::Blueprint {
    let files = commons_blueprint::InMemory(
        [
            (PathBuf::from("commons.yaml"), text.to_string()),
            (
                PathBuf::from("public/index.html"),
                "<h1>shop</h1>".to_string(),
            ),
        ]
        .into(),
    );
    commons_blueprint::load(Path::new("commons.yaml"), &files).expect("the test's blueprint loads")
}

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with UPDATE_GOLDEN=1 to write it",
            path.display()
        )
    });
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from what is rendered now, first at line {}:\n  golden:   {:?}\n  rendered: {:?}\nrun with UPDATE_GOLDEN=1 to accept the new output",
            path.display(),
            first + 1,
            expected.lines().nth(first),
            actual.lines().nth(first),
        );
    }
}

/// Each object read into its API type and written back is unchanged: no
/// field the API does not know.
fn typed_round_trip(object: &Value) {
    fn check<T: serde::de::DeserializeOwned + serde::Serialize>(object: &Value) {
        let typed: T = serde_json::from_value(object.clone())
            .unwrap_or_else(|e| panic!("{} does not read as its type: {e}", object["kind"]));
        let back = serde_json::to_value(&typed).unwrap();
        assert_eq!(
            &strip_nulls(object.clone()),
            &back,
            "{} has fields its type drops",
            object["kind"]
        );
    }
    match object["kind"].as_str().unwrap() {
        "Namespace" => check::<Namespace>(object),
        "ResourceQuota" => check::<ResourceQuota>(object),
        "NetworkPolicy" => check::<NetworkPolicy>(object),
        "Secret" => check::<Secret>(object),
        "PersistentVolumeClaim" => check::<PersistentVolumeClaim>(object),
        "Service" => check::<Service>(object),
        "Deployment" => check::<Deployment>(object),
        "StatefulSet" => check::<StatefulSet>(object),
        "Job" => check::<Job>(object),
        other => panic!("unexpected kind {other}"),
    }
}

fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_nulls).collect()),
        other => other,
    }
}

#[test]
fn a_site_with_a_database_a_migration_and_three_replicas_matches_its_golden_file() {
    let m = render("shop", &load(SHOP), &values(), &settings()).unwrap();
    assert_eq!(m.namespace, "commons-shop");
    for object in &m.objects {
        typed_round_trip(object);
        assert_eq!(
            object["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "commons"
        );
    }
    let kinds: Vec<(&str, &str)> = m
        .workloads
        .iter()
        .map(|w| (w.kind.name(), w.component.as_str()))
        .collect();
    // The database first, the migration once it is ready, the web after.
    assert_eq!(
        kinds,
        [
            ("StatefulSet", "db"),
            ("Job", "migrate"),
            ("Deployment", "web")
        ]
    );
    let web = m.workloads.iter().find(|w| w.component == "web").unwrap();
    assert_eq!(web.replicas, 3, "web, web.2 and web.3 are one Deployment");
    assert!(m.workloads[1].name.starts_with("migrate-"));
    golden("shop.yaml", &m.to_yaml());
}

#[test]
fn components_with_data_become_stateful_sets_with_claims_and_no_egress_is_kept() {
    let m = render("notes", &load(NOTES), &values(), &settings()).unwrap();
    for object in &m.objects {
        typed_round_trip(object);
    }
    assert!(m
        .workloads
        .iter()
        .all(|w| w.kind == WorkloadKind::StatefulSet && w.replicas == 1));
    let claims: Vec<&str> = m
        .objects
        .iter()
        .filter(|o| o["kind"] == "PersistentVolumeClaim")
        .map(|o| o["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(claims, ["data-files", "data-db"]);
    let policy = m
        .objects
        .iter()
        .find(|o| o["metadata"]["name"] == "site-traffic")
        .unwrap();
    let text = policy.to_string();
    assert!(
        !text.contains("0.0.0.0/0"),
        "egress: false leaves no way out: {text}"
    );
    golden("notes.yaml", &m.to_yaml());
}

#[test]
fn secrets_reach_containers_only_through_the_sites_secret() {
    let m = render("shop", &load(SHOP), &values(), &settings()).unwrap();
    for object in &m.objects {
        let text = object.to_string();
        let holds =
            text.contains("s3cr3t-session-key-value") || text.contains("pg-password-0123456789");
        assert_eq!(holds, object["kind"] == "Secret", "{}", object["kind"]);
    }
    let shown = m.to_yaml();
    assert!(!shown.contains("s3cr3t") && !shown.contains("pg-password"));
    assert!(shown.contains("(redacted)"));
    let web = m
        .objects
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .unwrap();
    let env = &web["spec"]["template"]["spec"]["containers"][0]["env"];
    let named = |n: &str| {
        env.as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(
        named("SESSION_KEY")["valueFrom"]["secretKeyRef"]["key"],
        "web.SESSION_KEY"
    );
    assert_eq!(
        named("DATABASE_URL")["valueFrom"]["secretKeyRef"]["name"],
        "commons-env"
    );
    assert_eq!(named("GREETING")["value"], "hello, world");
    // A command never has a value pasted in: it reads the environment.
    let job = m.objects.iter().find(|o| o["kind"] == "Job").unwrap();
    let command = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
        .as_str()
        .unwrap();
    assert_eq!(
        command,
        "./migrate --url \"${COMMONS_COMPONENT_DB_URL}\" --say ${COMMONS_INPUT_GREETING}"
    );
}

#[test]
fn every_pod_meets_the_restricted_level_and_cannot_reach_the_cluster_api() {
    for (site, text) in [("shop", SHOP), ("notes", NOTES)] {
        let m = render(site, &load(text), &values(), &settings()).unwrap();
        let ns = &m.objects[0];
        assert_eq!(
            ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
            "restricted"
        );
        for object in m
            .objects
            .iter()
            .filter(|o| o["spec"]["template"].is_object())
        {
            let pod = &object["spec"]["template"]["spec"];
            assert_eq!(pod["automountServiceAccountToken"], false);
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"],
                "RuntimeDefault"
            );
            for c in pod["containers"].as_array().unwrap() {
                let sc = &c["securityContext"];
                assert_eq!(sc["allowPrivilegeEscalation"], false);
                assert_eq!(sc["capabilities"]["drop"][0], "ALL");
                assert!(
                    c["resources"]["limits"]["cpu"].is_string(),
                    "the quota needs limits"
                );
            }
        }
        let quota = m
            .objects
            .iter()
            .find(|o| o["kind"] == "ResourceQuota")
            .unwrap();
        assert_eq!(quota["spec"]["hard"]["services.nodeports"], "0");
    }
    // web: 3 instances and one more while rolling, 500m each; db and the job 500m.
    let m = render("shop", &load(SHOP), &values(), &settings()).unwrap();
    let quota = m
        .objects
        .iter()
        .find(|o| o["kind"] == "ResourceQuota")
        .unwrap();
    assert_eq!(quota["spec"]["hard"]["limits.cpu"], "3000m");
    assert_eq!(quota["spec"]["hard"]["pods"], "6");
}

#[test]
fn a_job_is_renamed_when_what_it_runs_changes_and_only_then() {
    let name = |text: &str, secret: &str| {
        let mut v = values();
        v.secrets.insert("session_key".into(), secret.into());
        let m = render("shop", &load(text), &v, &settings()).unwrap();
        m.workloads
            .iter()
            .find(|w| w.kind == WorkloadKind::Job)
            .unwrap()
            .name
            .clone()
    };
    let first = name(SHOP, "a");
    assert_eq!(first, name(SHOP, "b"), "the job reads no secret");
    assert_ne!(first, name(&SHOP.replace("--say", "--print"), "a"));
}

#[test]
fn what_cannot_run_on_a_cluster_is_refused_at_its_line_with_the_fix() {
    let e = render("shop", &load(SHOP), &values(), &Settings::default()).unwrap_err();
    assert_eq!(e.0.len(), 1, "{e}");
    let text = e.to_string();
    assert!(
        text.starts_with("commons.yaml:10:3: component \"migrate\""),
        "{text}"
    );
    assert!(text.contains("set `process_image`"), "{text}");

    let bad = r#"
name: bad
components:
  web:
    image: registry.example/web:1
    port: 80
    volumes: { /data: "/srv/elsewhere" }
"#;
    let e = render("bad", &load(bad), &values(), &settings()).unwrap_err();
    assert!(e.to_string().contains("commons.yaml:4:3"), "{e}");
    assert!(e.to_string().contains("${components.NAME.path}"), "{e}");

    let mut v = values();
    v.secrets.clear();
    let e = render("shop", &load(SHOP), &v, &settings()).unwrap_err();
    assert!(
        e.to_string()
            .contains("secret \"session_key\" has no value"),
        "{e}"
    );
}

#[test]
fn a_long_chain_declared_backwards_comes_up_in_dependency_order() {
    // 2,000 images, each after the one before, declared last first: the
    // order is the dependencies', found in time linear in the site's size.
    let n = 2000;
    let mut text = String::from("name: chain\ncomponents:\n");
    for i in (0..n).rev() {
        text.push_str(&format!(
            "  c{i}:\n    image: registry.example/c:1\n    port: 8080\n{}",
            if i > 0 {
                format!("    after: [c{}]\n", i - 1)
            } else {
                String::new()
            }
        ));
    }
    let m = render("chain", &load(&text), &values(), &settings()).unwrap();
    let order: Vec<String> = m.workloads.iter().map(|w| w.name.clone()).collect();
    let expected: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    assert_eq!(order, expected);
    assert_eq!(m.workloads[1].after, ["c0"]);
}

#[test]
fn pods_that_read_a_secret_roll_when_it_changes_and_only_they() {
    let annotation = |print: &str, kind: &str| {
        let mut v = values();
        v.secrets_print = print.into();
        let m = render("shop", &load(SHOP), &v, &settings()).unwrap();
        let o = m
            .objects
            .iter()
            .find(|o| o["kind"] == kind)
            .unwrap()
            .clone();
        o["spec"]["template"]["metadata"]["annotations"]["onecommons.org/secrets"].clone()
    };
    assert_eq!(annotation("print-1", "Deployment"), "print-1");
    assert_eq!(annotation("print-2", "Deployment"), "print-2");
    // The database's own pod reads its password from the Secret at first
    // start only: PostgreSQL keeps it in its data.
    assert!(annotation("print-2", "StatefulSet").is_null());
}
