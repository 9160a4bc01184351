//! A site on a provider's Kubernetes cluster through the real `commons`
//! binary — against a MOCKED Kubernetes API served on loopback
//! (`commons_kubernetes::mock`), since no API server can run here: plan,
//! deploy (refused first, with the blueprint line to fix), status, a second
//! deploy keeping the site's secrets, a local deploy of the same name
//! refused, destroy. What a real cluster does with the objects is
//! `crates/kubernetes/tests/real_cluster.rs`'s, with `COMMONS_TEST_KUBECONFIG`.

mod common;

use std::sync::{Arc, Mutex};

use common::Sandbox;
use commons_kubernetes::mock::MockApi;

const SHOP: &str = r#"name: shop
secrets:
  session_key: { generate: 40 }
components:
  db: { postgres: {} }
  migrate:
    job: ./migrate "${components.db.url}"
  web:
    image: registry.example/shop/web:1.4
    port: 8080
    replicas: 2
    after: [migrate]
    env:
      SESSION_KEY: "${secrets.session_key}"
      DATABASE_URL: "${components.db.url}"
"#;

/// The mock on a loopback port, and a kubeconfig that points at it.
fn mocked_cluster(
    s: &Sandbox,
) -> (
    Arc<Mutex<MockApi>>,
    std::path::PathBuf,
    tokio::runtime::Runtime,
) {
    let api = Arc::new(Mutex::new(MockApi::default()));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(commons_kubernetes::mock::serve(api.clone(), listener));
    let kubeconfig = s.dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster: {{ server: \"http://127.0.0.1:{port}\" }}\n\
             users:\n- name: provider\n  user: {{ token: not-a-real-token }}\ncontexts:\n- name: mock\n  context: {{ cluster: mock, user: provider }}\n\
             current-context: mock\n"
        ),
    )
    .unwrap();
    (api, kubeconfig, rt)
}

fn secret_data(api: &Arc<Mutex<MockApi>>) -> serde_json::Value {
    let api = api.lock().unwrap();
    let secret = api
        .objects
        .iter()
        .find(|((plural, _, name), _)| plural == "secrets" && name == "commons-env")
        .map(|(_, o)| o.clone())
        .expect("the site's Secret was applied");
    secret["stringData"].clone()
}

#[test]
fn a_site_is_planned_deployed_read_back_and_destroyed_on_a_mocked_cluster() {
    let s = Sandbox::new("kubernetes");
    s.blueprint(SHOP);
    let (api, kubeconfig, _rt) = mocked_cluster(&s);
    let kc = kubeconfig.to_str().unwrap();

    // A `job:` needs the provider's process image: refused at its line,
    // before anything reaches the cluster.
    let r = s.run(&["deploy", "--kubeconfig", kc]);
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(r.stderr().contains("commons.yaml:6:3"), "{}", r.all());
    assert!(r.stderr().contains("process_image"), "{}", r.all());
    assert!(api.lock().unwrap().seen.is_empty(), "nothing applied");

    let image = ["--process-image", "registry.example/runner:1"];
    let plan = s.ok(&[&["plan", "--kubeconfig", kc][..], &image[..]].concat());
    let yaml = plan.stdout();
    for kind in [
        "Namespace",
        "ResourceQuota",
        "NetworkPolicy",
        "Secret",
        "StatefulSet",
        "Job",
        "Deployment",
    ] {
        assert!(
            yaml.contains(&format!("kind: {kind}\n")),
            "no {kind}:\n{yaml}"
        );
    }
    assert!(yaml.contains("(redacted)"));
    assert!(
        api.lock().unwrap().seen.is_empty(),
        "plan reads nothing from the cluster"
    );

    let r = s.ok(&[&["deploy", "--kubeconfig", kc, "--json"][..], &image[..]].concat());
    let out = r.json();
    assert_eq!(out["namespace"], "commons-shop");
    let workloads = out["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 3, "{out}");
    assert!(workloads.iter().all(|w| w["state"] == "ready"), "{out}");
    let secrets = secret_data(&api);
    let key = secrets["web.SESSION_KEY"].as_str().unwrap().to_string();
    assert_eq!(key.len(), 40);
    assert!(!r.all().contains(&key), "a secret never reaches the output");
    {
        let api = api.lock().unwrap();
        assert!(api
            .seen
            .iter()
            .all(|s| s.method != "PATCH" || s.query.contains("fieldManager=commons")));
    }

    let status = s.ok(&["status", "shop", "--json"]).json();
    assert_eq!(status["kubernetes"]["namespace"], "commons-shop");
    let objects: Vec<&str> = status["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["object"].as_str().unwrap())
        .collect();
    assert_eq!(objects.len(), 3, "{status}");
    assert!(objects.contains(&"Deployment/web") && objects.contains(&"StatefulSet/db"));
    let listed = s.ok(&["list", "--json"]).json();
    assert_eq!(listed[0]["name"], "shop", "{listed}");
    assert_eq!(listed[0]["kubernetes"]["namespace"], "commons-shop");
    assert!(s
        .ok(&["list"])
        .stdout()
        .contains("shop        cluster   namespace commons-shop"));
    let text = s.ok(&["status", "shop"]).stdout();
    assert!(
        text.contains("shop on Kubernetes (namespace commons-shop"),
        "{text}"
    );
    assert!(
        text.contains("Deployment/web") && text.contains("2/2  ready"),
        "{text}"
    );

    // Followed until every workload is ready: a rollout of the web first.
    {
        let mut api = api.lock().unwrap();
        let reads = api.reads.get("web").copied().unwrap_or(0);
        api.reports.insert(
            "web".into(),
            commons_kubernetes::mock::Report::After(reads + 2),
        );
    }
    let watched = s.ok(&["status", "shop", "--watch"]).stdout();
    assert!(
        watched.contains("Waiting (0 of 2 updated, 0 ready) Deployment/web 0/2"),
        "{watched}"
    );
    assert!(watched.contains("Ready Deployment/web 2/2"), "{watched}");
    let r = s.run(&["status", "elsewhere", "--watch"]);
    assert_ne!(r.code(), 0);
    assert!(
        !r.stderr().contains("--watch follows"),
        "not a site at all: {}",
        r.all()
    );

    // Deployed again, the site keeps its secret and its database password.
    s.ok(&[&["deploy", "--kubeconfig", kc][..], &image[..]].concat());
    assert_eq!(secret_data(&api), secrets);

    // The name is the cluster's now: no second copy here.
    let r = s.run(&["deploy"]);
    assert_eq!(r.code(), 2, "{}", r.all());
    assert!(
        r.stderr().contains("runs on the Kubernetes cluster"),
        "{}",
        r.all()
    );

    s.ok(&["destroy", "shop"]);
    assert!(api
        .lock()
        .unwrap()
        .seen
        .iter()
        .any(|s| s.method == "DELETE" && s.path == "/api/v1/namespaces/commons-shop"));
    assert!(!s.home.join("kubernetes/shop.json").exists());
    assert_ne!(s.run(&["status", "shop"]).code(), 0, "gone");
}
