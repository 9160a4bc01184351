//! What a site's workloads are doing, read from their objects' status: the
//! same words `commons status` uses for a site on the platform's own nodes.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use serde::Serialize;

use crate::names::COMPONENT;

/// Where one workload stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Every instance runs the current version and is ready (a job: done).
    Ready,
    /// Rolling out, starting, or running (a job).
    Progressing { reason: String },
    /// It will not get there by itself: a deadline passed, a job failed.
    Failed { reason: String },
    /// No object on the cluster.
    Missing,
}

/// One workload's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorkloadStatus {
    /// The component's object name (`onecommons.org/component`).
    pub component: String,
    /// The object: `Deployment/web`, `Job/migrate-0a1b2c3d4e`.
    pub object: String,
    pub desired: u32,
    pub ready: u32,
    #[serde(flatten)]
    pub state: State,
}

fn count(n: Option<i32>) -> u32 {
    n.unwrap_or(0).max(0) as u32
}

fn component_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(COMPONENT))
        .cloned()
        .unwrap_or_default()
}

/// A Deployment is ready when the controller has seen its latest spec and
/// every instance is of it, ready and available, with no old one left.
pub fn of_deployment(d: &Deployment) -> WorkloadStatus {
    let name = d.metadata.name.clone().unwrap_or_default();
    let desired = count(d.spec.as_ref().and_then(|s| s.replicas).or(Some(1)));
    let status = d.status.clone().unwrap_or_default();
    let ready = count(status.ready_replicas);
    let seen = status.observed_generation >= d.metadata.generation;
    let stuck = status.conditions.iter().flatten().find(|c| {
        c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    let state = if let Some(c) = stuck {
        State::Failed {
            reason: c
                .message
                .clone()
                .unwrap_or_else(|| "progress deadline exceeded".into()),
        }
    } else if seen
        && count(status.updated_replicas) == desired
        && ready == desired
        && count(status.available_replicas) == desired
        && count(status.replicas) == desired
    {
        State::Ready
    } else {
        State::Progressing {
            reason: format!(
                "{} of {desired} updated, {ready} ready",
                count(status.updated_replicas)
            ),
        }
    };
    WorkloadStatus {
        component: component_of(&d.metadata),
        object: format!("Deployment/{name}"),
        desired,
        ready,
        state,
    }
}

/// A StatefulSet is ready when every instance runs the update revision
/// and is ready.
pub fn of_stateful_set(s: &StatefulSet) -> WorkloadStatus {
    let name = s.metadata.name.clone().unwrap_or_default();
    let desired = count(s.spec.as_ref().and_then(|s| s.replicas).or(Some(1)));
    let status = s.status.clone().unwrap_or_default();
    let ready = count(status.ready_replicas);
    let seen = status.observed_generation >= s.metadata.generation;
    let current =
        status.update_revision.is_some() && status.current_revision == status.update_revision;
    let state = if seen && current && ready == desired && count(Some(status.replicas)) == desired {
        State::Ready
    } else {
        State::Progressing {
            reason: format!("{ready} of {desired} ready"),
        }
    };
    WorkloadStatus {
        component: component_of(&s.metadata),
        object: format!("StatefulSet/{name}"),
        desired,
        ready,
        state,
    }
}

/// A Job is ready once complete; failed once its retries are spent or its
/// deadline passed.
pub fn of_job(j: &Job) -> WorkloadStatus {
    let name = j.metadata.name.clone().unwrap_or_default();
    let status = j.status.clone().unwrap_or_default();
    let condition = |t: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t && c.status == "True")
    };
    let state = if condition("Complete").is_some() {
        State::Ready
    } else if let Some(c) = condition("Failed") {
        State::Failed {
            reason: c
                .message
                .clone()
                .or_else(|| c.reason.clone())
                .unwrap_or_else(|| "failed".into()),
        }
    } else {
        State::Progressing {
            reason: format!("running ({} failed attempts)", count(status.failed)),
        }
    };
    WorkloadStatus {
        component: component_of(&j.metadata),
        object: format!("Job/{name}"),
        desired: 1,
        ready: u32::from(state == State::Ready),
        state,
    }
}
