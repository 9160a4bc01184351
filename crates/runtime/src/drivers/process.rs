use std::time::{Duration, Instant};

use crate::health::{free_port, http_status, port_is_free};
use crate::proc;
use crate::{Applied, BoxFuture, Driver, DriverError, Handle, Layout, Observed, Spec};
use commons_blueprint::model::Replace;

/// How long a stopping process gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a process without a health check must stay up to count as started.
const SETTLE: Duration = Duration::from_millis(150);
/// Default limit for becoming healthy.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A long-running process given `PORT`, kept running after the CLI exits;
/// also an `image:` component, whose process is its container's runtime
/// (see [`crate::image`]) and whose port is the one its blueprint gives.
pub struct ProcessDriver;

fn image_of(spec: &Spec) -> Option<&commons_blueprint::model::ImageSpec> {
    match &spec.kind {
        commons_blueprint::Kind::Image(image) => Some(image),
        _ => None,
    }
}

fn outputs(port: u16) -> Vec<(String, String)> {
    vec![
        ("port".into(), port.to_string()),
        ("url".into(), format!("http://127.0.0.1:{port}")),
        ("host".into(), "127.0.0.1".into()),
    ]
}

impl Driver for ProcessDriver {
    fn planned_outputs(
        &self,
        _: &Layout,
        spec: &Spec,
        previous: Option<&Handle>,
    ) -> Vec<(String, Option<String>)> {
        if let Some(image) = image_of(spec) {
            return outputs(image.port)
                .into_iter()
                .map(|(k, v)| (k, Some(v)))
                .collect();
        }
        // Started first, the new version listens beside the old one: on a
        // port not known yet.
        let beside =
            spec.replace == Replace::StartFirst && previous.is_some_and(|h| h.pid.is_some());
        match previous.and_then(|h| h.port).filter(|_| !beside) {
            // The port is kept across restarts, so dependents need not change.
            Some(port) => outputs(port)
                .into_iter()
                .map(|(k, v)| (k, Some(v)))
                .collect(),
            None => vec![
                ("port".into(), None),
                ("url".into(), None),
                ("host".into(), Some("127.0.0.1".into())),
            ],
        }
    }

    fn apply<'a>(
        &'a self,
        layout: &'a Layout,
        spec: &'a Spec,
        previous: Option<&'a Handle>,
    ) -> BoxFuture<'a, Result<Applied, DriverError>> {
        Box::pin(async move {
            // Start-first leaves the running version alone until the new
            // one is healthy (the engine retires it); stop-first stops it now.
            let running = previous.filter(|h| {
                matches!((h.pid, &h.instance), (Some(pid), Some(i)) if proc::is_instance_alive(pid, i))
            });
            // A container listens on its image's port in the site's one
            // network: it cannot start beside its predecessor.
            let image = image_of(spec);
            let beside =
                spec.replace == Replace::StartFirst && running.is_some() && image.is_none();
            if !beside {
                if let Some(previous) = previous {
                    stop_instance(&spec.deployment, &spec.component, previous, STOP_GRACE).await;
                }
            }
            let port = match (image, previous.and_then(|h| h.port)) {
                (Some(image), _) => image.port,
                (None, Some(p)) if !beside && port_is_free(p) => p,
                _ => free_port().map_err(DriverError::io("finding a free port"))?,
            };
            let pidfile = layout.pid_file(&spec.deployment, &spec.component);
            let mut env = vec![("PORT", port.to_string())];
            if !spec.env.iter().any(|(k, _)| k == "HOST") {
                env.push(("HOST", "127.0.0.1".to_string()));
            }
            let mut started = match image {
                Some(image) => crate::image::spawn(layout, spec, image, port).await?,
                None => proc::spawn(layout, spec, &env)?,
            };
            let pid = started.pid;
            let limit = spec
                .health
                .as_ref()
                .map(|h| Duration::from_millis(h.timeout_ms))
                .or(spec.timeout)
                .unwrap_or(DEFAULT_START_TIMEOUT);
            let deadline = Instant::now() + limit;
            let mut last_problem;
            loop {
                if let Ok(Some(status)) = started.child.try_wait() {
                    let tail = proc::log_tail(&started.log, started.log_offset, 2048);
                    let _ = std::fs::remove_file(&pidfile);
                    return Err(DriverError::Failed(format!(
                        "process exited while starting ({status}){}",
                        if tail.is_empty() {
                            String::new()
                        } else {
                            format!("; its output ends with:\n{tail}")
                        }
                    )));
                }
                match &spec.health {
                    Some(h) => {
                        let remaining = deadline.saturating_duration_since(Instant::now());
                        match http_status(
                            (started.addr, port).into(),
                            &h.http,
                            remaining.min(Duration::from_secs(5)),
                        )
                        .await
                        {
                            Ok(code) if (200..400).contains(&code) => break,
                            Ok(code) => last_problem = format!("GET {} answered {code}", h.http),
                            Err(e) => last_problem = format!("GET {}: {e}", h.http),
                        }
                        if Instant::now() >= deadline {
                            proc::stop(pid, &spec.instance, Duration::from_secs(2)).await;
                            if image.is_some() {
                                crate::image::reap(
                                    &spec.deployment,
                                    &spec.component,
                                    &crate::image::container_id(spec),
                                )
                                .await;
                            }
                            return Err(DriverError::Failed(format!(
                                "health check failed for {limit:?} on port {port}: {last_problem}"
                            )));
                        }
                        tokio::time::sleep(Duration::from_millis(h.interval_ms)).await;
                    }
                    None => {
                        tokio::time::sleep(SETTLE).await;
                        if let Ok(None) = started.child.try_wait() {
                            break;
                        }
                    }
                }
            }
            let handle = Handle {
                pid: Some(pid),
                instance: Some(spec.instance.clone()),
                port: Some(port),
                addr: (!started.addr.is_loopback()).then_some(started.addr),
                container: image.map(|_| crate::image::container_id(spec)),
                pending: None,
                restarts: 0,
                idle: false,
            };
            Ok(Applied {
                handle,
                outputs: outputs(port).into_iter().collect(),
                retired: running.filter(|_| beside).cloned(),
            })
        })
    }

    fn remove<'a>(
        &'a self,
        layout: &'a Layout,
        deployment: &'a str,
        component: &'a str,
        handle: &'a Handle,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            stop_instance(deployment, component, handle, STOP_GRACE).await;
            let _ = std::fs::remove_file(layout.pid_file(deployment, component));
            Ok(())
        })
    }

    fn observe(&self, handle: &Handle) -> Observed {
        match (handle.pid, &handle.instance) {
            (Some(pid), Some(instance)) if proc::is_instance_alive(pid, instance) => {
                Observed::Running
            }
            _ => Observed::Stopped,
        }
    }
}

/// Stops the instance `handle` names — its whole process group, and for an
/// image its container — giving it `grace` after SIGTERM.
pub async fn stop_instance(deployment: &str, component: &str, handle: &Handle, grace: Duration) {
    if let (Some(pid), Some(instance)) = (handle.pid, &handle.instance) {
        proc::stop(pid, instance, grace).await;
    }
    if let Some(container) = &handle.container {
        crate::image::reap(deployment, component, container).await;
    }
}

/// How long a replaced instance may take to finish its in-flight requests.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// The gateway rewrites its state at least this often while it runs.
const GATEWAY_FRESH_MS: u64 = 3_000;

/// Stops a replaced instance once no request can reach it: the gateway
/// (if one runs) no longer routes to its address and has no request in flight
/// there. `since_ms` is when the new instance was recorded.
pub async fn retire(layout: &Layout, old: &Handle, since_ms: u64) {
    let (Some(pid), Some(instance)) = (old.pid, &old.instance) else {
        return;
    };
    if let Some(port) = old.port {
        let deadline = Instant::now() + DRAIN_LIMIT;
        let addr =
            std::net::SocketAddr::from((old.addr.unwrap_or(std::net::Ipv4Addr::LOCALHOST), port));
        while Instant::now() < deadline && gateway_still_uses(layout, addr, since_ms) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    proc::stop(pid, instance, STOP_GRACE).await;
}

/// True while a running gateway routes to `port` or has requests in flight
/// there, or has not yet seen the state written at `since_ms`.
fn gateway_still_uses(layout: &Layout, addr: std::net::SocketAddr, since_ms: u64) -> bool {
    #[derive(serde::Deserialize)]
    struct State {
        updated_ms: u64,
        /// "IP:PORT" → requests in flight.
        upstreams: std::collections::HashMap<String, u64>,
    }
    let Some(state) = std::fs::read(layout.gateway_state())
        .ok()
        .and_then(|b| serde_json::from_slice::<State>(&b).ok())
    else {
        return false;
    };
    let now = commons_clock::now_ms() as u64;
    if now.saturating_sub(state.updated_ms) > GATEWAY_FRESH_MS {
        // No gateway runs: nothing routes there.
        return false;
    }
    state.updated_ms <= since_ms || state.upstreams.contains_key(&addr.to_string())
}
