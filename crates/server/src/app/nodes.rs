//! Providers' nodes: join tokens made by a provider, the nodes that joined
//! with them, revoking one; and, for the platform, operations assigned to a
//! node and sites placed among the nodes.

use std::time::Duration;

use commons_store::accounts::AuditEntry;

use super::{AppError, ErrorKind, Result};
use crate::accounts::{Action, Principal};
use crate::nodes::{NodeView, PlaceRequest};
use crate::placement::Decision;
use crate::AppState;

/// A join token to make.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewJoinToken {
    /// How long it is good for, in seconds (default 3600, at most 7 days).
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 604800)]
    #[serde(default, deserialize_with = "whole_number")]
    pub ttl_seconds: Option<u64>,
}

/// A whole number, written as JSON Schema counts integers (`60` or `60.0`).
fn whole_number<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<u64>, D::Error> {
    let n: Option<f64> = serde::Deserialize::deserialize(d)?;
    match n {
        None => Ok(None),
        Some(n) if n.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&n) => Ok(Some(n as u64)),
        Some(n) => Err(serde::de::Error::custom(format!(
            "{n} is not a whole number of seconds"
        ))),
    }
}

/// A join token, shown once.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct JoinToken {
    /// `commons agent join URL --token TOKEN` on the node.
    pub token: String,
    pub id: String,
    pub expires_at_ms: i64,
    /// The control plane's CA pin the token carries.
    pub ca_pin: String,
}

fn audit(state: &AppState, who: &Principal, org: &str, action: &str, target: &str) {
    let _ = state.accounts.store().record(&AuditEntry {
        at_ms: commons_clock::now_ms(),
        actor: who.actor(),
        org: Some(org.to_string()),
        action: action.into(),
        target: target.into(),
        detail: serde_json::json!({}),
    });
}

/// Makes a single-use join token for `org`'s nodes.
pub fn create_join_token(
    state: &AppState,
    who: &Principal,
    org: &str,
    n: &NewJoinToken,
) -> Result<JoinToken> {
    state.accounts.allow(who, org, Action::ManageNodes)?;
    let ttl = n.ttl_seconds.unwrap_or(3600);
    if ttl == 0 || ttl > 7 * 86_400 {
        return Err(AppError::new(
            ErrorKind::Invalid,
            "Invalid join token",
            "ttl_seconds is 1 to 604800 (7 days)",
        ));
    }
    let (token, id, expires_at_ms) =
        state
            .nodes
            .make_join_token(org, &who.actor(), Duration::from_secs(ttl))?;
    audit(state, who, org, "node.join_token", &id);
    Ok(JoinToken {
        token,
        id,
        expires_at_ms,
        ca_pin: state.nodes.ca.pin(),
    })
}

/// `org`'s nodes.
pub fn list(state: &AppState, who: &Principal, org: &str) -> Result<Vec<NodeView>> {
    state.accounts.allow(who, org, Action::ReadNodes)?;
    Ok(with_tunnels(state, state.nodes.list(Some(org))))
}

/// Nodes' views with their tunnels as this instance holds them.
fn with_tunnels(state: &AppState, mut views: Vec<NodeView>) -> Vec<NodeView> {
    for v in &mut views {
        v.tunnel_until_ms = state.tunnels.open_until(&v.id).map(|s| s * 1000);
        v.tunnels_open = state.tunnels.live(&v.id);
    }
    views
}

/// Revokes `org`'s node `id`: its certificates stop working at once.
pub fn revoke(state: &AppState, who: &Principal, org: &str, id: &str) -> Result<()> {
    state.accounts.allow(who, org, Action::ManageNodes)?;
    state.nodes.revoke(Some(org), id)?;
    // Its tunnels close too: no connection goes on to a node its provider
    // no longer vouches for, even one that ignores being told.
    state.tunnels.close_revoked();
    audit(state, who, org, "node.revoke", id);
    Ok(())
}

fn platform_only(who: &Principal) -> Result<()> {
    match who {
        Principal::Platform => Ok(()),
        // The platform's administrator signed in to the console (a session,
        // not a token: tokens are for what their scopes name).
        Principal::User(m) if m.user.platform_admin && m.scopes.is_none() => Ok(()),
        Principal::User(_) => Err(AppError::new(
            ErrorKind::Forbidden,
            "Not allowed",
            "only the platform's administrator assigns operations and places sites on nodes",
        )),
    }
}

/// Every node (the platform's administrator).
pub fn list_all(state: &AppState, who: &Principal) -> Result<Vec<NodeView>> {
    platform_only(who)?;
    Ok(with_tunnels(state, state.nodes.list(None)))
}

/// An operation assigned to a node.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Assigned {
    pub id: String,
    pub revision: u64,
}

/// Assigns an operation (one of the closed set) to a node.
pub fn assign(
    state: &AppState,
    who: &Principal,
    node: &str,
    operation: serde_json::Value,
) -> Result<Assigned> {
    platform_only(who)?;
    let op = crate::nodes::Nodes::operation(operation)?;
    let (id, revision) = state.nodes.assign(node, op)?;
    Ok(Assigned { id, revision })
}

/// Places a site among the nodes (or, as a dry run, says where it would go
/// and why).
pub fn place(state: &AppState, who: &Principal, req: PlaceRequest) -> Result<Decision> {
    platform_only(who)?;
    let ok = commons_engine::valid_name(&req.site);
    if !ok {
        return Err(AppError::new(
            ErrorKind::Invalid,
            "Invalid site name",
            "use lowercase letters, digits and '-', starting with a letter",
        ));
    }
    if state
        .engine
        .store()
        .deployment(&req.site)
        .map_err(|e| AppError::new(ErrorKind::Internal, "State", e.to_string()))?
        .is_some_and(|d| d.status != "destroyed")
    {
        return Err(AppError::new(
            ErrorKind::Conflict,
            "Site name taken",
            format!(
                "\"{}\" is a site on this machine; destroy it first or place another name",
                req.site
            ),
        ));
    }
    state.nodes.place(req)
}

/// A move that started.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct MoveStarted {
    pub site: String,
    pub from: String,
    pub to: String,
}

/// Moves a placed site, with its data, to node `to`. While the site keeps
/// serving from where it is, increments of its data build a copy on the
/// target, each carrying only what changed since the one before; once one
/// is small, the move cuts over: new connections wait, those in flight
/// finish, the source freezes, the last increment ships, and the target
/// starts from its completed copy; the held connections then go there.
/// When any step fails the source serves again. Runs in the background on
/// the caller's runtime.
pub fn move_site(
    state: &std::sync::Arc<AppState>,
    who: &Principal,
    site: &str,
    to: &str,
) -> Result<MoveStarted> {
    platform_only(who)?;
    let (from, to) = state.nodes.begin_move(site, to)?;
    let mover = Mover {
        nodes: state.nodes.clone(),
        tunnels: state.tunnels.clone(),
        layout: state.engine.layout.clone(),
        site: site.to_string(),
        from: from.clone(),
        to: to.clone(),
    };
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let (s, f, t) = (&mover.site, &mover.from, &mover.to);
        let outcome = mover.carry_out().await;
        match &outcome {
            Err(e) => {
                eprintln!(
                    "{:>12} {s} from {f} to {t}: {e}; {f} serves it again",
                    "Failed"
                );
                mover.give_up().await;
            }
            Ok(moved) => eprintln!(
                "{:>12} {s} from {f} to {t} in {:.1?}: {} increments while it served, then held {:.1?}",
                "Moved",
                started.elapsed(),
                moved.live_increments,
                moved.held
            ),
        }
        let _ = mover.nodes.finish_move(s, outcome.is_ok());
        let path = mover.nodes.snapshot_path(s);
        let _ = std::fs::remove_file(path.with_extension("sha256"));
        let _ = std::fs::remove_file(path);
    });
    Ok(MoveStarted {
        site: site.to_string(),
        from,
        to,
    })
}

/// Increments shipped while the site serves, at most; then it cuts over
/// whatever the last one's size.
const LIVE_INCREMENTS: u64 = 8;

/// An increment this small is the last one shipped while the site serves:
/// the one after the freeze is about as small, and ships in well under a
/// second.
const SMALL_INCREMENT: u64 = 16 << 20;

/// One move, carried out in the background.
struct Mover {
    nodes: std::sync::Arc<crate::nodes::Nodes>,
    tunnels: std::sync::Arc<crate::tunnels::Tunnels>,
    layout: commons_runtime::Layout,
    site: String,
    from: String,
    to: String,
}

struct Moved {
    live_increments: u64,
    /// From the hold to the cut-over's end: how long new requests waited.
    held: Duration,
}

impl Mover {
    /// Assigns `op` to `node` and waits for its report.
    async fn step(
        &self,
        node: &str,
        op: commons_agent::protocol::Operation,
    ) -> std::result::Result<String, String> {
        let (id, _) = self.nodes.assign(node, op).map_err(|e| e.detail)?;
        match self
            .nodes
            .wait_report(node, &id, Duration::from_secs(3600))
            .await
        {
            Some(r) if r.outcome == "done" => Ok(r.detail),
            Some(r) => Err(format!("{node}: {} ({})", r.detail, r.outcome)),
            None => Err(format!("{node} did not report {id} in time")),
        }
    }

    /// The source ships increment `n`: answers its sha256 and size.
    async fn ship(&self, n: u64) -> std::result::Result<(String, u64), String> {
        self.step(
            &self.from,
            commons_agent::protocol::Operation::ShipIncrement {
                site: self.site.clone(),
                to: self.to.clone(),
                increment: n,
            },
        )
        .await?;
        let path = self.nodes.snapshot_path(&self.site);
        let sha256 = std::fs::read_to_string(path.with_extension("sha256"))
            .map_err(|e| format!("the shipped increment's hash: {e}"))?;
        let bytes = std::fs::metadata(&path)
            .map_err(|e| format!("the shipped increment: {e}"))?
            .len();
        Ok((sha256, bytes))
    }

    async fn carry_out(&self) -> std::result::Result<Moved, String> {
        use commons_agent::protocol::Operation;
        let site = self.site.clone();
        // The copy is built while the site serves from its source.
        let mut n = 0;
        loop {
            let (sha256, bytes) = self.ship(n).await?;
            self.step(
                &self.to,
                Operation::Restore {
                    site: site.clone(),
                    snapshot: sha256,
                    increment: Some(n),
                },
            )
            .await?;
            n += 1;
            if bytes <= SMALL_INCREMENT || n >= LIVE_INCREMENTS {
                break;
            }
        }
        // The cut-over.
        let held = std::time::Instant::now();
        let since_ms = commons_clock::now_ms() as u64;
        self.nodes.hold_move(&site).map_err(|e| e.detail)?;
        self.drain(since_ms).await;
        self.step(&self.from, Operation::Freeze { site: site.clone() })
            .await?;
        let (sha256, _) = self.ship(n).await?;
        self.step(
            &self.to,
            Operation::CutOver {
                site,
                snapshot: Some(sha256),
            },
        )
        .await?;
        Ok(Moved {
            live_increments: n,
            held: held.elapsed(),
        })
    }

    /// New connections wait on the holding epoch's upstream; those in
    /// flight on any other upstream of the site finish before the source
    /// freezes: the gateway must route to the holding one alone.
    async fn drain(&self, since_ms: u64) {
        let Some((component, epoch)) = self.nodes.route_of(&self.site) else {
            return;
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let drained = || {
            let routed = self
                .tunnels
                .existing(&self.site, &component, epoch)
                .is_some_and(|new| {
                    commons_runtime::drivers::gateway_still_uses(&self.layout, new, since_ms)
                });
            routed
                && self
                    .tunnels
                    .others(&self.site, epoch)
                    .into_iter()
                    .all(|old| {
                        !commons_runtime::drivers::gateway_still_uses(&self.layout, old, since_ms)
                    })
        };
        while std::time::Instant::now() < deadline && !drained() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The move failed: the source serves again (it resumes if it froze),
    /// and the target drops the copy it was building — unless it keeps a
    /// stopped copy of the site from an earlier move, which stays.
    async fn give_up(&self) {
        use commons_agent::protocol::Operation;
        let resume = Operation::CutOver {
            site: self.site.clone(),
            snapshot: None,
        };
        if let Ok((op, _)) = self.nodes.assign(&self.from, resume) {
            let _ = self
                .nodes
                .wait_report(&self.from, &op, Duration::from_secs(120))
                .await;
        }
        if !self.nodes.left_on(&self.site).contains(&self.to) {
            let remove = Operation::Remove {
                site: self.site.clone(),
            };
            let _ = self.nodes.assign(&self.to, remove);
        }
    }
}

/// The nodes a confirmed move's stopped copies are removed from.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Confirmed {
    pub site: String,
    pub removed_from: Vec<String>,
}

/// The operator is content with a site's move: the nodes it left remove
/// their stopped copies.
pub fn confirm_move(state: &AppState, who: &Principal, site: &str) -> Result<Confirmed> {
    platform_only(who)?;
    let removed_from = state.nodes.confirm_move(site)?;
    Ok(Confirmed {
        site: site.to_string(),
        removed_from,
    })
}
