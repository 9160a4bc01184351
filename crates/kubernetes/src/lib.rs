//! OneCommons on a provider's Kubernetes cluster (milestone 6).
//!
//! A provider that runs a cluster is driven through its API instead of node
//! agents: a site's blueprint becomes objects in a namespace of its own
//! (`manifests.rs`, pure, held to golden files), applied server-side in
//! dependency order and pruned of what the site no longer has
//! (`cluster.rs`), their status read back in the words `commons status`
//! uses (`status.rs`). Names and labels, by which everything is found again
//! without a record of its own, are in `names.rs`; which sites run on which cluster, in `placements.rs`.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod manifests;
#[cfg(feature = "mock")]
pub mod mock;
pub mod names;
pub mod placements;
pub mod status;

pub use cluster::{Cluster, ClusterError};
pub use manifests::{
    render, Manifests, RenderError, RenderErrors, Settings, Values, Workload, WorkloadKind,
};
pub use placements::{Placement, Placements};
pub use status::{State, WorkloadStatus};
