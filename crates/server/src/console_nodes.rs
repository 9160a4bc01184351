//! The console's page of a provider's nodes: each node's state, how long
//! since it was heard from, its offer and the sites placed there; a join
//! token made (shown once, with the command that uses it); a node revoked.

use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;

use crate::accounts::{Member, Principal};
use crate::app::{self, nodes::JoinToken};
use crate::console::{csrf_field, page, problem_page, Posted, Viewer};
use crate::AppState;

fn who(m: &Member) -> Principal {
    Principal::User(Box::new(m.clone()))
}

/// "12 s ago", "3 min ago", "never".
fn ago(ms: Option<u64>) -> String {
    match ms {
        None => "not since the control plane started".into(),
        Some(ms) if ms < 120_000 => format!("{} s ago", ms / 1000),
        Some(ms) => format!("{} min ago", ms / 60_000),
    }
}

fn body(
    state: &AppState,
    m: &Member,
    org: &str,
    made: Option<&JoinToken>,
) -> Result<Markup, app::AppError> {
    let nodes = app::nodes::list(state, &who(m), org)?;
    let may_manage = state
        .accounts
        .allow(&who(m), org, crate::accounts::Action::ManageNodes)
        .is_ok();
    let listener = state
        .agent_url
        .get()
        .map_or("https://CONTROL-PLANE:PORT", String::as_str);
    Ok(html! {
        @if let Some(t) = made {
            p.note role="status" { "A join token for one node, good until " (commons_meter::format_time(t.expires_at_ms)) " — copy it now, it is not shown again. On the provider's machine:" }
            pre #join-command { "commons agent join " (listener) " --token " (t.token) " --region REGION" }
        }
        @if nodes.is_empty() {
            p { "No nodes yet. Make a join token below and run " code { "commons agent join" } " on the machine." }
        } @else {
            table {
                thead { tr {
                    th scope="col" { "Node" } th scope="col" { "State" } th scope="col" { "Heard from" } th scope="col" { "Tunnel" }
                    th scope="col" { "Region" } th scope="col" { "CPU, memory" } th scope="col" { "Sites" } th scope="col" { "" }
                } }
                tbody {
                    @for n in &nodes {
                        @let state_name = serde_json::to_value(n.state).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
                        tr {
                            td { code { (n.id) } }
                            td class=(format!("state-{}", if state_name == "ready" { "running" } else { "failed" })) { (state_name) }
                            td { (ago(n.last_heartbeat_ms_ago)) }
                            td {
                                @match n.tunnel_until_ms {
                                    Some(until) => { "open until " (commons_meter::format_time(until)) }
                                    None => "closed",
                                }
                            }
                            td { (n.offer.region) }
                            td { (n.offer.capacity.cpu_millis) " m, " (n.offer.capacity.memory_bytes >> 20) " MiB" }
                            td { (n.placed.join(", ")) }
                            td {
                                @if may_manage && state_name != "revoked" {
                                    form.inline method="post" action=(format!("/console/orgs/{org}/nodes/{}/revoke", n.id)) {
                                        (csrf_field(m)) button.danger type="submit" { "Revoke " span.visually-hidden { (n.id) } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if may_manage {
            h2 { "Add a node" }
            form.stack method="post" action=(format!("/console/orgs/{org}/join-tokens")) {
                (csrf_field(m))
                label for="ttl" { "Good for (minutes)" }
                input #ttl name="ttl_minutes" type="number" min="1" max="10080" value="60";
                button type="submit" { "Make a join token" }
            }
        }
    })
}

pub(crate) async fn nodes_page(
    State(state): State<Arc<AppState>>,
    Viewer(m): Viewer,
    UrlPath(org): UrlPath<String>,
) -> Response {
    match body(&state, &m, &org, None) {
        Ok(b) => page(&format!("Nodes of {org}"), Some(&m), false, b),
        Err(p) => problem_page(p, Some(&m)),
    }
}

#[derive(Deserialize)]
pub(crate) struct TokenForm {
    ttl_minutes: Option<u64>,
}

pub(crate) async fn join_token_submit(
    State(state): State<Arc<AppState>>,
    UrlPath(org): UrlPath<String>,
    Posted(m, form): Posted<TokenForm>,
) -> Response {
    let n = app::nodes::NewJoinToken {
        ttl_seconds: form.ttl_minutes.map(|t| t.saturating_mul(60)),
    };
    let made = app::nodes::create_join_token(&state, &who(&m), &org, &n)
        .and_then(|t| body(&state, &m, &org, Some(&t)));
    match made {
        Ok(b) => page(&format!("Nodes of {org}"), Some(&m), false, b),
        Err(p) => problem_page(p, Some(&m)),
    }
}

pub(crate) async fn revoke_submit(
    State(state): State<Arc<AppState>>,
    UrlPath((org, id)): UrlPath<(String, String)>,
    Posted(m, _): Posted<serde::de::IgnoredAny>,
) -> Response {
    match app::nodes::revoke(&state, &who(&m), &org, &id) {
        Ok(()) => Redirect::to(&format!("/console/orgs/{org}/nodes")).into_response(),
        Err(p) => problem_page(p, Some(&m)),
    }
}
