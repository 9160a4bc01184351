//! Drivers for components that are files or databases rather than processes.

use commons_blueprint::Kind;

use crate::{Applied, BoxFuture, Driver, DriverError, Handle, Layout, Observed, Spec};

fn present(outputs: Vec<(String, Option<String>)>) -> Applied {
    Applied {
        handle: Handle::default(),
        outputs: outputs
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect(),
        retired: None,
    }
}

/// Sandboxed workloads run as their deployment's user: hand it the path.
fn own(layout: &Layout, deployment: &str, path: &std::path::Path) -> Result<(), DriverError> {
    if !crate::sandbox::enabled() {
        return Ok(());
    }
    let uid = crate::sandbox::uid_for(&layout.home, deployment)
        .map_err(DriverError::io("allocating the deployment's user"))?;
    if let Some(parent) = path.parent() {
        crate::sandbox::traversable(&layout.home, parent)
            .map_err(DriverError::io("opening the way to a volume"))?;
    }
    crate::sandbox::give(path, uid).map_err(DriverError::io(format!(
        "handing {} to its user",
        path.display()
    )))
}

fn done<'a>() -> BoxFuture<'a, Result<(), DriverError>> {
    Box::pin(async { Ok(()) })
}

/// A directory of files; the gateway serves it (milestone 2).
pub struct StaticDriver;

impl Driver for StaticDriver {
    fn planned_outputs(
        &self,
        _: &Layout,
        spec: &Spec,
        _: Option<&Handle>,
    ) -> Vec<(String, Option<String>)> {
        match &spec.kind {
            Kind::Static { path } => vec![("path".into(), Some(path.display().to_string()))],
            _ => Vec::new(),
        }
    }

    fn apply<'a>(
        &'a self,
        layout: &'a Layout,
        spec: &'a Spec,
        previous: Option<&'a Handle>,
    ) -> BoxFuture<'a, Result<Applied, DriverError>> {
        Box::pin(async move {
            if let Kind::Static { path } = &spec.kind {
                if !path.is_dir() {
                    return Err(DriverError::Failed(format!(
                        "static directory {} does not exist",
                        path.display()
                    )));
                }
            }
            Ok(present(self.planned_outputs(layout, spec, previous)))
        })
    }

    fn remove<'a>(
        &'a self,
        _: &'a Layout,
        _: &'a str,
        _: &'a str,
        _: &'a Handle,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        done()
    }

    fn observe(&self, _: &Handle) -> Observed {
        Observed::Present
    }
}

/// A named persistent directory that survives redeploys; `destroy` removes it.
pub struct VolumeDriver;

impl Driver for VolumeDriver {
    fn planned_outputs(
        &self,
        layout: &Layout,
        spec: &Spec,
        _: Option<&Handle>,
    ) -> Vec<(String, Option<String>)> {
        let path = layout.volume_dir(&spec.deployment, &spec.component);
        vec![("path".into(), Some(path.display().to_string()))]
    }

    fn apply<'a>(
        &'a self,
        layout: &'a Layout,
        spec: &'a Spec,
        previous: Option<&'a Handle>,
    ) -> BoxFuture<'a, Result<Applied, DriverError>> {
        Box::pin(async move {
            let path = layout.volume_dir(&spec.deployment, &spec.component);
            crate::layout::private_dir(&path).map_err(DriverError::io(format!(
                "creating volume {}",
                path.display()
            )))?;
            own(layout, &spec.deployment, &path)?;
            Ok(present(self.planned_outputs(layout, spec, previous)))
        })
    }

    fn remove<'a>(
        &'a self,
        layout: &'a Layout,
        deployment: &'a str,
        component: &'a str,
        _: &'a Handle,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let path = layout.volume_dir(deployment, component);
            match std::fs::remove_dir_all(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(DriverError::io(
                    format!("removing volume {}", path.display()),
                )(e)),
                _ => Ok(()),
            }
        })
    }

    fn observe(&self, _: &Handle) -> Observed {
        Observed::Present
    }
}

/// A SQLite database file in the deployment's data directory.
pub struct SqliteDriver;

impl Driver for SqliteDriver {
    fn planned_outputs(
        &self,
        layout: &Layout,
        spec: &Spec,
        _: Option<&Handle>,
    ) -> Vec<(String, Option<String>)> {
        let path = layout.sqlite_file(&spec.deployment, &spec.component);
        vec![
            ("path".into(), Some(path.display().to_string())),
            ("url".into(), Some(format!("sqlite://{}", path.display()))),
        ]
    }

    fn apply<'a>(
        &'a self,
        layout: &'a Layout,
        spec: &'a Spec,
        previous: Option<&'a Handle>,
    ) -> BoxFuture<'a, Result<Applied, DriverError>> {
        Box::pin(async move {
            let path = layout.sqlite_file(&spec.deployment, &spec.component);
            if let Some(dir) = path.parent() {
                crate::layout::private_dir(dir)
                    .map_err(DriverError::io("creating the data directory"))?;
            }
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(DriverError::io(format!("creating {}", path.display())))?;
            own(layout, &spec.deployment, &path)?;
            Ok(present(self.planned_outputs(layout, spec, previous)))
        })
    }

    fn remove<'a>(
        &'a self,
        layout: &'a Layout,
        deployment: &'a str,
        component: &'a str,
        _: &'a Handle,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let path = layout.sqlite_file(deployment, component);
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut p = path.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
            Ok(())
        })
    }

    fn observe(&self, _: &Handle) -> Observed {
        Observed::Present
    }
}
