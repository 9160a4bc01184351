use crate::proc;
use crate::{Applied, BoxFuture, Driver, DriverError, Handle, Layout, Observed, Spec};

/// Runs a command to completion; success is exit status 0.
pub struct JobDriver;

impl Driver for JobDriver {
    fn planned_outputs(
        &self,
        _: &Layout,
        _: &Spec,
        _: Option<&Handle>,
    ) -> Vec<(String, Option<String>)> {
        Vec::new()
    }

    fn apply<'a>(
        &'a self,
        layout: &'a Layout,
        spec: &'a Spec,
        _: Option<&'a Handle>,
    ) -> BoxFuture<'a, Result<Applied, DriverError>> {
        Box::pin(async move {
            let mut started = proc::spawn(layout, spec, &[])?;
            let pidfile = layout.pid_file(&spec.deployment, &spec.component);
            let pid = started.pid;
            let waited = match spec.timeout {
                Some(limit) => match tokio::time::timeout(limit, started.child.wait()).await {
                    Ok(r) => r,
                    Err(_) => {
                        proc::kill_group(pid, &spec.instance).await;
                        let _ = started.child.wait().await;
                        return Err(DriverError::Timeout(limit));
                    }
                },
                None => started.child.wait().await,
            };
            let status = waited.map_err(DriverError::io("waiting for the job"))?;
            // A job's background children must not outlive it unnoticed.
            proc::kill_group(pid, &spec.instance).await;
            let _ = std::fs::remove_file(&pidfile);
            if status.success() {
                return Ok(Applied::default());
            }
            let tail = proc::log_tail(&started.log, started.log_offset, 2048);
            let how = match (status.code(), spec.resources.memory_bytes) {
                // 128 + SIGKILL under a memory limit: the kernel's OOM killer.
                (Some(137), Some(limit)) if crate::sandbox::enabled() => {
                    format!(
                        "was killed (status 137): out of memory, over its limit of {} MiB",
                        limit >> 20
                    )
                }
                (Some(code), _) => format!("exited with status {code}"),
                (None, _) => "was killed by a signal".to_string(),
            };
            Err(DriverError::Failed(if tail.is_empty() {
                format!("job {how}")
            } else {
                format!("job {how}; its output ends with:\n{tail}")
            }))
        })
    }

    fn remove<'a>(
        &'a self,
        _: &'a Layout,
        _: &'a str,
        _: &'a str,
        _: &'a Handle,
    ) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async { Ok(()) })
    }

    fn observe(&self, _: &Handle) -> Observed {
        Observed::Present
    }
}
