//! A MOCKED Kubernetes API server, for tests only (feature `mock`): no API
//! server can run where the project is built and tested. It keeps the
//! objects it is sent, lists them by label selector as the API server does,
//! and plays the controllers' part by reporting each workload's status as
//! the test says. Reached in-process (`tower-test`, in this crate's tests)
//! or over HTTP on loopback ([`serve`], for the CLI's tests).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

/// One request as the mock saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

/// How the mock's "controllers" report a workload, by object name.
#[derive(Clone, Copy, PartialEq)]
pub enum Report {
    Ready,
    Failed,
    /// Progressing for this many reads, then ready.
    After(u32),
}

/// The mocked API server's state.
#[derive(Default)]
pub struct MockApi {
    /// (plural, namespace, name) → object.
    pub objects: BTreeMap<(String, String, String), Value>,
    /// Every request, in order.
    pub seen: Vec<Seen>,
    /// How workloads report, by object name (unset: ready).
    pub reports: BTreeMap<String, Report>,
    /// How often each object was read.
    pub reads: BTreeMap<String, u32>,
    /// Answer every request with this status and reason.
    pub refuse: Option<(u16, &'static str)>,
}

fn matches(labels: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let (k, v) = term.split_once('=').unwrap();
        labels[k] == v
    })
}

/// A query parameter, percent-decoded as far as selectors need.
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            v.replace("%2F", "/")
                .replace("%2C", ",")
                .replace("%3D", "=")
        })
    })
}

impl MockApi {
    /// The object with the status its controller would give it.
    fn with_status(&mut self, plural: &str, mut object: Value) -> Value {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let reads = self.reads.entry(name.clone()).or_default();
        *reads += 1;
        let version = reads.to_string();
        let report = self.reports.get(&name).copied().unwrap_or(Report::Ready);
        let ready = match report {
            Report::Ready => true,
            Report::Failed => false,
            Report::After(n) => *reads > n,
        };
        let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
        object["metadata"]["generation"] = json!(1);
        object["metadata"]["resourceVersion"] = json!(version);
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

    /// The answer to one request, as (status, body).
    pub fn answer(&mut self, seen: &Seen) -> (u16, Value) {
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
                if watching(seen) {
                    // Each as added, then the watch ends (as at a timeout).
                    let events = items
                        .into_iter()
                        .map(|o| json!({ "type": "ADDED", "object": o }));
                    return (200, Value::Array(events.collect()));
                }
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

/// One request through the mock: recorded, then answered as (status,
/// JSON body).
pub fn handle(
    api: &Mutex<MockApi>,
    parts: &hyper::http::request::Parts,
    body: &[u8],
) -> (u16, Vec<u8>) {
    let seen = Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        content_type: parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
    };
    let mut api = api.lock().unwrap_or_else(|p| p.into_inner());
    api.seen.push(seen.clone());
    let (code, answer) = api.answer(&seen);
    let body = match answer {
        // A watch's events, one JSON document a line.
        Value::Array(events) if watching(&seen) => events
            .iter()
            .map(|e| format!("{e}\n"))
            .collect::<String>()
            .into_bytes(),
        answer => serde_json::to_vec(&answer).unwrap_or_default(),
    };
    (code, body)
}

fn watching(seen: &Seen) -> bool {
    query_param(&seen.query, "watch").is_some_and(|w| w == "true" || w == "1")
}

/// Serves `api` over HTTP/1.1 on `listener` until the task is dropped.
pub async fn serve(api: Arc<Mutex<MockApi>>, listener: tokio::net::TcpListener) {
    use http_body_util::BodyExt;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let api = api.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let api = api.clone();
                    async move {
                        let (parts, body) = request.into_parts();
                        let bytes = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let (code, answer) = handle(&api, &parts, &bytes);
                        hyper::Response::builder()
                            .status(code)
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(hyper::body::Bytes::from(answer)))
                    }
                },
            );
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}
