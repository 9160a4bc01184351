//! The node runtime: what makes a component real.
//!
//! A [`Driver`] knows one kind of component (`job`, `process`, `static`,
//! `volume`, `sqlite`, `postgres`). The engine decides *what* to do; a driver
//! does it and returns a [`Handle`] (what it needs to find the component
//! again) and the component's outputs (`port`, `url`, `path`).
//!
//! Every process a driver starts runs in a session and process group of its
//! own (so it outlives the CLI and can be stopped as a whole) and writes its
//! pid to a pidfile from inside the child before it runs the command, so a
//! deploy killed at any instant leaves nothing that cannot be found again.

pub mod drivers;
pub mod exit;
pub mod health;
pub mod image;
pub mod layout;
pub mod net;
pub mod proc;
pub mod sandbox;
pub mod settings;
pub mod usage;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

pub use drivers::{driver_for, Driver};
pub use layout::Layout;
pub use settings::RuntimeSettings;

/// A boxed future, so drivers can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Everything a driver needs to make one component real.
/// Where a site with a `data:` section reaches the platform's data API.
pub const DATA_URL_VAR: &str = "COMMONS_DATA_URL";

#[derive(Debug, Clone)]
pub struct Spec {
    pub deployment: String,
    pub component: String,
    pub kind: commons_blueprint::Kind,
    /// The command with expressions turned into environment references.
    pub command: Option<String>,
    /// Extra environment: the component's `env:` and the values its command reads.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    pub health: Option<commons_blueprint::Health>,
    /// Time limit of one attempt.
    pub timeout: Option<Duration>,
    /// A unique token for this start, so the process can be recognised later.
    pub instance: String,
    /// Limits enforced when sandboxed.
    pub resources: commons_blueprint::Resources,
    /// A password the platform derived for this component (database roles).
    pub credential: Option<String>,
    /// Variables of the platform's environment the workload must not inherit
    /// (where `from_env` secrets were read from).
    pub withhold: Vec<String>,
    /// How a running process is replaced (processes only).
    pub replace: commons_blueprint::model::Replace,
    /// The site's workloads may reach the internet (`network: { egress }`).
    pub egress: bool,
    /// The site declares a `data:` section: its workloads get
    /// `COMMONS_DATA_URL`, the platform's data API as they reach it.
    pub data_api: bool,
    /// An image's volumes, rendered: path inside → directory of the site's.
    pub volumes: Vec<(String, String)>,
}

/// What a driver returns once a component is applied.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    pub handle: Handle,
    pub outputs: IndexMap<String, String>,
    /// The previous instance, still running (start-first): the engine stops
    /// it once the new one is recorded and the gateway has drained it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired: Option<Handle>,
}

/// What a driver needs to find a component again (stored in the state store).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handle {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The address the process is reached at from the host: its site's
    /// own (see [`net`]) when sandboxed; 127.0.0.1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<std::net::Ipv4Addr>,
    /// The container runtime's id, for an `image:` component: stopping
    /// it stops what runs in the container too ([`image::reap`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The image an instance runs, by digest (`REPOSITORY@sha256:…`): a
    /// restart runs the same bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// An image instance's network namespace (`commons-N-S`, see
    /// [`net::InstanceNet`]), removed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Token of a start in progress: set before a task starts anything, so
    /// that whatever an interrupted task left can be found and stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<String>,
    /// Times the process was restarted after stopping by itself.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
    /// Stopped on purpose for lack of traffic; started again on demand.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub idle: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What a driver sees when it looks at a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Observed {
    /// A long-running process that is alive.
    Running,
    /// A long-running process that is not.
    Stopped,
    /// Nothing to run (jobs, files, resources): present as recorded.
    Present,
}

/// A driver failure, phrased for the person who deployed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{0}")]
    Failed(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl DriverError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
        let what = what.into();
        move |source| DriverError::Io { what, source }
    }
}
