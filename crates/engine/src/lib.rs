//! The deployment engine: desired state (blueprint + inputs) against
//! recorded state (the store) gives a [`Plan`]; [`Engine::deploy`] runs it
//! in parallel along the dependency graph through the runtime's drivers,
//! records every task, and commits a deployment record to git.

pub mod apply;
pub mod backup;
mod deploy;
pub mod follow;
mod hosting;
pub mod increments;
pub mod pgoutput;
mod pgtools;
pub mod plan;
pub mod records;
pub mod secrets;
mod status;
pub mod supervise;
mod target;

pub use deploy::{source_files, Lock, LockWait};

/// A site's secret values for a cluster (see [`Engine::cluster_secrets`]).
#[derive(Debug, Clone, Default)]
pub struct ClusterSecrets {
    /// By the blueprint's secret name.
    pub secrets: std::collections::BTreeMap<String, String>,
    /// By `postgres:` component.
    pub passwords: std::collections::BTreeMap<String, String>,
    /// A keyed fingerprint of them all: equal values, equal prints.
    pub print: String,
}
pub use hosting::Hosting;
pub use status::{is_down, ComponentStatus, CrashLoop, DeploymentStatus, LastExit, Outcome};
use target::target_from_record;
pub use target::{valid_name, Target};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use indexmap::IndexMap;
use serde::Serialize;

use commons_blueprint::{Blueprint, Diagnostics, FileSystem};
use commons_clock::now_ms;
use commons_runtime::exit::Ending;
use commons_runtime::{driver_for, Layout, Observed};
use commons_store::{ComponentRow, ComponentState, StateStore, StoreError, TaskRow};

pub use apply::{Progress, Quiet};
pub use commons_store::{DeploymentRow, StoreConfig};
pub use plan::{Action, Change, Plan};

/// Default number of tasks run at once.
pub const DEFAULT_JOBS: usize = 16;

/// Why an engine operation did not succeed. [`EngineError::is_bad_input`]
/// separates the user's mistakes (exit 2) from failures (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Blueprint(Diagnostics),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
        let what = what.into();
        move |source| EngineError::Io { what, source }
    }

    pub fn is_bad_input(&self) -> bool {
        matches!(self, EngineError::Blueprint(_) | EngineError::Input(_))
    }
}

/// Replaces every secret value in `text` by `[redacted]`.
pub(crate) fn redact(text: &str, secrets: &BTreeMap<String, String>) -> String {
    let mut out = text.to_string();
    for v in secrets.values() {
        if v.len() >= 4 {
            out = out.replace(v.as_str(), "[redacted]");
        }
    }
    out
}

/// How service tokens start.
pub const SERVICE_TOKEN_PREFIX: &str = "cmsv_";

/// The engine over one data directory.
pub struct Engine {
    pub layout: Layout,
    store: Arc<dyn StateStore>,
    store_config: StoreConfig,
    secrets: secrets::SecretBox,
    lock_wait: deploy::LockWait,
}

impl Engine {
    /// Opens the data directory `home`, creating it if needed, with its
    /// state in the store `store` names.
    pub fn open(home: &Path, store: &StoreConfig) -> Result<Engine, EngineError> {
        commons_runtime::layout::private_dir(home)
            .map_err(EngineError::io(format!("creating {}", home.display())))?;
        let layout = Layout::new(home);
        let mut secrets = secrets::SecretBox::open(&layout.secrets_key())?;
        let state = store.open_state(&layout.state_db())?;
        // Instances sharing a database must share the key: site sessions,
        // service tokens, derived passwords and everything sealed in the
        // shared store (the gateways' certificates) come from it. The first
        // to open the store keeps a value sealed with its key; an instance
        // whose key does not open it is refused before it writes anything.
        const CHECK: &[u8] = b"onecommons platform key";
        // Read first: only the first open of a store writes the check.
        let kept = match state.shared("check", "secrets-key")? {
            Some(kept) => kept,
            None => state.keep_first("check", "secrets-key", &secrets.seal("key-check", CHECK))?,
        };
        if secrets.open_sealed("key-check", &kept).as_deref() != Some(CHECK) {
            return Err(EngineError::Internal(format!(
                "{} is not the key this platform's state was made with: every instance sharing \
                 the database needs the same file (copy it, mode 0600, from an instance that \
                 already uses the database)",
                layout.secrets_key().display()
            )));
        }
        if matches!(store, StoreConfig::Postgres { .. }) {
            secrets.share_through(state.clone());
        }
        Ok(Engine {
            store: state,
            store_config: store.clone(),
            layout,
            secrets,
            lock_wait: Default::default(),
        })
    }

    /// Makes this engine wait for a deployment another process is working
    /// on, as a person's command should, instead of answering `Busy` at once.
    pub fn wait_for_locks(mut self, wait: LockWait) -> Engine {
        self.lock_wait = wait;
        self
    }

    /// `plain` sealed for `purpose` with the platform's key, for what the
    /// platform keeps outside its data directory (the shared store).
    pub fn seal(&self, purpose: &str, plain: &[u8]) -> Vec<u8> {
        self.secrets.seal(purpose, plain)
    }

    /// What [`Engine::seal`] sealed; `None` if it does not open.
    pub fn open_sealed(&self, purpose: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        self.secrets.open_sealed(purpose, sealed)
    }

    /// Where its state is kept.
    pub fn store_config(&self) -> &StoreConfig {
        &self.store_config
    }

    /// The exclusive lock on deployment `name`, on this machine and across
    /// the instances sharing its state.
    pub(crate) fn lock(&self, name: &str) -> Result<Lock, EngineError> {
        Lock::take(
            &self.layout.lock_file(name),
            name,
            &self.store_config,
            &self.lock_wait,
        )
    }

    /// Another engine over the same data directory and store, for a thread
    /// of its own (each has its own connection).
    pub fn reopen(&self) -> Result<Engine, EngineError> {
        Ok(Engine::open(&self.layout.home, &self.store_config)?.wait_for_locks(self.lock_wait))
    }

    /// The credential a deployment's processes prove who they are with
    /// when they call another site through the gateway on a user's behalf
    /// (`COMMONS_SERVICE_TOKEN`): derived from the platform's key, never
    /// stored.
    pub fn service_token(&self, deployment: &str) -> String {
        format!(
            "{SERVICE_TOKEN_PREFIX}{deployment}.{}",
            self.secrets.derive(&format!("service/{deployment}"))
        )
    }

    /// The deployment a service token belongs to, if it is one this
    /// platform made (compared in constant time).
    pub fn service_of(&self, token: &str) -> Option<String> {
        let (deployment, _) = token.strip_prefix(SERVICE_TOKEN_PREFIX)?.split_once('.')?;
        let expected = self.service_token(deployment);
        let same = expected.len() == token.len()
            && expected
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        same.then(|| deployment.to_string())
    }

    /// What a site's templates read when it runs on a provider's
    /// Kubernetes cluster instead of here, under the site's lock (held as
    /// long as the returned [`Lock`] lives, so a deploy here and one there
    /// never overlap): its secrets, kept, made or read as for any deploy
    /// and stored sealed; a password for each `postgres:` component,
    /// derived from the platform's key and never stored.
    pub fn cluster_secrets(&self, target: &Target) -> Result<(Lock, ClusterSecrets), EngineError> {
        let lock = self.lock(&target.name)?;
        let (secrets, changed) =
            self.secrets
                .resolve(&target.name, &target.blueprint.secrets, false)?;
        if changed {
            self.secrets.save(&target.name, &secrets)?;
        }
        let passwords = target
            .blueprint
            .components
            .iter()
            .filter(|(_, c)| matches!(c.kind, commons_blueprint::Kind::Postgres))
            .map(|(name, _)| {
                let purpose = format!("kubernetes/{}/{name}", target.name);
                (name.clone(), self.secrets.derive(&purpose))
            })
            .collect();
        let print = self.secrets.fingerprint(
            &serde_json::to_string(&(&secrets, &passwords)).expect("maps of strings serialise"),
        );
        Ok((
            lock,
            ClusterSecrets {
                secrets,
                passwords,
                print,
            },
        ))
    }

    /// Forgets the stored secrets of a site that is gone from a cluster.
    pub fn forget_secrets(&self, name: &str) {
        self.secrets.delete(name);
    }

    /// A key for `purpose` derived from the platform's key (the same on
    /// every start, never stored): for credentials the platform signs.
    pub fn derived_key(&self, purpose: &str) -> String {
        self.secrets.derive(&format!("key/{purpose}"))
    }

    /// Where everything lives under the data directory.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn store(&self) -> &dyn StateStore {
        self.store.as_ref()
    }

    /// The state store, to share with what reads its changes (the relay
    /// to an event bus).
    pub fn shared_store(&self) -> Arc<dyn StateStore> {
        self.store.clone()
    }

    /// Every gateway of the platform, when instances share this store: a
    /// replaced instance is stopped once none of them uses it.
    pub(crate) fn other_gateways(
        &self,
    ) -> Option<Arc<dyn commons_runtime::drivers::OtherGateways>> {
        match self.store_config {
            StoreConfig::Postgres { .. } => Some(Arc::new(SharedGateways(self.store.clone()))),
            StoreConfig::Embedded => None,
        }
    }
}

/// What each gateway sharing the store says of the upstreams it uses.
struct SharedGateways(Arc<dyn StateStore>);

impl commons_runtime::drivers::OtherGateways for SharedGateways {
    fn still_use(&self, addr: std::net::SocketAddr, since_ms: u64) -> bool {
        use commons_runtime::drivers::{GatewayLoad, GATEWAY_LOAD_KIND};
        let Ok(entries) = self.0.shared_since(GATEWAY_LOAD_KIND, 0) else {
            return false;
        };
        let now = now_ms() as u64;
        entries
            .iter()
            .filter_map(|e| serde_json::from_slice::<GatewayLoad>(&e.body).ok())
            .any(|load| load.still_uses(addr, since_ms, now))
    }
}

impl Engine {
    /// Writes a backup of `name` (data, volumes, databases, record) to the archive.
    pub fn backup(&self, name: &str) -> Result<backup::Backup, EngineError> {
        let _lock = self.lock(name)?;
        let kinds = self.component_kinds(name)?;
        backup::write(self, name, &kinds, now_ms())
    }

    /// Each component of deployment `name` with its kind.
    fn component_kinds(&self, name: &str) -> Result<Vec<(String, String)>, EngineError> {
        if self.store.deployment(name)?.is_none() {
            return Err(EngineError::Input(format!(
                "no deployment named \"{name}\""
            )));
        }
        Ok(self
            .store
            .components(name)?
            .into_iter()
            .map(|c| (c.name, c.kind))
            .collect())
    }

    /// Stands a backed-up deployment up again, under its name or `as_name`,
    /// with its files and databases in place before anything of it runs.
    pub async fn restore(
        &self,
        archive: &Path,
        as_name: Option<&str>,
        jobs: usize,
        progress: &dyn Progress,
    ) -> Result<(Target, Outcome), EngineError> {
        let staging = self.layout.home.join("clones").join(secrets::token());
        let manifest = backup::unpack(archive, &staging)?;
        let result = self
            .restore_from(&staging, &manifest, None, as_name, jobs, progress)
            .await;
        let _ = std::fs::remove_dir_all(&staging);
        result
    }

    async fn restore_from(
        &self,
        staging: &Path,
        manifest: &backup::Manifest,
        caught: Option<&Path>,
        as_name: Option<&str>,
        jobs: usize,
        progress: &dyn Progress,
    ) -> Result<(Target, Outcome), EngineError> {
        let name = as_name
            .map(str::to_string)
            .unwrap_or_else(|| manifest.deployment.clone());
        if !valid_name(&name) {
            return Err(EngineError::Input(format!(
                "invalid deployment name \"{name}\""
            )));
        }
        if self.store.deployment(&name)?.is_some() {
            return Err(EngineError::Input(format!(
                "a deployment named \"{name}\" exists already; pass --as to restore under another name"
            )));
        }
        let record: serde_json::Value = std::fs::read(staging.join("record/record.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| EngineError::Input("the backup holds no deployment record".into()))?;
        let root = record["root"]
            .as_str()
            .unwrap_or("source/commons.yaml")
            .to_string();
        let dest = self.layout.deployment_dir(&name).join("source");
        backup::move_tree(&staging.join("record"), &dest)?;
        backup::move_tree(&staging.join("data"), &self.layout.data_dir(&name))?;
        for v in &manifest.volumes {
            backup::move_tree(
                &staging.join("volumes").join(v),
                &self.layout.volume_dir(&name, v),
            )?;
        }
        if commons_runtime::sandbox::enabled() {
            let uid = commons_runtime::sandbox::uid_for(&self.layout.home, &name)
                .map_err(EngineError::io("allocating the deployment's user"))?;
            commons_runtime::sandbox::give_tree(
                &self.layout.deployment_dir(&name).join("data"),
                uid,
            )
            .and_then(|_| {
                commons_runtime::sandbox::give_tree(
                    &self.layout.deployment_dir(&name).join("volumes"),
                    uid,
                )
            })
            .map_err(EngineError::io("handing the restored files to their user"))?;
        }
        let target = target_from_record(name.clone(), &dest, &root)?;
        // Databases first, loaded as their own role, before any job runs.
        for component in &manifest.databases {
            let Some(c) = target.blueprint.components.get(component) else {
                continue;
            };
            let mut spec = plan::probe_spec(&name, component, c);
            spec.credential = Some(self.secrets.derive(&format!("postgres/{name}/{component}")));
            let applied = driver_for("postgres")
                .apply(&self.layout, &spec, None)
                .await
                .map_err(|e| {
                    EngineError::Internal(format!("restoring database {component}: {e}"))
                })?;
            let url = applied.outputs.get("url").cloned().unwrap_or_default();
            let db = commons_runtime::drivers::postgres::name(&name, component);
            if let Err(e) = follow::finish_restore(caught, &db, component, staging, &url) {
                // Half a load is not kept: the restore can be tried again.
                let _ = self.drop_database(&name, component).await;
                return Err(e);
            }
        }
        let outcome = self
            .deploy_with(&target, jobs, progress, true, None)
            .await?;
        Ok((target, outcome))
    }
}
