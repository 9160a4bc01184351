//! The console's subscription page: the tiers and their prices, the tier
//! the user has, and a button per paid tier that goes through the payment
//! provider's hosted checkout.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use crate::accounts::Principal;
use crate::app;
use crate::console::{csrf_field, page, problem_page, Posted, Viewer};
use crate::AppState;

/// Minor units as an amount: 500 → "5.00".
fn amount(minor: u64) -> String {
    format!("{}.{:02}", minor / 100, minor % 100)
}

/// A time in ms since the epoch, as a date.
fn date(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()[..10].to_string()
}

#[derive(Deserialize)]
pub struct Back {
    checkout: Option<String>,
}

pub(crate) async fn page_of_billing(
    State(state): State<Arc<AppState>>,
    Viewer(m): Viewer,
    Query(back): Query<Back>,
) -> Response {
    let who = Principal::User(Box::new(m.clone()));
    let subscription = match app::billing::subscription(&state, &who) {
        Ok(s) => s,
        Err(p) => return problem_page(p, Some(&m)),
    };
    let now = commons_clock::now_ms();
    let running = subscription
        .as_ref()
        .filter(|s| s.status != "lapsed" && now < s.term_end_ms);
    let tiers = app::billing::tiers(&state);
    let payments = state.stripe_api.is_some();
    let body = html! {
        @match back.checkout.as_deref() {
            Some("done") => p.note role="status" {
                "Thank you. Your subscription starts as soon as the payment provider confirms the payment."
            },
            Some("cancelled") => p.note role="status" { "Checkout cancelled: nothing was charged." },
            _ => {}
        }
        @match running {
            Some(s) => p {
                "You subscribe to " strong { (s.tier) } " (" (s.status) "), this term "
                (date(s.term_start_ms)) " to " (date(s.term_end_ms)) "."
                @if let Some(next) = &s.next_tier { " From the next term: " (next) "." }
                @if s.status == "active" {
                    form.inline method="post" action="/console/billing/cancel" {
                        (csrf_field(&m))
                        button type="submit" { "Cancel the subscription" }
                    }
                } @else {
                    " It does not renew."
                }
            },
            None => p { "You have the free tier. A subscription pays the people and projects behind the sites you use." },
        }
        @if !payments {
            p.note { "This platform takes no card payments; its operator records payments by hand." }
        }
        table {
            caption { "Tiers, per 30-day term" }
            thead { tr { th scope="col" { "Tier" } th scope="col" { "Price (USD)" } th scope="col" { "" } } }
            tbody {
                @for t in &tiers {
                    tr {
                        td { (t.name) }
                        td { (amount(t.price)) }
                        td {
                            @if running.is_some_and(|s| s.tier == t.name) {
                                "Yours"
                            } @else if let (Some(s), true) = (running, t.price > 0) {
                                @let upgrade = t.price > tiers.iter().find(|x| x.name == s.tier).map_or(0, |x| x.price);
                                form.inline method="post" action="/console/billing/change" {
                                    (csrf_field(&m))
                                    input type="hidden" name="tier" value=(t.name);
                                    button type="submit" {
                                        @if upgrade { "Upgrade to " (t.name) " now" } @else { "Change to " (t.name) " at renewal" }
                                    }
                                }
                                @if upgrade { " You pay the difference for the rest of this term." }
                            } @else if t.price > 0 && payments && running.is_none() {
                                form.inline method="post" action="/console/billing/checkout" {
                                    (csrf_field(&m))
                                    input type="hidden" name="tier" value=(t.name);
                                    button type="submit" { "Subscribe to " (t.name) }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    page("Subscription", Some(&m), false, body)
}

#[derive(Deserialize)]
pub struct TierForm {
    tier: String,
}

/// Sends the user to the hosted checkout.
pub(crate) async fn checkout_submit(
    State(state): State<Arc<AppState>>,
    Posted(m, f): Posted<TierForm>,
) -> Response {
    let who = Principal::User(Box::new(m.clone()));
    let return_to = format!("{}/console/billing", state.public_base());
    match app::billing::checkout(&state, &who, &f.tier, &return_to).await {
        Ok(session) => Redirect::to(&session.url).into_response(),
        Err(p) => problem_page(p, Some(&m)),
    }
}

/// Changes the tier; back to the page, which shows the new one (or the
/// one coming at renewal).
pub(crate) async fn change_submit(
    State(state): State<Arc<AppState>>,
    Posted(m, f): Posted<TierForm>,
) -> Response {
    let who = Principal::User(Box::new(m.clone()));
    match app::billing::change(&state, &who, &f.tier).await {
        Ok(_) => Redirect::to("/console/billing").into_response(),
        Err(p) => problem_page(p, Some(&m)),
    }
}

/// Cancels the subscription; back to the page, which says until when it runs.
pub(crate) async fn cancel_submit(
    State(state): State<Arc<AppState>>,
    Posted(m, _): Posted<serde::de::IgnoredAny>,
) -> Response {
    let who = Principal::User(Box::new(m.clone()));
    match app::billing::cancel(&state, &who).await {
        Ok(_) => Redirect::to("/console/billing").into_response(),
        Err(p) => problem_page(p, Some(&m)),
    }
}
