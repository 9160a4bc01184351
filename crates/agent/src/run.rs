//! The agent's life once joined: heartbeats, certificate renewals, and the
//! long poll for assignments, each operation run and reported in order.
//! Every connection is the agent's own, dialled out; when the control plane
//! is away, the agent retries with backoff and the sites it runs go on.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::RwLock;

use crate::client::ControlPlane;
use crate::join::Identity;
use crate::ops::Executor;
use crate::protocol::Heartbeat;
use crate::AgentError;

/// What `commons agent run` was given.
pub struct AgentSettings {
    /// The agent's data directory (its sites' too).
    pub home: PathBuf,
    /// How long a long poll waits for an assignment.
    pub poll: Duration,
    /// How often the sites' CPU and memory are sampled and sent as usage.
    pub sample: Duration,
}

/// Runs the agent until the process is stopped.
pub async fn run(
    settings: AgentSettings,
    engine: commons_engine::Engine,
) -> Result<(), AgentError> {
    let home = settings.home.clone();
    let identity = Identity::load(&home)?;
    let now = commons_clock::now_secs() as i64;
    if identity.expired(now) {
        return Err(identity.expired_error(now));
    }
    let client = Arc::new(RwLock::new(Arc::new(identity.client(&home)?)));
    let identity = Arc::new(RwLock::new(identity));
    // A move this agent was shipping when it stopped will not go on: what
    // followed its databases goes.
    match tokio::task::block_in_place(|| engine.forget_moves()) {
        Ok(0) => {}
        Ok(n) => eprintln!(
            "{:>12} {n} replication slots of moves that stopped",
            "Dropped"
        ),
        Err(e) => eprintln!("{:>12} replication slots of stopped moves: {e}", "Warning"),
    }
    let executor =
        Arc::new(Executor::new(&home, engine).map_err(|e| AgentError::Failed(e.to_string()))?);
    eprintln!(
        "{:>12} node {} of {}",
        "Agent",
        identity.read().await.node,
        identity.read().await.control_plane
    );
    // Told when the certificate was renewed, so the tunnel is dialled
    // again before the old certificate's tunnel is closed.
    let (renewed, renewals) = tokio::sync::watch::channel(());
    let tunnel = {
        let id = identity.read().await;
        let pem_path = crate::join::dir(&home).join("node.pem");
        tokio::spawn(crate::tunnel::keep_open(
            id.control_plane.clone(),
            id.pin.clone(),
            id.node.clone(),
            move || {
                std::fs::read_to_string(&pem_path)
                    .map_err(|e| AgentError::Failed(format!("{}: {e}", pem_path.display())))
            },
            executor.clone(),
            renewals,
        ))
    };
    let sampling = tokio::spawn(send_usage(
        identity.clone(),
        client.clone(),
        executor.clone(),
        settings.sample,
    ));
    let beats = tokio::spawn(heartbeats(
        identity.clone(),
        client.clone(),
        executor.clone(),
        home.clone(),
        renewed,
    ));
    let result = assignments(identity, client, executor, settings).await;
    beats.abort();
    tunnel.abort();
    sampling.abort();
    result
}

/// Sends a heartbeat every `heartbeat_secs`, and renews the certificate
/// when two thirds of its life have passed.
async fn heartbeats(
    identity: Arc<RwLock<Identity>>,
    client: Arc<RwLock<Arc<ControlPlane>>>,
    executor: Arc<Executor>,
    home: PathBuf,
    renewed: tokio::sync::watch::Sender<()>,
) {
    loop {
        let (node, every, due) = {
            let id = identity.read().await;
            (
                id.node.clone(),
                id.heartbeat_secs.max(1),
                id.due_for_renewal(commons_clock::now_secs() as i64),
            )
        };
        let current = client.read().await.clone();
        if due {
            let mut id = identity.write().await;
            match id
                .renew(&home, &current)
                .await
                .and_then(|_| id.client(&home))
            {
                Ok(renewed_client) => {
                    eprintln!(
                        "{:>12} the node's certificate, until {}",
                        "Renewed", id.not_after
                    );
                    *client.write().await = Arc::new(renewed_client);
                    renewed.send_replace(());
                }
                Err(e) => eprintln!("{:>12} cannot renew the node's certificate: {e}", "Warning"),
            }
        }
        let hb = Heartbeat {
            sites: executor.sites(),
        };
        if let Err(e) = client.read().await.heartbeat(&node, &hb).await {
            eprintln!("{:>12} heartbeat: {e}", "Warning");
        }
        tokio::time::sleep(Duration::from_secs(every)).await;
    }
}

/// The most usage events a node holds for a control plane that does not
/// take them (about a day of samples for a hundred sites).
const MAX_UNSENT: usize = 200_000;

/// Samples the sites' CPU and memory every `every` and sends them as
/// usage in the node's name.
async fn send_usage(
    identity: Arc<RwLock<Identity>>,
    client: Arc<RwLock<Arc<ControlPlane>>>,
    executor: Arc<Executor>,
    every: Duration,
) {
    let sampler = Arc::new(std::sync::Mutex::new(crate::usage::Sampler::default()));
    // Usage not yet taken by the control plane: sent again with the next
    // sample (events carry ids, so one that did arrive is not counted
    // twice). Money follows usage: it is dropped only when refused as
    // invalid, or past a bound no outage should reach.
    let mut unsent: Vec<serde_json::Value> = Vec::new();
    loop {
        tokio::time::sleep(every).await;
        let node = identity.read().await.node.clone();
        let (ex, sampler) = (executor.clone(), sampler.clone());
        // /proc and the state store are read off the event loop.
        let Ok(events) = tokio::task::spawn_blocking(move || {
            let mut s = sampler.lock().unwrap_or_else(|p| p.into_inner());
            s.sample(&ex, &node, every)
        })
        .await
        else {
            continue;
        };
        unsent.extend(events);
        if unsent.is_empty() {
            continue;
        }
        if unsent.len() > MAX_UNSENT {
            let dropped = unsent.len() - MAX_UNSENT;
            eprintln!(
                "{:>12} usage: {dropped} events the control plane did not take for too long",
                "Dropped"
            );
            unsent.drain(..dropped);
        }
        let node = identity.read().await.node.clone();
        let batch = crate::protocol::UsageBatch {
            events: std::mem::take(&mut unsent),
        };
        match client.read().await.usage(&node, &batch).await {
            Ok(()) => {}
            Err(AgentError::Refused(why)) if why.starts_with('4') => {
                eprintln!("{:>12} usage refused: {why}", "Warning");
            }
            Err(e) => {
                eprintln!("{:>12} usage: {e}; it is sent again", "Warning");
                unsent = batch.events;
            }
        }
    }
}

/// Polls for assignments and runs them in revision order, resuming after
/// the last revision it finished.
async fn assignments(
    identity: Arc<RwLock<Identity>>,
    client: Arc<RwLock<Arc<ControlPlane>>>,
    executor: Arc<Executor>,
    settings: AgentSettings,
) -> Result<(), AgentError> {
    let mut backoff = Duration::from_millis(250);
    loop {
        let (node, after) = {
            let id = identity.read().await;
            (id.node.clone(), id.revision)
        };
        let current = client.read().await.clone();
        let batch = match current.assignments(&node, after, settings.poll).await {
            Ok(b) => {
                backoff = Duration::from_millis(250);
                b
            }
            Err(AgentError::Refused(detail)) if detail.starts_with("403") => {
                // A renewal may have replaced the certificate this call
                // presented while it was on its way, and the control plane
                // forgets an expired one once it signs the next: ask again
                // with the current one. Refused with the current one, the
                // node is revoked or another's: no retry makes it right.
                if !Arc::ptr_eq(&current, &*client.read().await) {
                    continue;
                }
                return Err(AgentError::Refused(detail));
            }
            Err(e) => {
                // Unreachable until its certificate expired, the node can
                // only come back with a new join token: it says so and
                // stops, rather than retrying what cannot work.
                let now = commons_clock::now_secs() as i64;
                let id = identity.read().await;
                if id.expired(now) {
                    return Err(id.expired_error(now));
                }
                drop(id);
                eprintln!("{:>12} assignments: {e}", "Warning");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        for assigned in &batch.operations {
            let link = crate::ops::Link {
                client: &current,
                node: &node,
            };
            let report = executor.run(assigned, Some(&link)).await;
            eprintln!(
                "{:>12} {} ({}): {}",
                report.outcome, assigned.id, assigned.operation["op"], report.detail
            );
            // The report is kept by id: if it is not delivered now, the
            // operation comes again and the kept report is sent then.
            if let Err(e) = current.report(&node, &assigned.id, &report).await {
                eprintln!("{:>12} report of {}: {e}", "Warning", assigned.id);
            }
            let mut id = identity.write().await;
            id.revision = id.revision.max(assigned.revision);
            id.save(&settings.home)?;
        }
        let mut id = identity.write().await;
        if batch.revision > id.revision {
            id.revision = batch.revision;
            id.save(&settings.home)?;
        }
    }
}
