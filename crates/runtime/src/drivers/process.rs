use std::time::{Duration, Instant};

use crate::health::{free_port, http_status, port_is_free};
use crate::proc;
use crate::{Applied, BoxFuture, Driver, DriverError, Handle, Layout, Observed, Spec};

/// How long a stopping process gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a process without a health check must stay up to count as started.
const SETTLE: Duration = Duration::from_millis(150);
/// Default limit for becoming healthy.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A long-running process given `PORT`, kept running after the CLI exits.
pub struct ProcessDriver;

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
        _: &Spec,
        previous: Option<&Handle>,
    ) -> Vec<(String, Option<String>)> {
        match previous.and_then(|h| h.port) {
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
            // Milestone 1 replaces stop-first; the gateway will switch only
            // once the new version is healthy.
            if let Some(Handle {
                pid: Some(pid),
                instance: Some(instance),
                ..
            }) = previous
            {
                proc::stop(*pid, instance, STOP_GRACE).await;
            }
            let port = match previous.and_then(|h| h.port) {
                Some(p) if port_is_free(p) => p,
                _ => free_port().map_err(DriverError::io("finding a free port"))?,
            };
            let pidfile = layout.pid_file(&spec.deployment, &spec.component);
            let mut env = vec![("PORT", port.to_string())];
            if !spec.env.iter().any(|(k, _)| k == "HOST") {
                env.push(("HOST", "127.0.0.1".to_string()));
            }
            let mut started = proc::spawn(layout, spec, &env)?;
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
                        match http_status(port, &h.http, remaining.min(Duration::from_secs(5)))
                            .await
                        {
                            Ok(code) if (200..400).contains(&code) => break,
                            Ok(code) => last_problem = format!("GET {} answered {code}", h.http),
                            Err(e) => last_problem = format!("GET {}: {e}", h.http),
                        }
                        if Instant::now() >= deadline {
                            proc::stop(pid, &spec.instance, Duration::from_secs(2)).await;
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
                pending: None,
                restarts: 0,
                idle: false,
            };
            Ok(Applied {
                handle,
                outputs: outputs(port).into_iter().collect(),
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
            if let (Some(pid), Some(instance)) = (handle.pid, &handle.instance) {
                proc::stop(pid, instance, STOP_GRACE).await;
            }
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
