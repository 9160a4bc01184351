//! Deploys the application layer starts: each runs in the background and
//! is remembered, per site, until the next, so a caller can follow it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use commons_store::accounts::{AuditEntry, SiteRow};

use crate::accounts::Principal;
use crate::AppState;
use commons_clock::now_ms;

/// A deploy the platform started: running until `finished_ms` is set, then
/// its outcome (as `commons deploy --json` prints it) or why it could not
/// run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeployRun {
    /// Counts up with every deploy this server starts.
    pub id: u64,
    pub started_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<commons_engine::Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DeployRun {
    /// `running`, `ok` or `failed`.
    pub fn state(&self) -> &'static str {
        match (&self.finished_ms, &self.outcome) {
            (None, _) => "running",
            (Some(_), Some(o)) if o.ok => "ok",
            _ => "failed",
        }
    }
}

/// A deploy, started: the site and the run's id.
#[derive(Debug, serde::Serialize)]
pub struct Started {
    pub site: SiteRow,
    pub deploy: u64,
}

/// The last deploy started of `site` since this server started, if any.
pub fn last(state: &AppState, site: &str) -> Option<DeployRun> {
    let deploys = state.deploys.lock().unwrap_or_else(|e| e.into_inner());
    deploys.get(site).cloned()
}

/// Forgets the deploys of a site that is gone.
pub fn forget(state: &AppState, site: &str) {
    state
        .deploys
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(site);
}

/// Runs the deploy of `target` in the background, recording its outcome in
/// the audit log and in [`AppState::deploys`].
pub fn start(
    state: &Arc<AppState>,
    who: &Principal,
    org: &str,
    target: commons_engine::Target,
    hosting: Option<commons_engine::Hosting>,
    site: SiteRow,
) -> Started {
    let (state2, actor, org2) = (state.clone(), who.actor(), org.to_string());
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let started_ms = now_ms();
    let run = DeployRun {
        id,
        started_ms,
        finished_ms: None,
        outcome: None,
        error: None,
    };
    state
        .deploys
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(target.name.clone(), run);
    tokio::spawn(async move {
        let outcome = state2
            .engine
            .deploy(&target, 4, &commons_engine::apply::Quiet)
            .await;
        let finished = DeployRun {
            id,
            started_ms,
            finished_ms: Some(now_ms()),
            outcome: outcome.as_ref().ok().cloned(),
            error: outcome.as_ref().err().map(|e| e.to_string()),
        };
        // Hosting is kept per deployment, so it is set once the deploy recorded one.
        if let Some(h) = hosting {
            let _ = state2.engine.set_hosting(&target.name, h);
        }
        let detail = match &outcome {
            Ok(o) => serde_json::json!({ "ok": o.ok }),
            Err(e) => serde_json::json!({ "ok": false, "error": e.to_string() }),
        };
        let _ = state2.accounts.store().record(&AuditEntry {
            at_ms: now_ms(),
            actor,
            org: Some(org2),
            action: "site.deploy".into(),
            target: target.name.clone(),
            detail,
        });
        // Last, so a caller that sees it finished also finds it audited.
        let mut deploys = state2.deploys.lock().unwrap_or_else(|e| e.into_inner());
        // A newer deploy of the same site may have started meanwhile.
        if deploys.get(&target.name).map(|r| r.id) == Some(id) {
            deploys.insert(target.name.clone(), finished);
        }
    });
    Started { site, deploy: id }
}
