//! The nodes' registry kept in PostgreSQL, for platform instances that
//! share one database: any of them may take a node's call, make a join
//! token, place a site or sweep lost nodes.
//!
//! Each entry of the registry (a node, a join token, a certificate, a
//! placement, a node's operations) is one of the store's shared entries
//! (`commons_store::entries`), `KIND/KEY`, holding the line the file
//! journal would write. A change reads in every other instance's first,
//! under the entries' lock, so it decides on the registry as it is; between
//! changes a follower reads what the others wrote every [`FOLLOW_EVERY`]
//! (waking an agent's long poll here when another instance assigned it
//! something), and the heartbeats each instance received, kept as notes,
//! so any of them may judge a node lost.

use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use commons_store::entries::{Entry, Follower, SharedEntries};

use super::journal::Line;
use super::{Inner, Wakes};

/// How often an instance reads the others' changes and heartbeats.
pub(super) const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// The entries' kind (their tables' prefix).
const KIND: &str = "nodes";

/// A row of the registry: its sequence number and the line it holds.
pub(super) struct Row {
    pub seq: i64,
    pub line: Line,
}

/// A heartbeat one instance received, for the others.
#[derive(serde::Serialize, serde::Deserialize)]
struct Beat {
    at_ms: i64,
    sites: Vec<commons_agent::protocol::SiteState>,
}

/// The registry's rows in one schema of a PostgreSQL database.
pub(super) struct SharedRegistry {
    entries: SharedEntries,
}

fn failed(e: impl std::fmt::Display) -> String {
    format!("the nodes' registry in PostgreSQL: {e}")
}

fn rows(entries: Vec<Entry>) -> Result<Vec<Row>, String> {
    entries
        .into_iter()
        .map(|e| {
            let line = serde_json::from_str(&e.body)
                .map_err(|err| failed(format!("entry {} does not read: {err}", e.name)))?;
            Ok(Row { seq: e.seq, line })
        })
        .collect()
}

impl SharedRegistry {
    /// Connects to the registry in `schema` (making its tables the first
    /// time) and answers it with every row it holds.
    pub(super) fn open(url: &str, schema: &str) -> Result<(SharedRegistry, Vec<Row>), String> {
        let (entries, all) = SharedEntries::open(url, schema, KIND).map_err(failed)?;
        Ok((SharedRegistry { entries }, rows(all)?))
    }

    /// Takes the registry's lock (until [`commit`](Self::commit) or
    /// [`rollback`](Self::rollback)) and answers the rows after `after`.
    pub(super) fn begin(&self, after: i64) -> Result<Vec<Row>, String> {
        rows(self.entries.begin(after).map_err(failed)?)
    }

    /// Writes `lines` and releases the lock: the last sequence number.
    pub(super) fn commit(&self, lines: &[Line], after: i64) -> Result<i64, String> {
        let mut written = Vec::with_capacity(lines.len());
        for line in lines {
            written.push((line.name(), serde_json::to_string(line).map_err(failed)?));
        }
        self.entries.commit(written, after).map_err(failed)
    }

    /// Releases the lock, writing nothing.
    pub(super) fn rollback(&self) {
        self.entries.rollback();
    }

    /// The rows after `after`, read now.
    pub(super) fn since(&self, after: i64) -> Result<Vec<Row>, String> {
        rows(self.entries.since(after).map_err(failed)?)
    }

    /// Tells the other instances that `node` beat now, running `sites`
    /// (written in the background: a heartbeat never waits for it).
    pub(super) fn beat(&self, node: &str, sites: &[commons_agent::protocol::SiteState]) {
        let beat = Beat {
            at_ms: commons_clock::now_ms(),
            sites: sites.to_vec(),
        };
        if let Ok(body) = serde_json::to_string(&beat) {
            self.entries.note(node, body);
        }
    }

    /// Follows the other instances' changes and heartbeats into `inner`
    /// until it is dropped; `wake` is told when a node was assigned
    /// something.
    pub(super) fn follow(
        &self,
        inner: Weak<Mutex<Inner>>,
        wakes: Weak<Wakes>,
    ) -> Result<(), String> {
        let follower = self.entries.follower().map_err(failed)?;
        std::thread::Builder::new()
            .name("commons-nodes-follow".into())
            .spawn(move || follow(follower, inner, wakes))
            .map_err(failed)?;
        Ok(())
    }
}

fn follow(mut follower: Follower, inner: Weak<Mutex<Inner>>, wakes: Weak<Wakes>) {
    let mut beats_after = 0i64;
    loop {
        std::thread::sleep(FOLLOW_EVERY);
        let Some(inner) = inner.upgrade() else { return };
        let after = inner.lock().unwrap_or_else(|p| p.into_inner()).seq;
        let read = follower
            .entries_since(after)
            .map_err(failed)
            .and_then(rows)
            .and_then(|news| Ok((news, follower.notes_since(beats_after).map_err(failed)?)));
        let (news, beats) = match read {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "following the nodes' registry");
                continue;
            }
        };
        let mut guard = inner.lock().unwrap_or_else(|p| p.into_inner());
        let assigned = absorb(&mut guard, news);
        let now = (Instant::now(), commons_clock::now_ms());
        for note in beats {
            beats_after = beats_after.max(note.seq);
            let Ok(beat) = serde_json::from_str::<Beat>(&note.body) else {
                continue;
            };
            let age = Duration::from_millis((now.1 - beat.at_ms).max(0) as u64);
            let at = now.0.checked_sub(age).unwrap_or(now.0);
            if guard.last_seen.get(&note.name).is_none_or(|t| *t < at) {
                guard.last_seen.insert(note.name.clone(), at);
                guard.sites.insert(note.name, beat.sites);
            }
        }
        drop(guard);
        if let Some(wakes) = wakes.upgrade() {
            wakes.assigned(assigned.iter().map(String::as_str));
        }
    }
}

/// Applies rows newer than what `inner` holds; answers the nodes whose
/// operations changed.
pub(super) fn absorb(inner: &mut Inner, news: Vec<Row>) -> Vec<String> {
    let mut assigned = Vec::new();
    for Row { seq, line } in news {
        if seq <= inner.seq {
            continue;
        }
        inner.seq = seq;
        // What placements take of nodes follows, one placement at a time:
        // counting them all again at each would cost every instance a pass
        // over every site for each site placed anywhere.
        if let (Some((site, placed)), Some(load)) = (line.placement(), inner.load.as_mut()) {
            if let Some(old) = inner.reg.placements.get(site) {
                load.count(old, &inner.reg, false);
            }
            if let Some(new) = placed {
                load.count(new, &inner.reg, true);
            }
        }
        if let Some(node) = line.assigns() {
            assigned.push(node.to_string());
        }
        if let Line::Node {
            key,
            value: Some(_),
        } = &line
        {
            // A node another instance took in gets the grace a restart gives.
            if !inner.last_seen.contains_key(key) {
                inner.last_seen.insert(key.clone(), Instant::now());
            }
        }
        line.apply(&mut inner.reg);
    }
    assigned
}

#[cfg(test)]
mod tests {
    use super::super::{NodeSettings, NodeState, Nodes, PlaceRequest};
    use commons_agent::protocol::{
        pin_of, Heartbeat, JoinRequest, NodeOffer, Operation, Resources,
    };
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// Two instances (two data directories, as on two machines, holding
    /// the one CA they agreed on) sharing the suite's PostgreSQL.
    fn two_instances(settings: NodeSettings) -> (Nodes, Nodes, String, postgres::Client) {
        let url = std::env::var("COMMONS_TEST_POSTGRES")
            .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
        let schema = format!(
            "nodes_shared_{}_{}",
            std::process::id(),
            crate::tokens::random(6).to_lowercase()
        );
        let mut db = postgres::Client::connect(&url, postgres::NoTls).unwrap_or_else(|e| {
            panic!("COMMONS_TEST_POSTGRES ({url}) must name a running server: {e}")
        });
        let store = commons_store::StoreConfig::Postgres {
            url: url.clone(),
            schema: schema.clone(),
        };
        let dir = std::env::temp_dir().join(&schema);
        let (a, b) = (dir.join("a"), dir.join("b"));
        let first = Nodes::open(&a, settings.clone(), &store).unwrap();
        let nodes_dir = |home: &std::path::Path| commons_runtime::Layout::new(home).nodes_dir();
        std::fs::create_dir_all(nodes_dir(&b)).unwrap();
        for f in ["ca.key", "ca.pem"] {
            std::fs::copy(nodes_dir(&a).join(f), nodes_dir(&b).join(f)).unwrap();
        }
        let second = Nodes::open(&b, settings, &store).unwrap();
        db.batch_execute("SELECT 1").unwrap();
        (first, second, schema, db)
    }

    fn offer(cpu_millis: u64) -> NodeOffer {
        NodeOffer {
            region: "eu".into(),
            capacity: Resources {
                cpu_millis,
                memory_bytes: 1 << 34,
                disk_bytes: 1 << 36,
            },
            price: 10,
            features: Default::default(),
        }
    }

    /// Joins a node through `via` on a token `maker` made: its id and its
    /// certificate's fingerprint.
    fn join(maker: &Nodes, via: &Nodes, cpu_millis: u64) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .unwrap();
        let (token, _, _) = maker
            .make_join_token("acme", "test", Duration::from_secs(60))
            .unwrap();
        let certified = via
            .join(&JoinRequest {
                token,
                csr,
                offer: offer(cpu_millis),
                node: None,
            })
            .unwrap();
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let der = CertificateDer::from_pem_slice(certified.certificate.as_bytes()).unwrap();
        (certified.node, pin_of(&der))
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "{what}: not within 5 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn instances_sharing_a_database_share_nodes_placements_and_heartbeats() {
        let settings = NodeSettings {
            lost_after: Duration::from_millis(1500),
            ..NodeSettings::default()
        };
        let (a, b, schema, mut db) = two_instances(settings);
        // A token made on one instance joins on the other, and the node's
        // certificate is good at once on the first.
        let (one, one_cert) = join(&a, &b, 1000);
        a.authenticate(Some(&one_cert), &one).unwrap();
        let (two, two_cert) = join(&b, &a, 1000);
        b.authenticate(Some(&two_cert), &two).unwrap();
        // A token is used once, whichever instance it is shown to.
        let (token, _, _) = a
            .make_join_token("acme", "test", Duration::from_secs(60))
            .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .unwrap();
        let request = JoinRequest {
            token,
            csr,
            offer: offer(1),
            node: None,
        };
        let three = a.join(&request).unwrap().node;
        assert!(b.join(&request).is_err(), "one join per token");

        // Placements made on both at once never overcommit a node: each
        // node (1000 millicores) takes three sites of 300, six in all.
        let (a, b) = (Arc::new(a), Arc::new(b));
        let place = |nodes: Arc<Nodes>, prefix: &'static str| {
            std::thread::spawn(move || {
                (0..8)
                    .filter(|i| {
                        let decision = nodes
                            .place(PlaceRequest {
                                site: format!("{prefix}-{i}"),
                                blueprint: "name: s\ncomponents:\n  web:\n    process: \"true\"\n"
                                    .into(),
                                needs: Resources {
                                    cpu_millis: 300,
                                    memory_bytes: 1,
                                    disk_bytes: 1,
                                },
                                ..PlaceRequest::default()
                            })
                            .unwrap();
                        decision.node.is_some()
                    })
                    .count()
            })
        };
        let (on_a, on_b) = (place(a.clone(), "a"), place(b.clone(), "b"));
        let placed = on_a.join().unwrap() + on_b.join().unwrap();
        assert_eq!(placed, 6, "three sites fit on each of the two nodes");
        let rows: i64 = db
            .query_one(
                &format!(
                    "SELECT count(*) FROM {schema}.nodes_entries \
                     WHERE name LIKE 'placement/%' AND body NOT LIKE '%\"value\":null%'"
                ),
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(rows, 6, "the placements kept");
        for nodes in [&a, &b] {
            wait_for("both instances see every placement", || {
                nodes
                    .list(None)
                    .iter()
                    .filter(|n| n.id == one || n.id == two)
                    .map(|n| n.placed.len())
                    .sum::<usize>()
                    == 6
            });
        }

        // An operation assigned on one instance wakes a long poll on the
        // other.
        let mut watch = b.watch();
        watch.borrow_and_update();
        let (op, _) = a
            .assign(&one, Operation::Remove { site: "a-0".into() })
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(2), watch.changed()).await })
            .expect("the other instance's long poll wakes")
            .unwrap();
        assert!(b.assignments(&one, 0).operations.iter().any(|o| o.id == op));

        // Node one beats to b only, node two to nobody: a's sweep finds
        // two lost and one alive, and b agrees.
        let deadline = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < deadline {
            b.heartbeat(&one, Heartbeat { sites: Vec::new() }).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut lost = a.sweep();
        lost.sort();
        let mut expected = vec![two.clone(), three];
        expected.sort();
        assert_eq!(lost, expected);
        assert!(b.sweep().is_empty(), "lost once, by one instance");
        wait_for("b sees node two lost", || {
            b.list(None)
                .iter()
                .any(|n| n.id == two && n.state == NodeState::Lost)
        });
        // Its stateless sites went to the node alive, as far as it has room.
        let on_one = a.list(None).into_iter().find(|n| n.id == one).unwrap();
        assert_eq!(on_one.placed.len(), 3, "{:?}", on_one.placed);

        drop((a, b));
        db.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .unwrap();
    }
}
