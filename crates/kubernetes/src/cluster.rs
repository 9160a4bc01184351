//! A provider's cluster, driven through its API: a site's objects applied
//! server-side (field manager `commons`, so a person's own changes to other
//! fields survive and a conflict over ours is settled in our favour),
//! workloads brought up in dependency order, what the site no longer has
//! deleted, and status read back.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    Namespace, PersistentVolumeClaim, ResourceQuota, Secret, Service,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::core::{ApiResource, DynamicObject};
use kube::Client;
use serde_json::Value;

use crate::manifests::{kind_of, name_of, Manifests, Workload, WorkloadKind};
use crate::names::{site_selector, FIELD_MANAGER};
use crate::status::{of_deployment, of_job, of_stateful_set, State, WorkloadStatus};

/// What went wrong with a cluster, said so an operator can act on it.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the cluster refused to {action}: {message} (HTTP {code}, {reason})")]
    Refused {
        action: String,
        code: u16,
        reason: String,
        message: String,
    },
    #[error("could not {action}: {source}")]
    Unreachable {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("{object} failed: {reason}")]
    Failed { object: String, reason: String },
    #[error("{object} was not ready after {secs} s ({reason})")]
    TimedOut {
        object: String,
        secs: u64,
        reason: String,
    },
    #[error("kubeconfig {path}: {message}")]
    Config { path: String, message: String },
}

fn api_error(action: String) -> impl FnOnce(kube::Error) -> ClusterError {
    move |e| match e {
        kube::Error::Api(status) => ClusterError::Refused {
            action,
            code: status.code,
            reason: status.reason.clone(),
            message: status.message.clone(),
        },
        source => ClusterError::Unreachable { action, source },
    }
}

/// The kinds the platform makes in a site's namespace, as the API names
/// them: what pruning lists.
fn namespaced_kinds() -> [ApiResource; 8] {
    [
        ApiResource::erase::<ResourceQuota>(&()),
        ApiResource::erase::<NetworkPolicy>(&()),
        ApiResource::erase::<Secret>(&()),
        ApiResource::erase::<PersistentVolumeClaim>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<Deployment>(&()),
        ApiResource::erase::<StatefulSet>(&()),
        ApiResource::erase::<Job>(&()),
    ]
}

fn resource_of(kind: &str) -> Option<ApiResource> {
    if kind == "Namespace" {
        return Some(ApiResource::erase::<Namespace>(&()));
    }
    namespaced_kinds().into_iter().find(|r| r.kind == kind)
}

/// What one watch event says of a workload.
enum Seen {
    /// Its status now, at this resource version.
    Changed(String, WorkloadStatus),
    /// Deleted (by object name).
    Gone(String, WorkloadStatus),
    /// Nothing but a newer version to resume from.
    Version(String),
    /// The version watched from is no longer kept.
    Expired,
}

fn seen<K: kube::Resource>(event: WatchEvent<K>, status: fn(&K) -> WorkloadStatus) -> Seen {
    let version = |k: &K| {
        k.meta()
            .resource_version
            .clone()
            .unwrap_or_else(|| "0".into())
    };
    match event {
        WatchEvent::Added(k) | WatchEvent::Modified(k) => Seen::Changed(version(&k), status(&k)),
        WatchEvent::Deleted(k) => Seen::Gone(version(&k), status(&k)),
        WatchEvent::Bookmark(b) => Seen::Version(b.metadata.resource_version),
        WatchEvent::Error(_) => Seen::Expired,
    }
}

/// One cluster.
#[derive(Clone)]
pub struct Cluster {
    client: Client,
    /// How often a rollout's status is read while waiting for it.
    poll: Duration,
}

impl Cluster {
    /// A cluster reached through `client` (tests hand it a mocked service).
    pub fn new(client: Client) -> Cluster {
        Cluster {
            client,
            poll: Duration::from_secs(1),
        }
    }

    /// Reads status this often while a deploy waits.
    pub fn with_poll(mut self, poll: Duration) -> Cluster {
        self.poll = poll;
        self
    }

    /// A cluster as a kubeconfig file describes it (its current context).
    pub async fn from_kubeconfig(path: &Path) -> Result<Cluster, ClusterError> {
        let config_error = |message: String| ClusterError::Config {
            path: path.display().to_string(),
            message,
        };
        let kubeconfig =
            kube::config::Kubeconfig::read_from(path).map_err(|e| config_error(e.to_string()))?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|e| config_error(e.to_string()))?;
        let client = Client::try_from(config).map_err(|e| config_error(e.to_string()))?;
        Ok(Cluster::new(client))
    }

    fn api(&self, namespace: &str, resource: &ApiResource) -> Api<DynamicObject> {
        if resource.kind == "Namespace" {
            Api::all_with(self.client.clone(), resource)
        } else {
            Api::namespaced_with(self.client.clone(), namespace, resource)
        }
    }

    /// Applies one object server-side.
    pub async fn apply_object(&self, namespace: &str, object: &Value) -> Result<(), ClusterError> {
        let (kind, name) = (kind_of(object), name_of(object));
        let resource = resource_of(kind).ok_or_else(|| ClusterError::Failed {
            object: format!("{kind}/{name}"),
            reason: "not a kind the platform makes".into(),
        })?;
        self.api(namespace, &resource)
            .patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(object),
            )
            .await
            .map_err(api_error(format!("apply {kind}/{name}")))?;
        Ok(())
    }

    /// Brings a site to its manifests: the namespace and what the site
    /// shares first, then each workload once those it comes after are
    /// ready, then waits for all of them and deletes what the site no
    /// longer has. `progress` hears every status read.
    pub async fn deploy(
        &self,
        manifests: &Manifests,
        timeout: Duration,
        progress: &mut (dyn FnMut(&WorkloadStatus) + Send),
    ) -> Result<Vec<WorkloadStatus>, ClusterError> {
        let ns = &manifests.namespace;
        // Looked up by (kind, name) and by name: linear in the site's size.
        let workload_of: HashMap<(&str, &str), &Workload> = manifests
            .workloads
            .iter()
            .map(|w| ((w.kind.name(), w.name.as_str()), w))
            .collect();
        let by_name: HashMap<&str, &Workload> = manifests
            .workloads
            .iter()
            .map(|w| (w.name.as_str(), w))
            .collect();
        let mut workload_objects: HashMap<&str, &Value> = HashMap::new();
        for object in &manifests.objects {
            match workload_of.get(&(kind_of(object), name_of(object))) {
                Some(w) => {
                    workload_objects.insert(w.name.as_str(), object);
                }
                None => self.apply_object(ns, object).await?,
            }
        }
        let deadline = Instant::now() + timeout;
        let mut ready: std::collections::HashSet<&str> = Default::default();
        for w in &manifests.workloads {
            for after in &w.after {
                if let Some(dep) = by_name.get(after.as_str()) {
                    if ready.insert(dep.name.as_str()) {
                        self.wait_ready(ns, dep, deadline, timeout, progress)
                            .await?;
                    }
                }
            }
            if let Some(object) = workload_objects.get(w.name.as_str()) {
                self.apply_object(ns, object).await?;
            }
        }
        let mut statuses = Vec::new();
        for w in &manifests.workloads {
            statuses.push(self.wait_ready(ns, w, deadline, timeout, progress).await?);
        }
        self.prune(manifests).await?;
        Ok(statuses)
    }

    async fn wait_ready(
        &self,
        namespace: &str,
        w: &Workload,
        deadline: Instant,
        timeout: Duration,
        progress: &mut (dyn FnMut(&WorkloadStatus) + Send),
    ) -> Result<WorkloadStatus, ClusterError> {
        loop {
            let status = self.workload_status(namespace, w).await?;
            progress(&status);
            match &status.state {
                State::Ready => return Ok(status),
                State::Failed { reason } => {
                    return Err(ClusterError::Failed {
                        object: status.object.clone(),
                        reason: reason.clone(),
                    })
                }
                State::Progressing { reason } if Instant::now() >= deadline => {
                    return Err(ClusterError::TimedOut {
                        object: status.object.clone(),
                        secs: timeout.as_secs(),
                        reason: reason.clone(),
                    })
                }
                State::Missing if Instant::now() >= deadline => {
                    return Err(ClusterError::TimedOut {
                        object: status.object.clone(),
                        secs: timeout.as_secs(),
                        reason: "not on the cluster".into(),
                    })
                }
                _ => tokio::time::sleep(self.poll).await,
            }
        }
    }

    /// One workload's status, read from its object.
    pub async fn workload_status(
        &self,
        namespace: &str,
        w: &Workload,
    ) -> Result<WorkloadStatus, ClusterError> {
        let action = format!("read {}/{}", w.kind.name(), w.name);
        let status = match w.kind {
            WorkloadKind::Deployment => {
                Api::<Deployment>::namespaced(self.client.clone(), namespace)
                    .get_opt(&w.name)
                    .await
                    .map_err(api_error(action))?
                    .map(|d| of_deployment(&d))
            }
            WorkloadKind::StatefulSet => {
                Api::<StatefulSet>::namespaced(self.client.clone(), namespace)
                    .get_opt(&w.name)
                    .await
                    .map_err(api_error(action))?
                    .map(|s| of_stateful_set(&s))
            }
            WorkloadKind::Job => Api::<Job>::namespaced(self.client.clone(), namespace)
                .get_opt(&w.name)
                .await
                .map_err(api_error(action))?
                .map(|j| of_job(&j)),
        };
        Ok(status.unwrap_or_else(|| WorkloadStatus {
            component: crate::names::dns_label(&w.component),
            object: format!("{}/{}", w.kind.name(), w.name),
            desired: w.replicas,
            ready: 0,
            state: State::Missing,
        }))
    }

    /// Every workload of a site, as the cluster has it now.
    pub async fn status(
        &self,
        site: &str,
        namespace: &str,
    ) -> Result<Vec<WorkloadStatus>, ClusterError> {
        let lp = ListParams::default().labels(&site_selector(site));
        let mut out = Vec::new();
        let action = |kind: &str| format!("list the site's {kind}s");
        for d in Api::<Deployment>::namespaced(self.client.clone(), namespace)
            .list(&lp)
            .await
            .map_err(api_error(action("Deployment")))?
        {
            out.push(of_deployment(&d));
        }
        for s in Api::<StatefulSet>::namespaced(self.client.clone(), namespace)
            .list(&lp)
            .await
            .map_err(api_error(action("StatefulSet")))?
        {
            out.push(of_stateful_set(&s));
        }
        for j in Api::<Job>::namespaced(self.client.clone(), namespace)
            .list(&lp)
            .await
            .map_err(api_error(action("Job")))?
        {
            out.push(of_job(&j));
        }
        out.sort_by(|a, b| a.object.cmp(&b.object));
        Ok(out)
    }

    /// Follows a site's workloads as the cluster changes them (the API's
    /// watch, resumed from the last version seen when it ends, begun anew
    /// when that version is too old): `on_change` hears every workload's
    /// status after each change, until it returns false.
    pub async fn watch(
        &self,
        site: &str,
        namespace: &str,
        on_change: &mut (dyn FnMut(&[WorkloadStatus]) -> bool + Send),
    ) -> Result<(), ClusterError> {
        let wp = || {
            WatchParams::default()
                .labels(&site_selector(site))
                .timeout(290)
        };
        let mut versions = ["0".to_string(), "0".to_string(), "0".to_string()];
        let mut statuses: std::collections::BTreeMap<String, WorkloadStatus> = Default::default();
        loop {
            let action = "watch the site's workloads".to_string();
            let deployments = Api::<Deployment>::namespaced(self.client.clone(), namespace)
                .watch(&wp(), &versions[0])
                .await
                .map_err(api_error(action.clone()))?
                .map(|e| (0, e.map(|e| seen(e, of_deployment))));
            let sets = Api::<StatefulSet>::namespaced(self.client.clone(), namespace)
                .watch(&wp(), &versions[1])
                .await
                .map_err(api_error(action.clone()))?
                .map(|e| (1, e.map(|e| seen(e, of_stateful_set))));
            let jobs = Api::<Job>::namespaced(self.client.clone(), namespace)
                .watch(&wp(), &versions[2])
                .await
                .map_err(api_error(action.clone()))?
                .map(|e| (2, e.map(|e| seen(e, of_job))));
            let mut events =
                futures_util::stream::select_all([deployments.boxed(), sets.boxed(), jobs.boxed()]);
            while let Some((kind, event)) = events.next().await {
                match event.map_err(api_error(action.clone()))? {
                    Seen::Changed(version, status) => {
                        versions[kind] = version;
                        statuses.insert(status.object.clone(), status);
                    }
                    Seen::Gone(version, status) => {
                        versions[kind] = version;
                        statuses.remove(&status.object);
                    }
                    Seen::Version(version) => {
                        versions[kind] = version;
                        continue;
                    }
                    // Too old a version: from the start again.
                    Seen::Expired => {
                        versions.fill("0".to_string());
                        break;
                    }
                }
                let now: Vec<WorkloadStatus> = statuses.values().cloned().collect();
                if !on_change(&now) {
                    return Ok(());
                }
            }
            // The server ended the watch (its timeout): again, shortly.
            tokio::time::sleep(self.poll.min(Duration::from_millis(200))).await;
        }
    }

    /// Deletes the site's objects that its manifests no longer have: a
    /// removed component, a job that ran for an older version. Only objects
    /// labelled as the platform's and this site's are ever looked at.
    pub async fn prune(&self, manifests: &Manifests) -> Result<Vec<String>, ClusterError> {
        let lp = ListParams::default().labels(&site_selector(&manifests.site));
        let wanted: std::collections::HashSet<(&str, &str)> = manifests
            .objects
            .iter()
            .map(|o| (kind_of(o), name_of(o)))
            .collect();
        let mut deleted = Vec::new();
        for resource in namespaced_kinds() {
            let api = self.api(&manifests.namespace, &resource);
            let listed = api
                .list(&lp)
                .await
                .map_err(api_error(format!("list the site's {}s", resource.kind)))?;
            for object in listed {
                let name = object.metadata.name.clone().unwrap_or_default();
                if wanted.contains(&(resource.kind.as_str(), name.as_str())) {
                    continue;
                }
                // A job's pods go with it.
                api.delete(&name, &DeleteParams::background())
                    .await
                    .map_err(api_error(format!("delete {}/{name}", resource.kind)))?;
                deleted.push(format!("{}/{name}", resource.kind));
            }
        }
        Ok(deleted)
    }

    /// Deletes a site: its namespace, and with it everything in it.
    pub async fn destroy(&self, namespace: &str) -> Result<(), ClusterError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        match api.delete(namespace, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(api_error(format!("delete namespace {namespace}"))(e)),
        }
    }
}
