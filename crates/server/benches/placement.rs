//! Placement at scale (run by `bench/providers.sh`): decisions among 1,000
//! nodes of 50 providers in 10 regions, each site with filters and
//! preferences, committed one after another through the cluster's lock.
//! Prints p50/p99 of a decision and placements per second.

use std::collections::BTreeSet;
use std::time::Instant;

use commons_server::placement::{Cluster, Node, Request, Resources};

const GIB: u64 = 1 << 30;

fn main() {
    let nodes: Vec<Node> = (0..1000)
        .map(|i| Node {
            id: format!("node-{i}"),
            provider: format!("provider-{}", i % 50),
            region: format!("region-{}", i % 10),
            alive: i % 97 != 0,
            capacity: Resources {
                cpu_millis: 16_000,
                memory_bytes: 64 * GIB,
                disk_bytes: 1000 * GIB,
            },
            allocated: Resources::default(),
            price: 50 + (i as u64 * 7919) % 100,
            features: ["sandbox", "volumes", "postgres"]
                .into_iter()
                .map(String::from)
                .collect(),
        })
        .collect();
    let cluster = Cluster::new(nodes);
    let n = 5_000;
    let mut times = Vec::with_capacity(n);
    let started = Instant::now();
    let mut placed = 0;
    for i in 0..n {
        let request = Request {
            site: format!("site-{i}"),
            needs: Resources {
                cpu_millis: 250,
                memory_bytes: GIB / 2,
                disk_bytes: 5 * GIB,
            },
            features: BTreeSet::from(["sandbox".to_string()]),
            regions: (i % 3 == 0).then(|| BTreeSet::from([format!("region-{}", i % 10)])),
            preferred: vec![format!("provider-{}", i % 50)],
            operator_sites: (0..50)
                .map(|p| (format!("provider-{p}"), ((i + p) % 7) as u32))
                .collect(),
            ..Request::default()
        };
        let t = Instant::now();
        let d = cluster.place(&request);
        times.push(t.elapsed());
        placed += d.node.is_some() as usize;
    }
    let elapsed = started.elapsed();
    times.sort();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    println!(
        "placement among 1,000 nodes ({n} sites, {placed} placed): decision p50 {:.2} ms, p99 {:.2} ms (target p99 <= 50 ms); {:.0} placements/s committed one at a time (target >= 200; Nomad's C2M ~1,500/s)",
        ms(times[n / 2]),
        ms(times[n * 99 / 100]),
        n as f64 / elapsed.as_secs_f64()
    );
    through_the_registry();
}

/// The same scale through what the API calls: 1,000 nodes joined with
/// their tokens and certificates, then sites placed by `Nodes::place`,
/// each committed to the nodes' registry on disk before it answers.
fn through_the_registry() {
    use commons_agent::protocol::{JoinRequest, NodeOffer};
    use commons_server::nodes::{NodeSettings, Nodes, PlaceRequest};
    let home = std::env::temp_dir().join(format!("commons-bench-nodes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    let nodes = Nodes::open(
        &home,
        NodeSettings::default(),
        &commons_store::StoreConfig::Embedded,
    )
    .expect("nodes");
    let key = rcgen::KeyPair::generate().expect("a key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .expect("a request");
    for i in 0..1000 {
        let org = format!("provider-{}", i % 50);
        let (token, _, _) = nodes
            .make_join_token(&org, "bench", std::time::Duration::from_secs(600))
            .expect("a token");
        nodes
            .join(&JoinRequest {
                token,
                csr: csr.clone(),
                offer: NodeOffer {
                    region: format!("region-{}", i % 10),
                    capacity: commons_agent::protocol::Resources {
                        cpu_millis: 16_000,
                        memory_bytes: 64 * GIB,
                        disk_bytes: 1000 * GIB,
                    },
                    price: 50 + (i as u64 * 7919) % 100,
                    features: ["sandbox".to_string()].into_iter().collect(),
                },
                node: None,
            })
            .expect("joined");
    }
    // A blueprint of a common size (~1 KiB).
    let blueprint = format!(
        "name: site\ncomponents:\n  web:\n    process: \"python3 -m http.server --bind 127.0.0.1 $PORT\"\n    health: {{ http: \"/\" }}\n# {}\n",
        "x".repeat(900)
    );
    let (n, window) = (5_000, 500);
    let mut started = Instant::now();
    for i in 0..n {
        if i == n - window {
            started = Instant::now();
        }
        nodes
            .place(PlaceRequest {
                site: format!("site-{i}"),
                blueprint: blueprint.clone(),
                needs: commons_agent::protocol::Resources {
                    cpu_millis: 250,
                    memory_bytes: GIB / 2,
                    disk_bytes: 5 * GIB,
                },
                features: Default::default(),
                providers: None,
                regions: None,
                preferred: vec![format!("provider-{}", i % 50)],
                dry_run: false,
            })
            .expect("placed");
    }
    println!(
        "placement through the nodes' registry (1,000 joined nodes, {} sites placed before): {:.0} placements/s, each on disk before it answers (target >= 200)",
        n - window,
        window as f64 / started.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&home);
}
