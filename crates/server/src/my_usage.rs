//! "My usage": what a signed-in user used in a billing period — requests
//! per day through the gateway, and the sites they used with the weight
//! each gets when the period closes and their payment is split. The same
//! figures the meter keeps and period close reads, not a second count.

use crate::error::ErrorKind;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use commons_meter::{Aggregation, Window};
use maud::html;
use serde::{Deserialize, Serialize};

use crate::accounts::{Member, Principal};
use crate::api::Who;
use crate::web::Params;
use crate::{AppError, AppState};

/// A user's use of the platform in one period.
#[derive(Debug, Serialize)]
pub struct Usage {
    /// `YYYY-MM`.
    pub period: String,
    /// Requests through the gateway, per day of the period up to today.
    pub days: Vec<Day>,
    /// Sites used, with their events (the weights of the period's split).
    pub sites: Vec<SiteUse>,
    /// The same per day: (day, site, events), by day then site.
    pub site_days: Vec<SiteDay>,
    /// Requests in the period.
    pub requests: u64,
}

#[derive(Debug, Serialize)]
pub struct Day {
    /// `YYYY-MM-DD`.
    pub day: String,
    pub requests: u64,
}

#[derive(Debug, Serialize)]
pub struct SiteDay {
    /// `YYYY-MM-DD`.
    pub day: String,
    pub site: String,
    pub events: u64,
}

#[derive(Debug, Serialize)]
pub struct SiteUse {
    pub site: String,
    pub events: u64,
}

#[derive(Debug, Deserialize)]
pub struct PeriodQuery {
    period: Option<String>,
}

/// `user`'s usage in `period` (this month when `None`).
pub fn read(state: &AppState, user: &str, period: Option<&str>) -> Result<Usage, AppError> {
    let period = match period {
        Some(p) => p.to_string(),
        None => commons_meter::period_of(commons_clock::now_ms()),
    };
    let Some((from_ms, to_ms)) =
        commons_meter::period_bounds(&period).filter(|_| period.len() == 7)
    else {
        return Err(AppError::new(
            ErrorKind::Malformed,
            "Invalid period",
            format!("\"{period}\" is not a period; write it as YYYY-MM, e.g. 2026-11"),
        ));
    };
    let meter = state.meter.lock().unwrap_or_else(|p| p.into_inner());
    let failed = |e: commons_meter::MeterError| {
        AppError::new(ErrorKind::Internal, "Meter unavailable", e.to_string())
    };
    let counted: std::collections::HashMap<i64, u64> = meter
        .query(&commons_meter::Query {
            window: Window::Day,
            dim: "user",
            value: user,
            metric: "events:request",
            aggregation: Aggregation::Sum,
            from_ms,
            to_ms,
        })
        .map_err(failed)?
        .into_iter()
        .map(|(start, n)| (start, n.max(0.0) as u64))
        .collect();
    // Every day of the period so far, the quiet ones too: a timeline.
    const DAY_MS: i64 = 86_400_000;
    let until = to_ms.min(Window::Day.start(commons_clock::now_ms()) + DAY_MS);
    let days: Vec<Day> = (from_ms..until.max(from_ms + DAY_MS))
        .step_by(DAY_MS as usize)
        .map(|start| Day {
            day: commons_meter::format_time(start)[..10].to_string(),
            requests: counted.get(&start).copied().unwrap_or(0),
        })
        .collect();
    let sites = meter
        .sites_used(&period, user)
        .map_err(failed)?
        .into_iter()
        .map(|(site, events)| SiteUse { site, events })
        .collect();
    let site_days = meter
        .site_days(user, from_ms, to_ms)
        .map_err(failed)?
        .into_iter()
        .map(|(start, site, events)| SiteDay {
            day: commons_meter::format_time(start)[..10].to_string(),
            site,
            events,
        })
        .collect();
    Ok(Usage {
        site_days,
        requests: days.iter().map(|d| d.requests).sum(),
        period,
        days,
        sites,
    })
}

fn account(who: &Principal) -> Result<&Member, AppError> {
    match who {
        Principal::User(m) => Ok(m),
        Principal::Platform => Err(AppError::new(
            ErrorKind::Forbidden,
            "No account",
            "the platform's administrator has no usage of its own; sign in as a user",
        )),
    }
}

/// The caller's usage in a period.
#[utoipa::path(get, path = "/api/me/usage", tag = "accounts",
    params(("period" = Option<String>, Query, pattern = r"^2[0-9]{3}-(0[1-9]|1[0-2])$",
        description = "`YYYY-MM` [default: this month]")),
    responses(
        (status = 200, description = "`{period, days: [{day, requests}], sites: [{site, events}], site_days: [{day, site, events}], requests}`", body = Object),
        crate::schema::BadQuery,
        crate::schema::Unauthenticated,
        (status = 403, description = "the platform's administrator has no account", body = crate::schema::Problem, content_type = "application/problem+json"),
    ), security(("bearer" = [])))]
pub async fn usage_json(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    Params(q): Params<PeriodQuery>,
) -> Result<Response, AppError> {
    let m = account(&who)?;
    // The meter's store may block (PostgreSQL's client).
    let usage = tokio::task::block_in_place(|| read(&state, &m.user.id, q.period.as_deref()))?;
    Ok(Json(usage).into_response())
}

/// The console's page of it, with a chart of the days.
pub async fn page(
    State(state): State<Arc<AppState>>,
    Who(who): Who,
    Params(q): Params<PeriodQuery>,
) -> Response {
    let m = match account(&who) {
        Ok(m) => m,
        Err(p) => return crate::console::problem_page(p, None),
    };
    let usage = match tokio::task::block_in_place(|| read(&state, &m.user.id, q.period.as_deref()))
    {
        Ok(u) => u,
        Err(p) => return crate::console::problem_page(p, Some(m)),
    };
    let most = usage
        .days
        .iter()
        .map(|d| d.requests)
        .max()
        .unwrap_or(0)
        .max(1);
    let bar = 18usize;
    let height = 160usize;
    let width = (usage.days.len() * (bar + 6)).max(bar + 6);
    let described: Vec<String> = usage
        .days
        .iter()
        .filter(|d| d.requests > 0)
        .map(|d| format!("{}: {} requests", d.day, d.requests))
        .collect();
    crate::console::page(
        &format!("Your usage, {}", usage.period),
        Some(m),
        false,
        html! {
            p {
                (usage.requests)
                @if usage.requests == 1 { " request" } @else { " requests" }
                " through the platform's sites this period."
            }
            @if usage.requests == 0 {
                p { "Nothing yet this period." }
            } @else {
                h2 { "Requests per day" }
                svg role="img" aria-label=(described.join("; ")) width=(width) height=(height + 20)
                    viewBox=(format!("0 0 {width} {}", height + 20)) {
                    @for (i, d) in usage.days.iter().enumerate() {
                        @let h = (d.requests as f64 / most as f64 * height as f64).round().max(1.0) as usize;
                        @if d.requests > 0 {
                            rect x=(i * (bar + 6)) y=(height - h) width=(bar) height=(h) fill="#14365d" {
                                title { (d.day) ": " (d.requests) " requests" }
                            }
                        }
                        text x=(i * (bar + 6)) y=(height + 14) font-size="10" { (&d.day[8..]) }
                    }
                }
                table {
                    tr { th { "Day" } th { "Requests" } }
                    @for d in usage.days.iter().filter(|d| d.requests > 0) {
                        tr { td { (d.day) } td { (d.requests) } }
                    }
                }
            }
            h2 { "Sites you used" }
            p { "When the period closes, your subscription is split among these sites in proportion \
                 to what you used of each." }
            @if usage.sites.is_empty() {
                p { "None yet." }
            } @else {
                (site_chart(&usage))
                table {
                    tr { th { "Site" } th { "Events" } }
                    @for s in &usage.sites { tr { td { (s.site) } td { (s.events) } } }
                }
            }
        },
    )
}

/// Colours of the busiest sites; the rest share the last.
const SITE_COLOURS: &[&str] = &[
    "#14365d", "#2a6f97", "#61a5c2", "#e07a5f", "#81b29a", "#f2cc8f", "#8d99ae",
];

/// What each day's use was made of: a bar a day, stacked by site (the
/// busiest sites each a colour, the others together), with a legend.
fn site_chart(usage: &Usage) -> maud::Markup {
    let named = SITE_COLOURS.len() - 1;
    let colour_of = |site: &str| {
        let at = usage
            .sites
            .iter()
            .position(|s| s.site == site)
            .unwrap_or(named);
        SITE_COLOURS[at.min(named)]
    };
    let label_of = |site: &str| {
        if usage
            .sites
            .iter()
            .position(|s| s.site == site)
            .unwrap_or(named)
            < named
        {
            site.to_string()
        } else {
            "other sites".to_string()
        }
    };
    let day_total = |day: &str| -> u64 {
        usage
            .site_days
            .iter()
            .filter(|d| d.day == day)
            .map(|d| d.events)
            .sum()
    };
    let most = usage
        .days
        .iter()
        .map(|d| day_total(&d.day))
        .max()
        .unwrap_or(0)
        .max(1);
    let (bar, height) = (18usize, 160usize);
    let width = (usage.days.len() * (bar + 6)).max(bar + 6);
    let described: Vec<String> = usage
        .site_days
        .iter()
        .map(|d| format!("{} on {}: {} events", d.site, d.day, d.events))
        .collect();
    // Each day's bar, its sites stacked from the bottom: (x, y, height, site part).
    let mut segments: Vec<(usize, f64, f64, &SiteDay)> = Vec::new();
    for (i, d) in usage.days.iter().enumerate() {
        let mut top = height as f64;
        for part in usage.site_days.iter().filter(|p| p.day == d.day) {
            let h = part.events as f64 / most as f64 * height as f64;
            top -= h;
            segments.push((i * (bar + 6), top, h.max(0.5), part));
        }
    }
    let mut legend: Vec<(String, &str)> = Vec::new();
    for s in &usage.sites {
        let entry = (label_of(&s.site), colour_of(&s.site));
        if !legend.contains(&entry) {
            legend.push(entry);
        }
    }
    html! {
        h3 { "Events per day, by site" }
        svg role="img" aria-label=(described.join("; ")) width=(width) height=(height + 20)
            viewBox=(format!("0 0 {width} {}", height + 20)) {
            @for (x, y, h, part) in &segments {
                rect x=(x) y=(format!("{y:.1}")) width=(bar) height=(format!("{h:.1}"))
                    fill=(colour_of(&part.site)) {
                    title { (part.site) ", " (part.day) ": " (part.events) " events" }
                }
            }
            @for (i, d) in usage.days.iter().enumerate() {
                text x=(i * (bar + 6)) y=(height + 14) font-size="10" { (&d.day[8..]) }
            }
        }
        p.legend {
            @for (label, colour) in &legend {
                span { svg width="10" height="10" aria-hidden="true" { rect width="10" height="10" fill=(colour) {} } " " (label) " " }
            }
        }
    }
}
