//! A site's Kubernetes objects, made from its blueprint: pure, no cluster.
//!
//! Each site gets a namespace of its own, held to the `restricted` pod
//! security level, with a quota that is the sum of its components' limits
//! and network policies that deny everything but the site's own traffic,
//! the platform's gateway coming in and (unless the blueprint turns it off)
//! the internet going out — never another tenant's pods, the cluster's
//! private ranges or a cloud's metadata address. Then, per component:
//!
//! | blueprint | objects |
//! |---|---|
//! | `process:`, `image:` without data | Deployment (`replicas:` instances, one more at a time while rolling, none fewer) and Service |
//! | `process:`, `image:` reading a `volume:` or `sqlite:` | StatefulSet of one, the data's PersistentVolumeClaims mounted, and Service |
//! | `volume:`, `sqlite:` | PersistentVolumeClaim |
//! | `postgres:` | StatefulSet of one running PostgreSQL on a claim of its own, its password in the site's Secret, and Service |
//! | `job:` | Job named by a hash of what it runs, so a change runs it again and an unchanged one does not |
//! | `static:` | nothing: the platform's gateway serves the files |
//!
//! Values that carry a secret (a `${secrets.X}`, a database's URL with its
//! password) go to the site's Secret and reach containers through
//! `secretKeyRef`, never in an object's spec. Commands read every value
//! from the environment, as on the platform's own nodes.

use std::collections::{BTreeMap, HashMap};

use commons_blueprint::template::{env_name, input_text};
use commons_blueprint::{replica_of, Blueprint, Component, Kind, Origin, Ref, Template};
use indexmap::IndexMap;
use serde_json::{json, Value};

use crate::names::{dns_label, short_hash, COMPONENT, FIELD_MANAGER, MANAGED_BY, SITE};

/// How one provider's cluster runs sites: values from its configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Namespaces are `PREFIX` + the site's name.
    pub namespace_prefix: String,
    /// The namespace the platform's gateway runs in: the one namespace whose
    /// pods may connect to a site's.
    pub gateway_namespace: String,
    /// The image `process:` and `job:` commands run in (with `/bin/sh`);
    /// none: sites with processes or jobs cannot run on this cluster.
    pub process_image: Option<String>,
    /// The image a `postgres:` component runs.
    pub postgres_image: String,
    /// The size of each claim a `volume:`, `sqlite:` or `postgres:` gets.
    pub volume_bytes: u64,
    /// The storage class of those claims (none: the cluster's default).
    pub storage_class: Option<String>,
    /// Limits of a component whose blueprint sets none.
    pub default_cpu_millis: u64,
    pub default_memory_bytes: u64,
    /// The port a `process:` is given in `PORT`.
    pub process_port: u16,
    /// The user and group containers run as (never root; a site's own uid
    /// on the platform's nodes, one unprivileged uid here, as namespaces
    /// keep sites apart).
    pub run_as: i64,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            namespace_prefix: "commons-".into(),
            gateway_namespace: "commons".into(),
            process_image: None,
            postgres_image: "docker.io/library/postgres:16".into(),
            volume_bytes: 1 << 30,
            storage_class: None,
            default_cpu_millis: 500,
            default_memory_bytes: 512 << 20,
            process_port: 8080,
            run_as: 65532,
        }
    }
}

/// What a site's templates read: settled inputs and secrets' values.
#[derive(Debug, Clone, Default)]
pub struct Values {
    pub inputs: serde_json::Map<String, Value>,
    pub secrets: BTreeMap<String, String>,
    /// A `postgres:` component's password, by component.
    pub passwords: BTreeMap<String, String>,
    /// A keyed fingerprint of all of the above that are secret (the
    /// engine's): on the pods that read a secret, so a changed value rolls
    /// them, without the value being guessable from the object.
    pub secrets_print: String,
}

/// The kind of object that runs a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    Job,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::Job => "Job",
        }
    }
}

/// One component's workload, in the order the site comes up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// The component's name in the blueprint (its first instance's).
    pub component: String,
    /// The object's name.
    pub name: String,
    pub kind: WorkloadKind,
    pub replicas: u32,
    /// Workloads (by object name) that must be ready before this one is
    /// applied.
    pub after: Vec<String>,
}

/// A site's objects, in the order they are applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifests {
    pub site: String,
    pub namespace: String,
    /// The namespace and what belongs to the site as a whole (quota,
    /// policies, Secret, claims, Services), then each workload's object in
    /// dependency order.
    pub objects: Vec<Value>,
    pub workloads: Vec<Workload>,
}

impl Manifests {
    /// The objects as a YAML stream, with the Secret's values replaced by
    /// `(redacted)`: what a person may see.
    pub fn to_yaml(&self) -> String {
        let mut out = String::new();
        for object in &self.objects {
            let mut shown = object.clone();
            if kind_of(&shown) == "Secret" {
                if let Some(Value::Object(data)) = shown.get_mut("stringData") {
                    for v in data.values_mut() {
                        *v = Value::String("(redacted)".into());
                    }
                }
            }
            out.push_str("---\n");
            out.push_str(&serde_saphyr::to_string(&shown).unwrap_or_default());
        }
        out
    }

    /// The object for a workload.
    pub fn workload_object(&self, w: &Workload) -> Option<&Value> {
        self.objects
            .iter()
            .find(|o| kind_of(o) == w.kind.name() && name_of(o) == w.name)
    }
}

/// The `kind` of an object.
pub fn kind_of(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

/// The `metadata.name` of an object.
pub fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

/// Why a component cannot run on a cluster, where it is declared and what
/// to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderError {
    pub component: String,
    pub origin: Origin,
    pub message: String,
    pub help: String,
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: component \"{}\": {}\n  help: {}",
            self.origin.file.display(),
            self.origin.line,
            self.origin.column,
            self.component,
            self.message,
            self.help
        )
    }
}

/// Every reason a site cannot run on a cluster, all at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct RenderErrors(pub Vec<RenderError>);

/// Annotation: the fingerprint of the secrets a pod's containers read.
pub const SECRETS_PRINT: &str = "onecommons.org/secrets";

/// The mount point of a `volume:` or `sqlite:` component's claim.
fn data_dir(k8s_name: &str) -> String {
    format!("/data/{k8s_name}")
}

/// A value a template reads: its text and whether it must stay secret.
struct Read {
    text: String,
    secret: bool,
}

/// What a site's components offer each other, by blueprint name.
struct Attributes {
    values: HashMap<String, IndexMap<&'static str, Read>>,
}

/// A site's objects from its blueprint.
pub fn render(
    site: &str,
    blueprint: &Blueprint,
    values: &Values,
    settings: &Settings,
) -> Result<Manifests, RenderErrors> {
    let namespace = dns_label(&format!("{}{site}", settings.namespace_prefix));
    let mut errors = Vec::new();
    let fail =
        |errors: &mut Vec<RenderError>, name: &str, c: &Component, message: String, help: &str| {
            errors.push(RenderError {
                component: name.to_string(),
                origin: c.origin.clone(),
                message,
                help: help.to_string(),
            })
        };

    // Object names: one per component, instances `web.2` … folded into `web`.
    let mut names: IndexMap<&str, String> = IndexMap::new();
    let mut replicas: HashMap<&str, u32> = HashMap::new();
    let mut taken: HashMap<String, &str> = HashMap::new();
    for (name, c) in &blueprint.components {
        let (base, _) = replica_of(name);
        if base != name.as_str() {
            *replicas.entry(base).or_insert(1) += 1;
            continue;
        }
        let k8s = dns_label(name);
        if let Some(other) = taken.insert(k8s.clone(), name) {
            fail(
                &mut errors,
                name,
                c,
                format!("\"{other}\" and \"{name}\" would both be named \"{k8s}\" on the cluster"),
                "rename one of them",
            );
        }
        names.insert(name, k8s);
    }

    let attributes = attributes_of(blueprint, &names, values, settings);
    let labels = |component: Option<&str>| {
        let mut l = json!({ MANAGED_BY: FIELD_MANAGER, SITE: site });
        if let Some(c) = component {
            l[COMPONENT] = json!(c);
        }
        l
    };
    let meta = |name: &str, component: Option<&str>| json!({ "name": name, "namespace": namespace, "labels": labels(component) });

    let mut secret_data: BTreeMap<String, String> = BTreeMap::new();
    let mut claims = Vec::new();
    let mut services = Vec::new();
    let mut workloads: Vec<(Workload, Value)> = Vec::new();
    let mut quota = Quota::default();

    // Dependencies first: the workloads come out in the order they go up.
    let order = commons_blueprint::topo_order(&blueprint.components)
        .unwrap_or_else(|_| (0..blueprint.components.len()).collect());
    for (name, c) in order
        .into_iter()
        .filter_map(|i| blueprint.components.get_index(i))
    {
        let Some(k8s) = names.get(name.as_str()) else {
            continue; // a further instance, folded into its first
        };
        let count = replicas.get(name.as_str()).copied().unwrap_or(1);
        match &c.kind {
            Kind::Static { .. } => {}
            Kind::Volume | Kind::Sqlite => {
                claims.push(claim(&meta(&format!("data-{k8s}"), Some(k8s)), settings));
                quota.claims += 1;
            }
            Kind::Postgres => {
                let Some(password) = values.passwords.get(name.as_str()) else {
                    fail(
                        &mut errors,
                        name,
                        c,
                        "its database has no password".into(),
                        "deploy through the platform, which derives one per database",
                    );
                    continue;
                };
                let key = format!("{k8s}.POSTGRES_PASSWORD");
                secret_data.insert(key.clone(), password.clone());
                let (cpu, memory) = limits(c, settings);
                quota.add(cpu, memory, 1, 0);
                quota.claims += 1;
                services.push(service(&meta(k8s, Some(k8s)), k8s, 5432));
                let object = postgres(&meta(k8s, Some(k8s)), k8s, &key, cpu, memory, settings);
                workloads.push((
                    workload(name, k8s, WorkloadKind::StatefulSet, 1, c, &names),
                    object,
                ));
            }
            Kind::Process { .. } | Kind::Image(_) | Kind::Job { .. } => {
                let container =
                    match container(k8s, c, &attributes, &names, blueprint, values, settings) {
                        Ok(container) => container,
                        Err((message, help)) => {
                            fail(&mut errors, name, c, message, &help);
                            continue;
                        }
                    };
                for (key, value) in container.secrets {
                    secret_data.insert(key, value);
                }
                let (cpu, memory) = limits(c, settings);
                let pod = pod_spec(k8s, container.spec, container.claims, settings);
                match &c.kind {
                    Kind::Job { .. } => {
                        // Named by what it runs: changed, it runs again.
                        let mut seen = serde_json::to_vec(&pod).unwrap_or_default();
                        for key in &container.secret_keys {
                            seen.extend_from_slice(key.as_bytes());
                            seen.extend_from_slice(secret_data[key].as_bytes());
                        }
                        let job_name = dns_label(&format!("{k8s}-{}", short_hash(&seen, 10)));
                        quota.add(cpu, memory, 1, 0);
                        let object = json!({
                            "apiVersion": "batch/v1",
                            "kind": "Job",
                            "metadata": meta(&job_name, Some(k8s)),
                            "spec": {
                                "backoffLimit": c.retries,
                                "activeDeadlineSeconds": c.timeout_ms.map(|ms| ms.div_ceil(1000)),
                                "template": {
                                    "metadata": { "labels": labels(Some(k8s)) },
                                    "spec": with(pod, "restartPolicy", json!("Never")),
                                },
                            },
                        });
                        workloads.push((
                            workload(name, &job_name, WorkloadKind::Job, 1, c, &names),
                            object,
                        ));
                    }
                    _ => {
                        services.push(service(&meta(k8s, Some(k8s)), k8s, container.port));
                        let mut template =
                            json!({ "metadata": { "labels": labels(Some(k8s)) }, "spec": pod });
                        if !container.secret_keys.is_empty() {
                            // Containers read secrets at start: a new value
                            // needs new pods.
                            template["metadata"]["annotations"] =
                                json!({ SECRETS_PRINT: values.secrets_print });
                        }
                        let selector = json!({ "matchLabels": { SITE: site, COMPONENT: k8s } });
                        let (kind, object) = if container.has_data {
                            quota.add(cpu, memory, 1, 0);
                            (
                                WorkloadKind::StatefulSet,
                                json!({
                                    "apiVersion": "apps/v1",
                                    "kind": "StatefulSet",
                                    "metadata": meta(k8s, Some(k8s)),
                                    "spec": {
                                        "replicas": 1,
                                        "serviceName": k8s,
                                        "selector": selector,
                                        "template": template,
                                    },
                                }),
                            )
                        } else {
                            // One more instance than asked while rolling, never fewer.
                            quota.add(cpu, memory, count, 1);
                            (
                                WorkloadKind::Deployment,
                                json!({
                                    "apiVersion": "apps/v1",
                                    "kind": "Deployment",
                                    "metadata": meta(k8s, Some(k8s)),
                                    "spec": {
                                        "replicas": count,
                                        "revisionHistoryLimit": 3,
                                        "strategy": {
                                            "type": "RollingUpdate",
                                            "rollingUpdate": { "maxSurge": 1, "maxUnavailable": 0 },
                                        },
                                        "selector": selector,
                                        "template": template,
                                    },
                                }),
                            )
                        };
                        let count = if kind == WorkloadKind::StatefulSet {
                            1
                        } else {
                            count
                        };
                        workloads.push((workload(name, k8s, kind, count, c, &names), object));
                    }
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(RenderErrors(errors));
    }

    let mut objects = vec![
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": namespace,
                "labels": namespace_labels(labels(None)),
            },
        }),
        quota.object(meta("commons-quota", None), settings),
    ];
    objects.extend(policies(&meta, blueprint.network.egress, settings));
    if !secret_data.is_empty() {
        objects.push(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta("commons-env", None),
            "type": "Opaque",
            "stringData": secret_data,
        }));
    }
    objects.extend(claims);
    objects.extend(services);
    let workloads = named_after(workloads);
    objects.extend(workloads.iter().map(|(_, o)| o.clone()));
    Ok(Manifests {
        site: site.to_string(),
        namespace,
        objects,
        workloads: workloads.into_iter().map(|(w, _)| w).collect(),
    })
}

/// A site's namespace: held to the `restricted` pod security level.
fn namespace_labels(mut labels: Value) -> Value {
    for mode in ["enforce", "warn", "audit"] {
        labels[format!("pod-security.kubernetes.io/{mode}")] = json!("restricted");
    }
    labels["pod-security.kubernetes.io/enforce-version"] = json!("latest");
    labels
}

/// `object` with one more field.
fn with(mut object: Value, key: &str, value: Value) -> Value {
    object[key] = value;
    object
}

fn workload(
    component: &str,
    name: &str,
    kind: WorkloadKind,
    replicas: u32,
    c: &Component,
    names: &IndexMap<&str, String>,
) -> Workload {
    let mut after: Vec<String> = c
        .depends_on
        .iter()
        .filter_map(|d| names.get(replica_of(d).0))
        .filter(|d| d.as_str() != name)
        .cloned()
        .collect();
    after.sort();
    after.dedup();
    Workload {
        component: component.to_string(),
        name: name.to_string(),
        kind,
        replicas,
        after,
    }
}

/// Workloads (in dependency order already) with what each waits for named
/// by object: a job's name carries a hash of what it runs.
fn named_after(mut pending: Vec<(Workload, Value)>) -> Vec<(Workload, Value)> {
    let component_of: HashMap<String, String> = pending
        .iter()
        .map(|(w, _)| (dns_label(&w.component), w.name.clone()))
        .collect();
    for (w, _) in &mut pending {
        w.after = w
            .after
            .iter()
            .filter_map(|a| component_of.get(a).cloned())
            .collect();
    }
    pending
}

/// A component's CPU (millicores) and memory (bytes) limits.
fn limits(c: &Component, settings: &Settings) -> (u64, u64) {
    (
        c.resources
            .cpu_millis
            .unwrap_or(settings.default_cpu_millis),
        c.resources
            .memory_bytes
            .unwrap_or(settings.default_memory_bytes),
    )
}

fn resources(cpu: u64, memory: u64) -> Value {
    json!({
        "limits": { "cpu": format!("{cpu}m"), "memory": memory.to_string() },
        // Memory is never overcommitted; CPU is shared.
        "requests": { "cpu": format!("{}m", (cpu / 4).max(10)), "memory": memory.to_string() },
    })
}

/// The sum of a site's limits: the namespace may never hold more.
#[derive(Default)]
struct Quota {
    cpu_millis: u64,
    memory_bytes: u64,
    pods: u64,
    claims: u64,
}

impl Quota {
    fn add(&mut self, cpu: u64, memory: u64, instances: u32, surge: u32) {
        let n = u64::from(instances + surge);
        self.cpu_millis += cpu * n;
        self.memory_bytes += memory * n;
        self.pods += n;
    }

    fn object(&self, metadata: Value, settings: &Settings) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": metadata,
            "spec": {
                "hard": {
                    "limits.cpu": format!("{}m", self.cpu_millis),
                    "limits.memory": self.memory_bytes.to_string(),
                    "requests.cpu": format!("{}m", self.cpu_millis),
                    "requests.memory": self.memory_bytes.to_string(),
                    "pods": self.pods.to_string(),
                    "persistentvolumeclaims": self.claims.to_string(),
                    "requests.storage": (self.claims * settings.volume_bytes).to_string(),
                    // A site is reached through the platform's gateway only.
                    "services.loadbalancers": "0",
                    "services.nodeports": "0",
                },
            },
        })
    }
}

/// Deny all, then allow the site's own pods, the gateway in, DNS and (with
/// `egress`) the internet out — not the private ranges other tenants' pods
/// and the cluster's services live in, nor link-local metadata services.
fn policies(
    meta: &dyn Fn(&str, Option<&str>) -> Value,
    egress: bool,
    settings: &Settings,
) -> Vec<Value> {
    let own = json!({ "podSelector": {} });
    let mut to = vec![
        own.clone(),
        json!({
            "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "kube-system" } },
            "podSelector": { "matchLabels": { "k8s-app": "kube-dns" } },
        }),
    ];
    if egress {
        to.push(json!({ "ipBlock": {
            "cidr": "0.0.0.0/0",
            "except": ["10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16"],
        }}));
        to.push(json!({ "ipBlock": { "cidr": "::/0", "except": ["fc00::/7", "fe80::/10"] } }));
    }
    let mut egress_rules = vec![json!({ "to": [own] })];
    egress_rules.push(json!({
        "to": [to[1].clone()],
        "ports": [{ "protocol": "UDP", "port": 53 }, { "protocol": "TCP", "port": 53 }],
    }));
    if egress {
        egress_rules.push(json!({ "to": [to[2].clone(), to[3].clone()] }));
    }
    vec![
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta("default-deny", None),
            "spec": { "podSelector": {}, "policyTypes": ["Ingress", "Egress"] },
        }),
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": meta("site-traffic", None),
            "spec": {
                "podSelector": {},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": [{ "from": [
                    { "podSelector": {} },
                    { "namespaceSelector": { "matchLabels": {
                        "kubernetes.io/metadata.name": settings.gateway_namespace,
                    } } },
                ] }],
                "egress": egress_rules,
            },
        }),
    ]
}

fn claim(metadata: &Value, settings: &Settings) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata,
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": settings.storage_class,
            "resources": { "requests": { "storage": settings.volume_bytes.to_string() } },
        },
    })
}

fn service(metadata: &Value, k8s: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "selector": { COMPONENT: k8s, SITE: metadata["labels"][SITE] },
            "ports": [{ "name": "app", "port": port, "targetPort": port, "protocol": "TCP" }],
        },
    })
}

/// A pod as the `restricted` level wants it, and more: no service account
/// token (a site never talks to the cluster's API), no other services'
/// addresses in its environment, a read-only root with a private `/tmp`.
fn pod_spec(
    k8s: &str,
    mut container: Value,
    claims: Vec<(String, String)>,
    settings: &Settings,
) -> Value {
    let mut volumes = vec![json!({ "name": "tmp", "emptyDir": {} })];
    let mut mounts = vec![json!({ "name": "tmp", "mountPath": "/tmp" })];
    for (claim, path) in claims {
        mounts.push(json!({ "name": claim, "mountPath": path }));
        volumes.push(json!({ "name": claim, "persistentVolumeClaim": { "claimName": claim } }));
    }
    container["name"] = json!(k8s);
    container["volumeMounts"] = json!(mounts);
    container["securityContext"] = container_security();
    json!({
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        "securityContext": pod_security(settings.run_as),
        "containers": [container],
        "volumes": volumes,
    })
}

fn pod_security(uid: i64) -> Value {
    json!({
        "runAsNonRoot": true,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": { "type": "RuntimeDefault" },
    })
}

fn container_security() -> Value {
    json!({
        "allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true,
        "capabilities": { "drop": ["ALL"] },
    })
}

fn postgres(
    metadata: &Value,
    k8s: &str,
    password_key: &str,
    cpu: u64,
    memory: u64,
    settings: &Settings,
) -> Value {
    // The official image's `postgres` user.
    const POSTGRES_UID: i64 = 999;
    let labels = metadata["labels"].clone();
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata,
        "spec": {
            "replicas": 1,
            "serviceName": k8s,
            "selector": { "matchLabels": { SITE: labels[SITE], COMPONENT: k8s } },
            "template": {
                "metadata": { "labels": labels },
                "spec": {
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "securityContext": pod_security(POSTGRES_UID),
                    "containers": [{
                        "name": k8s,
                        "image": settings.postgres_image,
                        "env": [
                            { "name": "POSTGRES_USER", "value": "app" },
                            { "name": "POSTGRES_DB", "value": "app" },
                            { "name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata" },
                            { "name": "POSTGRES_PASSWORD", "valueFrom": { "secretKeyRef": {
                                "name": "commons-env", "key": password_key,
                            } } },
                        ],
                        "ports": [{ "name": "postgres", "containerPort": 5432 }],
                        "readinessProbe": {
                            "exec": { "command": ["pg_isready", "-U", "app", "-d", "app", "-h", "127.0.0.1"] },
                            "periodSeconds": 2,
                        },
                        "resources": resources(cpu, memory),
                        "securityContext": container_security(),
                        "volumeMounts": [
                            { "name": "data", "mountPath": "/var/lib/postgresql/data" },
                            { "name": "run", "mountPath": "/var/run/postgresql" },
                            { "name": "tmp", "mountPath": "/tmp" },
                        ],
                    }],
                    "volumes": [
                        { "name": "run", "emptyDir": {} },
                        { "name": "tmp", "emptyDir": {} },
                    ],
                },
            },
            // Its claim goes with the component, as a removed `volume:` does.
            "persistentVolumeClaimRetentionPolicy": { "whenDeleted": "Delete", "whenScaled": "Retain" },
            "volumeClaimTemplates": [{
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                // Not labelled as the platform's own: pruning leaves it to
                // the StatefulSet.
                "metadata": { "name": "data", "labels": { SITE: labels[SITE], COMPONENT: k8s } },
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": settings.storage_class,
                    "resources": { "requests": { "storage": settings.volume_bytes.to_string() } },
                },
            }],
        },
    })
}

/// What each component offers others (`${components.NAME.ATTR}`).
fn attributes_of(
    blueprint: &Blueprint,
    names: &IndexMap<&str, String>,
    values: &Values,
    settings: &Settings,
) -> Attributes {
    let mut out = HashMap::new();
    for (name, c) in &blueprint.components {
        let k8s = names
            .get(replica_of(name).0)
            .cloned()
            .unwrap_or_else(|| dns_label(name));
        let plain = |text: String| Read {
            text,
            secret: false,
        };
        let mut attrs: IndexMap<&'static str, Read> = IndexMap::new();
        match &c.kind {
            Kind::Process { .. } | Kind::Image(_) => {
                let port = match &c.kind {
                    Kind::Image(image) => image.port,
                    _ => settings.process_port,
                };
                attrs.insert("port", plain(port.to_string()));
                attrs.insert("host", plain(k8s.clone()));
                attrs.insert("url", plain(format!("http://{k8s}:{port}")));
            }
            Kind::Postgres => {
                if let Some(password) = values.passwords.get(name) {
                    attrs.insert(
                        "url",
                        Read {
                            text: format!("postgres://app:{password}@{k8s}:5432/app"),
                            secret: true,
                        },
                    );
                }
            }
            Kind::Sqlite => {
                let path = format!("{}/db.sqlite", data_dir(&k8s));
                attrs.insert("url", plain(format!("sqlite://{path}")));
                attrs.insert("path", plain(path));
            }
            Kind::Volume => {
                attrs.insert("path", plain(data_dir(&k8s)));
            }
            Kind::Static { .. } | Kind::Job { .. } => {}
        }
        out.insert(name.clone(), attrs);
    }
    Attributes { values: out }
}

/// One container and what comes with it.
struct Container {
    spec: Value,
    port: u16,
    /// Secret keys → values this container reads.
    secrets: Vec<(String, String)>,
    secret_keys: Vec<String>,
    /// Claims to mount: (claim, path).
    claims: Vec<(String, String)>,
    has_data: bool,
}

type Refusal = (String, String);

fn container(
    k8s: &str,
    c: &Component,
    attributes: &Attributes,
    names: &IndexMap<&str, String>,
    blueprint: &Blueprint,
    values: &Values,
    settings: &Settings,
) -> Result<Container, Refusal> {
    let read = |r: &Ref| -> Result<Read, Refusal> {
        match r {
            Ref::Input { name: input } => values
                .inputs
                .get(input)
                .or_else(|| blueprint.inputs.get(input).and_then(|i| i.default.as_ref()))
                .map(|v| Read { text: input_text(v), secret: false })
                .ok_or_else(|| {
                    (
                        format!("input \"{input}\" has no value"),
                        format!("give it with `--input {input}=VALUE` or a default"),
                    )
                }),
            Ref::Secret { name: secret } => values
                .secrets
                .get(secret)
                .map(|v| Read { text: v.clone(), secret: true })
                .ok_or_else(|| {
                    (
                        format!("secret \"{secret}\" has no value"),
                        "deploy through the platform, which makes or reads each secret".into(),
                    )
                }),
            Ref::Component { name: other, attr } => attributes
                .values
                .get(other)
                .and_then(|a| a.get(attr.as_str()))
                .map(|r| Read { text: r.text.clone(), secret: r.secret })
                .ok_or_else(|| {
                    (
                        format!("`${{components.{other}.{attr}}}` has no value on a Kubernetes cluster"),
                        "a `static:` component's files are served by the gateway, not mounted; read them from an image instead".into(),
                    )
                }),
        }
    };

    let mut env: Vec<Value> = Vec::new();
    let mut secrets = Vec::new();
    let mut secret_keys = Vec::new();
    let mut put = |key: String, read: Read, env: &mut Vec<Value>| {
        if env.iter().any(|e| e["name"] == key.as_str()) {
            return; // a reference read twice
        }
        if read.secret {
            let secret_key = format!("{k8s}.{key}");
            env.push(json!({ "name": key, "valueFrom": { "secretKeyRef": { "name": "commons-env", "key": secret_key } } }));
            secret_keys.push(secret_key.clone());
            secrets.push((secret_key, read.text));
        } else {
            env.push(json!({ "name": key, "value": read.text }));
        }
    };

    // Data this component reads: mounted where its attributes say it is.
    let mut claims: Vec<(String, String)> = Vec::new();
    let data_of = |other: &str| -> Option<String> {
        let oc = blueprint.components.get(other)?;
        matches!(oc.kind, Kind::Volume | Kind::Sqlite)
            .then(|| names.get(other).cloned())
            .flatten()
    };
    for r in c.refs() {
        if let Ref::Component { name: other, .. } = r {
            if let Some(data) = data_of(other) {
                let claim = (format!("data-{data}"), data_dir(&data));
                if !claims.contains(&claim) {
                    claims.push(claim);
                }
            }
        }
    }

    let (image, command, args, port) = match &c.kind {
        Kind::Image(image) => {
            for (inside, template) in &image.volumes {
                let target = match template.0.as_slice() {
                    [commons_blueprint::Segment::Ref(Ref::Component { name: other, attr })]
                        if attr == "path" =>
                    {
                        data_of(other)
                    }
                    _ => None,
                };
                let Some(data) = target else {
                    return Err((
                        format!("volume `{inside}` is not a `volume:` or `sqlite:` component of the site"),
                        "on a Kubernetes cluster an image's volume is written `${components.NAME.path}` of a `volume:` component".into(),
                    ));
                };
                claims.retain(|(claim, _)| claim != &format!("data-{data}"));
                claims.push((format!("data-{data}"), inside.clone()));
            }
            (
                image.reference.clone(),
                None,
                image.command.clone(),
                image.port,
            )
        }
        Kind::Process { command } | Kind::Job { command } => {
            let Some(image) = &settings.process_image else {
                return Err((
                    format!("a `{}:` runs on a Kubernetes cluster in the provider's process image, and this provider names none", c.kind.keyword()),
                    "set `process_image` in the provider's settings, or make the component an `image:`".into(),
                ));
            };
            let text = render_command(command, &mut |r| {
                let read = read(r)?;
                put(env_name(r), read, &mut env);
                Ok(())
            })?;
            let port = match &c.kind {
                Kind::Process { .. } => settings.process_port,
                _ => 0,
            };
            (
                image.clone(),
                Some(vec!["/bin/sh".to_string(), "-c".to_string(), text]),
                None,
                port,
            )
        }
        _ => unreachable!("only processes, images and jobs have containers"),
    };
    if port != 0 {
        put(
            "PORT".into(),
            Read {
                text: port.to_string(),
                secret: false,
            },
            &mut env,
        );
    }
    for (key, template) in &c.env {
        let mut text = String::new();
        let mut secret = false;
        for segment in &template.0 {
            match segment {
                commons_blueprint::Segment::Text(t) => text.push_str(t),
                commons_blueprint::Segment::Ref(r) => {
                    let read = read(r)?;
                    secret |= read.secret;
                    text.push_str(&read.text);
                }
            }
        }
        put(key.clone(), Read { text, secret }, &mut env);
    }

    let (cpu, memory) = limits(c, settings);
    let mut spec = json!({
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": env,
        "resources": resources(cpu, memory),
    });
    if let Some(command) = command {
        spec["command"] = json!(command);
    }
    if let Some(args) = args {
        spec["args"] = json!(args);
    }
    if port != 0 {
        spec["ports"] = json!([{ "name": "app", "containerPort": port }]);
    }
    if let (Some(health), true) = (&c.health, port != 0) {
        spec["readinessProbe"] = json!({
            "httpGet": { "path": health.http, "port": port },
            "periodSeconds": health.interval_ms.div_ceil(1000).max(1),
            "timeoutSeconds": health.timeout_ms.div_ceil(1000).max(1),
        });
    }
    let has_data = !claims.is_empty();
    Ok(Container {
        spec,
        port,
        secrets,
        secret_keys,
        claims,
        has_data,
    })
}

/// A command with each reference written as the variable it is read from.
fn render_command(
    command: &Template,
    read: &mut dyn FnMut(&Ref) -> Result<(), Refusal>,
) -> Result<String, Refusal> {
    let mut text = String::new();
    for segment in &command.0 {
        match segment {
            commons_blueprint::Segment::Text(t) => text.push_str(t),
            commons_blueprint::Segment::Ref(r) => {
                read(r)?;
                text.push_str(&format!("${{{}}}", env_name(r)));
            }
        }
    }
    Ok(text)
}
