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

/// The container runtime's id of `spec`'s instance.
pub fn container_id(spec: &Spec) -> String {
    id_of(&spec.deployment, &spec.component, &spec.instance)
}

/// The container runtime's id of one instance of a component.
pub fn id_of(deployment: &str, component: &str, instance: &str) -> String {
    format!("commons-{deployment}-{component}-{instance}")
}

/// Kills whatever still runs in a component's container and lets runc
/// forget it. A container's first process may ignore SIGTERM (it is its PID
/// namespace's init) and outlives its runtime when that is killed, so the
/// container's cgroup is what is emptied. (Only one instance of an image
/// component runs at a time: the cgroup holds nothing else.)
pub async fn reap(deployment: &str, component: &str, container: &str) {
    let cgroup = format!("commons/{deployment}/{component}");
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
            .args(["delete", "--force", container])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await;
    }
}

/// Pulls `image` and starts it for `spec`, listening on `port` inside.
pub async fn spawn(
    layout: &Layout,
    spec: &Spec,
    image: &ImageSpec,
    port: u16,
) -> Result<Started, DriverError> {
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
    let net = crate::net::site_network(&layout.home, &spec.deployment, spec.egress)
        .map_err(DriverError::io("making the site's network"))?;
    let mut binds = vec![(data.clone(), data.display().to_string())];
    for (inside, source) in &spec.volumes {
        binds.push((own_dir(layout, &spec.deployment, source)?, inside.clone()));
    }
    let mut env: Vec<(String, String)> = spec.env.clone();
    env.push(("PORT".into(), port.to_string()));
    env.push(("COMMONS_DATA_DIR".into(), data.display().to_string()));
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
        netns: net.netns_path(),
        cgroup: format!("commons/{}/{}", spec.deployment, spec.component),
        memory_bytes: spec.resources.memory_bytes,
        cpu_millis: spec.resources.cpu_millis,
        pids: spec.resources.pids,
        binds,
    };
    let bundle_dir = layout
        .deployment_dir(&spec.deployment)
        .join("run")
        .join(format!("{}.bundle", spec.component));
    let bundle = Bundle::prepare(&bundle_dir, store.lower_dirs(&pulled), &pulled, &container)
        .map_err(DriverError::io("preparing the container"))?;
    crate::proc::spawn_container(
        layout,
        spec,
        &bundle.command(&runc, &container.id),
        net.site_ip,
    )
}
