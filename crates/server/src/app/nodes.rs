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
    Ok(state.nodes.list(Some(org)))
}

/// Revokes `org`'s node `id`: its certificates stop working at once.
pub fn revoke(state: &AppState, who: &Principal, org: &str, id: &str) -> Result<()> {
    state.accounts.allow(who, org, Action::ManageNodes)?;
    state.nodes.revoke(Some(org), id)?;
    audit(state, who, org, "node.revoke", id);
    Ok(())
}

fn platform_only(who: &Principal) -> Result<()> {
    match who {
        Principal::Platform => Ok(()),
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
    Ok(state.nodes.list(None))
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

/// Moves a placed site, with its data, to node `to`: the source freezes,
/// ships its snapshot, the target restores it and starts; meanwhile new
/// connections to the site wait rather than fail, and are released to the
/// target once it serves. When any step fails the source serves again.
/// Runs in the background on the caller's runtime.
pub fn move_site(
    state: &std::sync::Arc<AppState>,
    who: &Principal,
    site: &str,
    to: &str,
) -> Result<MoveStarted> {
    platform_only(who)?;
    let (from, to) = state.nodes.begin_move(site, to)?;
    let since_ms = commons_clock::now_ms() as u64;
    let (nodes, tunnels, s, f, t) = (
        state.nodes.clone(),
        state.tunnels.clone(),
        site.to_string(),
        from.clone(),
        to.clone(),
    );
    let layout = state.engine.layout.clone();
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        // New requests wait on the moving epoch's upstream; those in flight
        // on any other upstream of the site finish before the source
        // freezes: the gateway must route to the moving one alone.
        if let Some((component, epoch)) = nodes.route_of(&s) {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let drained = || {
                let routed = tunnels.existing(&s, &component, epoch).is_some_and(|new| {
                    commons_runtime::drivers::gateway_still_uses(&layout, new, since_ms)
                });
                routed
                    && tunnels.others(&s, epoch).into_iter().all(|old| {
                        !commons_runtime::drivers::gateway_still_uses(&layout, old, since_ms)
                    })
            };
            while std::time::Instant::now() < deadline && !drained() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let outcome = carry_out_move(&nodes, &s, &f, &t).await;
        if let Err(e) = &outcome {
            eprintln!(
                "{:>12} {s} from {f} to {t}: {e}; {f} serves it again",
                "Failed"
            );
            let resume = commons_agent::protocol::Operation::CutOver {
                site: s.clone(),
                snapshot: None,
            };
            if let Ok((op, _)) = nodes.assign(&f, resume) {
                let _ = nodes.wait_report(&f, &op, Duration::from_secs(120)).await;
            }
        } else {
            eprintln!(
                "{:>12} {s} from {f} to {t} in {:?}",
                "Moved",
                started.elapsed()
            );
        }
        let _ = nodes.finish_move(&s, outcome.is_ok());
        let _ = std::fs::remove_file(nodes.snapshot_path(&s));
    });
    Ok(MoveStarted {
        site: site.to_string(),
        from,
        to,
    })
}

async fn carry_out_move(
    nodes: &crate::nodes::Nodes,
    site: &str,
    from: &str,
    to: &str,
) -> std::result::Result<(), String> {
    use commons_agent::protocol::Operation;
    let step = |node: &str, op: Operation| {
        let node = node.to_string();
        async move {
            let (id, _) = nodes.assign(&node, op).map_err(|e| e.detail)?;
            match nodes
                .wait_report(&node, &id, Duration::from_secs(600))
                .await
            {
                Some(r) if r.outcome == "done" => Ok(r.detail),
                Some(r) => Err(format!("{node}: {} ({})", r.detail, r.outcome)),
                None => Err(format!("{node} did not report {id} in time")),
            }
        }
    };
    step(from, Operation::Freeze { site: site.into() }).await?;
    step(
        from,
        Operation::ShipIncrement {
            site: site.into(),
            to: to.into(),
        },
    )
    .await?;
    let bytes = std::fs::read(nodes.snapshot_path(site))
        .map_err(|e| format!("the shipped snapshot: {e}"))?;
    let sha256 = commons_agent::protocol::pin_of(&bytes);
    step(
        to,
        Operation::CutOver {
            site: site.into(),
            snapshot: Some(sha256),
        },
    )
    .await?;
    Ok(())
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
