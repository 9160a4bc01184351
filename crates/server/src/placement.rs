//! Where a site runs: placement over providers' nodes (milestone 5).
//!
//! [`decide`] is a pure function of the nodes as they are and what a site
//! asks for, so a decision can be replayed in a test and explained to an
//! operator (`plan` shows every node's verdict): it filters the nodes a site
//! may not or cannot use, scores the rest, and picks the best. [`Cluster`]
//! commits a decision atomically — the capacity it takes is taken under the
//! same lock the decision was made under — so two placements never
//! overcommit a node, however many are asked for at once.
//!
//! The cost is linear in nodes per decision: one pass to filter and score,
//! no sort (the best is kept as the pass goes; the table of verdicts is
//! what `plan` shows).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde::Serialize;

/// CPU, memory and disk: what a node offers and what a site takes (the
/// agents' protocol states them so).
pub use commons_agent::protocol::Resources;

fn fits_in(needs: &Resources, free: &Resources) -> Option<&'static str> {
    if needs.cpu_millis > free.cpu_millis {
        Some("cpu")
    } else if needs.memory_bytes > free.memory_bytes {
        Some("memory")
    } else if needs.disk_bytes > free.disk_bytes {
        Some("disk")
    } else {
        None
    }
}

fn minus(a: &Resources, b: &Resources) -> Resources {
    Resources {
        cpu_millis: a.cpu_millis.saturating_sub(b.cpu_millis),
        memory_bytes: a.memory_bytes.saturating_sub(b.memory_bytes),
        disk_bytes: a.disk_bytes.saturating_sub(b.disk_bytes),
    }
}

fn plus(a: &Resources, b: &Resources) -> Resources {
    Resources {
        cpu_millis: a.cpu_millis + b.cpu_millis,
        memory_bytes: a.memory_bytes + b.memory_bytes,
        disk_bytes: a.disk_bytes + b.disk_bytes,
    }
}

/// One provider's machine, as the control plane last heard of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub id: String,
    pub provider: String,
    pub region: String,
    /// Heartbeats arrive: not lost.
    pub alive: bool,
    pub capacity: Resources,
    /// What sites placed there take.
    pub allocated: Resources,
    /// The provider's price, in CommonCents per month for the resources a
    /// small site takes (one CPU, 1 GiB of memory, 10 GiB of disk).
    pub price: u64,
    /// What the node offers: `sandbox`, `postgres`, `volumes`, `images`…
    pub features: BTreeSet<String>,
}

impl Node {
    pub fn free(&self) -> Resources {
        minus(&self.capacity, &self.allocated)
    }
}

/// What a site asks of its node, and what its operator prefers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Request {
    pub site: String,
    pub needs: Resources,
    pub features: BTreeSet<String>,
    /// Only these providers (none: any).
    pub providers: Option<BTreeSet<String>>,
    /// Only these regions or jurisdictions (none: any).
    pub regions: Option<BTreeSet<String>>,
    /// Providers the operator would rather use, first best.
    pub preferred: Vec<String>,
    /// Nodes that must not host it (another replica of it runs there).
    pub avoid: BTreeSet<String>,
    /// The node that holds its data now (a move costs a copy).
    pub data_on: Option<String>,
    /// How many of the operator's sites each provider hosts already: the
    /// fewer, the better (spread across providers).
    pub operator_sites: BTreeMap<String, u32>,
}

/// Why a node was passed over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "reason")]
pub enum Refusal {
    Lost,
    ProviderNotAllowed,
    RegionNotAllowed,
    MissingFeature { feature: String },
    NoRoom { resource: String },
    HostsAReplica,
}

/// A node's verdict: refused, or its score and what made it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    Refused {
        node: String,
        #[serde(flatten)]
        why: Refusal,
    },
    Scored {
        node: String,
        score: Score,
    },
}

/// A node's score: the sum of its parts, each in 0..=100 points, so an
/// operator reads why one node beat another.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Score {
    /// Cheaper than the dearest candidate.
    pub price: f64,
    /// Room left after the site is placed (balanced use of the machine).
    pub fit: f64,
    /// The operator's preference for the provider.
    pub preference: f64,
    /// The site's data is there already.
    pub locality: f64,
    /// The provider hosts few of the operator's sites.
    pub spread: f64,
}

impl Score {
    pub fn total(&self) -> f64 {
        self.price + self.fit + self.preference + self.locality + self.spread
    }
}

/// Where a site would go and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub site: String,
    /// The chosen node; none when every node was refused.
    pub node: Option<String>,
    pub verdicts: Vec<Verdict>,
}

fn refusal(node: &Node, request: &Request) -> Option<Refusal> {
    if !node.alive {
        return Some(Refusal::Lost);
    }
    if request
        .providers
        .as_ref()
        .is_some_and(|p| !p.contains(&node.provider))
    {
        return Some(Refusal::ProviderNotAllowed);
    }
    if request
        .regions
        .as_ref()
        .is_some_and(|r| !r.contains(&node.region))
    {
        return Some(Refusal::RegionNotAllowed);
    }
    if let Some(feature) = request.features.difference(&node.features).next() {
        return Some(Refusal::MissingFeature {
            feature: feature.clone(),
        });
    }
    if request.avoid.contains(&node.id) {
        return Some(Refusal::HostsAReplica);
    }
    fits_in(&request.needs, &node.free()).map(|resource| Refusal::NoRoom {
        resource: resource.into(),
    })
}

/// Decides where `request` goes among `nodes`: a pure function of both.
/// Ties go to the node listed first.
pub fn decide(nodes: &[Node], request: &Request) -> Decision {
    let dearest = nodes.iter().map(|n| n.price).max().unwrap_or(0).max(1) as f64;
    let most_sites = request.operator_sites.values().copied().max().unwrap_or(0) as f64;
    let mut verdicts = Vec::with_capacity(nodes.len());
    let mut best: Option<(f64, usize)> = None;
    for (i, node) in nodes.iter().enumerate() {
        if let Some(why) = refusal(node, request) {
            verdicts.push(Verdict::Refused {
                node: node.id.clone(),
                why,
            });
            continue;
        }
        let after = plus(&node.allocated, &request.needs);
        let share = |used: u64, of: u64| {
            if of == 0 {
                1.0
            } else {
                used as f64 / of as f64
            }
        };
        let fullest = share(after.cpu_millis, node.capacity.cpu_millis)
            .max(share(after.memory_bytes, node.capacity.memory_bytes))
            .max(share(after.disk_bytes, node.capacity.disk_bytes));
        let preference = match request.preferred.iter().position(|p| *p == node.provider) {
            Some(rank) => 100.0 / (rank as f64 + 1.0),
            None => 0.0,
        };
        let hosted = request
            .operator_sites
            .get(&node.provider)
            .copied()
            .unwrap_or(0) as f64;
        let score = Score {
            price: 100.0 * (1.0 - node.price as f64 / dearest),
            fit: 100.0 * (1.0 - fullest),
            preference,
            locality: if request.data_on.as_deref() == Some(node.id.as_str()) {
                100.0
            } else {
                0.0
            },
            spread: if most_sites == 0.0 {
                100.0
            } else {
                100.0 * (1.0 - hosted / most_sites)
            },
        };
        let total = score.total();
        if best.is_none_or(|(b, _)| total > b) {
            best = Some((total, i));
        }
        verdicts.push(Verdict::Scored {
            node: node.id.clone(),
            score,
        });
    }
    Decision {
        site: request.site.clone(),
        node: best.map(|(_, i)| nodes[i].id.clone()),
        verdicts,
    }
}

/// The nodes, with placements committed atomically.
pub struct Cluster {
    nodes: Mutex<Vec<Node>>,
}

impl Cluster {
    pub fn new(nodes: Vec<Node>) -> Cluster {
        Cluster {
            nodes: Mutex::new(nodes),
        }
    }

    /// Decides and takes the chosen node's capacity in one step: a
    /// concurrent placement sees the capacity taken.
    pub fn place(&self, request: &Request) -> Decision {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let decision = decide(&nodes, request);
        if let Some(chosen) = &decision.node {
            let node = nodes
                .iter_mut()
                .find(|n| n.id == *chosen)
                .expect("decided among these nodes");
            node.allocated = plus(&node.allocated, &request.needs);
        }
        decision
    }

    /// Gives back what a site took on `node` (it moved or was removed).
    pub fn release(&self, node: &str, needs: &Resources) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = nodes.iter_mut().find(|n| n.id == node) {
            n.allocated = minus(&n.allocated, needs);
        }
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(id: &str, provider: &str, region: &str, price: u64) -> Node {
        Node {
            id: id.into(),
            provider: provider.into(),
            region: region.into(),
            alive: true,
            capacity: Resources {
                cpu_millis: 4000,
                memory_bytes: 8 * GIB,
                disk_bytes: 100 * GIB,
            },
            allocated: Resources::default(),
            price,
            features: ["sandbox", "volumes"].map(String::from).into(),
        }
    }

    fn small(site: &str) -> Request {
        Request {
            site: site.into(),
            needs: Resources {
                cpu_millis: 500,
                memory_bytes: GIB,
                disk_bytes: 10 * GIB,
            },
            ..Request::default()
        }
    }

    fn refused(d: &Decision, id: &str) -> Option<Refusal> {
        d.verdicts.iter().find_map(|v| match v {
            Verdict::Refused { node, why } if node == id => Some(why.clone()),
            _ => None,
        })
    }

    #[test]
    fn every_filter_is_honoured_and_says_why() {
        let mut lost = node("lost", "acme", "eu", 10);
        lost.alive = false;
        let mut full = node("full", "acme", "eu", 10);
        full.allocated.memory_bytes = 8 * GIB;
        let mut bare = node("bare", "acme", "eu", 10);
        bare.features.clear();
        let nodes = vec![
            lost,
            full,
            bare,
            node("other", "globex", "eu", 1),
            node("far", "acme", "us", 1),
            node("replica", "acme", "eu", 1),
            node("ok", "acme", "eu", 50),
        ];
        let request = Request {
            providers: Some(["acme".to_string()].into()),
            regions: Some(["eu".to_string()].into()),
            features: ["sandbox".to_string()].into(),
            avoid: ["replica".to_string()].into(),
            ..small("wiki")
        };
        let d = decide(&nodes, &request);
        assert_eq!(d.node.as_deref(), Some("ok"), "{d:#?}");
        assert_eq!(refused(&d, "lost"), Some(Refusal::Lost));
        assert_eq!(
            refused(&d, "full"),
            Some(Refusal::NoRoom {
                resource: "memory".into()
            })
        );
        assert_eq!(
            refused(&d, "bare"),
            Some(Refusal::MissingFeature {
                feature: "sandbox".into()
            })
        );
        assert_eq!(refused(&d, "other"), Some(Refusal::ProviderNotAllowed));
        assert_eq!(refused(&d, "far"), Some(Refusal::RegionNotAllowed));
        assert_eq!(refused(&d, "replica"), Some(Refusal::HostsAReplica));
        // Nothing fits: no node, and every verdict says why.
        let d = decide(&nodes[..6], &request);
        assert_eq!(d.node, None);
        assert!(d
            .verdicts
            .iter()
            .all(|v| matches!(v, Verdict::Refused { .. })));
    }

    #[test]
    fn scores_weigh_price_preference_locality_and_spread() {
        let nodes = vec![
            node("dear", "acme", "eu", 100),
            node("cheap", "globex", "eu", 20),
        ];
        assert_eq!(decide(&nodes, &small("a")).node.as_deref(), Some("cheap"));
        let prefer = Request {
            preferred: vec!["acme".into()],
            ..small("a")
        };
        assert_eq!(decide(&nodes, &prefer).node.as_deref(), Some("dear"));
        let data_there = Request {
            data_on: Some("dear".into()),
            ..small("a")
        };
        assert_eq!(decide(&nodes, &data_there).node.as_deref(), Some("dear"));
        // Same price: the provider with fewer of the operator's sites wins.
        let even = vec![node("a1", "acme", "eu", 10), node("g1", "globex", "eu", 10)];
        let spread = Request {
            operator_sites: [("acme".to_string(), 3), ("globex".to_string(), 1)].into(),
            ..small("a")
        };
        assert_eq!(decide(&even, &spread).node.as_deref(), Some("g1"));
        // A decision is a pure function: the same inputs, the same answer.
        assert_eq!(decide(&even, &spread), decide(&even, &spread));
    }

    #[test]
    fn concurrent_placements_never_overcommit_a_node() {
        // Room for 8 small sites per node (4000 m CPU / 500 m), 3 nodes.
        let cluster = std::sync::Arc::new(Cluster::new(vec![
            node("n1", "acme", "eu", 10),
            node("n2", "globex", "eu", 10),
            node("n3", "initech", "eu", 10),
        ]));
        let placed: Vec<usize> = std::thread::scope(|s| {
            (0..8)
                .map(|t| {
                    let cluster = cluster.clone();
                    s.spawn(move || {
                        (0..10)
                            .filter(|i| cluster.place(&small(&format!("s{t}-{i}"))).node.is_some())
                            .count()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(
            placed.iter().sum::<usize>(),
            24,
            "exactly the room there was"
        );
        for n in cluster.nodes() {
            assert!(n.allocated.cpu_millis <= n.capacity.cpu_millis, "{n:?}");
            assert!(n.allocated.memory_bytes <= n.capacity.memory_bytes, "{n:?}");
        }
        cluster.release("n1", &small("x").needs);
        assert!(cluster.place(&small("after")).node.as_deref() == Some("n1"));
    }
}
