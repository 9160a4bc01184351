//! Many nodes that run nothing (`commons agent simulate`): each joins with
//! a join token of its own and then speaks the protocol as an agent does —
//! heartbeats naming the sites it holds, the long poll for assignments,
//! a report for each — but applies a site by noting it, not by running it.
//! It stands for a fleet in benchmarks and drills of the control planes
//! (placement, assignment, failover among instances), where a thousand real
//! machines are not at hand. Its nodes never renew their certificates:
//! a simulation lasts less than one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::ControlPlane;
use crate::protocol::{
    split_join_token, Heartbeat, JoinRequest, NodeOffer, Operation, Report, SiteState,
};
use crate::tls::ClientCert;
use crate::AgentError;

/// What to simulate.
pub struct Simulation {
    /// The control planes' agent addresses; node `i` calls the
    /// `i % len`-th.
    pub control_planes: Vec<String>,
    /// One join token per node.
    pub tokens: Vec<String>,
    /// What every node offers.
    pub offer: NodeOffer,
    /// How long one poll for assignments waits.
    pub poll: Duration,
}

/// How many nodes join at once.
const JOINING_AT_ONCE: usize = 32;

/// A simulated node's sites, as its heartbeats report them.
type Sites = Arc<Mutex<BTreeMap<String, SiteState>>>;

/// Joins every node, then runs them until the process stops; `joined` is
/// told how many joined and how long it took, once they all did.
pub async fn simulate(
    sim: Simulation,
    joined: impl FnOnce(usize, Duration),
) -> Result<(), AgentError> {
    if sim.control_planes.is_empty() {
        return Err(AgentError::Input(
            "name at least one control plane (--control-plane https://HOST:PORT)".into(),
        ));
    }
    let started = Instant::now();
    let offer = Arc::new(sim.offer);
    let mut pending = sim.tokens.into_iter().enumerate();
    let mut joining = tokio::task::JoinSet::new();
    let mut nodes = Vec::new();
    loop {
        while joining.len() < JOINING_AT_ONCE {
            let Some((i, token)) = pending.next() else {
                break;
            };
            let url = sim.control_planes[i % sim.control_planes.len()].clone();
            joining.spawn(join_one(url, token, offer.clone()));
        }
        match joining.join_next().await {
            Some(done) => {
                nodes.push(done.map_err(|e| AgentError::Failed(e.to_string()))??);
            }
            None => break,
        }
    }
    joined(nodes.len(), started.elapsed());
    let mut running = tokio::task::JoinSet::new();
    for (client, node, heartbeat) in nodes {
        let (client, sites) = (Arc::new(client), Sites::default());
        running.spawn(beat(client.clone(), node.clone(), heartbeat, sites.clone()));
        running.spawn(work(client, node, sim.poll, sites));
    }
    while running.join_next().await.is_some() {}
    Ok(())
}

/// Joins one node: its client (presenting its certificate), its id, and
/// how often it beats.
async fn join_one(
    url: String,
    token: String,
    offer: Arc<NodeOffer>,
) -> Result<(ControlPlane, String, Duration), AgentError> {
    let Some((pin, _)) = split_join_token(&token) else {
        return Err(AgentError::Input(
            "a line of the tokens file is not a join token (they start with cmnj_)".into(),
        ));
    };
    let (key_pem, csr) = crate::join::new_key()?;
    let certified = ControlPlane::new(&url, pin, None)?
        .join(&JoinRequest {
            token: token.clone(),
            csr,
            offer: (*offer).clone(),
            node: None,
        })
        .await?;
    let client = ControlPlane::new(
        &url,
        pin,
        Some(ClientCert {
            certificate_pem: &certified.certificate,
            key_pem: &key_pem,
        }),
    )?;
    Ok((
        client,
        certified.node,
        Duration::from_secs(certified.heartbeat_secs.max(1) as u64),
    ))
}

async fn beat(client: Arc<ControlPlane>, node: String, every: Duration, sites: Sites) {
    // Spread over the interval, as machines started apart would be.
    let offset = node.bytes().map(u64::from).sum::<u64>() % every.as_millis().max(1) as u64;
    tokio::time::sleep(Duration::from_millis(offset)).await;
    loop {
        let hb = Heartbeat {
            sites: sites
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect(),
        };
        if let Err(e) = client.heartbeat(&node, &hb).await {
            eprintln!("{:>12} node {node}'s heartbeat: {e}", "Warning");
        }
        tokio::time::sleep(every).await;
    }
}

/// Takes each assignment, notes what it does to the node's sites, and
/// reports it done.
async fn work(client: Arc<ControlPlane>, node: String, poll: Duration, sites: Sites) {
    let mut after = 0;
    loop {
        let assignments = match client.assignments(&node, after, poll).await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("{:>12} node {node}'s assignments: {e}", "Warning");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        for assigned in assignments.operations {
            let report = match serde_json::from_value::<Operation>(assigned.operation) {
                Ok(op) => {
                    note(&sites, op);
                    Report {
                        outcome: "done".into(),
                        detail: "simulated".into(),
                    }
                }
                Err(e) => Report {
                    outcome: "refused".into(),
                    detail: e.to_string(),
                },
            };
            if let Err(e) = client.report(&node, &assigned.id, &report).await {
                eprintln!("{:>12} node {node}'s report: {e}", "Warning");
            }
            after = after.max(assigned.revision);
        }
        after = after.max(assignments.revision);
    }
}

fn note(sites: &Sites, op: Operation) {
    let mut sites = sites.lock().unwrap_or_else(|p| p.into_inner());
    let state = |site: &str, generation: u64, state: &str| SiteState {
        site: site.to_string(),
        generation,
        state: state.to_string(),
    };
    match op {
        Operation::ApplySite {
            site, generation, ..
        } => {
            sites.insert(site.clone(), state(&site, generation, "running"));
        }
        Operation::Stop { site } | Operation::Freeze { site } => {
            if let Some(s) = sites.get_mut(&site) {
                s.state = "stopped".into();
            }
        }
        Operation::Remove { site } => {
            sites.remove(&site);
        }
        _ => {}
    }
}
