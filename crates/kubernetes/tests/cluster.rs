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

/// One request as the mock saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

/// How the mock's "controllers" report a workload, by object name.
#[derive(Clone, Copy, PartialEq)]
enum Report {
    Ready,
    Failed,
    /// Progressing for this many reads, then ready.
    After(u32),
}

#[derive(Default)]
struct Api {
    /// (plural, namespace, name) → object.
    objects: BTreeMap<(String, String, String), Value>,
    seen: Vec<Seen>,
    reports: BTreeMap<String, Report>,
    reads: BTreeMap<String, u32>,
    /// Answer every request with this status and reason.
    refuse: Option<(u16, &'static str)>,
}

fn matches(labels: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap();
        labels[k] == v
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            v.replace("%2F", "/")
                .replace("%2C", ",")
                .replace("%3D", "=")
        })
    })
}

impl Api {
    /// The object with the status its controller would give it.
    fn with_status(&mut self, plural: &str, mut object: Value) -> Value {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let reads = self.reads.entry(name.clone()).or_default();
        *reads += 1;
        let report = self.reports.get(&name).copied().unwrap_or(Report::Ready);
        let ready = match report {
            Report::Ready => true,
            Report::Failed => false,
            Report::After(n) => *reads > n,
        };
        let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
        object["metadata"]["generation"] = json!(1);
        object["status"] = match (plural, ready) {
            ("jobs", true) => {
                json!({ "succeeded": 1, "conditions": [{ "type": "Complete", "status": "True" }] })
            }
            ("jobs", false) if report == Report::Failed => json!({ "failed": 3, "conditions": [
                { "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit" },
            ] }),
            ("jobs", false) => json!({ "active": 1 }),
            ("deployments", true) => {
                json!({ "observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas })
            }
            ("deployments", false) => {
                json!({ "observedGeneration": 1, "replicas": replicas, "updatedReplicas": 0, "readyReplicas": 0 })
            }
            ("statefulsets", true) => {
                json!({ "observedGeneration": 1, "replicas": replicas, "readyReplicas": replicas, "currentRevision": "r1", "updateRevision": "r1" })
            }
            (_, _) => {
                json!({ "observedGeneration": 1, "replicas": replicas, "readyReplicas": 0, "currentRevision": "r0", "updateRevision": "r1" })
            }
        };
        object
    }

    fn answer(&mut self, seen: &Seen) -> (u16, Value) {
        if let Some((code, reason)) = self.refuse {
            return (
                code,
                json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
                        "message": format!("namespaces is {reason}: User \"provider\" cannot patch resource") }),
            );
        }
        // /api/v1/namespaces/NS[/PLURAL[/NAME]] or /apis/G/V/namespaces/NS/PLURAL[/NAME]
        let parts: Vec<&str> = seen.path.split('/').filter(|p| !p.is_empty()).collect();
        let at = parts.iter().position(|p| *p == "namespaces").unwrap();
        let rest = &parts[at + 1..];
        let (plural, ns, name) = match rest {
            [name] => ("namespaces", "", Some(*name)),
            [ns, plural] => (*plural, *ns, None),
            [ns, plural, name] => (*plural, *ns, Some(*name)),
            _ => panic!("unexpected path {}", seen.path),
        };
        let key = |name: &str| (plural.to_string(), ns.to_string(), name.to_string());
        match (seen.method.as_str(), name) {
            ("PATCH", Some(name)) => {
                self.objects.insert(key(name), seen.body.clone());
                (200, seen.body.clone())
            }
            ("GET", Some(name)) => match self.objects.get(&key(name)).cloned() {
                Some(object) => (200, self.with_status(plural, object)),
                None => (
                    404,
                    json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found" }),
                ),
            },
            ("GET", None) => {
                let selector = query_param(&seen.query, "labelSelector").unwrap_or_default();
                let items: Vec<Value> = self
                    .objects
                    .iter()
                    .filter(|((p, n, _), o)| {
                        p == plural && n == ns && matches(&o["metadata"]["labels"], &selector)
                    })
                    .map(|(_, o)| o.clone())
                    .collect::<Vec<_>>()
                    .into_iter()
                    .map(|o| self.with_status(plural, o))
                    .collect();
                (
                    200,
                    json!({ "kind": "List", "apiVersion": "v1", "metadata": { "resourceVersion": "1" }, "items": items }),
                )
            }
            ("DELETE", Some(name)) => match self.objects.remove(&key(name)) {
                Some(object) => (200, object),
                None => (
                    404,
                    json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found" }),
                ),
            },
            other => panic!("unexpected request {other:?} {}", seen.path),
        }
    }
}

/// A cluster whose API is the mock.
fn mocked(api: Arc<Mutex<Api>>) -> Cluster {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, respond)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let seen = Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or_default().to_string(),
                content_type: parts
                    .headers
                    .get("content-type")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let (code, answer) = {
                let mut api = api.lock().unwrap();
                api.seen.push(seen.clone());
                api.answer(&seen)
            };
            let response = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
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
    let api = Arc::new(Mutex::new(Api::default()));
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
    let api = Arc::new(Mutex::new(Api::default()));
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
    let api = Arc::new(Mutex::new(Api::default()));
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
    let api = Arc::new(Mutex::new(Api {
        refuse: Some((403, "Forbidden")),
        ..Api::default()
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

#[tokio::test]
async fn status_reads_the_sites_workloads_back_and_destroy_removes_its_namespace() {
    let m = manifests();
    let api = Arc::new(Mutex::new(Api::default()));
    let cluster = mocked(api.clone());
    cluster
        .deploy(&m, Duration::from_secs(10), &mut |_| {})
        .await
        .unwrap();
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
