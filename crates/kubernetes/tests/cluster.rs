//! The cluster client against a MOCKED Kubernetes API (`tower-test`): no
//! API server can run on this machine. The mock keeps the objects it is
//! sent, lists them by label selector as the API server does, and plays the
//! controllers' part by reporting each workload's status as the test says.
//! What is checked is what a real server would be asked: server-side apply
//! with the field manager `commons`, the order things are applied in, what
//! is listed and what is deleted. `tests/real_cluster.rs` runs the same
//! against a real cluster when `COMMONS_TEST_KUBECONFIG` names one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use commons_kubernetes::mock::{handle, query_param, MockApi, Report, Seen};
use commons_kubernetes::{render, Cluster, ClusterError, Manifests, Settings, State, Values};
use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};

const SHOP: &str = r#"
name: shop
version: 1.0.0
components:
  db: { postgres: {} }
  migrate:
    job: ./migrate --url "${components.db.url}"
  web:
    image: registry.example/shop/web:1.4
    port: 8080
    replicas: 2
    after: [migrate]
    env: { DATABASE_URL: "${components.db.url}" }
"#;

fn manifests() -> Manifests {
    let files =
        commons_blueprint::InMemory([(PathBuf::from("commons.yaml"), SHOP.to_string())].into());
    let bp = commons_blueprint::load(Path::new("commons.yaml"), &files).unwrap();
    let values = Values {
        passwords: BTreeMap::from([("db".into(), "pw".into())]),
        ..Values::default()
    };
    let settings = Settings {
        process_image: Some("registry.example/runner:1".into()),
        ..Settings::default()
    };
    render("shop", &bp, &values, &settings).unwrap()
}

/// A cluster whose API is the mock.
fn mocked(api: Arc<Mutex<MockApi>>) -> Cluster {
    let (service, mut requests) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, respond)) = requests.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let (code, answer) = handle(&api, &parts, &bytes);
            let response = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(answer))
                .unwrap();
            respond.send_response(response);
        }
    });
    Cluster::new(kube::Client::new(service, "default")).with_poll(Duration::from_millis(5))
}

/// The migration job's object name (a hash of what it runs).
fn job_name(m: &Manifests) -> String {
    let job = m.workloads.iter().find(|w| w.component == "migrate");
    job.unwrap().name.clone()
}

fn labelled(kind: &str, api_version: &str, name: &str, labels: Value) -> Value {
    json!({ "apiVersion": api_version, "kind": kind, "metadata": { "name": name, "namespace": "commons-shop", "labels": labels }, "spec": { "replicas": 1 } })
}

#[tokio::test]
async fn deploy_applies_server_side_in_dependency_order_and_prunes_only_the_sites_leftovers() {
    let m = manifests();
    let job = job_name(&m);
    let api = Arc::new(Mutex::new(MockApi::default()));
    {
        let mut api = api.lock().unwrap();
        let ours =
            json!({ "app.kubernetes.io/managed-by": "commons", "onecommons.org/site": "shop" });
        let key = |p: &str, n: &str| (p.to_string(), "commons-shop".to_string(), n.to_string());
        // A component the blueprint no longer has, and a job of an older version.
        api.objects.insert(
            key("deployments", "worker"),
            labelled("Deployment", "apps/v1", "worker", ours.clone()),
        );
        api.objects.insert(
            key("jobs", "migrate-0000000000"),
            labelled("Job", "batch/v1", "migrate-0000000000", ours),
        );
        // Someone else's, in the same namespace, and another site's.
        api.objects.insert(
            key("deployments", "by-hand"),
            labelled("Deployment", "apps/v1", "by-hand", json!({ "team": "ops" })),
        );
        api.objects.insert(
            key("deployments", "intruder"),
            labelled("Deployment", "apps/v1", "intruder", json!({ "app.kubernetes.io/managed-by": "commons", "onecommons.org/site": "other" })),
        );
        // The database takes a few reads to come up.
        api.reports.insert("db".into(), Report::After(3));
    }
    let cluster = mocked(api.clone());
    let mut heard = Vec::new();
    let statuses = cluster
        .deploy(&m, Duration::from_secs(10), &mut |s| heard.push(s.clone()))
        .await
        .unwrap();
    assert_eq!(statuses.len(), 3);
    assert!(
        statuses.iter().all(|s| s.state == State::Ready),
        "{statuses:?}"
    );
    assert!(heard
        .iter()
        .any(|s| s.object == "StatefulSet/db" && s.state != State::Ready));

    let api = api.lock().unwrap();
    let patches: Vec<&Seen> = api.seen.iter().filter(|s| s.method == "PATCH").collect();
    assert_eq!(patches.len(), m.objects.len(), "each object applied once");
    for p in &patches {
        assert_eq!(
            p.content_type, "application/apply-patch+yaml",
            "server-side apply"
        );
        assert_eq!(
            query_param(&p.query, "fieldManager").as_deref(),
            Some("commons")
        );
        assert_eq!(query_param(&p.query, "force").as_deref(), Some("true"));
    }
    assert_eq!(
        patches[0].path, "/api/v1/namespaces/commons-shop",
        "the namespace first"
    );
    let at = |method: &str, path_end: &str| {
        api.seen
            .iter()
            .position(|s| s.method == method && s.path.ends_with(path_end))
            .unwrap_or_else(|| panic!("no {method} …{path_end}"))
    };
    // The job waits for the database to be ready (three reads progressing,
    // the fourth ready), the web for the job.
    let job_applied = at("PATCH", &format!("/jobs/{job}"));
    let db_reads_before = api.seen[..job_applied]
        .iter()
        .filter(|s| s.method == "GET" && s.path.ends_with("/statefulsets/db"))
        .count();
    assert_eq!(db_reads_before, 4);
    assert!(at("PATCH", "/deployments/web") > at("GET", &format!("/jobs/{job}")));
    assert!(at("PATCH", "/services/web") < at("PATCH", "/statefulsets/db"));

    // Lists ask for the site's own objects only; only its leftovers go.
    for list in api
        .seen
        .iter()
        .filter(|s| s.method == "GET" && s.path.ends_with('s'))
    {
        assert_eq!(
            query_param(&list.query, "labelSelector").as_deref(),
            Some("app.kubernetes.io/managed-by=commons,onecommons.org/site=shop"),
            "{}",
            list.path
        );
    }
    let deleted: Vec<&str> = api
        .seen
        .iter()
        .filter(|s| s.method == "DELETE")
        .map(|s| s.path.as_str())
        .collect();
    assert_eq!(
        deleted,
        [
            "/apis/apps/v1/namespaces/commons-shop/deployments/worker",
            "/apis/batch/v1/namespaces/commons-shop/jobs/migrate-0000000000",
        ]
    );
    let delete = api.seen.iter().find(|s| s.method == "DELETE").unwrap();
    assert_eq!(
        delete.body["propagationPolicy"], "Background",
        "a job's pods go with it"
    );
    assert!(api.objects.keys().any(|(_, _, n)| n == "by-hand"));
    assert!(api.objects.keys().any(|(_, _, n)| n == "intruder"));
}

#[tokio::test]
async fn a_failed_job_stops_the_deploy_before_what_comes_after_it() {
    let m = manifests();
    let job = job_name(&m);
    let api = Arc::new(Mutex::new(MockApi::default()));
    api.lock()
        .unwrap()
        .reports
        .insert(job.clone(), Report::Failed);
    let e = mocked(api.clone())
        .deploy(&m, Duration::from_secs(10), &mut |_| {})
        .await
        .unwrap_err();
    match &e {
        ClusterError::Failed { object, reason } => {
            assert_eq!(object, &format!("Job/{job}"));
            assert!(reason.contains("backoff limit"), "{reason}");
        }
        other => panic!("expected the job's failure, got {other}"),
    }
    let api = api.lock().unwrap();
    assert!(!api
        .seen
        .iter()
        .any(|s| s.method == "PATCH" && s.path.ends_with("/deployments/web")));
    assert!(
        !api.seen.iter().any(|s| s.method == "DELETE"),
        "nothing pruned after a failure"
    );
}

#[tokio::test]
async fn a_workload_that_never_comes_up_times_out_naming_it() {
    let m = manifests();
    let api = Arc::new(Mutex::new(MockApi::default()));
    api.lock()
        .unwrap()
        .reports
        .insert("db".into(), Report::After(u32::MAX));
    let e = mocked(api)
        .deploy(&m, Duration::from_millis(100), &mut |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClusterError::TimedOut { object, .. } if object == "StatefulSet/db"),
        "{e}"
    );
    assert!(e.to_string().contains("0 of 1 ready"), "{e}");
}

#[tokio::test]
async fn a_refusal_says_what_was_refused_and_why() {
    let api = Arc::new(Mutex::new(MockApi {
        refuse: Some((403, "Forbidden")),
        ..MockApi::default()
    }));
    let e = mocked(api)
        .deploy(&manifests(), Duration::from_secs(1), &mut |_| {})
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("the cluster refused to apply Namespace/commons-shop"),
        "{text}"
    );
    assert!(
        text.contains("HTTP 403") && text.contains("cannot patch"),
        "{text}"
    );
}

/// The site deployed on a fresh mock, every workload ready.
async fn deployed() -> (Arc<Mutex<MockApi>>, Cluster) {
    let api = Arc::new(Mutex::new(MockApi::default()));
    let cluster = mocked(api.clone());
    cluster
        .deploy(&manifests(), Duration::from_secs(10), &mut |_| {})
        .await
        .unwrap();
    (api, cluster)
}

#[tokio::test]
async fn status_reads_the_sites_workloads_back_and_destroy_removes_its_namespace() {
    let (api, cluster) = deployed().await;
    api.lock()
        .unwrap()
        .reports
        .insert("web".into(), Report::After(u32::MAX));
    let statuses = cluster.status("shop", "commons-shop").await.unwrap();
    let objects: Vec<&str> = statuses.iter().map(|s| s.object.as_str()).collect();
    assert_eq!(objects.len(), 3, "{objects:?}");
    let web = statuses
        .iter()
        .find(|s| s.object == "Deployment/web")
        .unwrap();
    assert_eq!((web.desired, web.ready), (2, 0));
    assert!(
        matches!(&web.state, State::Progressing { reason } if reason == "0 of 2 updated, 0 ready")
    );
    assert_eq!(web.component, "web");
    let json = serde_json::to_value(web).unwrap();
    assert_eq!(json["state"], "progressing");

    cluster.destroy("commons-shop").await.unwrap();
    assert!(!api
        .lock()
        .unwrap()
        .objects
        .keys()
        .any(|(p, _, n)| p == "namespaces" && n == "commons-shop"));
    // Gone already: not an error.
    cluster.destroy("commons-shop").await.unwrap();
}

#[tokio::test]
async fn a_watch_follows_the_workloads_until_told_to_stop() {
    let (api, cluster) = deployed().await;
    // A rollout: the web takes two more reads to be ready.
    {
        let mut api = api.lock().unwrap();
        let reads = api.reads.get("web").copied().unwrap_or(0);
        api.reports.insert("web".into(), Report::After(reads + 2));
    }
    let mut heard: Vec<Vec<(String, State)>> = Vec::new();
    cluster
        .watch("shop", "commons-shop", &mut |now| {
            heard.push(
                now.iter()
                    .map(|s| (s.object.clone(), s.state.clone()))
                    .collect(),
            );
            !now.iter().all(|s| s.state == State::Ready) || now.len() < 3
        })
        .await
        .unwrap();
    let web = |h: &Vec<(String, State)>| {
        h.iter()
            .find(|(o, _)| o == "Deployment/web")
            .map(|(_, s)| s.clone())
    };
    assert!(
        heard
            .iter()
            .any(|h| matches!(web(h), Some(State::Progressing { .. }))),
        "the rollout was heard: {heard:?}"
    );
    let last = heard.last().unwrap();
    assert_eq!(last.len(), 3, "{last:?}");
    assert!(last.iter().all(|(_, s)| *s == State::Ready), "{last:?}");
    // Watched, with the site's selector, from the version last seen.
    let api = api.lock().unwrap();
    let watches: Vec<&Seen> = api
        .seen
        .iter()
        .filter(|s| query_param(&s.query, "watch").as_deref() == Some("true"))
        .collect();
    assert!(watches.len() >= 6, "watched again after the first ended");
    assert!(watches
        .iter()
        .all(|w| query_param(&w.query, "labelSelector").as_deref()
            == Some("app.kubernetes.io/managed-by=commons,onecommons.org/site=shop")));
    assert!(watches[3..]
        .iter()
        .any(|w| query_param(&w.query, "resourceVersion").as_deref() != Some("0")));
}
