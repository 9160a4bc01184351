//! The console's DataCommons pages: "my data" (every record every app
//! holds about the user, with provenance, the grants and the access log,
//! with a bar per app of what it read and wrote), the consent screen an
//! app sends its users to, revoking, exporting and erasing; forking another
//! user's repository, bringing its changes in and merging a fork's back,
//! with a page to settle the keys both sides changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde::Deserialize;

use crate::accounts::{Member, Principal};
use crate::app::{self, data::GrantChange};
use crate::console::{csrf_field, page, problem_page, Posted, Viewer};
use crate::AppState;

fn who(m: &Member) -> Principal {
    Principal::User(Box::new(m.clone()))
}

fn when(ms: i64) -> String {
    commons_meter::format_time(ms)
}

fn my_data_body(state: &AppState, m: &Member) -> Result<Markup, app::AppError> {
    let data = app::data::my_data(state, &who(m), None)?;
    // Reads and writes per app, for the chart.
    let mut per_app: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for row in &data.access_log {
        let app = row["app"].as_str().unwrap_or("?");
        let count = row["count"].as_i64().unwrap_or(0);
        let entry = per_app.entry(app).or_default();
        if row["action"] == "write" {
            entry.1 += count;
        } else {
            entry.0 += count;
        }
    }
    let most = per_app
        .values()
        .map(|(r, w)| r + w)
        .max()
        .unwrap_or(1)
        .max(1);
    Ok(html! {
        p { "Your repository is " code { (data.did) } ". Every record any app keeps for you is listed here, with the app and blueprint revision that wrote it." }
        h2 { "Records (" (data.records.len()) ")" }
        @if data.records.is_empty() {
            p { "No app has stored anything for you yet." }
        } @else {
            table #records {
                thead { tr {
                    th scope="col" { "Collection" } th scope="col" { "Key" } th scope="col" { "Class" }
                    th scope="col" { "Value" } th scope="col" { "Written by" } th scope="col" { "Updated" }
                } }
                tbody {
                    @for r in &data.records {
                        tr {
                            td { code { (r.collection) } }
                            td { code { (r.rkey) } }
                            td { (r.class.name()) @if let Some(l) = &r.licence { " (" (l) ")" } }
                            td { code.value { (r.value.to_string()) } }
                            td.provenance { (r.provenance.app) " " small { "rev " (r.provenance.revision.get(..8).unwrap_or(&r.provenance.revision)) } }
                            td { (when(r.provenance.updated_ms)) }
                        }
                    }
                }
            }
        }
        h2 { "Apps that used your data" }
        @if per_app.is_empty() {
            p { "None yet." }
        } @else {
            figure #access-chart aria-label="reads and writes per app" {
                @for (app, (reads, writes)) in &per_app {
                    div.bar-row {
                        span.bar-label { (app) }
                        span.bar style=(format!("width: {}%", (reads + writes) * 100 / most)) {}
                        span.bar-value { (reads) " reads, " (writes) " writes" }
                    }
                }
            }
        }
        h2 { "Who may use it" }
        @if data.grants.is_empty() {
            p { "You have granted nothing." }
        } @else {
            table #grants {
                thead { tr { th scope="col" { "To" } th scope="col" { "Collection" } th scope="col" { "May" } th scope="col" { "Since" } th scope="col" { "" } } }
                tbody {
                    @for g in &data.grants {
                        tr {
                            td { (g.grantee) } td { code { (g.collection) } } td { (g.action.name()) } td { (when(g.granted_ms)) }
                            td {
                                form.inline method="post" action="/console/data/revoke" {
                                    (csrf_field(m))
                                    input type="hidden" name="grantee" value=(g.grantee);
                                    input type="hidden" name="collection" value=(g.collection);
                                    input type="hidden" name="action" value=(g.action.name());
                                    button.danger type="submit" { "Revoke" }
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Forks" }
        @let mine: Vec<_> = data.forks.iter().filter(|f| f.fork_user == data.user).collect();
        @let theirs: Vec<_> = data.forks.iter().filter(|f| f.source == data.user).collect();
        @if mine.is_empty() && theirs.is_empty() {
            p { "You have not forked a repository, and nobody has forked yours." }
        } @else {
            table #forks {
                thead { tr { th scope="col" { "Fork" } th scope="col" { "Since" } th scope="col" { "" } } }
                tbody {
                    @for f in &mine {
                        tr {
                            td { "Your fork of " code { (f.source) } }
                            td { (when(f.created_ms)) }
                            td {
                                form.inline method="post" action=(format!("/console/data/forks/{}/sync", f.source)) {
                                    (csrf_field(m))
                                    button type="submit" { "Bring their changes in" }
                                }
                            }
                        }
                    }
                    @for f in &theirs {
                        tr {
                            td { code { (f.fork_user) } "'s fork of yours" }
                            td { (when(f.created_ms)) }
                            td {
                                form.inline method="post" action=(format!("/console/data/merges/{}", f.fork_user)) {
                                    (csrf_field(m))
                                    button type="submit" { "Merge their changes" }
                                }
                            }
                        }
                    }
                }
            }
        }
        form.stack #fork method="post" action="/console/data/forks" {
            (csrf_field(m))
            label for="source" { "Fork a repository: its DID (or its owner's id). You get its public records, and those its owner shares with you." }
            input #source name="source" type="text" autocomplete="off" placeholder="did:key:…";
            button type="submit" { "Fork" }
        }
        h2 { "Take it with you, or erase it" }
        p { a href="/console/data/export" download { "Download everything" } " — your repository (CAR), every record as JSON Lines, grants, the access log and your keys." }
        form.stack #erase method="post" action="/console/data/erase" {
            (csrf_field(m))
            label for="confirm" { "Type " strong { "erase my data" } " to erase everything every app holds about you. Encrypted copies become unreadable; public records get signed deletions." }
            input #confirm name="confirm" type="text" autocomplete="off";
            button.danger type="submit" { "Erase everything" }
        }
    })
}

pub(crate) async fn my_data_page(
    State(state): State<Arc<AppState>>,
    Viewer(m): Viewer,
) -> Response {
    let body = tokio::task::block_in_place(|| my_data_body(&state, &m));
    match body {
        Ok(b) => page("My data", Some(&m), false, b),
        Err(p) => problem_page(p, Some(&m)),
    }
}

fn consent_body(state: &AppState, m: &Member, site: &str) -> Result<Markup, app::AppError> {
    let requests = app::data::requests(state, &who(m), site)?;
    Ok(html! {
        p { strong { (site) } " asks to use your data:" }
        @if requests.is_empty() {
            p { (site) " declares no data." }
        } @else {
            table #requests {
                thead { tr { th scope="col" { "Collection" } th scope="col" { "Class" } th scope="col" { "To" } th scope="col" { "Fields" } th scope="col" { "Why" } } }
                tbody {
                    @for r in &requests {
                        tr {
                            td { code { (r.collection) } }
                            td { (r.class.name()) @if let Some(l) = &r.licence { " (" (l) ")" } }
                            td { (r.actions.iter().map(|a| a.name()).collect::<Vec<_>>().join(" and ")) }
                            td { (r.fields.join(", ")) }
                            td { (r.purpose) }
                        }
                    }
                }
            }
            form.stack method="post" action=(format!("/console/data/consent/{site}")) {
                (csrf_field(m))
                button type="submit" { "Allow " (site) }
            }
            p { "You can revoke this at any time on " a href="/console/data" { "My data" } "." }
        }
    })
}

pub(crate) async fn consent_page(
    State(state): State<Arc<AppState>>,
    Viewer(m): Viewer,
    UrlPath(site): UrlPath<String>,
) -> Response {
    let body = tokio::task::block_in_place(|| consent_body(&state, &m, &site));
    match body {
        Ok(b) => page(&format!("{site} asks for your data"), Some(&m), false, b),
        Err(p) => problem_page(p, Some(&m)),
    }
}

pub(crate) async fn consent_submit(
    State(state): State<Arc<AppState>>,
    UrlPath(site): UrlPath<String>,
    Posted(m, _): Posted<serde::de::IgnoredAny>,
) -> Response {
    match tokio::task::block_in_place(|| app::data::consent(&state, &who(&m), &site)) {
        Ok(_) => Redirect::to("/console/data").into_response(),
        Err(p) => problem_page(p, Some(&m)),
    }
}

#[derive(Deserialize)]
pub(crate) struct RevokeForm {
    grantee: String,
    collection: String,
    action: String,
}

pub(crate) async fn revoke_submit(
    State(state): State<Arc<AppState>>,
    Posted(m, form): Posted<RevokeForm>,
) -> Response {
    let change = GrantChange {
        grantee: form.grantee,
        collection: form.collection,
        action: form.action,
    };
    match tokio::task::block_in_place(|| app::data::revoke(&state, &who(&m), &change)) {
        Ok(_) => Redirect::to("/console/data").into_response(),
        Err(p) => problem_page(p, Some(&m)),
    }
}

pub(crate) async fn export(State(state): State<Arc<AppState>>, Viewer(m): Viewer) -> Response {
    match tokio::task::block_in_place(|| app::data::export(&state, &who(&m), None)) {
        Ok((user, bytes)) => (
            [
                (header::CONTENT_TYPE, "application/x-tar".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"commons-data-{user}.tar\""),
                ),
            ],
            bytes,
        )
            .into_response(),
        Err(p) => problem_page(p, Some(&m)),
    }
}

#[derive(Deserialize)]
pub(crate) struct EraseForm {
    confirm: String,
}

pub(crate) async fn erase_submit(
    State(state): State<Arc<AppState>>,
    Posted(m, form): Posted<EraseForm>,
) -> Response {
    if form.confirm.trim() != "erase my data" {
        return problem_page(
            app::AppError::new(
                app::ErrorKind::Invalid,
                "Not confirmed",
                "type \"erase my data\" to confirm; nothing was erased",
            ),
            Some(&m),
        );
    }
    match tokio::task::block_in_place(|| app::data::erase(&state, &who(&m), None)) {
        Ok(e) => page(
            "Your data was erased",
            Some(&m),
            false,
            html! {
                p role="status" #erased { (e.records) " records erased (" (e.public_deleted) " public ones with signed deletions). Your keys are destroyed; every encrypted copy is unreadable." }
            },
        ),
        Err(p) => problem_page(p, Some(&m)),
    }
}

#[derive(Deserialize)]
pub(crate) struct ForkForm {
    source: String,
}

pub(crate) async fn fork_submit(
    State(state): State<Arc<AppState>>,
    Posted(m, form): Posted<ForkForm>,
) -> Response {
    let source = form.source.trim().to_owned();
    match tokio::task::block_in_place(|| app::data::fork(&state, &who(&m), &source)) {
        Ok(done) => page(
            "Forked",
            Some(&m),
            false,
            html! {
                p role="status" #forked { (done.applied) " records copied from " code { (source) } " into your repository." }
                p { a href="/console/data" { "Back to my data" } }
            },
        ),
        Err(p) => problem_page(p, Some(&m)),
    }
}

/// The resolutions a conflicts form posted: fields `resolve:PATH` =
/// `ours` | `theirs`.
fn resolutions(form: &BTreeMap<String, String>) -> app::data::Resolutions {
    let resolve = form
        .iter()
        .filter_map(|(k, v)| {
            let path = k.strip_prefix("resolve:")?;
            let choice = match v.as_str() {
                "ours" => app::data::Choice::Ours,
                "theirs" => app::data::Choice::Theirs,
                _ => return None,
            };
            Some((path.to_owned(), choice))
        })
        .collect();
    app::data::Resolutions { resolve }
}

/// What a sync or merge did: done, or the keys to settle (each with the
/// versions at the fork point, here and there), posted back to `action`.
fn landed(
    m: &Member,
    action: &str,
    done: Result<commons_data::service::Merged, app::AppError>,
    (ours, theirs): (&str, &str),
) -> Response {
    let done = match done {
        Ok(d) => d,
        Err(p) => return problem_page(p, Some(m)),
    };
    if done.conflicts.is_empty() {
        return page(
            "Changes brought in",
            Some(m),
            false,
            html! {
                p role="status" #landed { (done.applied) " changes brought in." }
                p { a href="/console/data" { "Back to my data" } }
            },
        );
    }
    let cid = |c: &Option<String>| c.clone().unwrap_or_else(|| "(deleted)".into());
    page(
        "Both sides changed these",
        Some(m),
        false,
        html! {
            p { "Nothing was changed yet. Each record below was changed on both sides since the fork; choose which version to keep, then apply." }
            form.stack #conflicts method="post" action=(action) {
                (csrf_field(m))
                table {
                    thead { tr { th scope="col" { "Record" } th scope="col" { "At the fork" } th scope="col" { (ours) } th scope="col" { (theirs) } } }
                    tbody {
                        @for c in &done.conflicts {
                            tr {
                                td { code { (c.path) } }
                                td { small { (cid(&c.base)) } }
                                td { label { input type="radio" name=(format!("resolve:{}", c.path)) value="ours" checked; " keep " small { (cid(&c.ours)) } } }
                                td { label { input type="radio" name=(format!("resolve:{}", c.path)) value="theirs"; " take " small { (cid(&c.theirs)) } } }
                            }
                        }
                    }
                }
                button type="submit" { "Apply" }
            }
        },
    )
}

pub(crate) async fn sync_submit(
    State(state): State<Arc<AppState>>,
    UrlPath(source): UrlPath<String>,
    Posted(m, form): Posted<BTreeMap<String, String>>,
) -> Response {
    let r = resolutions(&form);
    let done = tokio::task::block_in_place(|| app::data::sync(&state, &who(&m), &source, &r));
    let action = format!("/console/data/forks/{source}/sync");
    landed(&m, &action, done, ("Your fork", "Theirs"))
}

pub(crate) async fn merge_submit(
    State(state): State<Arc<AppState>>,
    UrlPath(fork_user): UrlPath<String>,
    Posted(m, form): Posted<BTreeMap<String, String>>,
) -> Response {
    let r = resolutions(&form);
    let done = tokio::task::block_in_place(|| app::data::merge(&state, &who(&m), &fork_user, &r));
    let action = format!("/console/data/merges/{fork_user}");
    landed(&m, &action, done, ("Yours", "Their fork"))
}
