//! Running the operations a node is assigned, with the engine on the node's
//! own data directory. The set is closed ([`Operation`]): what does not
//! decode is refused and reported so. Each operation id runs once: its
//! report is kept under `agent/ops/`, and a repeat — the control plane
//! resending after a lost answer, or the agent restarting mid-batch — gets
//! the kept report without running anything again.

use std::path::{Path, PathBuf};

use std::collections::HashMap;

use commons_engine::apply::Quiet;
use commons_engine::increments::{apply_increment, Shipped, Stats};
use commons_engine::Engine;

use crate::client::ControlPlane;
use crate::protocol::{Assigned, Operation, Report, SiteState, OPERATIONS};

/// Whom an operation may need to speak to: the control plane, as this node
/// (shipping a site's data away, or fetching it).
pub struct Link<'a> {
    pub client: &'a ControlPlane,
    pub node: &'a str,
}

/// Runs operations on this node.
pub struct Executor {
    engine: Engine,
    dir: PathBuf,
    /// For each site this node ships away: to which node, the last
    /// increment shipped and what that node holds since.
    shipping: std::sync::Mutex<HashMap<String, Shipping>>,
    /// Sites frozen for a move's cut-over: the next increment is the last.
    frozen: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Which instance of a replicated component the next stream goes to.
    turn: std::sync::atomic::AtomicUsize,
}

struct Shipping {
    to: String,
    last: u64,
    shipped: Shipped,
}

fn report(outcome: &str, detail: impl Into<String>) -> Report {
    Report {
        outcome: outcome.into(),
        detail: detail.into(),
    }
}

/// An operation id is a file name: letters, digits, `-` and `_` only.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Executor {
    pub fn new(home: &Path, engine: Engine) -> std::io::Result<Executor> {
        let dir = crate::join::dir(home);
        commons_files::private_dir(&dir.join("ops"))?;
        commons_files::private_dir(&dir.join("sites"))?;
        commons_files::private_dir(&dir.join("moves"))?;
        Ok(Executor {
            engine,
            dir,
            shipping: Default::default(),
            frozen: Default::default(),
            turn: Default::default(),
        })
    }

    /// Runs `assigned` once; a repeat of its id answers the first report.
    pub async fn run(&self, assigned: &Assigned, link: Option<&Link<'_>>) -> Report {
        if !valid_id(&assigned.id) {
            return report(
                "refused",
                "an operation id is 1 to 64 letters, digits, - or _",
            );
        }
        let kept = self.dir.join("ops").join(format!("{}.json", assigned.id));
        if let Some(r) = std::fs::read(&kept)
            .ok()
            .and_then(|b| serde_json::from_slice::<Report>(&b).ok())
        {
            return r;
        }
        let r = match serde_json::from_value::<Operation>(assigned.operation.clone()) {
            Err(e) => report(
                "refused",
                format!(
                    "not an operation this node accepts ({e}); it accepts {}",
                    OPERATIONS.join(", ")
                ),
            ),
            Ok(op) => match self.apply(&op, link).await {
                Ok(detail) => report("done", detail),
                Err(detail) => report("failed", detail),
            },
        };
        let bytes = serde_json::to_vec(&r).expect("serialisable");
        if let Err(e) = commons_files::write_durable(&kept, &bytes) {
            eprintln!(
                "{:>12} cannot keep the report of {}: {e}",
                "Warning", assigned.id
            );
        }
        r
    }

    fn site_dir(&self, site: &str) -> Result<PathBuf, String> {
        let ok = commons_engine::valid_name(site);
        if !ok {
            return Err(format!("\"{site}\" is not a site name"));
        }
        Ok(self.dir.join("sites").join(site))
    }

    async fn apply(&self, op: &Operation, link: Option<&Link<'_>>) -> Result<String, String> {
        let linked = || link.ok_or_else(|| "this operation needs the control plane".to_string());
        let e = |e: commons_engine::EngineError| e.to_string();
        match op {
            Operation::ApplySite {
                site,
                generation,
                blueprint,
            } => {
                let dir = self.site_dir(site)?;
                commons_files::private_dir(&dir).map_err(|e| e.to_string())?;
                let path = dir.join("commons.yaml");
                commons_files::write_durable(&path, blueprint.as_bytes())
                    .map_err(|e| e.to_string())?;
                let target = self
                    .engine
                    .target_confined(&path, &dir, Some(site), &[])
                    .map_err(e)?;
                self.engine.deploy(&target, 4, &Quiet).await.map_err(e)?;
                commons_files::write_durable(
                    &dir.join("generation"),
                    generation.to_string().as_bytes(),
                )
                .map_err(|e| e.to_string())?;
                Ok(format!("{site} deployed at generation {generation}"))
            }
            Operation::Stop { site } => {
                self.site_dir(site)?;
                let stopped = self.engine.idle(site).await.map_err(e)?;
                Ok(format!("{site}: stopped {}", stopped.join(", ")))
            }
            Operation::Remove { site } => {
                let dir = self.site_dir(site)?;
                self.destroy_if_here(site).await?;
                self.engine
                    .drop_copy_databases(site, &self.caught_dir(site)?)
                    .await
                    .map_err(e)?;
                let _ = std::fs::remove_dir_all(dir);
                Ok(format!("{site} removed"))
            }
            Operation::Snapshot { site } => {
                self.site_dir(site)?;
                let b = self.engine.backup(site).map_err(e)?;
                Ok(format!(
                    "{} sha256:{} ({} bytes)",
                    b.path.display(),
                    b.sha256,
                    b.bytes
                ))
            }
            Operation::Drain => {
                let mut stopped = Vec::new();
                for site in self.sites() {
                    self.engine.idle(&site.site).await.map_err(e)?;
                    stopped.push(site.site);
                }
                Ok(format!("drained: {}", stopped.join(", ")))
            }
            Operation::Restore {
                site,
                snapshot,
                increment: Some(n),
            } => {
                let link = linked()?;
                let stats = self.receive(link, site, snapshot, *n == 0).await?;
                let followed = self
                    .engine
                    .follow_copy(site, &self.copy_dir(site)?, &self.caught_dir(site)?)
                    .await
                    .map_err(e)?;
                Ok(format!(
                    "{site}: increment {n} applied ({}){}",
                    describe(&stats),
                    and_then(&followed)
                ))
            }
            Operation::Restore {
                site,
                snapshot,
                increment: None,
            } => {
                self.site_dir(site)?;
                let archive = self.local_archive(snapshot)?;
                self.restore(site, &archive).await
            }
            Operation::Freeze { site } => {
                self.site_dir(site)?;
                let stopped = self.engine.idle(site).await.map_err(e)?;
                self.frozen_sites().insert(site.clone());
                Ok(format!("{site} frozen: stopped {}", stopped.join(", ")))
            }
            Operation::ShipIncrement {
                site,
                to,
                increment,
            } => {
                self.site_dir(site)?;
                let link = linked()?;
                self.ship(link, site, to, *increment).await
            }
            Operation::CutOver {
                site,
                snapshot: None,
            } => {
                self.site_dir(site)?;
                self.frozen_sites().remove(site);
                // The move was given up: what followed its databases goes.
                let given_up = self
                    .shipping
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(site);
                if let Some(mut s) = given_up {
                    tokio::task::block_in_place(|| s.shipped.stop_following());
                }
                self.engine.wake(site).await.map_err(e)?;
                Ok(format!("{site} serves here again"))
            }
            Operation::CutOver {
                site,
                snapshot: Some(sha256),
            } => {
                let link = linked()?;
                let copy = self.copy_dir(site)?;
                // Without a copy begun here, the last increment must be the
                // whole site (the control plane then ships increment 0).
                let fresh = !copy.join("manifest.json").exists();
                let caught = self.caught_dir(site)?;
                let stats = self.receive(link, site, sha256, fresh).await?;
                let followed = self
                    .engine
                    .follow_copy(site, &copy, &caught)
                    .await
                    .map_err(e)?;
                self.destroy_if_here(site).await?;
                let restored = self
                    .engine
                    .restore_copy(&copy, Some(&caught), Some(site), 4, &Quiet)
                    .await
                    .map_err(e);
                // What is left of the copy (a database's base, gigabytes) is
                // removed after the report: requests wait for the report.
                let left = copy.with_extension(format!("left-{}", std::process::id()));
                let _ = std::fs::rename(&copy, &left);
                std::thread::spawn(move || std::fs::remove_dir_all(left));
                let _ = std::fs::remove_dir_all(&caught);
                restored?;
                Ok(format!(
                    "{site} restored from its copy and serving (last increment: {}){}",
                    describe(&stats),
                    and_then(&followed)
                ))
            }
        }
    }

    /// Where the copy of a site moving here is built.
    fn copy_dir(&self, site: &str) -> Result<PathBuf, String> {
        Ok(self.site_dir(site)?.join("copy"))
    }

    /// Where what was done with the copy's databases is kept.
    fn caught_dir(&self, site: &str) -> Result<PathBuf, String> {
        Ok(self.site_dir(site)?.join("copy-databases"))
    }

    fn frozen_sites(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.frozen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ships increment `n` of `site` for node `to`: written to a file here
    /// (the site may be serving: reading it takes as long as it takes),
    /// then streamed to the control plane.
    async fn ship(&self, link: &Link<'_>, site: &str, to: &str, n: u64) -> Result<String, String> {
        let before = self
            .shipping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(site);
        let mut state = match before {
            Some(s) if n > 0 && s.to == to && s.last + 1 == n => s,
            other => {
                // Cannot build on what was shipped before: start again.
                if let Some(mut old) = other {
                    tokio::task::block_in_place(|| old.shipped.stop_following());
                }
                Shipping {
                    to: to.to_string(),
                    last: 0,
                    shipped: Shipped::default(),
                }
            }
        };
        let last = self.frozen_sites().contains(site);
        let whole = state.shipped.is_empty();
        let file = self.dir.join("moves").join(format!("{site}.increment"));
        let written = tokio::task::block_in_place(|| {
            let mut out = std::io::BufWriter::with_capacity(
                1 << 20,
                std::fs::File::create(&file).map_err(|e| e.to_string())?,
            );
            self.engine
                .write_increment(site, &mut state.shipped, &mut out)
                .map_err(|e| e.to_string())
        });
        let sent = match written {
            Ok(stats) => link
                .client
                .upload_increment(link.node, site, &file)
                .await
                .map(|_| stats)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&file);
        // What was not shipped is not held there: the next increment
        // starts again from the whole.
        let stats = match sent {
            Ok(stats) => stats,
            Err(e) => {
                tokio::task::block_in_place(|| state.shipped.stop_following());
                return Err(e);
            }
        };
        state.last = n;
        if last {
            // Shipped once the site stopped: nothing changes any more.
            tokio::task::block_in_place(|| state.shipped.stop_following());
        }
        self.shipping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(site.to_string(), state);
        Ok(format!(
            "{site}: increment {n} shipped for {to}{} ({})",
            if whole && n > 0 { ", whole" } else { "" },
            describe(&stats)
        ))
    }

    /// Fetches the increment shipped to this node for `site`, checks it is
    /// the one with `sha256`, and applies it to the site's copy.
    async fn receive(
        &self,
        link: &Link<'_>,
        site: &str,
        sha256: &str,
        fresh: bool,
    ) -> Result<Stats, String> {
        let dir = self.site_dir(site)?;
        commons_files::private_dir(&dir).map_err(|e| e.to_string())?;
        let path = dir.join("incoming.increment");
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| e.to_string())?;
        let fetched = link
            .client
            .download_increment(link.node, site, &mut file)
            .await
            .map_err(|e| e.to_string());
        drop(file);
        let applied = fetched.and_then(|_| {
            tokio::task::block_in_place(|| {
                let got = crate::protocol::sha256_of_file(&path).map_err(|e| e.to_string())?;
                if got != sha256 {
                    return Err(format!(
                        "the increment of {site} is not the one shipped (sha256 {got}, expected {sha256})"
                    ));
                }
                let mut input = std::io::BufReader::with_capacity(
                    1 << 20,
                    std::fs::File::open(&path).map_err(|e| e.to_string())?,
                );
                apply_increment(&dir.join("copy"), &mut input, fresh).map_err(|e| e.to_string())
            })
        });
        let _ = std::fs::remove_file(&path);
        applied
    }

    /// A snapshot this node took, by its sha256.
    fn local_archive(&self, sha256: &str) -> Result<PathBuf, String> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("\"{sha256}\" is not a snapshot's sha256"));
        }
        let path = self
            .engine
            .layout()
            .home
            .join("archive")
            .join(format!("{sha256}.tar"));
        if !path.exists() {
            return Err(format!("no snapshot sha256:{sha256} on this node"));
        }
        Ok(path)
    }

    /// Destroys `site` if this node has it.
    async fn destroy_if_here(&self, site: &str) -> Result<(), String> {
        let here = self
            .engine
            .store()
            .deployment(site)
            .map_err(|e| e.to_string())?;
        if here.is_some() {
            self.engine
                .destroy(site, 4, &Quiet)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Stands `site` up from `archive` (any copy of it here is replaced).
    async fn restore(&self, site: &str, archive: &Path) -> Result<String, String> {
        let e = |e: commons_engine::EngineError| e.to_string();
        self.destroy_if_here(site).await?;
        self.engine
            .restore(archive, Some(site), 4, &Quiet)
            .await
            .map_err(e)?;
        Ok(format!("{site} restored and serving"))
    }

    /// Where a site's component listens on this node, while it runs: one
    /// of its live instances, in turn, when it has replicas.
    pub fn upstream(&self, site: &str, component: &str) -> Option<std::net::SocketAddr> {
        let status = self.engine.observe(site).ok()?;
        let live: Vec<std::net::SocketAddr> = status
            .components
            .iter()
            .filter(|c| commons_blueprint::replica_of(&c.name).0 == component)
            .filter_map(|c| {
                c.pid?;
                Some(std::net::SocketAddr::from((
                    c.address.unwrap_or(std::net::Ipv4Addr::LOCALHOST),
                    c.port?,
                )))
            })
            .collect();
        if live.is_empty() {
            return None;
        }
        let turn = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(live[turn % live.len()])
    }

    /// Every running component here: (site, component, its process group).
    pub fn running(&self) -> Vec<(String, String, i32)> {
        let Ok(rows) = self.engine.store().deployments() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for d in rows.into_iter().filter(|d| d.status != "destroyed") {
            let Ok(status) = self.engine.observe(&d.name) else {
                continue;
            };
            for c in status.components {
                if let (Some(pid), "running") = (c.pid, c.state.as_str()) {
                    out.push((d.name.clone(), c.name, pid));
                }
            }
        }
        out
    }

    /// The sites this node runs, as its heartbeat states them.
    pub fn sites(&self) -> Vec<SiteState> {
        let Ok(rows) = self.engine.store().deployments() else {
            return Vec::new();
        };
        rows.into_iter()
            .filter(|d| d.status != "destroyed")
            .map(|d| {
                let generation = std::fs::read_to_string(
                    self.dir.join("sites").join(&d.name).join("generation"),
                )
                .ok()
                .and_then(|g| g.trim().parse().ok())
                .unwrap_or(0);
                SiteState {
                    state: match d.status.as_str() {
                        "ok" => "running".into(),
                        other => other.to_string(),
                    },
                    site: d.name,
                    generation,
                }
            })
            .collect()
    }
}

/// An increment's size, for reports.
/// What was done with a copy's databases, after what was said before.
fn and_then(followed: &str) -> String {
    if followed.is_empty() {
        String::new()
    } else {
        format!("; {followed}")
    }
}

fn describe(s: &Stats) -> String {
    let mut d = format!(
        "{} of {} blocks, {} of {} bytes, {} entries",
        s.blocks_sent, s.blocks, s.bytes_sent, s.bytes, s.entries
    );
    if s.changes > 0 {
        d.push_str(&format!(", {} database changes", s.changes));
    }
    for why in &s.dumped {
        d.push_str(&format!(", dumped {why}"));
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assigned(id: &str, operation: serde_json::Value) -> Assigned {
        Assigned {
            id: id.into(),
            revision: 1,
            operation,
        }
    }

    #[tokio::test]
    async fn operations_outside_the_set_are_refused_and_each_id_runs_once() {
        let home = std::env::temp_dir().join(format!("commons-agent-ops-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&home);
        let engine = Engine::open(&home, &Default::default()).unwrap();
        let ex = Executor::new(&home, engine).unwrap();
        let marker = home.join("ran");
        let shell =
            serde_json::json!({"op": "shell", "command": format!("touch {}", marker.display())});
        let r = ex.run(&assigned("op-1", shell.clone()), None).await;
        assert_eq!(r.outcome, "refused", "{r:?}");
        assert!(r.detail.contains("apply_site"), "{r:?}");
        assert!(!marker.exists(), "nothing ran");
        // A bad id is refused before anything is read or kept.
        let r = ex.run(&assigned("../../etc/x", shell), None).await;
        assert_eq!(r.outcome, "refused");
        // An operation runs once: the second time, its kept report answers,
        // even if the control plane sent something else under the same id.
        let remove = serde_json::json!({"op": "remove", "site": "wiki"});
        let first = ex.run(&assigned("op-2", remove), None).await;
        assert_eq!(first.outcome, "done", "{first:?}");
        let again = ex
            .run(&assigned("op-2", serde_json::json!({"op": "drain"})), None)
            .await;
        assert_eq!(again, first);
        // A site name that is not one is refused by the operation.
        let r = ex
            .run(
                &assigned("op-3", serde_json::json!({"op": "stop", "site": "../x"})),
                None,
            )
            .await;
        assert_eq!(r.outcome, "failed");
        let _ = std::fs::remove_dir_all(&home);
    }
}
