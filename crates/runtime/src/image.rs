//! `image:` components: the image pulled into the machine's store
//! (`COMMONS_HOME/images`, see `commons_images`), and run by runc in the
//! site's sandbox — its own user, its network namespace, its cgroup and
//! limits, a read-only root, no capabilities — under a keeper like any
//! process, so supervision, logs, exit records and health checks are the
//! process driver's.

use std::path::{Path, PathBuf};

use commons_blueprint::model::ImageSpec;
use commons_images::{Bundle, Container, Credentials, ImageStore, RegistrySettings};

use crate::proc::Started;
use crate::{DriverError, Layout, Spec};

/// The machine's image store of the platform at `layout`.
pub fn store(layout: &Layout) -> ImageStore {
    ImageStore::new(
        &layout.home.join("images"),
        &RegistrySettings {
            insecure: crate::settings::current().insecure_registries.clone(),
            mirrors: crate::settings::current().registry_mirrors.clone(),
        },
    )
}

fn runc() -> Result<PathBuf, DriverError> {
    [
        "/usr/sbin/runc",
        "/usr/bin/runc",
        "/usr/local/bin/runc",
        "/usr/local/sbin/runc",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .ok_or_else(|| {
        DriverError::Failed(
            "image components are run by runc, which is not installed (apt-get install runc)"
                .into(),
        )
    })
}

/// A volume's directory on the host, if it is the site's own: inside its
/// deployment's directory (a blueprint names `${components.X.path}`), never
/// anywhere else on the host.
fn own_dir(layout: &Layout, deployment: &str, source: &str) -> Result<PathBuf, DriverError> {
    let refused = || {
        DriverError::Failed(format!(
            "volume source {source:?} is not a directory of this site's: use ${{components.NAME.path}} of a volume component"
        ))
    };
    let root = std::fs::canonicalize(layout.deployment_dir(deployment)).map_err(|_| refused())?;
    let path = std::fs::canonicalize(Path::new(source)).map_err(|_| refused())?;
    if path.starts_with(&root) && path.is_dir() {
        Ok(path)
    } else {
        Err(refused())
    }
}

/// How far a pull is: compressed bytes fetched of those to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pulling {
    pub fetched: u64,
    pub to_fetch: u64,
}

/// Pulls `reference` into the machine's store (fetching only the layers not
/// there yet, telling `progress` how far it is) and returns it by digest:
/// `REGISTRY/REPOSITORY@sha256:…`, what the deployment runs and records.
pub async fn resolve(
    layout: &Layout,
    reference: &str,
    progress: &(dyn Fn(Pulling) + Sync),
) -> Result<String, DriverError> {
    let pulled = store(layout)
        .pull(reference, &Credentials::Anonymous, &|p| {
            progress(Pulling {
                fetched: p.fetched,
                to_fetch: p.to_fetch,
            })
        })
        .await
        .map_err(|e| DriverError::Failed(e.to_string()))?;
    commons_images::by_digest(reference, &pulled.digest)
        .map_err(|e| DriverError::Failed(e.to_string()))
}

/// The container runtime's id of `spec`'s instance.
pub fn container_id(spec: &Spec) -> String {
    id_of(&spec.deployment, &spec.component, &spec.instance)
}

/// The container runtime's id of one instance of a component.
pub fn id_of(deployment: &str, component: &str, instance: &str) -> String {
    format!("commons-{deployment}-{component}-{instance}")
}

/// The cgroup (under `commons/`) one instance's container is confined in:
/// its component's, so the component's use is read in one place, and of its
/// own, since two instances of it run at once while one replaces the other.
pub fn cgroup_of(deployment: &str, component: &str, instance: &str) -> String {
    format!("{deployment}/{component}/{instance}")
}

/// Where runc keeps the state of the containers it has (until `delete`).
const RUNC_STATE: &str = "/run/runc";

/// Whether runc still has the container of this instance.
pub fn exists(deployment: &str, component: &str, instance: &str) -> bool {
    Path::new(RUNC_STATE)
        .join(id_of(deployment, component, instance))
        .exists()
}

/// runc's state of an instance's container, if it has one.
fn runc_state(deployment: &str, component: &str, instance: &str) -> Option<serde_json::Value> {
    let path = Path::new(RUNC_STATE)
        .join(id_of(deployment, component, instance))
        .join("state.json");
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The instance network a container was started in, as runc recorded it
/// (its state names the namespace it joined): what an interrupted deploy
/// left is found from the instance alone.
pub fn netns_of(deployment: &str, component: &str, instance: &str) -> Option<String> {
    let state = runc_state(deployment, component, instance)?;
    state["config"]["namespaces"]
        .as_array()?
        .iter()
        .filter_map(|ns| ns["path"].as_str())
        .filter_map(|p| p.strip_prefix(crate::net::NETNS_DIR)?.strip_prefix('/'))
        .find(|name| crate::net::instance_ip(name).is_some())
        .map(str::to_string)
}

/// Whether the first process of a running container would ignore SIGTERM:
/// it is its PID namespace's init, which the kernel sends only the signals
/// it has a handler for. Such an app would have ended on SIGTERM outside a
/// container, so waiting for it to stop by itself is waiting for nothing.
pub fn init_ignores_sigterm(deployment: &str, component: &str, instance: &str) -> bool {
    let Some(pid) =
        runc_state(deployment, component, instance).and_then(|v| v["init_process_pid"].as_i64())
    else {
        return false;
    };
    let caught = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        });
    matches!(caught, Some(mask) if mask & (1 << (libc::SIGTERM - 1)) == 0)
}

/// Kills whatever still runs in one instance's container, lets runc forget
/// it, and removes its network. A container's first process may ignore
/// SIGTERM (it is its PID namespace's init) and outlives its runtime when
/// that is killed, so the container's cgroup is what is emptied.
pub async fn reap(deployment: &str, component: &str, instance: &str, netns: Option<&str>) {
    let container = id_of(deployment, component, instance);
    let cgroup = format!("commons/{}", cgroup_of(deployment, component, instance));
    let mut hierarchies = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        hierarchies.extend(entries.flatten().map(|e| e.path()));
    }
    let members = || -> Vec<i32> {
        let mut pids: Vec<i32> = hierarchies
            .iter()
            .filter_map(|h| std::fs::read_to_string(h.join(&cgroup).join("cgroup.procs")).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let left = members();
        if left.is_empty() || std::time::Instant::now() >= deadline {
            break;
        }
        for pid in left {
            // SAFETY: kill takes plain integers; the pids are the members
            // of this component's own cgroup.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if let Ok(runc) = runc() {
        let _ = tokio::process::Command::new(runc)
            .args(["delete", "--force", &container])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await;
    }
    for h in &hierarchies {
        let _ = std::fs::remove_dir(h.join(&cgroup));
    }
    if let Some(netns) = netns {
        crate::net::remove_instance(netns);
    }
}

/// An image instance started: its runtime under a keeper, and its network.
pub struct StartedImage {
    pub started: Started,
    pub net: crate::net::InstanceNet,
}

/// Pulls `image` and starts an instance of it for `spec`, listening on
/// `image.port` inside a network of its own behind its site's — the one
/// named `reuse` if it is free (a restart keeps its address).
pub async fn spawn(
    layout: &Layout,
    spec: &Spec,
    image: &ImageSpec,
    reuse: Option<&str>,
) -> Result<StartedImage, DriverError> {
    if !crate::sandbox::enabled() {
        return Err(DriverError::Failed(
            "image components run only sandboxed: start the platform as root (the sandbox is the default there)"
                .into(),
        ));
    }
    let runc = runc()?;
    let store = store(layout);
    let pulled = store
        .pull(&image.reference, &Credentials::Anonymous, &|_| {})
        .await
        .map_err(|e| DriverError::Failed(e.to_string()))?;
    let args = Container::args_of(&pulled, image.command.as_deref());
    if args.is_empty() {
        return Err(DriverError::Failed(format!(
            "{} says nothing to run (no Entrypoint or Cmd): give the component a command",
            image.reference
        )));
    }
    let uid = crate::sandbox::uid_for(&layout.home, &spec.deployment)
        .map_err(DriverError::io("allocating the deployment's user"))?;
    let data = layout.data_dir(&spec.deployment);
    crate::layout::private_dir(&data).map_err(DriverError::io("making the data directory"))?;
    crate::sandbox::give(&data, uid)
        .map_err(DriverError::io("handing the data directory to its user"))?;
    let site = crate::net::site_network(&layout.home, &spec.deployment, spec.egress)
        .map_err(DriverError::io("making the site's network"))?;
    let mut binds = vec![(data.clone(), data.display().to_string())];
    for (inside, source) in &spec.volumes {
        binds.push((own_dir(layout, &spec.deployment, source)?, inside.clone()));
    }
    let mut env: Vec<(String, String)> = spec.env.clone();
    env.push(("PORT".into(), image.port.to_string()));
    env.push(("COMMONS_DATA_DIR".into(), data.display().to_string()));
    let data_api = crate::net::data_api_url(
        crate::settings::current().data_api,
        Some(&site),
        spec.data_api,
    )
    .map_err(DriverError::io("opening the way to the data API"))?;
    if let Some(url) = data_api {
        env.push((crate::DATA_URL_VAR.into(), url));
    }
    let container = Container {
        id: container_id(spec),
        args,
        env,
        cwd: pulled
            .config
            .working_dir
            .clone()
            .filter(|d| d.starts_with('/'))
            .unwrap_or_else(|| "/".into()),
        uid,
        hostname: spec.deployment.clone(),
        netns: PathBuf::new(),
        cgroup: format!(
            "commons/{}",
            cgroup_of(&spec.deployment, &spec.component, &spec.instance)
        ),
        memory_bytes: spec.resources.memory_bytes,
        cpu_millis: spec.resources.cpu_millis,
        pids: spec.resources.pids,
        binds,
    };
    let runs = layout.deployment_dir(&spec.deployment).join("run");
    forget_bundles(&runs, &spec.component);
    let bundle_dir = runs.join(format!("{}.{}.bundle", spec.component, spec.instance));
    let net = crate::net::instance_network(&site, image.port, reuse)
        .map_err(DriverError::io("making the instance's network"))?;
    let container = Container {
        netns: net.netns_path(),
        ..container
    };
    let started = Bundle::prepare(&bundle_dir, store.lower_dirs(&pulled), &pulled, &container)
        .map_err(DriverError::io("preparing the container"))
        .and_then(|bundle| {
            crate::proc::spawn_container(
                layout,
                spec,
                &bundle.command(&runc, &container.id),
                site.site_ip,
            )
        });
    match started {
        Ok(started) => Ok(StartedImage { started, net }),
        Err(e) => {
            crate::net::remove_instance(&net.netns);
            Err(e)
        }
    }
}

/// Removes the bundles of `component`'s instances that no longer run (a
/// bundle is a directory of mount points and a spec; runc keeps the state
/// of a container that exists under `/run/runc`).
fn forget_bundles(runs: &Path, component: &str) {
    let Ok(entries) = std::fs::read_dir(runs) else {
        return;
    };
    let prefix = format!("{component}.");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(instance) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".bundle"))
        else {
            continue;
        };
        let deployment = runs
            .parent()
            .and_then(|d| d.file_name())
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_default();
        let alive = exists(&deployment, component, instance);
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
