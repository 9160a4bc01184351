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
    outputs_at(std::net::Ipv4Addr::LOCALHOST, port)
}

/// What the site's other components reach it at: a process on its site's
/// loopback, an image instance at its own address inside the site.
fn outputs_at(host: std::net::Ipv4Addr, port: u16) -> Vec<(String, String)> {
    vec![
        ("port".into(), port.to_string()),
        ("url".into(), format!("http://{host}:{port}")),
        ("host".into(), host.to_string()),
    ]
}

impl Driver for ProcessDriver {
    fn planned_outputs(
        &self,
        _: &Layout,
        spec: &Spec,
        previous: Option<&Handle>,
    ) -> Vec<(String, Option<String>)> {
        // Started first, the new version listens beside the old one: on a
        // port (a process) or at an address (an image instance) not known yet.
        let beside =
            spec.replace == Replace::StartFirst && previous.is_some_and(|h| h.pid.is_some());
        if let Some(image) = image_of(spec) {
            // Stopped first, an instance takes its predecessor's place.
            let at = previous
                .filter(|_| !beside)
                .and_then(|h| h.netns.as_deref())
                .and_then(crate::net::instance_ip);
            return match at {
                Some(ip) => outputs_at(ip, image.port)
                    .into_iter()
                    .map(|(k, v)| (k, Some(v)))
                    .collect(),
                None => vec![
                    ("port".into(), Some(image.port.to_string())),
                    ("url".into(), None),
                    ("host".into(), None),
                ],
            };
        }
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
            let image = image_of(spec);
            let beside = spec.replace == Replace::StartFirst && running.is_some();
            if !beside {
                if let Some(previous) = previous {
                    stop_instance(&spec.deployment, &spec.component, previous, STOP_GRACE).await;
                }
            }
            let pidfile = layout.pid_file(&spec.deployment, &spec.component);
            // The port the host reaches it at, and what others inside reach.
            let (mut started, port, net) = match image {
                Some(image) => {
                    let reuse = previous
                        .filter(|_| !beside)
                        .and_then(|h| h.netns.as_deref());
                    let s = crate::image::spawn(layout, spec, image, reuse).await?;
                    let port = s.net.site_port;
                    (s.started, port, Some(s.net))
                }
                None => {
                    let port = match previous.and_then(|h| h.port) {
                        Some(p) if !beside && port_is_free(p) => p,
                        _ => free_port().map_err(DriverError::io("finding a free port"))?,
                    };
                    let mut env = vec![("PORT", port.to_string())];
                    if !spec.env.iter().any(|(k, _)| k == "HOST") {
                        env.push(("HOST", "127.0.0.1".to_string()));
                    }
                    (proc::spawn(layout, spec, &env)?, port, None)
                }
            };
            let reap = || async {
                if let Some(net) = &net {
                    crate::image::reap(
                        &spec.deployment,
                        &spec.component,
                        &spec.instance,
                        Some(&net.netns),
                    )
                    .await;
                }
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
                    reap().await;
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
                            reap().await;
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
                image: image.map(|i| i.reference.clone()),
                netns: net.as_ref().map(|n| n.netns.clone()),
                pending: None,
                restarts: 0,
                idle: false,
            };
            let outputs = match (image, &net) {
                (Some(image), Some(net)) => outputs_at(net.ip, image.port),
                _ => outputs(port),
            };
            Ok(Applied {
                handle,
                outputs: outputs.into_iter().collect(),
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
    if let (Some(_), Some(instance)) = (&handle.container, &handle.instance) {
        if crate::image::init_ignores_sigterm(deployment, component, instance) {
            crate::image::reap(deployment, component, instance, None).await;
        }
    }
    if let (Some(pid), Some(instance)) = (handle.pid, &handle.instance) {
        proc::stop(pid, instance, grace).await;
    }
    if let (Some(_), Some(instance)) = (&handle.container, &handle.instance) {
        crate::image::reap(deployment, component, instance, handle.netns.as_deref()).await;
    }
}

/// How long a replaced instance may take to finish its in-flight requests.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// The gateway rewrites its state at least this often while it runs.
const GATEWAY_FRESH_MS: u64 = 3_000;

/// What a gateway says, at least every second while it runs, about the
/// upstreams it uses: this host's gateway in its data directory's
/// `gateway/state.json`, and every gateway of a platform whose instances
/// share a database in its shared entries ([`GATEWAY_LOAD_KIND`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GatewayLoad {
    pub updated_ms: u64,
    /// "IP:PORT" → requests in flight (those it routes to, and those it
    /// stopped routing to with requests still in flight).
    pub upstreams: std::collections::BTreeMap<String, u64>,
}

/// The kind of the state store's shared entries that hold each gateway's
/// [`GatewayLoad`], by gateway.
pub const GATEWAY_LOAD_KIND: &str = "gateway-load";

impl GatewayLoad {
    /// Whether this gateway, if it still runs, routes to `addr` or has
    /// requests in flight there, or has not yet said anything since the
    /// state written at `since_ms` (so may still route there).
    pub fn still_uses(&self, addr: std::net::SocketAddr, since_ms: u64, now_ms: u64) -> bool {
        if now_ms.saturating_sub(self.updated_ms) > GATEWAY_FRESH_MS {
            // It does not run: nothing routes there.
            return false;
        }
        self.updated_ms <= since_ms || self.upstreams.contains_key(&addr.to_string())
    }
}

/// Gateways beyond this host's own file: every gateway of the platform,
/// where its instances share a database (other instances', gateways on
/// their own).
pub trait OtherGateways: Send + Sync {
    /// Whether any of them still uses `addr` (see [`GatewayLoad::still_uses`]).
    fn still_use(&self, addr: std::net::SocketAddr, since_ms: u64) -> bool;
}

/// Stops a replaced instance once no request can reach it: no gateway that
/// runs (this host's, and `others`) routes to its address or has a request
/// in flight there. `since_ms` is when the new instance was recorded.
pub async fn retire(
    layout: &Layout,
    deployment: &str,
    component: &str,
    old: &Handle,
    since_ms: u64,
    others: Option<&dyn OtherGateways>,
) {
    if old.pid.is_none() || old.instance.is_none() {
        return;
    }
    if let Some(port) = old.port {
        let deadline = Instant::now() + DRAIN_LIMIT;
        let addr =
            std::net::SocketAddr::from((old.addr.unwrap_or(std::net::Ipv4Addr::LOCALHOST), port));
        while Instant::now() < deadline
            && (gateway_still_uses(layout, addr, since_ms)
                || others.is_some_and(|o| o.still_use(addr, since_ms)))
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stop_instance(deployment, component, old, STOP_GRACE).await;
}

/// True while this host's gateway runs and routes to `addr` or has
/// requests in flight there, or has not yet seen the state written at
/// `since_ms`.
pub fn gateway_still_uses(layout: &Layout, addr: std::net::SocketAddr, since_ms: u64) -> bool {
    std::fs::read(layout.gateway_state())
        .ok()
        .and_then(|b| serde_json::from_slice::<GatewayLoad>(&b).ok())
        .is_some_and(|load| load.still_uses(addr, since_ms, commons_clock::now_ms() as u64))
}
