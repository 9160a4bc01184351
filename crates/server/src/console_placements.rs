//! The console's page of sites on providers' nodes, for the platform's
//! administrator: where each site runs, a move to another node or provider
//! with its data (requests wait, none fail), the confirmation that removes
//! a move's stopped copies, and where a site would go and why — every
//! node's verdict, its score charted by part — before it is placed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;

use crate::accounts::{Member, Principal};
use crate::app;
use crate::console::{csrf_field, page, problem_page, Posted, Viewer};
use crate::nodes::{NodeView, PlaceRequest};
use crate::placement::{Decision, Refusal, Score, Verdict};
use crate::AppState;

const TITLE: &str = "Sites on providers' nodes";

fn who(m: &Member) -> Principal {
    Principal::User(Box::new(m.clone()))
}

/// The fields of the "where would it go" form.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct PlanForm {
    #[serde(default)]
    site: String,
    #[serde(default)]
    blueprint: String,
    /// Comma-separated.
    #[serde(default)]
    providers: String,
    #[serde(default)]
    regions: String,
    #[serde(default)]
    preferred: String,
    /// `place` places it; anything else only shows where it would go.
    #[serde(default)]
    action: String,
}

fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn render(
    state: &AppState,
    m: &Member,
    plan: Option<(&PlanForm, &Decision)>,
) -> Result<Markup, app::AppError> {
    let nodes = app::nodes::list_all(state, &who(m))?;
    let provider_of: BTreeMap<&str, &str> = nodes
        .iter()
        .map(|n| (n.id.as_str(), n.provider.as_str()))
        .collect();
    let ready: Vec<&NodeView> = nodes
        .iter()
        .filter(|n| serde_json::to_value(n.state).ok() == Some(serde_json::json!("ready")))
        .collect();
    let providers: BTreeSet<&str> = ready.iter().map(|n| n.provider.as_str()).collect();
    let form = plan.map(|(f, _)| f);
    Ok(html! {
        h2 { "Sites" }
        @if nodes.iter().all(|n| n.placed.is_empty()) {
            p { "No site is placed on a node yet; say where one would go below." }
        } @else {
            table {
                thead { tr {
                    th scope="col" { "Site" } th scope="col" { "Node" } th scope="col" { "Provider" }
                    th scope="col" { "State" } th scope="col" { "Move with its data to" }
                } }
                tbody {
                    @for n in &nodes {
                        @for site in &n.placed {
                            @let kept: Vec<&str> = nodes.iter().filter(|k| k.kept.contains(site)).map(|k| k.id.as_str()).collect();
                            tr {
                                td { a href=(format!("http://{site}.localhost/")) { (site) } }
                                td { code { (n.id) } }
                                td { (n.provider) }
                                td {
                                    @if n.moving.contains(site) { "moving" } @else { "serving" }
                                    @if !kept.is_empty() {
                                        br;
                                        "a stopped copy on " (kept.join(", "))
                                        form.inline method="post" action=(format!("/console/placements/{site}/confirm")) {
                                            (csrf_field(m)) button type="submit" { "Confirm the move" }
                                        }
                                    }
                                }
                                td {
                                    form.inline method="post" action=(format!("/console/placements/{site}/move")) {
                                        (csrf_field(m))
                                        label.visually-hidden for=(format!("to-{site}")) { "Move " (site) " to" }
                                        select id=(format!("to-{site}")) name="to" {
                                            @for p in &providers {
                                                option value=(p) { "the best node of " (p) }
                                            }
                                            @for r in ready.iter().filter(|r| r.id != n.id) {
                                                option value=(r.id) { (r.id) " (" (r.provider) ", " (r.offer.region) ")" }
                                            }
                                        }
                                        button type="submit" { "Move" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Where would a site go?" }
        @if let Some((_, decision)) = plan {
            (decision_view(decision, &provider_of))
        }
        form.stack method="post" action="/console/placements/plan" {
            (csrf_field(m))
            label for="site" { "Site name" }
            input #site name="site" required value=(form.map_or("", |f| f.site.as_str()));
            label for="blueprint" { "Blueprint (YAML, one file)" }
            textarea #blueprint name="blueprint" rows="8" required { (form.map_or("", |f| f.blueprint.as_str())) }
            label for="providers" { "Only these providers (comma-separated; empty: any)" }
            input #providers name="providers" value=(form.map_or("", |f| f.providers.as_str()));
            label for="regions" { "Only these regions" }
            input #regions name="regions" value=(form.map_or("", |f| f.regions.as_str()));
            label for="preferred" { "Providers preferred, best first" }
            input #preferred name="preferred" value=(form.map_or("", |f| f.preferred.as_str()));
            div {
                button type="submit" name="action" value="plan" { "Show where it would go" }
                " "
                button type="submit" name="action" value="place" { "Place it" }
            }
        }
    })
}

fn refusal(why: &Refusal) -> String {
    match why {
        Refusal::Lost => "lost: no heartbeat".into(),
        Refusal::ProviderNotAllowed => "provider not allowed".into(),
        Refusal::RegionNotAllowed => "region not allowed".into(),
        Refusal::MissingFeature { feature } => format!("does not offer {feature}"),
        Refusal::NoRoom { resource } => format!("no room: {resource}"),
        Refusal::HostsAReplica => "hosts a replica of it".into(),
    }
}

/// A score's parts, for the chart: name and colour.
const PARTS: [(&str, &str); 5] = [
    ("price", "#4e79a7"),
    ("fit", "#59a14f"),
    ("preference", "#f28e2b"),
    ("data locality", "#b07aa1"),
    ("spread", "#76b7b2"),
];

fn parts(s: &Score) -> [f64; 5] {
    [s.price, s.fit, s.preference, s.locality, s.spread]
}

/// The decision: the node chosen, and each node's verdict — refused and
/// why, or its score as a bar of its parts (each 0 to 100 points).
fn decision_view(d: &Decision, provider_of: &BTreeMap<&str, &str>) -> Markup {
    html! {
        @match &d.node {
            Some(node) => p.note role="status" { (d.site) " would go to " code { (node) } " (" (provider_of.get(node.as_str()).copied().unwrap_or("")) ")." },
            None => p.error role="alert" { "No node can take " (d.site) ": every one is refused below." },
        }
        table {
            thead { tr { th scope="col" { "Node" } th scope="col" { "Provider" } th scope="col" { "Verdict" } th scope="col" { "Score" } } }
            tbody {
                @for v in &d.verdicts {
                    @match v {
                        Verdict::Refused { node, why } => tr {
                            td { code { (node) } } td { (provider_of.get(node.as_str()).copied().unwrap_or("")) }
                            td.state-failed { "refused: " (refusal(why)) } td { "" }
                        },
                        Verdict::Scored { node, score } => tr {
                            td { code { (node) } } td { (provider_of.get(node.as_str()).copied().unwrap_or("")) }
                            td { (format!("{:.0}", score.total())) " points" }
                            td { (score_bar(score)) }
                        },
                    }
                }
            }
        }
        p.legend {
            @for (name, colour) in PARTS {
                span { svg width="10" height="10" aria-hidden="true" { rect width="10" height="10" fill=(colour) {} } " " (name) " " }
            }
        }
    }
}

/// A score as a bar of its parts, each 0 to 100 points of 500.
fn score_bar(score: &Score) -> Markup {
    let (width, most) = (300.0, 500.0);
    let described: Vec<String> = PARTS
        .iter()
        .zip(parts(score))
        .map(|((name, _), p)| format!("{name} {p:.0}"))
        .collect();
    let mut x = 0.0;
    let mut segments = Vec::new();
    for ((name, colour), p) in PARTS.iter().zip(parts(score)) {
        let w = p.max(0.0) / most * width;
        segments.push((x, w, *name, *colour, p));
        x += w;
    }
    html! {
        svg role="img" aria-label=(described.join(", ")) width=(width) height="14" viewBox=(format!("0 0 {width} 14")) {
            @for (x, w, name, colour, p) in &segments {
                rect x=(format!("{x:.1}")) y="0" width=(format!("{w:.1}")) height="14" fill=(colour) {
                    title { (name) ": " (format!("{p:.0}")) }
                }
            }
        }
    }
}

fn show(state: &AppState, m: &Member, plan: Option<(&PlanForm, &Decision)>) -> Response {
    match render(state, m, plan) {
        Ok(b) => page(TITLE, Some(m), false, b),
        Err(p) => problem_page(p, Some(m)),
    }
}

pub(crate) async fn placements_page(
    State(state): State<Arc<AppState>>,
    Viewer(m): Viewer,
) -> Response {
    show(&state, &m, None)
}

pub(crate) async fn plan_submit(
    State(state): State<Arc<AppState>>,
    Posted(m, form): Posted<PlanForm>,
) -> Response {
    let lists = |s: &str| {
        let l = list(s);
        (!l.is_empty()).then(|| l.into_iter().collect::<BTreeSet<_>>())
    };
    let req = PlaceRequest {
        site: form.site.trim().to_string(),
        blueprint: form.blueprint.clone(),
        providers: lists(&form.providers),
        regions: lists(&form.regions),
        preferred: list(&form.preferred),
        dry_run: form.action != "place",
        ..PlaceRequest::default()
    };
    match app::nodes::place(&state, &who(&m), req) {
        Ok(decision) => show(&state, &m, Some((&form, &decision))),
        Err(p) => problem_page(p, Some(&m)),
    }
}

#[derive(Deserialize)]
pub(crate) struct MoveForm {
    to: String,
}

pub(crate) async fn move_submit(
    State(state): State<Arc<AppState>>,
    UrlPath(site): UrlPath<String>,
    Posted(m, form): Posted<MoveForm>,
) -> Response {
    match app::nodes::move_site(&state, &who(&m), &site, &form.to) {
        Ok(_) => Redirect::to("/console/placements").into_response(),
        Err(p) => problem_page(p, Some(&m)),
    }
}

pub(crate) async fn confirm_submit(
    State(state): State<Arc<AppState>>,
    UrlPath(site): UrlPath<String>,
    Posted(m, _): Posted<serde::de::IgnoredAny>,
) -> Response {
    match app::nodes::confirm_move(&state, &who(&m), &site) {
        Ok(_) => Redirect::to("/console/placements").into_response(),
        Err(p) => problem_page(p, Some(&m)),
    }
}
